"""``vembed train [config.yaml] [--config_override key=value ...]``: one call into :func:`run_training`."""

from __future__ import annotations

import argparse
import json

from vembed.config import config_arg_parser, load_and_parse_config
from vembed.training.preflight import check_sources


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The training command takes a YAML config and key=value overrides (keys of configs/defaults.yaml)."""
    config_arg_parser(parser)


def run(args: argparse.Namespace) -> int:
    """Train on Ray; print the final metrics and where the checkpoints are. Exit 1 when the run failed."""
    argv = ([args.config] if args.config else []) + (
        ["--config_override", *args.config_override] if args.config_override else []
    )
    config = load_and_parse_config(argv)
    check_sources(config)  # config and path errors surface before Ray and torch are imported
    from vembed.training.launcher import run_training

    result = run_training(config)
    print(json.dumps({"metrics": result.metrics, "output_dir": config.output_dir}, indent=2, default=str))
    if result.error is not None:
        print(f"training failed: {result.error}")
        return 1
    return 0
