"""Configuration: three layers, validation at the edge, clear errors."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from vembed.config import (
    DEFAULTS_PATH,
    ConfigError,
    VEmbedConfig,
    as_config,
    load_and_parse_config,
    load_base_config,
    merge_configs,
)

pytestmark = pytest.mark.unit


def test_defaults_file_and_dataclass_hold_the_same_keys():
    raw = yaml.safe_load(DEFAULTS_PATH.read_text())
    assert set(raw) == set(VEmbedConfig.__dataclass_fields__)
    # every key has a one-line comment
    for line in DEFAULTS_PATH.read_text().splitlines():
        if re.match(r"^[a-z_0-9]+:", line):
            assert "#" in line, f"defaults.yaml key without a comment: {line}"


def test_every_key_is_read_somewhere_in_the_package():
    source = "\n".join(p.read_text() for p in (Path(__file__).parent.parent / "vembed").rglob("*.py"))
    source = source.replace((Path(__file__).parent.parent / "vembed" / "config.py").read_text(), "")
    unread = [k for k in VEmbedConfig.__dataclass_fields__ if not re.search(rf"(\.|\[\"|\"){k}\b", source)]
    assert not unread, f"keys in defaults.yaml that no module reads: {unread}"


def test_precedence_defaults_file_overrides(tmp_path):
    cfg_file = tmp_path / "run.yaml"
    cfg_file.write_text("learning_rate: 3.0e-4\nbatch_size: 8\nmodel_name: some/model\n")
    cfg = load_and_parse_config([str(cfg_file), "--config_override", "batch_size=16", "mrl_dims=[32, 64]"])
    assert cfg.learning_rate == pytest.approx(3e-4)  # file over defaults
    assert cfg.batch_size == 16  # override over file
    assert cfg.mrl_dims == [32, 64]  # YAML list parsed
    assert cfg.epochs == load_base_config().epochs  # untouched default
    assert cfg["model_name"] == "some/model" == cfg.model_name


def test_load_and_parse_config_without_file_reads_overrides_only():
    cfg = load_and_parse_config(["--config_override", "lr=0.5", "use_lora=true"])
    assert cfg.learning_rate == 0.5 and cfg.use_lora is True


def test_unquoted_no_from_yaml_means_the_choice_no(tmp_path):
    # YAML 1.1 reads `no` as false; for a key whose choices include "no" that is what the user meant.
    cfg = load_and_parse_config(["--config_override", "mixed_precision=no"])
    assert cfg.mixed_precision == "no"
    with pytest.raises(ConfigError, match="strategy"):
        as_config({"strategy": False})


def test_load_and_parse_config_reads_sys_argv(monkeypatch, tmp_path):
    monkeypatch.setattr("sys.argv", ["prog", "--config_override", "epochs=7"])
    assert load_and_parse_config().epochs == 7


def test_unknown_key_names_key_file_and_closest_key(tmp_path):
    cfg_file = tmp_path / "bad.yaml"
    cfg_file.write_text("learning_rat: 0.1\n")
    with pytest.raises(ConfigError) as err:
        load_and_parse_config([str(cfg_file)])
    msg = str(err.value)
    assert "learning_rat" in msg and str(cfg_file) in msg and "did you mean 'learning_rate'" in msg


def test_wrong_type_names_key_expected_type_and_value():
    with pytest.raises(ConfigError) as err:
        as_config({"batch_size": "lots"})
    msg = str(err.value)
    assert "batch_size" in msg and "int" in msg and "'lots'" in msg
    with pytest.raises(ConfigError, match="strategy.*'ddp' \\| 'fsdp'.*'zero3'"):
        as_config({"strategy": "zero3"})


def test_lr_and_learning_rate_are_one_key():
    assert as_config({"lr": 1e-3}).learning_rate == 1e-3
    assert as_config({"lr": 1e-3, "learning_rate": 1e-3}).learning_rate == 1e-3
    with pytest.raises(ConfigError, match="'lr' and 'learning_rate'"):
        as_config({"lr": 1e-3, "learning_rate": 2e-3})
    assert "lr" in as_config({}) and as_config({"lr": 0.25})["lr"] == 0.25


def test_dict_config_is_merged_over_defaults_and_validated():
    cfg = as_config({"model_name": "m", "use_lora": True, "lora_r": 16})
    assert cfg.lora_r == 16 and cfg.lora_alpha == load_base_config().lora_alpha
    merged = merge_configs(load_base_config(), {"epochs": 1})
    assert isinstance(merged, VEmbedConfig) and merged.epochs == 1
    assert merge_configs({"epochs": 2}, {"batch_size": 4}).epochs == 2


def test_mrl_weights_must_pair_with_dims():
    with pytest.raises(ConfigError, match="one weight per dim"):
        as_config({"mrl_dims": [8, 16], "mrl_weights": [1.0]})


def test_preprocess_tasks_is_null_or_at_least_one():
    assert as_config({"preprocess_tasks": 3}).preprocess_tasks == 3
    with pytest.raises(ConfigError, match="preprocess_tasks=0"):
        as_config({"preprocess_tasks": 0})


def test_resolved_config_round_trips_through_yaml(tmp_path):
    cfg = as_config({"epochs": 5, "column_mapping": {"caption": "query"}})
    path = cfg.save(tmp_path / "out" / "config.yaml")
    again = load_and_parse_config([str(path)])
    assert again == cfg


def test_missing_config_file_and_bad_override():
    with pytest.raises(FileNotFoundError, match="nope.yaml"):
        load_and_parse_config(["nope.yaml"])
    with pytest.raises(ConfigError, match="key=value"):
        load_and_parse_config(["--config_override", "epochs"])


def test_fsdp_with_fp16_is_refused_at_validation_pointing_to_bf16():
    # FSDP2 runs without a GradScaler: fp16 gradients would silently underflow, so the combination is refused.
    with pytest.raises(ConfigError, match=r"strategy: fsdp with mixed_precision: fp16.*use mixed_precision: bf16"):
        as_config({"strategy": "fsdp", "mixed_precision": "fp16"})
    assert as_config({"strategy": "fsdp", "mixed_precision": "bf16"}).mixed_precision == "bf16"
    assert as_config({"strategy": "ddp", "mixed_precision": "fp16"}).mixed_precision == "fp16"


def test_per_device_batch_size_is_per_worker_and_conflicts_are_errors(tmp_path):
    """``per_device_batch_size`` is what each worker gets (hand reference: per_device x workers records per global
    micro-batch), not another spelling of the global ``batch_size``."""
    from vembed.training.worker import local_batch_size

    cfg = as_config({"per_device_batch_size": 8, "num_workers": 2})
    assert (cfg.batch_size, local_batch_size(cfg, 2)) == (16, 8)
    cfg = cfg.replace(num_workers=4)  # e.g. train(num_workers=4) over the constructor's settings
    assert (cfg.batch_size, local_batch_size(cfg, 4)) == (32, 8)
    assert as_config({"per_device_batch_size": 8, "num_workers": 0}).batch_size == 8  # the driver-process loop
    assert as_config({"per_device_batch_size": 8, "batch_size": 16, "num_workers": 2}).batch_size == 16  # agree
    with pytest.raises(ConfigError, match=r"batch_size=64 .* per_device_batch_size=8 x num_workers=2 makes it 16"):
        as_config({"per_device_batch_size": 8, "batch_size": 64, "num_workers": 2})
    with pytest.raises(ConfigError, match="per_device_batch_size=0"):
        as_config({"per_device_batch_size": 0})
    later = cfg.replace(batch_size=12)  # a later global batch size wins over an earlier per-device one
    assert (later.batch_size, later.per_device_batch_size, local_batch_size(later, 4)) == (12, None, 3)
    cfg_file = tmp_path / "run.yaml"
    cfg_file.write_text("per_device_batch_size: 4\nnum_workers: 2\n")
    assert load_and_parse_config([str(cfg_file), "--config_override", "num_workers=3"]).batch_size == 12
    with pytest.raises(ValueError, match="resolved for num_workers=2"):
        local_batch_size(as_config({"per_device_batch_size": 8, "num_workers": 2}), 3)
