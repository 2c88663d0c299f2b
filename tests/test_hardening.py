"""Every user mistake is one line on stderr naming the culprit, exit 2, no traceback, and no
partial output; SIGTERM stops tune and ensemble at a checkpoint and says how to resume."""

import json
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import ray
import yaml
from helpers import assert_user_error, free_port, make_image_folder, run_cli, write_image

from ar_ray.api import stated_options
from ar_ray.cli import build_parser
from ar_ray.recipe.checkpoint import load_checkpoint
from ar_ray.saved_ensemble import SavedEnsemble
from ar_ray.search import run_tune
from ar_ray.search_space import load_search_space
from ar_ray.tune_request import TuneRequest

pytestmark = pytest.mark.ray

QUICK = str(Path(__file__).parent.parent / "search_spaces" / "quick.yaml")


@pytest.fixture(scope="module")
def tuned(ray_cluster, small_splits, module_tmp):
    """A finished 2-trial tune run to point `ensemble` at."""
    root = module_tmp
    request = TuneRequest(
        space=QUICK, trials=2, epochs=1, storage=str(root), name="r", limit_per_class=10
    )
    run_tune(request, load_search_space(QUICK), small_splits)
    return root / "r"


def _data(tmp_path, damage):
    root = make_image_folder(tmp_path / "data")
    return root, damage(root)


