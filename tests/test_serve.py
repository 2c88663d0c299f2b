"""`ar-ray serve`: a real Ray Serve on 127.0.0.1, spoken to with a real HTTP client (httpx).

One Serve for the module, on the session's Ray; each test deploys the settings it needs
(deploying is seconds: a replica loads torch and the members), and the last test shuts it
down and looks for what is left. The CLI test runs the command in its own process and Ray,
as a user would, and stops it with SIGTERM.
"""

from __future__ import annotations

import asyncio
import io
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

import ar_ray
from ar_ray.data import CLASS_SEPARATOR
from ar_ray.errors import UserError
from ar_ray.saved_ensemble import SavedEnsemble
from ar_ray.serving import REPLICA_HEADER, ServiceSettings, build_app, deployment_options
from tests.helpers import assert_user_error, free_port, run_cli
from tests.saved_runs import CLASSES, STORED, predict_path, write_run

pytest.importorskip("ray.serve", reason="the serve extra: pip install 'ar-ray[serve]'")
# tests that take `service` run on the session's Ray, and conftest marks them `ray`

VAL_IMAGES = 12
SERVICE = {"replicas": 1, "cpus_per_replica": 0.5, "max_batch_size": 8, "batch_wait_ms": 50}
MULTIPART = "multipart/form-data"
FIELD_ONLY = b'--b\r\nContent-Disposition: form-data; name="note"\r\n\r\nhi\r\n--b--\r\n'
LIMITS = {"max_request_mb": 1.0, "max_megapixels": 1.0}  # small, so the tests can pass them


def png(pixels: np.ndarray) -> bytes:
    """uint8 CHW (or HW for greyscale) as PNG bytes."""
    image = Image.fromarray(pixels.transpose(1, 2, 0) if pixels.ndim == 3 else pixels)
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def run(module_tmp) -> Path:
    """Two members with uneven weights and a temperature, TenCrop, and a distilled student."""
    root = write_run(module_tmp, weights=[0.3, 0.7], tta="tencrop")
    write_run(root, weights=[1.0], tta="center", temperature=1.0, folder="distilled")
    return root


@pytest.fixture(scope="module")
def val_images(builtin_splits) -> np.ndarray:
    """Built-in val images, stored at the members' stored size (32 px), so a PNG of one
    decodes back to the very same pixels."""
    val = builtin_splits.val.images
    assert val.shape[-1] == STORED
    return val[np.linspace(0, len(val) - 1, VAL_IMAGES).astype(int)]


class Service:
    """Serve on a free port of the session's Ray; `client(**options)` (re)deploys only when
    the options differ from what is deployed."""

    def __init__(self, run: Path) -> None:
        self.run, self.port = run, free_port()
        self.deployed: dict | None = None

    def client(self, **options) -> httpx.Client:
        if self.deployed != options:
            ar_ray.serve(str(self.run), port=self.port, **options)
            self.deployed = options
        return httpx.Client(base_url=f"http://127.0.0.1:{self.port}", timeout=120)


@pytest.fixture(scope="module")
def service(ray_cluster, run):
    served = Service(run)
    yield served
    ar_ray.stop_serving()


def top5(answer: dict) -> tuple[list[str], np.ndarray]:
    return [e["class"] for e in answer["top5"]], np.array(
        [e["probability"] for e in answer["top5"]]
    )


def expected_top5(probs: np.ndarray) -> tuple[list[str], np.ndarray]:
    order = np.argsort(-probs)[:5]
    return [CLASSES[i] for i in order], probs[order]


def test_answers_equal_predicts_for_val_images(service, run, val_images, tmp_path):
    """Each val image, sent as a PNG body, gets `ar-ray predict`'s top-5 for the same file,
    and the probabilities worked out by hand from the members."""
    folder = tmp_path / "val"
    folder.mkdir()
    for index, pixels in enumerate(val_images):
        (folder / f"{index:02d}.png").write_bytes(png(pixels))
    predicted = ar_ray.predict(
        str(run), str(folder), out=tmp_path / "p.csv", cpus_per_actor=0.5, max_actors=1
    ).frame()
    by_file = predicted.set_index(predicted["image_id"].map(lambda p: Path(p).name))
    by_hand = predict_path(run, val_images)
    client = service.client(**SERVICE)
    for index, pixels in enumerate(val_images):
        answer = client.post(
            "/predict", content=png(pixels), headers={"content-type": "image/png"}
        ).json()
        classes, probs = top5(answer)
        row = by_file.loc[f"{index:02d}.png"]
        assert classes == row["top5"].split(CLASS_SEPARATOR) and answer["predicted"] == classes[0]
        assert np.allclose(probs, [float(p) for p in row["top5_probs"].split()], atol=5e-5)
        assert classes == expected_top5(by_hand[index])[0]
        assert np.allclose(probs, expected_top5(by_hand[index])[1], atol=1e-5)
        assert answer["model"] == "ensemble"


