"""The `ar-ray` command line: parse, run, and turn user mistakes into one-line errors."""

from __future__ import annotations

import argparse
import shlex
import signal
import sys
import traceback
from collections.abc import Iterator, Sequence
from dataclasses import asdict, fields, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import yaml

from ar_ray import storage
from ar_ray.config import TTA_MODES, RunConfig, load_config
from ar_ray.data import DatasetSplits, FolderListing, list_folder, load_builtin, load_listing
from ar_ray.data.cache import CACHE_DIR
from ar_ray.data.decode import run_on_ray
from ar_ray.errors import Interrupted, UserError
from ar_ray.interrupts import treat_sigterm_as_interrupt
from ar_ray.resources import (
    DEFAULT_MAX_ACTORS,
    Resources,
    actor_default,
    announce,
    loader_workers_for,
    local_cpus,
    stated,
)

if TYPE_CHECKING:  # the Ray-heavy modules load only for the commands that need them
    from ar_ray.ensemble import EnsembleSummary

Request = TypeVar("Request")

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
    tune.add_argument("--trials", type=int, default=16)
    tune.add_argument("--epochs", type=int, help="epochs per trial (default: the space's)")
    _add_data_arguments(tune)
    _add_cluster_arguments(tune)
    tune.add_argument("--gpus-per-trial", type=float, help="GPUs each trial holds (default 0)")
    tune.add_argument("--cpus-per-trial", type=float, help="CPUs each trial holds (default 1)")
    tune.add_argument("--max-concurrent", type=int, help="cap on trials running at once")
    tune.add_argument("--grace-period", type=int, default=1, help="epochs before ASHA may stop")
    tune.add_argument("--max-failures", type=int, default=2, help="retries per failed trial")
    tune.add_argument("--seed", type=int, default=0)
    tune.add_argument("--resume", action="store_true", help="continue the experiment --name")
    tune.add_argument("--overwrite", action="store_true", help="replace the experiment --name")
    tune.set_defaults(handler=_tune)

    ensemble = commands.add_parser(
        "ensemble", help="train diverse members from a tune run, fit weights, predict"
    )
    ensemble.add_argument("--from", dest="run", required=True, help="<storage>/<name> of a tune")
    ensemble.add_argument("--members", type=int, default=3)
    ensemble.add_argument("--archs", help="comma-separated backbones to spread members over")
    ensemble.add_argument("--epochs", type=int, help="epochs per member (default: the tune's)")
    ensemble.add_argument("--workers-per-member", type=int, default=1, help="DDP workers")
    ensemble.add_argument(
        "--cpus-per-worker", type=float, help="CPUs per member worker (default: the tune's)"
    )
    ensemble.add_argument(
        "--gpus-per-worker", type=float, help="GPUs per member worker (default: the tune's)"
    )
    ensemble.add_argument(
        "--max-concurrent", type=int, help="cap on members training at once (default: all)"
    )
    ensemble.add_argument("--tta", choices=TTA_MODES, default="tencrop")
    _add_actor_arguments(ensemble, "the member workers'")
    _add_address_argument(ensemble)
    ensemble.add_argument("--seed", type=int, default=0)
    ensemble.add_argument("--resume", action="store_true", help="reuse finished members")
    ensemble.add_argument("--overwrite", action="store_true", help="replace members and outputs")
    ensemble.set_defaults(handler=_ensemble)

    predict = commands.add_parser("predict", help="label images with a saved ensemble")
    predict.add_argument("--ensemble", required=True, help="<storage>/<name> of an ensemble")
    predict.add_argument(
        "--images", nargs="+", required=True, help="files, folders, s3:// or gs:// prefixes"
    )
    predict.add_argument(
        "--out", type=Path, default=Path("predictions.csv"), help="CSV, or Parquet (.parquet)"
    )
    _add_actor_arguments(predict, "the ensemble's")
    _add_address_argument(predict)
    predict.set_defaults(handler=_predict)
    return parser


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


