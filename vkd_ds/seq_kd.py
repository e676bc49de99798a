"""Sequence-level KD (docs/objective.md, Sequence KD): rollouts from the batch's prompts, teacher rewards, the baseline.

Sequence i of the global batch gets one sample y_i of the student from its own prompt. Its
L_seq term is the teacher's mean negative log-prob of y_i. Its gradient is REINFORCE's,
Σ_t A_t·∇(−log p_S(y_t | y_<t, x)) (`losses.sequence_kd`), with advantages A_t that are
- R_i − b for every token of y_i with a sequence reward R_i (teacher_logprob, reverse_kl):
  docs/objective.md's −(R − b)·∇ log p_S(y|x), an unbiased estimate of ∇E[L_seq] for R = −L_seq;
- r_t − b with the per-token reward r_t = log p_T(y_t) − log p_S(y_t) (per_token): each sampled
  token's reverse-KL signal, credited to that token alone (on-policy distillation's estimator);
- divided by |y_i| with seq_kd.length_normalized=true (biased: long samples count less);
- divided by the global batch's standard deviation of the reward with seq_kd.normalize_advantages=true
  (a scale common to the batch: the gradient's direction within a step is kept).
L_seq joins L_base with λ = `loss.seq` and the sequence's weight w_i like every other term.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch

from vkd_ds import dist
from vkd_ds.data import Example
from vkd_ds.losses import shift_for_next_token, token_logprobs
from vkd_ds.rollout import Samples, SamplingSettings, StudentSampler, prompt_of, rollout_batch, row_uniforms
from vkd_ds.settings import BASELINES as BASELINES  # declared beside the settings field seq_kd.baseline
from vkd_ds.settings import REWARDS as REWARDS  # declared beside the settings field seq_kd.reward
from vkd_ds.settings import Settings

ADVANTAGE_EPS = 1e-8  # seq_kd.normalize_advantages: a batch whose rewards are all equal keeps 0 advantages


def is_on_policy_step(seed: int, step: int, fraction: float) -> bool:
    """Whether optimizer step `step` (from 0) runs on the student's own samples (`onpolicy.fraction`):
    a function of (seed, step) only, so every rank and every resume agrees."""
    if fraction <= 0.0:
        return False
    if fraction >= 1.0:
        return True
    return random.Random(f"onpolicy:{seed}:{step}").random() < fraction


@dataclass(frozen=True)
class SeqKDSettings:
    every_n_steps: int
    reward: str  # teacher_logprob: R = mean log p_T(y); reverse_kl: R = mean (log p_T − log p_S)(y); per_token
    baseline: str  # batch: mean R (per_token: mean r_t) of the global batch; ema: moving average over rollout steps
    baseline_decay: float
    length_normalized: bool  # advantages divided by the sample's length (biased; the estimator before issue #10)
    normalize_advantages: bool  # advantages divided by the global batch's standard deviation of the reward
    sampling: SamplingSettings
    seed: int

    @classmethod
    def from_settings(cls, cfg: Settings) -> SeqKDSettings:
        s = cfg.seq_kd
        sampling = SamplingSettings(
            n_gen=int(s.n_gen),
            temperature=float(s.temperature),
            top_p=float(s.top_p),
            prompt_tokens=int(s.prompt_tokens),
            max_seq_len=int(cfg.data.max_seq_len),
        )
        return cls(
            int(s.every_n_steps),
            str(s.reward),
            str(s.baseline),
            float(s.baseline_decay),
            bool(s.length_normalized),
            bool(s.normalize_advantages),
            sampling,
            int(cfg.trainer.seed),
        )


@dataclass
class Rollout:
    batch: dict[str, torch.Tensor]  # prompt + sample of each sequence, loss mask on the sample
    mask: torch.Tensor  # [B,S] the sampled tokens' positions (next-token aligned), on the CPU
    teacher_token_logprob: torch.Tensor  # [B,S] log p_T of each sampled token, 0 elsewhere
    student_token_logprob: torch.Tensor  # [B,S] log p_S at sampling time (T = 1), 0 elsewhere
    lengths: list[int]
    seconds: float

    @property
    def teacher_logprob(self) -> torch.Tensor:
        """[B] mean log p_T of each sample's tokens."""
        return self.teacher_token_logprob.sum(1) / self.mask.sum(1).clamp(min=1)

    @property
    def student_logprob(self) -> torch.Tensor:
        return self.student_token_logprob.sum(1) / self.mask.sum(1).clamp(min=1)

    def rewards(self, kind: str) -> torch.Tensor:
        """[B] sequence rewards, or [B,S] per-token rewards (0 off the samples) for per_token."""
        if kind == "teacher_logprob":
            return self.teacher_logprob
        if kind == "reverse_kl":
            return self.teacher_logprob - self.student_logprob
        return (self.teacher_token_logprob - self.student_token_logprob) * self.mask