def test_a_batch_request_answers_each_image_in_order(service, run, val_images):
    client = service.client(**SERVICE)
    files = [("image", (f"{i}.png", png(p), "image/png")) for i, p in enumerate(val_images[:5])]
    answer = client.post("/predict/batch", files=files)
    assert answer.status_code == 200, answer.text
    by_hand = predict_path(run, val_images[:5])
    for got, expected in zip(answer.json()["predictions"], by_hand, strict=True):
        assert top5(got)[0] == expected_top5(expected)[0]
        assert np.allclose(top5(got)[1], expected_top5(expected)[1], atol=1e-5)


def test_health_and_info_say_what_is_served(service, run):
    client = service.client(**SERVICE)
    assert client.get("/healthz").json() == {"status": "ok"}
    info = client.get("/info").json()
    assert info["classes"] == CLASSES and info["members"] == ["m0", "m1"]
    assert info["tta"] == "tencrop" and info["stored_size"] == STORED
    assert info["model"] == "ensemble" and info["version"] == ar_ray.__version__


async def _concurrently(base_url: str, bodies: list[bytes], concurrency: int) -> list:
    """POST each body to /predict, `concurrency` requests in flight at a time."""
    gate = asyncio.Semaphore(concurrency)
    limits = httpx.Limits(max_connections=concurrency)
    async with httpx.AsyncClient(base_url=base_url, timeout=120, limits=limits) as client:

        async def one(body: bytes) -> httpx.Response:
            async with gate:
                return await client.post(
                    "/predict", content=body, headers={"content-type": "image/png"}
                )

        return await asyncio.gather(*(one(body) for body in bodies))


def test_concurrent_requests_share_a_forward(service, val_images):
    client = service.client(**SERVICE)
    before = client.get("/info").json()["replica"]
    bodies = [png(pixels) for pixels in val_images] * 4
    answers = asyncio.run(_concurrently(str(client.base_url), bodies, concurrency=16))
    assert all(answer.status_code == 200 for answer in answers)
    after = client.get("/info").json()["replica"]
    assert after["images"] - before["images"] == len(bodies)
    assert after["largest_batch"] > 1
    assert after["batches"] - before["batches"] < len(bodies)


def test_a_bounded_load_gets_every_answer_right(service, run, val_images):
    """300 requests, 16 at a time: no failure, and each answer is its own image's."""
    client = service.client(**SERVICE)
    by_hand = predict_path(run, val_images)
    picks = np.random.default_rng(0).integers(0, len(val_images), 300)
    bodies = [png(val_images[i]) for i in range(len(val_images))]
    answers = asyncio.run(_concurrently(str(client.base_url), [bodies[i] for i in picks], 16))
    assert [answer.status_code for answer in answers] == [200] * len(picks)
    for pick, answer in zip(picks, answers, strict=True):
        assert top5(answer.json())[0] == expected_top5(by_hand[pick])[0]


def bomb() -> bytes:
    """A 1-bit PNG of 30,000 x 30,000 black pixels: 0.1 MB that decodes to 900 megapixels."""
    buffer = io.BytesIO()
    Image.new("1", (30_000, 30_000)).save(buffer, "PNG")
    return buffer.getvalue()


def bmp_of_unsupported_depth() -> bytes:
    """A BMP whose header says 64 bits per pixel, a depth PIL does not decode."""
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buffer, "BMP")
    data = bytearray(buffer.getvalue())
    data[28] = 64  # biBitCount
    return bytes(data)