def _resources(
    args: argparse.Namespace, unit: str, per: str, inherited: Resources, origin: str
) -> Resources:
    """The flags `--cpus-per-<per>`/`--gpus-per-<per>` over what was inherited; unless the
    user stated both, one line says what each unit will request and how to change it."""
    cpus = getattr(args, f"cpus_per_{per}")
    gpus = getattr(args, f"gpus_per_{per}")
    for kind, value in (("cpus", cpus), ("gpus", gpus)):
        if value is not None and value < 0:
            raise UserError(f"--{kind}-per-{per}={value:g} must be >= 0")
    resources = stated(cpus, gpus, inherited)
    if resources.cpus + resources.gpus == 0:
        raise UserError(f"--cpus-per-{per} and --gpus-per-{per} are both 0: a {unit} needs one")
    if cpus is None or gpus is None:
        flags = f"--cpus-per-{per} / --gpus-per-{per}"
        print(announce(unit, resources.describe(), origin, flags), flush=True)
    return resources


def _add_address_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--address", help="Ray cluster to join (default: RAY_ADDRESS or local)")


def _add_cluster_arguments(parser: argparse.ArgumentParser) -> None:
    _add_address_argument(parser)
    parser.add_argument(
        "--storage", default="runs", help="root for all outputs: a folder, s3:// or gs://"
    )
    parser.add_argument("--name", default="ar", help="experiment name under --storage")


def given_options(argv: Sequence[str]) -> set[str]:
    """The options the user typed: a `--resume` compares these with the record, never
    argparse's defaults (an omitted `--trials` is not a change to 16)."""
    parser = build_parser()
    for action in _every_action(parser):
        action.default = argparse.SUPPRESS
    return set(vars(parser.parse_args(argv)))


def _every_action(parser: argparse.ArgumentParser) -> Iterator[argparse.Action]:
    for action in parser._actions:
        yield action
        if isinstance(action, argparse._SubParsersAction):
            for command in action.choices.values():
                yield from _every_action(command)


LOCATING_OPTIONS = frozenset({"storage", "name", "run"})
"""They find the recorded run; a path spelt another way is still the same run."""


def refuse_changed_options(
    given: set[str], requested: dict[str, Any], recorded: dict[str, Any], where: str
) -> None:
    """`--resume` continues the run recorded in `where`: an option the user gave that
    disagrees with the record is refused, naming it, rather than mixed in silently."""
    for key, value in requested.items():
        if key in given - LOCATING_OPTIONS and key in recorded and value != recorded[key]:
            raise UserError(
                f"--{key.replace('_', '-')} {_shown(value)} differs from {_shown(recorded[key])} "
                f"recorded in {where}; --resume continues the recorded run"
            )


def from_record(cls: type[Request], values: dict[str, Any]) -> Request:
    """A request dataclass from its recorded form; keys an older ar-ray wrote and this one
    dropped are ignored, fields it lacks keep their defaults."""
    known = {field.name for field in fields(cls)}
    return cls(**{key: value for key, value in values.items() if key in known})


def _recorded(where: str) -> dict[str, Any]:
    """The request a run began with (request.yaml, ensemble.yaml): `--resume` continues it."""
    try:
        return yaml.safe_load(storage.read_text(where))["request"]
    except (yaml.YAMLError, KeyError, TypeError) as error:
        raise UserError(f"{where}: corrupted record ({type(error).__name__})") from None


def _shown(value: Any) -> str:
    return ",".join(map(str, value)) if isinstance(value, list) else str(value)


def _positive(name: str, value: float | None) -> None:
    if value is not None and value < 1:
        raise UserError(f"{name}={value} must be >= 1")


def list_data(location: str | None) -> FolderListing | None:
    """The folder's files, its layout checked; None for the built-in set. Called before Ray
    starts, so a bad layout fails in milliseconds and leaves nothing behind."""
    return None if location is None else list_folder(location)


def load_splits(
    listing: FolderListing | None,
    image_size: int,
    *,
    skip_bad_images: bool,
    limit_per_class: int | None,
    experiment: str | None = None,
) -> DatasetSplits:
    """The splits every command trains on. With an `experiment` root (tune and ensemble, once
    Ray is connected), a folder is decoded by Ray tasks and cached under the experiment, so
    later commands on the same unchanged folder reuse it; without one (train), it is decoded
    in this process."""
    if listing is None:
        splits = load_builtin(image_size)
    elif experiment is None:
        splits = load_listing(listing, image_size, skip_bad_images)
    else:
        cache = storage.join(experiment, CACHE_DIR)
        splits = load_listing(listing, image_size, skip_bad_images, runner=run_on_ray, cache=cache)
    for path in splits.skipped:
        print(f"skipped unreadable image: {path}", file=sys.stderr)
    return splits.limit_per_class(limit_per_class)


