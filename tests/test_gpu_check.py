"""`bench/gpu_check.py --cpu-smoke`: every step of the device check, tiny, on CPU."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SECTIONS = {"recipe", "throughput_resnet18", "throughput_resnet50", "ray_member", "inference_actor"}


def test_cpu_smoke_runs_every_section_and_writes_its_report(tmp_path):
    env = dict(
        os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])
    )
    command = [sys.executable, str(ROOT / "bench" / "gpu_check.py"), "--cpu-smoke"]
    done = subprocess.run(
        [*command, "--out", str(tmp_path)], env=env, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert {"mode", "environment", "sections", "goals", "peak_gpu_memory_mb", "total_seconds"} <= (
        report.keys()
    )
    assert report["mode"] == "cpu-smoke" and set(report["sections"]) == SECTIONS
    for name, section in report["sections"].items():
        assert section["passed"] and section["checks"], name
        assert all(section["checks"].values()) and section["seconds"] > 0, name
    recipe = report["sections"]["recipe"]
    assert recipe["max_abs_weight_difference"] == 0.0 and recipe["steps"] > 0
    assert report["sections"]["ray_member"]["worker"]["backend"] == "gloo"
    assert report["sections"]["inference_actor"]["first_call_images_per_s"] > 0
    for arch in ("resnet18", "resnet50"):
        throughput = report["sections"][f"throughput_{arch}"]
        assert throughput["synthetic_images_per_s"] > 0 < throughput["pipeline_images_per_s"]
    assert [goal["result"] for goal in report["goals"]] == ["not judged (cpu smoke)"] * 4
    table = (tmp_path / "gpu_check.md").read_text()
    assert all(f"| {name} | pass |" in table for name in SECTIONS)
