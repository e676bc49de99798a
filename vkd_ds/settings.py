"""Typed, frozen settings: the composed Hydra config, checked and converted once.

`Settings.from_config(cfg)` returns plain frozen dataclasses whose fields are the config's keys
(`settings.trainer.lr` is `trainer.lr`): lists become tuples, mappings dicts, and nothing below
train.py sees the DictConfig. The settings own their checks: each field declares its own (`number`,
`choice`, `flag`, ... in settings_fields.py), a section's `__post_init__` checks keys of that section
against each other (settings_sections.py), and `Settings.__post_init__` the keys of different sections
(here). The first bad key ends the conversion with one VkdError naming it, before anything is written.
A new config key is a field of its section (with its check), its default in configs/, and a row in
docs/config.md. The settings and their enumerations are imported from here.
"""

from __future__ import annotations

import dataclasses
import os
import typing
from dataclasses import dataclass, field

from omegaconf import DictConfig, OmegaConf

from vkd_ds.errors import VkdError
from vkd_ds.settings_fields import (
    anything,
    auto_or,
    check_choice,
    checked,
    choice,
    data_inputs,
    flag,
    fraction,
    number,
    numbers,
    raw_value,
    required,
    resume_from,
    settings_from_node,
)
from vkd_ds.settings_sections import (
    BASELINES,
    GATE_MODES,
    GATHER_MODES,
    LABEL_SOURCES,
    OFFLOAD_DEVICES,
    REWARDS,
    CacheSettings,
    DataSettings,
    DeepSpeedSettings,
    FeatSettings,
    GateSettings,
    LossSettings,
    MetricsSettings,
    OnPolicySettings,
    RegSettings,
    RolloutSettings,
    RunSettings,
    SeqKDConfig,
    StudentSettings,
    TeacherSettings,
    TrainerSettings,
    ValenceFitSettings,
    ValenceSettings,
    WeightingSettings,
)
from vkd_ds.terms import (
    CACHED_TEACHER_SERVES,
    DENSE_TEACHER_LOGITS,
    ROLLOUTS,
    STUDENT_LOGITS,
    TEACHER_HIDDENS,
    TERMS,
    VALENCE_HEADS,
)

