"""The sentence-transformers layout and the model card of a saved vembed model, so other tools embed the same way.

A text checkpoint (and a composed checkpoint's text side) also carries the files that sentence-transformers, Text
Embeddings Inference, Infinity and LangChain read to rebuild the embedding pipeline: without them they fall back
to mean pooling of the bare backbone, which is not what vembed trained (CLS pooling, a projection head)::

    modules.json                       0: Transformer (the backbone dir) -> 1_Pooling -> [2_Dense] -> [3_Normalize]
    config_sentence_transformers.json  model type, versions, cosine similarity
    <backbone dir>/sentence_bert_config.json   max_seq_length (the Predictor's default token window)
    1_Pooling/config.json              vembed's text pooling (cls, mean or last token)
    2_Dense/config.json, model.safetensors     the projection head (bias-free, identity activation)
    3_Normalize/                       L2 normalisation (when the model normalises)

The files use the classic ``sentence_transformers.models.*`` names every reader of the format understands. Nothing
here imports sentence-transformers. ``README.md`` is a model card: the base model, the training data, the last
evaluation's metrics and how to load the directory with vembed, sentence-transformers and transformers.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors.torch import save_file

if TYPE_CHECKING:
    from vembed.model.embedding_model import EmbeddingModel

ST_POOLING = {"cls": "pooling_mode_cls_token", "mean": "pooling_mode_mean_tokens", "last": "pooling_mode_lasttoken"}
ST_POOLING_KEYS = (
    "pooling_mode_cls_token",
    "pooling_mode_mean_tokens",
    "pooling_mode_max_tokens",
    "pooling_mode_mean_sqrt_len_tokens",
    "pooling_mode_weightedmean_tokens",
    "pooling_mode_lasttoken",
)
ST_FILES = ("modules.json", "config_sentence_transformers.json", "sentence_bert_config.json")
ST_DIRS = ("1_Pooling", "2_Dense", "3_Normalize")
DEFAULT_MAX_SEQ_LENGTH = 77  # the Predictor's default max_text_length
MODEL_CARD = "README.md"


def sentence_transformers_unsupported(model: EmbeddingModel) -> str | None:
    """Why ``model`` has no sentence-transformers equivalent (None when it has one)."""
    if model.family not in ("text", "composed"):
        return f"the {model.family} family has no sentence-transformers pipeline here (text and composed only)"
    pooling = model.pooling.get("text")
    if pooling not in ST_POOLING:
        return f"text pooling {pooling!r} (multi-vector or unresolved) has no sentence-transformers Pooling mode"
    return None


def _clear(directory: Path, backbone_dir: str) -> None:
    import shutil

    for name in ST_FILES[:2]:
        (directory / name).unlink(missing_ok=True)
    (directory / backbone_dir / ST_FILES[2]).unlink(missing_ok=True)
    for name in ST_DIRS:
        shutil.rmtree(directory / name, ignore_errors=True)


def write_sentence_transformers_layout(
    model: EmbeddingModel, directory: str | Path, max_seq_length: int = DEFAULT_MAX_SEQ_LENGTH
) -> bool:
    """Write the layout above for ``model`` saved at ``directory``; False (and nothing written) when
    :func:`sentence_transformers_unsupported` says the model has no equivalent."""
    import transformers

    import vembed

    directory = Path(directory)
    backbone_attr = "text_encoder" if model.family == "composed" else "backbone"
    backbone_dir = model.encoder.backbone_dirs[backbone_attr]
    _clear(directory, backbone_dir)
    if sentence_transformers_unsupported(model) is not None:
        return False
    width = model.encoder.output_dims()["text"]
    tokens = model.encoder.max_text_tokens()
    _write_json(
        directory / backbone_dir / "sentence_bert_config.json",
        {"max_seq_length": min(max_seq_length, tokens or max_seq_length), "do_lower_case": False},
    )
    modules: list[dict[str, Any]] = [
        {"idx": 0, "name": "0", "path": backbone_dir, "type": "sentence_transformers.models.Transformer"}
    ]
    pooling = {key: False for key in ST_POOLING_KEYS}
    pooling[ST_POOLING[model.pooling["text"]]] = True
    _write_json(directory / "1_Pooling" / "config.json", {"word_embedding_dimension": width, **pooling})
    modules.append({"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"})
    head = model.heads["text"] if "text" in model.heads else None
    if head is not None:
        dense = directory / "2_Dense"
        _write_json(
            dense / "config.json",
            {
                "in_features": head.in_features,
                "out_features": head.out_features,
                "bias": False,
                "activation_function": "torch.nn.modules.linear.Identity",
            },
        )
        weight = head.weight.detach().to("cpu", torch.float32).contiguous()
        save_file({"linear.weight": weight}, str(dense / "model.safetensors"), metadata={"format": "pt"})
        modules.append({"idx": 2, "name": "2", "path": "2_Dense", "type": "sentence_transformers.models.Dense"})
    if model.normalize:
        (directory / "3_Normalize").mkdir(parents=True, exist_ok=True)
        modules.append(
            {
                "idx": len(modules),
                "name": str(len(modules)),
                "path": "3_Normalize",
                "type": "sentence_transformers.models.Normalize",
            }
        )
    _write_json(directory / "modules.json", modules)
    _write_json(
        directory / "config_sentence_transformers.json",
        {
            "model_type": "SentenceTransformer",
            "__version__": {
                "sentence_transformers": "3.0.0",  # the oldest release that reads every file written here
                "transformers": transformers.__version__,
                "pytorch": torch.__version__,
                "vembed": vembed.__version__,
            },
            "prompts": {},
            "default_prompt_name": None,
            "similarity_fn_name": "cosine" if model.normalize else "dot",
        },
    )
    return True


def write_model_card(
    directory: str | Path,
    spec: Mapping[str, Any],
    base_models: Mapping[str, str],
    data: Mapping[str, str | None] | None = None,
    metrics: Mapping[str, Any] | None = None,
    sentence_transformers: bool = False,
) -> Path:
    """Write ``README.md``: what the model is, what it was trained from and on, how it scored, how to load it."""
    directory = Path(directory)
    bases = sorted({str(b) for b in base_models.values()})
    lines = ["---", "library_name: vembed", "tags:", "- embeddings", "- vembed"]
    if sentence_transformers:
        lines += ["- sentence-transformers", "pipeline_tag: sentence-similarity"]
    hub_bases = [b for b in bases if not Path(b).is_absolute()]
    if hub_bases:
        lines += ["base_model:", *[f"- {b}" for b in hub_bases]]
    lines += ["---", "", f"# {directory.name}", ""]
    lines += [
        f"A vembed `{spec.get('family')}` embedding model: {spec.get('embedding_dim')}-d vectors, pooling "
        f"{spec.get('pooling')}, projection head {spec.get('projection_dim') or 'none'}, "
        f"{'L2-normalised' if spec.get('normalize') else 'not normalised'}"
        + (f", Matryoshka dims {spec.get('mrl_dims')}" if spec.get("mrl_dims") else "")
        + ".",
        "",
        "## Base model",
        "",
        *[f"- {attr}: `{base}`" for attr, base in sorted(base_models.items())],
        "",
    ]
    if data:
        lines += ["## Training data", "", *[f"- {key}: `{value}`" for key, value in data.items() if value], ""]
    numeric = {k: v for k, v in (metrics or {}).items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    if numeric:
        lines += ["## Last evaluation", "", "| metric | value |", "|---|---|"]
        lines += [f"| {k} | {v:.4f} |" if isinstance(v, float) else f"| {k} | {v} |" for k, v in numeric.items()]
        lines.append("")
    lines += [
        "## How to load it",
        "",
        "```python",
        "from vembed import Predictor",
        "",
        f'predictor = Predictor("{directory.name}")',
        'vectors = predictor.encode_text(["a photo of a cat"])',
        "```",
        "",
    ]
    if sentence_transformers:
        lines += [
            "The directory is also a sentence-transformers model (same pooling, head and normalisation):",
            "",
            "```python",
            "from sentence_transformers import SentenceTransformer",
            "",
            f'model = SentenceTransformer("{directory.name}")',
            'vectors = model.encode(["a photo of a cat"])',
            "```",
            "",
        ]
    (directory / MODEL_CARD).write_text("\n".join(lines))
    return directory / MODEL_CARD


def update_model_card(directory: str | Path, config: Any, metrics: Mapping[str, Any] | None = None) -> Path | None:
    """Rewrite the model card of a saved model with the training run's base models, data and ``metrics``
    (called by the training loop on rank 0 after each user checkpoint). A checkpoint that is not a vembed model
    (the mid-level Trainer saving any ``nn.Module``'s weights) has no card: returns None."""
    directory = Path(directory)
    if not (directory / "vembed.json").is_file():
        return None
    spec = json.loads((directory / "vembed.json").read_text())
    bases = {
        key: str(getattr(config, key))
        for key in ("model_name", "text_model_name", "image_model_name")
        if getattr(config, key, None) is not None
    }
    data = {key: getattr(config, key, None) for key in ("data_path", "val_data_path")}
    data["retrieval_mode"] = getattr(config, "retrieval_mode", None)
    data["loss_type"] = getattr(config, "loss_type", None)
    has_st = (directory / "modules.json").is_file()
    return write_model_card(directory, spec, bases, data, metrics, sentence_transformers=has_st)


def push_to_hub(directory: str | Path, repo_id: str, private: bool = True, token: str | None = None) -> str:
    """Upload a saved model directory to the Hugging Face hub as ``repo_id`` (created if missing); returns its URL.

    Needs network access and a token (``token`` or ``HF_TOKEN`` / ``huggingface-cli login``).
    """
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    api.create_repo(repo_id, private=private, exist_ok=True)
    api.upload_folder(folder_path=str(directory), repo_id=repo_id, commit_message="Upload vembed model")
    return f"https://huggingface.co/{repo_id}"


def _write_json(path: Path, value: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(value, indent=2) + "\n")
