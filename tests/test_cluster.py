"""A real two-node Ray cluster on this machine (issue 9): jobs through ``ray job submit``, token auth, node loss.

``cluster/local/start.sh`` starts a head (8 logical CPUs) and a worker node (5) as separate raylets with token
authentication, on a free port block; the module fixture stops them with ``cluster/local/stop.sh`` whatever happens.
Multi-node Ray binds its gRPC services to this machine's own address (DESIGN.md, "Ray facts"), so the cluster's
environment drops ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER``; the dashboard and job API stay on 127.0.0.1. Jobs are
submitted with the real ``ray job submit`` CLI; their status and logs are read with ``JobSubmissionClient``,
which carries the token as a header (nothing in this process switches on token auth).

Placement: Ray Train packs a run's workers onto as few nodes as possible, and the Ray Data pipeline that feeds
them needs 2 CPUs besides (its read and preprocessing tasks). The training job uses 3-CPU workers, two of
which the head (8 CPUs) can hold together with the pipeline; while it starts, another job holds 4 of the head's
CPUs, so the workers land one per node (the run spans both nodes); that job then ends, the worker node is killed,
and Ray Train must restart both workers on the head. One job does all this because every Ray Train start costs
about a minute on 2 cores. The same test then joins a new worker node (``start.sh --join``) and runs an embedding
job with the trained checkpoint whose model actors (one per node: Ray Data spreads them, and the job waits for its
pool) write shards on both nodes, kills that node mid-job too, and reruns the job. The node-loss test runs last: it
leaves the cluster with the head only.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.cluster

REPO = Path(__file__).resolve().parents[1]
START = REPO / "cluster" / "local" / "start.sh"
STOP = REPO / "cluster" / "local" / "stop.sh"
BIN = Path(sys.executable).parent
RAY = str(BIN / "ray")
HEAD_CPUS, WORKER_CPUS = 8, 5
JOB_TIMEOUT_S = 900
# What every job gets besides the cluster's own environment (no downloads, quiet Ray Data progress bars).
RUNTIME_ENV = {
    "env_vars": {"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "RAY_DATA_DISABLE_PROGRESS_BARS": "1"}
}


@dataclass
class LocalCluster:
    dir: Path
    dashboard: str  # http://127.0.0.1:PORT, the job API
    gcs_address: str  # IP:PORT, where nodes and drivers connect
    token: str
    env: dict[str, str]  # environment of a client that holds the token

    def client(self):
        from ray.job_submission import JobSubmissionClient

        return JobSubmissionClient(self.dashboard, headers={"Authorization": f"Bearer {self.token}"})

    def nodes(self) -> list[dict]:
        """The cluster's nodes from the state API (``node_id``, ``is_head_node``, ``state``)."""
        request = urllib.request.Request(
            f"{self.dashboard}/api/v0/nodes", headers={"Authorization": f"Bearer {self.token}"}
        )
        with urllib.request.urlopen(request, timeout=60) as response:
            return json.load(response)["data"]["result"]["result"]

    def node_id(self, head: bool) -> str:
        (node,) = [n for n in self.nodes() if n["is_head_node"] == head and n["state"] == "ALIVE"]
        return node["node_id"]


def _free_port_block(size: int) -> int:
    """The first port of ``size`` consecutive free ports below the ephemeral range (so nothing random takes them)."""
    for base in range(21000 + (os.getpid() % 20) * 400, 32000 - size, 400):
        sockets = []
        try:
            for port in range(base, base + size):
                s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                sockets.append(s)
                s.bind(("0.0.0.0", port))
            return base
        except OSError:
            continue
        finally:
            for s in sockets:
                s.close()
    raise RuntimeError("no free block of ports for the test cluster")


