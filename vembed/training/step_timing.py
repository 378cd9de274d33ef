"""Where a training worker's time goes: host-side wall-clock sums per phase of the loop.

The :class:`~vembed.training.training_loop.Trainer` adds every stretch of its loop to one phase with
``time.perf_counter`` (a few calls per step, no device synchronisation), and reports the sums of the current
metrics window as ``time_<phase>_s`` beside ``samples_per_s``, plus ``time_window_s`` (the window's wall time)
and ``time_other_s`` (whatever no phase covers: the progress printer, Python between the phases). Phases:

    epoch_start       waiting for the first batch of an epoch (the data pipeline's start for that epoch)
    data_wait         waiting for every later batch (the pipeline not keeping up with the step)
    to_device         moving the batch to the training device
    forward_backward  forward, loss, backward (and gradient synchronisation)
    optimizer         gradient clipping, optimizer and scheduler step
    reporting         metrics to the progress lines and the trackers (``report_to``)
    checkpoint        user checkpoints and resume checkpoints (written, then uploaded by Ray Train in the background)
    validation        evaluation on the validation set

On an accelerator, kernels run asynchronously: without a synchronisation the device time shows up in the phase
that next waits for the device (usually ``optimizer`` or ``reporting``), so the sums are exact on CPU and a
host-side view on GPU.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager

PHASES = (
    "epoch_start",
    "data_wait",
    "to_device",
    "forward_backward",
    "optimizer",
    "reporting",
    "checkpoint",
    "validation",
)


class StepTimes:
    """Seconds spent per phase (see :data:`PHASES`) since the last :meth:`reset`."""

    def __init__(self) -> None:
        self.seconds = dict.fromkeys(PHASES, 0.0)

    def reset(self) -> None:
        """Start a new window."""
        self.seconds = dict.fromkeys(PHASES, 0.0)

    def add(self, phase: str, seconds: float) -> None:
        """Add ``seconds`` to ``phase``."""
        self.seconds[phase] += seconds

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """Time the body of a ``with`` block as ``name``."""
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] += time.perf_counter() - start

    def as_metrics(self, window_seconds: float) -> dict[str, float]:
        """``time_<phase>_s`` for every phase, ``time_window_s`` and ``time_other_s`` (the rest of the window)."""
        metrics = {f"time_{name}_s": value for name, value in self.seconds.items()}
        metrics["time_window_s"] = window_seconds
        metrics["time_other_s"] = max(0.0, window_seconds - sum(self.seconds.values()))
        return metrics


def breakdown_table(metrics: dict[str, float]) -> str:
    """A one-line summary ``phase share%`` of the ``time_*`` metrics of one window (for benchmarks and logs)."""
    window = metrics.get("time_window_s") or 0.0
    if window <= 0:
        return "no timing"
    parts = [f"{name} {metrics.get(f'time_{name}_s', 0.0) / window:.1%}" for name in (*PHASES, "other")]
    return ", ".join(parts)
