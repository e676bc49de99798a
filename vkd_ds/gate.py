"""The mercy gate (docs/gate.md): every rank agrees, before an optimizer step commits, whether to keep it.

    reject if  projected_valence < ratio · teacher_baseline_valence

- `proxy`: projected = proxy_factor · the student's mean valence (its valence head, over the
  valid positions of the global batch, from the step's own forwards); decided before the step.
- `lookahead`: take the step, let the student continue the probe prompts for `rollout_steps`
  tokens, and score the continuations with the teacher's valence head; reject => revert.
- the baseline: the teacher's valence of its own continuations of the same probe prompts,
  computed at the start, kept in the checkpoint, refreshed every `baseline_every` steps.
- arming: the gate decides nothing (every step commits) before `warmup_steps` steps and, in proxy
  mode, while the running squared error of the student head's mean valence over the global batch
  to the teacher head's (the valence MSE the decision sees) is at or above `arm_mse`: an
  uncalibrated head projects a biased mean, a rejected step leaves it as it is, and the gate would
  reject batch after batch. For the same reason an armed proxy gate disarms when the running error
  drifts to DISARM_FACTOR x `arm_mse` or above (every step commits again), and re-arms below `arm_mse`.

Every valence is read at the positions whose next token is scored (the shifted loss mask, where
L_val and the saliency read it): the head at position t forecasts the k steps after t, so on a
continuation these are the positions that forecast the generated tokens.

Every value is a sum all-reduced over ranks before the comparison, so all ranks decide alike.
The decision is applied by step_guard.StepGuard, which also skips non-finite steps (gate on or
off): a rejected or skipped step is taken and then reverted from a snapshot of this rank's share of
everything a step changes; the batch counts as consumed. With gate.enabled=false no MercyGate exists.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from vkd_ds import dist
from vkd_ds.data import Example
from vkd_ds.errors import VkdError
from vkd_ds.losses import shift_for_next_token
from vkd_ds.rollout import SamplingSettings, StudentSampler, prompt_of, rollout_batch, row_uniforms, sample
from vkd_ds.settings import GATE_MODES as GATE_MODES  # declared beside the settings field gate.mode
from vkd_ds.settings import GateSettings

BLOCKED_MESSAGE = "Mercy gate blocked – low projected valence trajectory"
# Probe draws come from their own stream, apart from sequence KD's (which is seeded by the step).
PROBE_SEED_OFFSET = 7919
# The running valence error is an exponential moving average over steps: about the last 10 global
# batches, so one lucky batch does not arm the gate.
ARM_MSE_DECAY = 0.9
# Disarming waits for an error well above the arming one (the mean's error twice as large), so the
# running error's step-to-step noise around `arm_mse` does not arm and disarm the gate in turn.
DISARM_FACTOR = 4.0


@dataclass
class GateState:
    """The teacher's cached baseline and the arming (in the checkpoint, through step_guard.StepGuard)."""

    baseline: float | None = None
    baseline_step: int | None = None  # the step the baseline was computed at
    armed_step: int | None = None  # the first step (1-based) of the gate's latest arming; None: not armed
    valence_mse: float | None = None  # proxy: running squared error of the batch's mean valence

    @property
    def armed(self) -> bool:
        return self.armed_step is not None

    def observe(self, settings: GateSettings, step: int, valence_mse: float | None) -> bool:
        """The running valence MSE updated with step `step`'s (0-based; None: no figure this step),
        then the arming: armed once the warm-up is over and (proxy) the running error is below
        `arm_mse`; (proxy) disarmed once it has drifted to DISARM_FACTOR x `arm_mse`. Whether armed."""
        if valence_mse is not None:
            previous = self.valence_mse
            self.valence_mse = (
                valence_mse if previous is None else ARM_MSE_DECAY * previous + (1 - ARM_MSE_DECAY) * valence_mse
            )
        proxy = settings.mode == "proxy"
        if self.armed:
            if proxy and self.valence_mse is not None and self.valence_mse >= DISARM_FACTOR * settings.arm_mse:
                self.armed_step = None
        elif step >= settings.warmup_steps:
            if not proxy or (self.valence_mse is not None and self.valence_mse < settings.arm_mse):
                self.armed_step = step + 1
        return self.armed


class MercyGate:
    def __init__(
        self,
        settings: GateSettings,
        engine,
        teacher,
        tokenizer,
        probe_examples: Sequence[Example],
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
        mask = shift_for_next_token(batch["input_ids"], batch["loss_mask"])[1]
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

    # ---- arming --------------------------------------------------------------------------------
    def observe(self, step: int, valence_mse: float | None) -> bool:
        """Before step `step` (0-based) is decided, with this step's global valence MSE (proxy
        mode; None in lookahead mode, or on a step skipped as non-finite, which does not count).
        Returns whether the gate decides this step (GateState.observe)."""
        return self.state.observe(self.settings, step, valence_mse)

    # ---- the decision ------------------------------------------------------------------------
    def proxy_values(self, student: float, teacher: float, count: float) -> tuple[float, float]:
        """(projected valence, squared error of the batch's valence) of the global batch, from its sums
        over the valid positions of the student's and the teacher's valence (means over the k steps),
        summed over every rank (the trainer's one read of the step). The error is the one the decision
        sees: (student's mean - teacher's mean)² over the global batch."""
        positions = max(count, 1.0)
        return self.settings.proxy_factor * student / positions, ((student - teacher) / positions) ** 2

    def projected_lookahead(self) -> float:
        return self._probe_valence(self.student_sampler)

    def rejects(self, projected: float) -> bool:
        return projected < self.settings.ratio * self.state.baseline
