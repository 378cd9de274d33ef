"""Data-parallel wrapping (DDP or FSDP2) and the gradient utilities that must know about it.

Every rank of a run (Ray Train worker, ``accelerate`` process or torchrun process) has joined the
default ``torch.distributed`` process group before this module is used; with no process group
everything here is the single-process identity.

- DDP keeps a full replica per rank and averages gradients in backward.
- FSDP2 (``torch.distributed.fsdp.fully_shard``) shards every transformer block (the classes the
  model lists as ``_no_split_modules``) and then the root, so one block is gathered at a time.
  Parameters become ``DTensor`` shards; checkpoints of a sharded model go through
  ``torch.distributed.checkpoint`` (see :mod:`vembed.training.checkpointing`).

Parameters outside the wrapped model (a learnable temperature in the loss) are not synchronised by
DDP/FSDP: :func:`vembed.losses.distributed.average_gradients` (re-exported here) all-reduces them, so every rank
applies the same update.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor

from vembed.config import VEmbedConfig, as_config
from vembed.losses.distributed import average_gradients, distributed_world

__all__ = [
    "average_gradients",
    "autocast_dtype",
    "clip_grad_norm",
    "distributed_world",
    "freeze_unused_towers",
    "in_ray_train_worker",
    "is_sharded",
    "select_device",
    "shard_block_classes",
    "unwrap_model",
    "wrap_model",
]


def in_ray_train_worker() -> bool:
    """True inside a function run by a Ray Train trainer (distributed workers or ``num_workers=0``)."""
    try:
        import ray.train

        ray.train.get_context()
    except (ImportError, RuntimeError):
        return False
    return True


def in_ray_train_local_mode() -> bool:
    """True inside a Ray Train run with ``num_workers=0``: the loop runs in the caller's process, without storage
    to resume from (call only where :func:`in_ray_train_worker` is true)."""
    import ray.train
    from ray.train.v2.api.context import LocalTrainContext

    return isinstance(ray.train.get_context(), LocalTrainContext)


def select_device(config: VEmbedConfig | Mapping[str, Any]) -> torch.device:
    """This rank's device: Ray Train's assigned GPU, else ``cuda`` when available and allowed, else CPU."""
    cfg = as_config(config)
    if cfg.use_gpu is False or not torch.cuda.is_available():
        return torch.device("cpu")
    if in_ray_train_worker():
        import ray.train.torch

        return ray.train.torch.get_device()
    rank, _ = distributed_world()
    return torch.device("cuda", rank % torch.cuda.device_count())


def autocast_dtype(config: VEmbedConfig | Mapping[str, Any], device: torch.device) -> torch.dtype | None:
    """The autocast dtype for ``mixed_precision`` on ``device``; None means full float32.

    ``auto`` picks bf16 on GPUs that support it and nothing on CPU (CPU bf16 matmuls are slower than
    float32 on most CPUs). Asking for a precision the device lacks is an error, not a silent fallback.
    """
    mode = as_config(config).mixed_precision
    cuda = device.type == "cuda"
    bf16_ok = cuda and torch.cuda.is_bf16_supported()
    if mode == "no" or (mode == "auto" and not bf16_ok):
        return None
    if mode in ("auto", "bf16"):
        if device.type == "cpu" or bf16_ok:
            return torch.bfloat16
        raise ValueError(f"mixed_precision=bf16 but {torch.cuda.get_device_name(device)} has no bf16; use fp16 or no")
    if not cuda:
        raise ValueError("mixed_precision=fp16 needs a CUDA device (CPU autocast has no fp16); use bf16 or no")
    return torch.float16


def shard_block_classes(model: nn.Module) -> set[str]:
    """Class names of the model's transformer blocks: ``model.no_split_module_classes()`` when it has one,
    else the union of ``_no_split_modules`` of its Hugging Face submodules."""
    if hasattr(model, "no_split_module_classes"):
        return set(model.no_split_module_classes())
    names: set[str] = set()
    for module in model.modules():
        names.update(getattr(module, "_no_split_modules", None) or ())
    return names


def _fully_shard(model: nn.Module, config: VEmbedConfig, device: torch.device) -> nn.Module:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard

    _, world = distributed_world()
    mesh = init_device_mesh(device.type, (world,))
    low = autocast_dtype(config, device)
    mp_policy = MixedPrecisionPolicy(param_dtype=low, reduce_dtype=torch.float32, output_dtype=torch.float32)
    offload = CPUOffloadPolicy() if config.fsdp_cpu_offload else OffloadPolicy()
    blocks = shard_block_classes(model)
    for module in model.modules():
        if type(module).__name__ in blocks and module is not model:
            fully_shard(module, mesh=mesh, mp_policy=mp_policy, offload_policy=offload)
    fully_shard(model, mesh=mesh, mp_policy=mp_policy, offload_policy=offload)
    return model


def freeze_unused_towers(model: nn.Module, retrieval_mode: str) -> bool:
    """Freeze the parameters of the modality ``retrieval_mode`` never encodes (the image tower of a t2t run on a
    dual or composed model, the text tower of i2i). Returns False when the model cannot tell which parameters
    those are (DDP must then be told to look for unused parameters), True otherwise."""
    from vembed.data.records import role_modalities
    from vembed.model.embedding_model import EmbeddingModel

    inner = unwrap_model(model)
    if not isinstance(inner, EmbeddingModel):
        return True  # a user's own module: its parameters are its business
    used = set().union(*role_modalities(retrieval_mode).values())
    return inner.freeze_modalities_except(used)


def wrap_model(model: nn.Module, config: VEmbedConfig | Mapping[str, Any], device: torch.device) -> nn.Module:
    """Move ``model`` to ``device`` and wrap it for ``config.strategy`` (``ddp`` or ``fsdp``).

    No process group: the model is returned unwrapped. DDP with one rank is skipped (nothing to
    synchronise); FSDP2 shards even over one rank so that the checkpoint format follows the strategy.
    The tower the retrieval mode never uses is frozen first (:func:`freeze_unused_towers`): DDP fails at the
    second step on parameters that get no gradient, and freezing them costs nothing, unlike DDP's
    ``find_unused_parameters`` graph walk on every step (kept only for models that cannot say).
    """
    cfg = as_config(config)
    _, world = distributed_world()
    if not dist.is_initialized():
        return model.to(device)
    declared = freeze_unused_towers(model, cfg.retrieval_mode)
    if cfg.strategy == "fsdp":
        if cfg.fsdp_cpu_offload:
            return _fully_shard(model, cfg, device)  # parameters stay on CPU; FSDP moves them per use
        return _fully_shard(model.to(device), cfg, device)
    model = model.to(device)
    if world == 1:
        return model
    device_ids = [device.index] if device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=device_ids, find_unused_parameters=not declared)


def unwrap_model(model: nn.Module) -> nn.Module:
    """The user's module under DDP and ``torch.compile`` wrappers (an FSDP2 model is its own module)."""
    while True:
        if isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module
        elif hasattr(model, "_orig_mod"):  # torch.compile's OptimizedModule
            model = model._orig_mod
        else:
            return model


