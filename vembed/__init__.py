"""vembed: train, evaluate, batch-embed and serve visual and multimodal embedding models on Ray."""

__version__ = "0.1.0"
