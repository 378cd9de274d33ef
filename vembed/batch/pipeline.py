"""The Ray Data pipeline of a batch-embedding job: read + decode + preprocess on CPU workers, embed on model actors.

Rows carry ``position`` (their place in the corpus), ``id``, ``source`` and ``error`` through every stage. A row
that cannot be embedded (missing or unreadable file, non-image bytes, empty text) keeps flowing with its ``error``
set, so every row of a shard reaches the writer and the shard can complete; the model skips such rows.

The model actors also write (:class:`EmbedAndWrite`: :class:`Embedder`, then
:class:`~vembed.batch.writer.FragmentWriter` on the same rows), so vectors never leave the worker that computed
them; the stage's output is one small progress row per (batch, shard), which is all the driver receives. Execution
does not preserve order: a shard completes when its last rows arrive, from whichever actor.

Images are read and decoded with :mod:`vembed.data.images` and resized/normalised by the model's
:class:`~vembed.data.processing.Preprocessor` in :class:`Decoder` CPU workers, then :class:`Embedder` actors (one
model each, a GPU each where the cluster has them) call the Predictor's ``encode_pixel_values``: the vectors are the
Predictor's own maths. Texts need no decode stage: the actors call ``encode_text`` (tokenising is microseconds per
text, and it keeps the Predictor's exact truncation length).

Placement: Ray Data creates actors with the SPREAD strategy (its default, not a setting here), so a pool's actors
land on different nodes. Where the cluster holds the pools' minimum sizes (:func:`pools_fit`), the pipeline does not
dispatch work until those actors are all up (``DataContext.wait_for_min_actors_s``): otherwise the actor on the
driver's node, which starts first (no runtime environment to fetch), can take a short job's whole input before the
other nodes' actors are ready, and a cluster the user asked for stays idle. Where it does not (more actors asked for
than the CPUs or GPUs there are now; an autoscaler may add nodes), work starts on the actors that are up.

Both stages run on autoscaling ``ActorPoolStrategy`` pools. The decode pool is an actor pool, not stateless tasks,
for two reasons: Ray Data never fuses an actor stage into the next actor stage, so decoding always overlaps
inference (a task stage with the same resources as the model actors is fused into them, ray-project/ray#54433);
and each decode worker builds its Preprocessor once and imports torch/transformers once, in a bounded number of
processes, instead of unpickling the processor into every task.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

from vembed.batch.writer import FragmentWriter, pack_vectors
from vembed.data.images import decode_image, read_bytes

ACTOR_CPUS = 1.0  # CPU reservation of every actor, decode and model alike
#: how long the pipeline waits, at its start, for the model pool's ``min_size`` actors (a GPU node may take minutes)
WAIT_FOR_ACTORS_S = 1800


@dataclass(frozen=True)
class ActorPool:
    """How many model actors run (``min_size``..``max_size``), the GPUs each one holds (0 = CPU inference), and
    the most decode workers feeding them (they scale up from one per model actor of ``min_size``)."""

    min_size: int
    max_size: int
    num_gpus: float
    max_decoders: int = 1

    def __post_init__(self) -> None:
        if not 1 <= self.min_size <= self.max_size:
            raise ValueError(f"actor pool needs 1 <= min_actors <= max_actors, got {self.min_size}, {self.max_size}")
        if self.num_gpus < 0:
            raise ValueError(f"num_gpus_per_actor must be >= 0, got {self.num_gpus}")
        if self.max_decoders < 1:
            raise ValueError(f"max_decoders must be >= 1, got {self.max_decoders}")


class Decoder:
    """Ray Data CPU actor: image sources -> ``pixel_values`` float32 ``[N, 3, H, W]``, ``error`` set for bad rows.

    A bad row's pixels are zeros, which the model never sees (:class:`Embedder` skips rows with an error).
    """

    def __init__(self, model_path: str) -> None:
        from vembed.data.processing import Preprocessor

        self.preprocessor = Preprocessor.from_pretrained(model_path)
        # a VLM's image becomes a ragged run of patches inside a token sequence that the Embedder's Predictor builds
        # (one implementation): decoders hand it the decoded RGB array instead of fixed-shape pixels
        self.pixel_shape = None
        if not self.preprocessor.is_vlm:
            self.pixel_shape = self.preprocessor.process_images([Image.new("RGB", (8, 8))]).shape[1:]

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        sources = batch["source"]
        errors = np.full(len(sources), "", dtype=object)
        images: list[Image.Image] = []
        good: list[int] = []
        for i, source in enumerate(sources):
            if source is None or source == "":
                errors[i] = "missing image path"
                continue
            try:
                images.append(decode_image(read_bytes(source), source))
            except (OSError, ValueError) as exc:  # FileNotFoundError, storage errors, BadImageError
                errors[i] = f"{type(exc).__name__}: {exc}"
                continue
            good.append(i)
        if self.pixel_shape is None:
            decoded = np.empty(len(sources), dtype=object)
            for i in range(len(sources)):
                decoded[i] = np.zeros((1, 1, 3), dtype=np.uint8)
            for i, image in zip(good, images, strict=True):
                decoded[i] = np.asarray(image.convert("RGB"), dtype=np.uint8)
            return {**_carried(batch), "error": errors, "image": decoded}
        pixel_values = np.zeros((len(sources), *self.pixel_shape), dtype=np.float32)
        if images:
            pixel_values[good] = self.preprocessor.process_images(images)
        return {**_carried(batch), "error": errors, "pixel_values": pixel_values}


def min_decoders(pool: ActorPool) -> int:
    """Decode workers an image job starts with: one per model actor of the pool's ``min_size``, up to its most."""
    return min(pool.min_size, pool.max_decoders)


