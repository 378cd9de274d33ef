"""GradCache vs a plain step: peak memory and step time at a large effective batch on a small CLIP.

    .venv/bin/python benchmarks/grad_cache_memory.py            # batch 512, GradCache chunk 32
    .venv/bin/python benchmarks/grad_cache_memory.py --batch 256 --chunk 16 --steps 2

Model: ``transformers.CLIPModel`` from a ``CLIPConfig`` (random init, no download): 4 layers,
hidden 256 in both towers, 64 px images with 8 px patches (65 tokens), text length 32, vocabulary
49408, trained with vembed's bidirectional InfoNCE with a learnable temperature.

How memory is measured: each variant runs in its own fresh subprocess (no allocator state shared
between the two). After building the model and the batch, the process resets its kernel peak-RSS
counter (``echo 5 > /proc/self/clear_refs`` resets ``VmHWM`` to the current RSS), then runs the
steps; the figure is ``VmHWM - RSS before the first step``: everything the step itself needed on
top of weights and inputs (activations, gradients, allocator slack), as the OS saw it. This counts
what torch's CPU allocator really took, which ``tracemalloc`` cannot see. Where ``clear_refs`` is
unavailable the script falls back to ``ru_maxrss`` and says so.

Time: in a third process, one warm-up step of each variant, then ``--steps`` rounds alternating
the two so that both see the same background load; medians of wall time and of process CPU time
(all threads). Only the ratios are meaningful on a shared CPU box (absolute times only on a GPU).
The default is one torch thread: on a loaded machine OpenMP worker threads spin while they wait,
which inflates both wall and CPU time unevenly; single-threaded CPU time measures the work done.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from vembed.losses import InfoNCELoss
from vembed.training.grad_cache import GradCache


class ClipRoles(nn.Module):
    """CLIP wrapped to return GradCache's role dict: text -> query, image -> positive."""

    def __init__(self, clip: nn.Module) -> None:
        super().__init__()
        self.clip = clip

    def forward(self, input_ids, attention_mask, pixel_values) -> dict[str, torch.Tensor]:
        text = self.clip.get_text_features(input_ids=input_ids, attention_mask=attention_mask).pooler_output
        image = self.clip.get_image_features(pixel_values=pixel_values).pooler_output
        return {"query": F.normalize(text, dim=-1), "positive": F.normalize(image, dim=-1)}


def build(args: argparse.Namespace) -> tuple[nn.Module, dict[str, torch.Tensor], int]:
    from transformers import CLIPConfig, CLIPModel

    torch.manual_seed(0)
    tower = {
        "hidden_size": args.hidden,
        "intermediate_size": 4 * args.hidden,
        "num_hidden_layers": args.layers,
        "num_attention_heads": args.hidden // 64,
    }
    config = CLIPConfig(
        text_config={**tower, "max_position_embeddings": args.text_len, "vocab_size": 49408},
        vision_config={**tower, "image_size": args.image_size, "patch_size": 8},
        projection_dim=args.hidden,
    )
    model = ClipRoles(CLIPModel(config)).train()
    batch = {
        "input_ids": torch.randint(0, 49408, (args.batch, args.text_len)),
        "attention_mask": torch.ones(args.batch, args.text_len, dtype=torch.long),
        "pixel_values": torch.randn(args.batch, 3, args.image_size, args.image_size),
    }
    return model, batch, sum(p.numel() for p in model.parameters())


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS counter of this process; False where the kernel does not allow it."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def make_steps(args: argparse.Namespace) -> tuple[dict[str, Callable[[], float]], float]:
    """Build the model once; return a one-step callable per variant (each leaves no grads behind)."""
    torch.set_num_threads(args.threads)
    model, batch, n_params = build(args)
    loss_fn = InfoNCELoss(temperature=0.07, learnable_temperature=True)
    grad_cache = GradCache(model, loss_fn, chunk_size=args.chunk)

    def plain() -> float:
        loss = loss_fn(model(**batch), batch)
        loss.backward()
        return finish(loss.detach())

    def gradcache() -> float:
        return finish(grad_cache.step(batch))

    def finish(loss: torch.Tensor) -> float:
        model.zero_grad(set_to_none=True)
        loss_fn.zero_grad(set_to_none=True)
        return float(loss)

    return {"plain": plain, "gradcache": gradcache}, n_params / 1e6


