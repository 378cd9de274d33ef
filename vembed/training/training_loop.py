"""``Trainer``: the one training step of vembed, used by every way of running it.

The same loop runs

- inside a Ray Train worker (the primary path, see :mod:`vembed.training.worker`): resume checkpoints,
  with the metrics of their step, go through ``ray.train.report`` (uploaded in the background); the metrics
  of every logging window go to the progress lines and the trackers;
- with an ``accelerate.Accelerator`` (the seed guide's custom loop): the accelerator prepares the
  model, optimizer and data, and does backward, clipping and autocast;
- as a plain single process.

Rank and world size always come from ``torch.distributed`` (Ray Train and accelerate both set up the
default process group), so one code path serves all three.

One optimizer step: for each of ``gradient_accumulation_steps`` micro-batches, forward (under
autocast where configured), add the frozen teacher's embeddings when distilling, loss, backward
(gradient synchronisation only on the window's last micro-batch); then average the gradients of
parameters outside the wrapped model (the loss's temperature), clip, step the optimizer and the
scheduler. With ``grad_cache`` the micro-step is a :class:`~vembed.training.grad_cache.GradCache`
step (the whole batch's loss in chunk-sized memory) instead.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import shutil
import signal
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from vembed.config import VEmbedConfig, as_config
from vembed.losses.distributed import all_gather_with_grad
from vembed.losses.scale import clamp_after_step
from vembed.model.st_export import push_to_hub, update_model_card
from vembed.training.checkpointing import (
    TrainingProgress,
    load_training_state,
    save_training_state,
    save_user_checkpoint,
)
from vembed.training.distributed import (
    autocast_dtype,
    average_gradients,
    clip_grad_norm,
    distributed_world,
    in_ray_train_local_mode,
    in_ray_train_worker,
    is_sharded,
    unwrap_model,
)
from vembed.training.grad_cache import GradCache
from vembed.training.optimizer_builder import add_missing_parameters
from vembed.training.progress import ProgressPrinter
from vembed.training.step_timing import StepTimes
from vembed.training.tracking import Trackers

logger = logging.getLogger(__name__)

Batch = Mapping[str, Any]
TEACHER_ROLES = ("query", "positive", "negatives")
RESOLVED_CONFIG_FILE = "config.yaml"
RETRIEVAL_KS = (1, 5, 10)


def _with_last_flag(iterable: Iterable[Batch]) -> Iterator[tuple[Batch, bool]]:
    """Yield ``(item, is_last)``: the loop must know the epoch's last batch before its backward."""
    iterator = iter(iterable)
    try:
        current = next(iterator)
    except StopIteration:
        return
    for upcoming in iterator:
        yield current, False
        current = upcoming
    yield current, True


def _to_device(batch: Batch, device: torch.device) -> dict[str, Any]:
    return {k: v.to(device, non_blocking=True) if isinstance(v, Tensor) else v for k, v in batch.items()}


def _batch_rows(batch: Batch) -> int:
    return next((v.shape[0] for v in batch.values() if isinstance(v, Tensor) and v.dim() > 0), 0)


def _mean_across_ranks(values: list[float], device: torch.device) -> list[float]:
    """Average a few floats over all ranks (one small all-reduce); identity without a process group."""
    _, world = distributed_world()
    if world == 1:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return (t / world).tolist()


