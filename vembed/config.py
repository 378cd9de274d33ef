"""Configuration: ``configs/defaults.yaml`` < a YAML file < ``key=value`` overrides.

Every key lives in ``configs/defaults.yaml`` with its default and a comment; the
:class:`VEmbedConfig` dataclass declares its type. Validation happens once, here:
an unknown key names the closest valid key, a wrong type names the expected type.
The config object supports both ``config.key`` and ``config["key"]``.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import sys
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, Optional

import yaml

# configs/defaults.yaml, reached through the package's own link to it (which a wheel install copies in)
DEFAULTS_PATH = (Path(__file__).parent / "defaults.yaml").resolve()

# Other spellings users reach for; each maps to exactly one canonical key.
ALIASES: dict[str, str] = {
    "lr": "learning_rate",
    "num_epochs": "epochs",
    "model_name_or_path": "model_name",
    "pooling": "pooling_method",
    "train_data_path": "data_path",
}


class ConfigError(ValueError):
    """A configuration key or value is invalid; the message says which and how to fix it."""


@dataclasses.dataclass
class VEmbedConfig:
    """All of vembed's settings, typed. Defaults come from ``configs/defaults.yaml``."""

    # model
    model_name: Optional[str]
    model_family: Literal["auto", "dual", "composed", "text", "image", "vlm"]
    text_model_name: Optional[str]
    image_model_name: Optional[str]
    pooling_method: Literal["auto", "cls", "mean", "last", "none"]
    vector_tokens: Literal["auto", "non_padding", "content"]
    projection_dim: Optional[int]
    normalize: bool
    mrl_dims: list[int]
    mrl_weights: list[float]
    trust_remote_code: bool
    torch_dtype: Literal["float32", "float16", "bfloat16"]
    gradient_checkpointing: bool
    torch_compile: bool
    use_lora: bool
    lora_r: int
    lora_alpha: int
    lora_dropout: float
    lora_target_modules: list[str]
    lora_save_mode: Literal["merged", "adapter"]
    lora_vision_tower: bool
    # data
    data_path: Optional[str]
    val_data_path: Optional[str]
    image_root: Optional[str]
    retrieval_mode: Literal["t2i", "i2i", "i2t", "t2t", "m2i", "m2t"]
    column_mapping: dict[str, str]
    max_text_length: Optional[int]
    image_size: Optional[int]
    image_min_pixels: Optional[int]
    image_max_pixels: Optional[int]
    query_instruction: Optional[str]
    document_instruction: Optional[str]
    on_bad_record: Literal["skip", "fail"]
    shuffle: bool
    shuffle_seed: Optional[int]
    preprocess_tasks: Optional[int]
    cache_preprocessed: Literal["auto", True, False]
    # optimisation
    output_dir: str
    epochs: int
    batch_size: int
    per_device_batch_size: Optional[int]
    learning_rate: float
    weight_decay: float
    adam_beta1: float
    adam_beta2: float
    adam_epsilon: float
    max_grad_norm: float
    scheduler_type: Literal["cosine", "linear", "constant", "constant_with_warmup"]
    warmup_ratio: float
    warmup_steps: int
    gradient_accumulation_steps: int
    mixed_precision: Literal["auto", "no", "bf16", "fp16"]
    seed: int
    # loss
    loss_type: str
    temperature: float
    learnable_temperature: bool
    bidirectional: bool
    sigmoid_init_scale: float
    sigmoid_init_bias: float
    triplet_margin: float
    cosent_scale: float
    hard_mining_k: int
    gather_across_workers: bool
    # distillation
    teacher_model_name: Optional[str]
    distill_alpha: float
    distill_type: Literal["kl", "mse"]
    distill_temperature: float
    # GradCache
    grad_cache: bool
    grad_cache_chunk_size: int
    # distributed
    num_workers: int
    use_gpu: Literal["auto", True, False]
    resources_per_worker: dict[str, float]
    strategy: Literal["ddp", "fsdp"]
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"]
    wait_for_resources: bool
    fsdp_cpu_offload: bool
    torch_threads: int
    storage_path: Optional[str]
    run_name: Optional[str]
    max_failures: int
    num_to_keep: int
    save_steps: int
    logging_steps: int
    eval_steps: int
    eval_batch_size: int
    report_to: list[Literal["tensorboard", "wandb", "mlflow"]]
    push_to_hub: Optional[str]
    fail_at_step: Optional[int]

    # -- dict-style access, as the seed guide indexes configs like dicts --
    def __getitem__(self, key: str) -> Any:
        return getattr(self, _canonical_key(key, source="config lookup"))

    def __contains__(self, key: object) -> bool:
        return isinstance(key, str) and (key in _field_types() or key in ALIASES)

    def get(self, key: str, default: Any = None) -> Any:
        return self[key] if key in self else default

    def keys(self) -> list[str]:
        return list(_field_types())

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def replace(self, **overrides: Any) -> VEmbedConfig:
        """A new validated config with ``overrides`` applied over this one."""
        return merge_configs(self, overrides, source="replace()")

    def save(self, path: str | Path) -> Path:
        """Write the resolved configuration as YAML (done beside every run's outputs)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))
        return path


@typing.no_type_check
def _field_types() -> dict[str, Any]:
    if not hasattr(_field_types, "_cache"):
        _field_types._cache = typing.get_type_hints(VEmbedConfig)
    return _field_types._cache


def _canonical_key(key: str, source: str) -> str:
    fields = _field_types()
    if key in fields:
        return key
    if key in ALIASES:
        return ALIASES[key]
    close = difflib.get_close_matches(key, list(fields) + list(ALIASES), n=1, cutoff=0.5)
    hint = f"; did you mean '{ALIASES.get(close[0], close[0])}'?" if close else ""
    raise ConfigError(f"unknown configuration key '{key}' in {source}{hint} (valid keys are listed in {DEFAULTS_PATH})")


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin is typing.Union:
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if tp is type(None):
        return "null"
    if origin is not None:
        return str(tp).replace("typing.", "")
    return tp.__name__


def _coerce(key: str, value: Any, tp: Any, source: str) -> Any:
    """Return ``value`` as type ``tp`` or raise a ConfigError naming key, type and value."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)

    def fail() -> typing.NoReturn:
        raise ConfigError(
            f"configuration key '{key}' in {source} expects {_type_name(tp)}, got {value!r} ({type(value).__name__})"
        )

    if origin is typing.Union:
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(key, value, inner[0], source)
    if origin is Literal:
        for allowed in args:
            if value == allowed and type(value) is type(allowed):
                return value
        if isinstance(value, str) and value.lower() in ("true", "false") and True in args:
            return value.lower() == "true"
        if value is False and "no" in args:  # YAML 1.1 reads an unquoted `no` as false
            return "no"
        fail()
    if origin is list:
        if value is None:
            return []
        if not isinstance(value, Sequence) or isinstance(value, str):
            fail()
        return [_coerce(f"{key}[{i}]", v, args[0], source) for i, v in enumerate(value)]
    if origin is dict:
        if value is None:
            return {}
        if not isinstance(value, Mapping):
            fail()
        return {str(k): _coerce(f"{key}.{k}", v, args[1], source) for k, v in value.items()}
    if tp is bool:
        if isinstance(value, bool):
            return value
        fail()
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        fail()
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "1e-5" as a string
            try:
                return float(value)
            except ValueError:
                fail()
        fail()
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        fail()
    raise TypeError(f"unsupported config type {tp} for {key}")  # programming error, not user input


