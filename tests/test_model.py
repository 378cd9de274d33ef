"""EmbeddingModel: family detection, encoding contracts, save/load round trips and clear errors, on tiny models."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModel

from vembed.data.processing import Preprocessor
from vembed.model import EmbeddingModel, detect_family
from vembed.testing import make_tiny_bert
from vembed.training.model_builder import build_model, compile_model

pytestmark = pytest.mark.unit

TEXTS = ["a red circle", "two small blue squares on a green field", "a triangle"]


@pytest.fixture(scope="module")
def images():
    from PIL import Image

    return [Image.new("RGB", (40, 36), color) for color in ((255, 0, 0), (0, 90, 255), (20, 200, 20))]


def _inputs(directory, images) -> dict[str, torch.Tensor]:
    """Text and image tensors of ``TEXTS`` / ``images`` from the directory's own preprocessing."""
    pre = Preprocessor.from_pretrained(directory)
    out: dict[str, torch.Tensor] = {}
    if pre.has_text:
        out.update({k: torch.from_numpy(v) for k, v in pre.process_texts(TEXTS).items()})
    if pre.has_image:
        out["pixel_values"] = torch.from_numpy(pre.process_images(images))
    return out


def _embed(model: EmbeddingModel, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    model.eval()
    out = {}
    with torch.no_grad():
        if "input_ids" in inputs:
            out["text"] = model.encode_text(inputs["input_ids"], inputs["attention_mask"])
        if "pixel_values" in inputs:
            out["image"] = model.encode_image(inputs["pixel_values"])
    return out


@pytest.fixture(scope="module")
def composed_config(tiny_bert_dir, tiny_vit_dir) -> dict:
    return {"text_model_name": str(tiny_bert_dir), "image_model_name": str(tiny_vit_dir), "projection_dim": 16}


# ---------------------------------------------------------------------------------------------------- families
def test_family_is_read_from_the_checkpoint_config(
    tiny_clip_dir, tiny_siglip_dir, tiny_bert_dir, tiny_vit_dir, tmp_path
):
    assert [detect_family(str(d)) for d in (tiny_clip_dir, tiny_siglip_dir, tiny_bert_dir, tiny_vit_dir)] == [
        "dual",
        "dual",
        "text",
        "image",
    ]
    # the directory's name says nothing: a CLIP saved under a misleading name is still dual
    misleading = shutil.copytree(tiny_clip_dir, tmp_path / "bert-base-uncased")
    assert detect_family(str(misleading)) == "dual"


def test_families_and_dims(tiny_clip_dir, tiny_siglip_dir, tiny_bert_dir, tiny_vit_dir, composed_config):
    expectations = [
        (EmbeddingModel.from_pretrained(tiny_clip_dir), "dual", ("text", "image"), 32),
        (EmbeddingModel.from_pretrained(tiny_siglip_dir), "dual", ("text", "image"), 32),
        (EmbeddingModel.from_pretrained(tiny_bert_dir), "text", ("text",), 32),
        (EmbeddingModel.from_pretrained(tiny_vit_dir), "image", ("image",), 32),
        (EmbeddingModel.from_config(composed_config), "composed", ("text", "image"), 16),
    ]
    for model, family, modalities, dim in expectations:
        assert (model.family, model.modalities, model.embedding_dim) == (family, modalities, dim)
    assert expectations[2][0].pooling == {"text": "mean"}
    assert expectations[3][0].pooling == {"image": "cls"}
    assert expectations[0][0].pooling == {"text": "auto", "image": "auto"}


def test_build_model_accepts_dict_configs(tiny_bert_dir):
    model = build_model({"model_name": str(tiny_bert_dir), "pooling": "cls", "projection_dim": 8})
    assert (model.family, model.pooling_method, model.embedding_dim) == ("text", "cls", 8)


# ------------------------------------------------------------------------------------------ encoding contracts
def test_dual_explicit_pooling_reproduces_the_models_own_path(tiny_clip_dir, images):
    """CLIP pools images by the class token and (right-padded) text by the EOS = last real token."""
    inputs = _inputs(tiny_clip_dir, images)
    auto = _embed(EmbeddingModel.from_pretrained(tiny_clip_dir), inputs)
    cls = _embed(EmbeddingModel.from_pretrained(tiny_clip_dir, pooling_method="cls"), inputs)
    last = _embed(EmbeddingModel.from_pretrained(tiny_clip_dir, pooling_method="last"), inputs)
    mean = _embed(EmbeddingModel.from_pretrained(tiny_clip_dir, pooling_method="mean"), inputs)
    torch.testing.assert_close(cls["image"], auto["image"])
    torch.testing.assert_close(last["text"], auto["text"])
    assert not torch.allclose(mean["image"], auto["image"], atol=1e-4)


def test_dual_auto_is_get_features_normalised(tiny_siglip_dir, images):
    model = EmbeddingModel.from_pretrained(tiny_siglip_dir).eval()
    hf = AutoModel.from_pretrained(tiny_siglip_dir).eval()
    inputs = _inputs(tiny_siglip_dir, images)
    ours = _embed(model, inputs)
    with torch.no_grad():
        text = hf.get_text_features(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])
        image = hf.get_image_features(pixel_values=inputs["pixel_values"])
    torch.testing.assert_close(ours["text"], F.normalize(text.pooler_output, dim=-1))
    torch.testing.assert_close(ours["image"], F.normalize(image.pooler_output, dim=-1))


