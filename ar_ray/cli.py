"""The `ar-ray` command line: parse, run, and turn user mistakes into one-line errors."""

from __future__ import annotations

import argparse
import inspect
import shlex
import signal
import sys
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ar_ray import api
from ar_ray.config import TTA_MODES
from ar_ray.errors import Interrupted, UserError
from ar_ray.interrupts import treat_sigterm_as_interrupt, wait_until_interrupted

if TYPE_CHECKING:  # the Ray-heavy modules load only for the commands that need them
    import pandas as pd

    from ar_ray.ensembling import EnsembleResult

EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130


def _add_data_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(  # a str, not a Path: recorded as given, and a URI must stay whole
        "--data",
        help="VIPriors/ImageFolder root: folder, s3:// or gs:// (default: built-in Fashion-MNIST)",
    )
    parser.add_argument(
        "--skip-bad-images", action="store_true", help="skip and list unreadable images"
    )
    parser.add_argument(
        "--limit-per-class", type=int, metavar="N", help="use at most N images per class"
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ar-ray", description="Attract-and-Repulse learning from scratch, on Ray."
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks for errors")
    commands = parser.add_subparsers(dest="command", required=True)

    train = commands.add_parser("train", help="one training run on this machine, no cluster")
    train.add_argument("--config", type=Path, help="run config YAML (default: built-in)")
    train.add_argument(
        "--rank", type=int, default=1, help="which config of a ranked list (best_configs.yaml)"
    )
    _add_data_arguments(train)
    train.add_argument("--epochs", type=int)
    train.add_argument("--seed", type=int)
    train.add_argument("--out", type=Path, default=Path("runs/train"), help="output folder")
    train.add_argument("--resume", action="store_true", help="continue from --out's checkpoint")
    train.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    train.add_argument(
        "--loader-workers",
        type=int,
        help="processes augmenting images (default: this machine's CPUs minus one)",
    )
    train.set_defaults(handler=_train)

    tune = commands.add_parser("tune", help="search loss weights and augmentation on Ray Tune")
    tune.add_argument("--space", type=Path, required=True, help="search space YAML")
    tune.add_argument("--trials", type=int, help="how many configs to try (default 16)")
    tune.add_argument("--epochs", type=int, help="epochs per trial (default: the space's)")
    _add_data_arguments(tune)
    _add_cluster_arguments(tune)
    tune.add_argument("--gpus-per-trial", type=float, help="GPUs each trial holds (default 0)")
    tune.add_argument("--cpus-per-trial", type=float, help="CPUs each trial holds (default 1)")
    tune.add_argument("--max-concurrent", type=int, help="cap on trials running at once")
    tune.add_argument("--grace-period", type=int, help="epochs before ASHA may stop (default 1)")
    tune.add_argument("--max-failures", type=int, help="retries per failed trial (default 2)")
    tune.add_argument("--seed", type=int, help="the search's seed (default 0)")
    tune.add_argument(
        "--time-budget", help="end the search after this long (6h, 90m, seconds); default none"
    )
    tune.add_argument(
        "--staged-search",
        choices=("auto", "off"),
        help="auto (default): two phases when mt_* keys are searched; off: one search",
    )
    tune.add_argument("--stage2-trials", type=int, help="phase-2 trials (default trials / 2)")
    tune.add_argument(
        "--stage2-from", type=int, help="stage-one trials phase 2 resumes (default 4)"
    )
    tune.add_argument(
        "--optuna-storage",
        metavar="URL",
        help="keep the Optuna study in a database (sqlite:///PATH.db, postgresql://...), "
        "for optuna-dashboard URL (default: in memory)",
    )
    _add_tracking_arguments(tune)
    tune.add_argument(
        "--plan", dest="plan_only", action="store_true", help="print the epoch plan and exit"
    )
    tune.add_argument("--resume", action="store_true", help="continue the experiment --name")
    tune.add_argument("--overwrite", action="store_true", help="replace the experiment --name")
    tune.set_defaults(handler=_tune)

    ensemble = commands.add_parser(
        "ensemble", help="train diverse members from a tune run, fit weights, predict"
    )
    ensemble.add_argument("--from", dest="run", required=True, help="<storage>/<name> of a tune")
    ensemble.add_argument("--members", type=int, help="how many members (default 3)")
    ensemble.add_argument("--archs", help="comma-separated backbones to spread members over")
    ensemble.add_argument("--epochs", type=int, help="epochs per member (default: the tune's)")
    ensemble.add_argument("--workers-per-member", type=int, help="DDP workers (default 1)")
    ensemble.add_argument(
        "--cpus-per-worker", type=float, help="CPUs per member worker (default: the tune's)"
    )
    ensemble.add_argument(
        "--gpus-per-worker", type=float, help="GPUs per member worker (default: the tune's)"
    )
    ensemble.add_argument(
        "--max-concurrent", type=int, help="cap on members training at once (default: all)"
    )
    ensemble.add_argument("--tta", choices=TTA_MODES, help="test-time views (default tencrop)")
    _add_actor_arguments(ensemble, "the member workers'")
    _add_address_argument(ensemble)
    ensemble.add_argument(
        "--seed", type=int, help="val folds, and seeds of members that train anew (default 0)"
    )
    ensemble.add_argument(
        "--retrain",
        action="store_true",
        help="train every member, even one a finished trial already is (own seed each)",
    )
    ensemble.add_argument(
        "--snapshots",
        type=int,
        help="N > 1: train members with N lr cycles (SGDR), each cycle's end a member (default 1)",
    )
    _add_tracking_arguments(ensemble)
    ensemble.add_argument("--resume", action="store_true", help="reuse finished members")
    ensemble.add_argument("--overwrite", action="store_true", help="replace members and outputs")
    ensemble.set_defaults(handler=_ensemble)

    distill = commands.add_parser(
        "distill", help="train one fast student on a saved ensemble's answers"
    )
    distill.add_argument(
        "--from", dest="run", required=True, help="<storage>/<name> of an ensemble"
    )
    distill.add_argument("--arch", help="the student's backbone (default: the best member's)")
    distill.add_argument("--epochs", type=int, help="student epochs (default: the members')")
    distill.add_argument("--temperature", type=float, help="distillation temperature T (default 4)")
    distill.add_argument(
        "--label-weight", type=float, help="weight of the recipe's label loss (default 0)"
    )
    distill.add_argument("--seed", type=int, help="the student's seed (default 0)")
    _add_address_argument(distill)
    _add_tracking_arguments(distill)
    distill.add_argument("--resume", action="store_true", help="continue the student's training")
    distill.add_argument("--overwrite", action="store_true", help="replace <run>/distilled")
    distill.set_defaults(handler=_distill)

    predict = commands.add_parser("predict", help="label images with a saved ensemble")
    predict.add_argument("--ensemble", required=True, help="<storage>/<name> of an ensemble")
    predict.add_argument(
        "--images", nargs="+", required=True, help="files, folders, s3:// or gs:// prefixes"
    )
    predict.add_argument(
        "--model",
        choices=("ensemble", "distilled"),
        default="ensemble",
        help="the ensemble (default) or its distilled student (`ar-ray distill`)",
    )
    predict.add_argument(
        "--out", type=Path, default=Path("predictions.csv"), help="CSV, or Parquet (.parquet)"
    )
    _add_actor_arguments(predict, "the ensemble's")
    _add_address_argument(predict)
    predict.set_defaults(handler=_predict)

    export = commands.add_parser(
        "export", help="a saved ensemble as one ONNX file: uint8 images in, probabilities out"
    )
    export.add_argument("--from", dest="run", required=True, help="<storage>/<name> of an ensemble")
    export.add_argument(
        "--model", default="ensemble", help="ensemble (default) or distilled: what to export"
    )
    export.add_argument("--format", default="onnx", help="file format (default onnx)")
    export.add_argument("--out", help="the .onnx file (default <run>/export/<model>.onnx)")
    export.set_defaults(handler=_export)

    serve = commands.add_parser(
        "serve", help="a saved ensemble as an autoscaling HTTP service on Ray Serve"
    )
    serve.add_argument("--ensemble", required=True, help="<storage>/<name> of an ensemble")
    serve.add_argument(
        "--model", default="ensemble", help="ensemble (default) or distilled: what to serve"
    )
    serve.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    serve.add_argument("--port", type=int, default=8000, help="HTTP port (default 8000)")
    serve.add_argument(
        "--replicas", type=_replica_count, default="auto", help="auto (default) or a fixed count"
    )
    serve.add_argument("--min-replicas", type=int, help="auto's floor (default 1)")
    serve.add_argument(
        "--max-replicas", type=int, help="auto's ceiling (default: the ensemble's --max-actors)"
    )
    serve.add_argument(
        "--cpus-per-replica", type=float, help="CPUs per replica (default: the ensemble's actors')"
    )
    serve.add_argument(
        "--gpus-per-replica", type=float, help="GPUs per replica (default: the ensemble's actors')"
    )
    serve.add_argument(
        "--max-batch-size", type=int, default=16, help="images per forward (default 16; 1: off)"
    )
    serve.add_argument(
        "--batch-wait-ms", type=float, default=10.0, help="longest wait to fill a batch (10)"
    )
    serve.add_argument(
        "--max-request-mb", type=float, default=20.0, help="larger bodies get a 413 (default 20)"
    )
    serve.add_argument(
        "--max-megapixels", type=float, default=50.0, help="larger images get a 413 (default 50)"
    )
    _add_address_argument(serve)
    serve.set_defaults(handler=_serve)
    return parser


def _replica_count(value: str) -> int | str:
    """--replicas: "auto", or a whole number (checked further by the workflow)."""
    if value == "auto":
        return value
    try:
        return int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r}: 'auto' or a count") from None


