"""The frozen distillation teacher: built from ``teacher_model_name``, refused when it cannot read the student's
inputs.

The teacher is run on the student's batches (token ids and pixel values preprocessed for the student), so it sees
meaningful inputs only when its tokenizer and image processor are the student's: another vocabulary turns the ids
into other tokens, another normalisation into other pixels, and distillation then silently teaches noise.
:func:`check_teacher_preprocessing` compares what matters for each modality the retrieval mode feeds.
"""

from __future__ import annotations

import json
from typing import Any

import torch
from torch import nn

from vembed.config import ConfigError, VEmbedConfig

# Image processor settings that name the class, not what it does to pixels.
_IMAGE_PROCESSOR_IDENTITY_KEYS = {"image_processor_type", "processor_class", "_processor_class", "auto_map"}


def _teacher_config(config: VEmbedConfig) -> VEmbedConfig:
    return config.replace(
        model_name=config.teacher_model_name,
        text_model_name=None,
        image_model_name=None,
        use_lora=False,
        torch_compile=False,
    )


def _tokenizer_settings(preprocessor: Any) -> dict[str, Any]:
    """What decides the ids of a text: vocabulary, special tokens, normalisation and splitting, length."""
    tokenizer = preprocessor.tokenizer
    settings: dict[str, Any] = {
        "vocabulary": tokenizer.get_vocab(),
        "special tokens": {k: str(v) for k, v in tokenizer.special_tokens_map.items()},
        "padding side": tokenizer.padding_side,
        "max_text_length": preprocessor.max_text_length,
    }
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        spec = json.loads(backend.to_str())
        settings.update({key: spec.get(key) for key in ("normalizer", "pre_tokenizer", "post_processor")})
    return settings


def _image_settings(preprocessor: Any) -> dict[str, Any]:
    """What decides the pixels of an image: resizing, cropping, rescaling, normalisation (vembed's image_size
    override applied)."""
    settings = {
        k: v for k, v in preprocessor.image_processor.to_dict().items() if k not in _IMAGE_PROCESSOR_IDENTITY_KEYS
    }
    settings.update(preprocessor._size_kwargs())
    return settings


def _describe(name: str, student: Any, teacher: Any) -> str:
    if name == "vocabulary":
        return f"vocabulary ({len(student)} vs {len(teacher)} tokens, {len(set(student.items()) ^ set(teacher.items()))} differ)"
    text_s, text_t = json.dumps(student, sort_keys=True, default=str), json.dumps(teacher, sort_keys=True, default=str)
    short = 60
    return f"{name} ({text_s[:short]}{'...' if len(text_s) > short else ''} vs {text_t[:short]}{'...' if len(text_t) > short else ''})"


def _differences(student: dict[str, Any], teacher: dict[str, Any]) -> list[str]:
    return [_describe(key, student.get(key), teacher.get(key)) for key in sorted(student.keys() | teacher.keys())
            if student.get(key) != teacher.get(key)]  # fmt: skip


def check_teacher_preprocessing(config: VEmbedConfig) -> None:
    """Refuse a ``teacher_model_name`` whose preprocessing differs from the student's for the modalities that
    ``retrieval_mode`` feeds (text for ``t``/``m`` sides, images for ``i``/``m`` sides).

    Raises:
        ConfigError: the teacher lacks a modality the batches hold, or its tokenizer / image processor differs;
            the message lists what differs.
    """
    from vembed.data.processing import Preprocessor

    student = Preprocessor.from_config(config)
    teacher = Preprocessor.from_config(_teacher_config(config))
    mode = config.retrieval_mode
    problems: list[str] = []
    checks = (
        ("tm", "has_text", "tokenizer", _tokenizer_settings),
        ("im", "has_image", "image processor", _image_settings),
    )
    for sides, has, part, settings in checks:  # only what the retrieval mode feeds the teacher
        if not (any(side in sides for side in mode) and getattr(student, has)):
            continue
        if not getattr(teacher, has):
            problems.append(f"the teacher has no {part}")
        else:
            problems += [f"{part} {d}" for d in _differences(settings(student), settings(teacher))]
    if problems:
        raise ConfigError(
            f"teacher_model_name={config.teacher_model_name!r} cannot read the student's batches "
            f"(model {config.model_name or (config.text_model_name, config.image_model_name)!r}, retrieval_mode "
            f"{mode}): the teacher is fed the student's token ids and pixels, but {'; '.join(problems)}. Distil from "
            "a teacher that shares the student's tokenizer and image processor"
        )


def load_teacher(config: VEmbedConfig, device: torch.device) -> nn.Module:
    """The frozen, eval-mode teacher named by ``teacher_model_name`` on ``device``, after
    :func:`check_teacher_preprocessing`."""
    from vembed.training.model_builder import build_model

    check_teacher_preprocessing(config)
    teacher = build_model(_teacher_config(config))
    return teacher.requires_grad_(False).eval().to(device)