def test_multi_vector_returns_masked_unit_tokens(tiny_clip_dir, images):
    model = EmbeddingModel.from_pretrained(tiny_clip_dir, pooling_method="none").eval()
    inputs = _inputs(tiny_clip_dir, images)
    with torch.no_grad():
        tokens, mask = model.encode_text(inputs["input_ids"], inputs["attention_mask"])
        patches, patch_mask = model.encode_image(inputs["pixel_values"])
    assert model.multi_vector
    assert tokens.shape == (*inputs["input_ids"].shape, 32) and torch.equal(mask, inputs["attention_mask"])
    norms = tokens.norm(dim=-1)
    torch.testing.assert_close(norms[mask.bool()], torch.ones(int(mask.sum())))
    assert float(norms[~mask.bool()].abs().max()) == 0.0
    assert patches.shape == (3, 17, 32) and bool(patch_mask.all())


def test_fused_query_is_normalised_sum(tiny_clip_dir, images):
    model = EmbeddingModel.from_pretrained(tiny_clip_dir).eval()
    inputs = _inputs(tiny_clip_dir, images)
    with torch.no_grad():
        text = model.encode_text(inputs["input_ids"], inputs["attention_mask"])
        image = model.encode_image(inputs["pixel_values"])
        fused = model.encode(inputs["input_ids"], inputs["attention_mask"], inputs["pixel_values"])
    torch.testing.assert_close(fused, F.normalize(text + image, dim=-1))
    with pytest.raises(ValueError, match="as many texts as images"):
        model.encode(inputs["input_ids"], inputs["attention_mask"], inputs["pixel_values"][:2])
    with pytest.raises(ValueError, match="needs input_ids"):
        model.encode()


def test_forward_reads_the_training_batch_layout(tiny_clip_dir, images):
    model = EmbeddingModel.from_pretrained(tiny_clip_dir, projection_dim=8).eval()
    inputs = _inputs(tiny_clip_dir, images)
    ids, mask, pixels = inputs["input_ids"], inputs["attention_mask"], inputs["pixel_values"]
    negatives = pixels[[1, 2, 0, 2, 0, 1]].reshape(3, 2, *pixels.shape[1:])
    batch = {
        "query_input_ids": ids,
        "query_attention_mask": mask,
        "positive_pixel_values": pixels,
        "negative_pixel_values": negatives,
        "labels": torch.arange(3),
        "record_id": ["a", "b", "c"],  # unknown keys are ignored
    }
    with torch.no_grad():
        out = model(**batch)
        assert set(out) == {"query", "positive", "negatives"}
        assert out["query"].shape == (3, 8) and out["negatives"].shape == (3, 2, 8)
        torch.testing.assert_close(out["query"], model.encode_text(ids, mask))
        for b in range(3):
            for k in range(2):
                torch.testing.assert_close(out["negatives"][b, k], model.encode_image(negatives[b, k : k + 1])[0])
    with pytest.raises(ValueError, match="no inputs for any role"):
        model(labels=torch.arange(3))
    with pytest.raises(ValueError, match="negative_input_ids must be"):
        model(query_input_ids=ids, negative_input_ids=ids)


