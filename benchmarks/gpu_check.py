"""One-GPU check of vembed's training and embedding at a real model size (run through ``gpu_check.sh``).

On a machine with one NVIDIA GPU, torch installed and no network: a CLIP of ViT-B/16 size (12-layer 768-wide
vision tower on 224 px, 16 px patches; 12-layer 512-wide text tower), random init, built from a config with the
tiny test tokenizer (nothing is downloaded). Prints

    train ddp   vembed's model + loss + optimizer under a one-rank NCCL process group, DDP, bf16 autocast
    train fsdp  the same step with vembed's FSDP2 wrapping (``wrap_model``, ``strategy: fsdp``), bf16
                (samples/s after warm-up steps; MFU = the step's counted FLOPs x steps/s over the GPU's nominal dense
                bf16 peak, and over a measured bf16 matmul peak)
    embed tensors  images/s of the image tower on decoded 224 px tensors (bf16, inference mode)
    embed jpeg     images/s of vembed's Predictor on JPEG files (decode, resize, normalise in process, bf16)

Reference: clip-retrieval reports about 1,100 images/s for ViT-B/16 on one A100.
``--cpu``: a smoke run of the same code at tiny sizes on CPU with gloo (seconds), as the test suite runs it.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import socket
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from PIL import Image  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402
from transformers import CLIPConfig, CLIPModel  # noqa: E402

from vembed.config import as_config  # noqa: E402
from vembed.losses.factory import LossFactory  # noqa: E402
from vembed.testing import make_tiny_clip  # noqa: E402
from vembed.training.distributed import wrap_model  # noqa: E402
from vembed.training.model_builder import build_model  # noqa: E402
from vembed.training.optimizer_builder import build_optimizer  # noqa: E402

NOMINAL_BF16_DENSE_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10G": 125.0, "L4": 121.0}
"""Vendor datasheet dense bf16 peaks (no sparsity), by a substring of the device name."""

SIZES = {
    "gpu": dict(vision=(12, 768, 12, 16, 224), text=(12, 512, 8), projection=512, batch=128, text_len=32),
    "cpu": dict(vision=(2, 32, 2, 8, 32), text=(2, 32, 2), projection=32, batch=8, text_len=8),
}


def make_model(directory: Path, size: dict) -> Path:
    """A random-init CLIP of ``size`` with the tiny test tokenizer and an image processor for its resolution."""
    layers, width, heads, patch, image = size["vision"]
    make_tiny_clip(directory, image_size=image)
    config = CLIPConfig.from_pretrained(directory)
    config.vision_config.update(
        dict(num_hidden_layers=layers, hidden_size=width, num_attention_heads=heads, intermediate_size=4 * width)
    )
    config.vision_config.update(dict(patch_size=patch, image_size=image))
    t_layers, t_width, t_heads = size["text"]
    config.text_config.update(
        dict(
            num_hidden_layers=t_layers, hidden_size=t_width, num_attention_heads=t_heads, intermediate_size=4 * t_width
        )
    )
    config.projection_dim = size["projection"]
    torch.manual_seed(0)
    CLIPModel(config).save_pretrained(directory)
    return directory


def init_process_group(backend: str) -> None:
    """A one-rank process group on this machine (what Ray Train sets up per worker)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)


def random_batch(size: dict, vocab: int, device: torch.device) -> dict[str, torch.Tensor]:
    image = size["vision"][4]
    b, length = size["batch"], size["text_len"]
    return {
        "query_input_ids": torch.randint(1, vocab, (b, length), device=device),
        "query_attention_mask": torch.ones(b, length, dtype=torch.long, device=device),
        "positive_pixel_values": torch.randn(b, 3, image, image, device=device),
    }


def matmul_peak(device: torch.device, dtype: torch.dtype, n: int) -> float:
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    best = float("inf")
    for _ in range(10):
        sync(device)
        start = time.perf_counter()
        a @ b
        sync(device)
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def train_precision(strategy: str, device: torch.device) -> str:
    """bf16, except FSDP2 on CPU: CPU layer norms refuse the bf16 parameters FSDP2's policy gives them."""
    return "no" if strategy == "fsdp" and device.type == "cpu" else "bf16"


