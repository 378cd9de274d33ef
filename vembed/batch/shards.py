"""Deterministic shards of a corpus.

Shard ``k`` holds corpus positions ``[k * shard_size, (k + 1) * shard_size)``. Positions come from the corpus's
stable order, so the same input always gives the same shards: a shard's file either exists complete or not at all
(:mod:`vembed.batch.writer`), which is what makes a rerun skip finished work and write every id exactly once.

Rows reach the model actors in whatever order Ray Data produces them; the actors write them as fragments and the
one that completes a shard merges it in position order (:class:`vembed.batch.writer.FragmentWriter`), so a shard's
file does not depend on scheduling.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Shard:
    """Corpus positions ``[start, stop)``, written as ``part-{index:05d}.parquet``."""

    index: int
    start: int
    stop: int

    @property
    def name(self) -> str:
        return f"part-{self.index:05d}"

    def __len__(self) -> int:
        return self.stop - self.start


def plan_shards(num_items: int, shard_size: int) -> list[Shard]:
    """Split ``num_items`` positions into consecutive shards of ``shard_size`` (the last one may be shorter)."""
    if not isinstance(shard_size, int) or shard_size < 1:
        raise ValueError(f"shard_size={shard_size!r} must be a positive integer")
    return [
        Shard(i, start, min(start + shard_size, num_items)) for i, start in enumerate(range(0, num_items, shard_size))
    ]


def shard_of(position: np.ndarray, shard_size: int) -> np.ndarray:
    """The shard index of each corpus position."""
    return np.asarray(position) // shard_size