def test_forward_multi_vector_masks(tiny_bert_dir):
    model = EmbeddingModel.from_pretrained(tiny_bert_dir, pooling_method="none").eval()
    pre = Preprocessor.from_pretrained(tiny_bert_dir)
    query = {k: torch.from_numpy(v) for k, v in pre.process_texts(TEXTS[:2]).items()}
    neg = {k: torch.from_numpy(v) for k, v in pre.process_texts(TEXTS[:2] * 2).items()}
    with torch.no_grad():
        out = model(
            query_input_ids=query["input_ids"],
            query_attention_mask=query["attention_mask"],
            negative_input_ids=neg["input_ids"].reshape(2, 2, -1),
            negative_attention_mask=neg["attention_mask"].reshape(2, 2, -1),
        )
    assert out["query"].shape == (*query["input_ids"].shape, 32)
    assert torch.equal(out["query_mask"], query["attention_mask"])
    assert out["negatives"].shape == (2, 2, neg["input_ids"].shape[1], 32)
    assert torch.equal(out["negative_mask"], neg["attention_mask"].reshape(2, 2, -1))


def test_matryoshka_dims_are_renormalised_prefixes(tiny_bert_dir):
    model = EmbeddingModel.from_pretrained(tiny_bert_dir, mrl_dims=[8, 16, 32]).eval()
    ids, mask = torch.tensor([[2, 40, 41, 3], [2, 50, 3, 0]]), torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0]])
    with torch.no_grad():
        full = model.encode_text(ids, mask)
        for dim in model.mrl_dims:
            short = model.encode_text(ids, mask, dim=dim)
            torch.testing.assert_close(short, full[:, :dim] / full[:, :dim].norm(dim=-1, keepdim=True))
            torch.testing.assert_close(short.norm(dim=-1), torch.ones(2))
    with pytest.raises(ValueError, match="Matryoshka dim 64"):
        model.encode_text(ids, mask, dim=64)


# ------------------------------------------------------------------------------------------------- save / load
ROUND_TRIPS = {
    "dual-clip": lambda d, c: EmbeddingModel.from_pretrained(d["clip"]),
    "dual-siglip-heads": lambda d, c: EmbeddingModel.from_pretrained(d["siglip"], projection_dim=8, mrl_dims=[4, 8]),
    "composed": lambda d, c: EmbeddingModel.from_config(c),
    "text": lambda d, c: EmbeddingModel.from_pretrained(d["bert"], pooling_method="cls"),
    "image": lambda d, c: EmbeddingModel.from_pretrained(d["vit"], projection_dim=12),
}


@pytest.mark.parametrize("kind", list(ROUND_TRIPS))
def test_save_load_round_trip_is_exact(
    kind, tmp_path, images, tiny_clip_dir, tiny_siglip_dir, tiny_bert_dir, tiny_vit_dir, composed_config
):
    dirs = {"clip": tiny_clip_dir, "siglip": tiny_siglip_dir, "bert": tiny_bert_dir, "vit": tiny_vit_dir}
    model = ROUND_TRIPS[kind](dirs, composed_config)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    saved = model.save_pretrained(tmp_path / kind)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # saving leaves the model alone
    loaded = EmbeddingModel.from_pretrained(saved)
    assert (loaded.family, loaded.pooling, loaded.embedding_dim, loaded.mrl_dims) == (
        model.family,
        model.pooling,
        model.embedding_dim,
        model.mrl_dims,
    )
    inputs = _inputs(saved, images)  # the saved directory carries its own preprocessing
    original, reloaded = _embed(model, inputs), _embed(loaded, inputs)
    assert set(original) == set(model.modalities)
    for modality in original:
        assert torch.equal(original[modality], reloaded[modality]), modality
    assert not any(p.suffix in (".bin", ".pt", ".pkl") for p in saved.rglob("*"))


