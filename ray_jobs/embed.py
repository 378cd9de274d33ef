"""Embed a corpus on a Ray cluster: ``ray job submit -- python ray_jobs/embed.py --model M --input SRC --output DST``.

Same options as ``vembed embed`` (see ``--help``); the job connects to the cluster it was submitted to.
"""

import sys

from vembed.batch.cli import main

if __name__ == "__main__":
    sys.exit(main())
