"""Evaluators: retrieval metrics of a model on an eval file, for every retrieval mode (t2i, i2t, i2i, t2t, m2i, m2t).

One path for all modes: the eval file becomes an :class:`~vembed.evaluation.evalset.EvalSet` (queries, candidate
pool, relevance), a :class:`~vembed.inference.VEmbedFactoryPredictor` embeds the queries and the candidates, and
:mod:`vembed.evaluation.metrics` ranks every candidate exactly. The Predictor may wrap a model loaded from disk
(``vembed evaluate``) or one in memory (validation during training, ``VEmbedFactoryPredictor.from_model``), so the
numbers are the same whichever front end asks.

Scores are inner products of the vectors the model returns (cosine similarity when the model normalises, the
default). Multi-vector (late interaction) models return one ``[L_i, D]`` array per item; they are padded once into
``[N, L, D]`` plus masks and ranked by exact MaxSim (:mod:`vembed.maxsim`), block by block, with the same metrics. With ``mrl_dims`` the embeddings are computed once at full size and scored on each Matryoshka prefix
(re-normalised), giving ``{dim: metrics}``; without, a flat ``{name: value}`` dict. Both shapes are what
:func:`vembed.evaluation.report.write_report` takes. Queries without any relevant candidate (possible with label
relevance, or when the candidate pool comes from elsewhere) are counted in ``num_queries_without_relevant`` and
left out of the averages.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

import numpy as np

from vembed.evaluation.evalset import EvalSet, load_eval_set
from vembed.evaluation.metrics import metrics_per_dim, retrieval_metrics
from vembed.maxsim import pad_vectors

if TYPE_CHECKING:
    from vembed.inference import VEmbedFactoryPredictor

logger = logging.getLogger(__name__)

Flat = dict[str, float]
Metrics = Flat | dict[int, Flat]
#: embedded items: ``[N, D]``, or one ``[L_i, D]`` array per item (multi-vector)
Embedded = np.ndarray | list[np.ndarray]
DEFAULT_KS: tuple[int, ...] = (1, 5, 10)


def encode_items(
    predictor: VEmbedFactoryPredictor,
    items: Sequence[str],
    modality: str,
    batch_size: int = 32,
    instruction: str | None = None,
) -> Embedded:
    """Embed texts (``modality="text"``) or image paths/URIs (``"image"``) -> ``[N, D]`` float32 (multi-vector: one
    ``[L_i, D]`` array per item)."""
    instructed = {"instruction": instruction} if instruction is not None else {}
    if modality == "text":
        return predictor.encode_text(list(items), batch_size=batch_size, **instructed)
    if modality == "image":
        return predictor.encode_image(list(items), batch_size=batch_size, **instructed)
    raise ValueError(f"modality={modality!r}; expected 'text' or 'image'")


def _role_instruction(predictor: VEmbedFactoryPredictor, role: str) -> str | None:
    """The model's configured (and checkpoint-saved) instruction for ``query`` or ``document`` inputs."""
    instruction_for = getattr(predictor.preprocessor, "instruction_for", None)
    return instruction_for(role) if instruction_for is not None else None


def encode_queries(predictor: VEmbedFactoryPredictor, evalset: EvalSet, batch_size: int = 32) -> Embedded:
    """Embed the eval set's queries -> ``[num_queries, D]``: texts, images, or composed text + image (m2i, m2t),
    with the model's query instruction (``query_instruction``) when it has one."""
    instruction = _role_instruction(predictor, "query")
    if evalset.query_modality != "multimodal":
        items = evalset.query_texts if evalset.query_modality == "text" else evalset.query_images
        return encode_items(predictor, items, evalset.query_modality, batch_size, instruction)
    texts, images = evalset.query_texts, evalset.query_images
    instructed = {"instruction": instruction} if instruction is not None else {}
    parts = [
        predictor.encode_multimodal(texts[i : i + batch_size], images[i : i + batch_size], **instructed)
        for i in range(0, len(texts), batch_size)
    ]
    return [item for part in parts for item in part] if predictor.multi_vector else np.concatenate(parts)


