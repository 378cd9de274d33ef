"""Gathered losses on 2 gloo processes give the gradients of one process on the concatenated batch."""

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
from torch.nn.parallel import DistributedDataParallel

from vembed.losses import InfoNCELoss, MaxSimLoss, SigmoidLoss, gather_with_grad
from vembed.losses.cosent import CoSENTLoss

pytestmark = pytest.mark.unit

WORLD = 2
IN_DIM, D, K, L = 6, 5, 2, 5

# name -> (loss builder, rows held by rank 0 and rank 1, multi-vector, label kind)
SCENARIOS = {
    "infonce-bidirectional-per-query-negatives-learnable": (
        lambda: InfoNCELoss(temperature=0.1, learnable_temperature=True, bidirectional=True),
        (3, 3),
        False,
        None,
    ),
    "infonce-labels-shared-negatives-uneven-batches": (
        lambda: InfoNCELoss(temperature=0.1, bidirectional=True),
        (2, 4),
        False,
        "class",
    ),
    "sigmoid-learnable-scale-bias": (lambda: SigmoidLoss(init_scale=5.0, init_bias=-2.0), (3, 3), False, None),
    "cosent-global-pairs": (lambda: CoSENTLoss(scale=10.0), (3, 3), False, "score"),
    "maxsim-ranks-with-different-lengths": (lambda: MaxSimLoss(temperature=0.5), (2, 3), True, None),
}


class Step(nn.Module):
    """A linear encoder plus the loss, so that DDP averages the loss's parameters too."""

    def __init__(self, loss: nn.Module) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.encoder = nn.Linear(IN_DIM, D, dtype=torch.float64)
        self.loss = loss.double()

    def forward(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        def enc(x):
            return F.normalize(self.encoder(x), dim=-1)

        negatives = inputs.get("negatives")
        kwargs = {k: v for k, v in inputs.items() if k.endswith("_mask")}
        return self.loss(
            enc(inputs["query"]),
            enc(inputs["positive"]),
            None if negatives is None else enc(negatives),
            inputs.get("labels"),
            **kwargs,
        )


def make_inputs(name: str) -> tuple[dict[str, torch.Tensor], tuple[int, int]]:
    """The global batch of a scenario (same on every process) and each rank's row count."""
    _, sizes, multi_vector, label_kind = SCENARIOS[name]
    g = torch.Generator().manual_seed(1)
    total = sum(sizes)
    if multi_vector:
        inputs = {
            "query": torch.randn(total, 3, IN_DIM, generator=g, dtype=torch.float64),
            "positive": torch.randn(total, L, IN_DIM, generator=g, dtype=torch.float64),
            "negatives": torch.randn(total, K, 4, IN_DIM, generator=g, dtype=torch.float64),
            "query_mask": torch.ones(total, 3, dtype=torch.bool),
            "positive_mask": torch.rand(total, L, generator=g) > 0.3,
            "negative_mask": torch.ones(total, K, 4, dtype=torch.bool),
        }
        inputs["positive_mask"][:, 0] = True
        inputs["positive_mask"][: sizes[0], 3:] = False  # rank 0 pads its positives to 3 tokens only
        inputs["query_mask"][0, 2] = False
        return inputs, sizes
    inputs = {
        "query": torch.randn(total, IN_DIM, generator=g, dtype=torch.float64),
        "positive": torch.randn(total, IN_DIM, generator=g, dtype=torch.float64),
    }
    if label_kind != "score":
        shared = name.endswith("uneven-batches")
        inputs["negatives"] = torch.randn(*((total,) if shared else (total, K)), IN_DIM, generator=g).double()
    if label_kind == "class":
        inputs["labels"] = torch.tensor([0, 1, 1, 0, 2, 1])[:total]
    elif label_kind == "score":
        inputs["labels"] = torch.rand(total, generator=g, dtype=torch.float64) * 5
    return inputs, sizes


def local_slice(name: str, inputs: dict[str, torch.Tensor], sizes: tuple[int, int], rank: int) -> dict:
    start, stop = sum(sizes[:rank]), sum(sizes[: rank + 1])
    out = {k: v[start:stop] for k, v in inputs.items()}
    if name.endswith("uneven-batches"):  # shared negatives: each rank holds 3 of the 6
        out["negatives"] = inputs["negatives"][3 * rank : 3 * rank + 3]
    if SCENARIOS[name][2] and rank == 0:  # multi-vector: rank 0's positives really are 3 tokens long
        out["positive"], out["positive_mask"] = out["positive"][:, :3], out["positive_mask"][:, :3]
    return out


def _worker(rank: int, port: int, out_dir: str) -> None:
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=WORLD,
        timeout=datetime.timedelta(seconds=60),
    )
    results: dict[str, dict] = {}

    # gather_with_grad itself: uneven rows and trailing sizes, bool masks, gradient back to the owner
    rows, cols = (2, 3) if rank == 0 else (3, 4)
    local = torch.full((rows, cols), float(rank + 1), requires_grad=True)
    gathered = gather_with_grad(local)
    weights = torch.arange(gathered.numel(), dtype=torch.float32).reshape(gathered.shape)
    (gathered * weights).sum().backward()
    mask = gather_with_grad(torch.ones(rows, cols, dtype=torch.bool))
    results["gather"] = {"gathered": gathered.detach(), "grad": local.grad, "mask": mask}

    for name, (build, _, _, _) in SCENARIOS.items():
        inputs, sizes = make_inputs(name)
        model = DistributedDataParallel(Step(build()))
        loss = model(local_slice(name, inputs, sizes, rank))
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.module.named_parameters()}
        results[name] = {"loss": loss.detach(), "grads": grads}
    torch.save(results, Path(out_dir) / f"rank{rank}.pt")
    dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def two_rank_results(tmp_path_factory) -> list[dict]:
    out_dir = tmp_path_factory.mktemp("gather")
    mp.spawn(_worker, args=(free_port(), str(out_dir)), nprocs=WORLD, join=True)
    return [torch.load(out_dir / f"rank{r}.pt") for r in range(WORLD)]


def test_gather_with_grad_pads_concatenates_and_returns_summed_grads(two_rank_results):
    expected = torch.zeros(5, 4)
    expected[:2, :3] = 1.0
    expected[2:] = 2.0
    weights = torch.arange(20, dtype=torch.float32).reshape(5, 4)
    for rank, result in enumerate(two_rank_results):
        torch.testing.assert_close(result["gather"]["gathered"], expected)
        assert result["gather"]["mask"].dtype == torch.bool
        assert result["gather"]["mask"].sum() == 2 * 3 + 3 * 4
        own = weights[:2, :3] if rank == 0 else weights[2:]
        torch.testing.assert_close(result["gather"]["grad"], WORLD * own)  # each rank used the gathered tensor


def test_gather_with_grad_is_identity_without_a_process_group():
    t = torch.randn(3, 4, requires_grad=True)
    assert gather_with_grad(t) is t


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_two_rank_gradient_equals_single_process_on_concatenated_batch(two_rank_results, name):
    inputs, _ = make_inputs(name)
    reference = Step(SCENARIOS[name][0]())
    loss = reference(inputs)
    loss.backward()

    rank_losses = [r[name]["loss"] for r in two_rank_results]
    torch.testing.assert_close(sum(rank_losses) / WORLD, loss.detach(), atol=1e-5, rtol=0)
    for param_name, param in reference.named_parameters():
        for result in two_rank_results:
            torch.testing.assert_close(result[name]["grads"][param_name], param.grad, atol=1e-5, rtol=0)
        assert param.grad.abs().sum() > 0, f"{param_name} got no gradient"
