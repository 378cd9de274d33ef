"""Ragged VLM batches: per-row arrays through Ray Data, collation in the worker, and slicing items (GradCache).

A VLM item's patches ``[P_i, C]`` and grid ``[n_i, 3]`` differ in size from item to item, and its sequence length is
bounded only by the model's (long) position table, so a Ray Data row cannot be padded to one fixed shape. Each row
therefore carries its own arrays (:func:`to_rows`): ``{role}_input_ids`` / ``_attention_mask`` /
``_mm_token_type_ids`` / ``_content_mask`` ``[L_i]`` (negatives ``[K, L_i]``), ``{role}_pixel_values [P_i, C]`` and
``{role}_image_grid_thw [n_i, 3]`` (negatives: all K items' images, in order). :func:`collate_rows` turns a batch of
such rows back into the model's batch format (tokens right-padded to the batch's longest row -- last-token pooling
and the positions read the mask, so the padding side does not change a vector -- and patches concatenated in item
order).

:func:`item_slices` finds which images (and patches) belong to items ``[start, stop)`` of a role from the per-item
image-token counts (``mm_token_type_ids``) and ``image_grid_thw``, so GradCache can chunk a VLM batch by item.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

ROLES: tuple[str, ...] = ("query", "positive", "negative")
TOKEN_KEYS: tuple[str, ...] = ("input_ids", "attention_mask", "mm_token_type_ids", "content_mask")
IMAGE_KEYS: tuple[str, ...] = ("pixel_values", "image_grid_thw")


def is_vlm_batch(batch: Mapping[str, Any]) -> bool:
    """True when ``batch`` is in the VLM format (some role carries ``mm_token_type_ids``)."""
    return any(f"{role}_mm_token_type_ids" in batch for role in ROLES)


def _object_array(items: Sequence[np.ndarray]) -> np.ndarray:
    out = np.empty(len(items), dtype=object)
    for i, item in enumerate(items):
        out[i] = item
    return out


def _images_per_item(grid: np.ndarray, image_tokens: np.ndarray) -> np.ndarray:
    """How many images each item has, from its image-token count and the batch's grid (images in item order)."""
    per_image = np.prod(grid, axis=-1)
    total_tokens = int(image_tokens.sum())
    if total_tokens == 0:
        return np.zeros(len(image_tokens), dtype=np.int64)
    ratio = int(per_image.sum()) // total_tokens  # patches per image token: merge_size ** 2
    if ratio * total_tokens != int(per_image.sum()):
        raise ValueError(
            f"image_grid_thw describes {int(per_image.sum())} patches for {total_tokens} image tokens: not a whole "
            "number of patches per token; the batch's images and image tokens do not belong together"
        )
    tokens_per_image = per_image // ratio
    counts = np.zeros(len(image_tokens), dtype=np.int64)
    image = 0
    for item, wanted in enumerate(image_tokens.tolist()):
        got = 0
        while got < wanted:
            if image >= len(tokens_per_image):
                raise ValueError(f"item {item} has {wanted} image tokens but the grid has no image left for them")
            got += int(tokens_per_image[image])
            image += 1
            counts[item] += 1
        if got != wanted:
            raise ValueError(f"item {item} has {wanted} image tokens, which no run of whole images adds up to")
    if image != len(tokens_per_image):
        raise ValueError(f"image_grid_thw has {len(tokens_per_image)} images but the items' tokens use {image}")
    return counts


def _item_image_tokens(mm: np.ndarray, items: int) -> np.ndarray:
    """Image tokens per item of a role: ``[B, L]`` -> ``[B]``, negatives ``[B, K, L]`` -> ``[B]`` (item = row)."""
    return np.asarray(mm).reshape(items, -1).sum(axis=1)


def to_rows(batch: Mapping[str, np.ndarray], size: int) -> dict[str, np.ndarray]:
    """A VLM batch (the model's format, ``size`` records) -> per-row arrays for Ray Data (see the module doc).

    Each record keeps its tokens without padding (negatives: padded to the record's longest negative) and its own
    patches and grid. Other keys (``labels``) pass through.
    """
    out: dict[str, np.ndarray] = {k: v for k, v in batch.items() if not k.startswith(ROLES)}
    for role in ROLES:
        mask = batch.get(f"{role}_attention_mask")
        if mask is None:
            continue
        mask = np.asarray(mask)
        rows: dict[str, list[np.ndarray]] = {key: [] for key in TOKEN_KEYS if f"{role}_{key}" in batch}
        for i in range(size):
            row_mask = mask[i].reshape(-1, mask.shape[-1])  # [1 or K, L]
            used = np.flatnonzero(row_mask.any(axis=0))
            span = slice(int(used[0]), int(used[-1]) + 1) if used.size else slice(0, 0)
            for key, kept in rows.items():
                value = np.asarray(batch[f"{role}_{key}"])[i]
                kept.append(np.ascontiguousarray(value[..., span]))
        for key, kept in rows.items():
            out[f"{role}_{key}"] = _object_array(kept)
        grid = batch.get(f"{role}_image_grid_thw")
        if grid is None:
            continue
        counts = _images_per_item(np.asarray(grid), _item_image_tokens(batch[f"{role}_mm_token_type_ids"], size))
        patches = np.prod(grid, axis=-1)
        image_edges = np.concatenate([[0], np.cumsum(counts)])
        patch_edges = np.concatenate([[0], np.cumsum(patches)])
        pixels = np.asarray(batch[f"{role}_pixel_values"])
        out[f"{role}_pixel_values"] = _object_array(
            [pixels[patch_edges[image_edges[i]] : patch_edges[image_edges[i + 1]]] for i in range(size)]
        )
        out[f"{role}_image_grid_thw"] = _object_array(
            [np.asarray(grid)[image_edges[i] : image_edges[i + 1]] for i in range(size)]
        )
    return out


