"""Evaluate a model on a Ray cluster with Ray Data embedding.

    ray job submit --working-dir . -- python ray_jobs/evaluate.py --model out/checkpoint-epoch-3 \
        --data data/test.jsonl --mode t2i --compare openai/clip-vit-base-patch32 --output eval_report

The eval file's candidates and queries are embedded by Ray Data model actors (as ``vembed embed``); or, with
``--candidates-embeddings DIR``, the candidate pool is a corpus that ``vembed embed`` already wrote. Options are
those of ``vembed evaluate`` (see ``--help``); the job connects to the cluster it was submitted to.
"""

import sys

from vembed.clierrors import VembedArgumentParser, run_command
from vembed.evaluation.cli import add_arguments, run


def main(argv: list[str] | None = None) -> int:
    parser = VembedArgumentParser(prog="ray_jobs/evaluate.py", description=__doc__.splitlines()[0])
    add_arguments(parser)
    parser.set_defaults(ray=True)  # always embed with Ray Data here
    args = parser.parse_args(argv)
    return run_command("ray_jobs/evaluate.py", lambda: run(args))  # a user error: one line on stderr, exit 2


if __name__ == "__main__":
    sys.exit(main())
