"""Resources come from the user or the previous command's record, never from the cluster."""

import pytest

from ar_ray.cli import resume_command
from ar_ray.errors import UserError
from ar_ray.resources import Resources, actor_default, announce, stated


def test_each_stated_flag_wins_and_the_rest_is_inherited():
    inherited = Resources(cpus=4, gpus=1)
    assert stated(None, None, inherited) == inherited
    assert stated(2, None, inherited) == Resources(cpus=2, gpus=1)
    assert stated(None, 0, inherited) == Resources(cpus=4, gpus=0)


def test_inference_actors_follow_the_members_hardware_with_at_most_one_gpu():
    assert actor_default(Resources(cpus=8, gpus=2)) == Resources(cpus=8, gpus=1)
    assert actor_default(Resources(cpus=2, gpus=0.5)) == Resources(cpus=2, gpus=0.5)
    assert actor_default(Resources(cpus=1, gpus=0)) == Resources(cpus=1, gpus=0)


def test_records_of_older_runs_without_resources_take_the_cpu_default():
    record = {"cpus_per_trial": None, "gpus_per_trial": 1}
    assert Resources.from_record(record, "cpus_per_trial", "gpus_per_trial") == Resources(1, 1)
    assert Resources.from_record({}, "cpus_per_actor", "gpus_per_actor") == Resources(1, 0)


def test_negative_requests_are_refused():
    with pytest.raises(UserError):
        Resources(cpus=-1, gpus=0)
    assert Resources(cpus=0, gpus=1).ray_options() == {"num_cpus": 0, "num_gpus": 1}


def test_the_announcement_says_what_and_how_to_change_it():
    line = announce("trial", Resources(1, 0).describe(), "default", "--cpus-per-trial")
    assert line == "each trial requests 1 CPU + 0 GPU (default; change with --cpus-per-trial)"


def test_an_interrupted_predict_is_rerun_not_resumed():
    argv = ["predict", "--ensemble", "runs/x", "--images", "a b"]
    assert resume_command(argv, "predict") == "ar-ray predict --ensemble runs/x --images 'a b'"
    assert resume_command(["tune", "--overwrite"], "tune") == "ar-ray tune --resume"
