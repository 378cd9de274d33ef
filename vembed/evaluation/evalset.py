"""An evaluation set: the queries of an eval file, its candidate pool, and which candidates are relevant to each query.

The eval file uses the training record schema (:mod:`vembed.data.records`: ``query``, ``query_image``, ``positive``,
``negatives``, ``label``, ``id``; ``retrieval_mode`` says which fields are images). It becomes a retrieval problem:

- **Queries** are the distinct queries of the file: the ``query`` text, the query image, or both (m2i, m2t).
  Records that repeat a query (five captions of one image in i2t, a caption shared by two images in t2i) make
  one query whose relevant set holds all of their positives, so a correct answer is never counted as a miss.
- **Candidates** are the distinct positives and negatives of the file (image paths or texts), in order of first
  appearance. A candidate's identity is its resolved path/URI or its text.
- **Relevance by ids** (``relevance="ids"``): a query's relevant candidates are its records' positives.
- **Relevance by labels** (i2i only, ``relevance="labels"``, or ``"auto"`` when every record has a ``label``): the
  items are the distinct query and positive images, each with its record's label; every item is a query against
  all the others (leave-one-out: the query itself is excluded) and the items of the same label are relevant.
  Negatives are left out, because their labels are unknown.

Records with an empty query or positive cannot be evaluated and raise a :class:`RecordError` naming their line.
Records may carry different numbers of negatives (evaluation does not batch them).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from vembed.data.readers import EmptyDatasetError, iter_raw_records
from vembed.data.records import SOURCE_FIELD, RecordError, RecordSchema, role_modalities

RELEVANCE_KINDS: tuple[str, ...] = ("auto", "ids", "labels")


@dataclass(frozen=True)
class EvalSet:
    """Queries, candidates and relevance of one eval file (see the module docstring).

    Attributes:
        mode: the retrieval mode (``t2i``, ``i2t``, ``i2i``, ``t2t``, ``m2i``, ``m2t``).
        query_texts: the query texts, one per query (None when queries are images only).
        query_images: the query image paths/URIs, one per query (None when queries are texts only).
        positives: per query, its relevant candidates (paths or texts); empty lists with label relevance.
        candidates: the candidate pool: image paths/URIs or texts, unique.
        labels: label relevance: one label per candidate, and the queries are the candidates (leave-one-out);
            None with relevance by ids.
        num_records: records read from the file.
        origin: the eval file it came from.
    """

    mode: str
    query_texts: list[str] | None
    query_images: list[str] | None
    positives: list[list[str]]
    candidates: list[str]
    labels: list[int] | None
    num_records: int
    origin: str

    @property
    def num_queries(self) -> int:
        return len(self.positives)

    @property
    def leave_one_out(self) -> bool:
        """True for label relevance: query i is candidate i and is excluded from its own ranking."""
        return self.labels is not None

    @property
    def query_modality(self) -> str:
        """``"text"``, ``"image"`` or ``"multimodal"`` (text + image)."""
        kinds = role_modalities(self.mode)["query"]
        return "multimodal" if len(kinds) == 2 else next(iter(kinds))

    @property
    def candidate_modality(self) -> str:
        """``"text"`` or ``"image"``."""
        return next(iter(role_modalities(self.mode)["positive"]))

    def relevant_indices(self, pool: Sequence[str] | None = None) -> tuple[list[list[int]], list[str]]:
        """Each query's relevant candidates as indices into ``pool`` (default: :attr:`candidates`).

        A ``pool`` from elsewhere (e.g. a corpus embedded by ``vembed embed``) may lack some positives; those are
        dropped. Returns ``(indices per query, the positives not in the pool)``.
        """
        if self.leave_one_out:
            raise ValueError("this eval set uses label relevance (leave-one-out); it has no per-query positives")
        lookup = {item: i for i, item in enumerate(self.candidates if pool is None else pool)}
        missing: list[str] = []
        relevant = []
        for items in self.positives:
            relevant.append([lookup[item] for item in items if item in lookup])
            missing.extend(item for item in items if item not in lookup)
        return relevant, missing


def load_eval_set(
    data_path: str | os.PathLike,
    mode: str = "t2i",
    image_root: str | None = None,
    column_mapping: Mapping[str, str] | None = None,
    relevance: str = "auto",
) -> EvalSet:
    """Read an eval file (JSONL / CSV / Parquet, a file or a folder, local or URI) into an :class:`EvalSet`.

    Args:
        data_path: records in the training schema.
        mode: retrieval mode; decides which fields are images.
        image_root: folder (or URI) that relative image paths are resolved against.
        column_mapping: renames the file's columns to schema fields, e.g. ``{"caption": "query"}``.
        relevance: ``"ids"`` (each query's positives), ``"labels"`` (same label, leave-one-out; i2i only) or
            ``"auto"`` (labels for i2i when every record has one, else ids).

    Raises:
        EmptyDatasetError: the file holds no records.
        RecordError: a record misses a field, has an empty query/positive, or an image has two labels.
        ValueError: an unknown mode or relevance kind.
    """
    if relevance not in RELEVANCE_KINDS:
        raise ValueError(f"relevance={relevance!r} is not supported; use one of {', '.join(RELEVANCE_KINDS)}")
    if relevance == "labels" and mode != "i2i":
        raise ValueError(
            f"relevance='labels' (leave-one-out by class) needs image queries and image candidates, i.e. mode 'i2i'; "
            f"got mode {mode!r}. Use relevance='ids' (each query's positives)"
        )
    schema = RecordSchema(mode, column_mapping or {}, image_root)
    # Each record is normalised on its own (no layout fixed from the first), so negatives may vary in number.
    records = [schema.normalize(raw) for raw in iter_raw_records(data_path)]
    if not records:
        raise EmptyDatasetError(f"no records in {os.fspath(data_path)}: the eval file is empty")
    for rec in records:
        _check_usable(rec)
    use_labels = relevance == "labels" or (relevance == "auto" and mode == "i2i" and _all_labelled(records))
    build = _by_labels if use_labels else _by_ids
    return build(records, mode, os.fspath(data_path))


def _check_usable(rec: dict) -> None:
    for field in ("query", "query_image", "positive"):
        if rec[field] is not None and not rec[field].strip():
            raise RecordError(
                f"{rec[SOURCE_FIELD]}: field {field!r} is empty; every eval record needs a query and a positive "
                "(fix or drop the record)"
            )


def _all_labelled(records: list[dict]) -> bool:
    return all(rec["label"] is not None for rec in records)


def _by_ids(records: list[dict], mode: str, origin: str) -> EvalSet:
    query_index: dict[tuple[str | None, str | None], int] = {}
    positives: list[list[str]] = []
    candidates: dict[str, None] = {}  # insertion-ordered set
    for rec in records:
        key = (rec["query"], rec["query_image"])
        q = query_index.setdefault(key, len(query_index))
        if q == len(positives):
            positives.append([])
        if rec["positive"] not in positives[q]:
            positives[q].append(rec["positive"])
        for item in [rec["positive"], *rec["negatives"]]:
            if item:
                candidates.setdefault(item)
    kinds = role_modalities(mode)["query"]
    keys = list(query_index)
    return EvalSet(
        mode=mode,
        query_texts=[text for text, _ in keys] if "text" in kinds else None,
        query_images=[image for _, image in keys] if "image" in kinds else None,
        positives=positives,
        candidates=list(candidates),
        labels=None,
        num_records=len(records),
        origin=origin,
    )


def _by_labels(records: list[dict], mode: str, origin: str) -> EvalSet:
    labels: dict[str, tuple[int, str]] = {}  # image -> (label, where it was first seen)
    for rec in records:
        if rec["label"] is None:
            raise RecordError(
                f"{rec[SOURCE_FIELD]}: relevance by labels needs a 'label' on every record, and this one has none; "
                "add labels or use relevance='ids'"
            )
        for image in (rec["query_image"], rec["positive"]):
            label, first = labels.setdefault(image, (rec["label"], rec[SOURCE_FIELD]))
            if label != rec["label"]:
                raise RecordError(
                    f"{rec[SOURCE_FIELD]}: image {image} has label {rec['label']} here but label {label} at {first}; "
                    "an image belongs to one class"
                )
    items = list(labels)
    return EvalSet(
        mode=mode,
        query_texts=None,
        query_images=items,
        positives=[[] for _ in items],
        candidates=items,
        labels=[labels[item][0] for item in items],
        num_records=len(records),
        origin=origin,
    )
