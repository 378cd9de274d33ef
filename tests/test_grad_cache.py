"""GradCache gives the loss and gradients of the plain step, with dropout on, alone and under DDP."""

from __future__ import annotations

import datetime
import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
from torch.nn.parallel import DistributedDataParallel

from vembed.losses import InfoNCELoss, average_gradients
from vembed.training.grad_cache import GradCache

pytestmark = pytest.mark.unit

B, K, CHUNK = 10, 2, 4  # chunks of 4, 4, 2


class DualEncoder(nn.Module):
    """A text-ish and an image-ish tower with dropout, returning the role dict GradCache expects."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.text = nn.Sequential(nn.Linear(12, 32), nn.GELU(), nn.Dropout(0.3), nn.Linear(32, 16))
        self.image = nn.Sequential(nn.Linear(20, 32), nn.Tanh(), nn.Dropout(0.3), nn.Linear(32, 16))

    def forward(self, query_x, positive_x, negatives_x=None, **_) -> dict[str, torch.Tensor]:
        out = {
            "query": F.normalize(self.text(query_x), dim=-1),
            "positive": F.normalize(self.image(positive_x), dim=-1),
        }
        if negatives_x is not None:
            out["negatives"] = F.normalize(self.image(negatives_x), dim=-1)
        return out


def make_batch(size: int = B, seed: int = 1) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {
        "query_x": torch.randn(size, 12, generator=g),
        "positive_x": torch.randn(size, 20, generator=g),
        "negatives_x": torch.randn(size, K, 20, generator=g),
        "labels": torch.tensor([0, 1, 2, 0, 3, 4, 5, 1, 6, 7])[:size],
        "split": "train",  # not a tensor: passed to every chunk unchanged
    }


def grads_of(*modules: nn.Module) -> dict[str, torch.Tensor]:
    return {f"{i}.{n}": p.grad.clone() for i, m in enumerate(modules) for n, p in m.named_parameters()}


def chunked_plain_step(model, loss_fn, batch, chunk, seeds=(123,)):
    """Reference: encode chunk by chunk WITH a graph (the RNG stream GradCache replays), one backward.

    ``seeds``: one per group of rows (a DDP rank's share), reseeded before the group's chunks.
    """
    size = batch["query_x"].shape[0]
    group = size // len(seeds)
    outputs = []
    for g, seed in enumerate(seeds):
        torch.manual_seed(seed)
        for start in range(g * group, (g + 1) * group, chunk):
            stop = min(start + chunk, (g + 1) * group)
            outputs.append(model(**{k: v[start:stop] if torch.is_tensor(v) else v for k, v in batch.items()}))
    full = {k: torch.cat([o[k] for o in outputs]) for k in outputs[0]}
    loss = loss_fn(full, batch)
    loss.backward()
    return loss.detach()


def test_grad_cache_equals_plain_step_with_dropout():
    batch = make_batch()
    model, loss_fn = DualEncoder().train(), InfoNCELoss(temperature=0.1, learnable_temperature=True)
    with torch.no_grad():  # dropout really is on: two passes differ
        assert not torch.allclose(model(**batch)["query"], model(**batch)["query"])

    expected_loss = chunked_plain_step(model, loss_fn, batch, CHUNK)
    expected = grads_of(model, loss_fn)
    rng_after_plain = torch.get_rng_state()
    model.zero_grad()
    loss_fn.zero_grad()

    torch.manual_seed(123)
    loss = GradCache(model, loss_fn, chunk_size=CHUNK).step(batch)
    assert not loss.requires_grad
    torch.testing.assert_close(loss, expected_loss, atol=1e-5, rtol=0)
    got = grads_of(model, loss_fn)
    assert got.keys() == expected.keys() and "1.logit_scale.log_scale" in got  # the temperature got its grad
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], atol=1e-5, rtol=0, msg=name)
    assert torch.equal(torch.get_rng_state(), rng_after_plain)  # RNG left where one forward pass leaves it


def test_grad_cache_equals_single_full_batch_forward_without_dropout():
    batch = make_batch()
    model, loss_fn = DualEncoder().eval(), InfoNCELoss(temperature=0.1)
    expected_loss = loss_fn(model(**batch), batch)
    expected_loss.backward()
    expected = grads_of(model)
    model.zero_grad()

    loss = GradCache(model, loss_fn, chunk_size=3).step(batch)
    torch.testing.assert_close(loss, expected_loss.detach(), atol=1e-5, rtol=0)
    for name, grad in grads_of(model).items():
        torch.testing.assert_close(grad, expected[name], atol=1e-5, rtol=0, msg=name)


def test_grad_cache_rejects_bad_batches_and_outputs():
    model, loss_fn = DualEncoder(), InfoNCELoss()
    with pytest.raises(ValueError, match="chunk_size must be >= 1"):
        GradCache(model, loss_fn, chunk_size=0)
    batch = make_batch()
    batch["positive_x"] = batch["positive_x"][:7]
    with pytest.raises(ValueError, match="same batch size"):
        GradCache(model, loss_fn, chunk_size=4).step(batch)

    class SharedOutput(nn.Module):
        def forward(self, query_x, **_):
            return {"query": query_x, "positive": query_x[:1]}

    with pytest.raises(ValueError, match="'positive' must be a tensor with one row per example"):
        GradCache(SharedOutput(), loss_fn, chunk_size=4).step(make_batch())


# ---------------------------------------------------------------- DDP: 2 gloo processes

WORLD = 2
RANK_SEEDS = (100, 101)


def _ddp_worker(rank: int, port: int, out_dir: str) -> None:
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=WORLD,
        timeout=datetime.timedelta(seconds=60),
    )
    model = DistributedDataParallel(DualEncoder().train())
    reductions: list[int] = []

    def counting_allreduce(state, bucket):
        reductions.append(1)
        return default_hooks.allreduce_hook(None, bucket)

    model.register_comm_hook(None, counting_allreduce)
    loss_fn = InfoNCELoss(temperature=0.1, learnable_temperature=True)  # gathers across ranks by default
    half = B // WORLD
    batch = {k: v[rank * half : (rank + 1) * half] if torch.is_tensor(v) else v for k, v in make_batch().items()}
    torch.manual_seed(RANK_SEEDS[rank])
    loss = GradCache(model, loss_fn, chunk_size=2).step(batch)  # 3 chunks per rank
    average_gradients(loss_fn.parameters())
    results = {"loss": loss, "grads": grads_of(model.module, loss_fn), "reductions": len(reductions)}
    torch.save(results, Path(out_dir) / f"rank{rank}.pt")
    dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_grad_cache_under_ddp_with_gather_equals_single_process(tmp_path):
    mp.spawn(_ddp_worker, args=(free_port(), str(tmp_path)), nprocs=WORLD, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]

    model, loss_fn = DualEncoder().train(), InfoNCELoss(temperature=0.1, learnable_temperature=True)
    expected_loss = chunked_plain_step(model, loss_fn, make_batch(), chunk=2, seeds=RANK_SEEDS)
    expected = grads_of(model, loss_fn)

    torch.testing.assert_close(sum(r["loss"] for r in ranks) / WORLD, expected_loss, atol=1e-5, rtol=0)
    for result in ranks:
        assert result["reductions"] == 1  # no_sync on all chunks but the last: one all-reduce per step
        for name, grad in expected.items():
            torch.testing.assert_close(result["grads"][name], grad, atol=1e-5, rtol=0, msg=name)


def test_grad_cache_trains_the_loss_parameters_a_model_holds():
    """A model built by build_model returns its loss's logit scale and bias (0-dim, once per batch) beside the
    per-example embeddings: GradCache gives them, and every other parameter, the full batch's gradient."""
    from vembed.losses import SigmoidLoss
    from vembed.losses.scale import LogitParameters

    class Holding(DualEncoder):
        def __init__(self) -> None:
            super().__init__()
            self.logit_parameters = LogitParameters(0.2, bias=-1.0)

        def forward(self, **batch) -> dict[str, torch.Tensor]:
            return {**super().forward(**batch), **self.logit_parameters()}

    batch = make_batch()
    model, loss_fn = Holding().eval(), SigmoidLoss()
    expected_loss = loss_fn(model(**batch), batch)
    expected_loss.backward()
    expected = grads_of(model)
    assert "0.logit_parameters.logit_bias" in expected and "0.logit_parameters.logit_scale.log_scale" in expected
    model.zero_grad()

    loss = GradCache(model, loss_fn, chunk_size=3).step(batch)
    torch.testing.assert_close(loss, expected_loss.detach(), atol=1e-5, rtol=0)
    for name, grad in grads_of(model).items():
        torch.testing.assert_close(grad, expected[name], atol=1e-5, rtol=0, msg=name)
    assert all(p.grad is None for p in loss_fn.parameters())