def _canonicalise(raw: Mapping[str, Any], source: str) -> dict[str, Any]:
    """Map aliases to canonical keys; two spellings of one key in one layer must agree."""
    out: dict[str, Any] = {}
    seen_as: dict[str, str] = {}
    for key, value in raw.items():
        canon = _canonical_key(str(key), source)
        if canon in out and out[canon] != value:
            raise ConfigError(
                f"'{seen_as[canon]}' and '{key}' in {source} both set '{canon}' "
                f"({out[canon]!r} vs {value!r}); keep one of them"
            )
        out[canon] = value
        seen_as[canon] = str(key)
    return out


def _read_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {path} is not valid YAML: {exc}") from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping of key: value, got {type(data).__name__}")
    return data


def _build(values: Mapping[str, Any], sources: Mapping[str, str]) -> VEmbedConfig:
    fields = _field_types()
    if isinstance(values.get("report_to"), str):  # one tracker by name, or "none"
        values = {**values, "report_to": [] if values["report_to"] == "none" else [values["report_to"]]}
    typed = {k: _coerce(k, values[k], fields[k], sources.get(k, "config")) for k in fields}
    if typed["mrl_weights"] and len(typed["mrl_weights"]) != len(typed["mrl_dims"]):
        raise ConfigError(
            f"mrl_weights has {len(typed['mrl_weights'])} entries but mrl_dims has {len(typed['mrl_dims'])}; "
            "give one weight per dim or leave mrl_weights empty"
        )
    if typed["batch_size"] < 1 or typed["epochs"] < 0 or typed["gradient_accumulation_steps"] < 1:
        raise ConfigError("batch_size and gradient_accumulation_steps must be >= 1 and epochs >= 0")
    _resolve_per_device_batch_size(typed, sources)
    if typed["preprocess_tasks"] is not None and typed["preprocess_tasks"] < 1:
        raise ConfigError(
            f"preprocess_tasks={typed['preprocess_tasks']} ({sources.get('preprocess_tasks', 'config')}): "
            "give at least 1 task, or null to let Ray Data use the free CPUs"
        )
    if typed["strategy"] == "fsdp" and typed["mixed_precision"] == "fp16":
        raise ConfigError(
            f"strategy: fsdp with mixed_precision: fp16 ({sources.get('mixed_precision', 'config')}) is not "
            "supported: vembed's FSDP2 path has no loss scaling, so fp16 gradients would underflow; use "
            "mixed_precision: bf16 (or no), or strategy: ddp for fp16"
        )
    _check_preprocessing(typed, sources)
    _check_vector_tokens(typed, sources)
    return VEmbedConfig(**typed)


