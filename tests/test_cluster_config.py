"""cluster.yaml, checked offline: Ray's own cluster-config validation (what `ray up` runs on the file before
it calls AWS) and what a user of the file relies on. No network, no credentials, no Ray processes."""

from __future__ import annotations

import copy
import re
import subprocess
import tomllib
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
CLUSTER_YAML = REPO / "cluster.yaml"
COMMAND_KEYS = ("initialization_commands", "setup_commands", "head_setup_commands", "worker_setup_commands",
                "head_start_ray_commands", "worker_start_ray_commands")
GPU_INSTANCE = re.compile(r"^(g\d|p\d|gr\d)")  # EC2 families with NVIDIA GPUs: g4dn, g5, g6, g6e, p4d, p5, ...


def raw() -> dict:
    return yaml.safe_load(CLUSTER_YAML.read_text())


def ray_validate(config: dict) -> dict:
    """`ray up`'s offline steps (autoscaler/_private/commands.py `_bootstrap_config`): prepare_config merges
    the provider's defaults file (ray/autoscaler/aws/defaults.yaml, top-level keys replaced whole), prepends
    setup_commands to head_/worker_setup_commands and fills per-type min/max_workers; validate_config checks
    ray-schema.json (no unknown keys anywhere but provider / node_config) and the cross-field rules. Only the
    steps after these (resource autodetection, IAM, subnets, AMI) need boto3 and credentials."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    prepared = prepare_config(copy.deepcopy(config))
    validate_config(prepared)
    return prepared


@pytest.fixture(scope="module")
def prepared() -> dict:
    return ray_validate(raw())


def worker_types(cfg: dict) -> dict[str, dict]:
    return {name: t for name, t in cfg["available_node_types"].items() if name != cfg["head_node_type"]}


def has_gpu(node_type: dict) -> bool:
    return node_type.get("resources", {}).get("GPU", 0) > 0 or bool(
        GPU_INSTANCE.match(node_type["node_config"].get("InstanceType", "")))


def commands(cfg: dict, key: str) -> str:
    return "\n".join(cfg.get(key) or [])


# -- Ray's validation ----------------------------------------------------------------------------------

def test_cluster_yaml_passes_rays_validation(prepared):
    assert prepared["provider"]["type"] == "aws" and prepared["provider"]["region"]
    # Every command list is the file's own: none falls back to the AWS defaults (a nightly Ray wheel,
    # an old boto3), and the head runs the common setup commands, then its own.
    cfg = raw()
    for key in COMMAND_KEYS:
        assert key in cfg, f"cluster.yaml lacks {key}: Ray would use aws/defaults.yaml's"
    assert prepared["head_setup_commands"] == cfg["setup_commands"] + cfg["head_setup_commands"]
    assert "ray-wheels" not in str(prepared)


def _misspell(cfg: dict, where: str) -> str:
    """Rename one key as a user might mistype it; returns the misspelled key."""
    if where == "node type min_worker":
        gpu = cfg["available_node_types"]["gpu_worker"]
        gpu["min_worker"] = gpu.pop("min_workers")
        return "min_worker"
    if where == "top-level max_worker":
        cfg["max_worker"] = cfg.pop("max_workers")
        return "max_worker"
    if where == "top-level head_start_ray_command":
        cfg["head_start_ray_command"] = cfg.pop("head_start_ray_commands")
        return "head_start_ray_command"
    if where == "node type docker worker_imag":
        docker = cfg["available_node_types"]["gpu_worker"]["docker"]
        docker["worker_imag"] = docker.pop("worker_image")
        return "worker_imag"
    raise AssertionError(where)


@pytest.mark.parametrize("where", ["node type min_worker", "top-level max_worker", "top-level head_start_ray_command",
                                   "node type docker worker_imag"])
def test_rays_validation_rejects_a_misspelled_key(where):
    import jsonschema

    cfg = raw()
    key = _misspell(cfg, where)
    # prepare_config alone does not notice (a missing max_workers is even filled in from the defaults)...
    from ray.autoscaler._private.util import prepare_config

    prepare_config(copy.deepcopy(cfg))
    # ...validate_config does, naming the key.
    with pytest.raises(jsonschema.ValidationError, match=rf"'{key}' was unexpected"):
        ray_validate(cfg)


def test_node_configs_are_valid_run_instances_parameters():
    """node_config is free-form in Ray's schema (so is provider): a misspelled EC2 field would only fail at
    launch. Ray's AWS provider passes node_config to EC2 RunInstances, so check it against that API's shape,
    from botocore's bundled service model (offline)."""
    import botocore.session as botocore_session
    from botocore.validate import ParamValidator

    shape = botocore_session.get_session().get_service_model("ec2").operation_model("RunInstances").input_shape

    def report(node_config: dict) -> str:
        return ParamValidator().validate({**node_config, "MinCount": 1, "MaxCount": 1}, shape).generate_report()

    for name, node_type in raw()["available_node_types"].items():
        assert report(node_type["node_config"]) == "", name
    bad = dict(raw()["available_node_types"]["gpu_worker"]["node_config"])
    bad["InstanceTyp"] = bad.pop("InstanceType")
    assert 'Unknown parameter in input: "InstanceTyp"' in report(bad)


