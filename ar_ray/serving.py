"""`ar-ray serve`: a saved ensemble (or its distilled student) as an HTTP service on Ray Serve.

One application, one deployment: a FastAPI ingress whose replicas each hold the models the
`SavedEnsemble` names, on the resources the ensemble's inference actors held unless told
otherwise. Images decode as `ar-ray predict` decodes files and go through the same
`EnsemblePredictor`, so a served answer is a batch answer. Concurrent images join one
forward through `@serve.batch`; replicas scale between a floor and a ceiling the user
states (by default, the pool size the ensemble recorded), never to what the cluster holds.

    serve run ar_ray.serving:build_app run=runs/demo model=ensemble

starts the same application from Serve's own CLI or a Serve config file.
"""

# No `from __future__ import annotations` here: FastAPI reads the routes' annotations (a
# `Request`) at run time, from methods that Serve's ingress has moved out of this module.
import asyncio
from collections import Counter
from dataclasses import asdict, dataclass, fields
from typing import Any, get_args

import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from ray import serve
from ray.serve import Application
from ray.serve.handle import DeploymentHandle

import ar_ray
from ar_ray.errors import UserError
from ar_ray.inference import EnsemblePredictor, InferenceOptions
from ar_ray.predictions import top_k
from ar_ray.resources import Resources, stated
from ar_ray.saved_ensemble import SavedEnsemble, load_model
from ar_ray.serve_requests import RequestError, RequestLimits, decode_upload, uploaded_files

APP_NAME = "ar-ray"
LOOPBACK_HOSTS = frozenset({"127.0.0.1", "localhost", "::1"})
REPLICA_HEADER = "x-ar-ray-replica"  # which replica answered: shows replicas sharing load


@dataclass(frozen=True)
class ServiceSettings:
    """Everything a replica and its deployment need: a typed config, so `ar_ray.serve`, the
    CLI and Serve's builder arguments resolve to one thing."""

    run: str
    model: str = "ensemble"
    replicas: int | str = "auto"  # a fixed count, or "auto": autoscale in [min, max]
    min_replicas: int | None = None  # auto's floor (default 1)
    max_replicas: int | None = None  # auto's ceiling (default: the ensemble's max actors)
    cpus_per_replica: float | None = None  # None: the ensemble's inference actors'
    gpus_per_replica: float | None = None
    max_batch_size: int = 16  # 1: no batching
    batch_wait_ms: float = 10.0
    max_request_mb: float = 20.0
    max_megapixels: float = 50.0
    verbose: bool = False  # Serve's INFO lines and one access-log line per request

    def __post_init__(self) -> None:
        """Bad settings fail before Serve starts anything, each naming its flag."""
        if self.replicas != "auto" and not (isinstance(self.replicas, int) and self.replicas > 0):
            raise UserError(f"--replicas {self.replicas}: 'auto' or a count >= 1")
        if self.replicas != "auto" and (self.min_replicas, self.max_replicas) != (None, None):
            raise UserError("--min-replicas/--max-replicas apply to --replicas auto only")
        for flag, value, least in (
            ("min-replicas", self.min_replicas, 0),
            ("max-replicas", self.max_replicas, 1),
            ("max-batch-size", self.max_batch_size, 1),
        ):
            if value is not None and value < least:
                raise UserError(f"--{flag} {value}: must be >= {least}")
        low, high = self.min_replicas, self.max_replicas
        if low is not None and high is not None and low > high:
            raise UserError(f"--min-replicas {low} > --max-replicas {high}")
        if not self.batch_wait_ms >= 0:
            raise UserError(f"--batch-wait-ms {self.batch_wait_ms:g}: must be >= 0")
        for flag, amount in (
            ("max-request-mb", self.max_request_mb),
            ("max-megapixels", self.max_megapixels),
        ):
            if not amount > 0:
                raise UserError(f"--{flag} {amount:g}: must be > 0")

    @classmethod
    def from_args(cls, args: dict[str, Any]) -> "ServiceSettings":
        """Serve's builder arguments (`serve run ... key=value` gives strings), typed."""
        known = {field.name: field for field in fields(cls)}
        unknown = sorted(set(args) - set(known))
        if unknown:
            raise UserError(f"unknown argument(s) {', '.join(unknown)}; known: {', '.join(known)}")
        if "run" not in args:
            raise UserError("argument run=<storage>/<name> is required")
        typed: dict[str, Any] = {}
        for name, value in args.items():
            typed[name] = _typed(name, value, known[name].type)
        return cls(**typed)

    def limits(self) -> RequestLimits:
        return RequestLimits(
            max_request_bytes=int(self.max_request_mb * 2**20),
            max_pixels=int(self.max_megapixels * 1e6),
        )

    def replica_resources(self, saved: SavedEnsemble) -> Resources:
        """Stated resources over what the ensemble's inference actors held."""
        recorded = InferenceOptions.from_record(saved.request).actor
        return stated(self.cpus_per_replica, self.gpus_per_replica, recorded)

    def replica_range(self, saved: SavedEnsemble) -> tuple[int, int]:
        """The fewest and most replicas: a fixed count, or auto's floor and ceiling."""
        if self.replicas != "auto":
            return int(self.replicas), int(self.replicas)
        floor = 1 if self.min_replicas is None else self.min_replicas
        if self.max_replicas is not None:
            return floor, self.max_replicas
        return floor, max(floor, InferenceOptions.from_record(saved.request).max_actors)


