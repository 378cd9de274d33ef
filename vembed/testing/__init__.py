"""Offline test and demo helpers: tiny HF models built from configs and a small learnable image-text data set.

Used by the test suite, the benchmarks and ``vembed demo``; nothing here downloads anything.
"""

from vembed.testing.synthetic import make_shapes_dataset
from vembed.testing.tiny_models import make_tiny_bert, make_tiny_clip, make_tiny_siglip, make_tiny_vit
from vembed.testing.tiny_qwen import make_tiny_qwen3_embedding, make_tiny_qwen3_vl

__all__ = [
    "make_shapes_dataset",
    "make_tiny_bert",
    "make_tiny_clip",
    "make_tiny_qwen3_embedding",
    "make_tiny_qwen3_vl",
    "make_tiny_siglip",
    "make_tiny_vit",
]
