"""Loading Hugging Face backbones safely: where a model lives, its config, its weights.

Every backbone vembed loads goes through :func:`load_backbone`: safetensors only (``use_safetensors=True``, so no
pickle is ever unpickled) and ``trust_remote_code`` off unless the caller turns it on. :func:`resolve_source` turns a
missing local path into a ``FileNotFoundError`` that names it instead of a confusing hub lookup error.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import AutoConfig, AutoModel, PretrainedConfig, PreTrainedModel

from vembed.modelpath import is_local, resolve_source  # noqa: F401 - re-exported: the model code imports them here

logger = logging.getLogger(__name__)

# "org/name" or "name": what a Hugging Face hub id can look like (a local path that does not exist cannot).
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*(/[A-Za-z0-9][\w.\-]*)?$")

DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def load_hf_config(source: str, trust_remote_code: bool = False) -> PretrainedConfig:
    """``AutoConfig.from_pretrained`` with errors that name the source."""
    try:
        return AutoConfig.from_pretrained(source, trust_remote_code=trust_remote_code)
    except OSError as exc:
        if is_local(source):
            raise FileNotFoundError(
                f"{source} has no readable config.json; is it a Hugging Face model directory?"
            ) from exc
        raise FileNotFoundError(
            f"model {source!r} is neither a local directory nor available from the Hugging Face hub "
            f"(or the offline cache): {exc}"
        ) from exc


def load_backbone(
    source: str, dtype: str | torch.dtype = "float32", trust_remote_code: bool = False
) -> PreTrainedModel:
    """``AutoModel.from_pretrained(source)`` from safetensors only, in ``dtype``, remote code off by default.

    Raises:
        FileNotFoundError: no config/weights at ``source``.
        ValueError: only pickle (``.bin``) weights exist, which vembed refuses to load.
    """
    torch_dtype = DTYPES[dtype] if isinstance(dtype, str) else dtype
    try:
        return AutoModel.from_pretrained(
            source, dtype=torch_dtype, use_safetensors=True, trust_remote_code=trust_remote_code
        )
    except OSError as exc:
        if is_local(source) and any(Path(source).glob("*.bin")) and not any(Path(source).glob("*.safetensors")):
            raise ValueError(
                f"{source} only has pickle (.bin) weights; vembed loads safetensors only. Convert once with "
                "`AutoModel.from_pretrained(dir).save_pretrained(dir, safe_serialization=True)` in a trusted session."
            ) from exc
        raise FileNotFoundError(f"cannot load model weights from {source!r}: {exc}") from exc


def unwrap(module: nn.Module) -> nn.Module:
    """The Hugging Face model inside a PEFT wrapper (LoRA layers stay injected), or ``module`` itself."""
    get_base = getattr(module, "get_base_model", None)
    return get_base() if callable(get_base) else module


def model_file(source: str, filename: str) -> Path | None:
    """The file ``filename`` of the model at ``source``: a local directory, or a hub id through the Hugging Face
    cache (``huggingface_hub``'s lookup: from the cache when offline, downloaded when online and not cached).

    Returns None when the model is known not to have the file: a local directory without it, a 404 from the hub,
    the cache's record of that 404, or (offline) a cached snapshot of the model that does not hold it.

    Raises:
        OSError: whether the hub repo has the file cannot be told (offline and the model is not cached, no
            network, a gated repo).
    """
    if is_local(source):
        path = Path(source) / filename
        return path if path.is_file() else None
    from huggingface_hub import hf_hub_download, try_to_load_from_cache
    from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError

    cached = try_to_load_from_cache(source, filename)
    if isinstance(cached, str):
        return Path(cached)
    if cached is not None:  # the cache records that the repo has no such file
        return None
    try:
        return Path(hf_hub_download(source, filename))
    except LocalEntryNotFoundError:  # a subclass of EntryNotFoundError: offline (or no network) and not cached
        if isinstance(try_to_load_from_cache(source, "config.json"), str):
            return None  # the model is cached (e.g. a full snapshot_download) and this file is not part of it
        raise
    except EntryNotFoundError:
        return None


# sentence-transformers modules that do not change the vector vembed computes: the transformer itself (vembed
# loads it), pooling (read below) and L2 normalisation (vembed's ``normalize: true``, the default).
_ST_TRANSPARENT_MODULES = ("Transformer", "Pooling", "Normalize")
_ST_POOLING_MODES = (
    ("pooling_mode_cls_token", "cls"),
    ("pooling_mode_mean_tokens", "mean"),
    ("pooling_mode_lasttoken", "last"),
)
_ST_POOLING_NAMES = {"cls": "cls", "mean": "mean", "lasttoken": "last"}


def sentence_transformers_pooling(source: str) -> str | None:
    """The pooling a sentence-transformers checkpoint declares in its ``Pooling`` module config, if any.

    all-MiniLM, E5, BGE and friends ship ``modules.json`` + ``1_Pooling/config.json``; honouring it makes ``auto``
    pooling reproduce the model card's embeddings. The files are read from a local directory or, for a hub id,
    through the Hugging Face cache. Returns ``cls``/``mean``/``last``, or None when the model declares no pooling
    (or, offline, its ``modules.json`` is not cached: a warning says so).

    Raises:
        ValueError: the checkpoint's vectors need a module vembed does not apply (``Dense``, ``LayerNorm``, ...) or
            a pooling mode it does not have (``max``, ``weightedmean``, ...); an explicit ``pooling_method`` skips
            this reading (and the module).
    """
    try:
        modules_path = model_file(source, "modules.json")
    except OSError as exc:
        logger.warning(
            "cannot tell whether %s ships a sentence-transformers pooling config (%s); pooling_method 'auto' uses "
            "the architecture's default, set pooling_method to choose",
            source,
            exc,
        )
        return None
    if modules_path is None:
        return None
    modules: list[dict[str, Any]] = json.loads(modules_path.read_text())
    unsupported = [
        f"{m.get('path') or m.get('name')} ({m.get('type')})"
        for m in modules
        if not str(m.get("type", "")).endswith(_ST_TRANSPARENT_MODULES)
    ]
    if unsupported:
        raise ValueError(
            f"{source} is a sentence-transformers model whose vectors pass through {', '.join(unsupported)} after "
            "pooling; vembed does not apply those modules, so 'auto' pooling would not reproduce the model's "
            "embeddings. Set pooling_method (mean, cls, last) to fine-tune the bare transformer without them, and "
            "projection_dim to add vembed's own head"
        )
    for module in modules:
        if not str(module.get("type", "")).endswith("Pooling"):
            continue
        config_path = model_file(source, f"{module['path']}/config.json" if module.get("path") else "config.json")
        if config_path is None:
            return None
        cfg = json.loads(config_path.read_text())
        named = cfg.get("pooling_mode")  # sentence-transformers >= 6: "pooling_mode": "cls"
        if isinstance(named, str):
            if named in _ST_POOLING_NAMES:
                return _ST_POOLING_NAMES[named]
            modes = [named]
        else:  # older releases: one boolean per mode
            for key, method in _ST_POOLING_MODES:
                if cfg.get(key):
                    return method
            modes = sorted(
                k.removeprefix("pooling_mode_") for k, v in cfg.items() if k.startswith("pooling_mode") and v
            )
        raise ValueError(
            f"{source} declares sentence-transformers pooling {modes or 'none'}, which vembed does not implement "
            "(it has cls, mean and last); set pooling_method explicitly"
        )
    return None