def _train(args: argparse.Namespace) -> int:
    from ar_ray.train import run_training

    config = load_config(args.config, args.rank) if args.config else RunConfig()
    overrides = {"epochs": args.epochs, "seed": args.seed}
    config = config.replace(**{k: v for k, v in overrides.items() if v is not None})
    _positive("--limit-per-class", args.limit_per_class)
    workers = args.loader_workers
    if workers is None:
        workers = loader_workers_for(local_cpus())
    elif workers < 0:
        raise UserError(f"--loader-workers={workers} must be >= 0")
    splits = load_splits(
        list_data(args.data),
        config.image_size,
        skip_bad_images=args.skip_bad_images,
        limit_per_class=args.limit_per_class,
    )
    out = args.out
    print(
        f"training {config.arch} for {config.epochs} epochs on {len(splits.train)} images "
        f"({splits.num_classes} classes); outputs in {out}",
        flush=True,
    )
    summary = run_training(
        config, splits, out, resume=args.resume, overwrite=args.overwrite, loader_workers=workers
    )
    if summary.test is not None:
        print(f"test top-1 {100 * summary.test['top1']:.2f}% ({summary.test['tta']})")
    return 0


def _tune(args: argparse.Namespace) -> int:
    from ar_ray.cluster import connect
    from ar_ray.feasibility import Demand, failing_fast
    from ar_ray.leaderboard import print_leaderboard
    from ar_ray.search_space import load_search_space
    from ar_ray.tune import (
        TuneRequest,
        base_config,
        experiment_dir,
        experiment_root,
        prepare_experiment_dir,
        request_path,
        resolve_first_rung,
        run_tune,
        trial_resources,
    )

    for flag in ("trials", "epochs", "max_concurrent", "grace_period", "limit_per_class"):
        _positive(f"--{flag.replace('_', '-')}", getattr(args, flag))
    space = load_search_space(args.space)
    trial = _resources(args, "trial", "trial", Resources(), "default")
    listing = list_data(args.data)
    request = TuneRequest(
        space=str(args.space),
        trials=args.trials,
        epochs=args.epochs,
        data=args.data,
        data_resolved=None if listing is None else listing.resolved,
        skip_bad_images=args.skip_bad_images,
        limit_per_class=args.limit_per_class,
        storage=args.storage,
        name=args.name,
        cpus_per_trial=trial.cpus,
        gpus_per_trial=trial.gpus,
        max_concurrent=args.max_concurrent,
        grace_period=args.grace_period,
        max_failures=args.max_failures,
        seed=args.seed,
    )
    storage.ensure_writable(experiment_root(request))
    prepare_experiment_dir(experiment_dir(request), resume=args.resume, overwrite=args.overwrite)
    if args.resume:  # the recorded request goes on; a flag that disagrees with it is refused
        recorded = from_record(TuneRequest, _recorded(request_path(request)))
        refuse_changed_options(args.given, asdict(request), asdict(recorded), request_path(request))
        if recorded.data != request.data:
            listing = list_data(recorded.data_resolved or recorded.data)
        request = recorded
    else:  # a searched key that can never act fails here, before Ray starts
        request = resolve_first_rung(request, space)
    embedded = connect(args.address)
    with failing_fast([Demand("trial", "trial", trial_resources(request))], embedded):
        splits = load_splits(
            listing,
            base_config(request, space).image_size,
            skip_bad_images=request.skip_bad_images,
            limit_per_class=request.limit_per_class,
            experiment=experiment_root(request),
        )
        board = run_tune(request, space, splits, resume=args.resume)
    print_leaderboard(board, space)
    print(f"leaderboard: {experiment_dir(request)}/leaderboard.csv")
    return 0