def encode_eval_set(
    predictor: VEmbedFactoryPredictor, evalset: EvalSet, batch_size: int = 32
) -> tuple[Embedded, Embedded]:
    """``(query embeddings, candidate embeddings)`` of an eval set; leave-one-out sets embed their items once."""
    document_instruction = _role_instruction(predictor, "document")
    candidates = encode_items(
        predictor, evalset.candidates, evalset.candidate_modality, batch_size, document_instruction
    )
    query_instruction = _role_instruction(predictor, "query")
    if not evalset.leave_one_out:
        queries = encode_queries(predictor, evalset, batch_size)
    elif query_instruction == document_instruction:
        queries = candidates  # query i is candidate i: embedded once
    else:
        queries = encode_items(predictor, evalset.candidates, evalset.candidate_modality, batch_size, query_instruction)
    return queries, candidates


def score_eval_set(
    evalset: EvalSet,
    query_emb: Embedded,
    cand_emb: Embedded,
    ks: Sequence[int] = DEFAULT_KS,
    mrl_dims: Sequence[int] = (),
    pool: Sequence[str] | None = None,
) -> Metrics:
    """Retrieval metrics of embedded queries against embedded candidates, with the eval set's relevance.

    Args:
        evalset: the queries' relevance.
        query_emb: ``[num_queries, D]``, in the order of the eval set's queries; or, multi-vector, one
            ``[L_i, D]`` array per query (scored by MaxSim).
        cand_emb: ``[len(pool), D]`` (or one ``[L_i, D]`` array per candidate), in the order of ``pool``.
        ks: cut-offs for the @K metrics.
        mrl_dims: Matryoshka prefixes to score (each re-normalised); empty = the full embedding only.
        pool: the candidates ``cand_emb`` embeds (paths/URIs or texts); default the eval set's own candidates.
            A pool from elsewhere may lack some positives: they are counted in ``num_positives_missing``.

    Returns:
        ``{name: value}``, or ``{dim: {name: value}}`` with ``mrl_dims``: the metrics of
        :func:`~vembed.evaluation.metrics.retrieval_metrics` plus ``num_records`` (and ``num_positives_missing``
        when ``pool`` is given).
    """
    pool = evalset.candidates if pool is None else pool
    _check_embeddings(evalset, query_emb, cand_emb, len(pool))
    scoring: dict = {}
    if isinstance(query_emb, list):  # multi-vector: pad once, MaxSim over the masks
        query_emb, query_mask = pad_vectors(query_emb)
        cand_emb, cand_mask = pad_vectors(cand_emb)
        scoring = {"query_mask": query_mask, "cand_mask": cand_mask}
    counts: Flat = {"num_records": evalset.num_records}
    if evalset.leave_one_out:
        if pool is not evalset.candidates:
            raise ValueError("label relevance (leave-one-out) scores the eval set's own items; do not pass pool=")
        relevance = {"query_labels": evalset.labels, "cand_labels": evalset.labels, "exclude_self": True}
    else:
        relevant, missing = evalset.relevant_indices(pool)
        if pool is not evalset.candidates:
            counts["num_positives_missing"] = len(missing)
        if not any(relevant):
            raise ValueError(
                f"none of the {evalset.num_queries} queries of {evalset.origin} has its positive among the "
                f"{len(pool)} candidates (e.g. positive {missing[0]!r} is not); candidates are matched by resolved "
                "image path/URI or exact text, so embed the same files (same image_root)"
            )
        if missing:
            logger.warning(
                "%d positives of %s are not among the candidates (e.g. %r); queries left without any are counted in "
                "num_queries_without_relevant",
                len(missing),
                evalset.origin,
                missing[0],
            )
        relevance = {"relevant": relevant}
    if mrl_dims:
        per_dim = metrics_per_dim(query_emb, cand_emb, list(mrl_dims), ks=ks, **relevance, **scoring)
        return {dim: {**metrics, **counts} for dim, metrics in per_dim.items()}
    return {**retrieval_metrics(query_emb, cand_emb, ks=ks, **relevance, **scoring), **counts}