__all__ = [
    "BASELINES",
    "GATE_MODES",
    "GATHER_MODES",
    "LABEL_SOURCES",
    "OFFLOAD_DEVICES",
    "REWARDS",
    "CacheSettings",
    "DataSettings",
    "DeepSpeedSettings",
    "FeatSettings",
    "GateSettings",
    "LossSettings",
    "MetricsSettings",
    "OnPolicySettings",
    "RegSettings",
    "RolloutSettings",
    "RunSettings",
    "SeqKDConfig",
    "Settings",
    "StudentSettings",
    "TeacherSettings",
    "TrainerSettings",
    "ValenceFitSettings",
    "ValenceSettings",
    "WeightingSettings",
    "anything",
    "auto_or",
    "build_section",
    "check_choice",
    "check_keys",
    "choice",
    "data_inputs",
    "flag",
    "fraction",
    "number",
    "numbers",
    "required",
    "valence_feeds_the_loss",
]


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
    assets_dir: str | None = checked(anything)
    resume: str = checked(resume_from)
    eval_only: bool = checked(flag)
    num_procs: int = checked(number(low=1, integer=True))
    # The whole resolved config as plain data: what the run directory's config.yaml and W&B record.
    resolved: dict = field(default_factory=dict, compare=False, repr=False)

    @classmethod
    def from_config(cls, cfg: DictConfig) -> Settings:
        """Check `cfg` (VkdError naming the first bad key) and convert it."""
        settings = settings_from_node(cls, cfg, "", {"resolved": {}})
        resolved = OmegaConf.to_container(cfg, resolve=True)
        resolved.pop("hydra", None)
        return dataclasses.replace(settings, resolved=resolved)

    def __post_init__(self):
        """Checks of keys in different sections."""
        self._check_term_needs()
        if self.teacher.cache:
            self._check_cached_teacher()
        if self.cross_tokenizer:
            self._check_cross_tokenizer()
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
            eligible = [n for n, t in TERMS.items() if t.on_samples and ROLLOUTS not in t.needs]
            if not any(self.loss.weights[n] > 0 for n in eligible):
                raise VkdError(
                    "onpolicy.fraction > 0 but no term with a weight applies on the student's samples "
                    f"({', '.join(eligible)}): set loss.soft > 0"
                )
        if self.gate.rollout_steps >= max_len:
            steps = self.gate.rollout_steps
            raise VkdError(f"config key `gate.rollout_steps` ({steps}) must be below data.max_seq_len")

    def _check_term_needs(self) -> None:
        """Each term with a weight can be served what it declares it needs: the student's logits (which
        the fused LM head does not make: it computes the fused terms inside the student) and the
        teacher's dense logits (a teacher.cache holds their top-k)."""
        fused = ", ".join(f"loss.{name}" for name, term in TERMS.items() if term.fused)
        for name, term in TERMS.items():
            weight = self.loss.weights[name]
            if not weight > 0:
                continue
            if self.loss.fused_head and STUDENT_LOGITS in term.needs and not term.fused:
                raise VkdError(
                    f"loss.{name}={weight:g} reads the student's logits, which loss.fused_head=true does not make "
                    f"(it computes {fused} inside the student): set loss.fused_head=false or loss.{name}=0"
                )
            if self.teacher.cache and DENSE_TEACHER_LOGITS in term.needs:
                raise VkdError(
                    f"loss.{name}={weight:g} reads the teacher's dense logits, and teacher.cache holds only their "
                    f"top-k: set loss.{name}=0, or train with teacher.path and teacher.cache=null"
                )

    def _check_cached_teacher(self) -> None:
        """teacher.cache serves the needs of CACHED_TEACHER_SERVES (CE, token KD, L_val, L_reg) and the
        weights; the rest needs the live teacher."""
        live = [
            f"loss.{name}={self.loss.weights[name]:g}"
            for name, term in TERMS.items()
            if self.loss.weights[name] > 0 and not set(term.needs) <= set(CACHED_TEACHER_SERVES)
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
    def cross_tokenizer(self) -> bool:
        """The teacher reads its own tokenizer (teacher.tokenizer_path, another than data.tokenizer_path)."""
        path = self.teacher.tokenizer_path
        return path is not None and os.path.realpath(path) != os.path.realpath(self.data.tokenizer_path or "")

    def _check_cross_tokenizer(self) -> None:
        """Across tokenizers the teacher runs on its own tokens: CE, the soft term (loss.cross_tokenizer)
        and L_reg work; what compares the two models position by position or needs the teacher's valence,
        features or samples does not yet."""
        # Terms on the teacher's hidden states, valence or samples: positions of one model, not the other's.
        positional = {TEACHER_HIDDENS, VALENCE_HEADS, ROLLOUTS}
        weighted = [name for name, term in TERMS.items() if self.loss.weights[name] > 0]
        unsupported = [f"loss.{name}=0" for name in weighted if positional & set(TERMS[name].needs)]
        unsupported += [
            setting
            for setting, on in (
                ("weighting.lam=0", self.weighting.lam != 0),
                ("reg.contrastive=0", self.reg.contrastive > 0 and self.loss.weights["reg"] > 0),
                ("onpolicy.fraction=0", self.onpolicy.fraction > 0),
                ("gate.enabled=false", self.gate.enabled),
                ("loss.fused_head=false", self.loss.fused_head),
                ("data.packing=false", self.data.packing is True),
            )
            if on
        ]
        if unsupported:
            raise VkdError(
                "teacher.tokenizer_path differs from data.tokenizer_path (distillation across tokenizers), which "
                f"trains CE, loss.soft and loss.reg only so far: set {' '.join(unsupported)}"
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
        spec.metadata["check"](key, raw_value(node, name, ".".join(sections)))


def build_section(cls, cfg: DictConfig, name: str):
    """One section's settings alone (e.g. `vkd-ds prepare-data`, which reads `data` only)."""
    return settings_from_node(cls, cfg[name], name)
