"""Hydra config: where it lives, how it is composed, and what a valid one is.

Validation runs before anything is written or any process group is built, so a
bad config ends with one message naming the key, and nothing half-written.
"""

from __future__ import annotations

import os
from pathlib import Path

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from vkd_ds.errors import VkdError

CONFIG_NAME = "config"
# Keys older releases wrote into a run's config.yaml that no longer exist: dropped when such a run
# is read back (`vkd-ds eval RUN_DIR`). teacher.zero_stage: the teacher is always ZeRO-3.
REMOVED_KEYS = ("teacher.zero_stage",)
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
    if not _is_number(value) or (integer and not isinstance(value, int)):
        raise VkdError(f"config key `{key}` must be {kind}, got {value!r}")
    if low is not None and value < low:
        raise VkdError(f"config key `{key}` must be >= {low}, got {value}")
    if high is not None and value > high:
        raise VkdError(f"config key `{key}` must be <= {high}, got {value}")
    return value


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _bool(cfg: DictConfig, key: str) -> bool:
    value = _get(cfg, key)
    if not isinstance(value, bool):
        raise VkdError(f"config key `{key}` must be true or false, got {value!r}")
    return value


def valence_feeds_the_loss(cfg: DictConfig) -> bool:
    from vkd_ds.settings import valence_feeds_the_loss as feeds

    return feeds(float(cfg.loss.val), float(cfg.weighting.lam))


