"""``train_loop_per_worker``: what every Ray Train worker runs (``TorchTrainer(train_loop_per_worker, ...)``).

Each worker builds the model (same seed on every rank, so freshly initialised heads agree), wraps it
for DDP or FSDP2, builds the loss, optimizer and scheduler, restores the latest Ray Train checkpoint
when the run is resumed or restarted after a failure, and runs the shared
:class:`~vembed.training.training_loop.Trainer` over its shard of the Ray Data pipeline
(``get_dataset_shard("train").iter_torch_batches``; images were decoded and tokenised in Ray Data).

The loop config is the vembed config as a dict plus the number of training records (the scheduler
needs the steps per epoch before the first batch arrives): build it with :func:`make_loop_config`.
"""

from __future__ import annotations

import concurrent.futures
import logging
import os
import threading
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Any

import ray
import ray.train
import torch
import torch.distributed as dist
from torch import nn

from vembed.config import VEmbedConfig, as_config
from vembed.training.checkpointing import TrainingProgress
from vembed.training.distributed import distributed_world, in_ray_train_local_mode, select_device, wrap_model
from vembed.training.failures import raise_user_error
from vembed.training.optimizer_builder import build_optimizer, build_scheduler
from vembed.training.progress import quiet_ray_train_reports
from vembed.training.training_loop import Trainer

if TYPE_CHECKING:
    from vembed.data.epoch_replay import EpochReplay

logger = logging.getLogger(__name__)

NUM_RECORDS_KEY = "_num_train_records"
BAD_RECORDS_KEY = "_bad_records"
EPOCH_CLOCK_KEY = "_epoch_clock"
REPLAY_BUDGET_KEY = "_replay_budget_bytes"


def make_loop_config(
    config: VEmbedConfig,
    num_train_records: int,
    bad_records: Any | None = None,
    epoch_clock: Any | None = None,
    replay_budget: float | None = None,
) -> dict[str, Any]:
    """The ``train_loop_config`` for :func:`train_loop_per_worker`.

    ``bad_records`` is the pipeline's :class:`~vembed.data.run_state.BadRecordCounter` (reported as a metric);
    ``epoch_clock`` the training data set's :class:`~vembed.data.run_state.EpochClock` (each epoch's order);
    ``replay_budget`` the bytes of preprocessed rows a single worker may keep to replay later epochs from memory
    (:class:`~vembed.data.epoch_replay.EpochReplay`; None: stream every epoch).
    """
    return {
        **config.to_dict(),
        NUM_RECORDS_KEY: int(num_train_records),
        BAD_RECORDS_KEY: bad_records,
        EPOCH_CLOCK_KEY: epoch_clock,
        REPLAY_BUDGET_KEY: replay_budget,
    }


def local_batch_size(config: VEmbedConfig, world_size: int) -> int:
    """``batch_size`` is global: each of the ``world_size`` workers takes an equal share (``per_device_batch_size``
    when that was given: the config made ``batch_size`` its multiple for ``num_workers`` workers)."""
    per_device = config.per_device_batch_size
    if per_device is not None and per_device * world_size != config.batch_size:
        raise ValueError(
            f"per_device_batch_size={per_device} was resolved for num_workers={config.num_workers} "
            f"(batch_size={config.batch_size}) but the run has {world_size} workers; set num_workers={world_size}"
        )
    if config.batch_size % world_size:
        raise ValueError(
            f"batch_size={config.batch_size} (global) does not split evenly over {world_size} workers; "
            f"use a multiple of {world_size}"
        )
    return config.batch_size // world_size


