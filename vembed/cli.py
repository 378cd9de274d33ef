"""The ``vembed`` command: ``train``, ``evaluate``, ``embed``, ``serve`` and ``demo``.

Each subcommand parses its arguments here (or in its feature's ``cli`` module) and makes one call into vembed;
heavy imports (torch, Ray) happen only once a subcommand runs, so ``vembed --help`` is instant.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

# subcommand -> (module providing add_arguments(parser) and run(args) -> int, one-line help)
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "train": ("vembed.training.cli", "fine-tune a model on Ray Train (DDP or FSDP2) from a YAML config"),
    "evaluate": ("vembed.evaluation.cli", "retrieval metrics of a model on an eval file, optionally vs another"),
    "embed": ("vembed.batch.cli", "embed an image folder or manifest into Parquet with Ray Data"),
    "serve": ("vembed.serving.cli", "serve a model over HTTP with Ray Serve (OpenAI-compatible)"),
    "demo": ("vembed.demo", "generate data, train, evaluate and embed end to end on this machine"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vembed", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (module, help_text) in SUBCOMMANDS.items():
        sub_parser = sub.add_parser(name, help=help_text, description=help_text)
        importlib.import_module(module).add_arguments(sub_parser)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    module = importlib.import_module(SUBCOMMANDS[args.command][0])
    return int(module.run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