def evaluate_predictor(
    predictor: VEmbedFactoryPredictor,
    data: str | os.PathLike | EvalSet,
    mode: str = "t2i",
    batch_size: int = 32,
    ks: Sequence[int] = DEFAULT_KS,
    mrl_dims: Sequence[int] = (),
    image_root: str | None = None,
    column_mapping: Mapping[str, str] | None = None,
    relevance: str = "auto",
) -> Metrics:
    """Retrieval metrics of ``predictor``'s model on an eval file (or an already loaded :class:`EvalSet`).

    Args:
        predictor: a loaded model, or an in-memory one (``VEmbedFactoryPredictor.from_model``; the caller puts it
            in eval mode).
        data: eval records (JSONL / CSV / Parquet file or folder, local or URI) or an :class:`EvalSet`, which
            saves re-reading the file on every call (``mode``, ``image_root``, ``column_mapping`` and
            ``relevance`` are then ignored).
        mode: ``t2i``, ``i2t``, ``i2i``, ``t2t``, ``m2i`` or ``m2t``.
        batch_size: items per model call.
        ks: cut-offs for the @K metrics.
        mrl_dims: Matryoshka dims to score in the same pass (each at most the model's embedding size).
        image_root, column_mapping: how to read the records (see :mod:`vembed.data.records`).
        relevance: ``"ids"``, ``"labels"`` (i2i, leave-one-out) or ``"auto"`` (see :func:`load_eval_set`).

    Returns:
        ``{"recall@1": ..., "ndcg@10": ..., "mrr": ..., "map": ..., "num_queries": ..., ...}``, or
        ``{dim: {...}}`` with ``mrl_dims`` (see :func:`score_eval_set`).
    """
    check_dims(mrl_dims, predictor.embedding_dim)
    evalset = data if isinstance(data, EvalSet) else load_eval_set(data, mode, image_root, column_mapping, relevance)
    query_emb, cand_emb = encode_eval_set(predictor, evalset, batch_size)
    return score_eval_set(evalset, query_emb, cand_emb, ks, mrl_dims)


def evaluate_model_path(
    model_path: str | os.PathLike,
    data: str | os.PathLike | EvalSet,
    mode: str = "t2i",
    batch_size: int = 32,
    ks: Sequence[int] = DEFAULT_KS,
    mrl_dims: Sequence[int] = (),
    image_root: str | None = None,
    column_mapping: Mapping[str, str] | None = None,
    relevance: str = "auto",
    device: str | None = None,
    dtype: str = "float32",
) -> Metrics:
    """:func:`evaluate_predictor` for the model saved at ``model_path`` (vembed checkpoint or HF directory)."""
    from vembed.inference import VEmbedFactoryPredictor

    predictor = VEmbedFactoryPredictor(model_path, device=device, dtype=dtype)
    return evaluate_predictor(predictor, data, mode, batch_size, ks, mrl_dims, image_root, column_mapping, relevance)


def check_dims(mrl_dims: Sequence[int], embedding_dim: int) -> None:
    """Matryoshka dims must be distinct ints in ``1..embedding_dim``; checked before anything is embedded."""
    dims = list(mrl_dims)
    bad = [
        d for d in dims if isinstance(d, bool) or not isinstance(d, (int, np.integer)) or not 1 <= d <= embedding_dim
    ]
    if bad or len(set(dims)) != len(dims):
        raise ValueError(
            f"Matryoshka dims {dims} must be distinct integers in 1..{embedding_dim} (the model's embedding size); "
            f"{'bad: ' + str(bad) if bad else 'some repeat'}"
        )


def _check_embeddings(evalset: EvalSet, query_emb: Embedded, cand_emb: Embedded, num_candidates: int) -> None:
    multi = isinstance(query_emb, list)
    if multi != isinstance(cand_emb, list):
        raise ValueError(
            "queries and candidates must both be single-vector [N, dim] arrays or both multi-vector lists of "
            "[vectors, dim] arrays; both must come from the same model"
        )
    for name, emb, rows in (("query", query_emb, evalset.num_queries), ("candidate", cand_emb, num_candidates)):
        if (not multi and np.ndim(emb) != 2) or len(emb) != rows:
            shape = f"{len(emb)} items" if multi else f"shape {tuple(np.shape(emb))}"
            raise ValueError(
                f"{name} embeddings must be [{rows}, dim] (one row per {name} of {evalset.origin}; multi-vector: one "
                f"[vectors, dim] array each), got {shape}"
            )
    query_dim, cand_dim = (np.shape(emb[0] if multi else emb)[-1] for emb in (query_emb, cand_emb))
    if query_dim != cand_dim:
        raise ValueError(
            f"query embeddings have dim {query_dim} but candidate embeddings have dim {cand_dim}; "
            "both must come from the same model at the same Matryoshka dim"
        )
