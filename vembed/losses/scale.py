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


#: the keys under which a model's outputs carry the learnable parameters of its loss (see :class:`LogitParameters`)
LOGIT_KEYS = ("logit_scale", "logit_bias")


class LogitParameters(nn.Module):
    """The learnable logit scale (and SigLIP's logit bias) of a contrastive loss, held by the model.

    As in open_clip, the model owns the loss's learnable parameters: ``build_model(config)`` attaches one of these
    (built by the configured loss class, :meth:`vembed.losses.base.EmbeddingLoss.logit_parameters`), the model's
    forward adds :meth:`forward`'s tensors to its outputs, and the loss reads them there. So
    ``build_optimizer(model, config)`` trains them (no weight decay: they are 1-element parameters), they are saved
    and loaded with the model, and DDP / FSDP2 synchronise them with the model's own parameters.

    The bias is a direct parameter registered before the scale's submodule, so the parameter order is the one a
    loss holding them had (``logit_bias``, then ``logit_scale.log_scale``).
    """

    def __init__(self, temperature: float, bias: float | None = None) -> None:
        super().__init__()
        self.logit_bias = None if bias is None else nn.Parameter(torch.tensor([float(bias)]))  # [1]: FSDP2
        self.logit_scale = LogitScale(temperature, learnable=True)

    @property
    def names(self) -> tuple[str, ...]:
        """The output keys this module fills (a subset of :data:`LOGIT_KEYS`, in that order)."""
        return ("logit_scale",) if self.logit_bias is None else LOGIT_KEYS

    def forward(self) -> dict[str, Tensor]:
        """``{"logit_scale": 0-dim scale, "logit_bias": 0-dim bias}`` (the bias only when there is one)."""
        out = {"logit_scale": self.logit_scale()}
        if self.logit_bias is not None:
            out["logit_bias"] = self.logit_bias[0]
        return out


def _base_optimizer(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """The torch optimizer inside wrappers such as accelerate's ``AcceleratedOptimizer`` (whose ``step`` calls it)."""
    while isinstance(getattr(optimizer, "optimizer", None), torch.optim.Optimizer):
        optimizer = optimizer.optimizer
    return optimizer


def clamp_after_step(optimizer: torch.optim.Optimizer, module: nn.Module) -> None:
    """The one clamping hook: after every ``optimizer.step()`` the learned logit scales inside ``module`` are clamped.

    ``module`` is a model (its :class:`LogitParameters`), a loss, or a wrapper of either (DDP, FSDP2 and
    ``torch.compile`` keep the same submodules); its learnable :class:`LogitScale` modules are found once, here. A
    step post-hook on the (innermost) optimizer, so it runs on every path that steps it: the Ray Train worker's and
    the mid-level ``Trainer``'s loop (GradScaler and accelerate included) and the seed guide's custom loop over
    ``build_optimizer(model, config)``. A scale already registered with this optimizer is not registered twice.
    """
    base = _base_optimizer(optimizer)
    clamped: weakref.WeakSet[LogitScale] = base.__dict__.setdefault("_vembed_clamped_scales", weakref.WeakSet())
    scales = [m for m in module.modules() if isinstance(m, LogitScale) and m.learnable and m not in clamped]
    if not scales:
        return
    clamped.update(scales)
    refs = [weakref.ref(scale) for scale in scales]

    def clamp(*_: object) -> None:
        for ref in refs:
            scale = ref()
            if scale is not None:
                scale.clamp_()

    base.register_step_post_hook(clamp)