class Advantages:
    """REINFORCE's advantages of a step's samples, with the baseline of the whole global batch (and,
    for seq_kd.baseline=ema, its moving average: the state a checkpoint keeps)."""

    def __init__(self, settings: SeqKDSettings):
        self.settings = settings
        self.ema: float | None = None

    def __call__(self, rollouts: list[Rollout]) -> tuple[list[torch.Tensor], dict[str, float]]:
        """The advantage of every sampled token [B,S] (0 elsewhere) for each micro-batch, b from the
        whole global batch (one all-reduce), and the step's rollout metrics."""
        s = self.settings
        per_token = s.reward == "per_token"
        local = torch.zeros(7, dtype=torch.float64)
        rewards = [r.rewards(s.reward) for r in rollouts]
        for r, reward in zip(rollouts, rewards, strict=True):
            local[0] += reward.double().sum()
            local[1] += float(r.mask.sum()) if per_token else reward.numel()  # what the baseline averages over
            local[2] += r.teacher_logprob.double().sum()
            local[3] += r.student_logprob.double().sum()
            local[4] += sum(r.lengths)
            local[5] += len(r.lengths)
            local[6] += reward.double().square().sum()  # per_token: 0 off the samples
        seconds = sum(r.seconds for r in rollouts)
        total = dist.all_reduce_sum(local)
        longest = dist.all_reduce_max(torch.tensor([float(max(max(r.lengths) for r in rollouts)), seconds]))
        sequences = float(total[5])
        batch_mean = float(total[0]) / max(float(total[1]), 1.0)
        # The reward's spread over the global batch, from global sums: the same on every rank.
        batch_std = max(float(total[6]) / max(float(total[1]), 1.0) - batch_mean**2, 0.0) ** 0.5
        scale = 1.0 / (batch_std + ADVANTAGE_EPS) if s.normalize_advantages else 1.0
        if s.baseline == "batch":
            baseline = batch_mean
        else:
            baseline = batch_mean if self.ema is None else self.ema
            decay = s.baseline_decay
            self.ema = batch_mean if self.ema is None else decay * self.ema + (1 - decay) * batch_mean
        advantages = []
        for r, reward in zip(rollouts, rewards, strict=True):
            advantage = (reward if per_token else reward[:, None]) - baseline
            advantage = advantage * r.mask
            if s.normalize_advantages:
                advantage = advantage * scale
            if s.length_normalized:
                advantage = advantage / r.mask.sum(1, keepdim=True).clamp(min=1)
            advantages.append(advantage)
        stats = {
            "seq/teacher_logprob": float(total[2]) / sequences,
            "seq/student_logprob": float(total[3]) / sequences,
            "seq/reward": batch_mean,
            "seq/baseline": baseline,
            "seq/gen_len_mean": float(total[4]) / sequences,
            "seq/gen_len_max": float(longest[0]),
            # Generated tokens of all ranks over the slowest rank's sampling time.
            "seq/rollout_tokens_per_s": float(total[4]) / max(float(longest[1]), 1e-9),
        }
        return advantages, stats


class SequenceKD:
    """The student's samples of a step (for L_seq, and for on-policy steps) and L_seq's advantages.
    `seq_term`: L_seq is in the objective (else this only samples, for on-policy steps)."""

    def __init__(
        self,
        settings: SeqKDSettings,
        sampler: StudentSampler,
        teacher,
        tokenizer,
        chunk_tokens: int,
        seq_term: bool = True,
    ):
        self.settings = settings
        self.seq_term = seq_term
        self.sampler = sampler
        self.teacher = teacher
        self.vocab_size = len(tokenizer)
        self.eos_id = tokenizer.eos_token_id
        self.pad_id = tokenizer.pad_token_id
        self.chunk_tokens = chunk_tokens
        self._advantages = Advantages(settings)  # holds the moving baseline (checkpointed)

    def due(self, step: int) -> bool:
        """L_seq's rollouts are due at this step."""
        return self.seq_term and step % self.settings.every_n_steps == 0

    def sample_batch(self, examples: list[Example], step: int, first_row: int) -> tuple[dict, Samples]:
        """The student's samples for `examples`, rows first_row.. of the global batch (which seeds each
        row's draws), as a batch on the device: prompt + sample, the loss mask on the sample."""
        s = self.settings
        prompts = [prompt_of(ex, s.sampling) for ex in examples]
        rows = list(range(first_row, first_row + len(examples)))
        uniforms = row_uniforms(s.seed, step, rows, s.sampling.n_gen)
        samples = self.sampler(prompts, uniforms, s.sampling, self.vocab_size, self.eos_id, self.pad_id)
        batch = {k: v.to(dist.device()) for k, v in rollout_batch(samples, self.pad_id).items()}
        return batch, samples

    def score(self, batch: dict, samples: Samples, teacher_logits: torch.Tensor) -> Rollout:
        """The samples' rewards from the teacher's logits on `batch` (one teacher forward)."""
        targets, mask = shift_for_next_token(batch["input_ids"], batch["loss_mask"])
        teacher_lp = token_logprobs(teacher_logits, targets, mask, self.vocab_size, self.chunk_tokens).cpu()
        mask = mask.cpu()
        # The sampled tokens' positions, in order, are the mask's: place the sampler's log-probs there.
        student_lp = torch.zeros_like(teacher_lp)
        student_lp[mask] = torch.tensor([lp for row in samples.token_logprobs for lp in row], dtype=torch.float32)
        return Rollout(batch, mask, teacher_lp, student_lp, samples.lengths, samples.seconds)

    def rollout(self, examples: list[Example], step: int, first_row: int) -> Rollout:
        batch, samples = self.sample_batch(examples, step, first_row)
        return self.score(batch, samples, self.teacher(batch["input_ids"], batch["attention_mask"])["logits"])

    def advantages(self, rollouts: list[Rollout]) -> tuple[list[torch.Tensor], dict[str, float]]:
        return self._advantages(rollouts)

    def state_dict(self) -> dict:
        return {"ema_baseline": self._advantages.ema}

    def load_state_dict(self, state: dict) -> None:
        self._advantages.ema = state.get("ema_baseline")
