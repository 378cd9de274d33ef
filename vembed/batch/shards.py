"""Deterministic shards of a corpus, and the assembler that turns a stream of embedded rows back into shards.

Shard ``k`` holds corpus positions ``[k * shard_size, (k + 1) * shard_size)``. Positions come from the corpus's
stable order, so the same input always gives the same shards: a shard's file either exists complete or not at all
(:mod:`vembed.batch.writer`), which is what makes a rerun skip finished work and write every id exactly once.

Rows reach the driver in whatever batches Ray Data produces; :class:`ShardAssembler` buffers them per shard and
releases a shard the moment its last row arrives (rows sorted back into position order, so a shard's file does not
depend on scheduling). Only shards with rows in flight are buffered.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
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


class ShardAssembler:
    """Collect streamed batches (dicts of equal-length numpy columns with a ``position`` column) into shards.

    ``add(batch)`` yields ``(shard, columns)`` for every shard the batch completes, ``columns`` being the shard's rows
    in position order. A row for a shard that is not pending, or a second copy of a row, is an error: the pipeline
    must deliver each pending row exactly once.
    """

    def __init__(self, pending: Sequence[Shard], shard_size: int) -> None:
        self.shard_size = shard_size
        self._pending = {shard.index: shard for shard in pending}
        self._parts: dict[int, list[dict[str, np.ndarray]]] = {}
        self._received: dict[int, int] = {}

    @property
    def open_shards(self) -> int:
        """Shards with some but not all rows received (what the driver holds in memory)."""
        return len(self._parts)

    @property
    def remaining(self) -> int:
        """Shards not yet complete."""
        return len(self._pending)

    def add(self, batch: dict[str, np.ndarray]) -> Iterator[tuple[Shard, dict[str, np.ndarray]]]:
        shards = shard_of(batch["position"], self.shard_size)
        for index in np.unique(shards):
            index = int(index)
            shard = self._pending.get(index)
            if shard is None:
                raise RuntimeError(f"received rows of shard {index}, which is complete or was never scheduled")
            rows = shards == index
            self._parts.setdefault(index, []).append({key: column[rows] for key, column in batch.items()})
            self._received[index] = self._received.get(index, 0) + int(rows.sum())
            if self._received[index] > len(shard):
                raise RuntimeError(f"shard {index} received {self._received[index]} rows for {len(shard)} positions")
            if self._received[index] == len(shard):
                yield shard, self._release(index)

    def _release(self, index: int) -> dict[str, np.ndarray]:
        parts = self._parts.pop(index)
        del self._received[index], self._pending[index]
        columns = {key: np.concatenate([part[key] for part in parts]) for key in parts[0]}
        order = np.argsort(columns["position"], kind="stable")
        expected = np.arange(index * self.shard_size, index * self.shard_size + len(order))
        if not np.array_equal(columns["position"][order], expected):
            raise RuntimeError(f"shard {index} received positions that are not exactly its own (duplicates or gaps)")
        return {key: column[order] for key, column in columns.items()}
