"""Configuration at the seed guide's import path ``vembed.training.config`` (implemented in :mod:`vembed.config`)."""

from vembed.config import VEmbedConfig, as_config, load_and_parse_config, load_base_config, merge_configs

__all__ = ["VEmbedConfig", "as_config", "load_and_parse_config", "load_base_config", "merge_configs"]
