"""``vembed embed`` (and ``ray_jobs/embed.py``): arguments, then one call to :func:`vembed.batch.embed_corpus`."""

from __future__ import annotations

import argparse
import json

from vembed.argtypes import non_negative_float, positive_int
from vembed.batch.options import DTYPES, FORMATS, MODALITIES
from vembed.clierrors import VembedArgumentParser, run_command


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``vembed embed``."""
    parser.add_argument("--model", required=True, help="vembed checkpoint or HF model directory (or hub id)")
    parser.add_argument(
        "--input",
        required=True,
        help="image folder (recursive) or JSONL/CSV/Parquet manifest; local path or s3://, gs://, hdfs:// URI",
    )
    parser.add_argument("--output", required=True, help="output folder (local or URI) for Parquet shards")
    parser.add_argument("--modality", choices=MODALITIES, default="image", help="what the input holds")
    parser.add_argument("--id-column", default=None, help="manifest column with unique ids (default: id)")
    parser.add_argument(
        "--source-column",
        default=None,
        help="manifest column with image paths or texts (default: path/image/image_path/file, or text)",
    )
    parser.add_argument("--image-root", default=None, help="folder that relative manifest paths are relative to")
    parser.add_argument("--batch-size", type=positive_int, default=64, help="rows per model call")
    parser.add_argument(
        "--shard-size", type=positive_int, default=4096, help="rows per output shard (the unit of resume)"
    )
    parser.add_argument(
        "--num-actors",
        type=positive_int,
        default=None,
        help="fixed number of model actors (or use --min/--max-actors)",
    )
    parser.add_argument("--min-actors", type=positive_int, default=None, help="autoscaling pool: fewest model actors")
    parser.add_argument("--max-actors", type=positive_int, default=None, help="autoscaling pool: most model actors")
    parser.add_argument(
        "--num-gpus-per-actor",
        type=non_negative_float,
        default=None,
        help="GPUs per model actor (default: 1 when the cluster has GPUs, else 0)",
    )
    parser.add_argument(
        "--max-decoders",
        type=positive_int,
        default=None,
        help="most image decode workers, 1 CPU each (default: the CPUs the model actors leave free)",
    )
    parser.add_argument("--dtype", choices=DTYPES, default="float32", help="model compute dtype")
    parser.add_argument(
        "--instruction",
        default=None,
        help="instruction for models that take one (a VLM's system message, Qwen3-Embedding's query task; "
        "default: the model's own)",
    )
    parser.add_argument("--dim", type=positive_int, default=None, help="Matryoshka dimension (default: full size)")
    parser.add_argument("--format", choices=FORMATS, default="float32", help="stored embedding dtype")
    parser.add_argument("--overwrite", action="store_true", help="delete earlier output in --output and start over")


def run(args: argparse.Namespace) -> int:
    """Run the job described by ``args``; prints the summary as JSON. Returns 0 (errors raise)."""
    from vembed.modelpath import resolve_source

    resolve_source(args.model)  # a missing model directory fails before torch, Ray and the corpus scan
    from vembed.batch.job import embed_corpus
    from vembed.batch.pipeline import check_instruction
    from vembed.clierrors import UserError

    try:
        check_instruction(args.model, args.instruction)
    except (ValueError, FileNotFoundError) as exc:
        raise UserError(f"--instruction: {exc}") from exc
    summary = embed_corpus(
        model_path=args.model,
        input=args.input,
        output=args.output,
        modality=args.modality,
        id_column=args.id_column,
        source_column=args.source_column,
        image_root=args.image_root,
        batch_size=args.batch_size,
        shard_size=args.shard_size,
        num_actors=args.num_actors,
        min_actors=args.min_actors,
        max_actors=args.max_actors,
        num_gpus_per_actor=args.num_gpus_per_actor,
        max_decoders=args.max_decoders,
        dtype=args.dtype,
        dim=args.dim,
        format=args.format,
        overwrite=args.overwrite,
        instruction=args.instruction,
    )
    print(json.dumps(summary, indent=2))
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point for ``python -m vembed.batch.cli`` and ``ray_jobs/embed.py``."""
    parser = VembedArgumentParser(prog="vembed embed", description="Embed an image folder or manifest to Parquet")
    add_arguments(parser)
    args = parser.parse_args(argv)
    return run_command("vembed embed", lambda: run(args))


if __name__ == "__main__":
    raise SystemExit(main())
