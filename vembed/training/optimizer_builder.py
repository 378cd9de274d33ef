"""AdamW with decoupled weight decay on weight matrices only, and the learning-rate schedule.

Weight decay pulls parameters towards zero. That regularises weight matrices, but on biases, norm
gains and scalars such as a learnable temperature it only shifts activations or sharpens/flattens
the softmax, so those get no decay (the rule of BERT, CLIP and open_clip). The loss's learnable
temperature / SigLIP scale and bias live in a model built by ``build_model(config)``
(``model.logit_parameters``), so ``build_optimizer(model, config)`` holds them, and clamps the learned scale
after every step. Other trainable parameters of a loss are optimised alongside the model when the loss is passed
in ``extra_modules``, or when the optimizer goes to ``Trainer``, which adds the criterion's parameters it lacks
(:func:`add_missing_parameters`).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import nn
from torch.optim.lr_scheduler import LRScheduler
from transformers import get_scheduler

from vembed.config import ConfigError, VEmbedConfig, as_config
from vembed.losses.scale import clamp_after_step

_NORM_TYPES: tuple[type[nn.Module], ...] = (
    nn.LayerNorm,
    nn.GroupNorm,
    nn.RMSNorm,
    nn.modules.batchnorm._BatchNorm,
    nn.modules.instancenorm._InstanceNorm,
)


def _is_norm(module: nn.Module) -> bool:
    """Torch norm layers plus model-specific ones (``LlamaRMSNorm``, ``Qwen3RMSNorm``, ...) by class name."""
    return isinstance(module, _NORM_TYPES) or type(module).__name__.lower().endswith("norm")


def _no_decay(name: str, param: nn.Parameter, owner: nn.Module) -> bool:
    """Biases, norm weights and 0/1-dim parameters (scales, temperatures) are not decayed."""
    return name == "bias" or _is_norm(owner) or param.dim() <= 1


def parameter_groups(modules: Iterable[nn.Module], weight_decay: float) -> list[dict[str, Any]]:
    """Trainable parameters of ``modules`` split into a decayed and a not-decayed AdamW group.

    A parameter shared by several modules (tied embeddings, a loss that holds the model) appears once.
    """
    decay: list[nn.Parameter] = []
    no_decay: list[nn.Parameter] = []
    seen: set[int] = set()
    for root in modules:
        for owner in root.modules():
            for name, param in owner.named_parameters(recurse=False):
                if not param.requires_grad or id(param) in seen:
                    continue
                seen.add(id(param))
                (no_decay if _no_decay(name, param, owner) else decay).append(param)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def build_optimizer(
    model: nn.Module,
    config: VEmbedConfig | Mapping[str, Any],
    extra_modules: Iterable[nn.Module] = (),
) -> torch.optim.AdamW:
    """AdamW over the trainable parameters of ``model`` and ``extra_modules`` (e.g. a loss with parameters).

    Uses ``learning_rate``, ``weight_decay``, ``adam_beta1``, ``adam_beta2`` and ``adam_epsilon``;
    no decay on biases, norm weights and scalar parameters (the loss's logit scale and bias the model holds
    among them). Learned logit scales of ``model`` and ``extra_modules`` are clamped after every step
    (:func:`~vembed.losses.scale.clamp_after_step`).
    """
    cfg = as_config(config)
    groups = parameter_groups([model, *extra_modules], cfg.weight_decay)
    if not groups:
        raise ValueError(
            f"{type(model).__name__} has no trainable parameters (every parameter has requires_grad=False); "
            "unfreeze some layers or enable use_lora"
        )
    if cfg.learning_rate <= 0:
        raise ConfigError(f"learning_rate must be > 0, got {cfg.learning_rate}")
    optimizer = torch.optim.AdamW(
        groups,
        lr=cfg.learning_rate,
        betas=(cfg.adam_beta1, cfg.adam_beta2),
        eps=cfg.adam_epsilon,
    )
    for module in (model, *extra_modules):
        clamp_after_step(optimizer, module)  # learned temperatures stay in range after every step
    return optimizer


def add_missing_parameters(
    optimizer: torch.optim.Optimizer,
    module: nn.Module,
    config: VEmbedConfig | Mapping[str, Any],
    scheduler: LRScheduler | None = None,
    exclude: Iterable[nn.Parameter] = (),
) -> int:
    """Add the trainable parameters of ``module`` (the loss) that ``optimizer`` does not hold; returns how many.

    ``build_optimizer(model, config)`` cannot see a loss built after it, so parameters of the loss itself (a
    custom loss's, or a built-in loss's own scale and bias when the model does not hold them) would keep their
    initial values. They are added as :func:`build_optimizer` groups them (no weight decay on scalars), at the
    learning rate of the optimizer's first group, and ``scheduler`` (built for the old groups) is extended so the
    new groups follow the same schedule. ``exclude``: parameters not to add (a loss's own scale and bias, unused
    when the model holds them).
    """
    cfg = as_config(config)
    present = {id(p) for group in optimizer.param_groups for p in group["params"]} | {id(p) for p in exclude}
    new_groups = []
    for group in parameter_groups([module], cfg.weight_decay):
        params = [p for p in group["params"] if id(p) not in present]
        if params:
            new_groups.append({**group, "params": params})
    if not new_groups:
        return 0
    first = optimizer.param_groups[0]
    base_lr = first.get("initial_lr", first["lr"])
    for group in new_groups:
        optimizer.add_param_group({**group, "lr": first["lr"], "initial_lr": base_lr})
        if scheduler is not None:
            _extend_scheduler(scheduler, base_lr, first["lr"])
    return sum(len(g["params"]) for g in new_groups)


def _extend_scheduler(scheduler: LRScheduler, base_lr: float, current_lr: float) -> None:
    """Give ``scheduler`` an entry for a param group added after it was built, copying the first group's rule."""
    scheduler.base_lrs.append(base_lr)
    if hasattr(scheduler, "_last_lr"):
        scheduler._last_lr.append(current_lr)
    lambdas = getattr(scheduler, "lr_lambdas", None)  # LambdaLR / MultiplicativeLR (transformers' schedules)
    if isinstance(lambdas, list):
        lambdas.append(lambdas[0])


