"""Ray Train runs: 2-worker DDP and FSDP2 steps equal a single-process step; bad input fails clearly.

The reference step is written out here in one process: the whole global batch (hard negatives included), the
loss over every candidate, clipping by the global gradient norm and AdamW. The distributed runs split the batch
over two workers that gather each other's candidates, so any error in gathering, gradient averaging (DDP, FSDP2
reduce-scatter over gloo, the loss's own temperature) or sharded clipping shows up as a weight difference.

AdamW's first step is ``lr * g / (|g| + eps)``; with ``eps`` and ``lr`` both 1000 that is ``g`` itself, so the
comparison sees the gradients' scale (with a small eps it would only see their signs).
"""

from __future__ import annotations

import json
import os
import re

import pytest
import torch
from torch.utils.data import DataLoader

from vembed.config import ConfigError
from vembed.data.batching import BadRecordError
from vembed.data.dataset import VisualRetrievalDataset
from vembed.data.readers import EmptyDatasetError, RecordFileError
from vembed.losses.factory import LossFactory
from vembed.model import EmbeddingModel
from vembed.testing import make_shapes_dataset
from vembed.training.config import as_config
from vembed.training.launcher import build_trainer, local_ray_cpus, run_training
from vembed.training.model_builder import build_model, load_processor
from vembed.training.optimizer_builder import build_optimizer

pytestmark = pytest.mark.ray


@pytest.fixture(scope="module")
def one_batch(tmp_path_factory):
    """Exactly one global batch: 8 t2i records with one hard negative each."""
    return make_shapes_dataset(
        tmp_path_factory.mktemp("one_batch"), num_train=8, num_val=0, num_test=0, num_negatives=1, seed=3
    )


def _config(tiny_clip_dir, data, tmp_path, **overrides):
    return as_config(
        {
            "model_name": str(tiny_clip_dir),
            "data_path": str(data["train"]),
            "output_dir": str(tmp_path / "out"),
            "epochs": 1,
            "batch_size": 8,
            "num_workers": 2,
            "torch_threads": 1,
            "learning_rate": 1000.0,
            "adam_epsilon": 1000.0,
            "weight_decay": 0.0,
            "scheduler_type": "constant",
            "learnable_temperature": True,
            "temperature": 0.1,
            "max_grad_norm": 1.0,
            "max_failures": 0,
            "mixed_precision": "no",
            **overrides,
        }
    )


def _reference_step(cfg, data, steps=1):
    """``steps`` AdamW steps on the whole batch in this process, clipping by the global norm."""
    torch.manual_seed(cfg.seed)
    model = build_model(cfg)
    criterion = LossFactory.create(cfg)
    optimizer = build_optimizer(model, cfg, extra_modules=[criterion])
    dataset = VisualRetrievalDataset(data["train"], load_processor(cfg.model_name), retrieval_mode=cfg.retrieval_mode)
    (batch,) = DataLoader(dataset, batch_size=len(dataset), collate_fn=dataset.collator())
    if "negative_image_grid_thw" in batch:  # vlm: negatives are sequences [B, K, L] with flat patches
        assert batch["negative_input_ids"].shape[:2] == (8, 1) and batch["negative_image_grid_thw"].shape[0] == 8
    elif cfg.retrieval_mode == "t2i":
        assert batch["negative_pixel_values"].shape[:2] == (8, 1)
    for step in range(steps):
        loss = criterion(model(**batch), batch)
        loss.backward()
        params = [p for g in optimizer.param_groups for p in g["params"]]
        norm = torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
        if step == 0:
            assert norm > cfg.max_grad_norm  # clipping is active, so the global norm must be right too
        optimizer.step()
        optimizer.zero_grad()
    return model, criterion


