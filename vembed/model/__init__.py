"""The one model module: :class:`EmbeddingModel` over encoder families, pooling, heads, LoRA and save/load.

See :mod:`vembed.model.embedding_model` for the public contract, :mod:`vembed.model.families` for how each family
encodes, :mod:`vembed.model.checkpoint` for the saved layout.
"""

from vembed.model.embedding_model import EmbeddingModel
from vembed.model.families import FAMILIES, detect_family
from vembed.model.lora import apply_lora
from vembed.model.pooling import POOLING_METHODS, pool
from vembed.model.postprocess import finalize_embeddings

__all__ = [
    "FAMILIES",
    "POOLING_METHODS",
    "EmbeddingModel",
    "apply_lora",
    "detect_family",
    "finalize_embeddings",
    "pool",
]
