"""The settings' sections: one frozen dataclass per section of the config (`teacher`, `data`, `loss`,
...), each field declaring its check (vkd_ds.settings_fields) and each `__post_init__` checking keys of
its section against each other. The enumerations of the choice keys are declared here, beside their
fields; the modules that act on them import them from here.
"""

from __future__ import annotations

from dataclasses import dataclass

from vkd_ds.errors import VkdError
from vkd_ds.losses import DIVERGENCES
from vkd_ds.settings_fields import (
    ConfigNode,
    anything,
    auto_or,
    checked,
    choice,
    data_inputs,
    existing_file,
    flag,
    fraction,
    glob_patterns,
    json_mapping,
    layer_pairs,
    model_config,
    number,
    numbers,
    raw_value,
    required,
    settings_from_node,
    signal_names,
    top_p_value,
    wandb_project_name,
)
from vkd_ds.terms import TERMS

OFFLOAD_DEVICES = ("none", "cpu", "nvme")
# The soft term across tokenizers (vkd_ds/cross_tokenizer/), at byte-aligned positions: the teacher's
# distribution carried onto the student's vocabulary by the student's own BPE, compared by loss.divergence |
# shared tokens by loss.divergence and the rest by sorted L1 | (ULD) positions paired by index.
CROSS_TOKENIZER_PAIRINGS = ("projected", "aligned", "positional_uld")


@dataclass(frozen=True)
class TeacherSettings:
    path: str | None = checked(anything)
    layout: str = checked(choice(("auto", "replicated", "zero3")))  # vkd_ds/layout.py
    offload_param: str = checked(choice(("auto", *OFFLOAD_DEVICES)))  # a ZeRO-3 teacher's shards
    nvme_path: str | None = checked(anything)
    cache: str | None = checked(anything)  # a `vkd-ds cache-teacher` directory, read in place of the teacher
    tokenizer_path: str | None = checked(anything)  # the teacher's own tokenizer (null: data.tokenizer_path)

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

    dir: str | None = checked(anything)
    top_k: int = checked(number(low=1, integer=True))
    temperature: float | None = checked(number(low=1e-3, optional=True))  # null: loss.temperature
    precision: str = checked(choice(("fp16", "fp32")))
    records_per_shard: int = checked(number(low=1, integer=True))


@dataclass(frozen=True)
class StudentSettings:
    path: str | None = checked(anything)
    # a transformers model config (model_type and sizes), when path is null
    config: dict | None = checked(model_config)

    def __post_init__(self):
        if self.path is None and self.config is None:
            raise VkdError("set `student.path` (a local Hugging Face directory) or `student.config` (a model config)")


@dataclass(frozen=True)
class DataSettings:
    train_path: str | tuple = checked(data_inputs(optional=False))
    valid_path: str | tuple | None = checked(data_inputs(optional=True))
    tokenizer_path: str | None = checked(anything)
    max_seq_len: int = checked(number(low=2, integer=True))
    store_dir: str | None = checked(anything)  # where token stores are written (null: $VKD_DS_DATA_CACHE or ~/.cache)
    packing: bool | str = checked(auto_or(flag))  # several documents per row (vkd_ds.packing); auto: when it helps
    pack_length: int | None = checked(number(low=2, integer=True, optional=True))  # tokens per packed row
    assistant_turns: str = checked(choice(("all", "last")))  # the targets of `messages` records


@dataclass(frozen=True)
class LossSettings:
    weights: dict[str, float]  # λ of every term of vkd_ds.terms.TERMS, keyed by its name (loss.<name>)
    divergence: str = checked(choice(DIVERGENCES))  # the soft term's
    beta: float = checked(fraction(low_open=True, high_open=True))  # jsd's mixture weight of the teacher
    alpha: float = checked(fraction(high_open=True))  # the skew divergences' mixture weight
    temperature: float = checked(number(low=1e-3))
    chunk_tokens: int | str = checked(auto_or(number(low=1, integer=True)))  # auto: planned at start
    fused_head: bool = checked(flag)
    cross_tokenizer: str = checked(choice(CROSS_TOKENIZER_PAIRINGS))  # with teacher.tokenizer_path

    @classmethod
    def from_node(cls, node: ConfigNode, prefix: str) -> LossSettings:
        weight = number(low=0.0)
        weights = {name: float(weight(f"{prefix}.{name}", raw_value(node, name, prefix))) for name in TERMS}
        return settings_from_node(cls, node, prefix, {"weights": weights})

    def __post_init__(self):
        if sum(self.weights.values()) <= 0:
            raise VkdError("config keys `loss.*`: every loss weight is 0, there is nothing to train")


@dataclass(frozen=True)
class WeightingSettings:
    lam: float = checked(number(low=0.0))
    z_max: float | None = checked(number(low=0.0, optional=True))
    normalize: bool = checked(flag)
    alphas: tuple[float, ...] = checked(numbers(4))
    eps: float = checked(number(low=0.0))


@dataclass(frozen=True)
class FeatSettings:
    layer_map: str | tuple = checked(layer_pairs)  # "uniform" or ((student, teacher), ...)
    projectors: bool = checked(flag)
    normalize: bool = checked(flag)
    attention: float = checked(number(low=0.0))


@dataclass(frozen=True)
class RegSettings:
    param_patterns: tuple[str, ...] = checked(glob_patterns)
    contrastive: float = checked(number(low=0.0))
    contrastive_temperature: float = checked(number(low=1e-6))


