"""`bench/gpu_check.py`: the CPU smoke run where Ray is absent (as on the device) and with Ray,
a subset of sections, the time caps, the report rewritten per section, and its refusals."""

import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "bench" / "gpu_check.py"
ORDER = [
    "recipe",
    "throughput_resnet18",
    "throughput_resnet50",
    "ray_member",
    "inference_tencrop",
    "inference_actor",
    "ddp",
]
RAY_SECTIONS = {"ray_member", "inference_actor"}
PURE = [name for name in ORDER if name not in RAY_SECTIONS]


@pytest.fixture(scope="module")
def gpu_check():
    """The script as a module (it imports `common` from bench/, as when run as a script;
    its dataclasses look their module up in sys.modules while it loads)."""
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(ROOT / "bench"))
    sys.modules["gpu_check"] = module
    try:
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(ROOT / "bench"))
        del sys.modules["gpu_check"]
    return module


@pytest.fixture
def no_ray(tmp_path) -> Path:
    """A PYTHONPATH folder whose `ray` and `optuna` shadow the installed ones and fail to
    import, as on the device machine, which has neither."""
    folder = tmp_path / "no_ray"
    for name in ("ray", "optuna"):
        (folder / name).mkdir(parents=True)
        (folder / name / "__init__.py").write_text(f"raise ImportError('{name}: blocked')\n")
    return folder


def environment(*first: Path) -> dict[str, str]:
    paths = [*map(str, first), str(ROOT), os.environ.get("PYTHONPATH", "")]
    return dict(os.environ, PYTHONPATH=os.pathsep.join(path for path in paths if path))


def smoke(out: Path, env: dict[str, str], *args: str) -> dict:
    """`gpu_check.py --cpu-smoke` in a subprocess; its report, once it exited 0."""
    command = [sys.executable, str(SCRIPT), "--cpu-smoke", "--out", str(out), *args]
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return json.loads((out / "gpu_check.json").read_text())


def test_cpu_smoke_where_ray_and_optuna_are_absent_passes_every_pytorch_section(tmp_path, no_ray):
    env = environment(no_ray)
    imports = "import importlib as i\nfor n in ('ray', 'optuna', 'ray.tune'):\n" + (
        "    try: i.import_module(n)\n    except ImportError: continue\n    raise SystemExit(n)"
    )
    assert subprocess.run([sys.executable, "-c", imports], env=env).returncode == 0  # blocked
    report = smoke(tmp_path / "out", env)
    assert report["mode"] == "cpu-smoke" and report["finished"]
    assert list(report["sections"]) == ORDER
    for name in PURE:
        section = report["sections"][name]
        assert section["status"] == "pass" and section["checks"], (name, section)
        assert all(section["checks"].values()) and section["seconds"] > 0, name
    for name in RAY_SECTIONS:
        assert report["sections"][name]["status"] == "skipped", name
        assert report["sections"][name]["summary"] == "skipped: ray not installed"
    recipe = report["sections"]["recipe"]
    assert recipe["max_abs_weight_difference"] == 0.0 and recipe["steps"] > 0
    for arch in ("resnet18", "resnet50"):
        throughput = report["sections"][f"throughput_{arch}"]
        assert throughput["synthetic_images_per_s"] > 0 < throughput["pipeline_images_per_s"]
        assert throughput["batch_augment"]  # so BatchAugment runs in `make test`
    assert report["sections"]["inference_tencrop"]["images_per_s"] > 0
    ddp = report["sections"]["ddp"]
    assert ddp["backend"] == "gloo" and ddp["attempts"] == [{"backend": "gloo", "refused": None}]
    assert [rank["device"] for rank in ddp["ranks"]] == ["cpu", "cpu"]
    assert [rank["sync_batchnorm_layers"] for rank in ddp["ranks"]] == [0, 0]  # CUDA only
    assert [goal["result"] for goal in report["goals"]] == ["not judged (cpu smoke)"] * 4
    table = (tmp_path / "out" / "gpu_check.md").read_text()
    assert all(f"| {name} | pass |" in table for name in PURE)
    assert all(f"| {name} | skipped |" in table for name in RAY_SECTIONS)


@pytest.mark.ray
def test_cpu_smoke_with_ray_runs_the_chosen_sections_in_order(tmp_path):
    report = smoke(tmp_path, environment(), "--sections", "inference_actor,ray_member")
    assert list(report["sections"]) == ["ray_member", "inference_actor"]
    assert all(section["status"] == "pass" for section in report["sections"].values())
    assert report["sections"]["ray_member"]["worker"]["backend"] == "gloo"
    assert report["sections"]["inference_actor"]["first_call_images_per_s"] > 0


