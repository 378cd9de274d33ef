"""Argument types shared by the ``vembed`` subcommands: each parses one option value or raises an
``argparse.ArgumentTypeError`` that argparse turns into a usage error naming the option."""

from __future__ import annotations

import argparse
import json


def positive_int(text: str) -> int:
    """An integer >= 1 (batch sizes, counts, cut-offs)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text}")
    return value


def non_negative_float(text: str) -> float:
    """A number >= 0 (timeouts, waits)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text}")
    return value


def json_mapping(text: str) -> dict[str, str]:
    """A JSON object, e.g. a column mapping ``{"caption": "query"}``."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(f'expected a JSON object such as \'{{"caption": "query"}}\': {exc}') from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f'expected a JSON object such as \'{{"caption": "query"}}\', got {text!r}')
    return value
