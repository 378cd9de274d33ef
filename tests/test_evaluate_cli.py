"""``vembed evaluate`` and ``ray_jobs/evaluate.py``: a trained model beats its untrained start on a held-out split
(``--compare``), Matryoshka sections, clear errors, a light import, and evaluation against a corpus embedded by
``vembed embed`` through the Ray job."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader

from vembed.evaluation.cli import main

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def one_torch_thread():
    """Tiny models on a shared 2-core machine: one intra-op thread avoids OpenMP contention."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def trained(tiny_clip_dir, shapes_t2i, tmp_path_factory) -> Path:
    """The tiny CLIP fine-tuned for 32 steps on the synthetic train split; returns its last checkpoint."""
    from vembed.data.dataset import VisualRetrievalDataset
    from vembed.losses.factory import LossFactory
    from vembed.training.config import as_config
    from vembed.training.model_builder import build_model, load_processor
    from vembed.training.optimizer_builder import build_optimizer, build_scheduler
    from vembed.training.training_loop import Trainer

    out = tmp_path_factory.mktemp("trained")
    cfg = as_config(
        {
            "model_name": str(tiny_clip_dir),
            "output_dir": str(out),
            "epochs": 8,
            "warmup_ratio": 0.1,
            "batch_size": 16,
            "learning_rate": 2e-3,
            "temperature": 0.1,
            "mixed_precision": "no",
            "logging_steps": 100,
        }
    )
    torch.manual_seed(0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # module fixtures start before the autouse one
    try:
        model = build_model(cfg)
        criterion = LossFactory.create(cfg)
        dataset = VisualRetrievalDataset(shapes_t2i["train"], load_processor(str(tiny_clip_dir)), retrieval_mode="t2i")
        loader = DataLoader(dataset, batch_size=16, collate_fn=dataset.collator(), shuffle=True)
        optimizer = build_optimizer(model, cfg, extra_modules=[criterion])
        scheduler, _ = build_scheduler(optimizer, cfg, cfg.epochs, len(loader))
        Trainer(model, optimizer, loader, criterion, config=cfg, scheduler=scheduler).train()
    finally:
        torch.set_num_threads(threads)
    return out / "checkpoint-epoch-8"


@pytest.mark.unit
def test_trained_model_beats_its_untrained_start_on_held_out_data(trained, tiny_clip_dir, shapes_t2i, tmp_path, capsys):
    from vembed.evaluation.evaluator import evaluate_model_path

    argv = ["--model", str(trained), "--data", str(shapes_t2i["test"]), "--compare", str(tiny_clip_dir)]
    assert main([*argv, "--output", str(tmp_path / "report"), "--batch-size", "8"]) == 0

    report = json.loads((tmp_path / "report" / "metrics.json").read_text())
    after, before, delta = report["metrics"], report["baseline"], report["delta_points"]
    assert after["mrr"] > before["mrr"] + 0.1, (before, after)
    assert after["recall@5"] > before["recall@5"]
    assert delta["mrr"] == pytest.approx(100 * (after["mrr"] - before["mrr"]))
    assert after["num_queries"] == before["num_queries"] == 16 and after["num_queries_without_relevant"] == 0
    assert report["names"] == {"baseline": "clip", "model": "checkpoint-epoch-8"}
    # the CLI reports what the Python API computes
    assert after == pytest.approx(evaluate_model_path(trained, shapes_t2i["test"]))

    printed = capsys.readouterr().out
    assert "| metric | clip | checkpoint-epoch-8 | Δ (points) |" in printed
    assert f"| mrr | {100 * before['mrr']:.2f} | {100 * after['mrr']:.2f} | {delta['mrr']:+.2f} |" in printed
    assert printed.split("wrote ")[0].strip() == (tmp_path / "report" / "metrics.md").read_text().strip()


@pytest.mark.unit
def test_matryoshka_dims_give_one_section_per_dim(trained, tiny_clip_dir, shapes_t2i, tmp_path, capsys):
    argv = ["--model", str(trained), "--data", str(shapes_t2i["test"]), "--compare", str(tiny_clip_dir)]
    assert main([*argv, "--dims", "8", "32", "--ks", "1", "3", "--output", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "metrics.json").read_text())
    assert list(report["metrics"]) == list(report["baseline"]) == list(report["delta_points"]) == ["8", "32"]
    assert {"recall@1", "recall@3", "ndcg@3", "mrr", "map"} <= set(report["metrics"]["8"])
    printed = capsys.readouterr().out
    assert "## dim 8" in printed and "## dim 32" in printed


@pytest.mark.unit
def test_bad_input_exits_2_with_a_clear_message(tiny_clip_dir, shapes_t2i, tmp_path, capsys):
    (tmp_path / "empty.jsonl").write_text("")
    model = ["--model", str(tiny_clip_dir)]
    cases = {
        ("--data", str(tmp_path / "empty.jsonl")): "the eval file is empty",
        ("--data", str(tmp_path / "missing.jsonl")): "data path not found",
        ("--data", str(shapes_t2i["test"]), "--dims", "16", "64"): r"dims [16, 64] must be distinct integers in 1..32",
        ("--data", str(shapes_t2i["test"]), "--mode", "t2t", "--relevance", "labels"): "needs image queries",
    }
    for args, message in cases.items():
        assert main([*model, *args]) == 2, args
        err = capsys.readouterr().err
        assert "vembed evaluate: error: " in err and message in err, err
    with pytest.raises(SystemExit):
        main([*model, "--data", str(shapes_t2i["test"]), "--mode", "x2y"])


@pytest.mark.unit
def test_the_cli_module_imports_neither_torch_nor_ray():
    code = "import sys, vembed.evaluation.cli; print(sorted(m for m in ('torch', 'ray', 'transformers') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


# ---- Ray: the batch-embedding job's corpus as the candidate pool ----------------------------------------------


@pytest.fixture(scope="module")
def gallery(ray_local, tiny_clip_dir, shapes_t2i, tmp_path_factory) -> Path:
    """Every image of the synthetic set (train, val and test) embedded by `vembed embed`: test positives + distractors."""
    from vembed.batch import embed_corpus

    output = tmp_path_factory.mktemp("gallery") / "embeddings"
    embed_corpus(str(tiny_clip_dir), str(shapes_t2i["images"]), str(output), num_actors=1, batch_size=32)
    return output


@pytest.mark.ray
def test_ray_job_scores_queries_against_an_embedded_corpus_and_a_baseline_ranks_the_same_corpus(
    ray_local, gallery, tiny_clip_dir, shapes_t2i, tmp_path
):
    from vembed.batch import read_embeddings
    from vembed.evaluation.evalset import load_eval_set
    from vembed.evaluation.metrics import retrieval_metrics
    from vembed.inference import VEmbedFactoryPredictor

    command = [sys.executable, str(REPO / "ray_jobs" / "evaluate.py"), "--model", str(tiny_clip_dir)]
    command += ["--data", str(shapes_t2i["test"]), "--candidates-embeddings", str(gallery), "--output", str(tmp_path)]
    command += ["--compare", str(tiny_clip_dir)]  # the baseline embeds the same corpus itself, with Ray Data
    command += ["--num-actors", "1"]  # the session Ray's 8 logical CPUs would let each of the 3 jobs scale to 4
    env = {**os.environ, "RAY_ADDRESS": ray_local.get_runtime_context().gcs_address}
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads((tmp_path / "metrics.json").read_text())
    metrics = report["metrics"]

    # Reference: the Predictor in this process, every gallery image a candidate, each query's positive by path.
    predictor = VEmbedFactoryPredictor(tiny_clip_dir)
    images = read_embeddings(str(gallery)).column("source").to_pylist()
    assert len(images) == len(list(shapes_t2i["images"].iterdir())) == 96
    evalset = load_eval_set(shapes_t2i["test"])
    expected = retrieval_metrics(
        predictor.encode_text(evalset.query_texts),
        predictor.encode_image(images),
        [[images.index(p) for p in positives] for positives in evalset.positives],
    )
    assert metrics == pytest.approx({**expected, "num_records": 16, "num_positives_missing": 0}, abs=1e-6)
    assert report["baseline"] == pytest.approx(metrics, abs=1e-6)  # same model: read vectors == re-embedded ones


@pytest.mark.ray
def test_embeddings_of_another_model_are_refused(gallery, trained, shapes_t2i, capsys):
    argv = ["--model", str(trained), "--data", str(shapes_t2i["test"]), "--candidates-embeddings"]
    assert main([*argv, str(gallery)]) == 2
    assert "whose vembed.json differs from that of" in capsys.readouterr().err
