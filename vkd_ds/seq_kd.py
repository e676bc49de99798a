"""Sequence-level KD (SPEC §2, L_seq): rollouts from the batch's prompts, teacher rewards, the baseline.

Sequence i of the global batch gets one sample y_i of the student from its own prompt. Its
L_seq term is the teacher's mean negative log-prob of y_i, with the REINFORCE gradient
−(R_i − b)∇ mean log p_S(y_i) (`losses.sequence_kd`); L_seq joins L_base with λ = `loss.seq` and
the sequence's weight w_i like every other term.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from vkd_ds import dist
from vkd_ds.data import Example
from vkd_ds.losses import shift_for_next_token, token_ce
from vkd_ds.rollout import SamplingSettings, StudentSampler, prompt_of, rollout_batch, row_uniforms
from vkd_ds.settings import Settings

REWARDS = ("teacher_logprob", "reverse_kl")
BASELINES = ("batch", "ema")


@dataclass(frozen=True)
class SeqKDSettings:
    every_n_steps: int
    reward: str  # teacher_logprob: R = mean log p_T(y); reverse_kl: R = mean (log p_T − log p_S)(y)
    baseline: str  # batch: mean R of the global batch; ema: moving average over rollout steps
    baseline_decay: float
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
            sampling,
            int(cfg.trainer.seed),
        )


@dataclass
class Rollout:
    batch: dict[str, torch.Tensor]  # prompt + sample of each sequence, loss mask on the sample
    teacher_logprob: torch.Tensor  # [B] mean log p_T of each sample's tokens
    student_logprob: torch.Tensor  # [B] mean log p_S, at sampling time
    reward: torch.Tensor  # [B]
    lengths: list[int]
    seconds: float


class SequenceKD:
    def __init__(self, settings: SeqKDSettings, sampler: StudentSampler, teacher, tokenizer, chunk_tokens: int):
        self.settings = settings
        self.sampler = sampler
        self.teacher = teacher
        self.vocab_size = len(tokenizer)
        self.eos_id = tokenizer.eos_token_id
        self.pad_id = tokenizer.pad_token_id
        self.chunk_tokens = chunk_tokens
        self.ema: float | None = None  # the moving-average baseline (checkpointed)

    def due(self, step: int) -> bool:
        return step % self.settings.every_n_steps == 0

    def rollout(self, examples: list[Example], step: int, first_row: int) -> Rollout:
        """Samples for `examples`, rows first_row.. of the global batch (which seeds each row's draws)."""
        s = self.settings
        prompts = [prompt_of(ex, s.sampling) for ex in examples]
        rows = list(range(first_row, first_row + len(examples)))
        uniforms = row_uniforms(s.seed, step, rows, s.sampling.n_gen)
        samples = self.sampler(prompts, uniforms, s.sampling, self.vocab_size, self.eos_id, self.pad_id)
        batch = {k: v.to(dist.device()) for k, v in rollout_batch(samples, self.pad_id).items()}
        targets, mask = shift_for_next_token(batch["input_ids"], batch["loss_mask"])
        # One teacher forward scores every continuation of the micro-batch.
        logits = self.teacher(batch["input_ids"], batch["attention_mask"])["logits"]
        teacher_logprob = -token_ce(logits, targets, mask, self.vocab_size, self.chunk_tokens).cpu()
        del logits
        reward = teacher_logprob
        if s.reward == "reverse_kl":
            reward = teacher_logprob - samples.student_logprob
        return Rollout(batch, teacher_logprob, samples.student_logprob, reward, samples.lengths, samples.seconds)

    def advantages(self, rollouts: list[Rollout]) -> tuple[list[torch.Tensor], dict[str, float]]:
        """R − b for each micro-batch's rows, b from the whole global batch (one all-reduce), and the
        step's rollout metrics."""
        local = torch.zeros(6, dtype=torch.float64)
        for r in rollouts:
            local[0] += r.reward.double().sum()
            local[1] += r.reward.numel()
            local[2] += r.teacher_logprob.double().sum()
            local[3] += r.student_logprob.double().sum()
            local[4] += sum(r.lengths)
        seconds = sum(r.seconds for r in rollouts)
        total = dist.all_reduce_sum(local)
        longest = dist.all_reduce_max(torch.tensor([float(max(max(r.lengths) for r in rollouts)), seconds]))
        count = float(total[1])
        batch_mean = float(total[0]) / count
        if self.settings.baseline == "batch":
            baseline = batch_mean
        else:
            baseline = batch_mean if self.ema is None else self.ema
            decay = self.settings.baseline_decay
            self.ema = batch_mean if self.ema is None else decay * self.ema + (1 - decay) * batch_mean
        stats = {
            "seq/teacher_logprob": float(total[2]) / count,
            "seq/student_logprob": float(total[3]) / count,
            "seq/reward": batch_mean,
            "seq/baseline": baseline,
            "seq/gen_len_mean": float(total[4]) / count,
            "seq/gen_len_max": float(longest[0]),
            # Generated tokens of all ranks over the slowest rank's sampling time.
            "seq/rollout_tokens_per_s": float(total[4]) / max(float(longest[1]), 1e-9),
        }
        return [r.reward - baseline for r in rollouts], stats

    def state_dict(self) -> dict:
        return {"ema_baseline": self.ema}

    def load_state_dict(self, state: dict) -> None:
        self.ema = state.get("ema_baseline")