def pools_fit(pool: ActorPool, modality: str, cluster: dict[str, float]) -> bool:
    """Whether ``cluster`` (``{"CPU": n, "GPU": m}``, the whole cluster's resources) holds the minimum pools."""
    cpus = pool.min_size * ACTOR_CPUS + (min_decoders(pool) * ACTOR_CPUS if modality == "image" else 0)
    return cpus <= cluster.get("CPU", 0.0) and pool.min_size * pool.num_gpus <= cluster.get("GPU", 0.0)


def check_instruction(model_path: str, instruction: str | None) -> None:
    """Before a job starts: a ValueError when ``instruction`` is given for a model that takes none."""
    if instruction is None:
        return
    from vembed.data.processing import Preprocessor

    Preprocessor.from_pretrained(model_path).check_instruction(instruction)


def check_texts(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Mark empty (or whitespace-only) texts as errors; they are recorded, never embedded."""
    texts = batch["source"]
    errors = np.array(["empty text" if not isinstance(t, str) or not t.strip() else "" for t in texts], dtype=object)
    return {**_carried(batch), "error": errors}


def _carried(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {key: batch[key] for key in ("position", "id", "source")}


class Embedder:
    """Ray Data actor: one Predictor; rows without an error -> ``embedding`` float32 ``[N, D]``.

    Rows with an error get a zero vector that the driver drops (it writes them to the errors file instead).
    Multi-vector models give each row its vectors packed into bytes plus ``num_vectors``
    (:func:`vembed.batch.writer.pack_vectors`), which the writer turns into Parquet lists.
    """

    def __init__(
        self, model_path: str, modality: str, dtype: str, dim: int | None, use_gpu: bool, instruction: str | None = None
    ) -> None:
        from vembed.inference import VEmbedFactoryPredictor

        self.modality = modality
        self.dim = dim
        self.predictor = VEmbedFactoryPredictor(model_path, device="cuda" if use_gpu else "cpu", dtype=dtype)
        self.predictor.preprocessor.check_instruction(instruction)
        self.instruction = instruction
        self.out_dim = dim or self.predictor.embedding_dim

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        good = np.flatnonzero(batch["error"] == "")
        multi = self.predictor.multi_vector
        vectors: Any = [np.zeros((0, self.out_dim), np.float32)] * len(batch["id"])  # multi-vector rows
        if not multi:
            vectors = np.zeros((len(batch["id"]), self.out_dim), dtype=np.float32)
        if len(good):
            instructed = {"instruction": self.instruction} if self.instruction is not None else {}
            if self.modality == "image" and "image" in batch:  # a VLM: decoded images, preprocessed here
                images = [Image.fromarray(np.asarray(batch["image"][i], dtype=np.uint8)) for i in good]
                encoded = self.predictor.encode_image(images, batch_size=len(images), dimension=self.dim, **instructed)
            elif self.modality == "image":
                pixels = batch["pixel_values"]
                pixels = pixels if len(good) == len(pixels) else pixels[good]  # no copy in the common case
                encoded = self.predictor.encode_pixel_values(pixels, dimension=self.dim)
            else:
                texts = [str(t) for t in batch["source"][good]]
                encoded = self.predictor.encode_text(texts, batch_size=len(texts), dimension=self.dim, **instructed)
            if multi:
                for row, i in zip(encoded, good, strict=True):
                    vectors[i] = row
            else:
                vectors[good] = encoded
        if multi:
            packed, counts = pack_vectors(vectors)
            return {**_carried(batch), "error": batch["error"], "embedding": packed, "num_vectors": counts}
        return {**_carried(batch), "error": batch["error"], "embedding": vectors}


class EmbedAndWrite(Embedder):
    """Ray Data actor: :class:`Embedder` on a batch, then :class:`~vembed.batch.writer.FragmentWriter` on its rows;
    returns the writer's progress rows (shard, rows, errors, finished shard's rows, node), never vectors."""

    def __init__(self, writer: FragmentWriter, **embedder: Any) -> None:
        super().__init__(**embedder)
        self.writer = writer

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return self.writer(super().__call__(batch))


def build_dataset(
    items: list[Any],
    modality: str,
    model_path: str,
    pool: ActorPool,
    batch_size: int,
    dtype: str,
    dim: int | None,
    writer: FragmentWriter,
    instruction: str | None = None,
    wait_for_actors: bool = False,
) -> Any:
    """The streaming dataset that embeds and writes ``items`` (refs of Arrow tables with ``position``, ``id``,
    ``source``; their size is the job's :func:`~vembed.batch.job.block_rows`); its rows are the writer's progress
    reports. ``instruction`` goes to the Predictor (models that take one); ``wait_for_actors``: dispatch nothing
    until the pools' minimum actors are up (see the module docstring; only where :func:`pools_fit`). The first stage is an actor stage: a
    task stage before it would wait for CPUs the actors hold."""
    import ray

    dataset = ray.data.from_arrow_refs(items)
    if modality == "image":
        dataset = dataset.map_batches(
            Decoder,
            fn_constructor_kwargs={"model_path": model_path},
            # as many decoders as model actors to start with: spread like them, each node's model actor is fed from its
            # own node (Ray Data sends a block to an actor where the block is), not from one decoder on one node
            compute=ray.data.ActorPoolStrategy(min_size=min_decoders(pool), max_size=pool.max_decoders),
            batch_size=batch_size,
            batch_format="numpy",
            num_cpus=ACTOR_CPUS,
        )
    else:
        dataset = dataset.map_batches(check_texts, batch_size=batch_size, batch_format="numpy")
    dataset = dataset.map_batches(
        EmbedAndWrite,
        fn_constructor_kwargs={
            "writer": writer,
            "model_path": model_path,
            "modality": modality,
            "dtype": dtype,
            "dim": dim,
            "use_gpu": pool.num_gpus > 0,
            "instruction": instruction,
        },
        compute=ray.data.ActorPoolStrategy(min_size=pool.min_size, max_size=pool.max_size),
        batch_size=batch_size,
        batch_format="numpy",
        num_cpus=ACTOR_CPUS,
        num_gpus=pool.num_gpus,
    )
    if wait_for_actors:
        dataset.context.wait_for_min_actors_s = WAIT_FOR_ACTORS_S  # this dataset's own copy of the context
    return dataset
