"""Small run-wide state shared by a training run's driver, Ray Data tasks and Train workers.

Picklable handles to state held in a zero-CPU Ray actor pinned to the driver's node: :class:`BadRecordCounter`
(the records the pipeline dropped), :class:`EpochClock` (the epoch a data set is being read for) and
:class:`PreprocessedCache` (preprocessed rows kept for later epochs). A training run keeps all three in one actor,
its :class:`RunState`: every Ray worker process costs its node about 1 % of a core even when idle (its main
thread wakes every 10 ms), which on a small node is taken from the training threads. This module imports nothing
but Ray and NumPy: an actor's process imports the module that defines its class, and a module that pulled in
torch and transformers would cost every training run seconds of CPU per actor before it could start.
"""

from __future__ import annotations

import uuid
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
class _StateHost:
    """The actor behind a :class:`RunState`: state objects by key, their methods called one at a time."""

    def __init__(self) -> None:
        self._held: dict[str, Any] = {}

    def hold(self, key: str, cls: type, args: tuple[Any, ...]) -> None:
        self._held[key] = cls(*args)

    def call(self, key: str, method: str, *args: Any) -> Any:
        return getattr(self._held[key], method)(*args)


class _Held:
    """One state object inside a :class:`RunState`'s actor; :meth:`call` runs one of its methods there."""

    def __init__(self, host: Any, key: str) -> None:
        self._host = host
        self._key = key

    def call(self, method: str, *args: Any) -> ray.ObjectRef:
        return self._host.call.remote(self._key, method, *args)


class RunState:
    """One zero-CPU actor on the driver's node that holds a run's shared state objects.

    Give it to :class:`BadRecordCounter`, :class:`EpochClock` and :class:`PreprocessedCache` (``state=``) so the
    three live in one process instead of three; each made without one gets an actor of its own. Pinned to the
    driver's node (see ``_on_this_node``). Requires a running Ray instance.
    """

    def __init__(self) -> None:
        self._host = _StateHost.options(scheduling_strategy=_on_this_node()).remote()

    def hold(self, cls: type, *args: Any) -> _Held:
        """A new ``cls(*args)`` in the actor (made before this returns, so any process may call it at once)."""
        key = uuid.uuid4().hex
        ray.get(self._host.hold.remote(key, cls, args))
        return _Held(self._host, key)


class _BadRecordTally:
    """State behind :class:`BadRecordCounter`."""

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

    A picklable handle to state in a :class:`RunState` (``state``, else one of its own): create it in the driver,
    pass it to :func:`build_train_dataset`, and read :meth:`total` anywhere (driver or Train worker) to report it.
    Every epoch re-reads the data, so a record that stays bad is counted once per epoch. Requires a running Ray
    instance.
    """

    def __init__(self, max_examples: int = 20, state: RunState | None = None) -> None:
        self._held = (state or RunState()).hold(_BadRecordTally, max_examples)

    def add(self, bad: Sequence[BadRecord]) -> None:
        """Record dropped records (waits for the actor so a later :meth:`total` includes them)."""
        if bad:
            ray.get(self._held.call("add", [tuple(b) for b in bad]))

    def total(self) -> int:
        """How many records have been dropped so far."""
        return ray.get(self._held.call("total"))

    def examples(self) -> list[BadRecord]:
        """The first few dropped records (id, source, error), for logs."""
        from vembed.data.batching import BadRecord  # here, not at the top: the actor's process never needs it

        return [BadRecord(*b) for b in ray.get(self._held.call("examples"))]


class _EpochValue:
    """State behind :class:`EpochClock`."""

    def __init__(self) -> None:
        self._epoch = 0

    def set(self, epoch: int) -> None:
        self._epoch = epoch

    def get(self) -> int:
        return self._epoch


class EpochClock:
    """The epoch a training data set is being read for: set by the consumers, read when an execution starts.

    A picklable handle to state in a :class:`RunState` (``state``, else one of its own; it outlives Train worker
    restarts). Create it in the driver, pass it to :func:`build_train_dataset` and to :func:`iter_train_batches`.
    Requires a running Ray instance.
    """

    def __init__(self, state: RunState | None = None) -> None:
        self._held = (state or RunState()).hold(_EpochValue)

    def set(self, epoch: int) -> None:
        """Select the epoch the next execution reads (waits, so an execution started after this sees it)."""
        ray.get(self._held.call("set", int(epoch)))

    def get(self) -> int:
        """The epoch last set (0 before any)."""
        return ray.get(self._held.call("get"))


class _PreprocessedRows:
    """State behind :class:`PreprocessedCache`: record source -> (object holding its row, row index), or the
    record's :class:`BadRecord` when it was dropped. It puts the objects itself, in its :class:`RunState`'s actor,
    so that actor owns them and they live as long as the run, whichever Data worker process preprocessed the
    rows."""

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

    A picklable handle to state in a :class:`RunState` (``state``, else one of its own), like
    :class:`BadRecordCounter`. The preprocessing tasks of :func:`build_train_dataset` look every record up by its
    source (file and line): a hit is the row the first epoch made, a miss is preprocessed and added while fewer
    than ``budget_bytes`` are held.
    The read stage is unchanged -- file, window and row order still come from (seed, epoch) through the
    :class:`EpochClock` -- and rows are the same arrays preprocessing makes, so a cached epoch yields exactly the
    batches a streaming epoch does; records past the budget stream as before. A record dropped as bad is
    remembered as such and counted again in every epoch, as streaming counts it. Requires a running Ray instance.
    """

    def __init__(self, budget_bytes: float = float("inf"), state: RunState | None = None) -> None:
        self._held = (state or RunState()).hold(_PreprocessedRows, float(budget_bytes))

    def lookup(self, keys: list[str]) -> list[Any]:
        """Per key: ``([ref], row)`` for a cached row, ``(None, bad_record)`` for a dropped record, else None."""
        return ray.get(self._held.call("lookup", keys))

    def add(self, keys: list[str], batch: Mapping[str, np.ndarray], bad: Sequence[BadRecord]) -> None:
        """Keep ``batch`` (rows of the records ``keys``, in order) when it fits the budget; remember ``bad``."""
        nbytes = batch_nbytes(batch) if batch else 0
        keep = bool(batch) and ray.get(self._held.call("room_for", nbytes))  # past the budget: no copy is sent
        if keep or bad:
            bad_by_key = {b.source: tuple(b) for b in bad}
            ray.get(self._held.call("add", keys, dict(batch) if keep else None, nbytes, bad_by_key))

    def stats(self) -> dict[str, float]:
        """Rows and dropped records held, bytes used and the budget."""
        return ray.get(self._held.call("stats"))


def batch_nbytes(batch: Mapping[str, np.ndarray]) -> int:
    """Bytes of a preprocessed batch (ragged VLM rows: the sum of their arrays)."""
    total = 0
    for value in batch.values():
        if value.dtype == object:
            total += sum(np.asarray(item).nbytes for item in value)
        else:
            total += value.nbytes
    return total
