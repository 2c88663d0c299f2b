"""launch/: the `ray up` configs and KubeRay manifests are what Ray and KubeRay accept, and
every `ar-ray` command in them and in launch/README.md is one the CLI parses."""

from __future__ import annotations

import json
import re
import shlex
from collections.abc import Iterator
from pathlib import Path

import jsonschema
import pytest
import ray
import yaml

from ar_ray.cli import build_parser

LAUNCH = Path(__file__).resolve().parent.parent / "launch"
DOCUMENTS = {path.name: yaml.safe_load(path.read_text()) for path in sorted(LAUNCH.glob("*.yaml"))}
LAUNCHER_CONFIGS = [name for name, doc in DOCUMENTS.items() if "apiVersion" not in doc]
RAY_SCHEMA = json.loads((Path(ray.__file__).parent / "autoscaler" / "ray-schema.json").read_text())

SHELL_VARIABLE = re.compile(r"\$\{\w+\}|\$\w+")
SHELL_OPERATORS = set("();<>|&")
SHELL_BLOCK = re.compile(r"^```(?:bash|sh|shell)\n(.*?)^```", re.DOTALL | re.MULTILINE)


def test_both_clouds_have_a_launcher_config():
    assert {"aws-gpu.yaml", "gcp-gpu.yaml"} <= set(LAUNCHER_CONFIGS)


# --- `ray up` configs -------------------------------------------------------------------


def is_spot(node_config: dict) -> bool:
    """AWS spot market, or a GCP spot / preemptible VM."""
    scheduling = node_config.get("scheduling", {})
    return (
        node_config.get("InstanceMarketOptions", {}).get("MarketType") == "spot"
        or scheduling.get("preemptible") is True
        or scheduling.get("provisioningModel") == "SPOT"
    )


@pytest.mark.parametrize("name", LAUNCHER_CONFIGS)
def test_launcher_config_matches_rays_schema(name):
    jsonschema.validate(DOCUMENTS[name], RAY_SCHEMA)


@pytest.mark.parametrize("name", LAUNCHER_CONFIGS)
def test_launcher_node_types_are_consistent(name):
    config = DOCUMENTS[name]
    types = config["available_node_types"]
    assert config["head_node_type"] in types
    for type_name, node_type in types.items():
        low, high = node_type.get("min_workers", 0), node_type.get("max_workers", 0)
        assert 0 <= low <= high <= config["max_workers"], type_name
        for resource, amount in node_type["resources"].items():
            assert type(amount) is int and amount >= 0, f"{type_name}.{resource}: {amount!r}"


@pytest.mark.parametrize("name", LAUNCHER_CONFIGS)
def test_launcher_head_takes_no_work_and_workers_include_spot_gpus(name):
    config = DOCUMENTS[name]
    types = config["available_node_types"]
    assert types[config["head_node_type"]]["resources"]["CPU"] == 0
    gpu_types = [t for t in types.values() if t["resources"].get("GPU", 0) > 0]
    assert gpu_types, "no GPU node type"
    assert any(is_spot(t["node_config"]) for t in gpu_types), "no spot/preemptible GPU type"


# --- KubeRay ----------------------------------------------------------------------------


def gpu_limit(group: dict) -> int:
    limits = group["template"]["spec"]["containers"][0]["resources"].get("limits", {})
    return int(limits.get("nvidia.com/gpu", 0))


