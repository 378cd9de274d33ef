"""The training record schema and its validation, shared by every reader, the torch Dataset and the Ray pipeline.

A record is one query with its positive candidate and optional hard negatives::

    {"id": "r1", "query": "a red circle", "positive": "img/1.jpg", "negatives": ["img/7.jpg"], "label": 3}

Which fields are text and which are images follows from ``retrieval_mode`` alone (:func:`role_modalities`), never
from the strings' contents:

======  =====================================  ==============  =============
mode    query                                  positive        negatives
======  =====================================  ==============  =============
t2i     text (``query``)                       image           images
i2i     image (``query``)                      image           images
i2t     image (``query``)                      text            texts
t2t     text (``query``)                       text            texts
m2i     text (``query``) + image (``query_image``)  image      images
m2t     text (``query``) + image (``query_image``)  text       texts
======  =====================================  ==============  =============

In the image-query modes (i2i, i2t) the image may also be given as ``query_image`` when ``query`` is absent.
``column_mapping`` renames a data set's own columns to these names before anything else happens; relative image
paths are resolved against ``image_root`` (a local directory or a pyarrow-filesystem URI).

Two kinds of problem are told apart. A :class:`RecordError` means the *data set* does not fit the schema (a field
missing or of the wrong type, a different number of negatives than the other records, labels on some records but
not others): it is always raised, naming file, line or row, and field, because skipping would silently drop data
that a fixed ``column_mapping`` or ``retrieval_mode`` would keep. Content that cannot become model input (an empty
text, an unreadable image) is a *bad record*, handled by the ``on_bad_record`` policy in :mod:`vembed.data.batching`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from vembed.data.images import resolve_location

RETRIEVAL_MODES: tuple[str, ...] = ("t2i", "i2i", "i2t", "t2t", "m2i", "m2t")
ROLES: tuple[str, ...] = ("query", "positive", "negative")
SCHEMA_FIELDS: tuple[str, ...] = ("id", "query", "query_image", "positive", "negatives", "label")
SOURCE_FIELD = "_source"
"""Key under which readers store where a record came from (``"path:line 3"`` / ``"path:row 3"``)."""

_ROLE_MODALITIES: dict[str, dict[str, frozenset[str]]] = {
    "t2i": {"query": frozenset({"text"}), "positive": frozenset({"image"})},
    "i2i": {"query": frozenset({"image"}), "positive": frozenset({"image"})},
    "i2t": {"query": frozenset({"image"}), "positive": frozenset({"text"})},
    "t2t": {"query": frozenset({"text"}), "positive": frozenset({"text"})},
    "m2i": {"query": frozenset({"text", "image"}), "positive": frozenset({"image"})},
    "m2t": {"query": frozenset({"text", "image"}), "positive": frozenset({"text"})},
}


class RecordError(ValueError):
    """A record does not fit the schema; the message names where (file and line/row), the field and the fix."""


def check_retrieval_mode(mode: str) -> str:
    """Return ``mode`` if it is a known retrieval mode, else raise a ValueError listing the valid ones."""
    if mode not in _ROLE_MODALITIES:
        raise ValueError(f"unknown retrieval_mode {mode!r}; expected one of {', '.join(RETRIEVAL_MODES)}")
    return mode


def role_modalities(mode: str) -> dict[str, frozenset[str]]:
    """``{"query": ..., "positive": ..., "negative": ...}``: the modalities (``"text"``, ``"image"``) of each role.

    Negatives always share the positive's modality (they are candidates from the same pool).
    """
    roles = _ROLE_MODALITIES[check_retrieval_mode(mode)]
    return {"query": roles["query"], "positive": roles["positive"], "negative": roles["positive"]}


@dataclass(frozen=True)
class RecordSchema:
    """How raw records of one data set become normalised records (see the module docstring).

    ``num_negatives`` and ``has_label`` describe the data set's layout. Left as ``None`` they are taken from the
    first record (:func:`normalize_records` does this), and every later record must match: contrastive batches
    need the same number of negatives per query, and a batch either has labels for all rows or for none.
    """

    retrieval_mode: str = "t2i"
    column_mapping: Mapping[str, str] = field(default_factory=dict)
    image_root: str | None = None
    num_negatives: int | None = None
    has_label: bool | None = None

    def __post_init__(self) -> None:
        check_retrieval_mode(self.retrieval_mode)
        for source, target in dict(self.column_mapping).items():
            if target not in SCHEMA_FIELDS:
                raise ValueError(
                    f"column_mapping maps {source!r} to {target!r}, which is not a record field; "
                    f"map columns to one of {', '.join(SCHEMA_FIELDS)}"
                )
        object.__setattr__(self, "column_mapping", dict(self.column_mapping))
        if self.image_root and "://" not in self.image_root:
            # absolute, so resolved paths are absolute and normalising a record twice changes nothing
            object.__setattr__(self, "image_root", os.path.abspath(os.path.expanduser(self.image_root)))

    @classmethod
    def from_config(cls, cfg: Any) -> RecordSchema:
        """The schema described by a config's ``retrieval_mode``, ``column_mapping`` and ``image_root``."""
        from vembed.config import as_config

        cfg = as_config(cfg)
        return cls(cfg.retrieval_mode, cfg.column_mapping, cfg.image_root)

    def with_layout_of(self, record: Mapping[str, Any]) -> RecordSchema:
        """This schema with any unset layout (number of negatives, labels) fixed to that of a normalised record."""
        return replace(
            self,
            num_negatives=len(record["negatives"]) if self.num_negatives is None else self.num_negatives,
            has_label=(record["label"] is not None) if self.has_label is None else self.has_label,
        )

    def normalize(self, raw: Mapping[str, Any], source: str | None = None) -> dict[str, Any]:
        """Validate ``raw`` and return it with exactly the keys of :data:`SCHEMA_FIELDS` plus :data:`SOURCE_FIELD`.

        Text fields stay strings, image fields become resolved paths/URIs, ``negatives`` a list, ``label`` an int or
        ``None``. Raises :class:`RecordError` naming ``source`` and the field. Normalising twice is harmless.
        """
        where = source or str(raw.get(SOURCE_FIELD) or "record")
        rec = self._mapped(raw, where)
        roles = role_modalities(self.retrieval_mode)
        out: dict[str, Any] = {SOURCE_FIELD: where, "id": _record_id(rec, where), "query": None, "query_image": None}

        if roles["query"] == {"image"}:
            use_alias = not _present(rec.get("query")) and _present(rec.get("query_image"))
            key = "query_image" if use_alias else "query"
            out["query_image"] = self._image(rec, key, where, required=True, role="query image")
        else:
            out["query"] = _string(rec, "query", where, required=True, role="query text")
            if "image" in roles["query"]:
                out["query_image"] = self._image(rec, "query_image", where, required=True, role="query image")

        positive_is_image = roles["positive"] == {"image"}
        if positive_is_image:
            out["positive"] = self._image(rec, "positive", where, required=True, role="positive image")
        else:
            out["positive"] = _string(rec, "positive", where, required=True, role="positive text")
        out["negatives"] = self._negatives(rec.get("negatives"), positive_is_image, where)
        out["label"] = _label(rec.get("label"), where)
        self._check_layout(out, where)
        return out

    # -- helpers -----------------------------------------------------------------------------------------------

    def _mapped(self, raw: Mapping[str, Any], where: str) -> dict[str, Any]:
        rec = {k: v for k, v in raw.items() if k != SOURCE_FIELD}
        for source, target in self.column_mapping.items():
            if source not in rec:
                continue  # already renamed (normalising twice) or optional column absent
            if target in rec and source != target:
                raise RecordError(
                    f"{where}: column_mapping renames {source!r} to {target!r} but the record already has a "
                    f"{target!r} column; drop one of them or map {target!r} elsewhere"
                )
            rec[target] = rec.pop(source)
        return rec

    def _image(self, rec: Mapping[str, Any], key: str, where: str, required: bool, role: str) -> str | None:
        value = _string(rec, key, where, required=required, role=role)
        return resolve_location(value, self.image_root) if value else value

    def _negatives(self, value: Any, are_images: bool, where: str) -> list[str]:
        if not _present(value):
            return []
        if isinstance(value, str):  # CSV stores lists as JSON strings
            try:
                value = json.loads(value)
            except json.JSONDecodeError:
                value = None
        if not isinstance(value, (list, tuple)):
            raise RecordError(
                f"{where}: field 'negatives' must be a list of {'image paths' if are_images else 'texts'} "
                f'(in CSV, a JSON list such as ["a.jpg", "b.jpg"]), got {type(value).__name__}'
            )
        out = []
        for i, item in enumerate(value):
            if not isinstance(item, str):
                raise RecordError(f"{where}: negatives[{i}] must be a string, got {type(item).__name__}")
            out.append(resolve_location(item, self.image_root) if are_images and item else item)
        return out

    def _check_layout(self, rec: Mapping[str, Any], where: str) -> None:
        k = len(rec["negatives"])
        if self.num_negatives is not None and k != self.num_negatives:
            raise RecordError(
                f"{where}: record has {k} negatives but the data set's first record has {self.num_negatives}; "
                "every record must carry the same number of negatives (pad or trim them when writing the data)"
            )
        if self.has_label is not None and (rec["label"] is not None) != self.has_label:
            state = (
                "has no 'label' but the data set's first record has one"
                if self.has_label
                else ("has a 'label' but the data set's first record has none")
            )
            raise RecordError(f"{where}: record {state}; give every record a label or none")