def _rows_of(column: Any) -> list[np.ndarray]:
    """A Ray Data column as a list of per-row arrays (Ray returns equal-shaped rows as one stacked array)."""
    return [np.asarray(row) for row in column]


def _pad_rows(rows: list[np.ndarray]) -> np.ndarray:
    """Right-pad rows ``[L_i]`` (or ``[K, L_i]``) with zeros to the longest: ``[B, L]`` (or ``[B, K, L]``)."""
    length = max(row.shape[-1] for row in rows)
    padded = [np.pad(row, [(0, 0)] * (row.ndim - 1) + [(0, length - row.shape[-1])]) for row in rows]
    return np.stack(padded).astype(np.int64)


def collate_rows(batch: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """Per-row VLM arrays from Ray Data (:func:`to_rows`) -> the model's batch format, as torch tensors.

    Token rows are right-padded with 0 to the batch's longest (mask and ``mm_token_type_ids`` 0 there); patches and
    grids are concatenated in item order. Copies: Ray's arrays are read-only views of its object store.
    """
    out: dict[str, torch.Tensor] = {}
    for key, column in batch.items():
        role, _, name = key.partition("_")
        if role in ROLES and name in TOKEN_KEYS:
            out[key] = torch.from_numpy(_pad_rows(_rows_of(column)))
        elif role in ROLES and name in IMAGE_KEYS:
            rows = _rows_of(column)
            width = 3 if name == "image_grid_thw" else rows[0].shape[-1]
            flat = np.concatenate([row.reshape(-1, width) for row in rows])
            out[key] = torch.from_numpy(np.ascontiguousarray(flat, dtype=np.int64 if width == 3 else np.float32))
        else:
            out[key] = tensor_copy(column)
    return out


def tensor_copy(array: Any) -> torch.Tensor:
    """A writable torch tensor holding a copy of ``array``, copied by NumPy.

    Collate functions run in Ray Data's iterator threads. A torch copy of a large array there runs an OpenMP
    parallel region, which gives that thread its own pool of OpenMP threads; once more OpenMP threads are alive
    than there are cores, libgomp stops spinning between parallel regions and the training thread's pool sleeps
    and wakes around every operator. Measured on 2 cores: a CLIP step 1.6x slower, AdamW 2.4x. NumPy copies
    in one thread.
    """
    return torch.from_numpy(np.array(array, copy=True))


def item_slices(mm: torch.Tensor, grid: torch.Tensor, items: int) -> tuple[list[int], list[int]]:
    """Image and patch offsets per item of one role: ``image_edges[i]:image_edges[i+1]`` are item ``i``'s grid rows
    and ``patch_edges[...]`` the matching ``pixel_values`` rows (``items + 1`` offsets each)."""
    tokens = _item_image_tokens(mm.detach().cpu().numpy(), items)
    grid_np = grid.detach().cpu().numpy()
    counts = _images_per_item(grid_np, tokens)
    image_edges = np.concatenate([[0], np.cumsum(counts)]).tolist()
    patch_edges = np.concatenate([[0], np.cumsum(np.prod(grid_np, axis=-1))]).tolist()
    return [int(e) for e in image_edges], [int(patch_edges[e]) for e in image_edges]


def slice_items(batch: Mapping[str, Any], start: int, stop: int) -> dict[str, Any]:
    """Items ``[start, stop)`` of a VLM batch: row tensors sliced on dim 0, each role's patches and grid by item.

    Non-tensor values are shared; tensors without a batch axis must not appear (GradCache checks the rest).
    """
    out: dict[str, Any] = {}
    for role in ROLES:
        grid = batch.get(f"{role}_image_grid_thw")
        if grid is None:
            continue
        mm = batch[f"{role}_mm_token_type_ids"]
        images, patches = item_slices(mm, grid, mm.shape[0])
        out[f"{role}_image_grid_thw"] = grid[images[start] : images[stop]]
        out[f"{role}_pixel_values"] = batch[f"{role}_pixel_values"][patches[start] : patches[stop]]
    for key, value in batch.items():
        if key in out:
            continue
        out[key] = value[start:stop] if isinstance(value, torch.Tensor) and value.dim() > 0 else value
    return out