def _check_vector_tokens(typed: Mapping[str, Any], sources: Mapping[str, str]) -> None:
    """``vector_tokens`` chooses a multi-vector model's tokens: it needs ``pooling_method: none``, and ``content``
    (text and image tokens without the chat template) exists only for vision-language (vlm) models."""
    value, source = typed["vector_tokens"], sources.get("vector_tokens", "config")
    if value != "auto" and typed["pooling_method"] != "none":
        raise ConfigError(
            f"vector_tokens={value} ({source}) applies to multi-vector models only; set pooling_method: none "
            f"(got {typed['pooling_method']!r}) or drop vector_tokens"
        )
    if value == "content" and typed["model_family"] not in ("auto", "vlm"):
        raise ConfigError(
            f"vector_tokens=content ({source}) keeps a vision-language model's text and image tokens without its "
            f"chat template; a {typed['model_family']} model has no template: use vector_tokens: non_padding"
        )


def _check_preprocessing(typed: Mapping[str, Any], sources: Mapping[str, str]) -> None:
    """Text length, image size and pixel bounds are positive; the pixel bounds are ordered."""
    for key in ("max_text_length", "image_size", "image_min_pixels", "image_max_pixels"):
        if typed[key] is not None and typed[key] < 1:
            raise ConfigError(f"{key}={typed[key]} ({sources.get(key, 'config')}): give a positive number or null")
    low, high = typed["image_min_pixels"], typed["image_max_pixels"]
    if low is not None and high is not None and low > high:
        raise ConfigError(
            f"image_min_pixels={low} is above image_max_pixels={high} "
            f"({sources.get('image_min_pixels', 'config')}); the lower bound must not exceed the upper one"
        )


