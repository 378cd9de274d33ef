"""All-gather across ``torch.distributed`` ranks that keeps every rank's gradient.

Contrastive losses score each rank's queries against the candidates of *all* ranks.
``gather_with_grad`` concatenates the ranks' tensors along dim 0; in backward it sums the
gradient that every rank computed for the gathered tensor (``all_reduce``) and hands each
rank the slice of its own rows, so gradients flow back to the rank that produced them.

Scaling rule used by the losses (see :meth:`Gathered.share_of_mean`): rank ``r`` returns
``world_size / total * sum(local per-query losses)``. Summed over ranks that is
``world_size`` times the mean over the global batch, which is exactly what the summed
backward here and DDP's gradient *averaging* undo: the parameter gradients equal those of
one process computing the mean loss over the concatenated batch.

Ranks may hold different batch sizes and different trailing sizes (e.g. sequence lengths of
multi-vector embeddings): trailing dims are zero-padded to the largest rank's size before the
collective. Pass token masks through the same function so that padding is masked out.
Not initialised, or a world of one: identity.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn


@dataclass(frozen=True)
class Gathered:
    """A tensor gathered along dim 0 and where this rank's rows sit in it."""

    tensor: Tensor
    offset: int  # index of this rank's first row in ``tensor``
    total: int  # rows over all ranks (``tensor.shape[0]``)
    world_size: int

    def share_of_mean(self, per_row: Tensor) -> Tensor:
        """This rank's share of the global mean of ``per_row`` (one value per *local* row).

        ``sum(per_row) * world_size / total``: the plain mean when not distributed, and with
        DDP's gradient averaging the same gradient as the mean over the concatenated batch.
        """
        return per_row.sum() * (self.world_size / self.total)


def distributed_world() -> tuple[int, int]:
    """``(rank, world_size)`` of the default process group; ``(0, 1)`` when not distributed."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _padded_to(tensor: Tensor, shape: torch.Size) -> Tensor:
    """Zero-pad every dim of ``tensor`` at its end up to ``shape``."""
    pad: list[int] = []
    for have, want in zip(reversed(tensor.shape), reversed(shape), strict=True):
        pad += [0, want - have]
    return F.pad(tensor, pad) if any(pad) else tensor


def _gather_shapes(tensor: Tensor, world: int) -> list[torch.Size]:
    """Every rank's shape of ``tensor`` (one tiny collective)."""
    shape = torch.tensor(tensor.shape, dtype=torch.long, device=tensor.device)
    shapes = [torch.empty_like(shape) for _ in range(world)]
    dist.all_gather(shapes, shape)
    return [torch.Size(s.tolist()) for s in shapes]


class _AllGatherWithGrad(torch.autograd.Function):
    """Concatenate every rank's tensor along dim 0; backward sums grads over ranks and keeps own slice."""

    @staticmethod
    def forward(ctx, tensor: Tensor, sizes: list[torch.Size], offset: int) -> Tensor:  # type: ignore[override]
        max_shape = torch.Size(max(dims) for dims in zip(*sizes, strict=True))
        wire = tensor.to(torch.uint8) if tensor.dtype == torch.bool else tensor  # gloo has no bool collectives
        buffers = [wire.new_empty(max_shape) for _ in sizes]
        dist.all_gather(buffers, _padded_to(wire, max_shape).contiguous())
        out = torch.cat([buf[: size[0]] for buf, size in zip(buffers, sizes, strict=True)], dim=0)
        ctx.local_shape = tensor.shape
        ctx.offset = offset
        return out.to(torch.bool) if tensor.dtype == torch.bool else out

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None, None]:  # type: ignore[override]
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        rows = slice(ctx.offset, ctx.offset + ctx.local_shape[0])
        return grad[(rows, *(slice(0, n) for n in ctx.local_shape[1:]))], None, None


def all_gather_with_grad(tensor: Tensor) -> Gathered:
    """Gather ``tensor`` from every rank along dim 0 (gradient-preserving), with this rank's offset."""
    rank, world = distributed_world()
    if world == 1:
        return Gathered(tensor, offset=0, total=tensor.shape[0], world_size=1)
    if tensor.dim() == 0:
        raise ValueError("gather_with_grad needs a tensor with a batch dim (dim 0), got a 0-dim tensor")
    sizes = _gather_shapes(tensor, world)
    if any(len(size) != tensor.dim() for size in sizes):
        raise ValueError(f"gather_with_grad: ranks hold tensors with different numbers of dims: {sizes}")
    offset = sum(size[0] for size in sizes[:rank])
    gathered = _AllGatherWithGrad.apply(tensor, sizes, offset)
    return Gathered(gathered, offset=offset, total=gathered.shape[0], world_size=world)


def gather_with_grad(tensor: Tensor) -> Tensor:
    """All ranks' ``tensor`` concatenated along dim 0; each rank's rows keep their gradient.

    Identity when ``torch.distributed`` is not initialised or the world has one rank.
    """
    return all_gather_with_grad(tensor).tensor


def average_gradients(parameters: Iterable[nn.Parameter]) -> None:
    """All-reduce-average ``.grad`` of parameters that DDP does not wrap (e.g. a learnable temperature).

    A loss module lives outside the DDP model (GradCache even calls it on cached representations),
    so its parameters' gradients are rank-local: call this after backward so that every rank applies
    the gradient of the global loss. No-op when not distributed.
    """
    _, world = distributed_world()
    if world == 1:
        return
    for param in parameters:
        if param.grad is not None:
            dist.all_reduce(param.grad, op=dist.ReduceOp.SUM)
            param.grad /= world