def _typed(name: str, value: Any, kind: Any) -> Any:
    """A builder argument as its field's type (`serve run ... key=value` gives strings)."""
    if not isinstance(value, str) or kind is str or (name == "replicas" and value == "auto"):
        return value
    if kind is bool:
        return value.lower() in ("1", "true", "yes")
    try:
        return float(value) if float in (kind, *get_args(kind)) else int(value)
    except ValueError:
        raise UserError(f"argument {name}={value}: not a number") from None


def deployment_options(settings: ServiceSettings, saved: SavedEnsemble) -> dict[str, Any]:
    """Replicas, their resources and how many requests each takes.

    Autoscaling targets one full batch in flight per replica, and each replica accepts two
    batches' worth of requests, so a batch can fill while the previous one runs.
    """
    low, high = settings.replica_range(saved)
    scaling: dict[str, Any]
    if settings.replicas == "auto":
        scaling = {
            "autoscaling_config": {
                "min_replicas": low,
                "max_replicas": high,
                "target_ongoing_requests": settings.max_batch_size,
            }
        }
    else:
        scaling = {"num_replicas": high}
    return scaling | {
        "ray_actor_options": settings.replica_resources(saved).ray_options(),
        "max_ongoing_requests": max(5, 2 * settings.max_batch_size),
        "logging_config": serve_logging(settings.verbose),
    }


def serve_logging(verbose: bool) -> dict[str, Any]:
    """Serve's own lines (every replica's start, every request's access line) are Ray's
    chatter, as ar-ray treats it elsewhere: shown under --verbose, warnings otherwise."""
    return {"log_level": "INFO" if verbose else "WARNING", "enable_access_log": verbose}


def describe_service(settings: ServiceSettings, saved: SavedEnsemble) -> str:
    """What serving will hold before it holds it: replicas, each one's request, and the
    GPU-hours per hour of serving at the ceiling."""
    low, high = settings.replica_range(saved)
    each = settings.replica_resources(saved)
    count = f"{high}" if low == high else f"{low}-{high} (autoscaling)"
    batching = (
        "no batching"
        if settings.max_batch_size == 1
        else f"batches of up to {settings.max_batch_size} within {settings.batch_wait_ms:g} ms"
    )
    return (
        f"serving the {settings.model} ({len(saved.members)} member(s), {saved.tta}): {count} "
        f"replica(s) of {each.describe()}, {batching}; at most {high * each.gpus:g} GPU-hours "
        "per hour of serving"
    )


class BatchTally:
    """How many images each model call took: shows whether batching happens."""

    def __init__(self) -> None:
        self.sizes: Counter[int] = Counter()

    def summary(self) -> dict[str, int]:
        return {
            "images": sum(size * count for size, count in self.sizes.items()),
            "batches": sum(self.sizes.values()),
            "largest_batch": max(self.sizes, default=0),
        }


app = FastAPI(title="ar-ray", description="Attract-and-Repulse ensemble predictions")


@app.exception_handler(RequestError)
async def _refuse(request: Request, error: RequestError) -> JSONResponse:
    return JSONResponse({"error": str(error)}, status_code=error.status)