@pytest.mark.parametrize("name", ["clip", "bert", "vit"])
def test_single_backbone_save_loads_with_plain_automodel(
    name, tmp_path, images, tiny_clip_dir, tiny_bert_dir, tiny_vit_dir
):
    source = {"clip": tiny_clip_dir, "bert": tiny_bert_dir, "vit": tiny_vit_dir}[name]
    model = EmbeddingModel.from_pretrained(source, projection_dim=8)
    saved = model.save_pretrained(tmp_path / name)
    assert (saved / "heads.safetensors").is_file() and (saved / "vembed.json").is_file()
    hf = AutoModel.from_pretrained(saved).eval()
    original = AutoModel.from_pretrained(source)
    for key, value in original.state_dict().items():
        assert torch.equal(hf.state_dict()[key], value), key
    if name == "clip":
        assert hf.logit_scale.shape == torch.Size([])  # HF shape restored on save


def test_logit_scale_is_fsdp2_ready_and_frozen(tiny_clip_dir):
    model = EmbeddingModel.from_pretrained(tiny_clip_dir)
    assert all(p.dim() >= 1 for p in model.parameters())
    assert not model.encoder.backbone.logit_scale.requires_grad
    assert model.no_split_module_classes() == ["CLIPEncoderLayer", "CLIPTextEmbeddings", "CLIPVisionEmbeddings"]


@pytest.mark.parametrize("kind", ["clip", "composed"])
@pytest.mark.parametrize("mode", ["t2t", "i2i"])
def test_single_tower_modes_freeze_exactly_the_parameters_they_never_use(
    kind, mode, tiny_clip_dir, composed_config, images
):
    # DDP's condition, checked without DDP: after freeze_unused_towers every trainable parameter gets a gradient
    # from a real backward in that mode, and the mode's own tower is still trainable.
    from vembed.training.distributed import freeze_unused_towers

    model = EmbeddingModel.from_config(composed_config if kind == "composed" else {"model_name": str(tiny_clip_dir)})
    assert freeze_unused_towers(model, mode)
    source = {"t2t": "text_model_name", "i2i": "image_model_name"}[mode]
    inputs = _inputs(composed_config[source] if kind == "composed" else tiny_clip_dir, images)
    if mode == "t2t":
        batch = {f"{role}_{k}": inputs[k] for role in ("query", "positive") for k in ("input_ids", "attention_mask")}
    else:
        batch = {f"{role}_pixel_values": inputs["pixel_values"] for role in ("query", "positive")}
    out = model(**batch)
    (out["query"] @ out["positive"].T).sum().backward()
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    assert trainable
    assert [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None] == []
    frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
    unused_tower = {("clip", "t2t"): "vision_model", ("clip", "i2i"): "text_model"}.get((kind, mode))
    unused_tower = unused_tower or ("image_encoder" if mode == "t2t" else "text_encoder")
    assert any(unused_tower in n for n in frozen) and not any(unused_tower in n for n in trainable)


@pytest.mark.parametrize("kind", ["clip", "siglip-mean", "composed"])
def test_every_trainable_parameter_gets_a_gradient(kind, tiny_clip_dir, tiny_siglip_dir, composed_config, images):
    """Unused parameters (HF poolers, logit scale, SigLIP's head under explicit pooling) are frozen, so DDP can run
    without find_unused_parameters."""
    if kind == "clip":
        model, source = EmbeddingModel.from_pretrained(tiny_clip_dir), tiny_clip_dir
    elif kind == "siglip-mean":
        model, source = EmbeddingModel.from_pretrained(tiny_siglip_dir, pooling_method="mean"), tiny_siglip_dir
    else:
        model, source = EmbeddingModel.from_config(composed_config), composed_config["text_model_name"]
    inputs = _inputs(source, images)
    if "pixel_values" not in inputs:
        inputs["pixel_values"] = _inputs(composed_config["image_model_name"], images)["pixel_values"]
    out = model(
        query_input_ids=inputs["input_ids"],
        query_attention_mask=inputs["attention_mask"],
        positive_pixel_values=inputs["pixel_values"],
    )
    (out["query"] @ out["positive"].T).diagonal().sum().backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert missing == []


def test_loading_a_saved_model_honours_explicit_overrides(tmp_path, tiny_bert_dir):
    saved = EmbeddingModel.from_pretrained(tiny_bert_dir, projection_dim=8).save_pretrained(tmp_path / "m")
    assert EmbeddingModel.from_pretrained(saved).pooling_method == "auto"
    reloaded = EmbeddingModel.from_pretrained(saved, pooling_method="cls", normalize=False)
    assert (reloaded.pooling, reloaded.normalize, reloaded.embedding_dim) == ({"text": "cls"}, False, 8)
    with pytest.raises(ValueError, match="projection_dim=16 does not fit"):
        EmbeddingModel.from_pretrained(saved, projection_dim=16)
    with pytest.raises(ValueError, match="saved 'text' model"):
        EmbeddingModel.from_pretrained(saved, model_family="image")


