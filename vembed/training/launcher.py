"""``run_training(config)``: build and run the Ray Train ``TorchTrainer`` for a vembed config.

The driver (this module) resolves paths, connects to Ray (``RAY_ADDRESS`` when set, else a local
instance), checks that the cluster can host the requested workers (a clear error instead of a run
that waits for resources forever), builds the Ray Data pipelines and hands everything to
``TorchTrainer(train_loop_per_worker, ...)``. A rerun with the same ``storage_path`` and
``run_name`` resumes from that run's latest checkpoint (Ray Train V2 restores it by name).
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, NamedTuple

import ray
import ray.train
from ray.train.torch import TorchTrainer

from vembed.config import ConfigError, VEmbedConfig, as_config
from vembed.training.failures import raise_user_error
from vembed.training.preflight import check_sources
from vembed.training.worker import make_loop_config, train_loop_per_worker

logger = logging.getLogger(__name__)

DATA_PIPELINE_CPUS = 2
"""CPUs the training data pipeline needs next to the workers: one read task plus one preprocessing task.
With fewer, the workers wait for batches that are never produced."""


def resolve_run_paths(config: VEmbedConfig) -> VEmbedConfig:
    """Absolute ``output_dir`` and ``storage_path`` (workers run in other directories), and a ``run_name``.

    Defaults: ``storage_path = output_dir/ray_results``, ``run_name = basename(output_dir)``.
    """
    output_dir = Path(config.output_dir).expanduser().resolve()
    storage = config.storage_path or str(output_dir / "ray_results")
    if "://" not in storage:
        storage = str(Path(storage).expanduser().resolve())
    return config.replace(output_dir=str(output_dir), storage_path=storage, run_name=config.run_name or output_dir.name)


def local_ray_cpus(config: VEmbedConfig) -> int:
    """Logical CPUs of a local Ray started for ``config``: the machine's cores, or more when ``num_workers``
    workers plus the data pipeline need more (they then share the cores), so the default run works on a 2-core
    laptop too."""
    # Before Ray is up, "auto" cannot see GPUs: size for CPU workers, the larger CPU reservation.
    per_worker = worker_resources(config, use_gpu=config.use_gpu is True).get("CPU", 0.0)
    return max(os.cpu_count() or 1, math.ceil(per_worker * config.num_workers) + DATA_PIPELINE_CPUS)


# The local Ray instance this process started (its GCS address and logical CPUs), so a later, larger run in the
# same process (a notebook: 1 worker, then 4) can restart it bigger; a Ray someone else started is never touched.
_started_here: dict[str, Any] = {}


def ensure_ray(config: VEmbedConfig) -> None:
    """Connect to the cluster at ``RAY_ADDRESS`` or one started here with ``ray start``; else start a local one
    with :func:`local_ray_cpus` logical CPUs.

    A local instance vembed started earlier in this process that is too small for ``config`` is shut down and
    started again at the new size (a warning says so; actors and objects of the old instance are gone). Any other
    Ray instance, connected or started by the caller, is used as it is.
    """
    needed = local_ray_cpus(config)
    if ray.is_initialized():
        ours = _started_here.get("gcs_address") == ray.get_runtime_context().gcs_address
        if not ours or _started_here["cpus"] >= needed:
            return
        logger.warning(
            "restarting the local Ray instance vembed started with %d logical CPUs: this run needs %d "
            "(num_workers=%d plus the data pipeline)",
            _started_here["cpus"],
            needed,
            config.num_workers,
        )
        ray.shutdown()
    _started_here.clear()
    try:
        _start_local_ray(needed)
    except ValueError:  # RAY_ADDRESS or a cluster started with `ray start` was found: its size is its own
        ray.init(log_to_driver=True)
        return
    _started_here.update(gcs_address=ray.get_runtime_context().gcs_address, cpus=needed)


def _start_local_ray(cpus: int) -> None:
    """``ray.init(num_cpus=cpus)`` without the dashboard, tried twice: on a loaded machine the raylet can miss
    Ray's fixed 30 s registration deadline once ("The current node timed out during startup").

    No dashboard because its processes (the head and its modules, about ten of them) wake the cores hundreds of
    times a second for as long as training runs, and each wake-up stalls torch's thread team: on 2 cores a
    training step runs ~4 % slower with them up (``benchmarks/ray_overhead.py``, paired, median of 4 rounds).
    To watch a local run in the dashboard, start Ray first (``ray start --head``, or ``ray.init()`` in the
    calling process); vembed then uses that instance as it is."""
    for attempt in (1, 2):
        try:
            ray.init(num_cpus=cpus, include_dashboard=False, log_to_driver=True)
            return
        except ValueError:
            raise
        except Exception as exc:
            if attempt == 2 or "timed out during startup" not in str(exc):
                raise
            logger.warning("the local Ray instance did not start in time; trying once more")
            ray.shutdown()


def wants_gpu(config: VEmbedConfig) -> bool:
    """``use_gpu``, with ``auto`` meaning: the cluster has GPUs."""
    if config.use_gpu == "auto":
        return ray.cluster_resources().get("GPU", 0) > 0
    return bool(config.use_gpu)


def worker_resources(config: VEmbedConfig, use_gpu: bool) -> dict[str, float]:
    """What one Ray Train worker reserves (Ray Train's rule: 1 CPU, or 1 GPU and no CPU, unless given)."""
    resources = {k: v for k, v in config.resources_per_worker.items() if v}
    if not resources:
        resources = {"GPU": 1.0} if use_gpu else {"CPU": 1.0}
    if use_gpu:
        resources.setdefault("GPU", 1.0)
    return resources


def check_cluster_fits(config: VEmbedConfig, use_gpu: bool) -> None:
    """Raise a ConfigError when the cluster cannot host ``num_workers`` workers plus the data pipeline."""
    if config.num_workers == 0:
        return
    per_worker = worker_resources(config, use_gpu)
    total = ray.cluster_resources()
    for name, amount in per_worker.items():
        needed = amount * config.num_workers
        have = total.get(name, 0.0)
        if needed > have:
            raise ConfigError(
                f"num_workers={config.num_workers} needs {needed:g} {name} ({amount:g} per worker) but the Ray "
                f"cluster has {have:g}; lower num_workers or resources_per_worker, or add nodes (on an "
                "autoscaling cluster, set wait_for_resources: true to let the autoscaler add them)"
            )
    nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
    if not any(all(node.get(k, 0.0) >= v for k, v in per_worker.items()) for node in nodes):
        raise ConfigError(f"no node of the Ray cluster can host one worker needing {per_worker}")
    cpus_left = total.get("CPU", 0.0) - per_worker.get("CPU", 0.0) * config.num_workers
    if cpus_left < DATA_PIPELINE_CPUS:
        raise ConfigError(
            f"num_workers={config.num_workers} would leave {max(cpus_left, 0.0):g} of the Ray cluster's "
            f"{total.get('CPU', 0.0):g} CPUs for the Ray Data preprocessing that feeds the workers, which needs "
            f"{DATA_PIPELINE_CPUS} (a read task and a preprocessing task); lower num_workers or "
            "resources_per_worker.CPU, or add CPUs"
        )


class TrainingData(NamedTuple):
    """What :func:`build_datasets` makes for a run."""

    datasets: dict[str, Any]
    """The Ray Data pipelines ``{"train": ..., "val": ...}``."""
    num_records: int
    """Training records."""
    bad_records: Any
    """The counter of records skipped as bad (``BadRecordCounter``)."""
    epoch_clock: Any
    """The training set's epoch clock; the workers set it (``EpochClock``)."""
    cache: Any
    """The preprocessing tasks' cache of rows for several workers (``PreprocessedCache``), else None."""
    replay_budget: float | None
    """Bytes of rows a single worker keeps to replay later epochs from memory (``EpochReplay``), else None."""


def build_datasets(config: VEmbedConfig) -> TrainingData:
    """The run's data pipelines and the state they share.

    ``cache_preprocessed`` (sized by ``cache_budget``; None there: every epoch streams) is served by the one
    worker itself when ``num_workers`` is 0 or 1: it keeps the rows of the first epoch it streams and replays the
    later ones from memory, and Ray Data runs no preprocessing for them (``vembed.data.epoch_replay``). With
    several workers, each epoch streams again and the preprocessing tasks reuse the rows they kept in the object
    store (``PreprocessedCache``)."""
    from vembed.data.pipeline import (
        BadRecordCounter,
        EpochClock,
        PreprocessedCache,
        build_train_dataset,
        cache_budget,
        read_record_dataset,
    )
    from vembed.data.processing import Preprocessor
    from vembed.data.run_state import RunState

    if config.data_path is None:
        raise ConfigError("data_path is not set: give the training records (JSONL / CSV / Parquet)")
    preprocessor = Preprocessor.from_config(config)
    num_records = read_record_dataset(config.data_path, config).count()
    state = RunState()  # one actor process for the three below
    bad_records = BadRecordCounter(state=state)
    epoch_clock = EpochClock(state=state)
    budget = cache_budget(config, num_records, preprocessor, config.data_path)
    single_worker = config.num_workers <= 1
    cache = PreprocessedCache(budget, state=state) if budget is not None and not single_worker else None
    if budget is None:
        logger.info("preprocessed rows: streamed every epoch")
    else:
        where = "in the worker, later epochs replayed from memory" if single_worker else "in the object store"
        logger.info("preprocessed rows: kept up to %.3g B %s", budget, where)
    datasets = {"train": build_train_dataset(config.data_path, preprocessor, config, bad_records, epoch_clock, cache)}
    if config.val_data_path is not None:
        val_config = config.replace(shuffle=False)
        datasets["val"] = build_train_dataset(config.val_data_path, preprocessor, val_config, bad_records)
    for dataset in datasets.values():
        # A bad record (on_bad_record: fail) must reach the user as itself, "bad record 'x' at file:line: ...",
        # not as Ray Data's generic "UDF failed" (the worker re-raises it, see worker.ShardLoader).
        dataset.context.raise_original_map_exception = True
    replay_budget = budget if single_worker else None
    return TrainingData(datasets, num_records, bad_records, epoch_clock, cache, replay_budget)


def build_trainer(config: VEmbedConfig | Mapping[str, Any]) -> TorchTrainer:
    """A ready ``TorchTrainer`` for ``config`` (connects to Ray and checks the cluster first)."""
    return _build_trainer(config)[0]


def _build_trainer(config: VEmbedConfig | Mapping[str, Any]) -> tuple[TorchTrainer, Any]:
    """:func:`build_trainer`, and the training set's cache of preprocessed rows (or None)."""
    cfg = resolve_run_paths(as_config(config))
    check_sources(cfg)
    ensure_ray(cfg)
    use_gpu = wants_gpu(cfg)
    cfg = cfg.replace(use_gpu=use_gpu)  # workers see the decision, not "auto"
    if cfg.wait_for_resources:
        logger.info("wait_for_resources: not checking the cluster's current size; Ray Train waits for the workers")
    else:
        check_cluster_fits(cfg, use_gpu)
    from vembed.data.pipeline import train_ingest_options

    data = build_datasets(cfg)
    scaling = ray.train.ScalingConfig(
        num_workers=cfg.num_workers,
        use_gpu=use_gpu,
        resources_per_worker=worker_resources(cfg, use_gpu) if cfg.num_workers else None,
        placement_strategy=cfg.placement_strategy,
    )
    run_config = ray.train.RunConfig(
        name=cfg.run_name,
        storage_path=cfg.storage_path,
        failure_config=ray.train.FailureConfig(max_failures=cfg.max_failures),
        checkpoint_config=ray.train.CheckpointConfig(num_to_keep=cfg.num_to_keep),
    )
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config=make_loop_config(
            cfg, data.num_records, data.bad_records, data.epoch_clock, data.replay_budget
        ),
        scaling_config=scaling,
        run_config=run_config,
        datasets=data.datasets,
        dataset_config=ray.train.DataConfig(execution_options=train_ingest_options()),
    )
    return trainer, data.cache


def run_training(config: VEmbedConfig | Mapping[str, Any]) -> ray.train.Result:
    """Train with Ray Train as configured; returns the ``ray.train.Result`` (metrics, checkpoint, path).

    User checkpoints land in ``output_dir/checkpoint-epoch-N``; resume checkpoints under
    ``storage_path/run_name``. A run that failed on bad input raises that error alone, as its own type
    (``BadRecordError: bad record 'x' at file:line: ...``, see :mod:`vembed.training.failures`); any other failure
    raises Ray Train's ``TrainingFailedError``.
    """
    try:
        trainer, cache = _build_trainer(config)  # counts the records in Ray Data tasks: inside the try too
        result = trainer.fit()
    except Exception as exc:
        logger.debug("training failed", exc_info=exc)  # Ray's full report, for whoever turns on debug logging
        raise_user_error(exc)
        raise
    logger.debug("training finished: %s", result.metrics)  # the progress summary and the CLI show them
    if cache is not None:
        stats = cache.stats()
        logger.info(
            "preprocessed-row cache: %d rows and %d dropped records held, %.3g of %.3g bytes",
            stats["rows"],
            stats["bad"],
            stats["bytes"],
            stats["budget"],
        )
    return result
