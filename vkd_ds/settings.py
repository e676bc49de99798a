"""Typed, frozen settings: the composed Hydra config, checked and converted once.

`Settings.from_config(cfg)` returns plain frozen dataclasses whose fields are the config's keys
(`settings.trainer.lr` is `trainer.lr`): lists become tuples, mappings dicts, and nothing below
train.py sees the DictConfig. The settings own their checks: each field declares its own (`number`,
`choice`, `flag`, ... below), a section's `__post_init__` checks keys of that section against each
other, and `Settings.__post_init__` the keys of different sections. The first bad key ends the
conversion with one VkdError naming it, before anything is written. A new config key is a field here
(with its check), its default in configs/, and a row in the README's config table.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import signal
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from vkd_ds.errors import VkdError

OFFLOAD_DEVICES = ("none", "cpu", "nvme")


# --- field checks: each takes (key, raw config value) and returns the value or raises VkdError ----


def _checked(check: Callable[[str, Any], Any]):
    return field(metadata={"check": check})


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def number(low=None, high=None, *, integer=False, optional=False, above=None):
    """A number (an integer if `integer`) in [low, high] and > `above`; null allowed if `optional`."""

    def check(key, value):
        if value is None and optional:
            return None
        kind = "an integer" if integer else "a number"
        if not _is_number(value) or (integer and not isinstance(value, int)):
            raise VkdError(f"config key `{key}` must be {kind}, got {value!r}")
        if low is not None and value < low:
            raise VkdError(f"config key `{key}` must be >= {low}, got {value}")
        if high is not None and value > high:
            raise VkdError(f"config key `{key}` must be <= {high}, got {value}")
        if above is not None and not value > above:
            raise VkdError(f"config key `{key}` must be > {above}, got {value}")
        return value

    return check


def auto_or(check_value):
    """The string `auto`, or a value `check_value` accepts."""

    def check(key, value):
        if value == "auto":
            return value
        try:
            return check_value(key, value)
        except VkdError as err:
            raise VkdError(f"{err} (or auto)") from None

    return check


def check_choice(key: str, value, choices) -> Any:
    if value not in choices:
        raise VkdError(f"config key `{key}` must be one of {', '.join(map(str, choices))}; got {value!r}")
    return value


def choice(choices: tuple | Callable[[], tuple]):
    """One of `choices` (a callable where the enumeration lives in a module that imports this one)."""
    return lambda key, value: check_choice(key, value, choices() if callable(choices) else choices)


def flag(key, value) -> bool:
    if not isinstance(value, bool):
        raise VkdError(f"config key `{key}` must be true or false, got {value!r}")
    return value


def required(key, value):
    if not value:
        raise VkdError(f"config key `{key}` is required (set it with {key}=...)")
    return value


def anything(key, value):
    return value


def numbers(count: int, low=None, high=None):
    """A list of `count` numbers, each in [low, high)."""

    def check(key, value):
        ok = isinstance(value, ListConfig) and len(value) == count and all(_is_number(v) for v in value)
        ok = ok and all((low is None or v >= low) and (high is None or v < high) for v in value)
        if not ok:
            where = "" if low is None else f" in [{low}, {high})"
            raise VkdError(f"config key `{key}` must be a list of {count} numbers{where}; got {value!r}")
        return value

    return check


def fraction(*, low_open=False, high_open=False):
    """A number in the interval from 0 to 1, each end open or closed."""
    interval = f"{'(' if low_open else '['}0, 1{')' if high_open else ']'}"

    def check(key, value):
        number()(key, value)
        if value < 0 or value > 1 or (low_open and value == 0) or (high_open and value == 1):
            raise VkdError(f"config key `{key}` must be in {interval}, got {value}")
        return value

    return check


def _existing_file(key, value):
    if value and not Path(value).is_file():
        raise VkdError(f"config key `{key}`: file not found: {value}")
    return value


def _top_p(key, value):
    number(high=1.0)(key, value)
    if value <= 0:
        raise VkdError(f"config key `{key}` must be in (0, 1], got {value}")
    return value


def _layer_map(key, value):
    if value != "uniform" and not isinstance(value, ListConfig):
        raise VkdError(f"config key `{key}` must be `uniform` or a list of [student, teacher] pairs; got {value!r}")
    return value


def _patterns(key, value):
    if not isinstance(value, ListConfig) or not all(isinstance(p, str) for p in value):
        raise VkdError(f"config key `{key}` must be a list of glob patterns (strings)")
    return value


def _mapping(key, value):
    if not isinstance(value, DictConfig):
        raise VkdError(f"config key `{key}` must be a mapping of DeepSpeed JSON keys")
    return value


def _signals(key, value):
    if not isinstance(value, ListConfig) or not all(isinstance(getattr(signal, str(n), None), int) for n in value):
        raise VkdError(f"config key `{key}` must be a list of signal names (e.g. SIGUSR1); got {value}")
    return value


def _wandb_project(key, value):
    if value is None:
        return None
    if not isinstance(value, str) or not value:
        raise VkdError(f"config key `{key}` must be a project name or null, got {value!r}")
    if importlib.util.find_spec("wandb") is None:
        raise VkdError(f"config key `{key}` is set but wandb is not installed (pip install wandb)")
    return value


def _resume(key, value):
    if value not in ("auto", "never") and not (isinstance(value, str) and Path(value).is_dir()):
        raise VkdError(f"config key `{key}` must be auto, never or an existing checkpoint directory; got {value!r}")
    return value


def _student_config(key, value):
    if value is not None and not isinstance(value, DictConfig):
        raise VkdError(f"config key `{key}` must be a model config (a mapping) or null, got {value!r}")
    return value


def _lazy(module: str, name: str) -> Callable[[], tuple]:
    """An enumeration of a module that imports this one (read when a config is checked)."""
    return lambda: getattr(importlib.import_module(module), name)


# --- the settings ------------------------------------------------------------------------------


@dataclass(frozen=True)
class TeacherSettings:
    path: str | None = _checked(anything)
    layout: str = _checked(choice(("auto", "replicated", "zero3")))  # vkd_ds/layout.py
    offload_param: str = _checked(choice(("auto", *OFFLOAD_DEVICES)))  # a ZeRO-3 teacher's shards
    nvme_path: str | None = _checked(anything)
    cache: str | None = _checked(anything)  # a `vkd-ds cache-teacher` directory, read in place of the teacher

    def __post_init__(self):
        if not self.path and not self.cache:
            raise VkdError(
                "config key `teacher.path` is required (set it with teacher.path=...), unless teacher.cache is set"
            )
        if self.offload_param == "nvme" and not self.nvme_path:
            raise VkdError("config key `teacher.nvme_path` is required when teacher.offload_param=nvme")
        if self.layout == "replicated" and self.offload_param not in ("auto", "none"):
            raise VkdError(
                f"teacher.layout=replicated keeps the whole teacher on every device, and teacher.offload_param="
                f"{self.offload_param} offloads a ZeRO-3 teacher's shards: set teacher.layout=zero3 (or auto), "
                "or teacher.offload_param=auto"
            )


@dataclass(frozen=True)
class CacheSettings:
    """`vkd-ds cache-teacher`: where and what it stores (training reads it with teacher.cache=DIR)."""

    dir: str | None = _checked(anything)
    top_k: int = _checked(number(low=1, integer=True))
    temperature: float | None = _checked(number(low=1e-3, optional=True))  # null: loss.temperature
    precision: str = _checked(choice(("fp16", "fp32")))
    records_per_shard: int = _checked(number(low=1, integer=True))


@dataclass(frozen=True)
class StudentSettings:
    path: str | None = _checked(anything)
    # a transformers model config (model_type and sizes), when path is null
    config: dict | None = _checked(_student_config)

    def __post_init__(self):
        if self.path is None and self.config is None:
            raise VkdError("set `student.path` (a local Hugging Face directory) or `student.config` (a model config)")


def data_inputs(*, optional: bool):
    """A path or glob, a prepared token store, or a list of paths/globs and {path, weight} mappings
    (vkd_ds.corpus.resolve_sources checks the files and weights when the store is prepared)."""

    def check(key, value):
        if value is None and optional:
            return None
        if isinstance(value, str) and value:
            return value
        if isinstance(value, ListConfig) and len(value) and all(isinstance(v, (str, DictConfig)) for v in value):
            return value
        raise VkdError(
            f"config key `{key}` must be a path, a glob or a list of them (each optionally "
            f"{{path: ..., weight: ...}}); got {value!r}"
        )

    return check


@dataclass(frozen=True)
class DataSettings:
    train_path: str | tuple = _checked(data_inputs(optional=False))
    valid_path: str | tuple | None = _checked(data_inputs(optional=True))
    tokenizer_path: str | None = _checked(anything)
    max_seq_len: int = _checked(number(low=2, integer=True))
    store_dir: str | None = _checked(anything)  # where token stores are written (null: $VKD_DS_DATA_CACHE or ~/.cache)
    packing: bool | str = _checked(auto_or(flag))  # several documents per row (vkd_ds.packing); auto: when it helps
    pack_length: int | None = _checked(number(low=2, integer=True, optional=True))  # tokens per packed row
    assistant_turns: str = _checked(choice(("all", "last")))  # the targets of `messages` records


@dataclass(frozen=True)
class LossSettings:
    weights: dict[str, float]  # λ of every term of vkd_ds.terms.TERMS, keyed by its name (loss.<name>)
    divergence: str = _checked(choice(_lazy("vkd_ds.losses", "DIVERGENCES")))  # the soft term's
    beta: float = _checked(fraction(low_open=True, high_open=True))  # jsd's mixture weight of the teacher
    alpha: float = _checked(fraction(high_open=True))  # the skew divergences' mixture weight
    temperature: float = _checked(number(low=1e-3))
    chunk_tokens: int | str = _checked(auto_or(number(low=1, integer=True)))  # auto: planned at start
    fused_head: bool = _checked(flag)

    @classmethod
    def from_node(cls, node: DictConfig, prefix: str) -> LossSettings:
        from vkd_ds.terms import TERM_NAMES

        weight = number(low=0.0)
        weights = {name: float(weight(f"{prefix}.{name}", _raw(node, name, prefix))) for name in TERM_NAMES}
        return _build(cls, node, prefix, {"weights": weights})

    def __post_init__(self):
        if sum(self.weights.values()) <= 0:
            raise VkdError("config keys `loss.*`: every loss weight is 0, there is nothing to train")


@dataclass(frozen=True)
class WeightingSettings:
    lam: float = _checked(number(low=0.0))
    z_max: float | None = _checked(number(low=0.0, optional=True))
    normalize: bool = _checked(flag)
    alphas: tuple[float, ...] = _checked(numbers(4))
    eps: float = _checked(number(low=0.0))


@dataclass(frozen=True)
class FeatSettings:
    layer_map: str | tuple = _checked(_layer_map)  # "uniform" or ((student, teacher), ...)
    projectors: bool = _checked(flag)
    normalize: bool = _checked(flag)
    attention: float = _checked(number(low=0.0))


@dataclass(frozen=True)
class RegSettings:
    param_patterns: tuple[str, ...] = _checked(_patterns)
    contrastive: float = _checked(number(low=0.0))
    contrastive_temperature: float = _checked(number(low=1e-6))


@dataclass(frozen=True)
class ValenceFitSettings:
    out: str = _checked(required)
    labels: str = _checked(choice(_lazy("vkd_ds.fit_head", "LABEL_SOURCES")))
    steps: int = _checked(number(low=1, integer=True))
    batch_size: int = _checked(number(low=1, integer=True))
    lr: float = _checked(number(low=0.0))
    lexicon_decay: float = _checked(number(low=0.0, high=0.999))


@dataclass(frozen=True)
class ValenceSettings:
    k: int = _checked(number(low=1, integer=True))
    teacher_head: str | None = _checked(_existing_file)
    fit: ValenceFitSettings


@dataclass(frozen=True)
class SeqKDConfig:
    every_n_steps: int = _checked(number(low=1, integer=True))
    n_gen: int = _checked(number(low=1, integer=True))
    prompt_tokens: int = _checked(number(low=1, integer=True))
    temperature: float = _checked(number(low=1e-3))
    top_p: float = _checked(_top_p)
    reward: str = _checked(choice(_lazy("vkd_ds.seq_kd", "REWARDS")))
    baseline: str = _checked(choice(_lazy("vkd_ds.seq_kd", "BASELINES")))
    baseline_decay: float = _checked(number(low=0.0, high=1.0))
    length_normalized: bool = _checked(flag)


@dataclass(frozen=True)
class OnPolicySettings:
    fraction: float = _checked(fraction())  # of optimizer steps on the student's own samples


@dataclass(frozen=True)
class RolloutSettings:
    gather_student: str = _checked(choice(_lazy("vkd_ds.rollout", "GATHER_MODES")))


@dataclass(frozen=True)
class GateSettings:
    enabled: bool = _checked(flag)
    mode: str = _checked(choice(_lazy("vkd_ds.gate", "GATE_MODES")))
    ratio: float = _checked(number(low=0.0))
    proxy_factor: float = _checked(number(low=0.0))
    rollout_steps: int = _checked(number(low=1, integer=True))
    probe_size: int = _checked(number(low=1, integer=True))
    baseline_every: int = _checked(number(low=0, integer=True))
    warmup_steps: int = _checked(number(low=0, integer=True))  # steps before the gate may arm
    arm_mse: float = _checked(number(above=0.0))  # proxy: arms once the running valence MSE is below
    max_consecutive_rejections: int = _checked(number(low=0, integer=True))


@dataclass(frozen=True)
class MetricsSettings:
    tensorboard: bool = _checked(flag)
    wandb_project: str | None = _checked(_wandb_project)


@dataclass(frozen=True)
class TrainerSettings:
    max_steps: int = _checked(number(low=1, integer=True))
    micro_batch_size: int = _checked(number(low=1, integer=True))
    grad_accum: int = _checked(number(low=1, integer=True))
    global_batch_size: int | None = _checked(number(low=1, integer=True, optional=True))
    lr: float = _checked(number(low=0.0))
    min_lr_ratio: float = _checked(number(low=0.0, high=1.0))
    warmup_steps: int = _checked(number(low=0, integer=True))
    weight_decay: float = _checked(number(low=0.0))
    betas: tuple[float, ...] = _checked(numbers(2, low=0.0, high=1.0))
    grad_clip: float = _checked(number(low=0.0))
    seed: int = _checked(number(integer=True))
    save_every: int = _checked(number(low=0, integer=True))
    keep_checkpoints: int = _checked(number(low=1, integer=True))
    eval_every: int = _checked(number(low=0, integer=True))
    eval_max_batches: int | None = _checked(number(low=1, integer=True, optional=True))
    stop_after_steps: int | None = _checked(number(low=1, integer=True, optional=True))
    preempt_signals: tuple[str, ...] = _checked(_signals)
    requeue: str = _checked(choice(("auto", "never")))
    log_every: int = _checked(number(low=1, integer=True))
    progress_bar: str | bool = _checked(choice(("auto", True, False)))
    keep_freed_memory: bool = _checked(flag)
    time_phases: bool = _checked(flag)


@dataclass(frozen=True)
class DeepSpeedSettings:
    zero_stage: int | str = _checked(auto_or(number(low=0, high=3, integer=True)))  # auto: vkd_ds/layout.py
    offload_optimizer: str = _checked(choice(OFFLOAD_DEVICES))
    nvme_path: str | None = _checked(anything)
    precision: str = _checked(choice(("auto", "bf16", "fp32")))
    # What a rank may plan with (the layout, the loss chunks): auto, the free GPU memory, or this
    # rank's share of the host's available memory; or so many GiB.
    memory_per_rank_gb: float | str = _checked(auto_or(number(above=0)))
    extra: dict = _checked(_mapping)  # merged last into the student's DeepSpeed JSON

    def __post_init__(self):
        if self.offload_optimizer == "nvme" and not self.nvme_path:
            raise VkdError("config key `deepspeed.nvme_path` is required when deepspeed.offload_optimizer=nvme")
        if self.offload_optimizer != "none" and self.zero_stage == 0:
            raise VkdError("config key `deepspeed.offload_optimizer` needs deepspeed.zero_stage >= 1")


@dataclass(frozen=True)
class RunSettings:
    dir: str = _checked(required)


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
    onpolicy: OnPolicySettings
    rollout: RolloutSettings
    gate: GateSettings
    metrics: MetricsSettings
    trainer: TrainerSettings
    deepspeed: DeepSpeedSettings
    run: RunSettings
    cache: CacheSettings
    assets_dir: str | None = _checked(anything)
    resume: str = _checked(_resume)
    eval_only: bool = _checked(flag)
    num_procs: int = _checked(number(low=1, integer=True))
    # The whole resolved config as plain data: what the run directory's config.yaml and W&B record.
    resolved: dict = field(default_factory=dict, compare=False, repr=False)

    @classmethod
    def from_config(cls, cfg: DictConfig) -> Settings:
        """Check `cfg` (VkdError naming the first bad key) and convert it."""
        settings = _build(cls, cfg, "", {"resolved": {}})
        resolved = OmegaConf.to_container(cfg, resolve=True)
        resolved.pop("hydra", None)
        return dataclasses.replace(settings, resolved=resolved)

    def __post_init__(self):
        """Checks of keys in different sections."""
        if self.teacher.cache:
            self._check_cached_teacher()
        if not self.data.tokenizer_path:
            raise VkdError("config key `data.tokenizer_path` is required (set it with data.tokenizer_path=...)")
        if self.needs_teacher_valence and not self.valence.teacher_head and not self.teacher.cache:
            raise VkdError(
                "config key `valence.teacher_head` is required when loss.val > 0, weighting.lam > 0 or "
                "gate.enabled: fit one with `vkd-ds fit-valence-head`, or set loss.val=0 weighting.lam=0 "
                "gate.enabled=false"
            )
        max_len = self.data.max_seq_len
        if self.data.pack_length is not None and self.data.pack_length < max_len:
            raise VkdError(
                f"config key `data.pack_length` ({self.data.pack_length}) must be at least data.max_seq_len "
                f"({max_len}): a row of data.max_seq_len tokens must fit in a packed row"
            )
        if self.seq_kd.n_gen >= max_len:
            raise VkdError(
                f"config key `seq_kd.n_gen` ({self.seq_kd.n_gen}) must be below data.max_seq_len ({max_len}): "
                "prompt + generated tokens must fit in data.max_seq_len"
            )
        if self.gate.enabled and self.gate.mode == "proxy" and not self.loss.weights["val"] > 0:
            raise VkdError(
                "gate.mode=proxy projects the student's valence, and the student has a valence head only when "
                "loss.val > 0: set loss.val > 0, gate.mode=lookahead or gate.enabled=false (the gate is on by default)"
            )
        if self.gate.enabled and self.deepspeed.offload_optimizer == "nvme":
            raise VkdError(
                "gate.enabled=true with deepspeed.offload_optimizer=nvme: the mercy gate reverts a rejected step "
                "from a snapshot of the optimizer state, which DeepSpeed keeps swapped out to NVMe; set "
                "gate.enabled=false or deepspeed.offload_optimizer=cpu"
            )
        if self.onpolicy.fraction > 0:
            from vkd_ds.terms import ROLLOUTS, TERMS

            eligible = [n for n, t in TERMS.items() if t.on_samples and ROLLOUTS not in t.needs]
            if not any(self.loss.weights[n] > 0 for n in eligible):
                raise VkdError(
                    "onpolicy.fraction > 0 but no term with a weight applies on the student's samples "
                    f"({', '.join(eligible)}): set loss.soft > 0"
                )
        if self.gate.rollout_steps >= max_len:
            steps = self.gate.rollout_steps
            raise VkdError(f"config key `gate.rollout_steps` ({steps}) must be below data.max_seq_len")

    def _check_cached_teacher(self) -> None:
        """teacher.cache serves CE, token KD, L_val, L_reg and the weights; the rest needs the live teacher."""
        from vkd_ds.terms import ROLLOUTS, TEACHER_HIDDENS, TERMS

        # The cache holds the teacher's distribution, entropy and valence, not its hidden states or its
        # scores of the student's samples.
        live = [
            f"loss.{name}={self.loss.weights[name]:g}"
            for name, term in TERMS.items()
            if self.loss.weights[name] > 0 and (TEACHER_HIDDENS in term.needs or ROLLOUTS in term.needs)
        ]
        if self.loss.weights["reg"] > 0 and self.reg.contrastive > 0:
            live.append(f"reg.contrastive={self.reg.contrastive:g}")
        if self.onpolicy.fraction > 0:
            live.append(f"onpolicy.fraction={self.onpolicy.fraction:g}")
        if self.gate.enabled:
            live.append("gate.enabled=true")
        if live:
            raise VkdError(
                "teacher.cache serves CE, token KD (loss.soft), L_val, L_reg and the valence weights; "
                f"{', '.join(live)} need(s) the live teacher: set them to 0 (false), or train with teacher.path "
                "and teacher.cache=null"
            )

    @property
    def valence_feeds_the_loss(self) -> bool:
        return valence_feeds_the_loss(self.loss.weights["val"], self.weighting.lam)

    @property
    def needs_teacher_valence(self) -> bool:
        """The teacher's valence head serves L_val, non-uniform weights and the mercy gate."""
        return self.valence_feeds_the_loss or self.gate.enabled


