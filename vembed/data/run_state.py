"""Small run-wide state shared by a training run's driver, Ray Data tasks and Train workers.

Two zero-CPU Ray actors, pinned to the driver's node, behind picklable handles: :class:`BadRecordCounter` (the
records the pipeline dropped) and :class:`EpochClock` (the epoch a data set is being read for). This module
imports nothing but Ray: an actor's process imports the module that defines its class, and a module that pulled
in torch and transformers would cost every training run seconds of CPU per actor before it could start.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

if TYPE_CHECKING:
    from vembed.data.batching import BadRecord


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
        # Pinned to the driver's node: if that node dies the job ends anyway, while an actor on a worker node
        # would die with it and break every restarted attempt that reports to it.
        here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
        self._actor = _BadRecordTally.options(scheduling_strategy=here).remote(max_examples)

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
        here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
        self._actor = _EpochValue.options(scheduling_strategy=here).remote()

    def set(self, epoch: int) -> None:
        """Select the epoch the next execution reads (waits, so an execution started after this sees it)."""
        ray.get(self._actor.set.remote(int(epoch)))

    def get(self) -> int:
        """The epoch last set (0 before any)."""
        return ray.get(self._actor.get.remote())