def check_ray_cluster_spec(spec: dict) -> None:
    assert spec["enableInTreeAutoscaling"] is True
    assert spec["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    gpu_groups = [group for group in spec["workerGroupSpecs"] if gpu_limit(group) > 0]
    assert gpu_groups, "no worker group with an nvidia.com/gpu limit"
    for group in gpu_groups:
        assert group["minReplicas"] == 0 <= group["replicas"] <= group["maxReplicas"]
        assert group["maxReplicas"] >= 1
        tolerations = group["template"]["spec"].get("tolerations", [])
        assert any(t["key"] == "nvidia.com/gpu" for t in tolerations), group["groupName"]
    pods = [spec["headGroupSpec"], *spec["workerGroupSpecs"]]
    images = {pod["template"]["spec"]["containers"][0]["image"] for pod in pods}
    assert len(images) == 1, f"head and workers must run the same Ray image: {images}"


def test_kuberay_cluster():
    cluster = DOCUMENTS["kuberay-cluster.yaml"]
    assert (cluster["apiVersion"], cluster["kind"]) == ("ray.io/v1", "RayCluster")
    check_ray_cluster_spec(cluster["spec"])


def test_kuberay_job():
    job = DOCUMENTS["kuberay-job.yaml"]
    assert (job["apiVersion"], job["kind"]) == ("ray.io/v1", "RayJob")
    assert job["spec"]["shutdownAfterJobFinishes"] is True
    assert job["spec"]["ttlSecondsAfterFinished"] >= 0
    assert job["spec"]["entrypoint"].strip()
    check_ray_cluster_spec(job["spec"]["rayClusterSpec"])


# --- `ar-ray` commands ------------------------------------------------------------------


def shell_lines(script: str) -> Iterator[list[str]]:
    """The tokens of each logical line: `\\` continuations joined, `$VARIABLES` replaced,
    a quote left open continued on the next line."""
    script = SHELL_VARIABLE.sub("PLACEHOLDER", script.replace("\\\n", " "))
    line = ""
    for physical_line in script.splitlines():
        line += physical_line
        lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
        lexer.whitespace_split = True
        try:
            yield list(lexer)
        except ValueError:  # No closing quotation
            line += "\n"
        else:
            line = ""


def ar_ray_commands(script: str) -> list[list[str]]:
    """The arguments of each `ar-ray` call in a shell snippet: at the start of a command
    (`a && ar-ray ...`, `ray job submit ... -- ar-ray ...`) or inside `bash -c '...'`."""
    commands = []
    for tokens in shell_lines(script):
        command, at_start = None, True
        for token in [*tokens, ";"]:
            if token and set(token) <= SHELL_OPERATORS:
                if command is not None:
                    commands.append(command)
                command, at_start = None, True
            elif command is not None:
                command.append(token)
            else:
                if at_start and token == "ar-ray":
                    command = []
                elif " " in token:
                    commands += ar_ray_commands(token)
                at_start = token == "--"
    return commands


def yaml_scripts(node) -> list[str]:
    """Every string with a space in it: commands, not names such as `name: ar-ray`."""
    if isinstance(node, str):
        return [node] if " " in node.strip() else []
    if isinstance(node, dict):
        node = list(node.values())
    if isinstance(node, list):
        return [text for child in node for text in yaml_scripts(child)]
    return []


def commands_by_source() -> dict[str, list[list[str]]]:
    """The commands in README.md's bash blocks and in every launch/*.yaml."""
    texts = {"README.md": SHELL_BLOCK.findall((LAUNCH / "README.md").read_text())}
    texts.update((name, yaml_scripts(doc)) for name, doc in DOCUMENTS.items())
    return {
        source: [args for text in source_texts for args in ar_ray_commands(text)]
        for source, source_texts in texts.items()
    }


COMMANDS = commands_by_source()


def test_ar_ray_command_finder():
    script = """ray job submit --address http://localhost:8265 -- \\
      ar-ray tune --storage s3://${BUCKET}/ar-ray --name x  # comment
    git clone https://github.com/ar-ray/ar-ray && pip install ar-ray
    bash -c 'ar-ray tune --trials 2 && ar-ray ensemble --from $BUCKET/x'
    echo '{"quoted":
      "newline"}' && ar-ray train --epochs 1"""
    assert ar_ray_commands(script) == [
        ["tune", "--storage", "s3://PLACEHOLDER/ar-ray", "--name", "x"],
        ["tune", "--trials", "2"],
        ["ensemble", "--from", "PLACEHOLDER/x"],
        ["train", "--epochs", "1"],
    ]


@pytest.mark.parametrize("source", ["README.md", "kuberay-job.yaml"])
def test_runs_tune_then_ensemble(source):
    assert [args[0] for args in COMMANDS[source]][:2] == ["tune", "ensemble"]


@pytest.mark.parametrize(
    "source, args",
    [
        pytest.param(source, args, id=f"{source}: ar-ray {shlex.join(args)}")
        for source, commands in COMMANDS.items()
        for args in commands
    ],
)
def test_ar_ray_command_parses(source, args, capsys):
    try:
        parsed = build_parser().parse_args(args)
    except SystemExit:
        pytest.fail(
            f"{source}: `ar-ray {shlex.join(args)}` is rejected by the CLI:\n"
            + capsys.readouterr().err
        )
    if parsed.command == "tune":
        assert "://" in parsed.storage, "multi-node Tune needs --storage on a bucket"
        assert parsed.gpus_per_trial, "a cluster that starts without GPUs needs --gpus-per-trial"


RAY_REQUIREMENT = re.compile(r"(?<![\w-])ray\[([a-z,]+)\]")  # not ar-ray[...]


def test_cluster_images_install_the_ray_extras_the_package_declares():
    """A node that lacks an extra ar-ray imports fails only when a job lands on it (Ray Data
    in the inference actors, the State API that frees an early-stopped trial's workers, Ray
    Serve in a replica, MLflow's client in a tracked member's worker): every cluster
    installs Ray with ar-ray's own extras and serve's, and ar-ray with its serve and mlflow
    extras."""
    tomllib = pytest.importorskip("tomllib")
    project = tomllib.loads((LAUNCH.parent / "pyproject.toml").read_text())["project"]
    requirements = [*project["dependencies"], *project["optional-dependencies"]["serve"]]
    declared = {
        e for r in requirements for found in RAY_REQUIREMENT.findall(r) for e in found.split(",")
    }
    assert declared == {"default", "data", "tune", "train", "serve"}
    for path in LAUNCH.glob("*.yaml"):
        installs = RAY_REQUIREMENT.findall(path.read_text())
        assert [set(extras.split(",")) for extras in installs] == [declared], path.name
        assert "/home/ray/ar-ray[serve,mlflow]" in path.read_text(), path.name