@serve.deployment(name="EnsembleService")
@serve.ingress(app)
class EnsembleService:
    """One replica: the models loaded once, answering single images and batches."""

    def __init__(self, settings: ServiceSettings) -> None:
        self.settings = settings
        self.saved = load_model(settings.run, settings.model)
        self.predictor = EnsemblePredictor(
            self.saved.locations(), self.saved.tta, self.saved.fitted_weights
        )
        self.limits = settings.limits()
        self.tally = BatchTally()
        self.replica = serve.get_replica_context().replica_id.unique_id
        self.predict_images.set_max_batch_size(settings.max_batch_size)
        self.predict_images.set_batch_wait_timeout_s(settings.batch_wait_ms / 1000)

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.01)
    async def predict_images(self, images: list[np.ndarray]) -> list[np.ndarray]:
        """Probabilities for images that arrived together, in one forward; in a thread, so
        the replica goes on reading requests (the next batch) while the model runs."""
        self.tally.sizes[len(images)] += 1
        probs = await asyncio.to_thread(self.predictor.probabilities, np.stack(images))
        return list(probs)

    async def _answers(self, files: list[tuple[str, bytes]]) -> list[dict[str, Any]]:
        """Each file decoded (in threads) and answered, in order; one bad file refuses all."""
        images = await asyncio.gather(
            *(
                asyncio.to_thread(
                    decode_upload, name, data, self.saved.stored_size, self.limits.max_pixels
                )
                for name, data in files
            )
        )
        probs = await asyncio.gather(*(self.predict_images(image) for image in images))
        return [self._answer(p) for p in probs]

    def _answer(self, probs: np.ndarray) -> dict[str, Any]:
        order, top = top_k(probs[None])
        listed = [
            {"class": self.saved.classes[i], "probability": float(p)}
            for i, p in zip(order[0], top[0], strict=True)
        ]
        return {"predicted": listed[0]["class"], "top5": listed, "model": self.settings.model}

    def _reply(self, body: dict[str, Any]) -> JSONResponse:
        return JSONResponse(body, headers={REPLICA_HEADER: self.replica})

    @app.post("/predict")
    async def predict(self, request: Request) -> JSONResponse:
        files = await uploaded_files(request, self.limits)
        if len(files) != 1:
            message = f"{len(files)} images: /predict takes one, /predict/batch several"
            raise RequestError(400, message)
        (answer,) = await self._answers(files)
        return self._reply(answer)

    @app.post("/predict/batch")
    async def predict_batch(self, request: Request) -> JSONResponse:
        answers = await self._answers(await uploaded_files(request, self.limits))
        return self._reply({"model": self.settings.model, "predictions": answers})

    @app.get("/healthz")
    async def healthz(self) -> JSONResponse:
        return self._reply({"status": "ok"})

    @app.get("/info")
    async def info(self) -> JSONResponse:
        saved = self.saved
        return self._reply(
            {
                "model": self.settings.model,
                "classes": saved.classes,
                "members": saved.members,
                "weights": saved.weights,
                "method": saved.method,
                "tta": saved.tta,
                "image_size": saved.image_size,
                "stored_size": saved.stored_size,
                "version": ar_ray.__version__,
                "settings": asdict(self.settings),
                "replica": self.tally.summary(),
            }
        )


def application(settings: ServiceSettings, saved: SavedEnsemble) -> Application:
    """The Serve application for `settings`, sized from `saved` (the record the caller read
    and checked, so a bad run fails before any replica starts)."""
    return EnsembleService.options(**deployment_options(settings, saved)).bind(settings)


def build_app(args: dict[str, Any]) -> Application:
    """Serve's application builder: `serve run ar_ray.serving:build_app run=...` or a Serve
    config file's `import_path` with `args`, taking `ServiceSettings`' fields."""
    settings = ServiceSettings.from_args(args)
    return application(settings, load_model(settings.run, settings.model))


def start(
    settings: ServiceSettings, saved: SavedEnsemble, *, host: str, port: int
) -> DeploymentHandle:
    """Start Serve's HTTP proxy on host:port and deploy; returns when replicas answer."""
    serve.start(
        http_options={"host": host, "port": port}, logging_config=serve_logging(settings.verbose)
    )
    app = application(settings, saved)
    return serve.run(app, name=APP_NAME, route_prefix="/", blocking=False)