def optimizer_steps_per_epoch(num_records: int, config: VEmbedConfig, world_size: int) -> int:
    """Optimizer steps per epoch: each rank gets ``num_records // world`` records in full batches only."""
    batches = (num_records // world_size) // local_batch_size(config, world_size)
    if batches == 0:
        raise ValueError(
            f"the training set has {num_records} records, fewer than one global batch ({config.batch_size}) "
            f"over {world_size} workers; add records or lower batch_size"
        )
    return -(-batches // config.gradient_accumulation_steps)


class ShardLoader:
    """Re-iterable batches of this worker's shard of a Ray Data set, one pass per epoch.

    Training (``train=True``): equal-sized batches reshuffled per epoch by ``iter_train_batches`` (files and
    windows through ``epoch_clock``); validation: every row once, in order.

    With a ``replay`` (one training worker, rows within the cache budget), the first epoch streamed keeps its
    rows and every later epoch is made from them in this process, without Ray Data
    (:class:`~vembed.data.epoch_replay.EpochReplay`). Otherwise, when a training epoch's data runs out and a later
    epoch follows (``config.epochs``), the next epoch's pipeline is started at once in a background thread, up to
    its first batch: its start-up (a new Ray Data execution, the first blocks read and preprocessed or taken from
    the cache) overlaps the epoch's last step, the end-of-epoch checkpoint and validation instead of following
    them. The batches are the same either way: the epoch's order depends only on (seed, epoch), and the next
    execution is planned only after this one has delivered all its rows.
    """

    def __init__(
        self,
        shard: Any,
        batch_size: int,
        config: VEmbedConfig,
        train: bool,
        epoch_clock: Any | None = None,
        replay: EpochReplay | None = None,
    ) -> None:
        self.shard = shard
        self.batch_size = batch_size
        self.config = config
        self.train = train
        self.epoch_clock = epoch_clock
        self.replay = replay if train else None
        self.epoch = 0
        self.epochs_replayed = 0
        self._started: tuple[int, Iterator[dict[str, torch.Tensor]]] | None = None  # (epoch, its batches)

    def set_epoch(self, epoch: int) -> None:
        """Called by the Trainer before each epoch (selects the epoch's shuffle seed)."""
        if self._started is not None and self._started[0] != epoch:
            raise ValueError(
                f"epoch {self._started[0]} was started ahead but epoch {epoch} was asked for: a ShardLoader's "
                "training epochs run in order, one pass each"
            )
        self.epoch = epoch

    @property
    def replaying(self) -> bool:
        """True when the epochs from now on are made from the rows kept in this process."""
        return self.replay is not None and self.replay.ready

    def metrics(self) -> dict[str, float]:
        """``epochs_replayed`` (epochs this worker made from the rows it kept) and ``replay_bytes`` (their size)."""
        if self.replay is None:
            return {}
        return {"epochs_replayed": self.epochs_replayed, "replay_bytes": self.replay.nbytes}

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        streamed = not self.replaying
        if not streamed:
            batches = self.replay.batches(self.epoch, self.batch_size)
            self.epochs_replayed += 1
        elif self._started is not None:
            batches, self._started = self._started[1], None
        else:
            batches = self._batches(self.epoch)
        try:
            yield from batches
        except Exception as exc:
            raise_user_error(exc)  # the record's own message, not Ray's truncated UDF traceback
            raise
        if streamed and self.replay is not None:
            self.replay.epoch_streamed()
        if self.train and self.epoch + 1 < self.config.epochs and not self.replaying:
            self._started = (self.epoch + 1, _started_in_background(self._batches(self.epoch + 1)))

    def _batches(self, epoch: int) -> Iterator[dict[str, torch.Tensor]]:
        from vembed.data.pipeline import collate_train_batch, iter_train_batches

        if self.train:
            keep = self.replay.keep if self.replay is not None else None
            return iter_train_batches(
                self.shard, self.batch_size, self.config, epoch=epoch, epoch_clock=self.epoch_clock, keep=keep
            )
        return iter(self.shard.iter_torch_batches(batch_size=self.batch_size, collate_fn=collate_train_batch))


def _started_in_background(batches: Iterator[Any]) -> Iterator[Any]:
    """``batches`` with their first item already being fetched in a daemon thread (an exception there is raised
    where the first item is taken)."""
    first: concurrent.futures.Future[Any] = concurrent.futures.Future()

    def fetch() -> None:
        try:
            first.set_result(next(batches, _END))
        except BaseException as exc:  # handed to the consumer, not lost in the thread
            first.set_exception(exc)

    threading.Thread(target=fetch, name="vembed-next-epoch", daemon=True).start()

    def chained() -> Iterator[Any]:
        item = first.result()
        if item is _END:
            return
        yield item
        yield from batches

    return chained()


_END = object()


def build_training_model(config: VEmbedConfig) -> nn.Module:
    """The model to train: ``build_model`` plus LoRA adapters when ``use_lora`` (seeded: equal on every rank)."""
    from vembed.training.model_builder import apply_lora, build_model

    torch.manual_seed(config.seed)
    model = build_model(config)
    if config.use_lora:
        model = apply_lora(model, config)
    return model


def intra_op_threads(config: VEmbedConfig) -> int:
    """torch's intra-op threads for this worker: ``torch_threads``, or for 0 this node's cores shared equally by
    the training workers on it (``num_workers: 0`` runs in the caller's process: torch's setting there is kept).

    Ray sets ``OMP_NUM_THREADS`` in a worker process to its CPU reservation (1 by default), so torch's own default
    would leave a model trained on CPU one thread however many cores the node has (measured on 2 cores: a CLIP step
    1.7x slower than with 2 threads).
    """
    if config.torch_threads > 0:
        return config.torch_threads
    if in_ray_train_local_mode():
        return torch.get_num_threads()
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cores // max(ray.train.get_context().get_local_world_size(), 1))


def worker_node_ids() -> list[str]:
    """The Ray node id of every rank, in rank order (shows where the workers run)."""
    node = ray.get_runtime_context().get_node_id()
    _, world = distributed_world()
    if world == 1:
        return [node]
    nodes: list[str] = [""] * world
    dist.all_gather_object(nodes, node)
    return nodes


def _restore(trainer: Trainer) -> TrainingProgress | None:
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        return None
    with checkpoint.as_directory() as directory:
        progress = trainer.load_state(directory)
    logger.info("resumed from %s at epoch %d, step %d", checkpoint.path, progress.epoch, progress.step)
    return progress


def train_loop_per_worker(config: Mapping[str, Any]) -> None:
    """Train on this worker's data shard; checkpoints and their metrics go to ``ray.train.report``."""
    from vembed.data.epoch_replay import EpochReplay
    from vembed.losses.factory import LossFactory
    from vembed.training.model_builder import compile_model

    values = dict(config)
    num_records = values.pop(NUM_RECORDS_KEY, None)
    bad_records = values.pop(BAD_RECORDS_KEY, None)
    epoch_clock = values.pop(EPOCH_CLOCK_KEY, None)
    replay_budget = values.pop(REPLAY_BUDGET_KEY, None)
    cfg = as_config(values, source="train_loop_config")
    if num_records is None:
        raise ValueError(
            f"train_loop_per_worker needs '{NUM_RECORDS_KEY}' in its config; build it with "
            "vembed.training.worker.make_loop_config(config, num_train_records)"
        )
    threads = intra_op_threads(cfg)
    torch.set_num_threads(threads)
    quiet_ray_train_reports()  # vembed prints its own progress lines (vembed.training.progress)
    rank, world = distributed_world()
    device = select_device(cfg)

    model = wrap_model(build_training_model(cfg), cfg, device)
    if cfg.torch_compile:
        model = compile_model(model, cfg)
    criterion = LossFactory.create(cfg).to(device)
    optimizer = build_optimizer(model, cfg)  # the model holds the loss's scale / bias; Trainer adds the rest
    steps_per_epoch = optimizer_steps_per_epoch(num_records, cfg, world)
    scheduler, _ = build_scheduler(optimizer, cfg, max(cfg.epochs, 1), steps_per_epoch)

    batch_size = local_batch_size(cfg, world)
    replay = EpochReplay(cfg, replay_budget, bad_records) if replay_budget is not None and world == 1 else None
    shard = ray.train.get_dataset_shard("train")
    train = ShardLoader(shard, batch_size, cfg, train=True, epoch_clock=epoch_clock, replay=replay)
    val = None
    if cfg.val_data_path is not None:
        val = ShardLoader(ray.train.get_dataset_shard("val"), cfg.eval_batch_size, cfg, train=False)
    nodes = worker_node_ids()
    if rank == 0:
        logger.info("training on %d worker(s), nodes %s, device %s", world, nodes, device)

    trainer = Trainer(
        model,
        optimizer,
        train,
        criterion,
        config=cfg,
        scheduler=scheduler,
        val_dataloader=val,
        device=device,
        model_factory=lambda: build_training_model(cfg),
        run_info={"worker_node_ids": nodes, "num_nodes": len(set(nodes)), "torch_threads": threads},
        bad_records=bad_records.total if bad_records is not None else None,
        data_metrics=train.metrics,
        steps_per_epoch=steps_per_epoch,
    )
    _restore(trainer)
    trainer.train()
