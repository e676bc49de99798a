"""Hydra config: where it lives and how it is composed.

What a valid config is lives with the typed settings (vkd_ds/settings.py), which check it before
anything is written or any process group is built.
"""

from __future__ import annotations

import os
from pathlib import Path

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from vkd_ds.errors import VkdError

CONFIG_NAME = "config"
# Keys older releases wrote into a run's config.yaml that no longer exist: dropped when such a run
# is read back (`vkd-ds eval RUN_DIR`). teacher.zero_stage: it did nothing (the teacher's placement
# is teacher.layout now).
REMOVED_KEYS = ("teacher.zero_stage",)


def config_dir() -> Path:
    """The repository's `configs/` (override with VKD_CONFIG_DIR)."""
    override = os.environ.get("VKD_CONFIG_DIR")
    if override:
        return Path(override).resolve()
    return Path(__file__).resolve().parent.parent / "configs"


def compose(overrides: list[str]) -> DictConfig:
    """Compose the config as `launcher/train.py` would, for in-process use."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.errors import HydraException

    try:
        with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
            return hydra_compose(config_name=CONFIG_NAME, overrides=list(overrides))
    except (HydraException, OmegaConfBaseException) as err:
        raise VkdError(f"bad config override: {err}") from None


def check_global_batch(cfg: DictConfig, world_size: int) -> int:
    """The global batch (sequences per optimizer step); checks trainer.global_batch_size if given."""
    micro, accum = cfg.trainer.micro_batch_size, cfg.trainer.grad_accum
    derived = micro * accum * world_size
    wanted = cfg.trainer.global_batch_size
    if wanted is not None and wanted != derived:
        raise VkdError(
            f"trainer.global_batch_size={wanted} does not match trainer.micro_batch_size ({micro}) "
            f"x trainer.grad_accum ({accum}) x world size ({world_size}) = {derived}"
        )
    return derived


def to_yaml(cfg: DictConfig | dict) -> str:
    return OmegaConf.to_yaml(cfg, resolve=True) if isinstance(cfg, DictConfig) else OmegaConf.to_yaml(cfg)
