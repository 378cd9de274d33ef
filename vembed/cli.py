"""The ``vembed`` command: ``train``, ``evaluate``, ``embed``, ``serve`` and ``demo``.

Each subcommand parses its arguments here (or in its feature's ``cli`` module) and makes one call into vembed;
heavy imports (torch, Ray) happen only once a subcommand runs, so ``vembed --help`` is instant. A user error
(bad config key, missing file or flag, invalid combination) is one line on stderr and exit code 2
(:mod:`vembed.clierrors`).
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from vembed import __version__
from vembed.clierrors import LOG_LEVELS, VembedArgumentParser, configure_logging, run_command

# subcommand -> (module providing add_arguments(parser) and run(args) -> int, one-line help)
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "train": ("vembed.training.cli", "fine-tune a model on Ray Train (DDP or FSDP2) from a YAML config"),
    "evaluate": ("vembed.evaluation.cli", "retrieval metrics of a model on an eval file, optionally vs another"),
    "embed": ("vembed.batch.cli", "embed an image folder or manifest into Parquet with Ray Data"),
    "serve": ("vembed.serving.cli", "serve a model over HTTP with Ray Serve (OpenAI-compatible)"),
    "demo": ("vembed.demo", "generate data, train, evaluate and embed end to end on this machine"),
}


def add_common_arguments(parser: argparse.ArgumentParser) -> None:
    """``-v/--verbose`` and ``--log-level``, accepted before or after the subcommand."""
    parser.add_argument(
        "-v",
        "--verbose",
        dest="log_level",
        action="store_const",
        const="debug",
        default=argparse.SUPPRESS,
        help="debug logging; user errors show their traceback",
    )
    parser.add_argument(
        "--log-level",
        choices=LOG_LEVELS,
        default=argparse.SUPPRESS,
        help="log level of vembed's own messages (default: info; other libraries: warning)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = VembedArgumentParser(prog="vembed", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"vembed {__version__}")
    add_common_arguments(parser)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (module, help_text) in SUBCOMMANDS.items():
        sub_parser = sub.add_parser(name, help=help_text, description=help_text)
        add_common_arguments(sub_parser)
        importlib.import_module(module).add_arguments(sub_parser)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    level = getattr(args, "log_level", None)
    configure_logging(level)
    module = importlib.import_module(SUBCOMMANDS[args.command][0])
    return run_command(f"vembed {args.command}", lambda: module.run(args), debug=level == "debug")


if __name__ == "__main__":
    sys.exit(main())
