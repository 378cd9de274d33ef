"""The README and the configuration reference stay true: the reference is what ``configs/defaults.yaml`` renders
to, and every Python block of the README runs (or says why it cannot)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from vembed.config import VEmbedConfig
from vembed.config_reference import REFERENCE_PATH, render_reference

pytestmark = pytest.mark.unit

REPO = Path(__file__).resolve().parents[1]
BLOCK = re.compile(r"(?:<!-- not run: (?P<reason>[^>]*?) -->\n)?```python\n(?P<code>.*?)```", re.S)


def test_configuration_reference_matches_the_defaults_file():
    committed = (REPO / REFERENCE_PATH).read_text()
    assert committed == render_reference(), (
        "docs/configuration.md is stale: run `python -m vembed.config_reference > docs/configuration.md`"
    )
    for key in VEmbedConfig.__dataclass_fields__:
        assert f"| `{key}` |" in committed, key


def test_readme_names_one_suite_time_and_no_files_outside_the_repository():
    text = (REPO / "README.md").read_text()
    assert len(set(re.findall(r"about (\d+) minutes", text))) == 1
    assert "../" not in text


def test_every_python_block_of_the_readme_runs(tmp_path, tiny_clip_dir, monkeypatch):
    from PIL import Image

    from vembed.model import EmbeddingModel

    blocks = list(BLOCK.finditer((REPO / "README.md").read_text()))
    assert blocks
    # the files the blocks name, made locally: a checkpoint and three images
    EmbeddingModel.from_pretrained(tiny_clip_dir, projection_dim=128).save_pretrained(
        tmp_path / "output" / "checkpoint-epoch-3"
    )
    for name, colour in (("cat", "red"), ("dog", "green"), ("bird", "blue")):
        Image.new("RGB", (40, 40), colour).save(tmp_path / f"{name}.jpg")
    monkeypatch.chdir(tmp_path)
    ran = 0
    for block in blocks:
        if block.group("reason") is not None:
            assert len(block.group("reason").strip()) > 10, "a block that is not run must say why"
            compile(block.group("code"), "README.md", "exec")  # still valid Python
            continue
        exec(compile(block.group("code"), "README.md", "exec"), {})
        ran += 1
    assert ran >= 1
