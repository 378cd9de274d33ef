"""GradCache: the loss of a large batch with the activation memory of one chunk (Gao et al. 2021).

A contrastive loss couples every example of the batch, so it cannot simply be accumulated over
micro-batches. GradCache splits the step in three:

1. forward every chunk without a graph, keeping only the (small) representations and the RNG
   state each chunk started from;
2. compute the loss on the concatenated representations (leaf tensors that require grad) and
   backpropagate it to them: this yields d loss / d representation for every example, and the
   gradients of the loss's own parameters (e.g. a learnable temperature) land in their ``.grad``;
3. forward every chunk again with a graph, the chunk's RNG state restored so dropout draws the same
   masks, and backpropagate the cached representation gradients into the model.

Parameter gradients equal those of one backward through a step that encodes the batch chunk by
chunk (with dropout, a single full-batch forward draws its masks in another order; without
randomness the two coincide). Under DDP every chunk but the last runs in ``model.no_sync()``, so
gradients are all-reduced once per step; modules without ``no_sync`` (e.g. FSDP2) reduce on every
chunk, which is equally correct. The loss may gather across ranks: step 2 runs on all ranks alike.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from vembed.data.ragged import IMAGE_KEYS, ROLES, is_vlm_batch, slice_items
from vembed.losses.scale import LOGIT_KEYS

LossFn = Callable[[Mapping[str, Tensor], Mapping[str, Any]], Tensor]


@dataclass(frozen=True)
class RngState:
    """The CPU and (when CUDA is in use) every CUDA device's RNG state."""

    cpu: Tensor
    cuda: list[Tensor] | None

    @classmethod
    def capture(cls) -> RngState:
        cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None
        return cls(torch.get_rng_state(), cuda)

    def restore(self) -> None:
        torch.set_rng_state(self.cpu)
        if self.cuda is not None:
            torch.cuda.set_rng_state_all(self.cuda)


def split_batch(batch: Mapping[str, Any], chunk_size: int) -> list[dict[str, Any]]:
    """Split every tensor of ``batch`` along dim 0 into chunks of ``chunk_size``; other values are shared.

    A VLM batch's flat ``{role}_pixel_values`` and ``{role}_image_grid_thw`` have no batch axis: each chunk gets the
    patches and grid rows of its own items (:func:`vembed.data.ragged.slice_items`).
    """
    ragged = {f"{role}_{key}" for role in ROLES for key in IMAGE_KEYS} if is_vlm_batch(batch) else set()
    sizes = {
        key: value.shape[0]
        for key, value in batch.items()
        if isinstance(value, Tensor) and value.dim() > 0 and key not in ragged
    }
    if not sizes:
        raise ValueError("GradCache needs a batch with at least one tensor (with a batch dim) to split")
    if len(set(sizes.values())) != 1:
        raise ValueError(f"every tensor of the batch must have the same batch size (dim 0) to be chunked, got {sizes}")
    batch_size = next(iter(sizes.values()))
    starts = range(0, batch_size, chunk_size)
    if ragged:
        return [slice_items(batch, start, min(start + chunk_size, batch_size)) for start in starts]
    return [
        {key: value[start : start + chunk_size] if key in sizes else value for key, value in batch.items()}
        for start in starts
    ]


def _tensor_outputs(outputs: Any, chunk_rows: int) -> dict[str, Tensor]:
    if not isinstance(outputs, Mapping):
        raise TypeError(f"GradCache: the model must return a mapping of role -> tensor, got {type(outputs).__name__}")
    for key, value in outputs.items():
        if key in LOGIT_KEYS and isinstance(value, Tensor):
            continue  # the model's learnable loss parameters: one value per batch, not per example
        if not isinstance(value, Tensor) or value.dim() == 0 or value.shape[0] != chunk_rows:
            got = list(value.shape) if isinstance(value, Tensor) else type(value).__name__
            raise ValueError(
                f"GradCache: model output '{key}' must be a tensor with one row per example ({chunk_rows}), got {got}"
            )
    return dict(outputs)


