"""Where a batch-embedding job's Ray Data pipeline is executed: a coordinator task on the driver's node, not the driver.

Why. Ray Data's streaming executor runs in the process that iterates the dataset, and its cost there grows with
the job's duration, not with its blocks: its scheduling loop wakes at least every 0.1 s (``ray.wait`` with a
timeout) to update resources, progress and metrics, and the consumer of its output polls every 10 ms. Measured in
the driver of a text job with 2 model actors, that was ~0.5 s of CPU over a 20,000-row job and ~2.5 s over a
200,000-row job with 15 vs 58 tasks: the driver's CPU grew with the corpus although the tasks, blocks and reports
per shard did not. Executed in a coordinator, that work is the coordinator's (a fraction of one core on the
driver's node, for any corpus size); the driver blocks on the coordinator's stream of writer reports (one batch per
pipeline block, so O(shards)) and does only the job's bookkeeping.

The coordinator is a Ray task that reserves no CPU (the model and decode pools keep every CPU they were sized for)
and is pinned to the driver's node: that node's loss ends the job anyway, and the pipeline's actors, owned by the
coordinator, end with it. It is not retried (a retry would re-run the whole pipeline and repeat reports); a
failure ends the job, and a rerun resumes from the finished shards like after any crash. When the driver dies, Ray
ends the coordinator it owns, and with it the pipeline.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import numpy as np


class Coordinator:
    """Iterating yields the batches of ``dataset`` (any order, ``batch_size=None``), executed by a coordinator task;
    the caller's process only waits for them (no polling). Leaving the loop early cancels the coordinator. After
    the loop, ``cpu_s`` is the coordinator's CPU seconds over the pipeline (user + system)."""

    def __init__(self, dataset: Any) -> None:
        self.dataset = dataset
        self.cpu_s: float | None = None

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        import ray
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
        coordinator = ray.remote(_iterate).options(
            num_cpus=0, num_returns="streaming", max_retries=0, scheduling_strategy=here
        )
        stream = coordinator.remote(self.dataset)
        finished = False
        try:
            for ref in stream:
                batch = ray.get(ref)
                if CPU_KEY in batch:  # the last item
                    self.cpu_s = float(batch[CPU_KEY])
                    continue
                yield batch
            finished = True
        finally:
            if not finished:
                ray.cancel(stream)


CPU_KEY = "coordinator_cpu_s"


def _iterate(dataset: Any) -> Iterator[dict[str, Any]]:
    started = time.process_time()  # this worker runs one task at a time: its process time is this task's
    yield from dataset.iter_batches(batch_size=None, batch_format="numpy")
    yield {CPU_KEY: time.process_time() - started}
