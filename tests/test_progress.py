"""Training progress a person can read: a line per ``logging_steps`` from rank 0 while it trains, validation
results, a final summary table, and none of Ray Train's per-report dumps."""

from __future__ import annotations

import io
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from vembed.training.progress import ProgressPrinter

RAY_PREFIX = re.compile(r"^(\x1b\[[0-9;]*m)*\([^)]*pid=\d+[^)]*\)(\x1b\[[0-9;]*m)*\s*")
REPO = Path(__file__).resolve().parents[1]
STEP_LINE = re.compile(
    r"vembed: epoch (\d+)/2  step (\d+)/8 \(\d+%\)  loss \d+\.\d{4}  lr \d\.\d\de[-+]\d\d  [\d.]+ samples/s  ETA \d+:\d\d:\d\d"
)


@pytest.mark.unit
def test_lines_eta_and_summary_of_the_printer():
    out = io.StringIO()
    printer = ProgressPrinter(epochs=2, steps_per_epoch=5, stream=out, bar=False)
    printer.started -= 10.0  # 2 steps took 10 s: 8 steps left take 40 s
    printer.report({"epoch": 1, "step": 2, "loss": 1.5, "lr": 1e-3, "samples_per_s": 64.0})
    printer.report({"epoch": 1, "step": 5, "loss": 1.25, "lr": 5e-4, "samples_per_s": 64.0, "val_loss": 1.0})
    printer.report({"epoch": 1, "step": 5, "loss": 1.25, "lr": 5e-4, "samples_per_s": 64.0})  # epoch end: no repeat
    printer.report({"epoch": 2, "step": 10, "loss": 0.5, "lr": 0.0, "samples_per_s": 64.0, "val_recall@1": 0.75})
    printer.close()
    lines = out.getvalue().splitlines()
    assert lines[0].startswith("vembed: epoch 1/2  step 2/10 (20%)  loss 1.5000  lr 1.00e-03  64.0 samples/s  ETA ")
    assert re.search(r"ETA 0:00:(39|40|41)$", lines[0]), lines[0]
    assert lines[1].startswith("vembed: epoch 1/2  step 5/10 (50%)")
    assert lines[2] == "vembed: validation at step 5 (epoch 1): val_loss 1.0000"
    assert lines[3].startswith("vembed: epoch 2/2  step 10/10 (100%)") and lines[3].endswith("ETA 0:00:00")
    assert lines[4] == "vembed: validation at step 10 (epoch 2): val_recall@1 0.7500"
    assert lines[5].startswith("vembed: training done in ") and lines[5].endswith(", 10 steps")
    header, *rows = lines[6:]
    assert header.split() == ["epoch", "step", "loss", "val_loss", "val_recall@1"]
    assert [row.split() for row in rows] == [["1", "5", "1.2500", "1.0000", "-"], ["2", "10", "0.5000", "-", "0.7500"]]


@pytest.mark.unit
def test_other_ranks_print_nothing():
    out = io.StringIO()
    printer = ProgressPrinter(epochs=1, steps_per_epoch=2, enabled=False, stream=out, bar=False)
    printer.report({"epoch": 1, "step": 1, "loss": 1.0})
    printer.close()
    assert out.getvalue() == ""


@pytest.mark.ray
def test_vembed_train_prints_progress_while_it_trains(ray_local, tiny_clip_dir, shapes_t2i, tmp_path):
    output = tmp_path / "run"
    overrides = {
        "model_name": tiny_clip_dir,
        "data_path": shapes_t2i["train.jsonl"],
        "val_data_path": shapes_t2i["val.jsonl"],
        "output_dir": output,
        "epochs": 2,
        "batch_size": 16,  # 64 records: 4 steps per epoch
        "logging_steps": 2,
        "num_workers": 1,
        "torch_threads": 1,
    }
    command = [sys.executable, "-m", "vembed.cli", "train", "--config_override"]
    command += [f"{key}={value}" for key, value in overrides.items()]
    env = {
        **os.environ,
        "RAY_ADDRESS": ray_local.get_runtime_context().gcs_address,
        "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
        "PYTHONUNBUFFERED": "1",
    }
    stderr = tmp_path / "stderr.txt"
    seen: list[tuple[str, bool, bool]] = []  # (line, process still running, final checkpoint written yet)
    with stderr.open("w") as err:
        process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=err, text=True, env=env)
        try:
            for line in process.stdout:
                final = (output / "checkpoint-epoch-2").exists()
                text = RAY_PREFIX.sub("", line).strip()  # without Ray's "(RayTrainWorker pid=...)"
                seen.append((text, process.poll() is None, final))
            returncode = process.wait(timeout=600)
        finally:
            if process.poll() is None:
                process.kill()
    errors = stderr.read_text()
    assert returncode == 0, errors[-3000:]
    lines = [line for line, _, _ in seen]
    steps = [(int(m.group(1)), int(m.group(2))) for m in map(STEP_LINE.search, lines) if m]
    assert steps == [(1, 2), (1, 4), (2, 6), (2, 8)], lines
    first = next(i for i, line in enumerate(lines) if STEP_LINE.search(line))
    assert seen[first][1] and not seen[first][2], "the first progress line must arrive while training runs"
    validation = [line for line in lines if line.startswith("vembed: validation at step ")]
    assert [v.partition("): ")[0] + ")" for v in validation] == [
        "vembed: validation at step 4 (epoch 1)",
        "vembed: validation at step 8 (epoch 2)",
    ]
    assert all("val_loss " in v and "val_recall@1 " in v and "val_mrr " in v for v in validation)
    done = next(i for i, line in enumerate(lines) if line.startswith("vembed: training done in "))
    assert lines[done + 1].split()[:4] == ["epoch", "step", "loss", "val_loss"]
    assert "Reporting training result" not in errors + "".join(lines)
