"""The one place where embeddings are truncated (Matryoshka) and L2-normalised.

The model's ``encode_*`` methods, the Matryoshka loss wrapper, the Predictor and the serving path all call
:func:`finalize_embeddings`, so a truncated embedding is always re-normalised in exactly the same way.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def finalize_embeddings(x: torch.Tensor, dim: int | None = None, normalize: bool = True) -> torch.Tensor:
    """Truncate the last axis of ``x`` to its first ``dim`` entries (Matryoshka), then L2-normalise it.

    Works on single-vector ``[B, D]`` and multi-vector ``[B, L, D]`` (or ``[B, K, L, D]``) embeddings alike: the
    last axis is the embedding axis. Normalisation happens *after* truncation, so every Matryoshka prefix is a unit
    vector (a truncated unit vector is not). All-zero vectors (masked padding tokens) stay zero.

    Args:
        x: embeddings, embedding dimension last.
        dim: keep the first ``dim`` dimensions; ``None`` keeps all of them.
        normalize: L2-normalise the (truncated) last axis.

    Raises:
        ValueError: ``dim`` is not a positive integer no larger than the embedding dimension.
    """
    if x.dim() < 1:
        raise ValueError(f"finalize_embeddings expects a tensor with an embedding axis, got shape {tuple(x.shape)}")
    if dim is not None:
        full = x.shape[-1]
        if isinstance(dim, bool) or not isinstance(dim, int) or not 0 < dim <= full:
            raise ValueError(
                f"Matryoshka dim {dim!r} is invalid for embeddings of dimension {full}: "
                f"use a positive integer <= {full} (check mrl_dims / the requested dim)"
            )
        x = x[..., :dim]
    if normalize:
        x = F.normalize(x, p=2.0, dim=-1)
    return x
