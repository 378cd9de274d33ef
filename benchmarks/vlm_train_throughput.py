"""Training throughput of the tiny Qwen3-VL against the tiny CLIP at the same batch, and the share of preprocessing.

One process, one data set (synthetic t2i shapes at 32 px), one global batch size, the same loss and optimizer; for
each model: ``--steps`` training steps (LoRA off, float32), each split into

    preprocessing  records -> model batch by vembed's collator (image decode, the VLM's chat-template rendering and
                   image-token expansion or CLIP's tokenising, the image processor), the work Ray Data tasks do
    step           forward, loss, backward, AdamW step

and timed after one warm-up step. Reports samples/s (preprocessing + step), the preprocessing share, and the ratio
VLM / CLIP. Both models are the session fixtures of the tests (a 2-layer 64-wide decoder with a 2-block vision tower
for the VLM; CLIP's tiny towers), so the ratio shows what the VLM's one-sequence format costs on equal footing, not
what a 2B model costs. The GPU part of issue 14 (bf16 LoRA + FSDP2 steps of a 2B-sized config) needs a GPU machine.

    python benchmarks/vlm_train_throughput.py [--steps 8] [--batch-size 16]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from vembed.data.collators import DefaultCollator  # noqa: E402
from vembed.losses.factory import LossFactory  # noqa: E402
from vembed.testing import make_shapes_dataset, make_tiny_clip, make_tiny_qwen3_vl  # noqa: E402
from vembed.training.model_builder import build_model, load_processor  # noqa: E402
from vembed.training.optimizer_builder import build_optimizer  # noqa: E402


def measure(model_dir: Path, records: list[dict], batch_size: int, steps: int) -> dict[str, float]:
    """Preprocessing and step seconds over ``steps`` batches after one warm-up step."""
    config = {"model_name": str(model_dir), "learning_rate": 1e-4, "temperature": 0.1}
    torch.manual_seed(0)
    model = build_model(config).train()
    criterion = LossFactory.create(config)
    optimizer = build_optimizer(model, config, extra_modules=[criterion])
    collate = DefaultCollator(load_processor(str(model_dir)), mode="train", retrieval_mode="t2i")
    prep = step = 0.0
    for index in range(steps + 1):
        chunk = records[(index * batch_size) % len(records) :][:batch_size]
        start = time.perf_counter()
        batch = collate(chunk)
        middle = time.perf_counter()
        loss = criterion(model(**batch), batch)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        end = time.perf_counter()
        if index:  # the first step warms up allocators and lazy imports
            prep, step = prep + middle - start, step + end - middle
    return {
        "samples_per_s": steps * batch_size / (prep + step),
        "preprocessing_share": prep / (prep + step),
        "preprocessing_s": prep,
        "step_s": step,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=16)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        data = make_shapes_dataset(root / "data", num_train=args.batch_size * 4, num_val=0, num_test=0)
        records = [json.loads(line) for line in data["train"].read_text().splitlines()]
        results = {
            "clip": measure(make_tiny_clip(root / "clip"), records, args.batch_size, args.steps),
            "qwen3_vl": measure(make_tiny_qwen3_vl(root / "qwen3_vl"), records, args.batch_size, args.steps),
        }
    for name, r in results.items():
        print(
            f"{name:9s} {r['samples_per_s']:8.1f} samples/s  preprocessing {100 * r['preprocessing_share']:5.1f} % "
            f"({r['preprocessing_s']:.2f} s prep, {r['step_s']:.2f} s steps)"
        )
    ratio = results["qwen3_vl"]["samples_per_s"] / results["clip"]["samples_per_s"]
    print(f"VLM / CLIP samples/s: {ratio:.2f}x at batch {args.batch_size}, {args.steps} steps")


if __name__ == "__main__":
    main()
