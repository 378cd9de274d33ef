"""Two kinds of checkpoint: training state for resume, and model directories for users.

Resume state (what Ray Train stores under ``RunConfig(storage_path, name)``): model, optimizer,
scheduler, trainable loss parameters, the fp16 GradScaler and :class:`TrainingProgress` (epoch, data position,
step). Dropout needs no saved RNG state: the loop seeds every micro-batch by its position in the run.

- Replicated models (single process, DDP): rank 0 writes ``model.pt``, ``optimizer.pt``, ...
- FSDP2-sharded models: every rank writes its own shards with ``torch.distributed.checkpoint`` (DCP)
  into its local directory; Ray Train merges the ranks' directories into one checkpoint, whose
  ``.metadata`` lets DCP load the shards back (also onto another number of ranks).

User checkpoints (``output_dir/checkpoint-epoch-N``): the model's own ``save_pretrained`` directory,
loadable by the Predictor. A sharded model is first gathered into a full state dict, loaded into an
unsharded copy of the model on rank 0 and saved from there.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable, Iterator, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from vembed.config import VEmbedConfig
from vembed.training.distributed import distributed_world, is_sharded, unwrap_model

PROGRESS_FILE = "trainer_state.json"
MODEL_FILE = "model.pt"
OPTIMIZER_FILE = "optimizer.pt"
SCHEDULER_FILE = "scheduler.pt"
SHARDED_DIR = "sharded"  # DCP shards of model + optimizer


@dataclass
class TrainingProgress:
    """Where training stands: resume runs ``epoch`` after skipping its first ``batches_done`` micro-batches."""

    epoch: int = 0  # 0-based epoch to run next (all earlier epochs are complete)
    batches_done: int = 0  # micro-batches of ``epoch`` already trained on (the data position)
    step: int = 0  # optimizer steps taken so far

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_file(cls, path: Path) -> TrainingProgress:
        if not path.exists():
            raise FileNotFoundError(f"resume checkpoint {path.parent} has no {path.name}; it was not written by vembed")
        return cls(**json.loads(path.read_text()))


def _optimizer_state(optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """The optimizer's state dict in a form DCP can save and load in place.

    Unlike ``torch.distributed.checkpoint.state_dict.get_state_dict`` this accepts an optimizer that also
    holds parameters outside the sharded model (the loss's learnable temperature): per-parameter states
    keep their tensors (``DTensor`` shards for model parameters, replicated tensors for the others) under
    string keys, and the param groups are stored as one serialised value.
    """
    packed = optimizer.state_dict()
    return {
        "state": {str(k): v for k, v in packed["state"].items()},
        "param_groups": {"param_groups": packed["param_groups"]},
    }


@torch.no_grad()
def _initialise_optimizer_state(optimizer: torch.optim.Optimizer) -> None:
    """Create the optimizer's per-parameter state (zeros) so that DCP has tensors to load into.

    One step with zero gradients at learning rate 0 changes no parameter; the loaded state then replaces the
    created one (step counts included).
    """
    if optimizer.state:
        return
    params = [p for group in optimizer.param_groups for p in group["params"] if p.requires_grad]
    for p in params:
        p.grad = torch.zeros_like(p)
    rates = [group["lr"] for group in optimizer.param_groups]
    for group in optimizer.param_groups:
        group["lr"] = 0.0
    optimizer.step()
    for group, lr in zip(optimizer.param_groups, rates, strict=True):
        group["lr"] = lr
    optimizer.zero_grad(set_to_none=True)


def _module_file(name: str) -> str:
    return f"module_{name}.pt"


def save_training_state(
    directory: str | Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None,
    progress: TrainingProgress,
    extra_modules: Mapping[str, Any] | None = None,
) -> bool:
    """Write resume state into ``directory`` (every rank calls this). Returns whether this rank wrote files.

    ``extra_modules`` are replicated objects with a ``state_dict()`` of their own (the loss's learnable
    temperature, a ``GradScaler``).
    """
    directory = Path(directory)
    rank, _ = distributed_world()
    wrote = False
    if is_sharded(model):
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_model_state_dict

        state = {"model": get_model_state_dict(model), "optim": _optimizer_state(optimizer)}
        dcp.save(state, checkpoint_id=str(directory / SHARDED_DIR))
        wrote = True
    if rank != 0:
        return wrote
    directory.mkdir(parents=True, exist_ok=True)
    if not is_sharded(model):
        torch.save(unwrap_model(model).state_dict(), directory / MODEL_FILE)
        torch.save(optimizer.state_dict(), directory / OPTIMIZER_FILE)
    if scheduler is not None:
        torch.save(scheduler.state_dict(), directory / SCHEDULER_FILE)
    for name, module in (extra_modules or {}).items():
        torch.save(module.state_dict(), directory / _module_file(name))
    (directory / PROGRESS_FILE).write_text(progress.to_json())
    return True


def load_training_state(
    directory: str | Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None,
    extra_modules: Mapping[str, Any] | None = None,
) -> TrainingProgress:
    """Restore what :func:`save_training_state` wrote (every rank calls this) and return the progress."""
    directory = Path(directory)
    progress = TrainingProgress.from_file(directory / PROGRESS_FILE)
    if is_sharded(model):
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_model_state_dict, set_model_state_dict

        if not (directory / SHARDED_DIR).exists():
            raise ValueError(f"{directory} holds a replicated (DDP) checkpoint; resume it with strategy: ddp")
        _initialise_optimizer_state(optimizer)
        state = {"model": get_model_state_dict(model), "optim": _optimizer_state(optimizer)}
        with _refusing_loss_held_parameters(directory):
            dcp.load(state, checkpoint_id=str(directory / SHARDED_DIR))  # in place, each rank its own shards
        set_model_state_dict(model, state["model"])
        optim = state["optim"]
        optimizer.load_state_dict({"state": {int(k): v for k, v in optim["state"].items()}, **optim["param_groups"]})
    else:
        if not (directory / MODEL_FILE).exists():
            raise ValueError(f"{directory} holds a sharded (FSDP) checkpoint; resume it with strategy: fsdp")
        with _refusing_loss_held_parameters(directory):
            unwrap_model(model).load_state_dict(
                torch.load(directory / MODEL_FILE, map_location="cpu", weights_only=True)
            )
        optimizer.load_state_dict(torch.load(directory / OPTIMIZER_FILE, map_location="cpu", weights_only=True))
    if scheduler is not None:
        scheduler.load_state_dict(torch.load(directory / SCHEDULER_FILE, weights_only=True))
    for name, module in (extra_modules or {}).items():
        module.load_state_dict(torch.load(directory / _module_file(name), map_location="cpu", weights_only=True))
    return progress


@contextlib.contextmanager
def _refusing_loss_held_parameters(directory: Path) -> Iterator[None]:
    """A resume state written before the model held the loss's learnable scale / bias lacks them: say so."""
    try:
        yield
    except (RuntimeError, KeyError, ValueError) as exc:
        if "logit_parameters." not in str(exc):
            raise
        raise ValueError(
            f"{directory} was written by an older vembed, whose loss (not the model) held the learnable temperature "
            "/ logit bias, so it cannot resume this run; start the run again under a new name, or fine-tune from one "
            "of its user checkpoints (model_name: .../checkpoint-epoch-N)"
        ) from exc


def save_user_checkpoint(
    model: nn.Module,
    directory: str | Path,
    config: VEmbedConfig,
    model_factory: Callable[[], nn.Module] | None = None,
) -> Path:
    """Save the model as a user checkpoint (``save_pretrained``) at ``directory``; every rank calls this.

    Rank 0 writes; LoRA weights are merged or kept as an adapter per ``lora_save_mode``. A sharded
    model needs ``model_factory``, which builds an unsharded model of the same architecture on rank 0.
    """
    directory = Path(directory)
    rank, _ = distributed_world()
    merge = config.lora_save_mode == "merged"
    if is_sharded(model):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        if model_factory is None:
            raise ValueError("saving an FSDP-sharded model needs a model_factory that builds an unsharded copy")
        full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if rank == 0:
            copy = model_factory()
            copy.load_state_dict(full)
            copy.save_pretrained(directory, merge_lora=merge)
    elif rank == 0:
        unwrap_model(model).save_pretrained(directory, merge_lora=merge)
    if dist.is_initialized():
        dist.barrier()  # nobody reads the checkpoint before rank 0 has finished writing it
    return directory
