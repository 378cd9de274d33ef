"""Turn a list of records into model input arrays: the one batch builder behind the torch collator and Ray Data.

:func:`build_batch` returns numpy arrays in exactly the layout ``EmbeddingModel.forward(**batch)`` consumes::

    {role}_input_ids, {role}_attention_mask   int64   [B, L]           text roles (query, positive)
    {role}_pixel_values                       float32 [B, 3, H, W]     image roles (query, positive)
    negative_input_ids, negative_attention_mask int64 [B, K, L]        text negatives
    negative_pixel_values                     float32 [B, K, 3, H, W]  image negatives
    labels                                    int64   [B]              when the records carry labels

A multimodal query (m2i, m2t) has both ``query_input_ids`` and ``query_pixel_values``. A vision-language model
(``preprocessor.is_vlm``) gets the VLM batch format instead (every item one chat sequence: ``{role}_input_ids``,
``_attention_mask``, ``_mm_token_type_ids``, ``_content_mask`` ``[B, L]`` / negatives ``[B, K, L]``, flat
``{role}_pixel_values [sum P, C]`` and ``{role}_image_grid_thw [N, 3]``); for Ray Data (``pad_to_max_length``) its
rows are per-row ragged arrays (:mod:`vembed.data.ragged`). A *bad record* (an empty
text, an image that is missing or not decodable) is dropped and reported under ``on_bad_record="skip"`` -- never
replaced by a blank image -- and raises :class:`BadRecordError` naming the record and the file under ``"fail"``.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np

from vembed.data.images import decode_image, read_bytes
from vembed.data.ragged import TOKEN_KEYS, to_rows
from vembed.data.records import SOURCE_FIELD, RecordSchema, normalize_records, role_modalities

logger = logging.getLogger(__name__)

BAD_RECORD_POLICIES = ("skip", "fail")


class BadRecordError(ValueError):
    """A record's content cannot become model input (empty text, unreadable image); names record and source."""


class BadRecord(NamedTuple):
    """A record dropped under ``on_bad_record="skip"``: its id, where it came from and what was wrong."""

    record_id: str
    source: str
    error: str


@dataclass
class _Loaded:
    """One record's decoded inputs, per role; ``None`` where the role has no such modality."""

    query_text: str | None
    query_image: Any
    positive_text: str | None
    positive_image: Any
    negative_texts: list[str]
    negative_images: list[Any]
    label: int | None


def check_bad_record_policy(policy: str) -> str:
    """Return ``policy`` if it is ``"skip"`` or ``"fail"``, else raise a ValueError saying so."""
    if policy not in BAD_RECORD_POLICIES:
        raise ValueError(f"on_bad_record must be one of {', '.join(BAD_RECORD_POLICIES)}, got {policy!r}")
    return policy


def build_batch(
    records: Sequence[Mapping[str, Any]],
    preprocessor: Any,
    retrieval_mode: str,
    image_root: str | None = None,
    on_bad_record: str = "skip",
    *,
    pad_to_max_length: bool = False,
    with_negatives: bool = True,
) -> tuple[dict[str, np.ndarray], list[BadRecord]]:
    """Read, decode and preprocess ``records`` into one batch (layout in the module docstring).

    Args:
        records: records in the schema of :mod:`vembed.data.records` (raw or already normalised).
        preprocessor: a :class:`vembed.data.processing.Preprocessor` (``process_texts``, ``process_images``).
        retrieval_mode: decides which fields are texts and which are images.
        image_root: directory or URI that relative image paths are resolved against.
        on_bad_record: ``"skip"`` drops and reports bad records, ``"fail"`` raises :class:`BadRecordError`.
        pad_to_max_length: pad every text to the preprocessor's ``max_text_length`` (its truncation length), so
            all Ray Data blocks share one shape; ``False`` pads to the longest text of the batch.
        with_negatives: ``False`` ignores the records' negatives (evaluation never needs them).

    Returns:
        ``(batch, bad)``: the arrays for the good records (an empty dict when none is good) and the dropped ones.
        Schema problems (a missing field, negatives counts that differ) raise
        :class:`~vembed.data.records.RecordError` whatever the policy.
    """
    check_bad_record_policy(on_bad_record)
    roles = role_modalities(retrieval_mode)
    loaded: list[_Loaded] = []
    bad: list[BadRecord] = []
    for rec, _ in normalize_records(records, RecordSchema(retrieval_mode, image_root=image_root)):
        try:
            loaded.append(_load_record(rec, roles, with_negatives))
        except BadRecordError as exc:
            record_id, source = rec["id"], rec[SOURCE_FIELD]
            if on_bad_record == "fail":
                raise BadRecordError(
                    f"bad record {record_id!r} at {source}: {exc} (set on_bad_record: skip to drop such records)"
                ) from exc
            logger.warning("skipping bad record %r at %s: %s", record_id, source, exc)
            bad.append(BadRecord(record_id, source, str(exc)))
    if not loaded:
        return {}, bad
    if getattr(preprocessor, "is_vlm", False):
        batch = _to_vlm_arrays(loaded, roles, preprocessor)
        return (to_rows(batch, len(loaded)) if pad_to_max_length else batch), bad
    text_length = preprocessor.max_text_length if pad_to_max_length else None
    return _to_arrays(loaded, roles, preprocessor, text_length), bad