def _add_actor_arguments(parser: argparse.ArgumentParser, inherited: str) -> None:
    parser.add_argument(
        "--cpus-per-actor", type=float, help=f"CPUs per inference actor (default: {inherited})"
    )
    parser.add_argument(
        "--gpus-per-actor", type=float, help=f"GPUs per inference actor (default: {inherited})"
    )
    parser.add_argument(
        "--max-actors", type=int, help=f"largest inference pool (default: {inherited} or 4)"
    )
    parser.add_argument(
        "--images-per-call",
        type=int,
        help="images an actor answers per call (default: 64 on a CPU actor, 256 on a GPU one; "
        "predict: the ensemble's)",
    )


def _add_address_argument(parser: argparse.ArgumentParser) -> None:
    """Every command that runs on Ray: where, and how much of Ray's output to show."""
    parser.add_argument("--address", help="Ray cluster to join (default: RAY_ADDRESS or local)")
    parser.add_argument(
        "-v", "--verbose", action="store_true", help="show all of Ray's output, not only ar-ray's"
    )


def _add_tracking_arguments(parser: argparse.ArgumentParser) -> None:
    """tune, ensemble, distill: runs in MLflow, in the run folder's experiment."""
    parser.add_argument(
        "--track", choices=("mlflow",), help="log runs to MLflow (needs ar-ray[mlflow])"
    )
    parser.add_argument(
        "--tracking-uri", metavar="URI", help="the MLflow server (default: MLFLOW_TRACKING_URI)"
    )