def valence_feeds_the_loss(val_weight: float, lam: float) -> bool:
    """The teacher's valence enters the loss: L_val's targets, or the saliency of non-uniform weights."""
    return val_weight > 0 or lam > 0


def check_keys(cfg: DictConfig, keys: tuple[str, ...]) -> None:
    """Run the checks of these keys only (e.g. `vkd-ds fit-valence-head`, which reads a few)."""
    for key in keys:
        *sections, name = key.split(".")
        cls, node = Settings, cfg
        for section in sections:
            cls = typing.get_type_hints(cls)[section]
            node = node[section]
        spec = next(f for f in dataclasses.fields(cls) if f.name == name)
        spec.metadata["check"](key, _raw(node, name, ".".join(sections)))


def build_section(cls, cfg: DictConfig, name: str):
    """One section's settings alone (e.g. `vkd-ds prepare-data`, which reads `data` only)."""
    return _build(cls, cfg[name], name)


def _raw(node: DictConfig, name: str, prefix: str):
    """The resolved value of `prefix.name`; VkdError naming the key if it is missing or broken."""
    key = f"{prefix}.{name}" if prefix else name
    try:
        return OmegaConf.select(node, name, throw_on_missing=True)
    except OmegaConfBaseException as err:
        msg = str(err).splitlines()[0]
        if "Missing mandatory value" in msg:
            raise VkdError(f"config key `{key}` is required (set it with {key}=...)") from None
        raise VkdError(f"config key `{key}`: {msg}") from None


def _build(cls, node: DictConfig, prefix: str, given: dict[str, Any] | None = None):
    """An instance of the settings dataclass `cls` from the config node of the same keys: each
    field's check on its raw value, then the conversion to plain Python, then `__post_init__`."""
    if hasattr(cls, "from_node") and not given:
        return cls.from_node(node, prefix)
    hints = typing.get_type_hints(cls)
    values = dict(given or {})
    for f in dataclasses.fields(cls):
        if f.name in values:
            continue
        key = f"{prefix}.{f.name}" if prefix else f.name
        kind = hints[f.name]
        if dataclasses.is_dataclass(kind):
            child = _raw(node, f.name, prefix)
            if not isinstance(child, DictConfig):
                raise VkdError(f"config key `{key}` must be a mapping, got {child!r}")
            values[f.name] = _build(kind, child, key)
        else:
            values[f.name] = _plain(f.metadata["check"](key, _raw(node, f.name, prefix)), kind)
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
