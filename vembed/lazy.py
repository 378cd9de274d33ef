"""Lazy package exports: a package's public names are imported from their modules on first use, so
``import vembed`` and ``vembed --help`` do not pay for torch, transformers or Ray."""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from typing import Any


def lazy_getattr(package: str, exports: Mapping[str, str]) -> Callable[[str], Any]:
    """A module ``__getattr__`` for ``package`` that resolves ``exports``.

    ``exports`` maps a public name to ``"module"`` (the same name inside it) or ``"module:attribute"``.
    """

    def __getattr__(name: str) -> Any:
        if name not in exports:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        module, _, attribute = exports[name].partition(":")
        return getattr(importlib.import_module(module), attribute or name)

    return __getattr__
