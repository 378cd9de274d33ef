"""build_optimizer / build_scheduler against closed forms: which parameters decay, and the lr curves."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from torch import nn

from vembed.config import ConfigError
from vembed.training.optimizer_builder import build_optimizer, build_scheduler

pytestmark = pytest.mark.unit


class TinyNet(nn.Module):
    """A linear layer, a LayerNorm, a custom RMS-style norm, an embedding tied to the output and a frozen part."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(5, 4)
        self.proj = nn.Linear(4, 4)
        self.norm = nn.LayerNorm(4)
        self.custom = CustomRMSNorm(4)
        self.out = nn.Linear(4, 5, bias=False)
        self.out.weight = self.embed.weight  # tied
        self.frozen = nn.Linear(4, 4)
        self.frozen.requires_grad_(False)


class CustomRMSNorm(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim) * 2)


class LossWithTemperature(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.log_scale = nn.Parameter(torch.tensor([3.0]))


def _step_with_zero_grads(optimizer: torch.optim.Optimizer) -> None:
    for group in optimizer.param_groups:
        for p in group["params"]:
            p.grad = torch.zeros_like(p)
    optimizer.step()


def test_weight_decay_only_on_weight_matrices_and_loss_params_are_trained():
    torch.manual_seed(0)
    model, loss = TinyNet(), LossWithTemperature()
    lr, wd = 0.1, 0.5
    before = {n: p.detach().clone() for n, p in [*model.named_parameters(), *loss.named_parameters()]}
    optimizer = build_optimizer(model, {"learning_rate": lr, "weight_decay": wd}, extra_modules=[loss])

    params = [p for g in optimizer.param_groups for p in g["params"]]
    assert len(params) == len({id(p) for p in params}), "a tied parameter must appear once"
    assert any(p is loss.log_scale for p in params)
    assert not any(p is model.frozen.weight for p in params)

    # With zero gradients AdamW's update is pure decoupled decay: w <- w * (1 - lr * wd).
    _step_with_zero_grads(optimizer)
    after = dict([*model.named_parameters(), *loss.named_parameters()])
    decayed = {"embed.weight", "proj.weight"}
    for name, old in before.items():
        expected = old * (1 - lr * wd) if name in decayed else old
        torch.testing.assert_close(after[name].detach(), expected, msg=f"parameter {name}")


def test_adam_hyperparameters_come_from_the_config():
    cfg = {"learning_rate": 3e-4, "adam_beta1": 0.8, "adam_beta2": 0.95, "adam_epsilon": 1e-6}
    optimizer = build_optimizer(nn.Linear(2, 2), cfg)
    group = optimizer.param_groups[0]
    assert (group["lr"], group["betas"], group["eps"]) == (3e-4, (0.8, 0.95), 1e-6)


def test_no_trainable_parameters_is_a_clear_error():
    frozen = nn.Linear(2, 2).requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        build_optimizer(frozen, {})


def _reference_multiplier(kind: str, step: int, warmup: int, total: int) -> float:
    """The schedules' definitions, written out (transformers' get_*_schedule_with_warmup)."""
    if kind != "constant" and step < warmup:
        return step / max(1, warmup)
    if kind in ("constant", "constant_with_warmup"):
        return 1.0
    progress = (step - warmup) / max(1, total - warmup)
    if kind == "linear":
        return max(0.0, 1.0 - progress)
    return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))


@pytest.mark.parametrize("kind", ["cosine", "linear", "constant", "constant_with_warmup"])
@pytest.mark.parametrize(("warmup_cfg", "expected_warmup"), [({"warmup_steps": 3}, 3), ({"warmup_ratio": 0.25}, 3)])
def test_scheduler_follows_the_closed_form(kind, warmup_cfg, expected_warmup):
    lr = 0.01
    cfg = {"learning_rate": lr, "scheduler_type": kind, **warmup_cfg}
    optimizer = build_optimizer(nn.Linear(2, 2), cfg)
    scheduler, warmup = build_scheduler(optimizer, cfg, num_epochs=2, steps_per_epoch=5)  # 10 steps
    assert warmup == expected_warmup
    seen = []
    for _ in range(10):
        seen.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    expected_warmup_for_kind = 0 if kind == "constant" else expected_warmup
    expected = [lr * _reference_multiplier(kind, s, expected_warmup_for_kind, 10) for s in range(10)]
    assert seen == pytest.approx(expected, abs=1e-12)


