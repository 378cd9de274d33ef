"""Training throughput of the tiny Qwen3-VL against the tiny CLIP at the same batch, and the share of preprocessing.

One process, one data set (synthetic t2i shapes at 32 px), one global batch size, the same loss and optimizer; for
each model: ``--steps`` training steps (LoRA off, float32), each split into

    preprocessing  records -> model batch by vembed's collator (image decode, the VLM's chat-template rendering and
                   image-token expansion or CLIP's tokenising, the image processor), the work Ray Data tasks do
    step           forward, loss, backward, AdamW step

and timed after one warm-up step; the two models alternate step by step so that both see the same load. Reports samples/s (preprocessing + step), the preprocessing share, and the ratio
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


class Case:
    """One model's training step on the shared records, timed as preprocessing + step."""

    def __init__(self, model_dir: Path) -> None:
        config = {"model_name": str(model_dir), "learning_rate": 1e-4, "temperature": 0.1}
        torch.manual_seed(0)
        self.model = build_model(config).train()
        self.criterion = LossFactory.create(config)
        self.optimizer = build_optimizer(self.model, config, extra_modules=[self.criterion])
        self.collate = DefaultCollator(load_processor(str(model_dir)), mode="train", retrieval_mode="t2i")
        self.prep = self.step = 0.0

    def run(self, records: list[dict], timed: bool) -> None:
        start = time.perf_counter()
        batch = self.collate(records)
        middle = time.perf_counter()
        loss = self.criterion(self.model(**batch), batch)
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad()
        end = time.perf_counter()
        if timed:
            self.prep, self.step = self.prep + middle - start, self.step + end - middle

    def result(self, samples: int) -> dict[str, float]:
        total = self.prep + self.step
        return {
            "samples_per_s": samples / total,
            "preprocessing_share": self.prep / total,
            "preprocessing_s": self.prep,
            "step_s": self.step,
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
        cases = {"clip": Case(make_tiny_clip(root / "clip")), "qwen3_vl": Case(make_tiny_qwen3_vl(root / "qwen3_vl"))}
        for index in range(args.steps + 1):  # the models alternate step by step, so both see the same machine load
            chunk = records[(index * args.batch_size) % len(records) :][: args.batch_size]
            for case in cases.values():
                case.run(chunk, timed=index > 0)  # the first step warms up allocators and lazy imports
        results = {name: case.result(args.steps * args.batch_size) for name, case in cases.items()}
    for name, r in results.items():
        print(
            f"{name:9s} {r['samples_per_s']:8.1f} samples/s  preprocessing {100 * r['preprocessing_share']:5.1f} % "
            f"({r['preprocessing_s']:.2f} s prep, {r['step_s']:.2f} s steps)"
        )
    ratio = results["qwen3_vl"]["samples_per_s"] / results["clip"]["samples_per_s"]
    print(f"VLM / CLIP samples/s: {ratio:.2f}x at batch {args.batch_size}, {args.steps} steps")


if __name__ == "__main__":
    main()