def _add_cluster_arguments(parser: argparse.ArgumentParser) -> None:
    _add_address_argument(parser)
    parser.add_argument(
        "--storage", default="runs", help="root for all outputs: a folder, s3:// or gs://"
    )
    parser.add_argument("--name", default="ar", help="experiment name under --storage")


def _train(args: argparse.Namespace) -> int:
    result = api.train(
        args.config,
        rank=args.rank,
        data=args.data,
        skip_bad_images=args.skip_bad_images,
        limit_per_class=args.limit_per_class,
        epochs=args.epochs,
        seed=args.seed,
        out=args.out,
        resume=args.resume,
        overwrite=args.overwrite,
        loader_workers=args.loader_workers,
    )
    if result.test is not None:
        print(f"test top-1 {100 * result.test['top1']:.2f}% ({result.test['tta']})")
    return 0


def _tune(args: argparse.Namespace) -> int:
    from ar_ray.leaderboard import print_leaderboard
    from ar_ray.search_space import load_search_space

    result = api.tune(args.space, **_options(args, api.tune))
    if args.plan_only:
        return 0
    print_leaderboard(result.leaderboard, load_search_space(args.space))
    print(f"leaderboard: {result.leaderboard_path}")
    return 0


def _ensemble(args: argparse.Namespace) -> int:
    archs = [a.strip() for a in args.archs.split(",") if a.strip()] if args.archs else None
    options = _options(args, api.ensemble) | {"archs": archs}
    print_summary(api.ensemble(args.run, **options))
    return 0


