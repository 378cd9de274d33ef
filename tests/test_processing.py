"""The one image decoder and the one Preprocessor: formats, errors, picklability, saved-model layouts."""

from __future__ import annotations

import io
import pickle

import numpy as np
import pytest
from PIL import Image, ImageFile

from vembed.data.images import BadImageError, ImageTooLargeError, decode_image, load_image, read_bytes
from vembed.data.processing import Preprocessor
from vembed.model import EmbeddingModel

pytestmark = pytest.mark.unit


def _jpeg(size=(24, 16), color=(200, 30, 30)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


# ------------------------------------------------------------------------------------------------------ images
def test_decode_image_returns_loaded_rgb():
    image = decode_image(_jpeg(), "red.jpg")
    assert (image.mode, image.size) == ("RGB", (24, 16))
    r, g, b = image.getpixel((12, 8))
    assert r > 150 and g < 80 and b < 80
    buffer = io.BytesIO()
    Image.new("L", (5, 7), 128).save(buffer, format="PNG")
    assert decode_image(buffer.getvalue()).mode == "RGB"


def test_decode_image_rejects_truncated_jpeg():
    data = _jpeg((64, 64))
    with pytest.raises(BadImageError, match="cut.jpg: corrupt or truncated"):
        decode_image(data[: len(data) // 2], "cut.jpg")
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False


def test_decode_image_rejects_text_named_jpg(tmp_path):
    fake = tmp_path / "notes.jpg"
    fake.write_text("this is not an image\n")
    with pytest.raises(BadImageError, match="notes.jpg: not an image"):
        load_image(fake)
    with pytest.raises(BadImageError, match="empty image data"):
        decode_image(b"", "empty.jpg")
    assert issubclass(BadImageError, ValueError)


def test_decode_image_guards_against_bombs():
    with pytest.raises(ImageTooLargeError, match="more than max_pixels=100"):  # a BadImageError too
        decode_image(_jpeg((20, 20)), "big.jpg", max_pixels=100)
    assert decode_image(_jpeg((20, 20)), "ok.jpg", max_pixels=400).size == (20, 20)
    assert issubclass(ImageTooLargeError, BadImageError)  # pipelines that skip bad images skip these too


def test_exif_orientation_is_applied():
    buffer = io.BytesIO()
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    Image.new("RGB", (30, 10), (0, 0, 255)).save(buffer, format="JPEG", exif=exif)
    assert decode_image(buffer.getvalue()).size == (10, 30)


def test_read_bytes_local_root_and_uri(tmp_path):
    (tmp_path / "imgs").mkdir()
    (tmp_path / "imgs" / "a.jpg").write_bytes(_jpeg())
    assert read_bytes("imgs/a.jpg", root=tmp_path) == _jpeg()
    assert read_bytes(tmp_path / "imgs" / "a.jpg") == _jpeg()
    assert read_bytes("a.jpg", root=f"file://{tmp_path}/imgs") == _jpeg()
    assert read_bytes(f"file://{tmp_path}/imgs/a.jpg") == _jpeg()
    with pytest.raises(FileNotFoundError, match="missing.jpg"):
        read_bytes("missing.jpg", root=tmp_path)
    with pytest.raises(FileNotFoundError, match="missing.jpg"):
        read_bytes(f"file://{tmp_path}/missing.jpg")


def test_load_image_accepts_pil_bytes_and_paths(tmp_path):
    path = tmp_path / "a.jpg"
    path.write_bytes(_jpeg())
    from_path, from_bytes = load_image(path), load_image(_jpeg())
    assert np.array_equal(np.asarray(from_path), np.asarray(from_bytes))
    assert load_image(Image.new("RGBA", (3, 3))).mode == "RGB"
    with pytest.raises(TypeError, match="cannot load an image from a int"):
        load_image(3)


# ------------------------------------------------------------------------------------------------ preprocessor
def test_process_texts_pads_to_longest_and_truncates(tiny_bert_dir):
    pre = Preprocessor.from_pretrained(tiny_bert_dir, max_text_length=6)
    out = pre.process_texts(["a red circle", "circle"])
    assert set(out) == {"input_ids", "attention_mask"}
    assert out["input_ids"].dtype == np.int64 and out["attention_mask"].dtype == np.int64
    lengths = out["attention_mask"].sum(axis=1)
    assert out["input_ids"].shape[1] == lengths.max() and lengths[1] < lengths[0]
    long = pre.process_texts(["a red circle and a blue square and a green triangle"])
    assert long["input_ids"].shape == (1, 6)


def test_process_texts_rejects_bad_texts(tiny_bert_dir):
    pre = Preprocessor.from_pretrained(tiny_bert_dir)
    with pytest.raises(ValueError, match="text #1 is empty"):
        pre.process_texts(["fine", "  "])
    with pytest.raises(TypeError, match="list of strings"):
        pre.process_texts("a single string")
    with pytest.raises(TypeError, match="text #0 is a int"):
        pre.process_texts([3])
    with pytest.raises(ValueError, match="empty list"):
        pre.process_texts([])
    with pytest.raises(ValueError, match="no image processor"):
        pre.process_images([Image.new("RGB", (4, 4))])


def test_process_images_shapes_and_size_override(tiny_clip_dir, tiny_vit_dir):
    images = [Image.new("RGB", (50, 40), (255, 0, 0)), Image.new("L", (20, 60), 100)]
    for directory in (tiny_clip_dir, tiny_vit_dir):
        pixels = Preprocessor.from_pretrained(directory).process_images(images)
        assert pixels.dtype == np.float32 and pixels.shape == (2, 3, 32, 32)
        assert Preprocessor.from_pretrained(directory, image_size=16).process_images(images).shape == (2, 3, 16, 16)
    with pytest.raises(TypeError, match="load_image"):
        Preprocessor.from_pretrained(tiny_vit_dir).process_images(["a.jpg"])


def test_modalities_and_position_cap(tiny_bert_dir, tiny_vit_dir, tiny_siglip_dir):
    text, image = Preprocessor.from_pretrained(tiny_bert_dir), Preprocessor.from_pretrained(tiny_vit_dir)
    assert (text.has_text, text.has_image, image.has_text, image.has_image) == (True, False, False, True)
    assert Preprocessor.from_pretrained(tiny_siglip_dir, max_text_length=77).max_text_length == 64


def test_saved_composed_model_has_both_processors(tmp_path, tiny_bert_dir, tiny_vit_dir):
    model = EmbeddingModel.from_config(
        {"text_model_name": str(tiny_bert_dir), "image_model_name": str(tiny_vit_dir), "projection_dim": 8}
    )
    saved = model.save_pretrained(tmp_path / "composed")
    pre = Preprocessor.from_pretrained(saved)
    assert pre.has_text and pre.has_image
    from_config = Preprocessor.from_config(
        {"text_model_name": str(tiny_bert_dir), "image_model_name": str(tiny_vit_dir)}
    )
    texts = ["a red circle"]
    assert np.array_equal(pre.process_texts(texts)["input_ids"], from_config.process_texts(texts)["input_ids"])


def test_preprocessor_pickles_with_identical_outputs(tiny_clip_dir):
    pre = Preprocessor.from_pretrained(tiny_clip_dir, image_size=24)
    clone = pickle.loads(pickle.dumps(pre))
    texts, images = ["a red circle", "blue"], [Image.new("RGB", (30, 30), (9, 90, 200))]
    for key, value in pre.process_texts(texts).items():
        assert np.array_equal(value, clone.process_texts(texts)[key])
    assert np.array_equal(pre.process_images(images), clone.process_images(images))


def test_missing_model_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        Preprocessor.from_pretrained(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="no tokenizer or image processor"):
        Preprocessor.from_pretrained(tmp_path)


def test_hub_load_failure_is_raised_not_taken_for_a_missing_processor(
    tiny_vit_dir, tiny_bert_dir, tmp_path, monkeypatch
):
    """Only "this repo has no tokenizer / image processor" may become None; any other failure to load a hub id
    (offline and not cached, a corrupt file) is raised as itself instead of surfacing later as a wrong modality."""
    import huggingface_hub.constants

    from vembed.data.processing import load_image_processor, load_tokenizer
    from vembed.testing.hub_cache import write_hub_cache

    cache = tmp_path / "hub"
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    with pytest.raises(OSError, match="couldn't connect|cached"):
        load_tokenizer("nobody/not-cached")  # HF_HUB_OFFLINE=1 in the test run
    with pytest.raises(OSError, match="couldn't connect|cached"):
        load_image_processor("nobody/not-cached")

    write_hub_cache(cache, "org/tiny-vit", tiny_vit_dir)  # an image-only repo: really no tokenizer
    assert load_tokenizer("org/tiny-vit") is None
    assert load_image_processor("org/tiny-vit") is not None

    broken = write_hub_cache(cache, "org/broken-bert", tiny_bert_dir)
    (broken / "tokenizer.json").write_text("{ not json")
    (broken / "tokenizer_config.json").write_text("{ not json")
    with pytest.raises((OSError, ValueError)):
        load_tokenizer("org/broken-bert")