def normalize_records(
    records: Iterable[Mapping[str, Any]], schema: RecordSchema
) -> Iterator[tuple[dict[str, Any], RecordSchema]]:
    """Normalise records in order, fixing the layout from the first; yields ``(record, schema_with_layout)``."""
    for raw in records:
        rec = schema.normalize(raw)
        if schema.num_negatives is None or schema.has_label is None:
            schema = schema.with_layout_of(rec)
        yield rec, schema


def _present(value: Any) -> bool:
    """Absent, null and CSV's empty cell all mean "no value"."""
    return value is not None and not (isinstance(value, str) and value == "")


def _string(rec: Mapping[str, Any], key: str, where: str, required: bool, role: str) -> str | None:
    value = rec.get(key)
    if not _present(value):
        if not required:
            return None
        if value == "":
            return value  # present but empty: a bad record for the batching policy, not a schema error
        fields = ", ".join(sorted(k for k in rec)) or "none"
        raise RecordError(
            f"{where}: missing field {key!r} (the {role} in retrieval_mode); the record has fields: {fields}. "
            "Rename columns with column_mapping, e.g. {'caption': 'query'}, or check retrieval_mode"
        )
    if not isinstance(value, str):
        raise RecordError(f"{where}: field {key!r} (the {role}) must be a string, got {type(value).__name__}")
    return value


def _label(value: Any, where: str) -> int | None:
    if not _present(value):
        return None
    if isinstance(value, bool):
        raise RecordError(f"{where}: field 'label' must be an integer class id, got a bool")
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str) and value.strip().lstrip("-").isdigit():  # CSV cells are strings
        return int(value)
    raise RecordError(f"{where}: field 'label' must be an integer class id, got {value!r}")


def _record_id(rec: Mapping[str, Any], where: str) -> str:
    value = rec.get("id")
    return where if not _present(value) else str(value)
