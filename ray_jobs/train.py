"""Fine-tune on a Ray cluster: ``ray job submit --working-dir . -- python ray_jobs/train.py CONFIG [--config_override k=v ...]``.

Same arguments as ``vembed train`` (a YAML config with keys of ``configs/defaults.yaml``, then ``key=value``
overrides). Under ``ray job submit`` the job joins the cluster it was submitted to (``RAY_ADDRESS``); run as
``python ray_jobs/train.py ...`` it starts or joins a local Ray. On a multi-node cluster ``output_dir`` (user
checkpoints, written by rank 0) must be a path every node shares, and ``storage_path`` (resume checkpoints) a
shared path or a pyarrow URI such as ``s3://bucket/runs``. Prints the final metrics (with ``worker_node_ids``)
as JSON; exits 1 when training failed.
"""

import sys

from vembed.clierrors import VembedArgumentParser, run_command
from vembed.training.cli import add_arguments, run


def main(argv: list[str] | None = None) -> int:
    parser = VembedArgumentParser(prog="ray_jobs/train.py", description="Fine-tune a vembed model on Ray Train")
    add_arguments(parser)
    args = parser.parse_args(argv)
    return run_command("ray_jobs/train.py", lambda: run(args))  # a user error: one line on stderr, exit 2


if __name__ == "__main__":
    sys.exit(main())
