"""``benchmarks/gpu_check.sh --cpu``: the one-GPU check's code runs end to end (tiny sizes, CPU, gloo)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.unit
def test_gpu_check_smoke_mode_trains_ddp_and_fsdp_and_embeds():
    env = {**os.environ, "PYTHON": sys.executable, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        ["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "--cpu"], capture_output=True, text=True, env=env
    )
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.splitlines()
    for case in ("train ddp", "train fsdp", "embed decoded tensors", "embed JPEG files"):
        row = next(line for line in lines if line.startswith(f"| {case}"))
        rate = float(row.split("|")[2].split()[0])
        assert rate > 0, row
