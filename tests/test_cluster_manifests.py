"""The deployment files in ``cluster/`` and the ``Dockerfile``: they parse, carry what each CRD or launcher needs,
and everything they name (image, entrypoints, configs, Serve app, secrets, volumes) exists and agrees.

Nothing here talks to Kubernetes or AWS; building the image is not tested. The image that manifests run is
``vembed:<version in pyproject.toml>``, built from the repository's Dockerfile, which puts the repository at
``/home/ray/vembed``: paths under it map to this checkout.
"""

from __future__ import annotations

import argparse
import ast
import re
import shlex
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.unit

REPO = Path(__file__).resolve().parents[1]
KUBERAY = REPO / "cluster" / "kuberay"
IMAGE_HOME = "/home/ray/vembed"
SECRET = "vembed-ray-auth"
IMAGE = f"vembed:{version('vembed')}"  # the tag `docker build` gives the image: the package version


def _ray_version() -> str:
    return version("ray")


def _load(name: str) -> list[dict]:
    return [doc for doc in yaml.safe_load_all((KUBERAY / name).read_text()) if doc]


def _one(name: str, kind: str) -> dict:
    (doc,) = [d for d in _load(name) if d.get("kind") == kind]
    assert doc["apiVersion"] == "ray.io/v1" and doc["metadata"]["name"]
    return doc


def _repo_path(path: str) -> Path:
    """A path inside the image -> the same file in this checkout (it must be one the Dockerfile copies)."""
    assert path.startswith(IMAGE_HOME + "/"), f"{path} is not under the image's {IMAGE_HOME}"
    local = REPO / path.removeprefix(IMAGE_HOME + "/")
    assert local.is_file(), f"{path} names {local}, which does not exist"
    return local


def _check_pod(template: dict, volumes_ok: set[str]) -> list[dict]:
    """Containers of a pod template: the vembed image, mounts that name declared volumes; returns containers."""
    spec = template["spec"]
    containers = spec["containers"]
    assert containers
    declared = {v["name"]: v for v in spec.get("volumes", [])}
    for container in containers:
        assert container["name"] and container["image"] == IMAGE
        for mount in container.get("volumeMounts", []):
            assert mount["name"] in declared, f"mount {mount['name']} has no volume"
    for volume in declared.values():
        claim = volume.get("persistentVolumeClaim")
        if claim:
            assert claim["claimName"] in volumes_ok
    return containers


def _check_cluster_spec(spec: dict) -> None:
    """A RayClusterSpec: token auth from the Secret, a CPU head, GPU workers with limits and scaling bounds."""
    claims = {d["metadata"]["name"] for d in yaml.safe_load_all((KUBERAY / "storage.yaml").read_text()) if d}
    assert spec["rayVersion"] == _ray_version()
    assert spec["authOptions"] == {"mode": "token", "secretName": SECRET}

    head = spec["headGroupSpec"]
    assert isinstance(head["rayStartParams"], dict)
    (head_container,) = _check_pod(head["template"], claims)
    assert "nvidia.com/gpu" not in head_container["resources"].get("limits", {}), "the head is CPU-only"
    _check_shm(head["template"])
    assert {p["containerPort"] for p in head_container["ports"]} >= {6379, 8265}

    groups = spec["workerGroupSpecs"]
    assert groups
    for group in groups:
        assert group["groupName"] and isinstance(group["rayStartParams"], dict)
        assert 0 <= group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
        (container,) = _check_pod(group["template"], claims)
        _check_shm(group["template"])
        limits, requests = container["resources"]["limits"], container["resources"]["requests"]
        assert int(limits["nvidia.com/gpu"]) >= 1 and limits["nvidia.com/gpu"] == requests["nvidia.com/gpu"]


def _check_shm(template: dict) -> None:
    """Every Ray pod (head included: job drivers and the Serve proxy use the object store) mounts a memory-backed
    /dev/shm instead of the container default of 64 MiB."""
    (container,) = template["spec"]["containers"]
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    assert "/dev/shm" in mounts, container["name"]
    (volume,) = [v for v in template["spec"]["volumes"] if v["name"] == mounts["/dev/shm"]]
    assert volume["emptyDir"]["medium"] == "Memory"


def _entrypoint(doc: dict) -> list[str]:
    argv = shlex.split(doc["spec"]["entrypoint"])
    assert argv[0] == "python"
    return argv[1:]


