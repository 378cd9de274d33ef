"""Offline embedding of whole corpora with Ray Data: ``embed_corpus`` and ``vembed embed``.

``from vembed.batch import embed_corpus, read_embeddings, read_errors, read_manifest, writer_nodes``. Names load on first use, so
``vembed --help`` stays fast.
"""

from __future__ import annotations

from vembed.lazy import lazy_getattr

_EXPORTS = {
    "embed_corpus": "vembed.batch.job",
    "read_embeddings": "vembed.batch.writer",
    "read_errors": "vembed.batch.writer",
    "read_manifest": "vembed.batch.writer",
    "load_corpus": "vembed.batch.sources",
    "list_corpus": "vembed.batch.sources",
    "writer_nodes": "vembed.batch.writer",
}

__all__ = sorted(_EXPORTS)


__getattr__ = lazy_getattr("vembed.batch", _EXPORTS)
