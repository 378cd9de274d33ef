"""Ray Serve's throughput-optimised mode (``RAY_SERVE_THROUGHPUT_OPTIMIZED=1``) against the default, side by side.

The mode is read when Serve's processes start, so each side is its own local Ray (127.0.0.1 only) in a child
process: one with the variable ``0``, one with ``1``, both up at once. Each serves the vembed app on a tiny CLIP
(``max_batch_size=32``, 10 ms batch wait, one replica with one CPU) and a model-free app (HTTP + proxy + replica
alone). Real HTTP from this process: ``--clients`` concurrent closed-loop clients, one-text ``/v1/embeddings``
requests. The two sides run in interleaved rounds, one at a time, so drifting load on a shared machine hits both
alike. Each child also lists the TCP ports its Ray processes listen on that are not on 127.0.0.1 (the mode starts
an HTTP server in every replica: it must stay on Serve's ``http_options.host``).

In this Ray version the mode turns on direct ingress (the ingress replica serves HTTP itself), gRPC between proxy
and replicas, user code and router on the replica's main event loop, a buffered request-path log, no log copy to
stderr and a frozen garbage collector after start-up (``ray/serve/_private/constants.py``).

    .venv/bin/python benchmarks/serve_throughput.py                      # 4 rounds x 400 requests per case
    .venv/bin/python benchmarks/serve_throughput.py --requests 800 --rounds 6 --clients 32
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serve_load import Result, free_port, load, make_texts, noop_app  # noqa: E402

MODES = {"default": "0", "throughput-optimised": "1"}
ENV = "RAY_SERVE_THROUGHPUT_OPTIMIZED"


def child(model: str, mode: str) -> int:
    """One side: a local Ray with ``ENV=mode``, Serve on 127.0.0.1, the vembed app and the model-free app."""
    os.environ[ENV] = mode
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from vembed.serving.overload import CALLBACK, CALLBACK_ENV

    os.environ.setdefault(CALLBACK_ENV, CALLBACK)
    import psutil
    import ray
    from ray import serve

    from vembed.serving.app import embedding_app
    from vembed.serving.settings import DeploymentSettings

    for attempt in (1, 2):  # a heavily loaded machine can miss Ray's node start-up deadline once
        try:
            ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
            break
        except Exception:
            ray.shutdown()
            if attempt == 2:
                raise
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    settings = {"model": model, "model_name": "bench", "api_key_env": None, "max_batch_size": 32, "batch_wait_ms": 10}
    deployment = DeploymentSettings.from_flat({"num_replicas": 1, "num_cpus": 1, "max_ongoing_requests": 128})
    serve.run(embedding_app(settings, deployment), name="vembed", route_prefix="/vembed")
    serve.run(noop_app(), name="noop", route_prefix="/noop")
    pids = {p.pid for p in psutil.Process().children(recursive=True)} | {os.getpid()}
    loopback = ("127.0.0.1", "::1", "::ffff:127.0.0.1")
    names = {pid: psutil.Process(pid).name() for pid in pids if psutil.pid_exists(pid)}
    listening = sorted(
        {
            f"[{c.laddr.ip}]:{c.laddr.port} ({names.get(c.pid, c.pid)})"
            for c in psutil.net_connections(kind="tcp")
            if c.status == psutil.CONN_LISTEN and c.pid in pids and c.laddr.ip not in loopback
        }
    )
    print(json.dumps({"base": f"http://127.0.0.1:{port}", "not_loopback": listening}), flush=True)
    sys.stdin.read()  # serve until the parent closes our stdin
    serve.shutdown()
    ray.shutdown()
    return 0


def start_children(model: str) -> tuple[dict[str, subprocess.Popen], dict[str, dict]]:
    procs = {
        name: subprocess.Popen(
            [sys.executable, __file__, "--child", mode, "--model", model],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        for name, mode in MODES.items()
    }
    info = {}
    for name, proc in procs.items():
        for line in proc.stdout:  # the first line that is our JSON (Ray may print before it)
            if line.startswith('{"base"'):
                info[name] = json.loads(line)
                break
        else:
            raise SystemExit(f"the {name} side did not start (exit code {proc.wait()})")
    return procs, info


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--child", choices=sorted(MODES.values()), help=argparse.SUPPRESS)
    parser.add_argument("--model", default=None, help="model directory (default: a tiny CLIP built on the fly)")
    parser.add_argument("--requests", type=int, default=400, help="requests per case and round")
    parser.add_argument("--rounds", type=int, default=4, help="interleaved rounds")
    parser.add_argument("--clients", type=int, default=32, help="concurrent clients")
    parser.add_argument("--max-seconds", type=float, default=60.0, help="time bound per case and round")
    args = parser.parse_args(argv)
    if args.child is not None:
        return child(args.model, args.child)

    if args.model is None:
        from vembed.testing import make_tiny_clip

        args.model = str(make_tiny_clip(Path(tempfile.mkdtemp()) / "clip"))
    load_before = os.getloadavg()
    started = time.perf_counter()
    procs, info = start_children(args.model)
    print(f"both sides up in {time.perf_counter() - started:.0f} s")
    results = {(name, app): Result(f"{name}, {app}") for name in MODES for app in ("vembed", "noop")}
    texts = make_texts(args.requests)
    try:
        for name in MODES:  # warm-up: first requests pay for connections and lazy imports
            for app in ("vembed", "noop"):
                asyncio_load(f"{info[name]['base']}/{app}/v1/embeddings", make_texts(2 * args.clients), args)
        for _ in range(args.rounds):
            for app in ("vembed", "noop"):
                for name in MODES:
                    items, seconds, latencies = asyncio_load(f"{info[name]['base']}/{app}/v1/embeddings", texts, args)
                    results[(name, app)].add(items, seconds, latencies, 0)
    finally:
        for proc in procs.values():
            proc.stdin.close()
        for proc in procs.values():
            proc.wait(timeout=120)
    load_after = os.getloadavg()

    print(f"\nmodel: {args.model}\n{args.clients} clients, {args.rounds} rounds x {args.requests} one-text requests per "
          f"case, {os.cpu_count()} CPUs; load average (1/5/15 min) before {load_before[0]:.1f}/{load_before[1]:.1f}/"
          f"{load_before[2]:.1f}, after {load_after[0]:.1f}/{load_after[1]:.1f}/{load_after[2]:.1f}\n")  # fmt: skip
    header = f"| {'case':<38} | {'requests/s':>10} | {'p50 ms':>7} | {'p99 ms':>7} | {'vs default':>10} |"
    print(header)
    print("|" + "|".join("-" * len(c) for c in header.split("|")[1:-1]) + "|")
    for (_, app), r in results.items():
        base = results[("default", app)].throughput
        print(
            f"| {r.name:<38} | {r.throughput:>10.1f} | {r.percentile(0.5):>7} | {r.percentile(0.99):>7} "
            f"| {r.throughput / base:>9.2f}x |"
        )
    for name in MODES:
        print(f"{name}: ports off 127.0.0.1: {info[name]['not_loopback'] or 'none'}")
    return 0


def asyncio_load(url: str, texts: list[str], args: argparse.Namespace) -> tuple[int, float, list[float]]:
    import asyncio

    return asyncio.run(load(url, texts, args.clients, args.max_seconds))


if __name__ == "__main__":
    sys.exit(main())
