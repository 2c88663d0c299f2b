"""A request nothing can serve fails at once with a one-line error naming its flag.

On the embedded local Ray of this machine (no GPU here) a GPU trial is refused before anything
is queued. On a cluster ar-ray joined, the autoscaler's report that no node type can fulfil a
request stops the command; `tests/test_autoscaling.py` shows demand it can meet still waits.
"""

import signal
from pathlib import Path

import pytest
import ray
import torch
from fake_autoscaler import FakeAutoscalingCluster
from helpers import assert_user_error, run_cli

from ar_ray.errors import UserError
from ar_ray.feasibility import Demand, InfeasibleWatch, check_fits_machine, infeasible_shapes
from ar_ray.resources import Resources

QUICK = str(Path(__file__).parent.parent / "search_spaces" / "quick.yaml")
MACHINE = {"CPU": 2.0}  # a laptop without a GPU, as the embedded Ray counts it
CPU_NODES = {  # the only node type an autoscaler may start: no GPU on it
    "cpu_node": {"resources": {"CPU": 1}, "node_config": {}, "min_workers": 0, "max_workers": 1}
}
V1_EVENT = (
    "Error: No available node types can fulfill resource request {'GPU': 1.0, 'CPU': 1.0}. "
    "Add suitable node types to this cluster to resolve this issue."
)
V2_EVENT = (
    "No available node types can fulfill resource requests {'CPU': 1.0}*2, {'GPU': 2.0}*1. "
    "Add suitable node types to this cluster to resolve this issue."
)


def test_a_gpu_trial_on_a_machine_without_gpus_names_the_flag():
    with pytest.raises(UserError) as error:
        check_fits_machine([Demand("trial", "trial", Resources(1, 1))], MACHINE)
    assert str(error.value) == (
        "--gpus-per-trial 1 asks for 1 GPU but this machine has 0 "
        "(embedded local Ray; join a cluster with --address)"
    )


def test_a_members_workers_must_fit_the_machine_together():
    workers = Demand("member worker", "worker", Resources(2, 0), 2, "--workers-per-member")
    with pytest.raises(UserError, match=r"^--workers-per-member 2 x --cpus-per-worker 2 asks "):
        check_fits_machine([workers], MACHINE)
    with pytest.raises(UserError, match=r"^--cpus-per-actor 3 asks for 3 CPUs but this machine"):
        check_fits_machine([Demand("inference actor", "actor", Resources(3, 0))], MACHINE)


def test_requests_the_machine_can_hold_pass():
    workers = Demand("member worker", "worker", Resources(1, 0), 2, "--workers-per-member")
    check_fits_machine([workers, Demand("trial", "trial", Resources(0.5, 0))], MACHINE)


def test_infeasible_shapes_are_read_from_both_autoscalers_events():
    assert infeasible_shapes(V1_EVENT) == [{"GPU": 1.0, "CPU": 1.0}]
    assert infeasible_shapes(V2_EVENT) == [{"CPU": 1.0}, {"GPU": 2.0}]
    assert infeasible_shapes("Resized to 2 CPUs, 1 GPUs.") == []


def test_a_shape_is_one_processes_request_without_zeros():
    assert Demand("trial", "trial", Resources(1, 0)).shape() == {"CPU": 1.0}
    assert Demand("inference actor", "actor", Resources(0, 1)).shape() == {"GPU": 1.0}


def test_an_infeasible_report_stops_the_waiting_main_thread(ray_cluster):
    """The session Ray runs Ray's own monitor; nothing there has 3 CPUs."""
    too_big = Demand("trial", "trial", Resources(3, 0))
    ref = ray.remote(num_cpus=3)(lambda: None).remote()
    # the handler the CLI starts with (a finished Tune or Train fit() in this pytest process
    # could have left its own, which would swallow the interrupt)
    before = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with (
            pytest.raises(UserError, match=r"^--cpus-per-trial 3 / --gpus-per-trial 0: Ray "),
            InfeasibleWatch([too_big]),
        ):
            ray.get(ref, timeout=300)  # would wait forever; the timeout is a hang guard only
    finally:
        signal.signal(signal.SIGINT, before)
        ray.cancel(ref)


@pytest.mark.ray
@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_gpu_trial_on_the_embedded_local_ray_exits_2_before_queueing(tmp_path, monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)  # ar-ray starts its own Ray
    result = run_cli(
        *("tune", "--space", QUICK, "--trials", "1", "--gpus-per-trial", "1"),
        *("--storage", str(tmp_path), "--name", "nogpu"),
        timeout=300,  # a hang guard only
    )
    assert_user_error(result, "--gpus-per-trial 1 asks for 1 GPU but this machine has 0")
    assert result.stderr.strip().splitlines()[-1].startswith("ar-ray: error:")
    assert not (tmp_path / "nogpu" / "tune" / "request.yaml").exists()  # nothing was run


@pytest.fixture(scope="module")
def cpu_only_cluster():
    with FakeAutoscalingCluster(CPU_NODES, head_cpus=0, idle_minutes=1).running() as cluster:
        yield cluster


@pytest.mark.cluster
@pytest.mark.ray
def test_gpu_trial_on_a_cluster_without_gpu_node_types_exits_2(cpu_only_cluster, tmp_path):
    result = run_cli(
        *("tune", "--space", QUICK, "--trials", "1", "--gpus-per-trial", "1"),
        *("--storage", str(tmp_path), "--address", cpu_only_cluster.address),
        timeout=300,  # a hang guard only: without the watch the command waits forever
    )
    assert_user_error(
        result,
        "--cpus-per-trial 1 / --gpus-per-trial 1: Ray reports that no node type of this "
        "cluster can hold a trial of 1 CPU + 1 GPU (infeasible)",
    )
    assert not list(tmp_path.rglob("leaderboard.csv"))  # the trial never ran: no results


@pytest.mark.cluster
@pytest.mark.ray
def test_cpu_trials_wait_for_their_node_and_oversized_members_exit_2(cpu_only_cluster, tmp_path):
    """The watch stays quiet while the autoscaler starts a CPU node for the trial, then stops
    `ensemble` whose workers no node type can hold: GPU workers (found by the probe that picks
    the DDP backend) and 2-CPU workers (found while members train in their threads)."""
    address = ("--address", cpu_only_cluster.address)
    tune = run_cli(
        *("tune", "--space", QUICK, "--trials", "1", "--epochs", "1", "--limit-per-class", "10"),
        *("--storage", str(tmp_path), "--name", "cpu", *address),
    )
    assert tune.returncode == 0, tune.stderr[-3000:]
    ensemble = (  # --retrain: else the member is the finished trial, and no worker is placed
        *("ensemble", "--from", str(tmp_path / "cpu"), "--members", "1", "--epochs", "1"),
        "--retrain",
    )
    for flag, request in (("--gpus-per-worker", "1"), ("--cpus-per-worker", "2")):
        result = run_cli(
            *(*ensemble, flag, request, "--overwrite", *address),
            timeout=300,  # a hang guard only: without the watch the command waits forever
        )
        worker = Resources(cpus=float(request), gpus=0) if "cpus" in flag else Resources(1, 1)
        assert_user_error(
            result,
            f"--cpus-per-worker {worker.cpus:g} / --gpus-per-worker {worker.gpus:g}: Ray reports "
            f"that no node type of this cluster can hold a member worker of {worker.describe()}",
        )
