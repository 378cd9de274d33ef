"""Embed a corpus on a Ray cluster: ``ray job submit -- python ray_jobs/embed.py --model M --input SRC --output DST``.

Same options as ``vembed embed`` (see ``--help``); the job connects to the cluster it was submitted to.
"""

import argparse
import sys

from vembed.batch.cli import add_arguments, run


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="ray_jobs/embed.py", description="Embed an image folder or manifest to Parquet"
    )
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
