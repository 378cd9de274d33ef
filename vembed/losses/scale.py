"""Logit scale ``1 / temperature``, fixed or learned as ``log(1 / temperature)`` like CLIP's ``logit_scale``."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

# A learned scale is clamped to [1/100, 100] (temperature in [0.01, 100]): CLIP's cap of 100 keeps the
# softmax from collapsing onto one candidate early in training; the floor keeps the scale positive and finite.
MIN_SCALE = 1e-2
MAX_SCALE = 100.0


class LogitScale(nn.Module):
    """The factor similarities are multiplied by before a softmax / sigmoid.

    Learnable: an ``nn.Parameter`` holding ``log(1 / temperature)`` (shape ``[1]``, because FSDP2's
    ``fully_shard`` refuses 0-dim parameters), exponentiated and clamped on use. Fixed: a buffer.
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
        if self.learnable:
            return self.log_scale.clamp(math.log(MIN_SCALE), math.log(MAX_SCALE)).exp()[0]
        return self.log_scale.exp()[0]

    @property
    def temperature(self) -> float:
        """The current temperature ``1 / scale`` as a float (for logging)."""
        return 1.0 / float(self.forward().detach())

    def extra_repr(self) -> str:
        return f"temperature={self.temperature:.4g}, learnable={self.learnable}"