def _load_record(rec: Mapping[str, Any], roles: Mapping[str, frozenset[str]], with_negatives: bool) -> _Loaded:
    """Check texts and decode images of one normalised record; raises BadRecordError on the first problem."""
    negatives = rec["negatives"] if with_negatives else []
    loaded = _Loaded(None, None, None, None, [], [], rec["label"])
    if "text" in roles["query"]:
        loaded.query_text = _text(rec["query"], "query")
    if "image" in roles["query"]:
        loaded.query_image = _image(rec["query_image"], "query image")
    if "text" in roles["positive"]:
        loaded.positive_text = _text(rec["positive"], "positive")
        loaded.negative_texts = [_text(t, f"negatives[{i}]") for i, t in enumerate(negatives)]
    else:
        loaded.positive_image = _image(rec["positive"], "positive image")
        loaded.negative_images = [_image(p, f"negatives[{i}] image") for i, p in enumerate(negatives)]
    return loaded


def _text(value: str, what: str) -> str:
    if not value.strip():
        raise BadRecordError(f"{what} text is empty")
    return value


def _image(source: str, what: str) -> Any:
    if not source:
        raise BadRecordError(f"{what} path is empty")
    try:
        return decode_image(read_bytes(source), source)
    except (OSError, ValueError) as exc:  # FileNotFoundError, network errors, BadImageError
        raise BadRecordError(f"{what} {source!r}: {exc}") from exc


def _to_arrays(
    loaded: Sequence[_Loaded],
    roles: Mapping[str, frozenset[str]],
    preprocessor: Any,
    text_length: int | None,
) -> dict[str, np.ndarray]:
    batch: dict[str, np.ndarray] = {}
    size = len(loaded)
    num_negatives = len(loaded[0].negative_texts) + len(loaded[0].negative_images)
    if "text" in roles["query"]:
        batch.update(_texts(preprocessor, [r.query_text for r in loaded], "query", text_length))
    if "image" in roles["query"]:
        batch["query_pixel_values"] = _images(preprocessor, [r.query_image for r in loaded])
    if "text" in roles["positive"]:
        batch.update(_texts(preprocessor, [r.positive_text for r in loaded], "positive", text_length))
        if num_negatives:
            flat = _texts(preprocessor, [t for r in loaded for t in r.negative_texts], "negative", text_length)
            batch.update({k: v.reshape(size, num_negatives, -1) for k, v in flat.items()})
    else:
        batch["positive_pixel_values"] = _images(preprocessor, [r.positive_image for r in loaded])
        if num_negatives:
            flat_images = _images(preprocessor, [im for r in loaded for im in r.negative_images])
            batch["negative_pixel_values"] = flat_images.reshape(size, num_negatives, *flat_images.shape[1:])
    if loaded[0].label is not None:
        batch["labels"] = np.asarray([r.label for r in loaded], dtype=np.int64)
    return batch


