"""Hydra config: where it lives, how it is composed, and what a valid one is.

Validation runs before anything is written or any process group is built, so a
bad config ends with one message naming the key, and nothing half-written.
"""

from __future__ import annotations

import os
from pathlib import Path

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from vkd_ds.errors import VkdError

CONFIG_NAME = "config"
# Loss terms whose machinery is not built yet: a non-zero weight is refused
# rather than silently ignored.
UNIMPLEMENTED_TERMS = ("feat", "seq", "val", "reg")
LOSS_TERMS = ("ce", "soft", "feat", "seq", "val", "reg")
OFFLOAD_DEVICES = ("none", "cpu", "nvme")


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


def _get(cfg: DictConfig, key: str):
    try:
        return OmegaConf.select(cfg, key, throw_on_missing=True)
    except OmegaConfBaseException as err:
        msg = str(err).splitlines()[0]
        if "Missing mandatory value" in msg:
            raise VkdError(f"config key `{key}` is required (set it with {key}=...)") from None
        raise VkdError(f"config key `{key}`: {msg}") from None


def _number(cfg: DictConfig, key: str, *, low=None, high=None, integer=False, allow_none=False):
    value = _get(cfg, key)
    if value is None and allow_none:
        return None
    kind = "an integer" if integer else "a number"
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (integer and not isinstance(value, int)):
        raise VkdError(f"config key `{key}` must be {kind}, got {value!r}")
    if low is not None and value < low:
        raise VkdError(f"config key `{key}` must be >= {low}, got {value}")
    if high is not None and value > high:
        raise VkdError(f"config key `{key}` must be <= {high}, got {value}")
    return value


def _choice(cfg: DictConfig, key: str, choices) -> str:
    value = _get(cfg, key)
    if value not in choices:
        raise VkdError(f"config key `{key}` must be one of {', '.join(map(str, choices))}; got {value!r}")
    return value


def validate(cfg: DictConfig) -> None:
    """Check every key the trainer reads; raise VkdError naming the first bad one."""
    for key in ("teacher.path", "data.train_path", "run.dir"):
        if not _get(cfg, key):
            raise VkdError(f"config key `{key}` is required (set it with {key}=...)")
    _get(cfg, "data.valid_path")
    _get(cfg, "data.tokenizer_path")
    _number(cfg, "data.max_seq_len", low=2, integer=True)

    _number(cfg, "teacher.zero_stage", low=3, high=3, integer=True)
    _choice(cfg, "teacher.offload_param", OFFLOAD_DEVICES)
    if _get(cfg, "teacher.offload_param") == "nvme" and not _get(cfg, "teacher.nvme_path"):
        raise VkdError("config key `teacher.nvme_path` is required when teacher.offload_param=nvme")
    if _get(cfg, "student.path") is None and not isinstance(_get(cfg, "student.config"), DictConfig):
        raise VkdError("set `student.path` (a local Hugging Face directory) or `student.config` (a model config)")

    for term in LOSS_TERMS:
        _number(cfg, f"loss.{term}", low=0.0)
    for term in UNIMPLEMENTED_TERMS:
        if _get(cfg, f"loss.{term}") > 0:
            raise VkdError(f"config key `loss.{term}`: this loss term is not implemented yet; set loss.{term}=0")
    if _get(cfg, "loss.ce") + _get(cfg, "loss.soft") <= 0:
        raise VkdError("config keys `loss.*`: every loss weight is 0, there is nothing to train")
    _number(cfg, "loss.temperature", low=1e-3)
    _number(cfg, "loss.chunk_tokens", low=1, integer=True)

    _number(cfg, "deepspeed.zero_stage", low=0, high=3, integer=True)
    _choice(cfg, "deepspeed.offload_optimizer", OFFLOAD_DEVICES)
    if _get(cfg, "deepspeed.offload_optimizer") == "nvme" and not _get(cfg, "deepspeed.nvme_path"):
        raise VkdError("config key `deepspeed.nvme_path` is required when deepspeed.offload_optimizer=nvme")
    if _get(cfg, "deepspeed.offload_optimizer") != "none" and _get(cfg, "deepspeed.zero_stage") == 0:
        raise VkdError("config key `deepspeed.offload_optimizer` needs deepspeed.zero_stage >= 1")
    _choice(cfg, "deepspeed.precision", ("auto", "bf16", "fp32"))
    if not isinstance(_get(cfg, "deepspeed.extra"), DictConfig):
        raise VkdError("config key `deepspeed.extra` must be a mapping of DeepSpeed JSON keys")

    _number(cfg, "trainer.max_steps", low=1, integer=True)
    _number(cfg, "trainer.micro_batch_size", low=1, integer=True)
    _number(cfg, "trainer.grad_accum", low=1, integer=True)
    _number(cfg, "trainer.global_batch_size", low=1, integer=True, allow_none=True)
    _number(cfg, "trainer.lr", low=0.0)
    _number(cfg, "trainer.min_lr_ratio", low=0.0, high=1.0)
    _number(cfg, "trainer.warmup_steps", low=0, integer=True)
    _number(cfg, "trainer.weight_decay", low=0.0)
    _number(cfg, "trainer.grad_clip", low=0.0)
    _number(cfg, "trainer.seed", integer=True)
    _number(cfg, "trainer.save_every", low=0, integer=True)
    _number(cfg, "trainer.keep_checkpoints", low=1, integer=True)
    _number(cfg, "trainer.eval_every", low=0, integer=True)
    _number(cfg, "trainer.eval_max_batches", low=1, integer=True, allow_none=True)
    _number(cfg, "trainer.log_every", low=1, integer=True)
    _number(cfg, "trainer.stop_after_steps", low=1, integer=True, allow_none=True)
    _number(cfg, "num_procs", low=1, integer=True)
    resume = _get(cfg, "resume")
    if resume not in ("auto", "never") and not (isinstance(resume, str) and Path(resume).is_dir()):
        raise VkdError(f"config key `resume` must be auto, never or an existing checkpoint directory; got {resume!r}")


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


def to_yaml(cfg: DictConfig) -> str:
    return OmegaConf.to_yaml(cfg, resolve=True)