def measure_memory(args: argparse.Namespace) -> dict[str, float | str]:
    """Subprocess: one step of ``args.variant``; peak RSS of the step above the RSS before it."""
    steps, params_m = make_steps(args)
    rss_before = _status_kib("VmRSS")
    method = "VmHWM after clear_refs" if reset_peak_rss() else "ru_maxrss (clear_refs unavailable)"
    loss = steps[args.variant]()
    peak = _status_kib("VmHWM") if method.startswith("VmHWM") else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"peak_step_mib": (peak - rss_before) / 1024, "loss": loss, "params_m": params_m, "method": method}


def measure_time(args: argparse.Namespace) -> dict[str, dict[str, float]]:
    """Subprocess: one untimed warm-up step each, then ``args.steps`` rounds alternating the variants.

    Alternating (plain, GradCache, plain, ...) exposes both to the same background load; wall time
    and process CPU time (all threads) are both recorded, the latter being less sensitive to
    other processes competing for the cores.
    """
    steps, _ = make_steps(args)
    for step in steps.values():
        step()
    samples: dict[str, dict[str, list[float]]] = {name: {"wall_s": [], "cpu_s": []} for name in steps}
    for _ in range(args.steps):
        for name, step in steps.items():
            wall, cpu = time.perf_counter(), time.process_time()
            step()
            samples[name]["wall_s"].append(time.perf_counter() - wall)
            samples[name]["cpu_s"].append(time.process_time() - cpu)
    return {name: {k: statistics.median(v) for k, v in s.items()} for name, s in samples.items()}


def run_child(mode: list[str]) -> dict:
    done = subprocess.run(
        [sys.executable, __file__, *mode, *sys.argv[1:]], check=True, capture_output=True, text=True, env={**os.environ}
    )
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=512, help="effective batch size")
    parser.add_argument("--chunk", type=int, default=32, help="GradCache chunk size")
    parser.add_argument("--steps", type=int, default=2, help="timed rounds (median reported), after one warm-up")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--text-len", type=int, default=32)
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads (1: CPU time is not inflated by spinning)"
    )
    parser.add_argument("--variant", choices=["plain", "gradcache"], help=argparse.SUPPRESS)
    parser.add_argument("--timing", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.variant:  # child processes print one JSON line
        print(json.dumps(measure_memory(args)))
        return
    if args.timing:
        print(json.dumps(measure_time(args)))
        return

    memory = {variant: run_child(["--variant", variant]) for variant in ("plain", "gradcache")}
    timing = run_child(["--timing"])
    plain, cached = memory["plain"], memory["gradcache"]
    print(
        f"CLIP {plain['params_m']:.1f}M params ({args.layers} layers, hidden {args.hidden}, {args.image_size}px, "
        f"text {args.text_len}), batch {args.batch}, GradCache chunk {args.chunk}, {args.threads} threads; "
        f"memory: {plain['method']} minus RSS before the step (one fresh process per variant); "
        f"time: median of {args.steps} alternating rounds after a warm-up"
    )
    header = f"{'variant':<24}{'peak step memory MiB':>22}{'wall s/step':>13}{'CPU s/step':>12}{'loss':>9}"
    print(header)
    print("-" * len(header))
    for name, variant in (("plain step", "plain"), (f"GradCache (chunk {args.chunk})", "gradcache")):
        m, t = memory[variant], timing[variant]
        print(f"{name:<24}{m['peak_step_mib']:>22.0f}{t['wall_s']:>13.2f}{t['cpu_s']:>12.2f}{m['loss']:>9.4f}")
    memory_ratio = cached["peak_step_mib"] / plain["peak_step_mib"]
    wall_speed = timing["plain"]["wall_s"] / timing["gradcache"]["wall_s"]
    cpu_speed = timing["plain"]["cpu_s"] / timing["gradcache"]["cpu_s"]
    print(
        f"{'GradCache / plain':<24}{memory_ratio:>21.2f}x{wall_speed:>12.2f}x{cpu_speed:>11.2f}x  (speed = plain / GradCache time)"
    )
    print(
        f"goal memory <= 0.40x: {'met' if memory_ratio <= 0.4 else 'NOT met'}; "
        f"goal speed >= 0.60x: wall {'met' if wall_speed >= 0.6 else 'NOT met'}, "
        f"CPU {'met' if cpu_speed >= 0.6 else 'NOT met'}"
    )


if __name__ == "__main__":
    main()