def test_a_cap_stops_a_running_section_and_keeps_its_partial_result(gpu_check):
    def slow(context, result):
        result["steps"] = 1
        time.sleep(30)  # far past the cap: only the cap can end it in time
        result |= {"checks": {"finished": True}, "summary": "not capped"}

    context = gpu_check.Context(gpu_check.SMOKE, torch.device("cpu"), Path("."))
    result = gpu_check.run_section("slow", gpu_check.Section(slow, 1.0), context, cap=0.2)
    assert result["status"] == "capped" and result["capped"] and result["steps"] == 1
    assert signal.getitimer(signal.ITIMER_REAL) == (0.0, 0.0)  # no alarm left for later code
    none_left = gpu_check.run_section("late", gpu_check.Section(slow, 1.0), context, cap=0.0)
    assert none_left["status"] == "capped" and "steps" not in none_left  # never started


def test_caps_share_the_time_left_by_weight_and_skip_ray_sections_without_ray(
    gpu_check, monkeypatch
):
    monkeypatch.setattr(gpu_check, "ray_installed", lambda: False)
    weight = {name: section.weight for name, section in gpu_check.SECTIONS.items()}
    later = ["recipe", "ray_member", "ddp"]
    share = weight["recipe"] / (weight["recipe"] + weight["ddp"])
    assert gpu_check.section_cap(later, 100.0) == pytest.approx(100 * share)
    assert gpu_check.section_cap(later[1:], 100.0) == 0.0
    assert gpu_check.section_cap(later[2:], 100.0) == pytest.approx(100.0)  # the last: all


@pytest.mark.parametrize(
    ("nccl", "backends"),
    [
        ({"refused": "DistBackendError: Duplicate GPU detected"}, ["nccl", "gloo"]),
        ({"no_record": "still running, killed"}, ["nccl", "gloo"]),
        ({"parameter_digest": "d"}, ["nccl"]),
    ],
)
def test_ddp_falls_back_to_gloo_only_when_nccl_refuses_or_hangs(
    gpu_check, monkeypatch, nccl, backends
):
    ran: list[str] = []

    def fake_ranks(context, backend, config, timeout):
        ran.append(backend)
        return [nccl, nccl] if backend == "nccl" else [{"parameter_digest": "d"}] * 2

    monkeypatch.setattr(gpu_check, "run_ranks", fake_ranks)
    context = gpu_check.Context(gpu_check.SMOKE, torch.device("cuda"), Path("."), deadline=0.0)
    attempts: list = []
    backend, ranks = gpu_check.ranks_with_fallback(context, None, attempts)
    assert ran == backends and backend == backends[-1] and ranks[0] == {"parameter_digest": "d"}
    assert [attempt["backend"] for attempt in attempts] == backends
    assert (attempts[0]["refused"] is None) == (backends == ["nccl"])


def test_the_report_is_rewritten_after_each_section(gpu_check, tmp_path, monkeypatch):
    seen: dict = {}

    def first(context, result):
        result |= {"checks": {"ran": True}, "summary": "first"}

    def second(context, result):
        seen.update(json.loads((tmp_path / "gpu_check.json").read_text()))
        result |= {"checks": {"ran": True}, "summary": "second"}

    sections = {"first": gpu_check.Section(first, 1.0), "second": gpu_check.Section(second, 1.0)}
    monkeypatch.setattr(gpu_check, "SECTIONS", sections)
    cpu = torch.device("cpu")
    report = {
        "mode": "cpu-smoke",
        "budget_seconds": 1e9,
        "environment": gpu_check.environment(cpu, None),
        "sections": {},
    }
    context = gpu_check.Context(gpu_check.SMOKE, cpu, tmp_path)
    gpu_check.run_sections(["first", "second"], context, 1e9, report, tmp_path)
    assert list(seen["sections"]) == ["first"] and not seen["finished"]
    assert seen["sections"]["first"]["status"] == "pass"
    written = json.loads((tmp_path / "gpu_check.json").read_text())
    assert list(written["sections"]) == ["first", "second"]
    assert "| first | pass |" in (tmp_path / "gpu_check.md").read_text()


def test_an_unknown_section_is_one_line_and_exit_2(gpu_check, capsys):
    assert gpu_check.main(["--cpu-smoke", "--sections", "recipe,bogus"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "unknown section bogus" in err


def test_without_cuda_it_says_so_in_one_line_and_exits_non_zero(gpu_check, capsys, monkeypatch):
    monkeypatch.setattr(gpu_check.torch.cuda, "is_available", lambda: False)
    assert gpu_check.main([]) != 0
    captured = capsys.readouterr()
    assert captured.err.count("\n") == 1 and "no CUDA device" in captured.err
    assert captured.out == ""
