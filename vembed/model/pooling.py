"""The one pooling implementation: token states ``[B, L, H]`` + attention mask ``[B, L]`` -> embeddings.

Methods:

* ``cls``  -- the first non-padding token's state (BERT/BGE ``[CLS]``, ViT/DINOv2 class token), for left and right
  padding alike.
* ``mean`` -- the mean over non-padding tokens (sentence-transformers / E5 style); padding never contributes.
* ``last`` -- the state of the last non-padding token, for left *and* right padding (decoder / causal text towers).
* ``none`` -- no pooling: the token states with padding positions zeroed, ``[B, L, H]`` (multi-vector, ColBERT-style);
  the caller keeps the mask beside them.

``auto`` is not a pooling method here: :mod:`vembed.model.families` resolves it to one of the above (or, for dual
encoders, to the model's own ``get_*_features`` path) before anything is pooled.
"""

from __future__ import annotations

import torch

POOLING_METHODS: tuple[str, ...] = ("cls", "mean", "last", "none")


def check_pooling_method(method: str) -> str:
    """Return ``method`` if it is a pooling method, else raise a ValueError listing the valid ones."""
    if method not in POOLING_METHODS:
        raise ValueError(f"unknown pooling method {method!r}; choose one of {', '.join(POOLING_METHODS)} (or 'auto')")
    return method


def pool(hidden: torch.Tensor, mask: torch.Tensor | None, method: str) -> torch.Tensor:
    """Pool token states ``hidden [B, L, H]`` with ``mask [B, L]`` (1 = real token, 0 = padding).

    ``mask=None`` means every token is real (image patches). Returns ``[B, H]`` for ``cls``/``mean``/``last`` and the
    masked token states ``[B, L, H]`` for ``none``.

    Raises:
        ValueError: unknown method, ``hidden`` not 3-D, a mask whose shape differs from ``hidden``'s first two axes,
            or a row with no real token (``mean``/``last`` would be undefined).
    """
    check_pooling_method(method)
    if hidden.dim() != 3:
        raise ValueError(f"pool expects token states of shape [batch, tokens, hidden], got {tuple(hidden.shape)}")
    if mask is None:
        mask = torch.ones(hidden.shape[:2], dtype=torch.long, device=hidden.device)
    if tuple(mask.shape) != tuple(hidden.shape[:2]):
        raise ValueError(
            f"attention mask shape {tuple(mask.shape)} does not match token states {tuple(hidden.shape)}: "
            "expected [batch, tokens]"
        )
    if method == "cls":  # the first position whose mask is 1 (position 0 under right padding)
        first = mask.ne(0).int().argmax(dim=1)
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), first]
    weights = mask.to(hidden.dtype).unsqueeze(-1)  # [B, L, 1]
    if method == "none":
        return hidden * weights
    counts = mask.sum(dim=1)
    if bool((counts == 0).any()):
        rows = torch.nonzero(counts == 0).flatten().tolist()
        raise ValueError(f"rows {rows} have an all-zero attention mask; there is no token to pool")
    if method == "mean":
        return (hidden * weights).sum(dim=1) / counts.to(hidden.dtype).unsqueeze(-1)
    # last: index of the last position whose mask is 1 (works for left and right padding alike).
    seq_len = mask.shape[1]
    last = seq_len - 1 - torch.flip(mask.ne(0).int(), dims=[1]).argmax(dim=1)
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
