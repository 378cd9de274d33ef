"""Evaluation at corpus scale: embed with Ray Data, or read what a batch-embedding job (``vembed embed``) wrote.

:func:`evaluate_with_ray` scores the same eval set as :func:`~vembed.evaluation.evaluator.evaluate_predictor`, but
the vectors come from Ray Data model actors (:func:`vembed.batch.embed_corpus`), not from a model in the driver:

- Candidates: embedded by a batch job into ``work_dir/candidates``, or read from ``candidates_embeddings``, the
  output folder of an earlier ``vembed embed`` run. In the second case that corpus *is* the candidate pool
  (every row, e.g. a whole gallery of distractors), and each positive of the eval file is matched to the row whose
  ``source`` is its resolved path/URI (or its text). Positives the corpus lacks are counted in
  ``num_positives_missing``; queries left with none are reported, not averaged. With label relevance (i2i,
  leave-one-out) the eval set's own images are looked up in the corpus instead, and each must be there.
- Baseline: to rank the same pool, a second model embeds the corpus' ``sources`` itself (``candidate_pool``).
- Queries: texts or images are embedded by a batch job into ``work_dir/queries``; composed text + image queries
  (m2i, m2t), which a batch job does not take, by a Predictor in the driver. Label relevance reuses the
  candidates' vectors (the queries are the candidates).

Embeddings read from a folder must come from the model being evaluated: a folder whose manifest names another
model (a different ``vembed.json``) is refused; the same ``vembed.json`` at another path only warns, since a copy
of the checkpoint and a different epoch of the same run cannot be told apart without the weights. Queries are
embedded at the folder's Matryoshka dim so both sides match.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from vembed.evaluation.evalset import EvalSet, load_eval_set
from vembed.evaluation.evaluator import DEFAULT_KS, Embedded, Metrics, check_dims, encode_queries, score_eval_set

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class CorpusEmbeddings:
    """The rows of a batch-embedding output folder: ``ids``, ``sources`` and ``vectors [N, D]`` float32 (multi-vector
    models: one ``[L_i, D]`` array per row)."""

    ids: list[str]
    sources: list[str]
    vectors: Embedded
    dim: int | None  # the Matryoshka dim the job used (None: the model's full size)
    modality: str  # "image" or "text"
    origin: str

    def lookup(self, items: Sequence[str]) -> Embedded:
        """The vectors of ``items`` (sources), in that order; every item must be in the corpus."""
        index = {source: i for i, source in enumerate(self.sources)}
        missing = [item for item in items if item not in index]
        if missing:
            raise ValueError(
                f"{len(missing)} of the eval set's {len(items)} items have no embedding in {self.origin} "
                f"(e.g. {missing[0]!r}); items are matched by resolved path/URI or text, so embed the eval set's own "
                "images (same image_root)"
            )
        return _take(self.vectors, [index[item] for item in items])


def read_corpus_embeddings(folder: str, model_path: str | os.PathLike | None = None) -> CorpusEmbeddings:
    """Read a finished ``vembed embed`` output folder; with ``model_path``, check that model produced it."""
    from vembed.batch import read_embeddings, read_errors, read_manifest

    manifest = read_manifest(folder)
    if manifest.get("status") != "complete":
        raise ValueError(
            f"{folder} holds an unfinished embedding job (status {manifest.get('status')!r}); rerun the same "
            "`vembed embed` command to finish it before evaluating"
        )
    if model_path is not None:
        check_same_model(manifest, model_path, folder)
    table = read_embeddings(folder)
    errors = read_errors(folder)
    if errors.num_rows:
        logger.warning(
            "%s: %d items could not be embedded and are not candidates (e.g. %s: %s)",
            folder,
            errors.num_rows,
            errors.column("source")[0],
            errors.column("error")[0],
        )
    return CorpusEmbeddings(
        ids=table.column("id").to_pylist(),
        sources=table.column("source").to_pylist(),
        vectors=_vectors(table),
        dim=manifest.get("job", {}).get("dim"),
        modality=manifest.get("job", {}).get("modality", "image"),
        origin=folder,
    )


def corpus_sources(folder: str) -> list[str]:
    """The ``source`` of every row of a ``vembed embed`` output folder, in row order (vectors are not read)."""
    from vembed.batch.writer import EMBEDDINGS_DIR, OutputStore

    store = OutputStore(folder)
    paths = store.part_paths(EMBEDDINGS_DIR)
    if not paths:
        raise FileNotFoundError(
            f"{folder} has no finished {EMBEDDINGS_DIR} shards; is it the output of `vembed embed`?"
        )
    return [
        s for path in paths for s in pq.read_table(path, columns=["source"], filesystem=store.fs)["source"].to_pylist()
    ]


def check_same_model(manifest: Mapping[str, Any], model_path: str | os.PathLike, folder: str) -> None:
    """Refuse embeddings made by a different model (see the module docstring); warn when only the path differs."""
    from vembed.batch.job import describe_model

    ours, theirs = describe_model(str(model_path)), manifest.get("model", {})
    if ours["vembed_json_sha256"] != theirs.get("vembed_json_sha256"):
        raise ValueError(
            f"{folder} was embedded by {theirs.get('model_path')!r}, whose vembed.json differs from that of "
            f"{ours['model_path']!r}; evaluate with the model that made the embeddings, or re-embed with "
            f"`vembed embed --model {model_path}`"
        )
    if ours["model_path"] != theirs.get("model_path"):
        logger.warning(
            "%s was embedded by %s, not %s; both have the same vembed.json, so assuming the same weights",
            folder,
            theirs.get("model_path"),
            ours["model_path"],
        )


def embed_with_ray(
    model_path: str | os.PathLike,
    items: Sequence[str],
    modality: str,
    work_dir: str | os.PathLike,
    batch_size: int = 64,
    dim: int | None = None,
    num_actors: int | None = None,
) -> Embedded:
    """Embed ``items`` (image paths/URIs or texts) with a Ray Data batch job in ``work_dir``; rows in item order.

    The job's output stays in ``work_dir``, so rerunning the same evaluation there resumes it. Any item that
    cannot be embedded (missing or unreadable image) is an error: an eval set must be whole.
    """
    from vembed.batch import embed_corpus, read_embeddings, read_errors

    work = Path(work_dir)
    work.mkdir(parents=True, exist_ok=True)
    column = "path" if modality == "image" else "text"
    manifest = work / "items.parquet"
    pq.write_table(pa.table({"id": [str(i) for i in range(len(items))], column: list(items)}), manifest)
    output = str(work / "embeddings")
    embed_corpus(
        str(model_path),
        str(manifest),
        output,
        modality=modality,
        source_column=column,
        image_root=os.getcwd(),  # relative paths are relative to where we run, as for the Predictor
        batch_size=batch_size,
        dim=dim,
        num_actors=num_actors,
    )
    errors = read_errors(output)
    if errors.num_rows:
        raise ValueError(
            f"{errors.num_rows} of {len(items)} eval {modality}s could not be embedded, e.g. "
            f"{errors.column('source')[0]}: {errors.column('error')[0]}"
        )
    table = read_embeddings(output)
    order = np.argsort(np.asarray(table.column("id").to_pylist(), dtype=np.int64))
    return _take(_vectors(table), order)


def evaluate_with_ray(
    model_path: str | os.PathLike,
    data: str | os.PathLike | EvalSet,
    mode: str = "t2i",
    batch_size: int = 64,
    ks: Sequence[int] = DEFAULT_KS,
    mrl_dims: Sequence[int] = (),
    image_root: str | None = None,
    column_mapping: Mapping[str, str] | None = None,
    relevance: str = "auto",
    candidates_embeddings: str | None = None,
    candidate_pool: Sequence[str] | None = None,
    work_dir: str | os.PathLike | None = None,
    num_actors: int | None = None,
) -> Metrics:
    """Retrieval metrics of the model at ``model_path`` on an eval file, embedding with Ray Data.

    Arguments as :func:`~vembed.evaluation.evaluator.evaluate_model_path`, plus:
        candidates_embeddings: a ``vembed embed`` output folder made with this model, used as the candidate pool
            (see the module docstring) instead of embedding the eval file's candidates.
        candidate_pool: candidates (image paths/URIs or texts) to embed instead of the eval file's own, e.g. the
            ``sources`` of another model's ``candidates_embeddings``, so that a baseline ranks the same pool.
        work_dir: where the batch jobs write (kept, so a rerun resumes); default a temporary folder, removed after.
        num_actors: model actors per batch job (default: as ``vembed embed``).

    Connects to the Ray cluster of ``RAY_ADDRESS`` (set by ``ray job submit``), or starts a local one.
    """
    from vembed.batch.job import describe_model

    evalset = data if isinstance(data, EvalSet) else load_eval_set(data, mode, image_root, column_mapping, relevance)
    if candidates_embeddings and candidate_pool is not None:
        raise ValueError("pass candidates_embeddings (vectors to read) or candidate_pool (items to embed), not both")
    if evalset.leave_one_out and candidate_pool is not None:
        raise ValueError("label relevance (leave-one-out) ranks the eval set's own images; drop candidate_pool")
    corpus = read_corpus_embeddings(candidates_embeddings, model_path) if candidates_embeddings else None
    if corpus is not None and corpus.modality != evalset.candidate_modality:
        raise ValueError(
            f"{candidates_embeddings} holds {corpus.modality} embeddings but mode {evalset.mode!r} ranks "
            f"{evalset.candidate_modality}s; embed the candidates with `vembed embed --modality "
            f"{evalset.candidate_modality}`"
        )
    dim = corpus.dim if corpus else None
    full_dim = dim or describe_model(str(model_path)).get("embedding_dim")
    if full_dim:
        check_dims(mrl_dims, full_dim)  # fail before embedding anything
    embed = dict(model_path=model_path, batch_size=batch_size, dim=dim, num_actors=num_actors)
    pool = None if corpus is None or evalset.leave_one_out else corpus.sources
    pool = list(candidate_pool) if candidate_pool is not None else pool
    with _work_folder(work_dir) as work:
        if corpus is None:
            items = evalset.candidates if pool is None else pool
            cand_emb = embed_with_ray(
                items=items, modality=evalset.candidate_modality, work_dir=work / "candidates", **embed
            )
        else:
            cand_emb = corpus.lookup(evalset.candidates) if evalset.leave_one_out else corpus.vectors
        if evalset.leave_one_out:
            query_emb = cand_emb
        elif evalset.query_modality == "multimodal":
            from vembed.inference import VEmbedFactoryPredictor

            query_emb = encode_queries(VEmbedFactoryPredictor(model_path, dimension=dim), evalset, batch_size)
        else:
            items = evalset.query_texts if evalset.query_modality == "text" else evalset.query_images
            query_emb = embed_with_ray(items=items, modality=evalset.query_modality, work_dir=work / "queries", **embed)
    return score_eval_set(evalset, query_emb, cand_emb, ks, mrl_dims, pool)


@contextlib.contextmanager
def _work_folder(work_dir: str | os.PathLike | None) -> Iterator[Path]:
    """``work_dir`` as given (kept), or a temporary folder removed afterwards."""
    if work_dir is not None:
        yield Path(work_dir)
        return
    tmp = tempfile.mkdtemp(prefix="vembed-eval-")
    try:
        yield Path(tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _vectors(table: pa.Table) -> Embedded:
    """The ``embedding`` column (fixed-size lists of float32/float16) as a float32 ``[N, D]`` array; multi-vector
    output (a list of vectors per row, with ``num_vectors``) as one float32 ``[L_i, D]`` array per row."""
    column = table.column("embedding").combine_chunks()
    if "num_vectors" not in table.column_names:
        flat = column.flatten().to_numpy(zero_copy_only=False)
        return flat.astype(np.float32, copy=False).reshape(len(column), column.type.list_size)
    vectors = column.flatten()  # every row's vectors, one after the other
    width = vectors.type.list_size
    flat = vectors.flatten().to_numpy(zero_copy_only=False).astype(np.float32).reshape(-1, width)
    offsets = column.offsets.to_numpy() - column.offsets[0].as_py()
    return [flat[offsets[i] : offsets[i + 1]] for i in range(len(column))]


def _take(vectors: Embedded, rows: Sequence[int] | np.ndarray) -> Embedded:
    """Rows ``rows`` of an ``[N, D]`` array or of a multi-vector list, in that order."""
    return [vectors[int(i)] for i in rows] if isinstance(vectors, list) else vectors[np.asarray(rows)]