@pytest.mark.parametrize(
    "strategy, model_fixture",
    [("ddp", "tiny_clip_dir"), ("fsdp", "tiny_clip_dir"), ("ddp", "tiny_qwen3_vl_dir"), ("fsdp", "tiny_qwen3_vl_dir")],
)
def test_two_workers_take_the_same_step_as_one_process(
    strategy, model_fixture, request, ray_local, one_batch, tmp_path
):
    """The Qwen3-VL runs also cover the VLM's Ray Data rows (ragged patches collated in the worker, against the
    in-process collator of the reference) and FSDP2 units for its decoder layers and vision blocks."""
    model_dir = request.getfixturevalue(model_fixture)
    cfg = _config(model_dir, one_batch, tmp_path, strategy=strategy, torch_threads=0)
    result = run_training(cfg)
    assert result.error is None
    assert result.metrics["world_size"] == 2 and result.metrics["step"] == 1
    assert len(result.metrics["worker_node_ids"]) == 2
    # torch_threads 0: this node's cores shared by its two workers (not Ray's OMP_NUM_THREADS=1)
    assert result.metrics["torch_threads"] == max(1, len(os.sched_getaffinity(0)) // 2)

    reference, _ = _reference_step(cfg, one_batch)
    trained = EmbeddingModel.from_pretrained(tmp_path / "out" / "checkpoint-epoch-1")
    assert trained.family == ("vlm" if model_fixture == "tiny_qwen3_vl_dir" else "dual")
    start = build_model(cfg).state_dict()
    ref_state, got_state = reference.state_dict(), trained.state_dict()
    moved = max(float((ref_state[k] - start[k]).abs().max()) for k in ref_state)
    assert moved > 1e-3, "the reference step must move the weights for the comparison to mean anything"
    worst = max(float((ref_state[k] - got_state[k]).abs().max()) for k in ref_state)
    assert worst < 1e-5, f"{strategy}: max weight difference {worst:.3g} vs the single-process step"

    with result.checkpoint.as_directory() as directory:
        loss_state = torch.load(f"{directory}/module_loss.pt", weights_only=True)
        progress = json.loads(open(f"{directory}/trainer_state.json").read())
    assert progress == {"epoch": 1, "batches_done": 0, "step": 1}
    assert set(loss_state) <= {"logit_scale.log_scale"}  # the loss's own copy: unused, the model holds the scale
    expected_scale = reference.logit_parameters.logit_scale.log_scale.detach()  # trained in the model (DDP / FSDP2)
    assert abs(float(expected_scale) - float(start["logit_parameters.logit_scale.log_scale"])) > 1e-3
    torch.testing.assert_close(trained.logit_parameters.logit_scale.log_scale, expected_scale, atol=1e-5, rtol=0)


@pytest.mark.parametrize("mode", ["i2i", "t2t"])
def test_ddp_on_a_dual_model_trains_single_tower_modes_past_step_two(
    mode, ray_local, tiny_clip_dir, tmp_path_factory, tmp_path
):
    # i2i and t2t never run one of CLIP's towers; DDP failed at step 2 ("Expected to have finished reduction in the
    # prior iteration") until the unused tower was frozen before wrapping. Two epochs of one global batch: two
    # steps, compared with two single-process steps on the whole batch.
    data = make_shapes_dataset(tmp_path_factory.mktemp(mode), num_train=8, num_val=0, num_test=0, mode=mode, seed=4)
    cfg = _config(tiny_clip_dir, data, tmp_path, retrieval_mode=mode, epochs=2, logging_steps=1)
    result = run_training(cfg)
    assert result.error is None
    assert result.metrics["world_size"] == 2 and result.metrics["step"] == 2

    reference, _ = _reference_step(cfg, data, steps=2)
    trained = EmbeddingModel.from_pretrained(tmp_path / "out" / "checkpoint-epoch-2")
    start = build_model(cfg).state_dict()
    ref_state, got_state = reference.state_dict(), trained.state_dict()
    unused = "backbone.text_model." if mode == "i2i" else "backbone.vision_model."
    untouched = [k for k in ref_state if unused in k]
    assert untouched and all(torch.equal(got_state[k], start[k]) for k in untouched), "the unused tower is frozen"
    assert max(float((ref_state[k] - start[k]).abs().max()) for k in ref_state) > 1e-3
    worst = max(float((ref_state[k] - got_state[k]).abs().max()) for k in ref_state)
    assert worst < 1e-5, f"{mode}: max weight difference {worst:.3g} vs two single-process steps"


def test_more_workers_than_the_cluster_has_is_a_clear_error(ray_local, tiny_clip_dir, one_batch, tmp_path):
    cpus = int(ray_local.cluster_resources()["CPU"])
    with pytest.raises(ConfigError, match=rf"num_workers=64 needs 64 CPU .* cluster has {cpus}"):
        run_training(_config(tiny_clip_dir, one_batch, tmp_path, num_workers=64))
    # One CPU left is not enough: the data pipeline needs a read task and a preprocessing task.
    with pytest.raises(ConfigError, match=r"would leave 1 of .* CPUs for the Ray Data preprocessing .* needs 2"):
        run_training(_config(tiny_clip_dir, one_batch, tmp_path, num_workers=cpus - 1))


def test_autoscaling_cluster_skips_the_size_check_and_placement_is_passed_on(
    ray_local, tiny_clip_dir, one_batch, tmp_path
):
    # On an autoscaling cluster the nodes that will host the workers are not up yet: no error, Ray Train waits.
    cfg = _config(tiny_clip_dir, one_batch, tmp_path, num_workers=64, wait_for_resources=True)
    trainer = build_trainer(cfg.replace(placement_strategy="SPREAD"))
    assert trainer.scaling_config.num_workers == 64
    assert trainer.scaling_config.placement_strategy == "SPREAD"


def test_a_local_ray_started_for_training_has_room_for_the_workers_and_the_data_pipeline():
    # `vembed train` on a 2-core laptop with num_workers=4: the local instance it starts gets 4 + 2 logical CPUs.
    cores = os.cpu_count() or 1
    assert local_ray_cpus(as_config({"num_workers": 4})) == max(cores, 6)
    assert local_ray_cpus(as_config({"num_workers": 3, "resources_per_worker": {"CPU": 4}})) == max(cores, 14)
    assert local_ray_cpus(as_config({"num_workers": 0})) == cores
    # GPU workers reserve no CPU unless asked: the pipeline's 2 are what a local instance must have beyond them.
    assert local_ray_cpus(as_config({"num_workers": 8, "use_gpu": True})) == max(cores, 2)


def test_empty_and_malformed_data_fail_before_training(ray_local, tiny_clip_dir, one_batch, tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(EmptyDatasetError, match="empty"):
        run_training(_config(tiny_clip_dir, {"train": empty}, tmp_path))

    lines = one_batch["train"].read_text().splitlines()
    lines[2] = lines[2][:-5]  # cut the closing part of line 3's JSON
    broken = tmp_path / "broken.jsonl"
    broken.write_text("\n".join(lines) + "\n")
    with pytest.raises(RecordFileError, match=r"broken\.jsonl:line 3"):
        run_training(_config(tiny_clip_dir, {"train": broken}, tmp_path))


def test_missing_image_fails_the_run_under_on_bad_record_fail(ray_local, tiny_clip_dir, one_batch, tmp_path):
    records = [json.loads(line) for line in one_batch["train"].read_text().splitlines()]
    records[5]["positive"] = str(tmp_path / "no_such_image.jpg")
    data = tmp_path / "missing.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    # In-process loop (num_workers=0): the same Ray Data pipeline and worker loop, without a worker-group start.
    cfg = _config(tiny_clip_dir, {"train": data}, tmp_path, num_workers=0, on_bad_record="fail")
    with pytest.raises(BadRecordError, match="no_such_image.jpg") as info:
        run_training(cfg)
    # the record's message alone: no Ray Data retry note ("Failed to apply UDF transform after 1/1 attempts ...")
    assert str(info.value).endswith("(set on_bad_record: skip to drop such records)"), str(info.value)


_TWO_RUNS_IN_ONE_PROCESS = """
import json, os, sys
from vembed.trainer import VEmbedFactoryTrainer

model, data, bad_data, out = sys.argv[1:5]
cores = os.cpu_count() or 1
trainer = VEmbedFactoryTrainer(model, batch_size=8, epochs=1, torch_threads=1, max_failures=0)
first = trainer.train(data, out + "/first")  # a local Ray sized for 1 worker: max(cores, 3) CPUs
print("FIRST", first.metrics["world_size"])
try:  # 2 workers of `cores` CPUs each need more than the first instance has; a bad record fails the workers
    trainer.train(bad_data, out + "/second", num_workers=2, resources_per_worker={"CPU": cores},
                  on_bad_record="fail")
except Exception as exc:
    print("SECOND", json.dumps({"type": type(exc).__name__, "message": str(exc)}))
"""


def test_one_process_trains_twice_with_more_workers_and_a_bad_record_is_reported_alone(
    tiny_clip_dir, one_batch, tmp_path
):
    """A notebook: ``train()`` with 1 worker, then with 2 workers needing more CPUs than the local Ray vembed started
    for the first run: the second run must get its workers (here they fail on a missing image, which also shows
    item 15's point: the worker's ``BadRecordError`` reaches the caller as itself, its message alone, not inside
    Ray Train's ``WorkerGroupError`` stack trace). A fresh process, because the session's Ray is the caller's."""
    import subprocess
    import sys

    records = [json.loads(line) for line in one_batch["train"].read_text().splitlines()]
    records[5]["positive"] = str(tmp_path / "no_such_image.jpg")
    bad = tmp_path / "bad.jsonl"
    bad.write_text("".join(json.dumps(r) + "\n" for r in records))
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    done = subprocess.run(
        [sys.executable, "-c", _TWO_RUNS_IN_ONE_PROCESS, str(tiny_clip_dir), str(one_batch["train"]), str(bad),
         str(tmp_path)],
        capture_output=True, text=True, timeout=600, env=env,
    )  # fmt: skip
    lines = {line.split(" ", 1)[0]: line.split(" ", 1)[1] for line in done.stdout.splitlines() if " " in line}
    assert lines.get("FIRST") == "1", done.stderr[-3000:]
    assert "SECOND" in lines, done.stderr[-3000:]
    second = json.loads(lines["SECOND"])
    assert second["type"] == "BadRecordError", second
    assert re.fullmatch(r"bad record 't2i-000005' at .*bad\.jsonl:line 6: positive image .*no_such_image\.jpg.*"
                        r"\(set on_bad_record: skip to drop such records\)", second["message"]), second  # fmt: skip
