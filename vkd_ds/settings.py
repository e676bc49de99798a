"""Typed, frozen settings: the composed Hydra config, checked and converted once.

`Settings.from_config(cfg)` runs every check of config.py (one message naming the first bad key)
and returns plain frozen dataclasses whose fields are the config's keys (`settings.trainer.lr` is
`trainer.lr`): lists become tuples, mappings dicts, and nothing below train.py sees the DictConfig.
A new config key is a field here, its default in configs/, its check in config.validate, and a row
in the README's config table.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf


@dataclass(frozen=True)
class TeacherSettings:
    path: str | None  # null only where nothing needs the teacher's weights (never today)
    offload_param: str  # none | cpu | nvme
    nvme_path: str | None


@dataclass(frozen=True)
class StudentSettings:
    path: str | None
    config: dict | None  # a transformers model config (model_type and sizes), when path is null


@dataclass(frozen=True)
class DataSettings:
    train_path: str
    valid_path: str | None
    tokenizer_path: str | None
    max_seq_len: int


@dataclass(frozen=True)
class LossSettings:
    weights: dict[str, float]  # λ of every term of vkd_ds.terms.TERMS, keyed by its name (loss.<name>)
    divergence: str  # the soft term's (losses.DIVERGENCES)
    temperature: float
    chunk_tokens: int
    fused_head: bool

    @classmethod
    def from_node(cls, node: DictConfig) -> LossSettings:
        from vkd_ds.terms import TERM_NAMES

        return cls(
            weights={name: float(node[name]) for name in TERM_NAMES},
            divergence=str(node.divergence),
            temperature=float(node.temperature),
            chunk_tokens=int(node.chunk_tokens),
            fused_head=bool(node.fused_head),
        )


@dataclass(frozen=True)
class WeightingSettings:
    lam: float
    z_max: float | None
    normalize: bool
    alphas: tuple[float, ...]
    eps: float


@dataclass(frozen=True)
class FeatSettings:
    layer_map: str | tuple  # "uniform" or ((student, teacher), ...)
    projectors: bool
    normalize: bool
    attention: float


@dataclass(frozen=True)
class RegSettings:
    param_patterns: tuple[str, ...]
    contrastive: float
    contrastive_temperature: float


@dataclass(frozen=True)
class ValenceFitSettings:
    out: str
    labels: str
    steps: int
    batch_size: int
    lr: float
    lexicon_decay: float


@dataclass(frozen=True)
class ValenceSettings:
    k: int
    teacher_head: str | None
    fit: ValenceFitSettings


@dataclass(frozen=True)
class SeqKDConfig:
    every_n_steps: int
    n_gen: int
    prompt_tokens: int
    temperature: float
    top_p: float
    reward: str
    baseline: str
    baseline_decay: float


@dataclass(frozen=True)
class RolloutSettings:
    gather_student: str  # auto | always | never


@dataclass(frozen=True)
class GateSettings:
    enabled: bool
    mode: str  # proxy | lookahead
    ratio: float
    proxy_factor: float
    rollout_steps: int
    probe_size: int
    baseline_every: int
    max_consecutive_rejections: int


@dataclass(frozen=True)
class MetricsSettings:
    tensorboard: bool
    wandb_project: str | None


@dataclass(frozen=True)
class TrainerSettings:
    max_steps: int
    micro_batch_size: int
    grad_accum: int
    global_batch_size: int | None
    lr: float
    min_lr_ratio: float
    warmup_steps: int
    weight_decay: float
    betas: tuple[float, ...]
    grad_clip: float
    seed: int
    save_every: int
    keep_checkpoints: int
    eval_every: int
    eval_max_batches: int | None
    stop_after_steps: int | None
    preempt_signals: tuple[str, ...]
    requeue: str
    log_every: int
    progress_bar: str | bool
    keep_freed_memory: bool
    time_phases: bool


@dataclass(frozen=True)
class DeepSpeedSettings:
    zero_stage: int
    offload_optimizer: str
    nvme_path: str | None
    precision: str  # auto | bf16 | fp32
    extra: dict  # merged last into the student's DeepSpeed JSON


@dataclass(frozen=True)
class RunSettings:
    dir: str


@dataclass(frozen=True)
class Settings:
    teacher: TeacherSettings
    student: StudentSettings
    data: DataSettings
    loss: LossSettings
    weighting: WeightingSettings
    feat: FeatSettings
    reg: RegSettings
    valence: ValenceSettings
    seq_kd: SeqKDConfig
    rollout: RolloutSettings
    gate: GateSettings
    metrics: MetricsSettings
    trainer: TrainerSettings
    deepspeed: DeepSpeedSettings
    run: RunSettings
    assets_dir: str | None
    resume: str
    eval_only: bool
    num_procs: int
    # The whole resolved config as plain data: what the run directory's config.yaml and W&B record.
    resolved: dict = field(default_factory=dict, compare=False, repr=False)

    @classmethod
    def from_config(cls, cfg: DictConfig) -> Settings:
        """Check `cfg` (VkdError naming the first bad key) and convert it."""
        from vkd_ds.config import validate

        validate(cfg)
        resolved = OmegaConf.to_container(cfg, resolve=True)
        resolved.pop("hydra", None)
        return _build(cls, cfg, {"resolved": resolved})

    @property
    def valence_feeds_the_loss(self) -> bool:
        return valence_feeds_the_loss(self.loss.weights["val"], self.weighting.lam)


def valence_feeds_the_loss(val_weight: float, lam: float) -> bool:
    """The teacher's valence enters the loss: L_val's targets, or the saliency of non-uniform weights."""
    return val_weight > 0 or lam > 0


def _build(cls, node: DictConfig, given: dict[str, Any] | None = None):
    """An instance of the settings dataclass `cls` from the config node of the same keys."""
    if hasattr(cls, "from_node"):
        return cls.from_node(node)
    hints = typing.get_type_hints(cls)
    values = dict(given or {})
    for f in dataclasses.fields(cls):
        if f.name in values:
            continue
        kind = hints[f.name]
        if dataclasses.is_dataclass(kind):
            values[f.name] = _build(kind, node[f.name])
        else:
            values[f.name] = _plain(node[f.name], kind)
    return cls(**values)


def _plain(value, kind):
    """Config values as plain Python: lists as (nested) tuples, mappings as dicts, numbers as the
    field's type (an integer where a float is declared becomes a float)."""
    if isinstance(value, ListConfig):
        return _tuples(OmegaConf.to_container(value, resolve=True))
    if isinstance(value, DictConfig):
        return OmegaConf.to_container(value, resolve=True)
    if kind is float or (isinstance(kind, types.UnionType) and float in kind.__args__):
        if isinstance(value, int) and not isinstance(value, bool):
            return float(value)
    return value


def _tuples(value):
    return tuple(_tuples(v) for v in value) if isinstance(value, list) else value