# ------------------------------------------------------------------------------------------------------ errors
def test_missing_path_names_the_path(tmp_path):
    missing = tmp_path / "no_such_model"
    with pytest.raises(FileNotFoundError, match="no_such_model"):
        EmbeddingModel.from_pretrained(missing)
    with pytest.raises(FileNotFoundError, match="no_such_model"):
        EmbeddingModel.from_pretrained("no_such_model")  # hub-id shaped, offline: not found either


def test_unknown_or_mismatched_family_is_rejected(tmp_path, tiny_bert_dir):
    with pytest.raises(ValueError, match="model_family.*'dual'"):
        EmbeddingModel.from_pretrained(tiny_bert_dir, model_family="colbert")
    with pytest.raises(ValueError, match="describes a 'text' model"):
        EmbeddingModel.from_pretrained(tiny_bert_dir, model_family="image")
    saved = EmbeddingModel.from_pretrained(tiny_bert_dir).save_pretrained(tmp_path / "m")
    spec = json.loads((saved / "vembed.json").read_text())
    (saved / "vembed.json").write_text(json.dumps({**spec, "family": "colbert"}))
    with pytest.raises(ValueError, match="unknown model family 'colbert'; known families: dual, composed, text, image"):
        EmbeddingModel.from_pretrained(saved)


def test_wrong_dims_raise_clear_errors(tmp_path, tiny_bert_dir, tiny_vit_dir, tiny_clip_dir):
    wide_text = make_tiny_bert(tmp_path / "bert48", hidden=48)
    composed = {"text_model_name": str(wide_text), "image_model_name": str(tiny_vit_dir)}
    with pytest.raises(ValueError, match=r"different widths.*set projection_dim"):
        EmbeddingModel.from_config(composed)
    assert EmbeddingModel.from_config({**composed, "projection_dim": 24}).embedding_dim == 24
    with pytest.raises(ValueError, match=r"mrl_dims \[64\] are outside 1..32"):
        EmbeddingModel.from_pretrained(tiny_bert_dir, mrl_dims=[16, 64])
    clip = EmbeddingModel.from_pretrained(tiny_clip_dir)
    with pytest.raises(ValueError, match=r"pixel_values must be a \[batch, 3, height, width\]"):
        clip.encode_image(torch.zeros(2, 32, 32))
    with pytest.raises(ValueError, match="takes at most 77"):
        clip.encode_text(torch.ones(1, 80, dtype=torch.long))
    with pytest.raises(ValueError, match="encodes text only, not images"):
        EmbeddingModel.from_pretrained(tiny_bert_dir).encode_image(torch.zeros(1, 3, 32, 32))


def test_pickle_weights_are_refused(tmp_path, tiny_bert_dir):
    pickled = tmp_path / "pickled"
    AutoModel.from_pretrained(tiny_bert_dir).save_pretrained(pickled)
    for weights in pickled.glob("*.safetensors"):
        torch.save({}, weights.with_suffix(".bin"))
        weights.unlink()
    with pytest.raises(ValueError, match="only has pickle"):
        EmbeddingModel.from_pretrained(pickled)


# ----------------------------------------------------------------------------------------------- switches
def test_gradient_checkpointing_switch_keeps_gradients(tiny_bert_dir):
    ids, mask = torch.tensor([[2, 40, 41, 3]]), torch.ones(1, 4, dtype=torch.long)
    grads = []
    for flag in (False, True):
        torch.manual_seed(0)
        model = EmbeddingModel.from_pretrained(tiny_bert_dir, gradient_checkpointing=flag).eval()
        assert model.encoder.backbone.is_activation_checkpointing == flag
        model.train()
        torch.manual_seed(1)
        model.encode_text(ids, mask).sum().backward()
        grads.append(model.encoder.backbone.embeddings.word_embeddings.weight.grad.clone())
    torch.testing.assert_close(grads[0], grads[1])


