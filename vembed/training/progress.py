"""What a person watching a training run reads: one line per ``logging_steps``, validation results, a summary.

Rank 0 prints (every other rank stays quiet), to stdout, flushed, so the lines reach the driver's terminal from a
Ray Train worker as they happen::

    vembed: epoch 1/3  step 5/24 (21%)  loss 2.0794  lr 1.00e-03  212.4 samples/s  ETA 0:00:11
    vembed: validation at step 8 (epoch 1): val_loss 1.8123  val_recall@1 0.4062  val_mrr 0.5521
    vembed: training done in 0:00:17, 24 steps
      epoch  step    loss  val_loss  val_recall@1
          1     8  2.0012    1.8123        0.4062
          ...

A ``tqdm`` progress bar is drawn on stderr as well when stderr is a terminal (never in logs, CI or a Ray worker
whose output is piped). Ray Train's own per-report dump (``Reporting training result N: TrainingReport(...)``)
is silenced by :func:`quiet_ray_train_reports`.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Mapping, Sequence
from datetime import timedelta
from typing import Any, TextIO

PREFIX = "vembed:"
SUMMARY_KEYS = ("loss", "val_loss", "val_recall@1", "val_recall@5", "val_ndcg@10", "val_mrr")
# Validation results the progress line shows (all of them still go to Ray Train, the trackers and the history).
VALIDATION_PREFIXES = ("val_loss", "val_recall@", "val_ndcg@10", "val_mrr", "val_map")


def _duration(seconds: float) -> str:
    return str(timedelta(seconds=max(0, round(seconds))))


def quiet_ray_train_reports() -> None:
    """Silence Ray Train's INFO line for every ``ray.train.report`` (a full ``TrainingReport`` repr per step).

    Its logger is named after its file, so it is found through the module; a Ray without it is left alone.
    """
    try:
        from ray.train.v2._internal.execution import context
    except ImportError:
        return
    logger = getattr(context, "logger", None)
    if isinstance(logger, logging.Logger):
        logger.setLevel(logging.WARNING)


class ProgressPrinter:
    """Readable progress of one training run (rank 0 only; every method is a no-op on other ranks).

    Args:
        epochs: the run's epochs; ``steps_per_epoch``: optimizer steps per epoch (None when unknown: no
            ``/total`` and no ETA).
        start_step: the step the run starts (or resumes) from, so the ETA counts only this run's steps.
        enabled: False on ranks other than 0.
        bar: draw a tqdm bar (default: when ``stream`` is a terminal and tqdm is installed).
    """

    def __init__(
        self,
        epochs: int,
        steps_per_epoch: int | None,
        start_step: int = 0,
        enabled: bool = True,
        stream: TextIO | None = None,
        bar: bool | None = None,
    ) -> None:
        self.epochs = epochs
        self.total = steps_per_epoch * epochs if steps_per_epoch else None
        self.enabled = enabled
        self.stream = stream or sys.stdout
        self.start_step = start_step
        self.started = time.perf_counter()
        self.rows: list[dict[str, Any]] = []
        self._last_step: int | None = None
        self._bar = self._open_bar(bar) if enabled else None

    def _open_bar(self, bar: bool | None) -> Any | None:
        if bar is None:
            bar = sys.stderr.isatty()
        if not bar:
            return None
        try:
            from tqdm.auto import tqdm
        except ImportError:
            return None
        return tqdm(total=self.total, initial=self.start_step, unit="step", desc="vembed", leave=False)

    def _print(self, text: str) -> None:
        if self._bar is not None:
            self._bar.write(text, file=self.stream)
        else:
            print(text, file=self.stream, flush=True)

    def tick(self, step: int, loss: float | None = None) -> None:
        """One optimizer step done (moves the bar)."""
        if self._bar is not None:
            self._bar.n = step
            if loss is not None:
                self._bar.set_postfix(loss=f"{loss:.4f}", refresh=False)
            self._bar.refresh()

    def eta(self, step: int) -> float | None:
        """Seconds left at ``step``, from this run's mean time per step so far (None when unknown)."""
        done = step - self.start_step
        if self.total is None or done <= 0:
            return None
        return (time.perf_counter() - self.started) / done * max(self.total - step, 0)

    def step_line(self, metrics: Mapping[str, Any]) -> str:
        """``epoch e/E  step s/S (p%)  loss  lr  samples/s  ETA`` for one report."""
        step = int(metrics.get("step", 0))
        parts = [f"epoch {metrics.get('epoch', '?')}/{self.epochs}"]
        if self.total:
            parts.append(f"step {step}/{self.total} ({100 * step // self.total}%)")
        else:
            parts.append(f"step {step}")
        if isinstance(metrics.get("loss"), float):
            parts.append(f"loss {metrics['loss']:.4f}")
        if isinstance(metrics.get("lr"), float):
            parts.append(f"lr {metrics['lr']:.2e}")
        if isinstance(metrics.get("samples_per_s"), float):
            parts.append(f"{metrics['samples_per_s']:.1f} samples/s")
        eta = self.eta(step)
        if eta is not None:
            parts.append(f"ETA {_duration(eta)}")
        return f"{PREFIX} " + "  ".join(parts)

    def report(self, metrics: Mapping[str, Any]) -> None:
        """Print the step line, and the validation line when ``metrics`` holds validation results."""
        if not self.enabled:
            return
        self.rows.append(dict(metrics))
        step = metrics.get("step")
        if step != self._last_step:  # an epoch-end report right after a logging step repeats the same numbers
            self._print(self.step_line(metrics))
            self._last_step = step
        validation = {
            k: v
            for k, v in metrics.items()
            if k.startswith(VALIDATION_PREFIXES) and not k.startswith("val_mrr@") and isinstance(v, (int, float))
        }
        if validation:
            values = "  ".join(f"{k} {v:.4f}" for k, v in validation.items())
            self._print(f"{PREFIX} validation at step {metrics.get('step')} (epoch {metrics.get('epoch')}): {values}")

    def summary(self, history: Sequence[Mapping[str, Any]] | None = None) -> str:
        """The final table: one row per step that closed an epoch or held validation results."""
        merged: dict[Any, dict[str, Any]] = {}  # reports of one step (logging, validation, epoch end) are one row
        for row in history if history is not None else self.rows:
            merged.setdefault(row.get("step"), {}).update(row)
        rows = list(merged.values())
        epoch_ends = {row.get("epoch"): id(row) for row in rows}
        table = [r for r in rows if id(r) in epoch_ends.values() or any(k.startswith("val_") for k in r)]
        columns = ["epoch", "step", *[k for k in SUMMARY_KEYS if any(k in r for r in table)]]
        cells = [[_cell(row.get(c)) for c in columns] for row in table]
        widths = [max(len(c), *(len(line[i]) for line in cells)) for i, c in enumerate(columns)]
        lines = ["  ".join(c.rjust(w) for c, w in zip(columns, widths, strict=True))]
        lines += ["  ".join(v.rjust(w) for v, w in zip(line, widths, strict=True)) for line in cells]
        return "\n".join("  " + line for line in lines)

    def close(self, history: Sequence[Mapping[str, Any]] | None = None) -> None:
        """Close the bar and print the run's duration and the summary table."""
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        rows = list(history if history is not None else self.rows)
        steps = rows[-1].get("step", 0) if rows else 0
        self._print(f"{PREFIX} training done in {_duration(time.perf_counter() - self.started)}, {steps} steps")
        if rows:
            self._print(self.summary(rows))


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4f}"
    return str(value)
