"""Argument types shared by the ``vembed`` subcommands: each parses one option value or raises an
``argparse.ArgumentTypeError`` that argparse turns into a usage error naming the option."""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def _checked(text: str, convert: Callable[[str], T], valid: Callable[[T], bool], expected: str) -> T:
    """``convert(text)`` when it parses and passes ``valid``; else a usage error saying what was ``expected``."""
    try:
        value = convert(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None
    if not valid(value):
        raise argparse.ArgumentTypeError(f"expected {expected}, got {text}")
    return value


def positive_int(text: str) -> int:
    """An integer >= 1 (batch sizes, counts, cut-offs)."""
    return _checked(text, int, lambda value: value >= 1, "a positive integer")


def non_negative_float(text: str) -> float:
    """A number >= 0 (timeouts, waits)."""
    return _checked(text, float, lambda value: value >= 0, "a number >= 0")


def json_mapping(text: str) -> dict[str, str]:
    """A JSON object, e.g. a column mapping ``{"caption": "query"}``."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(f'expected a JSON object such as \'{{"caption": "query"}}\': {exc}') from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f'expected a JSON object such as \'{{"caption": "query"}}\', got {text!r}')
    return value