def needs_teacher_valence(cfg: DictConfig) -> bool:
    """The teacher's valence head is needed for L_val, non-uniform weights and the mercy gate."""
    return valence_feeds_the_loss(cfg) or bool(cfg.gate.enabled)


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

    _choice(cfg, "teacher.offload_param", OFFLOAD_DEVICES)
    if _get(cfg, "teacher.offload_param") == "nvme" and not _get(cfg, "teacher.nvme_path"):
        raise VkdError("config key `teacher.nvme_path` is required when teacher.offload_param=nvme")
    if _get(cfg, "student.path") is None and not isinstance(_get(cfg, "student.config"), DictConfig):
        raise VkdError("set `student.path` (a local Hugging Face directory) or `student.config` (a model config)")

    from vkd_ds.terms import TERM_NAMES

    for term in TERM_NAMES:
        _number(cfg, f"loss.{term}", low=0.0)
    if sum(_get(cfg, f"loss.{term}") for term in TERM_NAMES) <= 0:
        raise VkdError("config keys `loss.*`: every loss weight is 0, there is nothing to train")
    from vkd_ds.losses import DIVERGENCES

    _choice(cfg, "loss.divergence", tuple(DIVERGENCES))
    _number(cfg, "loss.temperature", low=1e-3)
    _number(cfg, "loss.chunk_tokens", low=1, integer=True)
    _bool(cfg, "loss.fused_head")

    layer_map = _get(cfg, "feat.layer_map")
    if layer_map != "uniform" and not isinstance(layer_map, ListConfig):
        raise VkdError(
            f"config key `feat.layer_map` must be `uniform` or a list of [student, teacher] pairs; got {layer_map!r}"
        )
    _bool(cfg, "feat.projectors")
    _bool(cfg, "feat.normalize")
    _number(cfg, "feat.attention", low=0.0)
    patterns = _get(cfg, "reg.param_patterns")
    if not isinstance(patterns, ListConfig) or not all(isinstance(p, str) for p in patterns):
        raise VkdError("config key `reg.param_patterns` must be a list of glob patterns (strings)")
    _number(cfg, "reg.contrastive", low=0.0)
    _number(cfg, "reg.contrastive_temperature", low=1e-6)

    _number(cfg, "weighting.lam", low=0.0)
    _number(cfg, "weighting.z_max", low=0.0, allow_none=True)
    _bool(cfg, "weighting.normalize")
    _number(cfg, "weighting.eps", low=0.0)
    alphas = _get(cfg, "weighting.alphas")
    if not isinstance(alphas, ListConfig) or len(alphas) != 4 or not all(_is_number(a) for a in alphas):
        raise VkdError(f"config key `weighting.alphas` must be a list of 4 numbers; got {alphas!r}")
    _number(cfg, "valence.k", low=1, integer=True)
    head = _get(cfg, "valence.teacher_head")
    if needs_teacher_valence(cfg) and not head:
        raise VkdError(
            "config key `valence.teacher_head` is required when loss.val > 0, weighting.lam > 0 or gate.enabled: "
            "fit one with `vkd-ds fit-valence-head`, or set loss.val=0 weighting.lam=0 gate.enabled=false"
        )
    if head and not Path(head).is_file():
        raise VkdError(f"config key `valence.teacher_head`: file not found: {head}")

    _number(cfg, "seq_kd.every_n_steps", low=1, integer=True)
    n_gen = _number(cfg, "seq_kd.n_gen", low=1, integer=True)
    if n_gen >= _get(cfg, "data.max_seq_len"):
        raise VkdError(
            f"config key `seq_kd.n_gen` ({n_gen}) must be below data.max_seq_len ({_get(cfg, 'data.max_seq_len')}): "
            "prompt + generated tokens must fit in data.max_seq_len"
        )
    _number(cfg, "seq_kd.prompt_tokens", low=1, integer=True)
    _number(cfg, "seq_kd.temperature", low=1e-3)
    top_p = _number(cfg, "seq_kd.top_p", high=1.0)
    if top_p <= 0:
        raise VkdError(f"config key `seq_kd.top_p` must be in (0, 1], got {top_p}")
    from vkd_ds.gate import GATE_MODES
    from vkd_ds.rollout import GATHER_MODES
    from vkd_ds.seq_kd import BASELINES, REWARDS

    _choice(cfg, "seq_kd.reward", REWARDS)
    _choice(cfg, "seq_kd.baseline", BASELINES)
    _number(cfg, "seq_kd.baseline_decay", low=0.0, high=1.0)
    _choice(cfg, "rollout.gather_student", GATHER_MODES)

    _bool(cfg, "gate.enabled")
    _choice(cfg, "gate.mode", GATE_MODES)
    if _get(cfg, "gate.enabled") and _get(cfg, "gate.mode") == "proxy" and not _get(cfg, "loss.val") > 0:
        raise VkdError(
            "gate.mode=proxy projects the student's valence, and the student has a valence head only "
            "when loss.val > 0: set loss.val > 0 or gate.mode=lookahead"
        )
    _number(cfg, "gate.ratio", low=0.0)
    _number(cfg, "gate.proxy_factor", low=0.0)
    steps = _number(cfg, "gate.rollout_steps", low=1, integer=True)
    if steps >= _get(cfg, "data.max_seq_len"):
        raise VkdError(f"config key `gate.rollout_steps` ({steps}) must be below data.max_seq_len")
    _number(cfg, "gate.probe_size", low=1, integer=True)
    _number(cfg, "gate.baseline_every", low=0, integer=True)
    _number(cfg, "gate.max_consecutive_rejections", low=0, integer=True)

    _bool(cfg, "metrics.tensorboard")
    project = _get(cfg, "metrics.wandb_project")
    if project is not None:
        import importlib.util

        if not isinstance(project, str) or not project:
            raise VkdError(f"config key `metrics.wandb_project` must be a project name or null, got {project!r}")
        if importlib.util.find_spec("wandb") is None:
            raise VkdError("config key `metrics.wandb_project` is set but wandb is not installed (pip install wandb)")

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
    signals = _get(cfg, "trainer.preempt_signals")
    import signal

    if not isinstance(signals, ListConfig) or not all(isinstance(getattr(signal, str(n), None), int) for n in signals):
        raise VkdError(
            f"config key `trainer.preempt_signals` must be a list of signal names (e.g. SIGUSR1); got {signals}"
        )
    _choice(cfg, "trainer.requeue", ("auto", "never"))
    _bool(cfg, "eval_only")
    _bool(cfg, "trainer.keep_freed_memory")
    _bool(cfg, "trainer.time_phases")
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


def to_yaml(cfg: DictConfig | dict) -> str:
    return OmegaConf.to_yaml(cfg, resolve=True) if isinstance(cfg, DictConfig) else OmegaConf.to_yaml(cfg)