def test_warmup_steps_take_precedence_over_ratio():
    cfg = {"warmup_steps": 2, "warmup_ratio": 0.5}
    _, warmup = build_scheduler(build_optimizer(nn.Linear(2, 2), cfg), cfg, num_epochs=1, steps_per_epoch=100)
    assert warmup == 2


@pytest.mark.parametrize(
    ("cfg", "steps", "match"),
    [
        ({"warmup_ratio": 1.5}, 10, "warmup_ratio must be in"),
        ({}, 0, "steps_per_epoch >= 1"),
    ],
)
def test_bad_schedule_settings_are_clear_errors(cfg, steps, match):
    optimizer = build_optimizer(nn.Linear(2, 2), cfg)
    with pytest.raises((ValueError, ConfigError), match=match):
        build_scheduler(optimizer, cfg, num_epochs=1, steps_per_epoch=steps)


class _Fixed(nn.Module):
    """A "model" whose embeddings are the inputs themselves (one unused weight so the optimizer has a model group)."""

    def __init__(self) -> None:
        super().__init__()
        self.unused = nn.Parameter(torch.zeros(2, 2))

    def forward(self, query: torch.Tensor, positive: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"query": query + 0 * self.unused.sum(), "positive": positive}

    def save_pretrained(self, directory, merge_lora: bool = False) -> None:  # the Trainer's epoch checkpoint
        Path(directory).mkdir(parents=True, exist_ok=True)
        torch.save(self.state_dict(), Path(directory) / "weights.pt")


def test_learned_temperature_clamped_after_the_step_can_come_back_from_the_cap(tmp_path):
    """A learnable temperature pushed past its cap must sit exactly at the cap after each step (the clamp acts on
    the parameter, after the optimizer step) and still get a gradient there, so it moves back down once the data
    asks for a softer softmax. Hand reference: log(MAX_SCALE) and the sign of d loss / d log_scale."""
    from vembed.losses.factory import LossFactory
    from vembed.losses.scale import MAX_SCALE
    from vembed.training.training_loop import Trainer

    eye = torch.eye(4)
    # each query's positive is closest to it, but only just (cosine 1 vs 0.95): a sharper softmax lowers the loss
    close = torch.nn.functional.normalize(eye + 2.0, dim=-1)
    matched = [{"query": close, "positive": close}]
    # each query is closer to another query's positive (0.8) than to its own (0.6): a softer softmax lowers the loss
    crossed = [{"query": eye, "positive": 0.6 * eye + 0.8 * torch.roll(eye, 1, dims=1)}]
    config = {"loss_type": "infonce", "learnable_temperature": True, "temperature": 0.0125, "learning_rate": 0.5,
              "weight_decay": 0.0, "max_grad_norm": 0.0, "epochs": 3, "output_dir": str(tmp_path),
              "logging_steps": 0}  # fmt: skip
    criterion = LossFactory.create(config)
    model = _Fixed()
    optimizer = build_optimizer(model, config, extra_modules=[criterion])
    cap = math.log(MAX_SCALE)

    Trainer(model, optimizer, matched, criterion, config=config).train()
    assert criterion.logit_scale.log_scale.item() == pytest.approx(cap, abs=1e-7)  # pushed up, held at the cap

    criterion.zero_grad()
    criterion(model(**crossed[0]), crossed[0]).backward()
    assert criterion.logit_scale.log_scale.grad.item() > 0  # at the cap the gradient asks to lower the scale
    Trainer(model, optimizer, crossed, criterion, config=config).train()
    assert criterion.logit_scale.log_scale.item() < cap - 0.5
