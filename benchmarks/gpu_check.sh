#!/usr/bin/env bash
# One-GPU check of vembed at ViT-B/16 size (under 5 minutes): DDP and FSDP2 training steps with NCCL and bf16
# (samples/s, MFU), batch-embedding images/s on decoded tensors and from JPEG files. No network needed.
#   bash benchmarks/gpu_check.sh          # on a machine with one NVIDIA GPU and torch installed
#   bash benchmarks/gpu_check.sh --cpu    # smoke mode: tiny sizes, CPU, gloo (seconds)
# PYTHON selects the interpreter (default: python3); the repository root goes first on PYTHONPATH.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
exec timeout 290 "${PYTHON:-python3}" "$root/benchmarks/gpu_check.py" "$@"
