"""``vembed demo``: the whole system end to end on this machine, offline, in a few minutes.

1. generate a learnable image-text data set (coloured shapes with captions, train / val / test splits);
2. build a small CLIP from a config (nothing is downloaded) as the starting model;
3. measure its zero-shot text-to-image retrieval on the held-out split;
4. fine-tune it with Ray Train (DDP workers, Ray Data preprocessing) -> ``checkpoint-epoch-N``;
5. measure again and write a before/after report;
6. embed every image into Parquet with the Ray Data batch-embedding job;
7. print how to serve the model over HTTP.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``vembed demo``; the defaults finish in a few minutes on 2 CPU cores."""
    parser.add_argument("--output", default="demo_output", help="folder for data, checkpoints and reports")
    parser.add_argument("--epochs", type=int, default=6, help="training epochs (default: 6)")
    parser.add_argument("--num-workers", type=int, default=2, help="Ray Train workers (default: 2, DDP)")
    parser.add_argument("--train-size", type=int, default=384, help="training records (default: 384)")


def run(args: argparse.Namespace) -> int:
    """Run the seven steps above and print where everything went.

    Ray: the cluster at ``RAY_ADDRESS`` if set, else a local instance that ``run_training`` sizes for the workers
    and the data pipeline.
    """
    from vembed.batch.job import embed_corpus
    from vembed.evaluation.evaluator import evaluate_model_path
    from vembed.evaluation.report import render_markdown, write_report
    from vembed.testing import make_shapes_dataset, make_tiny_clip
    from vembed.training.launcher import run_training

    out = Path(args.output).resolve()
    print(f"[1/7] generating the shapes data set in {out / 'data'}")
    data = make_shapes_dataset(out / "data", num_train=args.train_size, num_val=32, num_test=48, seed=1)
    print(f"[2/7] building a small CLIP from its config in {out / 'base_model'}")
    base = make_tiny_clip(out / "base_model")

    print("[3/7] zero-shot evaluation on the held-out split")
    before = evaluate_model_path(base, data["test"], mode="t2i")

    print(f"[4/7] fine-tuning with Ray Train ({args.num_workers} workers)")
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # a local demo listens on 127.0.0.1 only
    result = run_training(
        {
            "model_name": str(base),
            "data_path": str(data["train"]),
            "val_data_path": str(data["val"]),
            "output_dir": str(out / "model"),
            "epochs": args.epochs,
            "batch_size": 32,
            "learning_rate": 2e-3,
            "temperature": 0.1,
            "num_workers": args.num_workers,
            "torch_threads": 1,
            "logging_steps": 5,
        }
    )
    checkpoint = out / "model" / f"checkpoint-epoch-{args.epochs}"

    print("[5/7] evaluating the fine-tuned model")
    after = evaluate_model_path(checkpoint, data["test"], mode="t2i")
    files = write_report(after, out / "report", baseline=before, names=("zero-shot", "fine-tuned"))
    print(render_markdown(after, baseline=before, names=("zero-shot", "fine-tuned")))

    print("[6/7] embedding every image with Ray Data")
    summary = embed_corpus(str(checkpoint), str(data["images"]), str(out / "embeddings"), overwrite=True)

    print("[7/7] done")
    print(
        json.dumps(
            {
                "checkpoint": str(checkpoint),
                "final_train_metrics": {k: v for k, v in (result.metrics or {}).items() if isinstance(v, (int, float))},
                "report": {k: str(v) for k, v in files.items()},
                "embeddings": summary,
            },
            indent=2,
            default=str,
        )
    )
    print(f"serve it:  vembed serve --model {checkpoint} --port 8000")
    return 0
