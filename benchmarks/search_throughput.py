"""Exact top-k search throughput: vembed's chunked ``search_topk`` vs a naive full-matrix numpy search.

Cases (each in its own subprocess, so every peak RSS is that case's own high-water mark):

- ``vembed``  at ``--queries`` x ``--n`` (default 10k queries against 100k candidates, dim 256): queries/s
  and peak RSS, extrapolated to ``--n`` x ``--n`` (the per-query cost does not depend on how many queries
  run, so the full 100k x 100k time is ``n / (queries/s)``; pass ``--queries 100000`` to time all of it).
- ``vembed`` and ``naive`` at ``--naive-n`` x ``--naive-n`` (10k x 10k): the ratio at equal size. Naive is
  ``np.dot`` of the full matrix, ``np.argpartition`` for the top k, then ``np.argsort`` of those k.

Both sides use ``--threads`` threads (torch and the BLAS behind numpy), float32, unit-norm random
vectors, k = 10. The two 10k x 10k results are compared: rows may differ only where two scores are
equal to float rounding (numpy's and torch's BLAS round differently), so the count of such rows is printed.

    .venv/bin/python benchmarks/search_throughput.py            # a couple of minutes on 2 cores
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time


def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def _data(rows: int, dim: int, seed: int):
    import numpy as np

    x = np.random.default_rng(seed).standard_normal((rows, dim), dtype=np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x


def _naive_topk(queries, cands, k: int):
    import numpy as np

    scores = np.dot(queries, cands.T)
    top = np.argpartition(-scores, k - 1, axis=1)[:, :k]
    top_scores = np.take_along_axis(scores, top, axis=1)
    order = np.argsort(-top_scores, axis=1, kind="stable")
    return np.take_along_axis(top, order, axis=1)


def run_case(args: argparse.Namespace) -> dict:
    """Time one case in this process and return its measurements (called in the child process)."""
    queries = _data(args.num_queries, args.dim, seed=1)
    cands = _data(args.num_candidates, args.dim, seed=2)
    if args.case == "vembed":
        import torch

        from vembed.evaluation.search import search_topk

        torch.set_num_threads(args.threads)
        search_topk(queries[:256], cands[: min(len(cands), 8192)], args.k, chunk_size=args.chunk_size)  # warm-up

        def search():
            return search_topk(queries, cands, args.k, chunk_size=args.chunk_size)[1].numpy()
    else:

        def search():
            return _naive_topk(queries, cands, args.k)

    rss_before = _rss_mib()
    indices = None
    times = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        indices = search()
        times.append(time.perf_counter() - start)
    if args.save:
        import numpy as np

        np.save(args.save, np.asarray(indices, dtype=np.int64))
    return {
        "case": args.case,
        "queries": args.num_queries,
        "candidates": args.num_candidates,
        "seconds": min(times),
        "qps": args.num_queries / min(times),
        "rss_before_mib": rss_before,
        "peak_rss_mib": _peak_rss_mib(),
    }


def _spawn(
    args: argparse.Namespace, case: str, num_queries: int, num_candidates: int, repeats: int, save: str = ""
) -> dict:
    threads = str(args.threads)
    env = dict(os.environ, OMP_NUM_THREADS=threads, OPENBLAS_NUM_THREADS=threads, MKL_NUM_THREADS=threads)
    cmd = [
        sys.executable,
        __file__,
        "--case",
        case,
        "--num-queries",
        str(num_queries),
        "--num-candidates",
        str(num_candidates),
        "--repeats",
        str(repeats),
        "--dim",
        str(args.dim),
        "--k",
        str(args.k),
        "--chunk-size",
        str(args.chunk_size),
        "--threads",
        threads,
        "--save",
        save,
    ]
    out = subprocess.run(cmd, env=env, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=100_000, help="candidates (and total queries) of the large case")
    parser.add_argument("--queries", type=int, default=10_000, help="queries timed in the large case")
    parser.add_argument("--naive-n", type=int, default=10_000, help="queries = candidates of the equal-size case")
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--chunk-size", type=int, default=4096)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3, help="alternating runs of the equal-size cases (best kept)")
    # internal: run one case in this process and print its JSON
    parser.add_argument("--case", choices=["vembed", "naive"], help=argparse.SUPPRESS)
    parser.add_argument("--num-queries", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--num-candidates", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--save", default="", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.case:
        print(json.dumps(run_case(args)))
        return

    import numpy as np

    large = _spawn(args, "vembed", args.queries, args.n, repeats=1)
    with tempfile.TemporaryDirectory() as tmp:
        # Alternate the two equal-size cases and keep each one's best run: load on a shared machine hits both alike.
        runs: dict[str, list[dict]] = {"vembed": [], "naive": []}
        for _ in range(args.repeats):
            for case in runs:
                runs[case].append(_spawn(args, case, args.naive_n, args.naive_n, 1, save=f"{tmp}/{case}.npy"))
        ours, naive = (min(runs[case], key=lambda r: r["seconds"]) for case in ("vembed", "naive"))
        differ_order = (np.load(f"{tmp}/vembed.npy") != np.load(f"{tmp}/naive.npy")).any(axis=1).sum()
        differ_set = sum(
            set(a) != set(b) for a, b in zip(np.load(f"{tmp}/vembed.npy"), np.load(f"{tmp}/naive.npy"), strict=True)
        )

    def size(r: dict) -> str:
        return f"{r['queries']:,} x {r['candidates']:,}"

    print(f"exact top-{args.k} search, dim {args.dim}, float32, {args.threads} threads, chunk {args.chunk_size}\n")
    print("| case | size | time (s) | queries/s | RSS before search (MiB) | peak RSS (MiB) |")
    print("|---|---|---:|---:|---:|---:|")
    for name, r in (("vembed search_topk", large), ("vembed search_topk", ours), ("naive numpy full matrix", naive)):
        print(
            f"| {name} | {size(r)} | {r['seconds']:.2f} | {r['qps']:,.0f} | {r['rss_before_mib']:,.0f} | "
            f"{r['peak_rss_mib']:,.0f} |"
        )
    full_time = args.n / large["qps"]
    timed = "timed" if args.queries == args.n else f"extrapolated from {args.queries:,} queries"
    print(f"\n{args.n:,} x {args.n:,}: {full_time:.0f} s ({timed}), peak RSS {large['peak_rss_mib']:,.0f} MiB")
    print(f"ratio at {size(ours)} (vembed / naive queries/s): {ours['qps'] / naive['qps']:.2f}")
    print(
        f"top-{args.k} rows that differ from naive at {size(ours)}: {differ_order} in order, {differ_set} as sets "
        f"(expected only where two scores tie to float rounding)"
    )


if __name__ == "__main__":
    main()
