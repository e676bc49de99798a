"""Sequence KD's samples of a step, per micro-batch: the student's continuations scored by the teacher,
with their advantages, and the samples that replace an on-policy step's sequences."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from vkd_ds.data import Example
from vkd_ds.phase_clock import PhaseClock
from vkd_ds.rollout import Samples
from vkd_ds.seq_kd import SequenceKD
from vkd_ds.step_layout import StepLayout


@dataclass
class PendingRollout:
    """A micro-batch's samples (as a batch), the teacher's mean log-prob of them and the advantage of
    every sampled token."""

    batch: dict
    teacher_logprob: torch.Tensor  # [B]
    token_advantage: torch.Tensor  # [B,S], 0 off the samples


class StepRollouts:
    def __init__(self, seq_kd: SequenceKD | None, layout: StepLayout, clock: PhaseClock):
        """`seq_kd`: None when neither L_seq nor on-policy steps are on."""
        self.seq_kd = seq_kd
        self.layout = layout
        self.clock = clock

    def on_policy_samples(
        self, step: int, examples: list[list[Example]], counts: np.ndarray
    ) -> list[tuple[dict, Samples]]:
        """On an on-policy step: every micro-batch's sequences replaced by the student's samples from
        their prompts (as batches of one sample per row, the loss mask on the samples)."""
        with self.clock("rollout"):
            return [
                self.seq_kd.sample_batch(ex, step, self.layout.first_document(counts, a))
                for a, ex in enumerate(examples)
            ]

    def scored(
        self,
        step: int,
        examples: list[list[Example]],
        counts: np.ndarray,
        stats: dict,
        on_policy: list[tuple[dict, Samples]] | None,
        teacher_outs: list[dict | None],
    ) -> list[PendingRollout | None]:
        """Sequence KD's samples of every micro-batch, scored by the teacher, with their advantages
        (the baseline is a statistic of the whole global batch); [None] * accum off rollout steps.
        On an on-policy step they are that step's samples (the same draws), scored by its teacher pass."""
        if self.seq_kd is None or not self.seq_kd.due(step):
            return [None] * len(examples)
        with self.clock("rollout"):
            if on_policy is not None:
                samples = [
                    self.seq_kd.score(batch, drawn, out["logits"])
                    for (batch, drawn), out in zip(on_policy, teacher_outs, strict=True)
                ]
            else:
                samples = [
                    self.seq_kd.rollout(ex, step, self.layout.first_document(counts, a))
                    for a, ex in enumerate(examples)
                ]
            advantages, seq_stats = self.seq_kd.advantages(samples)
        stats.update(seq_stats)
        # The student's log-prob of its samples comes later, with the micro-batch's forward.
        return [PendingRollout(s.batch, s.teacher_logprob, adv) for s, adv in zip(samples, advantages, strict=True)]