def _to_vlm_arrays(
    loaded: Sequence[_Loaded], roles: Mapping[str, frozenset[str]], preprocessor: Any
) -> dict[str, np.ndarray]:
    """A vision-language model's batch: every role's items (text, image, or image + text) as conversations, one
    sequence each (:meth:`~vembed.data.processing.Preprocessor.process_conversations`), with the role's
    instruction. Negatives are flattened item-major (record ``b``'s ``K`` negatives are items ``b*K .. b*K+K-1``):
    tokens ``[B, K, L]``, patches and grids flat in that order."""
    batch: dict[str, np.ndarray] = {}
    size = len(loaded)
    num_negatives = len(loaded[0].negative_texts) + len(loaded[0].negative_images)
    text_positive = "text" in roles["positive"]
    parts = {
        "query": (
            [r.query_text for r in loaded] if "text" in roles["query"] else None,
            [r.query_image for r in loaded] if "image" in roles["query"] else None,
        ),
        "positive": (
            [r.positive_text for r in loaded] if text_positive else None,
            None if text_positive else [r.positive_image for r in loaded],
        ),
    }
    if num_negatives:
        parts["negative"] = (
            [t for r in loaded for t in r.negative_texts] if text_positive else None,
            None if text_positive else [im for r in loaded for im in r.negative_images],
        )
    for role, (texts, images) in parts.items():
        encoded = preprocessor.process_conversations(texts, images, preprocessor.instruction_for(role))
        for key, value in encoded.items():
            if role == "negative" and key in TOKEN_KEYS:
                value = value.reshape(size, num_negatives, -1)
            batch[f"{role}_{key}"] = value
    if loaded[0].label is not None:
        batch["labels"] = np.asarray([r.label for r in loaded], dtype=np.int64)
    return batch


def _texts(preprocessor: Any, texts: list[str], role: str, text_length: int | None) -> dict[str, np.ndarray]:
    instruction_for = getattr(preprocessor, "instruction_for", None)  # query/document_instruction (Qwen3-Embedding)
    instruction = instruction_for(role) if instruction_for is not None else None
    enc = (
        preprocessor.process_texts(texts, instruction) if instruction is not None else preprocessor.process_texts(texts)
    )
    ids = np.asarray(enc["input_ids"], dtype=np.int64)
    mask = np.asarray(enc["attention_mask"], dtype=np.int64)
    if text_length is not None and ids.shape[1] < text_length:
        tokenizer = preprocessor.tokenizer
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        ids, mask = pad_text(ids, mask, text_length, pad_id, side=getattr(tokenizer, "padding_side", "right"))
    return {f"{role}_input_ids": ids, f"{role}_attention_mask": mask}


def _images(preprocessor: Any, images: list[Any]) -> np.ndarray:
    return np.asarray(preprocessor.process_images(images), dtype=np.float32)


def pad_text(
    ids: np.ndarray, mask: np.ndarray, length: int, pad_id: int, side: str = "right"
) -> tuple[np.ndarray, np.ndarray]:
    """Pad ``[N, L]`` token ids (with ``pad_id``) and mask (with 0) to ``[N, length]`` on the tokenizer's side."""
    extra = length - ids.shape[1]
    width = ((0, 0), (extra, 0)) if side == "left" else ((0, 0), (0, extra))
    return np.pad(ids, width, constant_values=pad_id), np.pad(mask, width, constant_values=0)


#: a ``[B]`` column that Ray Data rows of fixed-length-padded models carry (``text_padding="max_length"``, e.g.
#: SigLIP, whose pooling reads the last position): :func:`trim_text_padding` then keeps their padding, and drops it
FIXED_TEXT_LENGTH_KEY = "text_fixed_length"


def trim_text_padding(batch: Mapping[str, Any]) -> dict[str, Any]:
    """Drop the token positions that are padding in every row of a batch, for each text role.

    Ray Data rows are padded to ``max_text_length`` so all blocks share one shape; trimming in the train worker's
    collate step gives the model the same inputs as padding to the batch's longest text would. Works on numpy
    arrays and torch tensors, ``[B, L]`` and ``[B, K, L]``, and for left- or right-padded tokenizers. Rows marked
    with :data:`FIXED_TEXT_LENGTH_KEY` keep their fixed length (the model's pooling depends on it).
    """
    out = dict(batch)
    if out.pop(FIXED_TEXT_LENGTH_KEY, None) is not None:
        return out
    for role in ("query", "positive", "negative"):
        mask = batch.get(f"{role}_attention_mask")
        if mask is None:
            continue
        used = np.flatnonzero(np.asarray(mask).reshape(-1, mask.shape[-1]).any(axis=0))
        span = slice(int(used[0]), int(used[-1]) + 1) if used.size else slice(0, 0)
        for key in (f"{role}_input_ids", f"{role}_attention_mask"):
            out[key] = batch[key][..., span]
    return out