# -- what a user relies on ----------------------------------------------------------------------------

def test_node_types_head_cpu_and_gpu_workers(prepared):
    cfg = raw()
    assert cfg["head_node_type"] in cfg["available_node_types"]
    workers = worker_types(cfg)
    gpu = [n for n, t in workers.items() if has_gpu(t)]
    cpu = [n for n, t in workers.items() if not has_gpu(t)]
    assert gpu and cpu, f"need a CPU and a GPU worker type, have CPU {cpu}, GPU {gpu}"
    assert not has_gpu(cfg["available_node_types"][cfg["head_node_type"]]), "the head is a CPU node"
    for name, t in workers.items():
        # explicit bounds in the file, not Ray's fill-ins
        assert "min_workers" in t and "max_workers" in t, name
        assert 0 <= t["min_workers"] <= t["max_workers"], name
        if has_gpu(t) and "GPU" in t.get("resources", {}):
            assert t["resources"]["GPU"] >= 1
    assert sum(t["min_workers"] for t in workers.values()) <= cfg["max_workers"]
    assert prepared["available_node_types"][cfg["head_node_type"]]["max_workers"] == 0


def test_setup_installs_pinned_torch_pair_then_the_project_at_a_commit():
    cfg = raw()
    setup = commands(cfg, "setup_commands")
    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    for pin in (d for d in deps if d.startswith(("torch==", "torchvision=="))):
        assert pin in setup, f"setup_commands do not install {pin} (pyproject.toml's pin)"
    project = re.search(r"featmap-ray @ git\+\S+@\$\{?(\w+)\}?", setup)
    assert project, "setup_commands do not install featmap-ray from git at a revision variable"
    assert setup.index("torchvision==") < project.start(), "torch/torchvision must be installed first"
    # The revision is set in the same command (each command runs in its own shell).
    command = next(c for c in cfg["setup_commands"] if project.group(0) in c)
    assert re.search(rf"\b{project.group(1)}=\S+", command), f"{project.group(1)} is not set where it is used"


def test_head_starts_ray_with_the_autoscaler_and_an_mlflow_server():
    cfg = raw()
    head = commands(cfg, "head_start_ray_commands")
    assert re.search(r"ray start --head .*--autoscaling-config=~/ray_bootstrap_config.yaml", head)
    assert re.search(r"ray start --address=\$RAY_HEAD_IP:6379", commands(cfg, "worker_start_ray_commands"))
    server = next(c for c in cfg["head_start_ray_commands"] if "mlflow server" in c)
    assert re.search(r"--backend-store-uri (sqlite:////\S+|postgresql\S*://\S+|mysql\S*://\S+)", server), \
        "the tracking server needs a database backend store"
    assert re.search(r"--artifacts-destination (s3|gs)://\S+", server), "artefacts go to object storage"
    # The head's private address (the first of `hostname -I`), never every interface: the server has no
    # authentication of its own (docs/how-to/mlflow.md: A shared tracking server).
    assert "H=$(hostname -I)" in server and "--host ${H%% *}" in server and "--port 5000" in server
    assert "0.0.0.0" not in server
    assert server.rstrip().endswith("&"), "the server runs in the background"
    assert "mlflow server" not in commands(cfg, "worker_start_ray_commands")


def test_images_match_the_project_pins():
    import ray

    cfg = raw()
    images = [cfg["docker"]["image"], *(t.get("docker", {}).get("worker_image") for t in worker_types(cfg).values())]
    images = [i for i in images if i]
    for image in images:
        assert image.startswith(f"rayproject/ray:{ray.__version__}-py311"), image
    gpu_images = [t["docker"]["worker_image"] for t in worker_types(cfg).values() if has_gpu(t)]
    assert gpu_images and all(re.search(r"-(gpu|cu\d+)$", i) for i in gpu_images)


def test_token_auth_and_no_credentials_in_the_file():
    cfg = raw()
    assert "-e RAY_AUTH_MODE=token" in cfg["docker"]["run_options"]
    assert "~/.ray/auth_token" in cfg["file_mounts"]
    text = CLUSTER_YAML.read_text()
    assert not re.search(r"AWS_(SECRET_ACCESS_KEY|ACCESS_KEY_ID|SESSION_TOKEN)\s*[=:]", text)
    assert not re.search(r"\b(AKIA|ASIA)[A-Z0-9]{16}\b", text)


def test_every_command_is_valid_shell():
    """`bash -n` on each command as Ray runs it: one shell per list item (`(cmd)` in a login shell)."""
    cfg = raw()
    cmds = [(key, cmd) for key in COMMAND_KEYS for cmd in cfg[key]]
    script = "\n".join(f"(\n{cmd}\n)" for _, cmd in cmds)
    if subprocess.run(["bash", "-n", "-c", script], capture_output=True).returncode == 0:
        return
    for key, cmd in cmds:  # name the culprit
        result = subprocess.run(["bash", "-n", "-c", cmd], capture_output=True, text=True)
        assert result.returncode == 0, f"{key}: {cmd!r}: {result.stderr}"
    raise AssertionError("the commands parse one by one but not together")
