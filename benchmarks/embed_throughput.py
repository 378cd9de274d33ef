"""Batch embedding: a plain loop vs the Ray Data job vs the old driver-written path (images/s); driver and job cost.

    .venv/bin/python benchmarks/embed_throughput.py                                  # 2,000 images; 2k vs 20k
    .venv/bin/python benchmarks/embed_throughput.py --images 500 --memory-images 500 5000   # a quick look

Data: 224 px JPEGs of the synthetic shapes set (:func:`vembed.testing.make_shapes_dataset`), written once under
``--work`` and reused; each size is a manifest listing the first N of them.

Model: a small ViT from a ``ViTConfig`` (random init, nothing downloaded): hidden 64, 4 layers, 16 px patches on
224 px images (197 tokens), with ``ViTImageProcessorPil`` resizing and normalising.

(a) the plain loop: ``VEmbedFactoryPredictor.encode_image(paths, batch_size=64)`` in this process -- PIL decode,
    preprocess and model one after the other, torch using every core.
(b) the job: ``embed_corpus(..., batch_size=64)`` with its default pools on a local Ray using every CPU; Ray is
    started before timing (a cluster is up before jobs arrive). Reported end to end (actor start-up, imports and
    model loading included: a fixed cost per job) and after start-up (the job's ``steady_rows_per_s``).
(c) the old write path (before #19), reproduced here only: the same listing, blocks, pools, decoder and model
    actors as (b), but the vectors come back to the driver in corpus order and the driver writes the shards.
The three alternate ``--repeats`` times so all see the same background load ((b) and (c) swap places every other
round: neither always runs on a warmer machine); the table shows medians. The script
also times decode + preprocess and the model alone (one thread) per image: overlapping them gains most when the
two cost about the same, and nothing when one dominates.

Memory: each size runs in a fresh subprocess (its own Ray). A sampler adds up the proportional set size (PSS) of
that process and all its descendants -- driver, raylet, GCS, decode and model workers, with Ray's shared-memory
object store pages split among the processes that map them -- every 0.2 s; the figure is the peak. Only ratios
are meaningful on a shared CPU machine.

Driver: a text job (tiny BERT, 2 model actors, short texts) at two sizes, each in a fresh subprocess: the driver
process's own peak RSS and CPU seconds over ``embed_corpus`` (importing torch/transformers included), and the CPU
seconds of the coordinator task that executes the Ray Data pipeline outside the driver (the job's
``coordinator_cpu_s``).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

BATCH = 64
SHARD_SIZE = 4096  # embed_corpus's default
IMAGE_SIZE = 224
OBJECT_STORE_BYTES = 1 << 30  # fixed, so both memory runs have the same Ray Data budget


def make_model(path: Path) -> Path:
    """A small ViT (hidden 64, 4 layers, 16 px patches, 224 px) saved as an HF directory."""
    import torch
    from transformers import ViTConfig, ViTImageProcessorPil, ViTModel

    if (path / "config.json").exists():
        return path
    torch.manual_seed(0)
    config = ViTConfig(
        hidden_size=64,
        intermediate_size=256,
        num_hidden_layers=4,
        num_attention_heads=2,
        image_size=IMAGE_SIZE,
        patch_size=16,
    )
    ViTModel(config).save_pretrained(path)
    ViTImageProcessorPil(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}).save_pretrained(path)
    return path


def make_images(work: Path, count: int) -> list[str]:
    """At least ``count`` 224 px JPEGs under ``work/images`` (generated once, in chunks), sorted."""
    from vembed.testing import make_shapes_dataset

    have = sorted(work.glob("chunk-*/images/*.jpg"))
    chunk = len(list(work.glob("chunk-*")))
    while len(have) < count:
        make_shapes_dataset(
            work / f"chunk-{chunk:03d}", num_train=2000, num_val=0, num_test=0, image_size=IMAGE_SIZE, seed=chunk
        )
        chunk += 1
        have = sorted(work.glob("chunk-*/images/*.jpg"))
    return [str(p) for p in have[:count]]


def write_manifest(work: Path, paths: list[str]) -> Path:
    manifest = work / f"manifest-{len(paths)}.jsonl"
    manifest.write_text("".join(json.dumps({"id": f"img-{i:07d}", "path": p}) + "\n" for i, p in enumerate(paths)))
    return manifest


def stage_costs(model: Path, paths: list[str]) -> dict[str, float]:
    """ms per image of decode + preprocess, and of the model on one thread, on one batch."""
    import torch

    from vembed.data.images import load_image
    from vembed.inference import VEmbedFactoryPredictor

    predictor = VEmbedFactoryPredictor(str(model), device="cpu")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        start = time.perf_counter()
        pixels = predictor.preprocessor.process_images([load_image(p) for p in paths[:BATCH]])
        decode = time.perf_counter() - start
        predictor.encode_pixel_values(pixels[:8])
        start = time.perf_counter()
        predictor.encode_pixel_values(pixels)
        infer = time.perf_counter() - start
    finally:
        torch.set_num_threads(threads)
    return {"decode_ms": 1000 * decode / BATCH, "model_ms": 1000 * infer / BATCH}


def plain_loop(model: Path, paths: list[str]) -> float:
    """Images/s of the Predictor encoding every path in batches of 64 (model load not timed)."""
    from vembed.inference import VEmbedFactoryPredictor

    predictor = VEmbedFactoryPredictor(str(model), device="cpu")
    start = time.perf_counter()
    predictor.encode_image(paths, batch_size=BATCH)
    return len(paths) / (time.perf_counter() - start)


def ray_job(model: Path, manifest: Path, output: Path, count: int, actors: int | None) -> dict[str, float]:
    """Images/s of ``embed_corpus`` over the manifest: end to end (actor start-up and model loading included), and
    after the first rows came back (the job's ``steady_rows_per_s``). ``actors``: model actors (None: default)."""
    from vembed.batch import embed_corpus

    start = time.perf_counter()
    summary = embed_corpus(
        str(model),
        str(manifest),
        str(output),
        batch_size=BATCH,
        shard_size=SHARD_SIZE,
        num_actors=actors,
        overwrite=True,
    )
    seconds = time.perf_counter() - start
    if summary["embedded"] != count:
        raise RuntimeError(f"the job embedded {summary['embedded']} of {count} images: {summary}")
    return {"end_to_end": count / seconds, "steady": summary["steady_rows_per_s"], "startup_s": summary["startup_s"]}


def old_driver_path(model: Path, manifest: Path, output: Path, count: int, actors: int | None) -> dict[str, float]:
    """The write path before #19 (vembed 37ab901, benchmark-only reproduction): the same listing, input blocks,
    pools, :class:`Decoder` and :class:`Embedder` as the job, but the vectors come back to the driver in corpus order
    (``preserve_order``, ``iter_batches``) and the driver assembles and writes each shard itself, atomically, the
    moment its last row arrives. Images/s end to end and after the first rows came back, as for :func:`ray_job`."""
    import shutil

    import numpy as np
    import ray

    from vembed.batch.job import block_rows, pending_blocks, resolve_actor_pool
    from vembed.batch.pipeline import ACTOR_CPUS, WAIT_FOR_ACTORS_S, Decoder, Embedder, min_decoders, pools_fit
    from vembed.batch.shards import plan_shards
    from vembed.batch.sources import list_corpus
    from vembed.batch.writer import EMBEDDINGS_DIR, ERRORS_DIR, OutputStore, embeddings_table, errors_table

    start = time.perf_counter()
    shutil.rmtree(output, ignore_errors=True)
    for folder in (EMBEDDINGS_DIR, ERRORS_DIR):
        (output / folder).mkdir(parents=True)
    listing = list_corpus(str(manifest), "image", None, None, None)
    shards = plan_shards(len(listing), SHARD_SIZE)
    cluster = ray.cluster_resources()
    pool = resolve_actor_pool(actors, None, None, None, None, cluster)
    rows_per_block = block_rows(len(listing), BATCH, SHARD_SIZE, pool.max_size + pool.max_decoders)
    dataset = ray.data.from_arrow_refs(pending_blocks(listing, set(), SHARD_SIZE, rows_per_block))
    dataset = dataset.map_batches(
        Decoder,
        fn_constructor_kwargs={"model_path": str(model)},
        compute=ray.data.ActorPoolStrategy(min_size=min_decoders(pool), max_size=pool.max_decoders),
        batch_size=BATCH,
        batch_format="numpy",
        num_cpus=ACTOR_CPUS,
    )
    dataset = dataset.map_batches(
        Embedder,
        fn_constructor_kwargs={
            "model_path": str(model),
            "modality": "image",
            "dtype": "float32",
            "dim": None,
            "use_gpu": pool.num_gpus > 0,
        },
        compute=ray.data.ActorPoolStrategy(min_size=pool.min_size, max_size=pool.max_size),
        batch_size=BATCH,
        batch_format="numpy",
        num_cpus=ACTOR_CPUS,
        num_gpus=pool.num_gpus,
    )
    dataset.context.execution_options.preserve_order = True  # rows reach the driver in corpus order
    if pools_fit(pool, "image", cluster):
        dataset.context.wait_for_min_actors_s = WAIT_FOR_ACTORS_S
    store = OutputStore(str(output))
    parts: list[dict[str, np.ndarray]] = []
    held = received = written = 0
    first: tuple[float, int] | None = None
    for batch in dataset.iter_batches(batch_size=None, batch_format="numpy"):
        received += len(batch["position"])
        first = first or (time.perf_counter(), received)
        parts.append(batch)
        held += len(batch["position"])
        while written < len(shards) and held >= len(shards[written]):
            shard = shards[written]
            rows = {key: np.concatenate([part[key] for part in parts]) for key in parts[0]}
            take = len(shard)
            if not np.array_equal(rows["position"][:take], np.arange(shard.start, shard.stop)):
                raise RuntimeError(f"shard {shard.index}: rows out of order")
            bad = rows["error"][:take] != ""
            ids, sources, vectors = rows["id"][:take], rows["source"][:take], rows["embedding"][:take]
            store.write_shard(
                shard,
                embeddings_table(ids[~bad], sources[~bad], vectors[~bad], "float32"),
                errors_table(ids[bad], sources[bad], rows["error"][:take][bad]),
            )
            parts = [{key: column[take:] for key, column in rows.items()}]
            held -= take
            written += 1
    seconds = time.perf_counter() - start
    if written != len(shards) or received != count:
        raise RuntimeError(f"the old path wrote {written} of {len(shards)} shards, {received} of {count} rows")
    after = time.perf_counter() - first[0]
    return {"end_to_end": count / seconds, "steady": (received - first[1]) / after, "startup_s": first[0] - start}


def _tree_pss(pid: int) -> int:
    import psutil

    total = 0
    root = psutil.Process(pid)
    for proc in [root, *root.children(recursive=True)]:
        try:
            total += proc.memory_full_info().pss
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    return total


def _init_ray() -> None:
    """The local Ray every measuring process starts: all cores, a fixed object store, quiet."""
    import ray

    ray.init(
        num_cpus=os.cpu_count(),
        object_store_memory=OBJECT_STORE_BYTES,
        include_dashboard=False,
        configure_logging=False,
        log_to_driver=False,
    )


def memory_run(model: Path, manifest: Path, output: Path) -> dict[str, float]:
    """In a fresh process: start Ray, run the job, and return its peak tree PSS (MiB) while sampling."""
    import ray

    _init_ray()
    peak = [0]
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], _tree_pss(os.getpid()))
            done.wait(0.2)

    sampler = threading.Thread(target=sample, daemon=True)
    idle = _tree_pss(os.getpid())
    sampler.start()
    start = time.perf_counter()
    summary = _run_job(model, manifest, output)
    seconds = time.perf_counter() - start
    done.set()
    sampler.join()
    ray.shutdown()
    return {"peak_mib": peak[0] / 2**20, "idle_mib": idle / 2**20, "seconds": seconds, "rows": summary["embedded"]}