def print_summary(summary: EnsembleResult) -> None:
    """Every score and where they are, then the lines users look for: the ensemble against
    the member that is best on val (the one a user without the ensemble would have kept;
    the best on test would be an oracle) on every scored split, with the gain's interval."""
    _print_scores(summary.metrics, summary.folder, summary.summary_lines())


def _print_scores(metrics: pd.DataFrame, folder: str, closing: list[str]) -> None:
    """The scores, where they were written, then the closing lines: last, the test gain,
    the line a user looks for."""
    print(metrics.to_string(index=False, float_format="%.4f"))
    print(f"outputs: {folder}")
    for line in closing:
        print(line)


def _distill(args: argparse.Namespace) -> int:
    result = api.distill(args.run, **_options(args, api.distill))
    _print_scores(result.metrics, result.folder, result.summary)
    return 0


def _predict(args: argparse.Namespace) -> int:
    result = api.predict(args.ensemble, args.images, **_options(args, api.predict))
    print(f"{result.images} predictions written to {result.out}; actors used: {result.pool}")
    if result.errors:
        print(f"{result.errors} images could not be decoded: see the 'error' column")
    return 0


def _export(args: argparse.Namespace) -> int:
    result = api.export(args.run, **_options(args, api.export))
    print(
        f"exported the {result.model} ({result.members} members, {result.tta}) to {result.out}; "
        f"onnxruntime matches PyTorch within {result.max_abs_diff:.1e} on "
        f"{result.checked_images} {result.checked_on}"
    )
    print(f"sidecar: {result.sidecar}")
    return 0


def _serve(args: argparse.Namespace) -> int:
    """Serve until Ctrl+C or SIGTERM, which (even while replicas are still starting) shut
    Serve down and end with 0: stopping is how a service ends, not an interruption."""
    try:
        api.serve(args.ensemble, **_options(args, api.serve))
        print(
            f"serving on http://{args.host}:{args.port}/ (POST /predict, /predict/batch; GET "
            "/healthz, /info); Ctrl+C stops",
            flush=True,
        )
        wait_until_interrupted()
    except KeyboardInterrupt:
        api.stop_serving()
        print("stopped serving", flush=True)
    return 0


def _options(args: argparse.Namespace, workflow: Callable[..., Any]) -> dict[str, Any]:
    """The parsed flags that `workflow` takes as keyword options (flags share its names)."""
    accepted = inspect.signature(workflow).parameters
    return {
        name: value
        for name, value in vars(args).items()
        if name in accepted and accepted[name].kind is inspect.Parameter.KEYWORD_ONLY
    }


def resume_command(argv: Sequence[str], command: str) -> str:
    """The command that continues an interrupted run: the same one, resuming where the
    command can (predict has nothing to resume: it is simply run again)."""
    kept = [arg for arg in argv if arg not in ("--overwrite", "--resume")]
    resume = [] if command == "predict" else ["--resume"]
    return shlex.join(["ar-ray", *kept, *resume])


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    signal.signal(signal.SIGINT, signal.default_int_handler)  # even if started with it ignored
    treat_sigterm_as_interrupt()
    try:
        return args.handler(args)
    except UserError as error:
        _shutdown_ray()  # work it queued (a member's trainer thread) must not hold the exit
        if args.debug:
            traceback.print_exc()
        print(f"ar-ray: error: {error}", file=sys.stderr)
        return EXIT_USER_ERROR
    except (KeyboardInterrupt, Interrupted):
        _shutdown_ray()
        again = resume_command(argv, args.command)
        verb = "run again" if args.command == "predict" else "resume"
        print(f"ar-ray: interrupted; {verb} with: {again}", file=sys.stderr)
        return EXIT_INTERRUPTED


def _shutdown_ray() -> None:
    if "ray" in sys.modules:
        import ray

        ray.shutdown()


if __name__ == "__main__":
    sys.exit(main())
