"""Shared fixtures: one local Ray instance per session, tiny real HF models, a synthetic data set."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# Keep every test offline and on this machine (DESIGN.md: "Keep test traffic on this machine").
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Serve's overload 503 in JSON (vembed.serving.overload), as `vembed serve` and the cluster image set it
os.environ.setdefault("RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH", "vembed.serving.overload:proxy_middlewares")

# Logical CPUs of the session's Ray instance: more than the machine's 2 cores, so a Ray Train run (workers + the
# Ray Data read and preprocessing tasks of its train and val pipelines) never waits on a CPU slot that
# an earlier test's lingering actor still holds.
RAY_NUM_CPUS = int(os.environ.get("VEMBED_TEST_RAY_CPUS", "8"))


# The files whose tests take longest, slowest first. `make test` runs the suite in two processes, one file at a time
# each and in collection order (`-n 2 --dist loadfile --no-loadscope-reorder`): started first, these run beside
# the many short files instead of alone at the end.
SLOWEST_FILES = (
    "test_cluster.py",
    "test_training_distributed.py",
    "test_seed_guide.py",
    "test_evaluate_cli.py",
    "test_resume_fault.py",
    "test_batch_embed.py",
    "test_multivector.py",
    "test_serving.py",
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Collect :data:`SLOWEST_FILES` first (a stable sort: the order inside each file is kept)."""
    rank = {name: position for position, name in enumerate(SLOWEST_FILES)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))


@pytest.fixture(scope="session")
def ray_local():
    """One local Ray instance for the whole session (127.0.0.1 only, no dashboard)."""
    import ray

    for attempt in (1, 2):  # a heavily loaded machine can miss Ray's node start-up deadline once
        try:
            if not ray.is_initialized():
                ray.init(
                    address="local",  # never attach to a cluster another test (or `ray start`) left running
                    num_cpus=RAY_NUM_CPUS,
                    include_dashboard=False,
                    log_to_driver=False,
                    configure_logging=False,
                    runtime_env={"env_vars": {"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}},
                )
            break
        except Exception:
            ray.shutdown()
            if attempt == 2:
                raise
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def tiny_models_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("tiny_models")


@pytest.fixture(scope="session")
def tiny_clip_dir(tiny_models_dir) -> Path:
    from vembed.testing import make_tiny_clip

    return make_tiny_clip(tiny_models_dir / "clip")


@pytest.fixture(scope="session")
def tiny_siglip_dir(tiny_models_dir) -> Path:
    from vembed.testing import make_tiny_siglip

    return make_tiny_siglip(tiny_models_dir / "siglip")


@pytest.fixture(scope="session")
def tiny_bert_dir(tiny_models_dir) -> Path:
    from vembed.testing import make_tiny_bert

    return make_tiny_bert(tiny_models_dir / "bert")


@pytest.fixture(scope="session")
def tiny_vit_dir(tiny_models_dir) -> Path:
    from vembed.testing import make_tiny_vit

    return make_tiny_vit(tiny_models_dir / "vit")


@pytest.fixture(scope="session")
def tiny_qwen3_vl_dir(tiny_models_dir) -> Path:
    from vembed.testing import make_tiny_qwen3_vl

    return make_tiny_qwen3_vl(tiny_models_dir / "qwen3_vl")


@pytest.fixture(scope="session")
def tiny_colqwen_dir(tiny_qwen3_vl_dir, tiny_models_dir) -> Path:
    """The tiny Qwen3-VL saved as an untrained ColQwen-style model: its content tokens' states through a 16-d head
    (``pooling_method: none``, ``vector_tokens: content``)."""
    import torch

    from vembed.model import EmbeddingModel

    torch.manual_seed(0)
    model = EmbeddingModel.from_pretrained(
        str(tiny_qwen3_vl_dir), pooling_method="none", projection_dim=16, vector_tokens="content"
    )
    return model.save_pretrained(tiny_models_dir / "colqwen")


@pytest.fixture(scope="session")
def tiny_qwen3_embedding_dir(tiny_models_dir) -> Path:
    from vembed.testing import make_tiny_qwen3_embedding

    return make_tiny_qwen3_embedding(tiny_models_dir / "qwen3_embedding")


@pytest.fixture(scope="session")
def shapes_t2i(tmp_path_factory) -> dict[str, Path]:
    """A small t2i data set (JSONL, CSV and Parquet records + JPEGs), shared read-only by tests."""
    from vembed.testing import make_shapes_dataset

    return make_shapes_dataset(
        tmp_path_factory.mktemp("shapes_t2i"),
        num_train=64,
        num_val=16,
        num_test=16,
        formats=("jsonl", "csv", "parquet"),
    )


@pytest.fixture(scope="session")
def trained_clip(tmp_path_factory, tiny_clip_dir) -> dict[str, Path]:
    """The tiny CLIP fine-tuned in-process on a synthetic t2i set; shared by tests that need a *learned* model.

    Returns ``{"model": checkpoint dir, "base": untrained dir, "test": held-out records, "train": records}``.
    """
    import torch
    from torch.utils.data import DataLoader

    from vembed.data.dataset import VisualRetrievalDataset
    from vembed.data.registry import CollatorRegistry
    from vembed.losses.factory import LossFactory
    from vembed.testing import make_shapes_dataset
    from vembed.training.model_builder import build_model, load_processor
    from vembed.training.optimizer_builder import build_optimizer
    from vembed.training.training_loop import Trainer

    root = tmp_path_factory.mktemp("trained_clip")
    data = make_shapes_dataset(root / "data", num_train=384, num_val=8, num_test=48, seed=1)
    config = {
        "model_name": str(tiny_clip_dir),
        "epochs": 6,
        "batch_size": 32,
        "learning_rate": 2e-3,
        "temperature": 0.1,
        "output_dir": str(root / "out"),
        "logging_steps": 1000,
    }
    torch.manual_seed(0)
    model = build_model(config)
    processor = load_processor(str(tiny_clip_dir))
    dataset = VisualRetrievalDataset(str(data["train"]), processor, mode="train")
    collate = CollatorRegistry.get("default")(processor=processor, mode="train")
    loader = DataLoader(dataset, batch_size=32, shuffle=True, collate_fn=collate, drop_last=True)
    criterion = LossFactory.create(config)
    optimizer = build_optimizer(model, config)
    Trainer(model=model, optimizer=optimizer, dataloader=loader, criterion=criterion, config=config).train()
    return {
        "model": root / "out" / "checkpoint-epoch-6",
        "base": tiny_clip_dir,
        "test": data["test"],
        "train": data["train"],
    }
