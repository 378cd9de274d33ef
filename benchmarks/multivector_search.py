"""Multi-vector (ColBERT-style MaxSim) vs single-vector on the same corpus: storage per item and search speed.

The corpus: ``--docs`` documents (default 10k) of ``--min-tokens``..``--max-tokens`` token vectors each (uniform;
a 128-d projection, unit rows, as ``configs/train_colbert_t2t.yaml`` makes), and queries of ``--query-tokens``
vectors. The single-vector model on the same corpus keeps one vector per item: the normalised mean of its tokens.

Storage: bytes per item of the Parquet shards ``vembed embed`` writes (:func:`vembed.batch.writer.embeddings_table`,
float16 and float32, ids and sources excluded), plus the raw vector bytes.

Search: exact top-10 of every query over the whole corpus, with the evaluation's chunked searches
(:func:`vembed.evaluation.search.maxsim_topk` on the padded corpus + masks, :func:`~vembed.evaluation.search.search_topk`
for single vectors), both on ``--threads`` torch threads in this one process: queries/s and their ratio. Beside
them, the same MaxSim search with every block at the corpus-wide padded length (``_PaddedScorer``: candidates in
index order, no cut, as vembed scored before its length-sorted scan), run in turn with it ``--repeats`` times:
the padding-aware speed-up, best run of each.

    .venv/bin/python benchmarks/multivector_search.py          # about a minute on 2 cores
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _corpus(docs: int, lo: int, hi: int, dim: int, seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    lengths = rng.integers(lo, hi + 1, size=docs)
    return [_unit(rng.standard_normal((n, dim), dtype=np.float32)) for n in lengths]


def _parquet_bytes(table: pa.Table) -> int:
    sink = pa.BufferOutputStream()
    pq.write_table(table.select(["embedding", *(["num_vectors"] if "num_vectors" in table.column_names else [])]), sink)
    return sink.getvalue().size


def storage(items: list[np.ndarray], single: np.ndarray) -> list[tuple[str, float, float]]:
    from vembed.batch.writer import embeddings_table, pack_vectors

    n = len(items)
    ids = np.array([str(i) for i in range(n)], dtype=object)
    rows = []
    for fmt, width in (("float16", 2), ("float32", 4)):
        packed, counts = pack_vectors(items)
        multi = _parquet_bytes(embeddings_table(ids, ids, packed, fmt, counts)) / n
        one = _parquet_bytes(embeddings_table(ids, ids, single, fmt)) / n
        raw_multi = sum(x.size for x in items) * width / n
        rows.append((fmt, multi, one))
        rows.append((f"{fmt} raw vectors", raw_multi, single.shape[1] * width))
    return rows


def _padded_scorer(q: torch.Tensor, qm: torch.Tensor, docs: torch.Tensor, dm: torch.Tensor):
    """The baseline: MaxSim blocks in candidate index order, each at the corpus-wide padded length."""
    from vembed.evaluation.search import MaxSimScorer
    from vembed.maxsim import maxsim

    class _PaddedScorer(MaxSimScorer):
        def __init__(self, *args) -> None:
            super().__init__(*args)
            self.scan_order = None  # candidates in index order

        def block(self, q0: int, q1: int, c0: int, c1: int) -> torch.Tensor:
            return maxsim(self.queries[q0:q1], self.query_mask[q0:q1], self.candidates[c0:c1], self.cand_mask[c0:c1])

    return _PaddedScorer(q, qm, docs, dm)


def throughput(
    queries: list[np.ndarray],
    items: list[np.ndarray],
    single_q: np.ndarray,
    single: np.ndarray,
    n_multi: int,
    repeats: int,
) -> tuple[float, float, float, float]:
    """Queries/s of the padding-aware MaxSim search, of the padded baseline (same results) and of single-vector,
    plus the baseline's CPU seconds over the padding-aware search's (best run of each; CPU time of this process
    varies less with the machine's other load than wall time does)."""
    from vembed.evaluation.search import chunked_topk, maxsim_topk, search_topk
    from vembed.maxsim import pad_vectors

    q, qm = pad_vectors(queries[:n_multi])
    docs, dm = pad_vectors(items)
    best = {"aware": 0.0, "padded": 0.0}
    cpu = {"aware": float("inf"), "padded": float("inf")}
    for _ in range(repeats):
        found = {}
        for name, search in (
            ("aware", lambda: maxsim_topk(q, qm, docs, dm, k=10)),
            ("padded", lambda: chunked_topk(_padded_scorer(q, qm, docs, dm), k=10, chunk_size=64)),
        ):
            start, start_cpu = time.perf_counter(), time.process_time()
            found[name] = search()
            cpu[name] = min(cpu[name], time.process_time() - start_cpu)
            best[name] = max(best[name], n_multi / (time.perf_counter() - start))
        assert torch.equal(found["aware"][1], found["padded"][1]), "the two MaxSim searches must find the same"
    start = time.perf_counter()
    search_topk(torch.from_numpy(single_q), torch.from_numpy(single), k=10)
    single_qps = len(single_q) / (time.perf_counter() - start)
    return best["aware"], best["padded"], single_qps, cpu["padded"] / cpu["aware"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--docs", type=int, default=10_000)
    parser.add_argument("--min-tokens", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=96)
    parser.add_argument("--query-tokens", type=int, default=32)
    parser.add_argument("--queries", type=int, default=1000, help="single-vector queries timed")
    parser.add_argument("--multi-queries", type=int, default=64, help="multi-vector queries timed")
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2, help="alternating runs of the two MaxSim searches")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    items = _corpus(args.docs, args.min_tokens, args.max_tokens, args.dim, seed=1)
    queries = _corpus(args.queries, args.query_tokens, args.query_tokens, args.dim, seed=2)
    single = _unit(np.stack([x.mean(0) for x in items])).astype(np.float32)
    single_q = _unit(np.stack([x.mean(0) for x in queries])).astype(np.float32)
    mean_tokens = float(np.mean([len(x) for x in items]))

    print(f"corpus: {args.docs} documents, {mean_tokens:.1f} vectors each on average, dim {args.dim}")
    print("\n| storage per item | multi-vector | single-vector | ratio |\n|---|---|---|---|")
    for name, multi, one in storage(items, single):
        print(f"| {name} | {multi:,.0f} B | {one:,.0f} B | {multi / one:.1f}x |")

    multi_qps, padded_qps, single_qps, cpu_ratio = throughput(
        queries, items, single_q, single, args.multi_queries, args.repeats
    )
    print(f"\n| exact top-10 over {args.docs} documents ({args.threads} threads) | queries/s |\n|---|---|")
    print(f"| MaxSim, {args.query_tokens}-vector queries ({args.multi_queries} timed) | {multi_qps:.2f} |")
    print(f"| MaxSim, every document padded to the longest (baseline) | {padded_qps:.2f} |")
    print(f"| padding-aware speed-up: wall / CPU time | {multi_qps / padded_qps:.2f}x / {cpu_ratio:.2f}x |")
    print(f"| single-vector dot product ({args.queries} timed) | {single_qps:.1f} |")
    ratio = multi_qps / single_qps
    print(f"| ratio multi / single | {ratio:.2e} (1/{1 / ratio:,.0f}) |")


if __name__ == "__main__":
    main()
