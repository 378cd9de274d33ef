"""LoRA through PEFT: adapters on the backbone(s) of an :class:`~vembed.model.EmbeddingModel`, heads stay trainable.

:func:`apply_lora` wraps every backbone of the model's family with ``peft.get_peft_model`` (one adapter per backbone;
a dual model's two towers share one backbone, so one adapter). PEFT freezes the backbone's own weights; vembed's
projection heads live outside the backbones, so newly initialised heads keep ``requires_grad=True`` and train with
the adapters.

Default target modules are the attention projections, chosen from the module names the backbone actually has (not
from its id): CLIP/SigLIP ``q_proj,k_proj,v_proj,out_proj``; Llama/Qwen-style ``q_proj,k_proj,v_proj,o_proj``;
BERT/ViT/DINOv2 ``query,key,value``. A vlm model (:mod:`vembed.model.vlm`) adapts its text decoder's attention and
MLP projections (``q/k/v/o/gate/up/down_proj``) and, with ``lora_vision_tower: true``, its vision blocks too.

Saving (:mod:`vembed.model.checkpoint`) either asks :func:`plain_state_dict` for the merged backbone weights as plain
``transformers`` keys (``W + scale * B @ A``, the default), or writes the backbone as a PEFT adapter directory
(:func:`save_adapter`: the adapter alone, naming its base model); neither modifies the live (possibly still
training) model.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.lora import LoraLayer
from torch import nn

from vembed.config import VEmbedConfig, as_config
from vembed.model.hf import unwrap

if TYPE_CHECKING:
    from vembed.model.embedding_model import EmbeddingModel

DEFAULT_TARGET_MODULES: tuple[tuple[str, ...], ...] = (
    ("q_proj", "k_proj", "v_proj", "out_proj"),  # CLIP, SigLIP
    ("q_proj", "k_proj", "v_proj", "o_proj"),  # Llama, Qwen, Mistral
    ("query", "key", "value"),  # BERT, RoBERTa, ViT, DINOv2
)


def is_lora(module: nn.Module) -> bool:
    """True when ``module`` is a PEFT-wrapped backbone."""
    return isinstance(module, PeftModel)


def _linear_names(module: nn.Module) -> set[str]:
    return {name.rsplit(".", 1)[-1] for name, sub in module.named_modules() if isinstance(sub, nn.Linear)}


def default_target_modules(module: nn.Module) -> list[str]:
    """The attention projections of ``module`` that LoRA adapts by default (first full match of
    :data:`DEFAULT_TARGET_MODULES` against the module's linear layer names).

    Raises:
        ValueError: none of the known layouts matches; the message lists the linear layer names to pick from.
    """
    names = _linear_names(module)
    for candidate in DEFAULT_TARGET_MODULES:
        if set(candidate) <= names:
            return list(candidate)
    raise ValueError(
        f"no default LoRA target modules for {type(module).__name__}; set lora_target_modules to some of its "
        f"linear layers: {sorted(names)}"
    )


def _check_targets(module: nn.Module, targets: Sequence[str]) -> None:
    names = _linear_names(module)
    missing = [t for t in targets if t not in names]
    if missing:
        raise ValueError(
            f"lora_target_modules {missing} match no linear layer of {type(module).__name__}; "
            f"its linear layers are named {sorted(names)}"
        )


def apply_lora(model: EmbeddingModel, config: VEmbedConfig | dict | None = None) -> EmbeddingModel:
    """Wrap each backbone of ``model`` with a LoRA adapter (in place) and return ``model``.

    Uses ``lora_r``, ``lora_alpha``, ``lora_dropout``, ``lora_target_modules`` (empty: the per-architecture
    defaults above) and ``lora_vision_tower`` (vlm only). Only the adapters and vembed's projection heads remain trainable.

    Raises:
        ValueError: the model already has LoRA adapters, or a target module name matches no linear layer.
    """
    cfg = as_config(config)
    family_targets = getattr(model.encoder, "default_lora_targets", None)
    if cfg.lora_vision_tower and family_targets is None:
        raise ValueError(f"lora_vision_tower applies to vlm models only; this is a {model.encoder.name} model")
    for attr, backbone in model.encoder.backbones().items():
        if is_lora(backbone):
            raise ValueError(f"backbone {attr!r} already has LoRA adapters; apply_lora must be called once")
        if cfg.lora_target_modules:
            targets: list[str] | str = list(cfg.lora_target_modules)
            _check_targets(backbone, targets)
        elif family_targets is not None:
            targets = family_targets(include_vision=cfg.lora_vision_tower)
        else:
            targets = default_target_modules(backbone)
        lora_config = LoraConfig(
            r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout, target_modules=targets
        )
        model.encoder.set_backbone(attr, get_peft_model(backbone, lora_config))
    for head in model.heads.values():
        head.requires_grad_(True)
    return model


def load_adapter(backbone: nn.Module, adapter_dir: str, trainable: bool = True) -> PeftModel:
    """Attach a LoRA adapter saved by :mod:`vembed.model.checkpoint` (safetensors only) to ``backbone``."""
    weights = Path(adapter_dir) / "adapter_model.safetensors"
    if not weights.is_file():
        raise FileNotFoundError(f"LoRA adapter weights not found: {weights} (vembed saves and loads safetensors only)")
    return PeftModel.from_pretrained(backbone, adapter_dir, is_trainable=trainable)


def save_adapter(backbone: PeftModel, directory: str | Path, base: str) -> None:
    """Write ``backbone``'s adapter as a PEFT adapter directory whose ``base_model_name_or_path`` is ``base``."""
    backbone.save_pretrained(str(directory))
    config_path = Path(directory) / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config["base_model_name_or_path"] = base
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def adapter_base(directory: str | Path, base: str) -> str:
    """The base model an adapter checkpoint at ``directory`` needs, checked to exist (a clear error otherwise)."""
    from vembed.modelpath import resolve_source

    try:
        return resolve_source(base)
    except FileNotFoundError as exc:
        raise FileNotFoundError(
            f"{directory} is a LoRA adapter checkpoint; its base model {base} is not available ({exc}). Make the "
            "base reachable at that path, or save the model with lora_save_mode: merged for a self-contained one"
        ) from exc


def plain_state_dict(backbone: nn.Module, merge: bool = True) -> dict[str, torch.Tensor]:
    """The backbone's weights under plain ``transformers`` names, on CPU, without touching the live model.

    For a PEFT-wrapped backbone, every LoRA layer's ``base_layer`` weights take the layer's own name and, with
    ``merge=True``, the adapter's delta (``scale * B @ A``) is added to them; the adapter tensors themselves are
    dropped. A backbone without LoRA returns its ordinary state dict.

    Raises:
        ValueError: a LoRA layer is already merged in place, or the adapter has tensors this merge does not know
            (e.g. DoRA magnitudes), so the result would be wrong.
    """
    base = unwrap(backbone)
    state = {k: v.detach().cpu() for k, v in base.state_dict().items()}
    if not is_lora(backbone):
        return state
    for path, layer in base.named_modules():
        if not isinstance(layer, LoraLayer):
            continue
        if layer.merged:
            raise ValueError(f"LoRA layer {path} is merged in place; call unmerge_adapter() before saving")
        prefix = f"{path}.base_layer."
        for key in [k for k in state if k.startswith(prefix)]:
            state[f"{path}.{key[len(prefix) :]}"] = state.pop(key)
        for key in [k for k in state if k.startswith((f"{path}.lora_A.", f"{path}.lora_B."))]:
            del state[key]
        if merge:
            for adapter in layer.active_adapters:
                delta = layer.get_delta_weight(adapter).detach().cpu()
                state[f"{path}.weight"] = state[f"{path}.weight"] + delta.to(state[f"{path}.weight"].dtype)
    leftovers = [k for k in state if ".lora_" in k]
    if leftovers:
        raise ValueError(f"cannot turn these adapter tensors into plain weights: {leftovers[:5]}")
    return state
