"""User checkpoints: save and load an :class:`~vembed.model.EmbeddingModel` as plain Hugging Face directories.

Layout of a saved model directory::

    vembed.json                  family, pooling, heads, normalisation, MRL dims, projection dim, format version
    heads.safetensors            projection heads ("text.weight", "image.weight"), only when the model has heads
    logit_parameters.safetensors the training loss's learned logit scale / bias (``logit_scale.log_scale``,
                                 ``logit_bias``), only when the model holds them (vembed.json ``logit_parameters``)
    config.json, model.safetensors, tokenizer / image-processor files
                                 single-backbone families (dual, text, image): the backbone at the root, so
                                 ``transformers.AutoModel.from_pretrained(dir)`` loads it as is
    text_encoder/, image_encoder/
                                 composed family: one Hugging Face directory per backbone, each with its processor
    modules.json, 1_Pooling/, 2_Dense/, 3_Normalize/, config_sentence_transformers.json
                                 text and composed families: the sentence-transformers layout of the text side
                                 (:mod:`vembed.model.st_export`)
    README.md                    the model card (base model, data, last evaluation, how to load it)
    adapter_config.json, adapter_model.safetensors   (in the root or in each backbone directory)
                                 LoRA saved as an adapter (``merge_lora=False``, ``lora_save_mode: adapter``): the
                                 backbone directory is a PEFT adapter directory *instead of* a full model: no base
                                 weights and no config.json beside it, so nothing can load it as the base model by
                                 mistake. ``base_model_name_or_path`` (also in vembed.json's ``lora_base``) names
                                 the base; ``PeftModel.from_pretrained(AutoModel.from_pretrained(base), dir)`` and
                                 ``AutoModel.from_pretrained(dir)`` (transformers' PEFT integration) both give the
                                 adapted backbone. The default (merged) writes the merged weights instead.

Loading reads safetensors only (``use_safetensors=True``; nothing is unpickled) and never enables remote code on
its own. The live model is not modified by saving (LoRA merging works on a CPU copy of the weights).
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

import vembed
from vembed.data.processing import load_image_processor, load_tokenizer, resolve_settings
from vembed.losses.scale import LOGIT_KEYS, LogitParameters
from vembed.model.families import EncoderFamily, get_family
from vembed.model.heads import build_heads
from vembed.model.hf import unwrap
from vembed.model.lora import adapter_base, is_lora, load_adapter, plain_state_dict, save_adapter
from vembed.model.st_export import write_model_card, write_sentence_transformers_layout

if TYPE_CHECKING:
    from vembed.model.embedding_model import EmbeddingModel

FORMAT_VERSION = 1
SPEC_FILE = "vembed.json"
HEADS_FILE = "heads.safetensors"
LOGIT_PARAMETERS_FILE = "logit_parameters.safetensors"
ADAPTER_DIR = "lora_adapter"  # the layout before adapter saves replaced the backbone directory (still read)
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")
BASE_WEIGHT_FILES = ("config.json", "model.safetensors", "model.safetensors.index.json")
#: which tokens are a multi-vector item's vectors (``vembed.json`` ``vector_tokens``, decided once at save):
#: ``non_padding`` = every token the attention mask keeps, special tokens included (ColBERT-style encoders);
#: ``content`` = a vlm item's content tokens only, its text and image tokens without the instruction and chat-template
#: tokens (ColQwen-style; the ``content_mask`` of :func:`vembed.data.vlm_inputs.process_conversations`)
VECTOR_TOKENS: tuple[str, ...] = ("non_padding", "content")


@dataclass
class ModelSpec:
    """Everything ``vembed.json`` records about a saved model (besides the backbone weights themselves)."""

    family: str
    pooling_method: str  # as configured ("auto" or a method)
    pooling: dict[str, str]  # resolved per modality
    projection_dim: int | None
    normalize: bool
    mrl_dims: list[int]
    embedding_dim: int
    heads: dict[str, dict[str, int]] = field(default_factory=dict)  # modality -> {"in": ..., "out": ...}
    lora: dict[str, str] = field(default_factory=dict)  # backbone attribute -> adapter dir (adapter saves only)
    lora_base: dict[str, str] = field(default_factory=dict)  # backbone attribute -> base model (adapter saves only)
    family_info: dict[str, Any] = field(default_factory=dict)
    vector_tokens: str | None = None  # multi-vector models: one of VECTOR_TOKENS; None for single-vector
    #: the preprocessing the model was trained with (``vembed.data.processing.SETTINGS_KEYS``: text length, image
    #: size, pixel bounds, padding policy, instructions), read back by every path; empty in older checkpoints
    preprocessing: dict[str, Any] = field(default_factory=dict)
    #: the training loss's learnable parameters the model holds (names from ``LOGIT_KEYS``); empty in older checkpoints
    logit_parameters: list[str] = field(default_factory=list)
    format_version: int = FORMAT_VERSION
    vembed_version: str = vembed.__version__


def is_vembed_checkpoint(path: str | Path) -> bool:
    """True when ``path`` is a directory written by :func:`save_model`."""
    return (Path(path) / SPEC_FILE).is_file()


def read_spec(directory: str | Path) -> ModelSpec:
    """Parse ``vembed.json``.

    Raises:
        ValueError: a newer format version, an unknown family (the known ones are listed) or missing fields.
    """
    path = Path(directory) / SPEC_FILE
    raw = json.loads(path.read_text())
    version = raw.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise ValueError(
            f"{path}: format_version {version!r} is not supported by this vembed (reads <= {FORMAT_VERSION}); "
            "upgrade vembed"
        )
    get_family(raw.get("family", "<missing>"))
    known = set(ModelSpec.__dataclass_fields__)
    try:
        spec = ModelSpec(**{k: v for k, v in raw.items() if k in known})
    except TypeError as exc:
        raise ValueError(f"{path} is incomplete: {exc}") from exc
    if spec.vector_tokens is not None and spec.vector_tokens not in VECTOR_TOKENS:
        raise ValueError(
            f"{path}: vector_tokens={spec.vector_tokens!r} is not known to this vembed (knows {list(VECTOR_TOKENS)}); "
            "upgrade vembed"
        )
    if spec.logit_parameters and tuple(spec.logit_parameters) not in (LOGIT_KEYS[:1], LOGIT_KEYS):
        raise ValueError(
            f"{path}: logit_parameters={spec.logit_parameters!r} is not known to this vembed (knows "
            f"{list(LOGIT_KEYS[:1])} and {list(LOGIT_KEYS)}); upgrade vembed"
        )
    return spec


#: processor files copied as they are from a local source (beside the tokenizer / image processor's own saves), so
#: ``AutoProcessor`` still builds the model's processor from a saved checkpoint (Qwen3-VL's chat template, ...)
PROCESSOR_FILES = (
    "processor_config.json",
    "chat_template.jinja",
    "chat_template.json",
    "video_preprocessor_config.json",
)


def _save_processors(source: str, target: Path, modalities: tuple[str, ...]) -> None:
    """Copy the tokenizer / image processor of ``source`` into ``target`` (what a modality needs), and its other
    processor files."""
    if Path(source).is_dir() and Path(source).resolve() != target.resolve():
        for name in PROCESSOR_FILES:
            if (Path(source) / name).is_file():
                shutil.copyfile(Path(source) / name, target / name)
    if "text" in modalities:
        tokenizer = load_tokenizer(source)
        if tokenizer is None:
            raise FileNotFoundError(f"no tokenizer at {source}; a saved model must carry one to encode text")
        tokenizer.save_pretrained(str(target))
    if "image" in modalities:
        image_processor = load_image_processor(source)
        if image_processor is None:
            raise FileNotFoundError(f"no image processor at {source}; a saved model must carry one to encode images")
        image_processor.save_pretrained(str(target))


def _backbone_modalities(family: EncoderFamily, attr: str) -> tuple[str, ...]:
    if family.name == "composed":
        return ("text",) if attr == "text_encoder" else ("image",)
    return family.modalities


def _restore_shapes(state: dict[str, torch.Tensor], shapes: Mapping[str, list[int]]) -> dict[str, torch.Tensor]:
    """Give parameters that vembed reshaped for FSDP2 (CLIP's 0-dim ``logit_scale``) their HF shape back."""
    for name, shape in shapes.items():
        if name in state:
            state[name] = state[name].reshape(shape)
    return state


def _keep_architectures(backbone: nn.Module, original: list[str], target: Path) -> None:
    """``save_pretrained`` writes (and sets on the live config) the loaded class (``Qwen3VLModel``); keep the
    checkpoint's own ``architectures`` (``Qwen3VLForConditionalGeneration``) in both, so the saved directory
    describes the same model as its source."""
    config_file = target / "config.json"
    if not original or not config_file.is_file():
        return
    backbone.config.architectures = list(original)
    saved = json.loads(config_file.read_text())
    if saved.get("architectures") != original:
        saved["architectures"] = original
        config_file.write_text(json.dumps(saved, indent=2, sort_keys=True) + "\n")


def preprocessing_settings(model: EmbeddingModel) -> dict[str, Any]:
    """The preprocessing settings to record for ``model``: its configured ones (``model.preprocessing``) over what
    its text tower's config decides (padding policy, instruction format, default length)."""
    family = model.encoder
    backbones = family.backbones()
    text_backbone = backbones.get("text_encoder", backbones.get("backbone"))
    config = unwrap(text_backbone).config if text_backbone is not None else None
    has_text = "text" in family.modalities
    return resolve_settings(config, getattr(model, "preprocessing", {}) or {}, has_text=has_text)


def save_model(model: EmbeddingModel, directory: str | Path, merge_lora: bool = True) -> Path:
    """Write ``model`` to ``directory`` in the layout above and return the directory.

    Args:
        model: the (unsharded) model to save; it is not modified.
        directory: created if missing; vembed's own files in it are replaced.
        merge_lora: merge LoRA adapters into the backbone weights (default), or save them as PEFT adapters.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    family = model.encoder
    reshaped = family.describe().get("reshaped_parameters", {})
    adapters: dict[str, str] = {}
    bases: dict[str, str] = {}
    for attr, backbone in family.backbones().items():
        target = directory / family.backbone_dirs[attr]
        target.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(target / ADAPTER_DIR, ignore_errors=True)
        _save_processors(family.sources[attr], target, _backbone_modalities(family, attr))
        if is_lora(backbone) and not merge_lora:
            bases[attr] = _absolute_source(family.sources[attr])
            _remove(target, (*BASE_WEIGHT_FILES, *_shards(target)))
            save_adapter(backbone, target, bases[attr])
            adapters[attr] = family.backbone_dirs[attr]
            continue
        _remove(target, ADAPTER_FILES)
        state = _restore_shapes(plain_state_dict(backbone, merge=merge_lora), reshaped)
        architectures = list(getattr(unwrap(backbone).config, "architectures", None) or [])
        unwrap(backbone).save_pretrained(str(target), state_dict=state)
        _keep_architectures(unwrap(backbone), architectures, target)
    heads_path = directory / HEADS_FILE
    heads_path.unlink(missing_ok=True)
    if len(model.heads):
        tensors = {f"{m}.weight": h.weight.detach().cpu().contiguous() for m, h in model.heads.items()}
        save_file(tensors, str(heads_path), metadata={"format": "pt"})
    logit_path = directory / LOGIT_PARAMETERS_FILE
    logit_path.unlink(missing_ok=True)
    if model.logit_parameters is not None:
        tensors = {k: v.detach().float().cpu().contiguous() for k, v in model.logit_parameters.state_dict().items()}
        save_file(tensors, str(logit_path), metadata={"format": "pt"})
    spec = model.spec()
    spec.lora = adapters
    spec.lora_base = bases
    spec.preprocessing = preprocessing_settings(model)
    (directory / SPEC_FILE).write_text(json.dumps(asdict(spec), indent=2) + "\n")
    has_st = write_sentence_transformers_layout(model, directory)  # text / composed: readable by ST, TEI, ...
    write_model_card(directory, asdict(spec), {**family.sources, **bases}, sentence_transformers=has_st)
    return directory


def _absolute_source(source: str) -> str:
    """A local base model as an absolute path (a relative one would break when the checkpoint is read elsewhere)."""
    return str(Path(source).resolve()) if Path(source).is_dir() else source


def _shards(directory: Path) -> list[str]:
    return [p.name for p in directory.glob("model-*-of-*.safetensors")]


def _remove(directory: Path, names: tuple[str, ...] | list[str]) -> None:
    for name in names:
        (directory / name).unlink(missing_ok=True)


def load_family(
    directory: str | Path, spec: ModelSpec, pooling: Mapping[str, str], dtype: str, trust_remote_code: bool
) -> EncoderFamily:
    """The encoder family of a saved model, LoRA adapters re-attached when they were saved unmerged."""
    directory = Path(directory)
    family_cls = get_family(spec.family)
    sources = {attr: str(directory / sub) for attr, sub in family_cls.backbone_dirs.items()}
    for attr, base in spec.lora_base.items():  # an adapter directory holds no base weights: load them from the base
        sources[attr] = adapter_base(directory, base)
    family = family_cls.load(sources, pooling=pooling, dtype=dtype, trust_remote_code=trust_remote_code)
    for attr, adapter_dir in spec.lora.items():
        family.set_backbone(attr, load_adapter(family.backbones()[attr], str(directory / adapter_dir)))
    return family


def load_heads(directory: str | Path, spec: ModelSpec, dtype: torch.dtype) -> nn.ModuleDict:
    """The projection heads recorded in ``spec`` with their saved weights (empty when the model has none).

    Raises:
        FileNotFoundError: ``vembed.json`` lists heads but ``heads.safetensors`` is missing.
        ValueError: a saved head's shape differs from ``vembed.json``.
    """
    if not spec.heads:
        return nn.ModuleDict()
    path = Path(directory) / HEADS_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing but {Path(directory) / SPEC_FILE} lists heads {sorted(spec.heads)}")
    tensors = load_file(str(path))
    heads = build_heads({m: shape["in"] for m, shape in spec.heads.items()}, spec.projection_dim, dtype=dtype)
    for modality, head in heads.items():
        weight = tensors.get(f"{modality}.weight")
        if weight is None or tuple(weight.shape) != tuple(head.weight.shape):
            raise ValueError(
                f"{path}: head {modality!r} has shape {None if weight is None else tuple(weight.shape)}, "
                f"expected {tuple(head.weight.shape)}"
            )
        with torch.no_grad():
            head.weight.copy_(weight.to(head.weight.dtype))
    return heads


def load_logit_parameters(directory: str | Path, spec: ModelSpec) -> LogitParameters | None:
    """The learned logit scale / bias recorded in ``spec`` with their saved values (None when it records none).

    Raises:
        FileNotFoundError: ``vembed.json`` lists them but ``logit_parameters.safetensors`` is missing.
        ValueError: the saved tensors are not the ones ``vembed.json`` lists.
    """
    if not spec.logit_parameters:
        return None
    path = Path(directory) / LOGIT_PARAMETERS_FILE
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} is missing but {Path(directory) / SPEC_FILE} lists logit_parameters {spec.logit_parameters}"
        )
    module = LogitParameters(1.0, bias=0.0 if "logit_bias" in spec.logit_parameters else None)
    tensors = load_file(str(path))
    expected = module.state_dict()
    if set(tensors) != set(expected) or any(tensors[k].shape != expected[k].shape for k in expected):
        got = {k: list(v.shape) for k, v in tensors.items()}
        raise ValueError(f"{path} holds {got}; {SPEC_FILE} lists logit_parameters {spec.logit_parameters}")
    module.load_state_dict(tensors)
    return module
