"""The mercy gate (SPEC §4): every rank agrees, before an optimizer step commits, whether to keep it.

    reject if  projected_valence < ratio · teacher_baseline_valence

- `proxy`: projected = proxy_factor · the student's mean valence (its valence head, over the
  valid positions of the global batch, from the step's own forwards); decided before the step.
- `lookahead`: take the step, let the student continue the probe prompts for `rollout_steps`
  tokens, and score the continuations with the teacher's valence head; reject => revert.
- the baseline: the teacher's valence of its own continuations of the same probe prompts,
  computed at the start, kept in the checkpoint, refreshed every `baseline_every` steps.

Every value is a sum all-reduced over ranks before the comparison, so all ranks decide alike.
The same agreed skip guards non-finite losses (gate enabled or not). A rejected or skipped step
is taken and then reverted from a snapshot of this rank's share of everything a step changes
(`StepSnapshot`); the batch counts as consumed.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from omegaconf import DictConfig

from vkd_ds import dist
from vkd_ds.data import Example
from vkd_ds.errors import VkdError
from vkd_ds.rollout import SamplingSettings, StudentSampler, prompt_of, rollout_batch, row_uniforms, sample

GATE_MODES = ("proxy", "lookahead")
BLOCKED_MESSAGE = "Mercy gate blocked – low projected valence trajectory"
# Probe draws come from their own stream, apart from sequence KD's (which is seeded by the step).
PROBE_SEED_OFFSET = 7919


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

    @classmethod
    def from_config(cls, cfg: DictConfig) -> GateSettings:
        g = cfg.gate
        return cls(
            bool(g.enabled),
            str(g.mode),
            float(g.ratio),
            float(g.proxy_factor),
            int(g.rollout_steps),
            int(g.probe_size),
            int(g.baseline_every),
            int(g.max_consecutive_rejections),
        )


@dataclass
class GateState:
    """Counters and the cached baseline: metrics and checkpoint."""

    rejected: int = 0  # steps the gate rejected
    nonfinite: int = 0  # steps skipped for a non-finite loss or gradient
    consecutive: int = 0  # rejected or skipped in a row, up to now
    baseline: float | None = None
    baseline_step: int | None = None  # the step the baseline was computed at


class StepSnapshot:
    """This rank's share of everything an optimizer step changes, copied to CPU: its partition of
    the parameters (and the whole of ZeRO-3's persistent small parameters), the fp32 master
    partition, the optimizer state (Adam's exp_avg, exp_avg_sq, step), the hyperparameters of
    every parameter group (the LR the scheduler wrote) and the LR scheduler's state.

    Memory: about 16 bytes per parameter / world size for fp32 Adam (parameters 4, master 4
    when separate, moments 8), on CPU, taken only when a step may be reverted."""

    MASTER_ATTRS = ("fp32_partitioned_groups_flat", "single_partition_of_fp32_groups", "fp32_groups_flat_partition")

    def __init__(self, engine):
        self.engine = engine
        self._saved = None

    def _targets(self):
        """The live objects a step changes. Looked up at every snapshot: loading a checkpoint
        replaces the optimizer's parameter groups and state."""
        optimizer = self.engine.optimizer
        base = getattr(optimizer, "optimizer", optimizer)  # ZeRO wrappers hold the torch optimizer
        groups = [optimizer.param_groups] + ([base.param_groups] if base is not optimizer else [])
        tensors: dict[int, torch.Tensor] = {}
        for param in self.engine.module.parameters():
            for t in (getattr(param, "ds_tensor", None), param.data):
                if t is not None and t.numel() > 0:
                    tensors[id(t)] = t
        for attr in self.MASTER_ATTRS:
            for t in getattr(optimizer, attr, None) or []:
                tensors[id(t)] = t
        for group in base.param_groups:
            for t in group["params"]:
                tensors[id(t.data)] = t.data
        return base, groups, list(tensors.values())

    def take(self) -> None:
        base, groups, tensors = self._targets()
        self._saved = {
            "base": base,
            "groups": groups,
            "tensors": tensors,
            "tensor_values": [t.detach().to("cpu", copy=True) for t in tensors],
            "state": {key: {k: _clone(v) for k, v in value.items()} for key, value in base.state.items()},
            "group_values": [[{k: _clone(v) for k, v in g.items() if k != "params"} for g in gs] for gs in groups],
            "scheduler": _clone(self.engine.lr_scheduler.state_dict()) if self.engine.lr_scheduler else None,
        }

    @torch.no_grad()
    def restore(self) -> None:
        saved, self._saved = self._saved, None
        base = saved["base"]
        for t, value in zip(saved["tensors"], saved["tensor_values"], strict=True):
            t.copy_(value)
        for key in list(base.state.keys()):
            if key not in saved["state"]:
                del base.state[key]  # state the reverted step created (Adam's first step)
        for key, values in saved["state"].items():
            current = base.state[key]
            for k, v in values.items():
                if isinstance(v, torch.Tensor) and isinstance(current.get(k), torch.Tensor):
                    current[k].copy_(v)
                else:
                    current[k] = _clone(v)
        for gs, values in zip(saved["groups"], saved["group_values"], strict=True):
            for group, hyper in zip(gs, values, strict=True):
                group.update(hyper)
        if saved["scheduler"] is not None:
            self.engine.lr_scheduler.load_state_dict(saved["scheduler"])


def _clone(value):
    if isinstance(value, torch.Tensor):
        return value.detach().to("cpu", copy=True) if value.device.type != "cpu" else value.detach().clone()
    if isinstance(value, dict):
        return {k: _clone(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_clone(v) for v in value)
    return value


class MercyGate:
    def __init__(
        self,
        settings: GateSettings,
        engine,
        teacher,
        tokenizer,
        probe_examples: list[Example],
        seed: int,
        student_sampler: StudentSampler | None,
        max_seq_len: int,
    ):
        if settings.enabled and settings.probe_size < dist.world_size():
            raise VkdError(
                f"config key `gate.probe_size` ({settings.probe_size}) must be at least the world size "
                f"({dist.world_size()}): every rank continues its share of the probe prompts"
            )
        self.settings = settings
        self.engine = engine
        self.teacher = teacher
        self.vocab_size = len(tokenizer)
        self.eos_id = tokenizer.eos_token_id
        self.pad_id = tokenizer.pad_token_id
        self.state = GateState()
        self.snapshot = StepSnapshot(engine)
        self.sampling = SamplingSettings(n_gen=settings.rollout_steps, max_seq_len=max_seq_len)
        # The probe set is sharded over ranks; sums are all-reduced, so it is one set.
        world, rank = dist.world_size(), dist.rank()
        mine = list(range(rank, settings.probe_size, world))
        self.probe_rows = mine
        self.probe_prompts = [prompt_of(probe_examples[i % len(probe_examples)], self.sampling) for i in mine]
        self.probe_uniforms = row_uniforms(seed + PROBE_SEED_OFFSET, 0, mine, settings.rollout_steps)
        self.student_sampler = student_sampler  # lookahead mode's (shared with sequence KD)

    # ---- valences --------------------------------------------------------------------------
    def _score(self, samples) -> torch.Tensor:
        """[sum, count] of the teacher's valence (mean over k) at the generated positions."""
        out = torch.zeros(2, dtype=torch.float64)
        batch = {k: v.to(dist.device()) for k, v in rollout_batch(samples, self.pad_id).items()}
        valence = self.teacher(batch["input_ids"], batch["attention_mask"])["valence"].float().mean(-1)
        mask = batch["loss_mask"]
        out[0] = float(valence[mask].double().sum())
        out[1] = float(mask.sum())
        return out

    def _probe_valence(self, generate) -> float:
        samples = generate(
            self.probe_prompts, self.probe_uniforms, self.sampling, self.vocab_size, self.eos_id, self.pad_id
        )
        total = dist.all_reduce_sum(self._score(samples))
        return float(total[0] / total[1].clamp(min=1))

    def _teacher_generate(self, prompts, uniforms, settings, vocab, eos, pad):
        # The teacher is a ZeRO-3 inference engine: its forward is collective, generation is synced.
        return sample(self.teacher.engine.module, prompts, uniforms, settings, vocab, eos, pad, synced=True)

    def refresh_baseline(self, step: int) -> None:
        self.state.baseline = self._probe_valence(self._teacher_generate)
        self.state.baseline_step = step

    def baseline_due(self, step: int) -> bool:
        s = self.state
        if s.baseline is None:
            return True
        every = self.settings.baseline_every
        return every > 0 and step - s.baseline_step >= every

    # ---- the decision ------------------------------------------------------------------------
    def projected_proxy(self, valence_sum: float, count: float) -> float:
        total = dist.all_reduce_sum(torch.tensor([valence_sum, count], dtype=torch.float64))
        return self.settings.proxy_factor * float(total[0] / total[1].clamp(min=1))

    def projected_lookahead(self) -> float:
        return self._probe_valence(self.student_sampler)

    def rejects(self, projected: float) -> bool:
        return projected < self.settings.ratio * self.state.baseline

    def record(self, step: int, rejected: bool, nonfinite: bool) -> None:
        s = self.state
        s.rejected += int(rejected)
        s.nonfinite += int(nonfinite)
        s.consecutive = s.consecutive + 1 if (rejected or nonfinite) else 0
        limit = self.settings.max_consecutive_rejections
        if limit > 0 and s.consecutive >= limit:
            raise VkdError(
                f"step {step}: {s.consecutive} steps in a row were rejected by the mercy gate or skipped for a "
                f"non-finite loss or gradient (gate.max_consecutive_rejections={limit}); the last complete "
                "checkpoint is intact"
            )

    def state_dict(self) -> dict:
        s = self.state
        return {
            "rejected": s.rejected,
            "nonfinite": s.nonfinite,
            "consecutive": s.consecutive,
            "baseline": s.baseline,
            "baseline_step": s.baseline_step,
        }

    def load_state_dict(self, state: dict) -> None:
        for key, value in state.items():
            setattr(self.state, key, value)