class GradCache:
    """Large-batch steps in chunk-sized memory: ``GradCache(model, loss_fn, chunk_size).step(batch)``.

    ``model(**chunk)`` must return a mapping of role -> tensor with one row per example
    (``{"query": [b, D], "positive": [b, D], "negatives": [b, K, D]?, masks?}``) and
    ``loss_fn(outputs, batch)`` the scalar loss of the full batch. :meth:`step` leaves the
    gradients in ``.grad`` exactly as ``loss.backward()`` would and returns the detached loss; the
    optimizer step, clipping and zeroing stay with the caller. Under DDP the loss's own parameters
    (e.g. a learnable temperature) are outside the DDP module: follow the step with
    :func:`vembed.losses.average_gradients` on them.
    """

    def __init__(self, model: nn.Module, loss_fn: LossFn, chunk_size: int) -> None:
        if chunk_size < 1:
            raise ValueError(f"grad_cache_chunk_size must be >= 1, got {chunk_size}")
        self.model = model
        self.loss_fn = loss_fn
        self.chunk_size = chunk_size

    def step(self, batch: Mapping[str, Any]) -> Tensor:
        """Forward, loss and backward of ``batch`` chunk by chunk; returns the detached loss."""
        chunks = split_batch(batch, self.chunk_size)
        reps, rng_states = self._encode_without_graph(chunks)
        # per-example outputs are concatenated; the model's loss parameters (logit_scale, ...) are the same per chunk
        reps = {
            key: rep0 if key in LOGIT_KEYS else torch.cat([rep[key] for rep in reps]) for key, rep0 in reps[0].items()
        }
        leaves = {key: value.detach().requires_grad_(value.is_floating_point()) for key, value in reps.items()}
        loss = self.loss_fn(leaves, batch)
        loss.backward()
        grads = {key: leaf.grad for key, leaf in leaves.items() if leaf.grad is not None}
        self._backward_chunks(chunks, rng_states, grads)
        return loss.detach()

    def _encode_without_graph(self, chunks: list[dict[str, Any]]) -> tuple[list[dict[str, Tensor]], list[RngState]]:
        reps, states = [], []
        with torch.no_grad():
            for chunk in chunks:
                states.append(RngState.capture())
                reps.append(_tensor_outputs(self.model(**chunk), _rows(chunk)))
        if any(rep.keys() != reps[0].keys() for rep in reps):
            raise ValueError("GradCache: the model returned different keys for different chunks")
        return reps, states

    def _backward_chunks(
        self, chunks: list[dict[str, Any]], rng_states: list[RngState], grads: Mapping[str, Tensor]
    ) -> None:
        after_first_pass = RngState.capture()
        offset = 0
        for index, (chunk, state) in enumerate(zip(chunks, rng_states, strict=True)):
            rows = _rows(chunk)
            state.restore()
            last = index == len(chunks) - 1
            with self._sync_context(last=last):
                outputs = _tensor_outputs(self.model(**chunk), rows)
                keys = [key for key in grads if outputs[key].requires_grad and key not in LOGIT_KEYS]
                tensors = [outputs[key] for key in keys]
                cached = [grads[key][offset : offset + rows] for key in keys]
                if last:  # the loss parameters' gradient, once, in the chunk whose backward synchronises
                    logit_keys = [key for key in grads if key in LOGIT_KEYS and outputs[key].requires_grad]
                    tensors += [outputs[key] for key in logit_keys]
                    cached += [grads[key] for key in logit_keys]
                if tensors:
                    torch.autograd.backward(tensors, cached)
            offset += rows
        after_first_pass.restore()  # leave the RNG where a single forward pass would have

    def _sync_context(self, last: bool) -> contextlib.AbstractContextManager[Any]:
        no_sync = getattr(self.model, "no_sync", None)
        return contextlib.nullcontext() if last or no_sync is None else no_sync()


def _rows(chunk: Mapping[str, Any]) -> int:
    ragged = {f"{role}_{key}" for role in ROLES for key in IMAGE_KEYS}
    return next(
        value.shape[0]
        for key, value in chunk.items()
        if isinstance(value, Tensor) and value.dim() > 0 and key not in ragged
    )
