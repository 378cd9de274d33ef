"""vembed: train, evaluate, batch-embed and serve visual and multimodal embedding models on Ray.

``from vembed import Trainer, Predictor`` gives :class:`vembed.trainer.VEmbedFactoryTrainer` and
:class:`vembed.inference.VEmbedFactoryPredictor` (imported on first use, so ``import vembed`` stays light).
"""

from vembed.lazy import lazy_getattr

__version__ = "0.1.0"
__all__ = ["Predictor", "Trainer", "VEmbedFactoryPredictor", "VEmbedFactoryTrainer"]

__getattr__ = lazy_getattr(
    "vembed",
    {
        "Trainer": "vembed.trainer:VEmbedFactoryTrainer",
        "VEmbedFactoryTrainer": "vembed.trainer",
        "Predictor": "vembed.inference:VEmbedFactoryPredictor",
        "VEmbedFactoryPredictor": "vembed.inference",
    },
)