def _base_env() -> dict[str, str]:
    """This environment without any Ray client/cluster settings, with the venv's ``python`` and ``ray`` first."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}", HF_HUB_OFFLINE="1", RAY_USAGE_STATS_ENABLED="0")
    return env


def _stop(cluster_dir: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(STOP), "--dir", str(cluster_dir), "--timeout", "15", *args],
        env=_base_env(),
        capture_output=True,
        text=True,
        timeout=180,
    )


@pytest.fixture(scope="module")
def cluster():
    # Short path: Ray's unix sockets live under it and must stay below 108 bytes.
    cluster_dir = Path(tempfile.mkdtemp(prefix="vc", dir="/tmp"))
    base_port = _free_port_block(400)
    try:
        started = subprocess.run(
            [str(START), "--dir", str(cluster_dir), "--head-cpus", str(HEAD_CPUS), "--worker-cpus", str(WORKER_CPUS)]
            + ["--base-port", str(base_port), "--object-store-mb", "256", "--timeout", "300", "--attempts", "5"],
            env=_base_env(),
            capture_output=True,
            text=True,
            timeout=900,
        )
        assert started.returncode == 0, f"start.sh failed:\n{started.stdout}\n{started.stderr}"
        settings = dict(
            line.removeprefix("export ").split("=", 1)
            for line in (cluster_dir / "cluster.env").read_text().splitlines()
            if line.startswith("export ")
        )
        env = {**_base_env(), "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": settings["RAY_AUTH_TOKEN_PATH"]}
        yield LocalCluster(
            dir=cluster_dir,
            dashboard=settings["RAY_ADDRESS"],
            gcs_address=settings["VEMBED_RAY_GCS_ADDRESS"],
            token=Path(settings["RAY_AUTH_TOKEN_PATH"]).read_text().strip(),
            env=env,
        )
    finally:
        stopped = _stop(cluster_dir)
        shutil.rmtree(cluster_dir, ignore_errors=True)
        assert stopped.returncode == 0, f"stop.sh failed:\n{stopped.stdout}\n{stopped.stderr}"


@pytest.fixture(scope="module")
def job_data(tmp_path_factory):
    """A tiny CLIP and 32 + 8 shape/caption records; every node reads them from this machine's disk."""
    from vembed.testing import make_shapes_dataset, make_tiny_clip

    root = tmp_path_factory.mktemp("cluster_data")
    return {"model": make_tiny_clip(root / "clip"), **make_shapes_dataset(root / "shapes", num_train=32, num_val=0)}


def _submit(cluster: LocalCluster, job_id: str, entrypoint: list[str], *options: str) -> None:
    """``ray job submit --no-wait`` from the repository, as a user would; the job's fate is read by the caller."""
    submitted = subprocess.run(
        [RAY, "job", "submit", "--address", cluster.dashboard, "--submission-id", job_id, "--no-wait"]
        + ["--working-dir", str(REPO), "--runtime-env-json", json.dumps(RUNTIME_ENV), *options, "--", *entrypoint],
        cwd=REPO,
        env=cluster.env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert submitted.returncode == 0, f"ray job submit failed:\n{submitted.stdout}\n{submitted.stderr}"


def _wait(cluster: LocalCluster, job_id: str, timeout: float = JOB_TIMEOUT_S) -> str:
    """Wait for the job to end; returns its final status name."""
    client = cluster.client()
    deadline = time.monotonic() + timeout
    while not (status := client.get_job_status(job_id)).is_terminal():
        assert time.monotonic() < deadline, f"job {job_id} still {status} after {timeout}s:\n{_logs(cluster, job_id)}"
        time.sleep(2)
    return status.value


def _logs(cluster: LocalCluster, job_id: str, tail: int = 6000) -> str:
    return cluster.client().get_job_logs(job_id)[-tail:]


def _printed_result(logs: str) -> dict:
    """The JSON that ``ray_jobs/train.py`` prints last (``{"metrics": ..., "output_dir": ...}``)."""
    start = logs.rfind('{\n  "metrics"')
    assert start >= 0, f"the training job printed no result:\n{logs[-3000:]}"
    result, _ = json.JSONDecoder().raw_decode(logs[start:])
    return result


def _train_entrypoint(job_data: dict, output_dir: Path, *overrides: str) -> list[str]:
    """``python ray_jobs/train.py configs/train_clip_t2i.yaml`` pointed at the tiny model and data."""
    return [
        "python",
        "ray_jobs/train.py",
        "configs/train_clip_t2i.yaml",
        "--config_override",
        f"model_name={job_data['model']}",
        f"data_path={job_data['train']}",
        "val_data_path=null",
        "image_root=null",
        f"output_dir={output_dir}",
        "batch_size=8",
        "num_workers=2",
        "use_gpu=false",
        "torch_threads=1",
        "learning_rate=1e-3",
        *overrides,
    ]


def _checkpoint_history(output_dir: Path, run_name: str) -> list[dict]:
    """Metrics reported with each kept Ray Train checkpoint of the run, by epoch."""
    from ray.train import Result

    result = Result.from_path(output_dir / "ray_results" / run_name)
    return sorted((metrics for _, metrics in result.best_checkpoints), key=lambda m: m["epoch"])


def _status_of(url: str, token: str | None) -> int:
    headers = {"Authorization": f"Bearer {token}"} if token is not None else {}
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=60) as response:
            return response.status
    except urllib.error.HTTPError as error:
        return error.code


