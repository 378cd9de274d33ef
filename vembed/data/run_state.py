"""Small run-wide state shared by a training run's driver, Ray Data tasks and Train workers.

Zero-CPU Ray actors, pinned to the driver's node, behind picklable handles: :class:`BadRecordCounter` (the
records the pipeline dropped), :class:`EpochClock` (the epoch a data set is being read for) and
:class:`PreprocessedCache` (preprocessed rows kept for later epochs). This module imports nothing but Ray and
NumPy: an actor's process imports the module that defines its class, and a module that pulled
in torch and transformers would cost every training run seconds of CPU per actor before it could start.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

if TYPE_CHECKING:
    from vembed.data.batching import BadRecord


def _on_this_node() -> NodeAffinitySchedulingStrategy:
    """Where every actor of this module runs: the driver's node. If that node dies the job ends anyway, while an
    actor on a worker node would die with it and break every restarted attempt that reports to it."""
    return NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)


@ray.remote(num_cpus=0)
class _BadRecordTally:
    """Actor state behind :class:`BadRecordCounter`."""

    def __init__(self, max_examples: int) -> None:
        self._count = 0
        self._examples: list[tuple[str, str, str]] = []
        self._max_examples = max_examples

    def add(self, bad: list[tuple[str, str, str]]) -> None:
        self._count += len(bad)
        self._examples.extend(bad[: max(0, self._max_examples - len(self._examples))])

    def total(self) -> int:
        return self._count

    def examples(self) -> list[tuple[str, str, str]]:
        return list(self._examples)


class BadRecordCounter:
    """Counts the records the pipeline dropped under ``on_bad_record: skip``, across all Data workers.

    A picklable handle to a tiny (zero-CPU) Ray actor: create it in the driver, pass it to
    :func:`build_train_dataset`, and read :meth:`total` anywhere (driver or Train worker) to report it. Every epoch
    re-reads the data, so a record that stays bad is counted once per epoch. Requires a running Ray instance.
    """

    def __init__(self, max_examples: int = 20) -> None:
        self._actor = _BadRecordTally.options(scheduling_strategy=_on_this_node()).remote(max_examples)

    def add(self, bad: Sequence[BadRecord]) -> None:
        """Record dropped records (waits for the actor so a later :meth:`total` includes them)."""
        if bad:
            ray.get(self._actor.add.remote([tuple(b) for b in bad]))

    def total(self) -> int:
        """How many records have been dropped so far."""
        return ray.get(self._actor.total.remote())

    def examples(self) -> list[BadRecord]:
        """The first few dropped records (id, source, error), for logs."""
        from vembed.data.batching import BadRecord  # here, not at the top: the actor's process never needs it

        return [BadRecord(*b) for b in ray.get(self._actor.examples.remote())]


@ray.remote(num_cpus=0)
class _EpochValue:
    """Actor state behind :class:`EpochClock`."""

    def __init__(self) -> None:
        self._epoch = 0

    def set(self, epoch: int) -> None:
        self._epoch = epoch

    def get(self) -> int:
        return self._epoch


class EpochClock:
    """The epoch a training data set is being read for: set by the consumers, read when an execution starts.

    A picklable handle to a tiny (zero-CPU) Ray actor, pinned to the driver's node like
    :class:`BadRecordCounter` (it outlives Train worker restarts). Create it in the driver, pass it to
    :func:`build_train_dataset` and to :func:`iter_train_batches`. Requires a running Ray instance.
    """

    def __init__(self) -> None:
        self._actor = _EpochValue.options(scheduling_strategy=_on_this_node()).remote()

    def set(self, epoch: int) -> None:
        """Select the epoch the next execution reads (waits, so an execution started after this sees it)."""
        ray.get(self._actor.set.remote(int(epoch)))

    def get(self) -> int:
        """The epoch last set (0 before any)."""
        return ray.get(self._actor.get.remote())


@ray.remote(num_cpus=0)
class _PreprocessedRows:
    """Actor state behind :class:`PreprocessedCache`: record source -> (object holding its row, row index), or the
    record's :class:`BadRecord` when it was dropped. The actor puts the objects itself, so it owns them and they
    live as long as the run, whichever Data worker process preprocessed the rows."""

    def __init__(self, budget_bytes: float) -> None:
        self._rows: dict[str, tuple[list[Any], int] | tuple[None, tuple[str, str, str]]] = {}
        self._budget = budget_bytes
        self._bytes = 0

    def lookup(self, keys: list[str]) -> list[Any]:
        return [self._rows.get(key) for key in keys]

    def room_for(self, nbytes: int) -> bool:
        return self._bytes + nbytes <= self._budget

    def add(
        self, keys: list[str], batch: dict[str, Any] | None, nbytes: int, bad: dict[str, tuple[str, str, str]]
    ) -> None:
        if batch is not None and self._bytes + nbytes <= self._budget:
            self._bytes += nbytes
            holder = [ray.put(batch)]  # in a list: lookups hand out the reference, not the arrays
            for index, key in enumerate(keys):  # replaces an entry whose object was lost
                self._rows[key] = (holder, index)
        for key, record in bad.items():
            self._rows.setdefault(key, (None, record))

    def stats(self) -> dict[str, float]:
        cached = sum(1 for value in self._rows.values() if value[0] is not None)
        return {"rows": cached, "bad": len(self._rows) - cached, "bytes": self._bytes, "budget": self._budget}


class PreprocessedCache:
    """Preprocessed rows kept in the object store after their first epoch, for later epochs to reuse.

    A picklable handle to a zero-CPU actor pinned to the driver's node (like :class:`BadRecordCounter`). The
    preprocessing tasks of :func:`build_train_dataset` look every record up by its source (file and line): a hit
    is the row the first epoch made, a miss is preprocessed and added while fewer than ``budget_bytes`` are held.
    The read stage is unchanged -- file, window and row order still come from (seed, epoch) through the
    :class:`EpochClock` -- and rows are the same arrays preprocessing makes, so a cached epoch yields exactly the
    batches a streaming epoch does; records past the budget stream as before. A record dropped as bad is
    remembered as such and counted again in every epoch, as streaming counts it. Requires a running Ray instance.
    """

    def __init__(self, budget_bytes: float = float("inf")) -> None:
        self._actor = _PreprocessedRows.options(scheduling_strategy=_on_this_node()).remote(float(budget_bytes))

    def lookup(self, keys: list[str]) -> list[Any]:
        """Per key: ``([ref], row)`` for a cached row, ``(None, bad_record)`` for a dropped record, else None."""
        return ray.get(self._actor.lookup.remote(keys))

    def add(self, keys: list[str], batch: Mapping[str, np.ndarray], bad: Sequence[BadRecord]) -> None:
        """Keep ``batch`` (rows of the records ``keys``, in order) when it fits the budget; remember ``bad``."""
        nbytes = batch_nbytes(batch) if batch else 0
        keep = bool(batch) and ray.get(self._actor.room_for.remote(nbytes))  # past the budget: no copy is sent
        if keep or bad:
            bad_by_key = {b.source: tuple(b) for b in bad}
            ray.get(self._actor.add.remote(keys, dict(batch) if keep else None, nbytes, bad_by_key))

    def stats(self) -> dict[str, float]:
        """Rows and dropped records held, bytes used and the budget."""
        return ray.get(self._actor.stats.remote())


def batch_nbytes(batch: Mapping[str, np.ndarray]) -> int:
    """Bytes of a preprocessed batch (ragged VLM rows: the sum of their arrays)."""
    total = 0
    for value in batch.values():
        if value.dtype == object:
            total += sum(np.asarray(item).nbytes for item in value)
        else:
            total += value.nbytes
    return total
