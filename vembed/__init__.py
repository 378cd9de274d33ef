"""vembed: train, evaluate, batch-embed and serve visual and multimodal embedding models on Ray.

``from vembed import Trainer, Predictor`` gives :class:`vembed.trainer.VEmbedFactoryTrainer` and
:class:`vembed.inference.VEmbedFactoryPredictor` (imported on first use, so ``import vembed`` stays light).
"""

from typing import Any

__version__ = "0.1.0"
__all__ = ["Predictor", "Trainer", "VEmbedFactoryPredictor", "VEmbedFactoryTrainer"]

_LAZY = {
    "Trainer": ("vembed.trainer", "VEmbedFactoryTrainer"),
    "VEmbedFactoryTrainer": ("vembed.trainer", "VEmbedFactoryTrainer"),
    "Predictor": ("vembed.inference", "VEmbedFactoryPredictor"),
    "VEmbedFactoryPredictor": ("vembed.inference", "VEmbedFactoryPredictor"),
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        module, attr = _LAZY[name]
        return getattr(importlib.import_module(module), attr)
    raise AttributeError(f"module 'vembed' has no attribute {name!r}")
