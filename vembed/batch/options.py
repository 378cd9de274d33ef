"""The choices a batch-embedding job accepts; dependency-free so ``vembed --help`` can list them instantly."""

MODALITIES: tuple[str, ...] = ("image", "text")
#: model compute dtypes (those of ``VEmbedFactoryPredictor``)
DTYPES: tuple[str, ...] = ("float32", "float16", "bfloat16")
#: stored embedding dtypes
FORMATS: tuple[str, ...] = ("float32", "float16")