class Trainer:
    """Contrastive training loop: ``Trainer(model, optimizer, dataloader, criterion, ...).train()``.

    Args:
        model: the embedding model; ``model(**batch)`` returns ``{"query", "positive", ...}``. Already
            wrapped for DDP/FSDP (or to be prepared by ``accelerator``).
        optimizer: e.g. :func:`~vembed.training.optimizer_builder.build_optimizer`; trainable parameters of
            ``criterion`` it lacks are added (and ``scheduler`` extended to them).
        dataloader: re-iterable batches (dicts of tensors); ``set_epoch(epoch)`` is called when present.
        criterion: ``criterion(outputs, batch) -> scalar``, e.g. ``LossFactory.create(config)``; moved to
            ``device``.
        accelerator: an ``accelerate.Accelerator``; unprepared model/optimizer/data are prepared here.
        config: the vembed config (dict or ``VEmbedConfig``); ``epochs``, ``gradient_accumulation_steps``,
            ``max_grad_norm``, ``mixed_precision``, ``logging_steps``, ``eval_steps``, ``save_steps``,
            ``output_dir``, ``grad_cache``, ``teacher_model_name``, ``fail_at_step`` are read from it.
        scheduler: stepped once per optimizer step.
        val_dataloader: validation batches (validation loss and retrieval metrics).
        teacher: a frozen teacher model for distillation; built from ``teacher_model_name`` when None.
        device: where batches go; default: the model's device (the accelerator's with one).
        progress: where to start (resume); default the beginning.
        model_factory: builds an unsharded model of the same architecture (FSDP user checkpoints).
        run_info: constant values added to every metrics report (e.g. worker node ids).
        bad_records: returns the number of records skipped as unreadable so far (reported as metric).
        data_metrics: returns more metrics of the data loading to report (e.g. epochs replayed from memory).
        steps_per_epoch: optimizer steps per epoch, for the progress lines' ``step s/S`` and ETA (default:
            from ``len(dataloader)`` when it has one).
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        dataloader: Iterable[Batch],
        criterion: Callable[..., Tensor],
        accelerator: Any | None = None,
        config: VEmbedConfig | Mapping[str, Any] | None = None,
        scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
        *,
        val_dataloader: Iterable[Batch] | None = None,
        teacher: nn.Module | None = None,
        device: torch.device | None = None,
        progress: TrainingProgress | None = None,
        model_factory: Callable[[], nn.Module] | None = None,
        run_info: Mapping[str, Any] | None = None,
        bad_records: Callable[[], int] | None = None,
        data_metrics: Callable[[], Mapping[str, Any]] | None = None,
        steps_per_epoch: int | None = None,
    ) -> None:
        self.config = as_config(config)
        cfg = self.config
        if cfg.grad_cache and cfg.mixed_precision == "fp16":
            raise ValueError("grad_cache does not support mixed_precision=fp16 (no loss scaling); use bf16 or no")
        if cfg.grad_cache and cfg.gradient_accumulation_steps > 1:
            raise ValueError(
                "grad_cache and gradient_accumulation_steps > 1 do not combine: GradCache already computes the "
                "loss of the whole batch in chunks; raise batch_size instead of accumulating"
            )
        self.accelerator = accelerator
        if accelerator is not None:
            _refuse_accelerate_fsdp(accelerator, model)
            model, optimizer, dataloader, val_dataloader = self._prepare_with_accelerator(
                model, optimizer, dataloader, val_dataloader
            )
        self.model = model
        self.optimizer = optimizer
        self.dataloader = dataloader
        self.val_dataloader = val_dataloader
        self.scheduler = scheduler
        self.device = device or (accelerator.device if accelerator is not None else _model_device(model))
        self.criterion = self._attach_criterion(criterion, optimizer, scheduler)
        self.progress = progress or TrainingProgress()
        self.model_factory = model_factory
        self.run_info = dict(run_info or {})
        self.bad_records = bad_records
        self.data_metrics = data_metrics
        self.steps_per_epoch = steps_per_epoch or _steps_from_len(dataloader, cfg.gradient_accumulation_steps)
        self.output_dir = Path(cfg.output_dir)
        self.in_ray = in_ray_train_worker()
        self.rank, self.world_size = distributed_world()
        self.history: list[dict[str, Any]] = []

        self.teacher = teacher if teacher is not None else self._load_teacher()
        self._amp_dtype = None if accelerator is not None or is_sharded(model) else autocast_dtype(cfg, self.device)
        self._scaler = torch.amp.GradScaler("cuda") if self._amp_dtype == torch.float16 else None
        model_params = {id(p) for p in model.parameters()}
        self._params = [p for group in optimizer.param_groups for p in group["params"]]
        self._unsynced_params = [p for p in self._params if id(p) not in model_params]
        self._grad_cache = GradCache(model, self._loss, cfg.grad_cache_chunk_size) if cfg.grad_cache else None
        self._window = _MetricWindow()
        self._trackers = Trackers(cfg.report_to, self.output_dir, cfg.to_dict(), rank=self.rank)
        self._printer: ProgressPrinter | None = None

    # -- set-up ---------------------------------------------------------------------------------
    def _prepare_with_accelerator(self, model, optimizer, dataloader, val_dataloader):
        """``accelerator.prepare`` whatever the caller has not prepared yet (the scheduler stays ours)."""
        from accelerate.optimizer import AcceleratedOptimizer

        if isinstance(optimizer, AcceleratedOptimizer):
            return model, optimizer, dataloader, val_dataloader
        if val_dataloader is None:
            model, optimizer, dataloader = self.accelerator.prepare(model, optimizer, dataloader)
            return model, optimizer, dataloader, None
        return self.accelerator.prepare(model, optimizer, dataloader, val_dataloader)

    def _attach_criterion(
        self,
        criterion: Callable[..., Tensor],
        optimizer: torch.optim.Optimizer,
        scheduler: torch.optim.lr_scheduler.LRScheduler | None,
    ) -> Callable[..., Tensor]:
        """Make the loss's own parameters train: move the criterion to the training device, add its trainable
        parameters the optimizer lacks (``build_optimizer(model, config)`` cannot see a loss built after it), and
        clamp its learned temperatures after every optimizer step. A model that holds the loss's logit scale /
        bias (``build_model``) trains those itself; the loss's own copies are then unused and not added."""
        if not isinstance(criterion, nn.Module):
            return criterion
        criterion.to(self.device)
        held = getattr(unwrap_model(self.model), "logit_parameters", None) is not None
        unused = criterion.own_logit_parameters() if held and hasattr(criterion, "own_logit_parameters") else []
        added = add_missing_parameters(optimizer, criterion, self.config, scheduler, exclude=unused)
        if added:
            logger.info("added %d trainable parameter(s) of %s to the optimizer", added, type(criterion).__name__)
        clamp_after_step(optimizer, criterion)
        return criterion

    def _load_teacher(self) -> nn.Module | None:
        """The frozen teacher named by ``teacher_model_name``; refused when its preprocessing is not the student's."""
        cfg = self.config
        if cfg.teacher_model_name is None:
            return None
        if cfg.loss_type != "distillation":
            raise ValueError(
                f"teacher_model_name is set but loss_type is {cfg.loss_type!r}; set loss_type: distillation "
                "(or drop teacher_model_name)"
            )
        from vembed.training.teacher import load_teacher

        return load_teacher(cfg, self.device)

    # -- the step ---------------------------------------------------------------------------------
    def _autocast(self) -> contextlib.AbstractContextManager[Any]:
        if self.accelerator is not None:
            return self.accelerator.autocast()
        if self._amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self._amp_dtype)

    def _no_sync(self) -> contextlib.AbstractContextManager[Any]:
        if self.accelerator is not None:
            return self.accelerator.no_sync(self.model)
        no_sync = getattr(self.model, "no_sync", None)
        return no_sync() if no_sync is not None else contextlib.nullcontext()

    def _teacher_outputs(self, batch: Batch) -> dict[str, Tensor]:
        if self.teacher is None:
            return {}
        with torch.no_grad():
            outputs = self.teacher(**batch)
        return {f"teacher_{role}": outputs[role] for role in TEACHER_ROLES if outputs.get(role) is not None}

    def _loss(self, outputs: Mapping[str, Tensor], batch: Batch) -> Tensor:
        """The criterion on the model's outputs (plus the teacher's embeddings when distilling)."""
        return self.criterion({**outputs, **self._teacher_outputs(batch)}, batch)

    def _backward(self, loss: Tensor) -> None:
        if self.accelerator is not None:
            self.accelerator.backward(loss)
        elif self._scaler is not None:
            self._scaler.scale(loss).backward()
        else:
            loss.backward()

    def _micro_step(self, batch: Batch, sync: bool) -> Tensor:
        """Forward + backward of one micro-batch; gradients are synchronised only when ``sync``."""
        with contextlib.nullcontext() if sync else self._no_sync(), self._autocast():
            if self._grad_cache is not None:
                return self._grad_cache.step(batch)
            loss = self._loss(self.model(**batch), batch)
            self._backward(loss / self.config.gradient_accumulation_steps)
        return loss.detach()

    def _optimizer_step(self, window: int) -> Tensor | float:
        """Clip, step and zero; ``window`` micro-batches contributed (fewer than configured at an epoch's end)."""
        accumulation = self.config.gradient_accumulation_steps
        if window != accumulation:  # the loss was divided by the configured count: rescale to a mean
            for p in self._params:
                if p.grad is not None:
                    p.grad.mul_(accumulation / window)
        average_gradients(self._unsynced_params)
        if self._scaler is not None:
            self._scaler.unscale_(self.optimizer)
        if self.accelerator is not None and self.config.max_grad_norm > 0:
            grad_norm = self.accelerator.clip_grad_norm_(self._params, self.config.max_grad_norm)
        else:
            grad_norm = clip_grad_norm(self._params, self.config.max_grad_norm)
        if self._scaler is not None:
            self._scaler.step(self.optimizer)
            self._scaler.update()
        else:
            self.optimizer.step()
        if self.scheduler is not None:
            self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.progress.step += 1
        return grad_norm.detach() if isinstance(grad_norm, Tensor) else grad_norm  # read at report time: no sync

    # -- the loop ---------------------------------------------------------------------------------
    def train(self) -> dict[str, Any]:
        """Run from ``progress`` to ``config.epochs``; returns the last reported metrics."""
        cfg = self.config
        if self.rank == 0:
            cfg.save(self.output_dir / RESOLVED_CONFIG_FILE)
        self._printer = ProgressPrinter(
            cfg.epochs, self.steps_per_epoch, start_step=self.progress.step, enabled=self.rank == 0
        )
        self.model.train()
        for epoch in range(self.progress.epoch, cfg.epochs):
            self._run_epoch(epoch)
            self.progress = TrainingProgress(epoch=epoch + 1, batches_done=0, step=self.progress.step)
            metrics = self._metrics(epoch)
            times = self._window.times
            if self.val_dataloader is not None and cfg.eval_steps == 0:
                with times.phase("validation"):
                    metrics.update(self.evaluate())
            with times.phase("checkpoint"):
                checkpoint = save_user_checkpoint(
                    self.model, self.output_dir / f"checkpoint-epoch-{epoch + 1}", cfg, self.model_factory
                )
                if self.rank == 0:
                    card_metrics = {k: v for k, v in metrics.items() if not k.startswith("time_")}
                    update_model_card(checkpoint, cfg, card_metrics)  # base model, data and this epoch's metrics
            self._report(metrics, with_checkpoint=True)
        self._trackers.close()
        if cfg.push_to_hub and self.rank == 0 and cfg.epochs > 0:
            url = push_to_hub(self.output_dir / f"checkpoint-epoch-{cfg.epochs}", cfg.push_to_hub)
            logger.info("pushed the last checkpoint to %s", url)
        self._printer.close(self.history)
        return self.history[-1] if self.history else {}

    def _run_epoch(self, epoch: int) -> None:
        cfg = self.config
        torch.manual_seed(cfg.seed + 1000 * epoch + self.rank)  # a torch DataLoader's shuffle: the same on resume
        if hasattr(self.dataloader, "set_epoch"):
            self.dataloader.set_epoch(epoch)
        skip = self.progress.batches_done if epoch == self.progress.epoch else 0
        window = 0
        self.progress.epoch = epoch
        times = self._window.times
        batches = enumerate(_with_last_flag(self.dataloader))
        waited_for = "epoch_start"
        while True:
            start = time.perf_counter()
            item = next(batches, None)
            moved = time.perf_counter()
            times.add(waited_for, moved - start)
            waited_for = "data_wait"
            if item is None:
                break
            index, (batch, last) = item
            if index < skip:
                continue  # trained on before the checkpoint we resumed from
            torch.manual_seed(_micro_batch_seed(cfg.seed, epoch, index, self.rank))  # dropout: the same on resume
            batch = _to_device(batch, self.device)
            computed = time.perf_counter()
            times.add("to_device", computed - moved)
            window += 1
            sync = window == cfg.gradient_accumulation_steps or last
            loss = self._micro_step(batch, sync)
            self._window.add(loss, _batch_rows(batch))
            self.progress.batches_done = index + 1
            stepped = time.perf_counter()
            times.add("forward_backward", stepped - computed)
            if sync:
                self._window.grad_norm = self._optimizer_step(window)
                window = 0
                times.add("optimizer", time.perf_counter() - stepped)
                self._after_step(epoch)
        if self.progress.batches_done == 0:
            raise ValueError(
                f"epoch {epoch} produced no batches on rank {self.rank}: the data set is empty or smaller than one "
                f"global batch ({cfg.batch_size} records)"
            )

    def _after_step(self, epoch: int) -> None:
        cfg, step = self.config, self.progress.step
        self._maybe_fail(step)
        if self._printer is not None:
            self._printer.tick(step)
        metrics: dict[str, Any] = {}
        if cfg.logging_steps > 0 and step % cfg.logging_steps == 0:
            metrics = self._metrics(epoch)
        if self.val_dataloader is not None and cfg.eval_steps > 0 and step % cfg.eval_steps == 0:
            metrics = metrics or self._metrics(epoch)
            with self._window.times.phase("validation"):
                metrics.update(self.evaluate())
        checkpoint = cfg.save_steps > 0 and step % cfg.save_steps == 0
        if checkpoint:
            metrics = metrics or self._metrics(epoch)
            with self._window.times.phase("checkpoint"):
                save_user_checkpoint(self.model, self.output_dir / f"checkpoint-step-{step}", cfg, self.model_factory)
        if metrics:
            self._report(metrics, with_checkpoint=checkpoint)

    def _maybe_fail(self, step: int) -> None:
        """Fault injection for tests: at ``fail_at_step`` rank 0 of a Ray run kills its own process, once."""
        if self.config.fail_at_step != step or self.rank != 0 or not self.in_ray:
            return
        import ray.train

        storage = ray.train.get_context().get_storage()
        marker = f"{storage.experiment_fs_path}/.fail_at_step_{step}.done"
        fs = storage.storage_filesystem
        if fs.get_file_info(marker).type.name != "NotFound":
            return  # already failed once: this is the restarted run
        with fs.open_output_stream(marker) as out:
            out.write(b"killed\n")
        logger.warning("fail_at_step=%d: rank 0 kills its own process (pid %d)", step, os.getpid())
        os.kill(os.getpid(), signal.SIGKILL)

    # -- metrics, validation, reporting -----------------------------------------------------------
    def _metrics(self, epoch: int) -> dict[str, Any]:
        """Loss (mean over ranks and steps since the last report), lr, samples/s and progress."""
        loss, samples_per_s, times = self._window.flush()
        loss, samples_per_s = _mean_across_ranks([loss, samples_per_s], self.device)
        metrics = {
            "loss": loss,
            "lr": self.optimizer.param_groups[0]["lr"],
            "samples_per_s": samples_per_s * self.world_size,
            "grad_norm": float(self._window.grad_norm),
            "epoch": epoch + 1,
            "step": self.progress.step,
            "world_size": self.world_size,
        }
        if self.bad_records is not None:
            metrics["bad_records"] = self.bad_records()
        if self.data_metrics is not None:
            metrics.update(self.data_metrics())
        return {**metrics, **times, **self.run_info}  # times: this rank's (see vembed.training.step_timing)

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Validation loss and retrieval metrics (query vs positives of the whole validation set)."""
        from vembed.evaluation.metrics import retrieval_metrics

        self.model.eval()
        losses, roles, labels = [], {"query": [], "positive": [], "query_mask": [], "positive_mask": []}, []
        for batch in self.val_dataloader:
            batch = _to_device(batch, self.device)
            with self._autocast():
                outputs = self.model(**batch)
                losses.append(float(self._loss(outputs, batch)))
            for role, store in roles.items():
                if outputs.get(role) is not None:
                    store.append(outputs[role].float())
            if batch.get("labels") is not None:
                labels.append(batch["labels"])
        self.model.train()
        if not losses:
            raise ValueError("the validation data set produced no batches on this rank; is val_data_path empty?")
        gathered = {r: all_gather_with_grad(torch.cat(v)).tensor.cpu() for r, v in roles.items() if v}
        (val_loss,) = _mean_across_ranks([sum(losses) / len(losses)], self.device)
        relevance: dict[str, Any]
        if labels:
            label_tensor = all_gather_with_grad(torch.cat(labels)).tensor.cpu()
            relevance = {"query_labels": label_tensor.tolist(), "cand_labels": label_tensor.tolist()}
        else:
            relevance = {"relevant": [[i] for i in range(gathered["query"].shape[0])]}
        scores = retrieval_metrics(
            gathered["query"],
            gathered["positive"],
            ks=[k for k in RETRIEVAL_KS if k <= gathered["positive"].shape[0]],
            query_mask=gathered.get("query_mask"),
            cand_mask=gathered.get("positive_mask"),
            **relevance,
        )
        return {"val_loss": val_loss, **{f"val_{k}": float(v) for k, v in scores.items()}}

    def _report(self, metrics: dict[str, Any], with_checkpoint: bool) -> None:
        """Hand metrics to Ray Train (with a resume checkpoint when asked), accelerate or the log."""
        with self._window.times.phase("checkpoint" if with_checkpoint else "reporting"):
            self._report_now(metrics, with_checkpoint)

    def _report_now(self, metrics: dict[str, Any], with_checkpoint: bool) -> None:
        self.history.append(metrics)
        if self._printer is not None:
            self._printer.report(metrics)  # the readable line (rank 0); the full dict goes to the debug log
        logger.debug(_format(metrics))
        self._trackers.log(metrics, self.progress.step)  # report_to: tensorboard / wandb / mlflow (rank 0)
        if self.in_ray and with_checkpoint:
            self._report_to_ray(metrics)

    def _report_to_ray(self, metrics: dict[str, Any]) -> None:
        """Register a resume checkpoint (with its metrics) with Ray Train, uploaded in the background.

        Only checkpoints go to ``ray.train.report``; the metrics of every logging window reach the progress
        lines, the trackers and ``history`` directly. Ray Train's controller takes one report per health-check
        poll (every 2 s), so a report made less than 2 s after the previous one would block training until then.
        ``CheckpointUploadMode.ASYNC`` also keeps the upload to ``storage_path`` off the training thread; Ray
        deletes the local directory once uploaded, and the run's end waits for pending uploads.
        """
        import ray.train

        if in_ray_train_local_mode():  # num_workers=0: no storage to resume from
            ray.train.report(metrics)
            return
        local = tempfile.mkdtemp(prefix="vembed-ckpt-")
        checkpoint = None
        if save_training_state(
            local, self.model, self.optimizer, self.scheduler, self.progress, self._stateful_modules()
        ):
            checkpoint = ray.train.Checkpoint.from_directory(local)
        else:
            shutil.rmtree(local, ignore_errors=True)  # this rank wrote nothing
        ray.train.report(metrics, checkpoint=checkpoint, checkpoint_upload_mode=ray.train.CheckpointUploadMode.ASYNC)

    def _stateful_modules(self) -> dict[str, Any]:
        """Resume state beside model and optimizer: the loss's parameters and fp16's loss scale."""
        modules: dict[str, Any] = {"loss": self.criterion} if isinstance(self.criterion, nn.Module) else {}
        if self._scaler is not None:
            modules["grad_scaler"] = self._scaler
        return modules

    def load_state(self, directory: str | Path) -> TrainingProgress:
        """Resume from a directory written by a resume checkpoint (model, optimizer, scheduler, progress)."""
        self.progress = load_training_state(
            directory, self.model, self.optimizer, self.scheduler, self._stateful_modules()
        )
        return self.progress

    @property
    def unwrapped_model(self) -> nn.Module:
        """The model without DDP / compile / accelerate wrappers."""
        if self.accelerator is not None:
            return self.accelerator.unwrap_model(self.model)
        return unwrap_model(self.model)


class _MetricWindow:
    """Loss, throughput and the time per loop phase accumulated since the last report."""

    def __init__(self) -> None:
        self.grad_norm: Tensor | float = 0.0
        self.times = StepTimes()
        self._last: tuple[float, float, dict[str, float]] = (float("nan"), 0.0, {})
        self._reset()

    def _reset(self) -> None:
        self._loss_sum: Tensor | float = 0.0  # stays on the loss's device: no host sync per step
        self._batches = 0
        self._samples = 0
        self._start = time.perf_counter()
        self.times.reset()

    def add(self, loss: Tensor, samples: int) -> None:
        self._loss_sum = self._loss_sum + loss.detach().double()
        self._batches += 1
        self._samples += samples

    def flush(self) -> tuple[float, float, dict[str, float]]:
        """(mean loss, samples/s of this rank, its time per phase) since the last flush, or the previous values
        when no step happened since (an epoch-end report right after a logging step); resets the window."""
        if self._batches:
            elapsed = max(time.perf_counter() - self._start, 1e-9)
            loss = float(self._loss_sum) / self._batches
            self._last = (loss, self._samples / elapsed, self.times.as_metrics(elapsed))
        self._reset()
        return self._last


def _steps_from_len(dataloader: Any, accumulation: int) -> int | None:
    """Optimizer steps per epoch of a dataloader with a length (None without one)."""
    try:
        batches = len(dataloader)
    except TypeError:
        return None
    return -(-batches // accumulation) if batches else None


def _micro_batch_seed(seed: int, epoch: int, index: int, rank: int) -> int:
    """The RNG seed of one micro-batch (dropout): a function of where it is in the run, so a run resumed
    mid-epoch draws the masks an uninterrupted one draws, with no RNG state to checkpoint."""
    digest = hashlib.sha256(f"{seed}:{epoch}:{index}:{rank}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def _refuse_accelerate_fsdp(accelerator: Any, model: nn.Module) -> None:
    """FSDP through ``accelerate`` is not supported: its FSDP-wrapped / ``DTensor`` weights cannot be saved as a
    vembed checkpoint here, so the run would train and then fail at its first save. vembed's FSDP2 path (sharded
    resume checkpoints, gathered user checkpoints) runs under Ray Train."""
    from torch.distributed.fsdp import FullyShardedDataParallel

    wrapped = isinstance(model, FullyShardedDataParallel) or is_sharded(model)
    if getattr(accelerator, "distributed_type", None) == "FSDP" or wrapped:  # DistributedType is a str enum
        raise ValueError(
            "Trainer does not support FSDP through accelerate.Accelerator (its sharded weights cannot be saved "
            "as a vembed checkpoint). Train with FSDP under Ray Train instead: set strategy: fsdp and run "
            "`vembed train cfg.yaml --config_override strategy=fsdp num_workers=N` or "
            "VEmbedFactoryTrainer(..., strategy='fsdp', num_workers=N); or use the Accelerator without FSDP (DDP)"
        )


def _model_device(model: nn.Module) -> torch.device:
    param = next(model.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


def _format(metrics: Mapping[str, Any]) -> str:
    return " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in metrics.items())