def test_clients_without_the_token_are_refused(cluster, tmp_path):
    jobs = f"{cluster.dashboard}/api/jobs/"
    assert _status_of(jobs, cluster.token) == 200
    assert _status_of(jobs, None) == 401
    assert _status_of(jobs, "0" * 64) == 403

    # The real CLI with no token anywhere (fresh HOME, auth mode unset): refused, and no job is created.
    no_token = {**_base_env(), "HOME": str(tmp_path)}
    refused = subprocess.run(
        [RAY, "job", "submit", "--address", cluster.dashboard, "--submission-id", "sneaky", "--no-wait"]
        + ["--", "python", "-c", "print('ran')"],
        env=no_token,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert refused.returncode != 0
    assert "Authentication required" in refused.stdout + refused.stderr
    assert "sneaky" not in {job.submission_id for job in cluster.client().list_jobs()}

    # A driver (or node) that presents a wrong token to the GCS cannot join.
    wrong_token = {**no_token, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": "0" * 64}
    connect = f"import ray; ray.init(address={cluster.gcs_address!r}); print('CONNECTED')"
    driver = subprocess.run(
        [sys.executable, "-c", connect], env=wrong_token, capture_output=True, text=True, timeout=300
    )
    assert driver.returncode != 0 and "CONNECTED" not in driver.stdout
    assert "InvalidAuthToken" in driver.stderr


@pytest.mark.timeout(2400)  # two jobs that each lose a node, and a node joining: past the suite's 900 s here
def test_training_spans_both_nodes_survives_losing_one_and_its_checkpoint_embeds_a_corpus(cluster, job_data, tmp_path):
    """A training job starts one worker per node; the worker node is killed mid-run, Ray Train restarts both
    workers on the head and the job still succeeds. A new worker node joins, and an embedding job embeds images with
    the checkpoint, writing shards on both nodes, until that node is killed mid-job too; a rerun finishes it with
    every image once and the Predictor's vectors."""
    from vembed.batch.writer import read_embeddings, read_manifest, writer_nodes
    from vembed.inference import VEmbedFactoryPredictor

    head, worker = cluster.node_id(head=True), cluster.node_id(head=False)
    client = cluster.client()
    # Another job holds 4 of the head's 8 CPUs, so the two 3-CPU workers cannot both be packed onto the head.
    _submit(
        cluster,
        "hold-head-cpus",
        ["python", "-c", "import time; time.sleep(3600)"],
        "--entrypoint-num-cpus",
        "4",
        "--entrypoint-resources",
        json.dumps({"node:__internal_head__": 0.001}),
    )
    deadline = time.monotonic() + 300
    while client.get_job_status("hold-head-cpus").value != "RUNNING":
        assert time.monotonic() < deadline, _logs(cluster, "hold-head-cpus")
        time.sleep(1)

    out = tmp_path / "train"
    # An epoch of 4 steps takes about a second here, and the worker node must die before the last one ends: the
    # epochs after the first leave the kill below about ten seconds.
    epochs = 12
    entrypoint = _train_entrypoint(
        job_data,
        out,
        "run_name=node_loss",
        f"epochs={epochs}",
        "resources_per_worker={CPU: 3}",
        "max_failures=2",
        f"num_to_keep={epochs}",
    )
    _submit(cluster, "train-node-loss", entrypoint)
    deadline = time.monotonic() + JOB_TIMEOUT_S
    history: list[dict] = []
    while not history:  # until the first Ray Train checkpoint (epoch 1) is registered
        assert not client.get_job_status("train-node-loss").is_terminal(), _logs(cluster, "train-node-loss")
        assert time.monotonic() < deadline, _logs(cluster, "train-node-loss")
        try:
            history = _checkpoint_history(out, "node_loss")
        except (RuntimeError, ValueError):  # no snapshot yet, or caught mid-write
            time.sleep(0.2)
    client.stop_job("hold-head-cpus")
    killed = _stop(cluster.dir, "--node", "worker-1", "--kill")
    assert killed.returncode == 0, killed.stdout + killed.stderr

    assert _wait(cluster, "train-node-loss") == "SUCCEEDED", _logs(cluster, "train-node-loss")
    printed = _printed_result(client.get_job_logs("train-node-loss"))
    assert printed["output_dir"] == str(out)
    assert printed["metrics"]["epoch"] == epochs and printed["metrics"]["world_size"] == 2
    history = _checkpoint_history(out, "node_loss")
    assert [m["epoch"] for m in history] == list(range(1, epochs + 1))
    assert sorted(history[0]["worker_node_ids"]) == sorted([head, worker]), "before the loss: one worker per node"
    assert history[-1]["worker_node_ids"] == [head, head], "after the loss: both workers restarted on the head"
    assert all(n["state"] == "DEAD" for n in cluster.nodes() if n["node_id"] == worker)

    # The embedding job: a new worker node joins, the job's two model actors (spread one per node) write shards on
    # both nodes, the worker node is killed once the manifest shows a shard it wrote, and a rerun finishes the job.
    joined = subprocess.run(
        [str(START), "--dir", str(cluster.dir), "--join", "--workers", "1", "--worker-cpus", str(WORKER_CPUS)]
        + ["--timeout", "300", "--attempts", "5"],
        env=_base_env(),
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert joined.returncode == 0, f"start.sh --join failed:\n{joined.stdout}\n{joined.stderr}"
    second = cluster.node_id(head=False)
    checkpoint = out / f"checkpoint-epoch-{epochs}"
    predictor = VEmbedFactoryPredictor(str(checkpoint))
    images = sorted(Path(job_data["images"]).rglob("*.jpg"))
    corpus = tmp_path / "corpus"
    for copy in range(6):  # 6 copies in subdirectories (listed by a task each): 48 shards of 8
        (corpus / f"c{copy:02d}").mkdir(parents=True)
        for path in images:
            shutil.copy(path, corpus / f"c{copy:02d}" / path.name)
    ids = sorted(str(p.relative_to(corpus)) for p in corpus.rglob("*.jpg"))
    shards = -(-len(ids) // 8)
    embeddings = tmp_path / "embeddings"
    embed = ["python", "ray_jobs/embed.py", "--model", str(checkpoint), "--input", str(corpus)]
    embed += ["--output", str(embeddings), "--modality", "image", "--batch-size", "4", "--shard-size", "8"]
    embed += ["--num-actors", "2", "--max-decoders", "2"]
    _submit(cluster, "embed-images", embed)
    deadline = time.monotonic() + JOB_TIMEOUT_S
    seen: dict = {}
    while not seen.get("writer_nodes", {}).get(second):  # until the manifest records a shard the new node wrote
        assert not client.get_job_status("embed-images").is_terminal(), _logs(cluster, "embed-images")
        assert time.monotonic() < deadline, _logs(cluster, "embed-images")
        try:
            seen = json.loads((embeddings / "_manifest.json").read_text())["progress"]
        except (FileNotFoundError, KeyError):
            pass
        time.sleep(0.2)
    killed = _stop(cluster.dir, "--node", "worker-2", "--kill")
    assert killed.returncode == 0, killed.stdout + killed.stderr
    assert seen["shards_done"] < seen["shards_total"] == shards, "the node must die mid-job"
    first_run = _wait(cluster, "embed-images")  # Ray Data may carry on on the head, or the job fails: either way
    _submit(cluster, "embed-images-rerun", embed)
    assert _wait(cluster, "embed-images-rerun") == "SUCCEEDED", f"{first_run}: {_logs(cluster, 'embed-images-rerun')}"

    table = read_embeddings(str(embeddings))
    assert table.column("id").to_pylist() == ids, "every image exactly once, in shard order"
    nodes = writer_nodes(str(embeddings))
    assert len(nodes) == shards and set(nodes.values()) == {head, second}, "shards written on both nodes"
    by_id = dict(zip(table.column("id").to_pylist(), table.column("embedding").to_pylist(), strict=True))
    sample = ids[:: len(ids) // 24]
    expected = predictor.encode_image([str(corpus / i) for i in sample])
    np.testing.assert_allclose(np.array([by_id[i] for i in sample]), expected, atol=1e-5)
    runs = read_manifest(str(embeddings))["runs"]
    assert runs[-1]["shards_skipped"] + runs[-1]["shards_written"] == shards