def warmup_steps_for(config: VEmbedConfig, total_steps: int) -> int:
    """``warmup_steps`` when > 0, else ``ceil(warmup_ratio * total_steps)``."""
    if config.warmup_steps < 0:
        raise ConfigError(f"warmup_steps must be >= 0, got {config.warmup_steps}")
    if config.warmup_steps > 0:
        return config.warmup_steps
    if not 0.0 <= config.warmup_ratio <= 1.0:
        raise ConfigError(f"warmup_ratio must be in [0, 1], got {config.warmup_ratio}")
    return math.ceil(config.warmup_ratio * total_steps)


def build_scheduler(
    optimizer: torch.optim.Optimizer,
    config: VEmbedConfig | Mapping[str, Any],
    num_epochs: int,
    steps_per_epoch: int,
) -> tuple[LRScheduler, int]:
    """The ``scheduler_type`` schedule over ``num_epochs * steps_per_epoch`` steps, and its warmup steps.

    ``steps_per_epoch`` counts optimizer steps (batches divided by ``gradient_accumulation_steps``);
    the scheduler is stepped once per optimizer step.
    """
    cfg = as_config(config)
    if num_epochs < 1 or steps_per_epoch < 1:
        raise ValueError(
            f"build_scheduler needs num_epochs >= 1 and steps_per_epoch >= 1, got {num_epochs} and {steps_per_epoch}"
            " (an empty data set, or fewer records than one global batch?)"
        )
    total = num_epochs * steps_per_epoch
    warmup = warmup_steps_for(cfg, total)
    scheduler = get_scheduler(cfg.scheduler_type, optimizer, num_warmup_steps=warmup, num_training_steps=total)
    return scheduler, warmup