def test_compile_model_only_when_configured(tiny_bert_dir):
    model = EmbeddingModel.from_pretrained(tiny_bert_dir)
    assert compile_model(model, {"torch_compile": False}) is model and model._compiled_call_impl is None
    compiled = compile_model(model, {"torch_compile": True})
    assert compiled is model and model._compiled_call_impl is not None
    assert set(compiled.state_dict()) == set(EmbeddingModel.from_pretrained(tiny_bert_dir).state_dict())


# ------------------------------------------------------------------------------- the loss's parameters the model holds


def test_build_model_holds_the_losss_learnable_parameters_and_saves_them(tiny_bert_dir, tmp_path):
    """Issue 16 item 7: the loss's learnable scale and bias live in the model (open_clip's layout), built from the
    config's loss settings, returned by forward, in build_optimizer's no-decay group, saved and loaded with it."""
    from vembed.training.optimizer_builder import build_optimizer

    config = {"model_name": str(tiny_bert_dir), "loss_type": "sigmoid", "sigmoid_init_scale": 5.0}
    assert build_model({"model_name": str(tiny_bert_dir)}).logit_parameters is None  # a fixed temperature: none
    model = build_model(config)
    held = model.logit_parameters
    assert held.names == ("logit_scale", "logit_bias")
    pre = Preprocessor.from_pretrained(tiny_bert_dir)
    batch = {f"{role}_{k}": torch.from_numpy(v) for role in ("query", "positive")
             for k, v in pre.process_texts(TEXTS).items()}  # fmt: skip
    out = model(**batch)
    assert out["logit_scale"].item() == pytest.approx(5.0) and out["logit_bias"].item() == -10.0
    assert out["logit_scale"].requires_grad and out["logit_bias"].requires_grad

    optimizer = build_optimizer(model, {**config, "weight_decay": 0.1})
    (no_decay,) = [g for g in optimizer.param_groups if g["weight_decay"] == 0.0]
    assert {id(p) for p in held.parameters()} <= {id(p) for p in no_decay["params"]}

    with torch.no_grad():
        held.logit_scale.log_scale.fill_(1.25)
        held.logit_bias.fill_(-3.5)
    model.save_pretrained(tmp_path / "saved")
    assert json.loads((tmp_path / "saved" / "vembed.json").read_text())["logit_parameters"] == list(held.names)
    loaded = EmbeddingModel.from_pretrained(tmp_path / "saved")
    assert loaded.logit_parameters.logit_scale.log_scale.item() == 1.25
    assert loaded.logit_parameters.logit_bias.item() == -3.5
    again = build_model({**config, "model_name": str(tmp_path / "saved")})  # fine-tuning on: the learned values
    assert again.logit_parameters.logit_bias.item() == -3.5
    other = build_model({"model_name": str(tmp_path / "saved"), "learnable_temperature": True, "temperature": 0.2})
    assert other.logit_parameters.names == ("logit_scale",)  # another loss: fresh from its config
    assert other.logit_parameters.logit_scale().item() == pytest.approx(5.0)

    (tmp_path / "saved" / "logit_parameters.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="logit_parameters.safetensors is missing"):
        EmbeddingModel.from_pretrained(tmp_path / "saved")
    spec = json.loads((tmp_path / "saved" / "vembed.json").read_text())
    del spec["logit_parameters"]  # a checkpoint written before the model held them
    (tmp_path / "saved" / "vembed.json").write_text(json.dumps(spec))
    assert EmbeddingModel.from_pretrained(tmp_path / "saved").logit_parameters is None
    assert build_model({**config, "model_name": str(tmp_path / "saved")}).logit_parameters.logit_bias.item() == -10.0


def test_resume_state_from_before_the_model_held_the_loss_parameters_is_refused_clearly(tiny_bert_dir, tmp_path):
    from vembed.training.checkpointing import TrainingProgress, load_training_state, save_training_state
    from vembed.training.optimizer_builder import build_optimizer

    old = build_model({"model_name": str(tiny_bert_dir)})
    save_training_state(tmp_path, old, build_optimizer(old, {}), None, TrainingProgress())
    config = {"model_name": str(tiny_bert_dir), "learnable_temperature": True}
    new = build_model(config)
    with pytest.raises(ValueError, match="written by an older vembed, whose loss .* held the learnable temperature"):
        load_training_state(tmp_path, new, build_optimizer(new, config), None)