def _ensemble(args: argparse.Namespace) -> int:
    from ar_ray.cluster import connect
    from ar_ray.ensemble import EnsembleRequest, plan_members, prepare_ensemble_dir, run_ensemble
    from ar_ray.feasibility import ensemble_demands, failing_fast
    from ar_ray.leaderboard import load_tune_record
    from ar_ray.saved_ensemble import ENSEMBLE_DIR, ENSEMBLE_FILE

    for flag in ("members", "epochs", "workers_per_member", "max_concurrent", "max_actors"):
        _positive(f"--{flag.replace('_', '-')}", getattr(args, flag))
    record = load_tune_record(args.run)
    root = storage.resolve(args.run)
    storage.ensure_writable(root)
    archs = [a.strip() for a in args.archs.split(",") if a.strip()] if args.archs else None
    for arch in archs or []:
        record.base.replace_checked("arch", arch, "--archs")
    tuned = f"the tune run's trials in {args.run}"
    worker = _resources(args, "member worker", "worker", record.trial_resources, tuned)
    actor = _resources(args, "inference actor", "actor", actor_default(worker), "member workers'")
    request = EnsembleRequest(
        run=args.run,
        members=args.members,
        archs=archs,
        epochs=args.epochs,
        workers_per_member=args.workers_per_member,
        tta=args.tta,
        seed=args.seed,
        cpus_per_worker=worker.cpus,
        gpus_per_worker=worker.gpus,
        max_concurrent=args.max_concurrent,
        cpus_per_actor=actor.cpus,
        gpus_per_actor=actor.gpus,
        max_actors=args.max_actors or DEFAULT_MAX_ACTORS,
    )
    where = storage.join(root, ENSEMBLE_DIR, ENSEMBLE_FILE)
    if args.resume and storage.exists(where):  # a finished ensemble: its request goes on
        recorded = from_record(EnsembleRequest, _recorded(where))
        refuse_changed_options(args.given, asdict(request), asdict(recorded), where)
        request = replace(recorded, run=args.run)
    plan_members(request, record)  # a bad --members fails before any Ray work starts
    listing = list_data(record.data)  # the folder tune read, checked again before Ray starts
    prepare_ensemble_dir(root, resume=args.resume, overwrite=args.overwrite)
    embedded = connect(args.address)
    options = request.train_options(root)
    with failing_fast(ensemble_demands(options, request.inference_options()), embedded):
        splits = load_splits(
            listing,
            record.base.image_size,
            skip_bad_images=record.skip_bad_images,
            limit_per_class=record.limit_per_class,
            experiment=root,
        )
        summary = run_ensemble(request, record, splits, options)
    print_summary(summary)
    return 0


def print_summary(summary: EnsembleSummary) -> None:
    """The lines users look for: the ensemble against the member that is best on val, the
    one a user without the ensemble would have kept (the best on test would be an oracle),
    on every scored split, each number labelled with how it was estimated."""
    metrics = summary.metrics
    print(metrics.to_string(index=False, float_format="%.4f"))
    val_members = metrics[(metrics["split"] == "val") & (metrics["kind"] == "member")]
    best = val_members.sort_values(["top1", "nll"], ascending=[False, True]).iloc[0]["name"]
    for split, rows in metrics.groupby("split", sort=False):
        final = rows[rows["name"] == "final"].iloc[0]
        member = rows[rows["name"] == best].iloc[0]
        print(
            f"{split} top-1: ensemble ({summary.chosen} weights) {100 * final.top1:.2f}% "
            f"({final.estimate}) vs best member {best} {100 * member.top1:.2f}% "
            f"({member.estimate}; best on val)"
        )
    print(f"outputs: {summary.folder}")


def _predict(args: argparse.Namespace) -> int:
    from ar_ray.cluster import connect
    from ar_ray.feasibility import actor_demand, failing_fast
    from ar_ray.inference import InferenceOptions
    from ar_ray.predict import check_locations, run_predict
    from ar_ray.saved_ensemble import SavedEnsemble

    _positive("--max-actors", args.max_actors)
    ensemble = SavedEnsemble.load(args.ensemble)
    recorded = InferenceOptions.from_record(ensemble.request)
    actor = _resources(args, "inference actor", "actor", recorded.actor, "the ensemble's")
    options = replace(recorded, actor=actor, max_actors=args.max_actors or recorded.max_actors)
    locations = check_locations(args.images)
    embedded = connect(args.address)
    with failing_fast([actor_demand(options)], embedded):
        summary = run_predict(ensemble, locations, args.out, options)
    print(f"{summary.images} predictions written to {args.out}; actors used: {summary.pool}")
    if summary.errors:
        print(f"{summary.errors} images could not be decoded: see the 'error' column")
    return 0


def resume_command(argv: Sequence[str], command: str) -> str:
    """The command that continues an interrupted run: the same one, resuming where the
    command can (predict has nothing to resume: it is simply run again)."""
    kept = [arg for arg in argv if arg not in ("--overwrite", "--resume")]
    resume = [] if command == "predict" else ["--resume"]
    return shlex.join(["ar-ray", *kept, *resume])


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    args.given = given_options(argv)
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