def _run_job(model: Path, manifest: Path, output: Path) -> dict:
    from vembed.batch import embed_corpus

    return embed_corpus(str(model), str(manifest), str(output), batch_size=BATCH, overwrite=True)


def measure_memory(model: Path, manifest: Path, output: Path) -> dict[str, float]:
    command = [sys.executable, __file__, "--_memory-run", str(model), str(manifest), str(output)]
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"memory run failed:\n{result.stderr[-4000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def driver_run(model: Path, manifest: Path, output: Path) -> dict[str, float]:
    """In a fresh process: start Ray, run a text job with 2 model actors, and return the driver's own cost: peak
    RSS (MiB, sampled every 0.05 s) and CPU seconds (user + system of this process only) over the job, and the
    coordinator task's CPU seconds."""
    import psutil
    import ray

    from vembed.batch import embed_corpus

    _init_ray()
    me = psutil.Process()
    idle = me.memory_info().rss
    peak = [idle]
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], me.memory_info().rss)
            done.wait(0.05)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    cpu = me.cpu_times()
    start = time.perf_counter()
    summary = embed_corpus(
        str(model), str(manifest), str(output), modality="text", batch_size=BATCH, num_actors=2, overwrite=True
    )
    seconds = time.perf_counter() - start
    used = me.cpu_times()
    done.set()
    sampler.join()
    ray.shutdown()
    return {
        "peak_mib": peak[0] / 2**20,
        "idle_mib": idle / 2**20,
        "cpu_s": (used.user - cpu.user) + (used.system - cpu.system),
        "coordinator_cpu_s": summary["coordinator_cpu_s"],
        "seconds": seconds,
        "rows": summary["embedded"],
    }


