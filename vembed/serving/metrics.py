"""The replica's batch counters as Ray Serve metrics (Prometheus, through Ray's metrics agent).

``vembed_batches_total`` and ``vembed_batch_items_total``, tagged with the ``queue`` (``text`` or ``image``);
``items / batches`` is how full the dynamic batches run (the same numbers ``GET /health`` reports). Ray Serve adds
the deployment, replica and application tags itself. Outside a Ray worker (unit tests) nothing is exported.
"""

from __future__ import annotations

import logging
from typing import Any

logger = logging.getLogger("vembed.serving")


class BatchMetrics:
    """Counters of the forward passes a replica ran and the items they encoded, per batch queue."""

    def __init__(self) -> None:
        self._batches: Any | None = None
        self._items: Any | None = None
        try:
            import ray
            from ray.serve.metrics import Counter

            if not ray.is_initialized():
                return
            self._batches = Counter(
                "vembed_batches_total", description="forward passes run by a batch queue", tag_keys=("queue",)
            )
            self._items = Counter(
                "vembed_batch_items_total", description="items encoded by a batch queue", tag_keys=("queue",)
            )
        except Exception as exc:  # metrics must never take a replica down
            logger.warning("batch metrics are not exported: %s", exc)

    def record(self, queue: str, items: int) -> None:
        """One forward pass of ``items`` items ran on ``queue``."""
        if self._batches is None or self._items is None:
            return
        self._batches.inc(1, tags={"queue": queue})
        self._items.inc(items, tags={"queue": queue})