def test_bad_requests_get_a_4xx_and_the_replica_serves_on(service, val_images):
    client = service.client(**SERVICE, **LIMITS)
    good = png(val_images[0])
    replica = client.get("/healthz").headers[REPLICA_HEADER]
    image_type = {"content-type": "image/png"}
    noise = np.random.default_rng(1).integers(0, 256, (3, 1200, 1000), np.uint8)
    cases = {
        "empty body": (dict(content=b"", headers=image_type), 400, "empty"),
        "not an image": (dict(content=b"hello", headers=image_type), 400, "not an image"),
        "truncated": (dict(content=good[: len(good) // 2], headers=image_type), 400, "truncated"),
        "over the size limit": (dict(content=png(noise), headers=image_type), 413, "limit"),
        "chunked over the limit": (
            dict(content=iter([b"\0" * 2**19] * 3), headers=image_type), 413, "limit",
        ),
        "too many pixels": (
            dict(content=png(np.zeros((1100, 1000), np.uint8)), headers=image_type),
            413, "megapixels",
        ),
        "a decompression bomb": (dict(content=bomb(), headers=image_type), 413, "image too large"),
        "unsupported mode": (dict(content=bmp_of_unsupported_depth()), 400, "BMP pixel depth"),
        "unsupported type": (
            dict(content=good, headers={"content-type": "text/plain"}), 415, "content type",
        ),
        "no file part": (
            dict(content=FIELD_ONLY, headers={"content-type": f"{MULTIPART}; boundary=b"}),
            400, "no file part",
        ),
        "two images to /predict": (
            dict(files=[("a", ("a.png", good)), ("b", ("b.png", good))]), 400, "/predict/batch",
        ),
    }  # fmt: skip
    for case, (request, status, says) in cases.items():
        answer = client.post("/predict", **request)
        assert answer.status_code == status, (case, answer.text)
        assert says in answer.json()["error"], (case, answer.text)
    valid = client.post("/predict", content=good, headers=image_type)
    assert valid.status_code == 200 and valid.headers[REPLICA_HEADER] == replica
    assert client.post("/predict", files={"image": ("x.png", good)}).json() == valid.json()


def test_two_replicas_both_answer(service, run, val_images):
    """Deployed through Serve's builder with string arguments, as `serve run` passes them."""
    from ray import serve

    client = service.client(**SERVICE)
    args = {"run": str(run), "replicas": "2", "cpus_per_replica": "0.5", "max_batch_size": "4"}
    service.deployed = None  # what follows replaces the deployment
    serve.run(build_app(args), name="ar-ray", route_prefix="/")
    bodies = [png(pixels) for pixels in val_images] * 5
    answers = asyncio.run(_concurrently(str(client.base_url), bodies, concurrency=16))
    assert all(answer.status_code == 200 for answer in answers)
    assert len({answer.headers[REPLICA_HEADER] for answer in answers}) == 2


def test_settings_refuse_what_cannot_be_served():
    for bad, says in (
        (dict(replicas=0), "--replicas 0"),
        (dict(replicas=2, max_replicas=3), "auto only"),
        (dict(min_replicas=3, max_replicas=2), "--min-replicas 3 > --max-replicas 2"),
        (dict(max_batch_size=0), "--max-batch-size 0"),
        (dict(batch_wait_ms=-1), "--batch-wait-ms -1"),
        (dict(max_request_mb=0), "--max-request-mb 0"),
    ):
        with pytest.raises(UserError, match=says.replace("-", r"\-")):
            ServiceSettings(run="r", **bad)
    with pytest.raises(UserError, match="unknown argument"):
        ServiceSettings.from_args({"run": "r", "replica": "3"})


def test_builder_arguments_take_their_fields_types():
    """`serve run ... key=value` passes strings; a Serve config file passes YAML types."""
    typed = ServiceSettings.from_args(
        {"run": "r", "replicas": "3", "batch_wait_ms": "2.5", "verbose": "true"}
    )
    assert (typed.replicas, typed.batch_wait_ms, typed.verbose) == (3, 2.5, True)
    assert ServiceSettings.from_args({"run": "r", "replicas": "auto"}).replicas == "auto"
    assert ServiceSettings.from_args({"run": "r", "max_replicas": 4}).max_replicas == 4


def test_replicas_scale_within_what_was_stated_or_recorded(tmp_path):
    """auto's ceiling is the ensemble's recorded pool size (never the cluster's), raised to a
    stated floor; each replica holds the recorded actor's resources unless told otherwise."""
    saved = SavedEnsemble(
        members=["m"], checkpoints=["m.pt"], method="uniform", weights=[1.0],
        temperature=1.0, tta="tencrop", classes=CLASSES, image_size=28, stored_size=STORED,
        request={"max_actors": 3, "cpus_per_actor": 4, "gpus_per_actor": 1},
    )  # fmt: skip
    assert ServiceSettings(run="r").replica_range(saved) == (1, 3)
    assert ServiceSettings(run="r", min_replicas=5).replica_range(saved) == (5, 5)
    assert ServiceSettings(run="r", min_replicas=0, max_replicas=8).replica_range(saved) == (0, 8)
    assert ServiceSettings(run="r", replicas=2).replica_range(saved) == (2, 2)
    options = deployment_options(ServiceSettings(run="r", max_batch_size=8), saved)
    assert options["autoscaling_config"] == {
        "min_replicas": 1, "max_replicas": 3, "target_ongoing_requests": 8,
    }  # fmt: skip
    assert options["ray_actor_options"] == {"num_cpus": 4, "num_gpus": 1}
    fixed = deployment_options(ServiceSettings(run="r", replicas=2, gpus_per_replica=0), saved)
    assert fixed["num_replicas"] == 2 and "autoscaling_config" not in fixed
    assert fixed["ray_actor_options"] == {"num_cpus": 4, "num_gpus": 0}


@pytest.mark.slow
def test_a_run_without_an_ensemble_is_one_line(tmp_path):
    assert_user_error(run_cli("serve", "--ensemble", str(tmp_path)), "ensemble.yaml")


@pytest.mark.ray
def test_replicas_this_machine_cannot_hold_are_refused_before_serving(run):
    """On an embedded Ray nothing could ever place a GPU replica here: exit 2 at once,
    rather than a deployment that waits forever."""
    port = str(free_port())
    done = run_cli("serve", "--ensemble", str(run), "--gpus-per-replica", "1", "--port", port)
    assert_user_error(done, "--gpus-per-replica 1 asks for 1 GPU")


@pytest.mark.ray
def test_the_command_serves_the_student_until_sigterm(run, val_images):
    """`ar-ray serve --model distilled` in its own process and Ray; SIGTERM stops it with 0
    and the port closes. Bound beyond loopback, it warns that nothing authenticates."""
    port = free_port()
    command = [sys.executable, "-m", "ar_ray.cli", "serve", "--ensemble", str(run)]
    flags = ["--model", "distilled", "--port", str(port), "--cpus-per-replica", "0.5"]
    process = subprocess.Popen(
        [*command, *flags, "--host", "0.0.0.0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        lines = []
        for line in process.stdout:
            lines.append(line)
            if line.startswith("serving on"):
                break
        assert lines and lines[-1].startswith(f"serving on http://0.0.0.0:{port}/"), lines
        url = f"http://127.0.0.1:{port}"
        answer = httpx.post(f"{url}/predict", content=png(val_images[0]), timeout=120).json()
        expected = predict_path(run, val_images[:1], folder="distilled")[0]
        assert answer["model"] == "distilled" and top5(answer)[0] == expected_top5(expected)[0]
        assert np.allclose(top5(answer)[1], expected_top5(expected)[1], atol=1e-5)
        process.send_signal(signal.SIGTERM)
        out, err = process.communicate(timeout=120)
    finally:
        process.kill()
    assert process.returncode == 0, err
    assert "stopped serving" in out
    assert "no authentication" in err and "Traceback" not in err
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{url}/healthz", timeout=5)


def test_stopping_leaves_no_serve_actor_and_frees_the_cpus(service):
    import ray

    client = service.client(**SERVICE)
    assert client.get("/healthz").status_code == 200
    ar_ray.stop_serving()
    service.deployed = None

    def serve_actors() -> list:
        named = ray.util.list_named_actors(all_namespaces=True)
        return [actor for actor in named if actor["namespace"] == "serve"]

    def all_cpus_free() -> bool:
        return ray.available_resources().get("CPU") == ray.cluster_resources()["CPU"]

    deadline = time.monotonic() + 60
    while (serve_actors() or not all_cpus_free()) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert serve_actors() == [] and all_cpus_free()
    with pytest.raises(httpx.ConnectError):
        client.get("/healthz", timeout=5)