def _yaml(tmp_path, text, name="space.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return path


def case_corrupt_jpeg(tmp_path, tuned):
    root, bad = _data(tmp_path, lambda r: r / "train" / "cat" / "0.jpg")
    bad.write_bytes(b"\xff\xd8\xff garbage")
    return ["train", "--data", str(root)], str(bad)


def case_zero_byte_image(tmp_path, tuned):
    root, bad = _data(tmp_path, lambda r: r / "val" / "dog" / "0.jpg")
    bad.write_bytes(b"")
    return ["train", "--data", str(root)], str(bad)


def case_png_named_jpg(tmp_path, tuned):
    root, bad = _data(tmp_path, lambda r: r / "train" / "dog" / "x.jpg")
    write_image(tmp_path / "x.png").rename(bad)
    return ["train", "--data", str(root)], str(bad)


def case_empty_class_folder(tmp_path, tuned):
    root, bad = _data(tmp_path, lambda r: r / "train" / "dog")
    shutil.rmtree(bad)
    bad.mkdir()
    return ["train", "--data", str(root)], str(bad)


def case_class_only_in_val(tmp_path, tuned):
    root, bad = _data(tmp_path, lambda r: r / "val" / "bird")
    write_image(bad / "0.jpg")
    return ["train", "--data", str(root)], "'bird'"


def case_missing_train_split(tmp_path, tuned):
    root, bad = _data(tmp_path, lambda r: r / "train")
    shutil.rmtree(bad)
    return ["tune", "--space", QUICK, "--data", str(root)], str(bad)


def case_data_is_a_file(tmp_path, tuned):
    path = tmp_path / "data.txt"
    path.write_text("not a folder")
    return ["train", "--data", str(path)], str(path)


def case_invalid_yaml(tmp_path, tuned):
    path = _yaml(tmp_path, "lr: [0.1\n")
    return ["tune", "--space", str(path)], f"{path}: line"


def case_unknown_hyperparameter(tmp_path, tuned):
    path = _yaml(tmp_path, "learning_rate: {uniform: [0.1, 0.2]}\n")
    return ["tune", "--space", str(path)], "'learning_rate'"


def case_wrong_type(tmp_path, tuned):
    path = _yaml(tmp_path, "epochs: three\n", "config.yaml")
    return ["train", "--config", str(path)], "epochs='three'"


def case_lo_above_hi(tmp_path, tuned):
    path = _yaml(tmp_path, "lr: {loguniform: [0.1, 0.01]}\n")
    return ["tune", "--space", str(path)], "lr: lo=0.1 must be < hi=0.01"


def case_negative_temperature(tmp_path, tuned):
    path = _yaml(tmp_path, "cr_temperature: -0.5\n", "config.yaml")
    return ["train", "--config", str(path)], "cr_temperature=-0.5"


def case_ema_decay_one(tmp_path, tuned):
    path = _yaml(tmp_path, "mt_decay: {uniform: [0.99, 1.0]}\n")
    return ["tune", "--space", str(path)], "mt_decay=1.0"


def case_unknown_arch(tmp_path, tuned):
    path = _yaml(tmp_path, "arch: resnet19\n", "config.yaml")
    return ["train", "--config", str(path)], "arch='resnet19'"


def case_zero_members(tmp_path, tuned):
    return ["ensemble", "--from", str(tuned), "--members", "0"], "--members=0"


def case_more_members_than_trials(tmp_path, tuned):
    return ["ensemble", "--from", str(tuned), "--members", "5"], "--members=5"


def case_negative_gpus_per_trial(tmp_path, tuned):
    args = ["tune", "--space", QUICK, "--gpus-per-trial", "-1", "--storage", str(tmp_path)]
    return args, "--gpus-per-trial=-1"


def case_inference_actor_without_resources(tmp_path, tuned):
    args = ["ensemble", "--from", str(tuned), "--cpus-per-actor", "0", "--gpus-per-actor", "0"]
    return args, "--cpus-per-actor and --gpus-per-actor are both 0"


def case_unreachable_address(tmp_path, tuned):
    address = f"127.0.0.1:{free_port()}"
    return ["tune", "--space", QUICK, "--address", address, "--storage", str(tmp_path)], address


def case_unwritable_storage(tmp_path, tuned):
    blocker = tmp_path / "file"
    blocker.write_text("a file where a folder should be")
    storage = blocker / "runs"
    return ["tune", "--space", QUICK, "--storage", str(storage)], str(storage)


def case_ensemble_from_run_without_finished_trial(tmp_path, tuned):
    run = tmp_path / "failed"
    shutil.copytree(tuned / "tune", run / "tune", ignore=shutil.ignore_patterns("run_trial_*"))
    board = pd.read_csv(run / "tune" / "leaderboard.csv").assign(status="ERROR")
    board.to_csv(run / "tune" / "leaderboard.csv", index=False)
    return ["ensemble", "--from", str(run)], "no finished trial"


def case_predict_missing_ensemble(tmp_path, tuned):
    return ["predict", "--ensemble", str(tuned), "--images", str(tmp_path)], "no saved ensemble"


def case_predict_corrupt_ensemble(tmp_path, tuned):
    run = tmp_path / "corrupt"
    (run / "ensemble").mkdir(parents=True)
    (run / "ensemble" / "ensemble.yaml").write_text("members: [a\n")
    return ["predict", "--ensemble", str(run), "--images", str(tmp_path)], "corrupted ensemble"


def case_predict_corrupt_member_checkpoint(tmp_path, tuned):
    run = tmp_path / "damaged"
    (run / "ensemble").mkdir(parents=True)
    checkpoint = run / "members" / "m1" / "checkpoint.pt"
    checkpoint.parent.mkdir(parents=True)
    checkpoint.write_bytes(b"not a checkpoint")
    SavedEnsemble(
        members=["m1"],
        checkpoints=["members/m1/checkpoint.pt"],
        method="uniform",
        weights=[1.0],
        temperature=1.0,
        tta="center",
        classes=["a", "b"],
        image_size=28,
        stored_size=32,
    ).save(run / "ensemble")
    return ["predict", "--ensemble", str(run), "--images", str(tmp_path)], str(checkpoint)


def case_changed_flag_on_tune_resume(tmp_path, tuned):
    args = ["tune", "--space", QUICK, "--storage", str(tuned.parent), "--name", "r"]
    recorded = tuned / "tune" / "request.yaml"
    return [*args, "--resume", "--trials", "8"], f"--trials 8 differs from 2 recorded in {recorded}"


def case_changed_flag_on_ensemble_resume(tmp_path, tuned):
    run = tmp_path / "finished"
    shutil.copytree(tuned / "tune", run / "tune", ignore=shutil.ignore_patterns("run_trial_*"))
    record = run / "ensemble" / "ensemble.yaml"
    record.parent.mkdir()
    record.write_text(yaml.safe_dump({"request": {"run": str(run), "members": 1, "epochs": 1}}))
    args = ["ensemble", "--from", str(run), "--resume", "--members", "1", "--epochs", "3"]
    return args, f"--epochs 3 differs from 1 recorded in {record}"


def case_checkpoint_of_another_architecture(tmp_path, tuned):
    out = tmp_path / "run"
    first = run_cli(
        *("train", "--epochs", "1", "--limit-per-class", "2", "--out", str(out)), cwd=tmp_path
    )
    assert first.returncode == 0, first.stderr
    config = _yaml(tmp_path, "arch: resnet34\nepochs: 2\n", "config.yaml")
    return ["train", "--config", str(config), "--out", str(out), "--resume"], "arch='resnet18'"


CASES = [value for name, value in sorted(globals().items()) if name.startswith("case_")]


def _files(*roots: Path) -> dict[Path, tuple[int, int] | None]:
    """Every file under `roots` with its size and modification time, and every folder
    (present or not: a probe file made and deleted inside one changes its time)."""
    return {
        path: None if path.is_dir() else (path.stat().st_size, path.stat().st_mtime_ns)
        for root in roots
        for path in root.rglob("*")
    }


@pytest.mark.parametrize("case", CASES, ids=lambda case: case.__name__[5:])
def test_user_mistakes_are_one_line_errors(case, tmp_path, tuned):
    """Run in tmp_path, so default outputs (runs/, predictions.csv) would land there; the
    shared tune run's storage is watched too: no case adds, removes or rewrites a file."""
    args, culprit = case(tmp_path, tuned)
    before = _files(tmp_path, tuned.parent)
    result = run_cli(*args, cwd=tmp_path)
    assert_user_error(result, culprit)
    after = _files(tmp_path, tuned.parent)
    changed = sorted(str(p) for p in before.keys() ^ after.keys())
    changed += sorted(str(p) for p in before.keys() & after.keys() if before[p] != after[p])
    assert not changed, f"left partial output behind: {changed}"


def test_only_the_options_typed_count_as_given():
    """A flag left out parses to None (its default applies later), so `resume` compares only
    what was typed, even when a typed value equals the default (`--seed 0`)."""
    args = build_parser().parse_args(["tune", "--space", "s.yaml", "--trials=8", "--seed", "0"])
    options = {name: getattr(args, name) for name in ("trials", "seed", "epochs", "data")}
    options |= {"grace_period": args.grace_period, "max_failures": args.max_failures}
    options |= {"skip_bad_images": args.skip_bad_images}
    assert stated_options(**options) == {"trials", "seed"}


def test_debug_shows_the_traceback(tmp_path):
    path = _yaml(tmp_path, "epochs: three\n")
    result = run_cli("--debug", "train", "--config", str(path))
    assert result.returncode == 2 and "Traceback" in result.stderr


def test_rerun_into_an_existing_experiment_is_refused(tuned):
    result = run_cli("tune", "--space", QUICK, "--storage", str(tuned.parent), "--name", "r")
    assert_user_error(result, "pass --resume or --overwrite")


def _interrupt_when(args, ready, timeout=300):
    """Start `ar-ray ARGS`, send SIGTERM once `ready()`, return (returncode, stderr)."""
    process = subprocess.Popen(
        [sys.executable, "-m", "ar_ray.cli", *args],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + timeout
    while not ready():
        assert process.poll() is None, process.stderr.read()[-3000:]
        assert time.monotonic() < deadline, "never became ready"
        time.sleep(0.5)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=120)
    return process.returncode, stderr


def _resume(stderr: str) -> subprocess.CompletedProcess:
    line = next(line for line in stderr.splitlines() if "resume with:" in line)
    command = shlex.split(line.split("resume with:", 1)[1])
    assert command[0] == "ar-ray" and "--resume" in command
    return subprocess.run(
        [sys.executable, "-m", "ar_ray.cli", *command[1:]],
        capture_output=True,
        text=True,
        timeout=600,
    )


def _finished_lines(experiment: Path) -> dict[str, list[str]]:
    finished = {}
    for result in experiment.glob("run_trial_*/result.json"):
        lines = result.read_text().splitlines()
        if lines and json.loads(lines[-1])["epoch"] == 3:
            finished[result.parent.name] = lines
    return finished


def test_sigterm_during_tune_then_resume_repeats_no_finished_trial(ray_cluster, tmp_path):
    address = ray.get_runtime_context().gcs_address
    args = [
        "tune",
        "--space",
        QUICK,
        "--trials",
        "3",
        "--epochs",
        "3",
        "--limit-per-class",
        "10",
        "--storage",
        str(tmp_path),
        "--name",
        "i",
        "--address",
        address,
        "--max-concurrent",
        "1",
    ]
    experiment = tmp_path / "i" / "tune"
    code, stderr = _interrupt_when(args, lambda: _finished_lines(experiment))
    assert code == 130 and "resume with:" in stderr, stderr[-3000:]
    assert not (experiment / "leaderboard.csv").exists()
    finished = _finished_lines(experiment)

    resumed = _resume(stderr)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert len(pd.read_csv(experiment / "leaderboard.csv")) == 3
    for trial, lines in finished.items():
        assert (experiment / trial / "result.json").read_text().splitlines() == lines


def test_sigterm_during_ensemble_then_resume_keeps_trained_epochs(tuned, tmp_path):
    run = tmp_path / "r"
    shutil.copytree(tuned, run)
    address = ray.get_runtime_context().gcs_address
    args = [
        "ensemble",
        "--from",
        str(run),
        "--members",
        "1",
        "--epochs",
        "12",
        "--address",
        address,
    ]

    def checkpoints():
        return sorted((run / "members").glob("*/checkpoint_*/checkpoint.pt"))

    code, stderr = _interrupt_when(args, lambda: len(checkpoints()) >= 2)
    assert code == 130 and "resume with:" in stderr, stderr[-3000:]
    assert not (run / "ensemble" / "metrics.csv").exists()
    first_epoch = load_checkpoint(checkpoints()[0])["history"][0]

    resumed = _resume(stderr)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    (member,) = [p for p in (run / "members").iterdir() if p.is_dir()]
    history = load_checkpoint(member / "checkpoint.pt")["history"]
    assert [h["epoch"] for h in history] == list(range(1, 13))
    # epoch 1 (registered with Train before the interrupt: a second checkpoint followed it)
    # was kept, timings included, not trained again; later epochs continued from it
    assert history[0] == first_epoch