def measure_driver(work: Path, count: int) -> dict[str, float]:
    """:func:`driver_run` over ``count`` short texts (``item N: a red square``) with a tiny BERT, in a subprocess."""
    from vembed.testing import make_tiny_bert

    model = work / "bert"
    if not (model / "config.json").exists():
        make_tiny_bert(model)
    manifest = work / f"texts-{count}.jsonl"
    if not manifest.exists():
        manifest.write_text(
            "".join(json.dumps({"id": f"t{i:08d}", "text": f"item {i}: a red square"}) + "\n" for i in range(count))
        )
    command = [sys.executable, __file__, "--_driver-run", str(model), str(manifest), str(work / f"out-text-{count}")]
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"driver run failed:\n{result.stderr[-4000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=2000, help="images for the throughput comparison")
    parser.add_argument("--memory-images", type=int, nargs=2, default=[2000, 20000], help="small and large corpus")
    parser.add_argument("--repeats", type=int, default=2, help="alternating rounds of (a) and (b)")
    parser.add_argument("--work", type=Path, default=Path("/tmp/vembed-embed-bench"), help="data and output folder")
    parser.add_argument("--actors", type=int, default=2, help="model actors of the throughput job (0: default)")
    parser.add_argument("--skip-memory", action="store_true")
    parser.add_argument(
        "--driver-items", type=int, nargs=2, default=[20000, 200000], help="small and large text corpus (driver cost)"
    )
    parser.add_argument("--skip-driver", action="store_true")
    parser.add_argument("--_memory-run", nargs=3, help=argparse.SUPPRESS)
    parser.add_argument("--_driver-run", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # keep Ray on 127.0.0.1
    if args._memory_run:
        model, manifest, output = (Path(p) for p in args._memory_run)
        print(json.dumps(memory_run(model, manifest, output)))
        return
    if args._driver_run:
        model, manifest, output = (Path(p) for p in args._driver_run)
        print(json.dumps(driver_run(model, manifest, output)))
        return

    args.work.mkdir(parents=True, exist_ok=True)
    model = make_model(args.work / "vit")
    largest = max(args.images, *args.memory_images)
    paths = make_images(args.work, largest)
    manifest = write_manifest(args.work, paths[: args.images])
    costs = stage_costs(model, paths)
    load_before = os.getloadavg()[0]  # other work on the machine skews (a) vs (b): read ratios with it in mind

    import ray

    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, configure_logging=False, log_to_driver=False)
    plain, job, old = [], [], []
    actors = args.actors or None
    for round_ in range(args.repeats):
        plain.append(plain_loop(model, paths[: args.images]))
        cases = [
            lambda: job.append(ray_job(model, manifest, args.work / "out-throughput", args.images, actors)),
            lambda: old.append(old_driver_path(model, manifest, args.work / "out-old-path", args.images, actors)),
        ]
        for case in cases if round_ % 2 == 0 else cases[::-1]:  # (b) then (c), then (c) then (b)
            case()
    ray.shutdown()

    plain_rate = statistics.median(plain)
    job_rate, steady_rate = (statistics.median(run[key] for run in job) for key in ("end_to_end", "steady"))
    old_rate, old_steady = (statistics.median(run[key] for run in old) for key in ("end_to_end", "steady"))
    paired = statistics.median(b["steady"] / c["steady"] for b, c in zip(job, old, strict=True))  # same load
    print_table(
        [
            (
                "CPU cores; 1-min load average before / after",
                f"{os.cpu_count()}; {load_before:.1f} / {os.getloadavg()[0]:.1f}",
            ),
            ("decode + preprocess, 1 thread (ms/image)", f"{costs['decode_ms']:.2f}"),
            ("small ViT forward, 1 thread (ms/image)", f"{costs['model_ms']:.2f}"),
            (f"(a) plain loop, {args.images} images (images/s)", f"{plain_rate:.1f}"),
            (f"(b) Ray Data job, {args.actors or 'default'} model actors, end to end (images/s)", f"{job_rate:.1f}"),
            ("(b) after start-up (images/s)", f"{steady_rate:.1f}"),
            ("(b) start-up: actors, imports, model load (s)", f"{statistics.median(r['startup_s'] for r in job):.1f}"),
            ("(b) / (a) end to end  [goal >= 1.2]", f"{job_rate / plain_rate:.2f}"),
            ("(b) / (a) after start-up", f"{steady_rate / plain_rate:.2f}"),
            ("(c) old path: the driver writes the shards, end to end (images/s)", f"{old_rate:.1f}"),
            ("(c) after start-up (images/s)", f"{old_steady:.1f}"),
            ("(b) / (c) after start-up  [goal >= 1]", f"{steady_rate / old_steady:.2f}"),
            ("(b) / (c) after start-up, median of the rounds' ratios (paired)", f"{paired:.2f}"),
            ("(b) / (c) end to end", f"{job_rate / old_rate:.2f}"),
            (
                "rounds (a) | (b) | (c) end to end",
                f"{[round(v, 1) for v in plain]} | {[round(r['end_to_end'], 1) for r in job]} | "
                f"{[round(r['end_to_end'], 1) for r in old]}",
            ),
            (
                "rounds (b) | (c) after start-up",
                f"{[round(r['steady'], 1) for r in job]} | {[round(r['steady'], 1) for r in old]}",
            ),
        ]
    )
    if not args.skip_driver:
        small, large = args.driver_items
        drv = {n: measure_driver(args.work, n) for n in (small, large)}
        print_table(
            [
                (f"driver peak RSS, {small} texts (MiB)", f"{drv[small]['peak_mib']:.0f}"),
                (f"driver peak RSS, {large} texts (MiB)", f"{drv[large]['peak_mib']:.0f}"),
                (f"peak {large} / {small}  [goal <= 1.2]", f"{drv[large]['peak_mib'] / drv[small]['peak_mib']:.2f}"),
                ("driver RSS before the job (MiB)", f"{drv[small]['idle_mib']:.0f} / {drv[large]['idle_mib']:.0f}"),
                (f"driver CPU s, {small} / {large} texts", f"{drv[small]['cpu_s']:.1f} / {drv[large]['cpu_s']:.1f}"),
                (f"CPU {large} / {small}  [goal <= 1.2]", f"{drv[large]['cpu_s'] / drv[small]['cpu_s']:.2f}"),
                (
                    f"coordinator task's CPU s (Ray Data's executor, not in the driver), {small} / {large}",
                    f"{drv[small]['coordinator_cpu_s']:.1f} / {drv[large]['coordinator_cpu_s']:.1f}",
                ),
                (
                    f"job texts/s at {small} / {large}",
                    f"{small / drv[small]['seconds']:.0f} / {large / drv[large]['seconds']:.0f}",
                ),
            ]
        )
    if args.skip_memory:
        return
    small, large = args.memory_images
    mem = {
        n: measure_memory(model, write_manifest(args.work, paths[:n]), args.work / f"out-{n}") for n in (small, large)
    }
    print_table(
        [
            (f"job peak memory, {small} images (MiB)", f"{mem[small]['peak_mib']:.0f}"),
            (f"job peak memory, {large} images (MiB)", f"{mem[large]['peak_mib']:.0f}"),
            (f"peak {large} / peak {small}  [goal <= 1.2]", f"{mem[large]['peak_mib'] / mem[small]['peak_mib']:.2f}"),
            ("Ray idle before the job (MiB)", f"{mem[small]['idle_mib']:.0f} / {mem[large]['idle_mib']:.0f}"),
            (
                f"job images/s at {small} / {large}",
                f"{small / mem[small]['seconds']:.1f} / {large / mem[large]['seconds']:.1f}",
            ),
        ]
    )


def print_table(rows: list[tuple[str, str]]) -> None:
    width = max(len(name) for name, _ in rows)
    print(f"\n{'measurement'.ljust(width)} | value\n{'-' * width}-|------", flush=True)
    for name, value in rows:
        print(f"{name.ljust(width)} | {value}", flush=True)


if __name__ == "__main__":
    main()
