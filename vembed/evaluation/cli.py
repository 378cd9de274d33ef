"""``vembed evaluate`` (and ``ray_jobs/evaluate.py``): retrieval metrics of a model on an eval file, optionally
against a baseline model (``--compare``), written as a JSON + Markdown report and printed as a table.

Only argparse is imported here; torch, transformers and Ray load when :func:`run` runs, so ``vembed --help`` is fast.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from vembed.argtypes import json_mapping, positive_int
from vembed.clierrors import VembedArgumentParser, run_command
from vembed.data.records import RETRIEVAL_MODES

if TYPE_CHECKING:
    from vembed.evaluation.evalset import EvalSet
    from vembed.evaluation.evaluator import Metrics


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``vembed evaluate``."""
    parser.add_argument("--model", required=True, help="vembed checkpoint or HF model directory (or hub id)")
    parser.add_argument(
        "--data",
        required=True,
        help="eval records (JSONL/CSV/Parquet file or folder, local or URI) in the record schema",
    )
    parser.add_argument("--mode", choices=RETRIEVAL_MODES, default="t2i", help="retrieval mode (default: t2i)")
    parser.add_argument(
        "--compare",
        default=None,
        metavar="BASELINE_MODEL",
        help="baseline model (e.g. the untrained start): the report shows both and the change in percentage points",
    )
    parser.add_argument("--batch-size", type=positive_int, default=32, help="items per model call (default: 32)")
    parser.add_argument(
        "--output", default=None, help="folder for metrics.json and metrics.md (and recall_at_k.png with matplotlib)"
    )
    parser.add_argument(
        "--dims", type=positive_int, nargs="+", default=None, help="Matryoshka dims to score, e.g. --dims 64 128"
    )
    parser.add_argument("--ks", type=positive_int, nargs="+", default=[1, 5, 10], help="cut-offs K (default: 1 5 10)")
    parser.add_argument("--image-root", default=None, help="folder (or URI) that relative image paths are relative to")
    parser.add_argument(
        "--column-mapping", type=json_mapping, default=None, help='rename columns, e.g. \'{"caption": "query"}\''
    )
    parser.add_argument(
        "--relevance",
        choices=("auto", "ids", "labels"),
        default="auto",
        help="ids: each query's positives; labels: same class, leave-one-out (i2i); auto: labels for i2i when "
        "every record has one, else ids",
    )
    parser.add_argument("--device", default=None, help="torch device, e.g. cuda:0 (default: CUDA when available)")
    ray = parser.add_argument_group("Ray Data (corpus scale)")
    ray.add_argument("--ray", action="store_true", help="embed with Ray Data model actors instead of in this process")
    ray.add_argument(
        "--candidates-embeddings",
        default=None,
        metavar="DIR",
        help="output folder of `vembed embed` made with --model: its corpus is the candidate pool (implies --ray)",
    )
    ray.add_argument("--work-dir", default=None, help="where --ray batch jobs write (kept; a rerun resumes)")
    ray.add_argument("--num-actors", type=positive_int, default=None, help="model actors per --ray batch job")


def run(args: argparse.Namespace) -> int:
    """Evaluate ``args.model`` (and ``args.compare``), print the Markdown table and write the report.

    Returns 0, or 2 after printing the error when the input is unusable (missing file, bad records, empty eval
    file, mismatched dims or models).
    """
    from vembed.evaluation.evalset import load_eval_set
    from vembed.evaluation.report import render_markdown, write_report

    try:
        evalset = load_eval_set(args.data, args.mode, args.image_root, args.column_mapping, args.relevance)
        metrics = _evaluate(args, args.model, evalset, "model", candidates_embeddings=args.candidates_embeddings)
        baseline = None
        if args.compare:
            pool = _corpus_pool(args.candidates_embeddings, evalset)
            baseline = _evaluate(args, args.compare, evalset, "baseline", candidate_pool=pool)
    except (ValueError, OSError) as exc:  # bad input: files, records, dims, models (errors name what and where)
        print(f"vembed evaluate: error: {exc}", file=sys.stderr)
        return 2
    names = _names(args.model, args.compare)
    title = f"Retrieval evaluation ({args.mode}, {evalset.num_queries} queries): {args.data}"
    print(render_markdown(metrics, baseline, names, title))
    _warn_unanswerable(metrics)
    if args.output:
        written = write_report(metrics, args.output, baseline, names, title)
        print("wrote " + ", ".join(str(path) for path in written.values()))
    return 0


def _evaluate(
    args: argparse.Namespace,
    model: str,
    evalset: EvalSet,
    label: str,
    candidates_embeddings: str | None = None,
    candidate_pool: list[str] | None = None,
) -> Metrics:
    """Metrics of one model: in this process, or with Ray Data (``--ray``, ``--candidates-embeddings``, or a
    baseline ranking that corpus) writing under ``--work-dir/label``."""
    dims = args.dims or ()
    if args.ray or candidates_embeddings or candidate_pool is not None:
        from vembed.evaluation.embedded import evaluate_with_ray

        work_dir = None if args.work_dir is None else Path(args.work_dir) / label
        return evaluate_with_ray(
            model,
            evalset,
            batch_size=args.batch_size,
            ks=args.ks,
            mrl_dims=dims,
            candidates_embeddings=candidates_embeddings,
            candidate_pool=candidate_pool,
            work_dir=work_dir,
            num_actors=args.num_actors,
        )
    from vembed.evaluation.evaluator import evaluate_model_path

    return evaluate_model_path(
        model, evalset, batch_size=args.batch_size, ks=args.ks, mrl_dims=dims, device=args.device
    )


def _corpus_pool(candidates_embeddings: str | None, evalset: EvalSet) -> list[str] | None:
    """The pool a baseline must rank to be comparable: the corpus of ``--candidates-embeddings``, if any."""
    if candidates_embeddings is None or evalset.leave_one_out:
        return None
    from vembed.evaluation.embedded import corpus_sources

    return corpus_sources(candidates_embeddings)


def _names(model: str, baseline: str | None) -> tuple[str, str]:
    """Short column names: the folder names, or their parent/name when those are equal."""
    if baseline is None:
        return "baseline", Path(model).name or model
    a, b = Path(baseline), Path(model)
    if a.name != b.name:
        return a.name, b.name
    return f"{a.parent.name}/{a.name}", f"{b.parent.name}/{b.name}"


def _warn_unanswerable(metrics: dict) -> None:
    sections = metrics.values() if all(isinstance(v, dict) for v in metrics.values()) else [metrics]
    missing = max(int(section.get("num_queries_without_relevant", 0)) for section in sections)
    if missing:
        print(f"note: {missing} queries have no relevant candidate and are left out of the averages", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    """``python -m vembed.evaluation.cli``: the same as ``vembed evaluate``."""
    parser = VembedArgumentParser(prog="vembed evaluate", description=__doc__.splitlines()[0])
    add_arguments(parser)
    args = parser.parse_args(argv)
    return run_command("vembed evaluate", lambda: run(args))


if __name__ == "__main__":
    raise SystemExit(main())
