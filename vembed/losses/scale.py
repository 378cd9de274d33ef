"""Logit scale ``1 / temperature``, fixed or learned as ``log(1 / temperature)`` like CLIP's ``logit_scale``."""

from __future__ import annotations

import math
import weakref

import torch
from torch import Tensor, nn

# A learned scale is kept in [1/100, 100] (temperature in [0.01, 100]): CLIP's cap of 100 keeps the
# softmax from collapsing onto one candidate early in training; the floor keeps the scale positive and finite.
# The parameter itself is clamped after every optimizer step (:func:`clamp_after_step`, as open_clip does), not
# its value in the forward: a clamp in the forward has zero gradient once the parameter is past the cap, so a
# temperature that reached it could never come back.
MIN_SCALE = 1e-2
MAX_SCALE = 100.0


class LogitScale(nn.Module):
    """The factor similarities are multiplied by before a softmax / sigmoid.

    Learnable: an ``nn.Parameter`` holding ``log(1 / temperature)`` (shape ``[1]``, because FSDP2's
    ``fully_shard`` refuses 0-dim parameters), exponentiated on use and kept in range by :meth:`clamp_` after each
    optimizer step. Fixed: a buffer.
    """

    def __init__(self, temperature: float, learnable: bool) -> None:
        super().__init__()
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        scale = 1.0 / temperature
        if learnable and not MIN_SCALE <= scale <= MAX_SCALE:
            raise ValueError(
                f"a learnable temperature must start in [{1 / MAX_SCALE}, {1 / MIN_SCALE}] "
                f"(it is clamped to that range), got {temperature}"
            )
        log_scale = torch.tensor([math.log(scale)])
        self.learnable = learnable
        if learnable:
            self.log_scale = nn.Parameter(log_scale)
        else:
            self.register_buffer("log_scale", log_scale)

    def forward(self) -> Tensor:
        """The current scale as a 0-dim tensor (differentiable when learnable)."""
        return self.log_scale.exp()[0]

    @torch.no_grad()
    def clamp_(self) -> None:
        """Put a learned ``log_scale`` back into ``[log MIN_SCALE, log MAX_SCALE]`` in place (after a step)."""
        if self.learnable:
            self.log_scale.clamp_(math.log(MIN_SCALE), math.log(MAX_SCALE))

    @property
    def temperature(self) -> float:
        """The current temperature ``1 / scale`` as a float (for logging)."""
        return 1.0 / float(self.forward().detach())

    def extra_repr(self) -> str:
        return f"temperature={self.temperature:.4g}, learnable={self.learnable}"


def clamp_logit_scales(module: nn.Module) -> None:
    """:meth:`LogitScale.clamp_` every logit scale inside ``module`` (a loss, possibly wrapped)."""
    for child in module.modules():
        if isinstance(child, LogitScale):
            child.clamp_()


def _base_optimizer(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """The torch optimizer inside wrappers such as accelerate's ``AcceleratedOptimizer`` (whose ``step`` calls it)."""
    while isinstance(getattr(optimizer, "optimizer", None), torch.optim.Optimizer):
        optimizer = optimizer.optimizer
    return optimizer


def clamp_after_step(optimizer: torch.optim.Optimizer, module: nn.Module) -> None:
    """The one clamping hook: after every ``optimizer.step()`` the logit scales of ``module`` are clamped.

    A step post-hook on the (innermost) optimizer, so it runs on every path that steps it: the Ray Train
    worker's and the mid-level ``Trainer``'s loop (GradScaler and accelerate included) and a custom loop over an
    optimizer from ``build_optimizer(..., extra_modules=[criterion])``. Registering the same module twice is a
    no-op.
    """
    if not any(isinstance(child, LogitScale) and child.learnable for child in module.modules()):
        return
    base = _base_optimizer(optimizer)
    clamped: weakref.WeakSet[nn.Module] = base.__dict__.setdefault("_vembed_clamped_modules", weakref.WeakSet())
    if module in clamped:
        return
    clamped.add(module)
    base.register_step_post_hook(lambda *_: clamp_logit_scales(module))