LABEL_SOURCES = ("auto", "data", "lexicon")  # valence.fit.labels (fit_head.py)


@dataclass(frozen=True)
class ValenceFitSettings:
    out: str = checked(required)
    labels: str = checked(choice(LABEL_SOURCES))
    steps: int = checked(number(low=1, integer=True))
    batch_size: int = checked(number(low=1, integer=True))
    lr: float = checked(number(low=0.0))
    lexicon_decay: float = checked(number(low=0.0, high=0.999))


@dataclass(frozen=True)
class ValenceSettings:
    k: int = checked(number(low=1, integer=True))
    teacher_head: str | None = checked(existing_file)
    fit: ValenceFitSettings


REWARDS = ("teacher_logprob", "reverse_kl", "per_token")  # seq_kd.reward (seq_kd.py)
BASELINES = ("batch", "ema")  # seq_kd.baseline


@dataclass(frozen=True)
class SeqKDConfig:
    every_n_steps: int = checked(number(low=1, integer=True))
    n_gen: int = checked(number(low=1, integer=True))
    prompt_tokens: int = checked(number(low=1, integer=True))
    temperature: float = checked(number(low=1e-3))
    top_p: float = checked(top_p_value)
    reward: str = checked(choice(REWARDS))
    baseline: str = checked(choice(BASELINES))
    baseline_decay: float = checked(number(low=0.0, high=1.0))
    length_normalized: bool = checked(flag)
    normalize_advantages: bool = checked(flag)


@dataclass(frozen=True)
class OnPolicySettings:
    fraction: float = checked(fraction())  # of optimizer steps on the student's own samples


GATHER_MODES = ("auto", "always", "never")  # rollout.gather_student (rollout.py)


@dataclass(frozen=True)
class RolloutSettings:
    gather_student: str = checked(choice(GATHER_MODES))


GATE_MODES = ("proxy", "lookahead")  # gate.mode (gate.py)


@dataclass(frozen=True)
class GateSettings:
    enabled: bool = checked(flag)
    mode: str = checked(choice(GATE_MODES))
    ratio: float = checked(number(low=0.0))
    proxy_factor: float = checked(number(low=0.0))
    rollout_steps: int = checked(number(low=1, integer=True))
    probe_size: int = checked(number(low=1, integer=True))
    baseline_every: int = checked(number(low=0, integer=True))
    warmup_steps: int = checked(number(low=0, integer=True))  # steps before the gate may arm
    arm_mse: float = checked(number(above=0.0))  # proxy: arms once the running valence MSE is below
    max_consecutive_rejections: int = checked(number(low=0, integer=True))


@dataclass(frozen=True)
class MetricsSettings:
    tensorboard: bool = checked(flag)
    wandb_project: str | None = checked(wandb_project_name)


@dataclass(frozen=True)
class TrainerSettings:
    max_steps: int = checked(number(low=1, integer=True))
    micro_batch_size: int = checked(number(low=1, integer=True))
    grad_accum: int = checked(number(low=1, integer=True))
    global_batch_size: int | None = checked(number(low=1, integer=True, optional=True))
    lr: float = checked(number(low=0.0))
    min_lr_ratio: float = checked(number(low=0.0, high=1.0))
    warmup_steps: int = checked(number(low=0, integer=True))
    weight_decay: float = checked(number(low=0.0))
    betas: tuple[float, ...] = checked(numbers(2, low=0.0, high=1.0))
    grad_clip: float = checked(number(low=0.0))
    seed: int = checked(number(integer=True))
    save_every: int = checked(number(low=0, integer=True))
    keep_checkpoints: int = checked(number(low=1, integer=True))
    eval_every: int = checked(number(low=0, integer=True))
    eval_max_batches: int | None = checked(number(low=1, integer=True, optional=True))
    stop_after_steps: int | None = checked(number(low=1, integer=True, optional=True))
    preempt_signals: tuple[str, ...] = checked(signal_names)
    requeue: str = checked(choice(("auto", "never")))
    log_every: int = checked(number(low=1, integer=True))
    progress_bar: str | bool = checked(choice(("auto", True, False)))
    keep_freed_memory: bool = checked(flag)
    time_phases: bool = checked(flag)


@dataclass(frozen=True)
class DeepSpeedSettings:
    zero_stage: int | str = checked(auto_or(number(low=0, high=3, integer=True)))  # auto: vkd_ds/layout.py
    offload_optimizer: str = checked(choice(OFFLOAD_DEVICES))
    nvme_path: str | None = checked(anything)
    precision: str = checked(choice(("auto", "bf16", "fp32")))
    # What a rank may plan with (the layout, the loss chunks): auto, the free GPU memory, or this
    # rank's share of the host's available memory; or so many GiB.
    memory_per_rank_gb: float | str = checked(auto_or(number(above=0)))
    extra: dict = checked(json_mapping)  # merged last into the student's DeepSpeed JSON

    def __post_init__(self):
        if self.offload_optimizer == "nvme" and not self.nvme_path:
            raise VkdError("config key `deepspeed.nvme_path` is required when deepspeed.offload_optimizer=nvme")
        if self.offload_optimizer != "none" and self.zero_stage == 0:
            raise VkdError("config key `deepspeed.offload_optimizer` needs deepspeed.zero_stage >= 1")


@dataclass(frozen=True)
class RunSettings:
    dir: str = checked(required)
