"""Loading Hugging Face backbones safely: where a model lives, its config, its weights.

Every backbone vembed loads goes through :func:`load_backbone`: safetensors only (``use_safetensors=True``, so no
pickle is ever unpickled) and ``trust_remote_code`` off unless the caller turns it on. :func:`resolve_source` turns a
missing local path into a ``FileNotFoundError`` that names it instead of a confusing hub lookup error.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import AutoConfig, AutoModel, PretrainedConfig, PreTrainedModel

from vembed.modelpath import is_local, resolve_source  # noqa: F401 - re-exported: the model code imports them here

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


def sentence_transformers_pooling(source: str) -> str | None:
    """The pooling a sentence-transformers checkpoint declares in its ``Pooling`` module config, if any.

    all-MiniLM, E5, BGE and friends ship ``modules.json`` + ``1_Pooling/config.json``; honouring it makes ``auto``
    pooling reproduce the model card's embeddings. Returns ``cls``/``mean``/``last`` or None.
    """
    if not is_local(source):
        return None
    modules_path = Path(source) / "modules.json"
    if not modules_path.is_file():
        return None
    modules: list[dict[str, Any]] = json.loads(modules_path.read_text())
    for module in modules:
        if module.get("type", "").endswith("Pooling"):
            config_path = Path(source) / module.get("path", "") / "config.json"
            if not config_path.is_file():
                return None
            cfg = json.loads(config_path.read_text())
            for key, method in (
                ("pooling_mode_cls_token", "cls"),
                ("pooling_mode_mean_tokens", "mean"),
                ("pooling_mode_lasttoken", "last"),
            ):
                if cfg.get(key):
                    return method
    return None