def is_sharded(model: nn.Module) -> bool:
    """True when the model's parameters are FSDP2 ``DTensor`` shards."""
    return any(isinstance(p, DTensor) for p in model.parameters())


def clip_grad_norm(parameters: Iterable[nn.Parameter], max_norm: float) -> torch.Tensor:
    """Clip the global L2 norm of all gradients to ``max_norm`` (0 = measure only); returns the norm before.

    Handles FSDP2 ``DTensor`` gradients (norm of the full, unsharded gradient) mixed with plain
    tensors (replicated loss parameters), which ``torch.nn.utils.clip_grad_norm_`` cannot combine.
    """
    params = [p for p in parameters if p.grad is not None]
    groups = [
        g
        for g in (
            [p for p in params if isinstance(p.grad, DTensor)],
            [p for p in params if not isinstance(p.grad, DTensor)],
        )
        if g
    ]
    if not params:
        return torch.zeros(())
    device = params[0].grad.device
    squares = torch.zeros((), dtype=torch.float32, device=device)
    for group in groups:
        norm = torch.nn.utils.get_total_norm([p.grad for p in group], norm_type=2.0)
        norm = norm.full_tensor() if isinstance(norm, DTensor) else norm
        squares = squares + norm.detach().float().to(device).pow(2)
    total = squares.sqrt()
    if max_norm > 0:
        for group in groups:
            torch.nn.utils.clip_grads_with_norm_(group, max_norm, total.to(group[0].grad.device))
    return total
