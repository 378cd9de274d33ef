"""What the driver of a batch-embedding job knows while it runs: rows, errors, shards done, speed, ETA.

The driver receives one small report per (batch, shard) from the writers (:class:`~vembed.batch.writer.FragmentWriter`)
and nothing else; :class:`JobProgress` folds them into the figures a person watching the job wants (printed as a line,
and written into ``_manifest.json`` as shards finish, so an operator can see what a resumed job would skip).
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Iterable
from typing import Any

import numpy as np


class JobProgress:
    """Progress of one run over ``pending_rows`` rows in ``pending_shards`` shards (of ``total_shards``)."""

    def __init__(self, total_shards: int, done_before: Iterable[int], pending_rows: int) -> None:
        self.total_shards = total_shards
        self.done: set[int] = set(done_before)
        self.done_before = len(self.done)
        self.pending_rows = pending_rows
        self.rows = 0  # rows embedded and written (as fragments) in this run
        self.errors = 0
        self.shards_written = 0
        self.writer_nodes: Counter[str] = Counter()
        self.open: set[int] = set()  # shards with rows written but not yet finished
        self.max_open_shards = 0
        self.started = time.perf_counter()
        self.first: tuple[float, int] | None = None  # (time, rows) of the first report

    def update(self, report: dict[str, np.ndarray]) -> list[int]:
        """Fold one batch of writer reports in; returns the shards they finished."""
        finished = []
        for shard, rows, errors, done_rows, node in zip(
            report["shard"], report["rows"], report["errors"], report["done_rows"], report["node"], strict=True
        ):
            self.rows += int(rows)
            self.errors += int(errors)
            shard = int(shard)
            if done_rows >= 0 and shard not in self.done:
                self.done.add(shard)
                self.open.discard(shard)
                self.shards_written += 1
                self.writer_nodes[str(node)] += 1
                finished.append(shard)
            elif shard not in self.done:
                self.open.add(shard)
        self.max_open_shards = max(self.max_open_shards, len(self.open))
        if self.first is None and self.rows:
            self.first = (time.perf_counter(), self.rows)
        return finished

    def rows_per_s(self) -> float | None:
        """Rows per second after the first rows came back (start-up excluded)."""
        if self.first is None:
            return None
        seconds = time.perf_counter() - self.first[0]
        return (self.rows - self.first[1]) / seconds if seconds > 0 and self.rows > self.first[1] else None

    def eta_s(self) -> float | None:
        rate = self.rows_per_s()
        return (self.pending_rows - self.rows) / rate if rate else None

    def report(self) -> dict[str, Any]:
        """The manifest's ``progress``: figures of this run, and every finished shard as index ranges."""
        rate, eta = self.rows_per_s(), self.eta_s()
        return {
            "shards_done": len(self.done),
            "shards_total": self.total_shards,
            "rows": self.rows,
            "rows_pending": self.pending_rows,
            "errors": self.errors,
            "rows_per_s": None if rate is None else round(rate, 2),
            "eta_s": None if eta is None else round(eta, 1),
            "seconds": round(time.perf_counter() - self.started, 3),
            "writer_nodes": dict(self.writer_nodes),
            "done_shards": index_ranges(self.done),
        }

    def line(self) -> str:
        rate, eta = self.rows_per_s(), self.eta_s()
        speed = "" if rate is None else f" ({rate:.0f} rows/s, ETA {eta:.0f} s)"
        return (
            f"vembed embed: {len(self.done)}/{self.total_shards} shards, {self.rows}/{self.pending_rows} rows{speed}, "
            f"{self.errors} errors so far"
        )


def index_ranges(indexes: Iterable[int]) -> list[list[int]]:
    """Sorted indexes as ``[first, last]`` runs: ``{0, 1, 2, 5}`` -> ``[[0, 2], [5, 5]]``."""
    runs: list[list[int]] = []
    for index in sorted(indexes):
        if runs and index == runs[-1][1] + 1:
            runs[-1][1] = index
        else:
            runs.append([index, index])
    return runs