def test_raycluster_has_cpu_head_and_autoscaling_gpu_workers():
    doc = _one("raycluster.yaml", "RayCluster")
    _check_cluster_spec(doc["spec"])
    assert doc["spec"]["enableInTreeAutoscaling"] is True
    (group,) = doc["spec"]["workerGroupSpecs"]
    assert group["minReplicas"] < group["maxReplicas"]
    assert doc["spec"]["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"


def test_rayjob_train_runs_the_train_entrypoint_with_a_valid_config():
    from vembed.config import load_and_parse_config

    doc = _one("rayjob-train.yaml", "RayJob")
    _check_cluster_spec(doc["spec"]["rayClusterSpec"])
    script, config_path, *overrides = _entrypoint(doc)
    assert _repo_path(script) == REPO / "ray_jobs" / "train.py"
    config = load_and_parse_config([str(_repo_path(config_path)), *overrides])  # unknown keys or bad values raise
    assert config.output_dir.startswith("/mnt/vembed/") and config.storage_path.startswith("/mnt/vembed/")
    (group,) = doc["spec"]["rayClusterSpec"]["workerGroupSpecs"]
    assert config.num_workers == group["minReplicas"], "the job cluster must hold every training worker"
    assert config.resources_per_worker["GPU"] == 1 and config.use_gpu is True
    assert doc["spec"]["shutdownAfterJobFinishes"] is True


def test_rayjob_embed_runs_the_embed_entrypoint_with_valid_options():
    from vembed.batch.cli import add_arguments

    doc = _one("rayjob-embed.yaml", "RayJob")
    _check_cluster_spec(doc["spec"]["rayClusterSpec"])
    script, *options = _entrypoint(doc)
    assert _repo_path(script) == REPO / "ray_jobs" / "embed.py"
    parser = argparse.ArgumentParser(exit_on_error=False)
    add_arguments(parser)
    args = parser.parse_args(options)
    assert args.model.startswith("/mnt/vembed/") and args.output.startswith("/mnt/vembed/")
    (group,) = doc["spec"]["rayClusterSpec"]["workerGroupSpecs"]
    assert args.max_actors <= group["maxReplicas"] * int(
        group["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"]
    )


def test_rayservice_embeds_the_serve_config_of_configs_serve_yaml():
    from vembed.serving.settings import check_serve_config

    doc = _one("rayservice.yaml", "RayService")
    _check_cluster_spec(doc["spec"]["rayClusterConfig"])
    served = yaml.safe_load(doc["spec"]["serveConfigV2"])
    local = yaml.safe_load((REPO / "configs" / "serve.yaml").read_text())
    (app,), (local_app,) = served["applications"], local["applications"]
    assert app["import_path"] == local_app["import_path"] and app["route_prefix"] == local_app["route_prefix"]
    assert set(app["args"]) == set(local_app["args"]), "serveConfigV2 must carry the same args as serve.yaml"
    ((args, deployment),) = check_serve_config(served)  # Ray's schema, args and `deployments:` together
    assert args.require_api_key and served["http_options"]["host"] == "0.0.0.0"
    (entry,), (local_entry,) = app["deployments"], local_app["deployments"]
    assert set(entry) == set(local_entry), "serveConfigV2 must carry the same deployment options as serve.yaml"
    resources = deployment.ray_actor_options
    assert resources.num_gpus >= 1 and resources.memory, "each replica reserves its GPU and memory"
    (group,) = doc["spec"]["rayClusterConfig"]["workerGroupSpecs"]
    limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert resources.num_gpus <= int(limits["nvidia.com/gpu"]) and resources.memory < _bytes(limits["memory"])
    assert deployment.autoscaling_config.max_replicas <= group["maxReplicas"] * int(limits["nvidia.com/gpu"])

    module, attr = app["import_path"].split(":")
    source = REPO / (module.replace(".", "/") + ".py")
    functions = {n.name for n in ast.parse(source.read_text()).body if isinstance(n, ast.FunctionDef)}
    assert attr in functions, f"{source} defines no {attr}"

    # The API key reaches every replica through the environment variable the app reads.
    pods = [doc["spec"]["rayClusterConfig"]["headGroupSpec"]] + doc["spec"]["rayClusterConfig"]["workerGroupSpecs"]
    for pod in pods:
        (container,) = pod["template"]["spec"]["containers"]
        env = {e["name"]: e for e in container.get("env", [])}
        assert env[args.api_key_env]["valueFrom"]["secretKeyRef"]["name"]


def test_the_dockerfile_builds_the_image_the_manifests_name():
    text = (REPO / "Dockerfile").read_text()
    (base,) = re.findall(r"^FROM\s+(\S+)", text, flags=re.M)
    assert base.startswith(f"rayproject/ray:{_ray_version()}-"), "the image's Ray must match the cluster's"
    cuda = re.search(r"-(cu\d+)$", base)
    assert cuda, "an explicit CUDA tag, not the moving -gpu alias"
    assert re.search(rf"TORCH_INDEX=https://download.pytorch.org/whl/{cuda.group(1)}\s", text), "torch of that CUDA"
    assert re.search(r"pip install .*torch==\$\{TORCH_VERSION\}.*--index-url", text)
    assert not re.search(r"^RUN\s+--mount", text, flags=re.M)  # builds without BuildKit too
    assert re.search(rf"^WORKDIR\s+{IMAGE_HOME}\s*$", text, flags=re.M)
    copied = set(re.findall(r"^COPY\s+(?:--\S+\s+)*(\S+)\s", text, flags=re.M))
    assert {"vembed", "configs", "ray_jobs", "pyproject.toml"} <= copied
    assert re.search(r"pip install .*\s\.(\s|$)", text)
    assert f"docker build -t {IMAGE} ." in text
    from vembed.serving.overload import CALLBACK, CALLBACK_ENV

    assert re.search(rf"^\s+{CALLBACK_ENV}={CALLBACK} \\$", text, flags=re.M), "overload 503s in JSON on the cluster"
    assert re.search(r"^\s+RAY_SERVE_THROUGHPUT_OPTIMIZED=0\s*$", text, flags=re.M), "the measured default"


def test_ray_up_config_has_what_the_launcher_needs():
    config = yaml.safe_load((REPO / "cluster" / "ray-up" / "aws-gpu.yaml").read_text())
    assert config["cluster_name"] and config["max_workers"] >= 1
    assert config["provider"]["type"] == "aws" and config["provider"]["region"]
    assert config["auth"]["ssh_user"] and config["docker"]["image"] == IMAGE
    assert config["available_node_types"]["gpu_worker"]["node_config"]["ImageId"].startswith("ami-")
    types = config["available_node_types"]
    assert config["head_node_type"] in types
    workers = [t for name, t in types.items() if name != config["head_node_type"]]
    assert workers and all(t["node_config"]["InstanceType"] and t["max_workers"] >= t["min_workers"] for t in workers)
    assert any(t["node_config"]["InstanceType"].startswith(("g", "p")) for t in workers), "a GPU worker type"
    for commands in (config["head_start_ray_commands"], config["worker_start_ray_commands"]):
        assert any("RAY_AUTH_MODE=token" in c and "ray start" in c for c in commands)
    assert any(remote.endswith("/.ray/auth_token") for remote in config["file_mounts"])


def _containers(node: object):
    """Every container spec anywhere in a parsed manifest."""
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "containers":
                yield from value
            else:
                yield from _containers(value)
    elif isinstance(node, list):
        for item in node:
            yield from _containers(item)


def test_no_manifest_carries_a_token_literal():
    readme = (REPO / "cluster" / "README.md").read_text()
    assert f"kubectl create secret generic {SECRET}" in readme
    for path in sorted(KUBERAY.glob("*.yaml")):
        for container in _containers(_load(path.name)):
            for env in container.get("env", []):
                assert "value" not in env or not re.search("TOKEN|KEY", env["name"]), f"{path.name}: {env}"


@pytest.mark.parametrize("path", sorted((REPO / "configs").glob("train_*.yaml")), ids=lambda p: p.name)
def test_example_training_configs_load(path):
    from vembed.config import load_config_file

    config = load_config_file(path)
    assert config.model_name and config.data_path


@pytest.mark.parametrize("script", ["start.sh", "stop.sh"])
def test_local_cluster_scripts_parse_and_explain_themselves(script):
    path = REPO / "cluster" / "local" / script
    assert path.stat().st_mode & 0o111, f"{script} is not executable"
    assert subprocess.run(["bash", "-n", str(path)], capture_output=True).returncode == 0
    shown = subprocess.run([str(path), "--help"], capture_output=True, text=True, timeout=60)
    assert shown.returncode == 0 and "--dir DIR" in shown.stdout
    wrong = subprocess.run([str(path), "--no-such-option"], capture_output=True, text=True, timeout=60)
    assert wrong.returncode == 2 and "unknown option '--no-such-option'" in wrong.stderr


@pytest.mark.parametrize("script", ["train.py", "embed.py", "evaluate.py"])
def test_job_entrypoints_run_as_scripts(script):
    shown = subprocess.run(
        [sys.executable, str(REPO / "ray_jobs" / script), "--help"], capture_output=True, text=True, timeout=300
    )
    assert shown.returncode == 0, shown.stderr
    assert ("--config_override" if script == "train.py" else "--model") in shown.stdout


def _bytes(quantity: str) -> int:
    """A Kubernetes memory quantity (``32Gi``, ``512Mi``) in bytes."""
    units = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40}
    for suffix, factor in units.items():
        if quantity.endswith(suffix):
            return int(float(quantity[: -len(suffix)]) * factor)
    return int(quantity)
