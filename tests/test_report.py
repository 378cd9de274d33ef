"""Evaluation reports: JSON and Markdown contents, deltas in points, per-dim sections, optional PNG."""

from __future__ import annotations

import json
import sys

import pytest

from vembed.evaluation.report import render_markdown, write_report

pytestmark = pytest.mark.unit

MODEL = {"recall@1": 0.452, "recall@5": 0.81, "map": 0.5, "num_queries": 100, "num_queries_without_relevant": 2}
BASE = {"recall@1": 0.40, "recall@5": 0.8125, "map": 0.5, "num_queries": 100, "num_queries_without_relevant": 2}


def table_rows(markdown: str) -> dict[str, list[str]]:
    rows = {}
    for line in markdown.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("| ") and cells[0] not in ("metric",) and not cells[0].startswith("---"):
            rows[cells[0]] = cells[1:]
    return rows


def test_flat_report_without_baseline(tmp_path) -> None:
    written = write_report(MODEL, tmp_path / "out", names=("zero-shot", "fine-tuned"))
    assert written["json"] == tmp_path / "out" / "metrics.json"
    document = json.loads(written["json"].read_text())
    assert document["metrics"] == MODEL and document["baseline"] is None and document["delta_points"] is None
    rows = table_rows(written["markdown"].read_text())
    assert rows["recall@1"] == ["45.20"] and rows["num_queries"] == ["100"]
    assert "| metric | fine-tuned |" in written["markdown"].read_text()


def test_baseline_deltas_in_points(tmp_path) -> None:
    written = write_report(MODEL, tmp_path, baseline=BASE, names=("zero-shot", "fine-tuned"))
    document = json.loads(written["json"].read_text())
    deltas = document["delta_points"]
    assert deltas["recall@1"] == pytest.approx(5.2) and deltas["recall@5"] == pytest.approx(-0.25)
    assert deltas["map"] == 0 and "num_queries" not in deltas
    markdown = written["markdown"].read_text()
    assert "| metric | zero-shot | fine-tuned | Δ (points) |" in markdown
    rows = table_rows(markdown)
    assert rows["recall@1"] == ["40.00", "45.20", "+5.20"]
    assert rows["recall@5"] == ["81.25", "81.00", "-0.25"]
    assert rows["map"] == ["50.00", "50.00", "+0.00"]
    assert rows["num_queries"] == ["100", "100", ""]


def test_render_markdown_is_the_written_table(tmp_path) -> None:
    written = write_report(MODEL, tmp_path, baseline=BASE, names=("zero-shot", "fine-tuned"))
    assert render_markdown(MODEL, BASE, names=("zero-shot", "fine-tuned")) == written["markdown"].read_text()


def test_metric_missing_on_one_side_is_shown_without_delta(tmp_path) -> None:
    written = write_report({"recall@1": 0.5}, tmp_path, baseline={"recall@1": 0.25, "mrr": 0.3})
    rows = table_rows(written["markdown"].read_text())
    assert rows["recall@1"] == ["25.00", "50.00", "+25.00"]
    assert rows["mrr"] == ["30.00", "—", ""]


def test_per_dim_metrics(tmp_path) -> None:
    model = {64: {"recall@1": 0.3, "recall@10": 0.6}, 256: {"recall@1": 0.5, "recall@10": 0.9}}
    base = {64: {"recall@1": 0.2, "recall@10": 0.6}, 256: {"recall@1": 0.4, "recall@10": 0.7}}
    written = write_report(model, tmp_path, baseline=base)
    document = json.loads(written["json"].read_text())
    assert document["delta_points"]["64"]["recall@1"] == pytest.approx(10.0)
    assert document["delta_points"]["256"]["recall@10"] == pytest.approx(20.0)
    markdown = written["markdown"].read_text()
    assert "## dim 64" in markdown and "## dim 256" in markdown
    section_256 = markdown.split("## dim 256")[1]
    assert table_rows(section_256)["recall@10"] == ["70.00", "90.00", "+20.00"]


def test_png_written_when_matplotlib_is_installed(tmp_path) -> None:
    pytest.importorskip("matplotlib")
    written = write_report({"recall@1": 0.5, "recall@5": 0.7, "recall@10": 0.9}, tmp_path, baseline={"recall@1": 0.4})
    assert written["png"] == tmp_path / "recall_at_k.png"
    assert written["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_png_skipped_without_matplotlib_or_recall_keys(tmp_path, monkeypatch) -> None:
    assert set(write_report({"mrr": 0.5}, tmp_path / "a")) == {"json", "markdown"}
    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # makes `import matplotlib...` raise ImportError
    written = write_report({"recall@1": 0.5}, tmp_path / "b")
    assert set(written) == {"json", "markdown"}
    assert not (tmp_path / "b" / "recall_at_k.png").exists()


@pytest.mark.parametrize(
    ("metrics", "baseline", "message"),
    [
        ({}, None, "metrics must be a non-empty dict"),
        ({"recall@1": "high"}, None, r"metrics\['recall@1'\] must be a number"),
        ({"recall@1": float("nan")}, None, "must be a number"),
        ({64: {"recall@1": 0.1}, "recall@1": 0.2}, None, "mixes per-dim dicts and plain values"),
        ({"recall@1": 0.1}, {64: {"recall@1": 0.1}}, "both be flat"),
    ],
)
def test_bad_metrics_raise(tmp_path, metrics, baseline, message) -> None:
    with pytest.raises(ValueError, match=message):
        write_report(metrics, tmp_path, baseline=baseline)