def train_case(strategy: str, model_dir: Path, size: dict, device: torch.device, steps: int) -> tuple[float, float]:
    """samples/s and FLOPs per step of ``steps`` timed training steps (after 3 warm-up steps)."""
    precision = train_precision(strategy, device)
    cfg = as_config(
        {"model_name": str(model_dir), "retrieval_mode": "t2i", "strategy": strategy, "mixed_precision": precision}
    )
    torch.manual_seed(0)
    model = build_model(cfg)
    vocab = CLIPConfig.from_pretrained(model_dir).text_config.vocab_size
    if strategy == "fsdp":
        model = wrap_model(model, cfg, device)  # vembed's FSDP2 sharding per block, then the root
    else:
        model = torch.nn.parallel.DistributedDataParallel(
            model.to(device), device_ids=[device.index] if device.type == "cuda" else None
        )
    criterion = LossFactory.create(cfg).to(device)
    optimizer = build_optimizer(model, cfg, extra_modules=[criterion])
    batch = random_batch(size, vocab, device)

    # As vembed's Trainer: autocast for DDP; FSDP2 casts through its MixedPrecisionPolicy (bf16 parameters).
    autocast = strategy == "ddp" and precision == "bf16"
    amp = torch.autocast(device.type, dtype=torch.bfloat16) if autocast else contextlib.nullcontext()

    def step() -> None:
        with amp:
            loss = criterion(model(**batch), batch)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    counter = FlopCounterMode(display=False)
    with counter:
        step()
    for _ in range(2):
        step()
    sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        step()
    sync(device)
    return steps * size["batch"] / (time.perf_counter() - start), float(counter.get_total_flops())


@torch.inference_mode()
def embed_tensors(model_dir: Path, size: dict, device: torch.device, rounds: int) -> float:
    model = CLIPModel.from_pretrained(model_dir, torch_dtype=torch.bfloat16).to(device).eval()
    image = size["vision"][4]
    pixels = torch.randn(4 * size["batch"], 3, image, image, device=device, dtype=torch.bfloat16)
    model.get_image_features(pixel_values=pixels)
    sync(device)
    start = time.perf_counter()
    for _ in range(rounds):
        model.get_image_features(pixel_values=pixels)
    sync(device)
    return rounds * pixels.shape[0] / (time.perf_counter() - start)


def embed_jpegs(model_dir: Path, size: dict, device: torch.device, count: int, work: Path) -> float:
    from vembed.inference import VEmbedFactoryPredictor

    rng = np.random.default_rng(0)
    folder = work / "jpegs"
    folder.mkdir()
    paths = []
    for i in range(count):
        path = folder / f"{i:05d}.jpg"
        Image.fromarray(rng.integers(0, 256, (256, 256, 3), dtype=np.uint8)).save(path, quality=90)
        paths.append(str(path))
    predictor = VEmbedFactoryPredictor(model_dir, device=str(device), dtype="bfloat16")
    predictor.encode_image(paths[: size["batch"]], batch_size=size["batch"])  # warm-up
    start = time.perf_counter()
    predictor.encode_image(paths, batch_size=size["batch"])
    return count / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cpu", action="store_true", help="tiny sizes on CPU with gloo: a smoke run of this script")
    parser.add_argument("--steps", type=int, default=None, help="timed training steps (default 20; 2 with --cpu)")
    args = parser.parse_args()
    kind = "cpu" if args.cpu else "gpu"
    if not args.cpu and not torch.cuda.is_available():
        raise SystemExit("gpu_check: no CUDA device is visible; run with --cpu for the smoke mode")
    size = SIZES[kind]
    steps = args.steps or (2 if args.cpu else 20)
    device = torch.device("cpu") if args.cpu else torch.device("cuda", 0)
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = True
    init_process_group("gloo" if args.cpu else "nccl")
    work = Path(tempfile.mkdtemp(prefix="vembed-gpu-check-"))
    model_dir = make_model(work / "clip", size)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    measured = matmul_peak(device, torch.bfloat16, 8192 if device.type == "cuda" else 256)
    nominal = next((v * 1e12 for k, v in NOMINAL_BF16_DENSE_TFLOPS.items() if k in name), None)
    print(f"device: {name}; measured bf16 matmul peak {measured / 1e12:.1f} TFLOP/s", flush=True)
    print("| case | rate | MFU (nominal peak) | MFU (measured matmul peak) |\n|---|---|---|---|")
    for strategy in ("ddp", "fsdp"):
        rate, flops = train_case(strategy, model_dir, size, device, steps)
        achieved = rate / size["batch"] * flops
        mfu = f"{achieved / nominal:.1%}" if nominal else "-"
        precision = train_precision(strategy, device).replace("no", "fp32")
        row = f"| train {strategy}, {precision}, batch {size['batch']} | {rate:.1f} samples/s"
        print(f"{row} | {mfu} | {achieved / measured:.1%} |")
    tensors = embed_tensors(model_dir, size, device, rounds=steps)
    print(f"| embed decoded tensors, bf16 | {tensors:.0f} images/s | - | - |")
    jpegs = embed_jpegs(model_dir, size, device, count=8 * size["batch"] if not args.cpu else 16, work=work)
    print(f"| embed JPEG files (Predictor), bf16 | {jpegs:.0f} images/s | - | - |")
    print("reference: clip-retrieval, ViT-B/16 on one A100: about 1,100 images/s")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
