"""Offline embedding of whole corpora with Ray Data: ``embed_corpus`` and ``vembed embed``.

``from vembed.batch import embed_corpus, read_embeddings, read_errors, read_manifest``. Names load on first use, so
``vembed --help`` stays fast.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "embed_corpus": "vembed.batch.job",
    "read_embeddings": "vembed.batch.writer",
    "read_errors": "vembed.batch.writer",
    "read_manifest": "vembed.batch.writer",
    "load_corpus": "vembed.batch.sources",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'vembed.batch' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