def _resolve_per_device_batch_size(typed: dict[str, Any], sources: Mapping[str, str]) -> None:
    """``batch_size`` is global; ``per_device_batch_size``, when set, fixes it at ``per_device x num_workers``
    (``num_workers`` 0, the driver-process loop, counts as one device), recomputed whenever ``num_workers``
    changes. A ``batch_size`` given in the same layer must agree."""
    per_device = typed["per_device_batch_size"]
    if per_device is None:
        return
    if per_device < 1:
        raise ConfigError(
            f"per_device_batch_size={per_device} ({sources.get('per_device_batch_size', 'config')}) must be >= 1"
        )
    devices = max(typed["num_workers"], 1)
    derived = per_device * devices
    if "batch_size" in sources and typed["batch_size"] != derived:
        raise ConfigError(
            f"batch_size={typed['batch_size']} ({sources['batch_size']}) is the global batch, but "
            f"per_device_batch_size={per_device} x num_workers={devices} makes it {derived}; give one of them"
        )
    typed["batch_size"] = derived


def load_base_config() -> VEmbedConfig:
    """The defaults of ``configs/defaults.yaml`` as a validated config."""
    raw = _canonicalise(_read_yaml(DEFAULTS_PATH), str(DEFAULTS_PATH))
    missing = set(_field_types()) - set(raw)
    if missing:
        raise ConfigError(f"{DEFAULTS_PATH} lacks keys {sorted(missing)}")
    return _build(raw, {k: str(DEFAULTS_PATH) for k in raw})


def merge_configs(
    base: VEmbedConfig | Mapping[str, Any] | None,
    override: VEmbedConfig | Mapping[str, Any] | None,
    source: str = "override",
) -> VEmbedConfig:
    """``override`` over ``base`` (a plain dict base is itself merged over the defaults)."""
    base_cfg = as_config(base)
    if override is None:
        return base_cfg
    values = base_cfg.to_dict()
    over = override.to_dict() if isinstance(override, VEmbedConfig) else _canonicalise(override, source)
    if "batch_size" in over and "per_device_batch_size" not in over:
        values["per_device_batch_size"] = None  # a later global batch size replaces an earlier per-device one
    values.update(over)
    return _build(values, {k: source for k in over})


def as_config(config: VEmbedConfig | Mapping[str, Any] | None, source: str = "dict config") -> VEmbedConfig:
    """Accept a config object or a plain dict (merged over the defaults, validated the same way)."""
    if isinstance(config, VEmbedConfig):
        return config
    if config is None:
        return load_base_config()
    if not isinstance(config, Mapping):
        raise ConfigError(f"expected a VEmbedConfig or a dict, got {type(config).__name__}")
    return merge_configs(load_base_config(), config, source=source)


def load_config_file(path: str | Path, overrides: Sequence[str] = ()) -> VEmbedConfig:
    """defaults < the YAML file at ``path`` < ``key=value`` overrides."""
    cfg = merge_configs(load_base_config(), _read_yaml(path), source=str(path))
    return merge_configs(cfg, parse_overrides(overrides), source="--config_override")


def parse_overrides(items: Sequence[str]) -> dict[str, Any]:
    """``["lr=1e-4", "mrl_dims=[64,128]"]`` -> dict, values parsed as YAML scalars/lists."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, text = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"override '{item}' must look like key=value")
        try:
            out[key.strip()] = yaml.safe_load(text) if text.strip() else None
        except yaml.YAMLError as exc:
            raise ConfigError(f"override '{item}': value is not valid YAML: {exc}") from exc
    return out


def config_arg_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    """Add ``config`` (optional YAML path) and ``--config_override k=v ...`` to a parser."""
    parser = parser or argparse.ArgumentParser(description="vembed configuration")
    parser.add_argument("config", nargs="?", default=None, help="YAML config file (keys of configs/defaults.yaml)")
    parser.add_argument(
        "--config_override",
        "--config-override",
        nargs="+",
        action="extend",
        default=[],
        metavar="KEY=VALUE",
        help="override config keys; values are parsed as YAML (e.g. learning_rate=1e-4 mrl_dims=[64,128])",
    )
    return parser


def load_and_parse_config(argv: Sequence[str] | None = None) -> VEmbedConfig:
    """Parse ``[config.yaml] [--config_override k=v ...]`` from ``argv`` (``sys.argv[1:]`` when None)."""
    args = config_arg_parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    if args.config is None:
        return merge_configs(load_base_config(), parse_overrides(args.config_override), source="--config_override")
    return load_config_file(args.config, args.config_override)
