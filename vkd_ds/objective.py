"""The full objective (docs/objective.md) on one micro-batch: which terms run, what each needs, their values.

Pure apart from the forward passes it is handed: the global parts (the
weights' batch statistics, the weight sum) come from the trainer, which owns
the collectives.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from vkd_ds.features import HiddenCapture
from vkd_ds.losses import Divergence, shift_for_next_token, token_ce
from vkd_ds.malloc import teacher_phase
from vkd_ds.sequences import Sequences, model_inputs
from vkd_ds.terms import ROLLOUTS, TERM_NAMES, TERMS, SampleScores, TermInputs, TermParams
from vkd_ds.valence import ValenceHead, cached_normalized_entropy, saliency


@dataclass(frozen=True)
class Objective(TermParams):
    """The terms' values (TermParams) and those of the weights and the valence heads; built from the
    settings by `build_objective`, at the composition root (build.py)."""

    valence_k: int | None = None  # the student's head (trained by L_val)
    teacher_valence: bool = False  # the teacher's head (L_val targets and saliency)
    lam: float = 0.0
    z_max: float | None = 3.0
    normalize: bool = True
    alphas: tuple[float, ...] = (0.55, 0.20, 0.15, 0.10)
    eps: float = 1e-6

    @property
    def active(self) -> list[str]:
        return [t for t in TERM_NAMES if self.lambdas[t] > 0]

    def active_at(self, rollout_step: bool, on_policy: bool = False) -> list[str]:
        """The terms computed at a step: terms on the student's samples only on rollout steps; on an
        on-policy step only those that apply to the student's samples (not CE)."""
        return [
            t
            for t in self.active
            if (rollout_step or ROLLOUTS not in TERMS[t].needs) and (not on_policy or TERMS[t].on_samples)
        ]

    @property
    def needs_teacher(self) -> bool:
        """The teacher runs when a term needs it, or InfoNCE (its features) or non-uniform weights (its valence)."""
        return any(TERMS[t].needs_teacher for t in self.active) or self.contrastive > 0 or self.lam > 0

    @property
    def student_layers(self) -> list[int]:
        return [s for s, _ in self.layer_map]

    @property
    def teacher_layers(self) -> list[int]:
        return [t for _, t in self.layer_map]

    def saliency(self, teacher_out: dict, mask: torch.Tensor, sequences: Sequences | None = None) -> torch.Tensor:
        """s_i of each sequence; the token entropy from the teacher's logits, or as a teacher cache stores it."""
        entropy = None
        if "entropy" in teacher_out:
            entropy = cached_normalized_entropy(teacher_out["entropy"], mask, self.vocab_size, sequences)
        return saliency(
            teacher_out["valence"],
            teacher_out["logits"],
            mask,
            self.alphas,
            self.vocab_size,
            self.chunk_tokens,
            entropy=entropy,
            sequences=sequences,
        )

    def planned(self, hidden: int, dtype, on_gpu: bool, free_bytes: int) -> Objective:
        """This objective with `loss.chunk_tokens=auto` planned (losses.plan_chunk_rows) for a student of
        width `hidden` whose logits are `dtype`; itself when the config set a number."""
        if self.chunk_tokens is not None:
            return self
        from vkd_ds.losses import plan_chunk_rows

        rows = plan_chunk_rows(self.vocab_size, hidden, dtype, on_gpu, free_bytes, fused=self.fused_head)
        return replace(self, chunk_tokens=rows)

    def fused_inputs(
        self,
        batch: dict,
        teacher_out: dict | None,
        ce: bool,
        soft: bool,
        divergence: Divergence | None = None,
    ) -> dict:
        """The student forward's `fused` argument (empty without the fused LM head); `divergence`
        defaults to the training objective's (eval also measures forward KL at T = 1)."""
        if not self.fused_head:
            return {}
        targets, mask = shift_for_next_token(batch["input_ids"], batch["loss_mask"])
        fused = {
            "mask": mask,
            "targets": targets if ce else None,
            "teacher_logits": teacher_out["logits"] if soft else None,
            "divergence": self.divergence if divergence is None else divergence,
            "vocab_size": self.vocab_size,
            "chunk_tokens": self.chunk_tokens,
            "sequences": Sequences.of_batch(batch),
        }
        return {"fused": fused}

    def train_inputs(self, batch: dict, teacher_out: dict | None, on_policy: bool = False) -> dict:
        active = self.active_at(rollout_step=False, on_policy=on_policy)
        return self.fused_inputs(batch, teacher_out, "ce" in active, "soft" in active)

    def student_nll(self, engine, batch: dict, token_weights: torch.Tensor) -> torch.Tensor:
        """[B] Σ_t token_weights[b,t]·(−log p_S) of each sequence's target tokens, differentiable (one
        student forward); with the advantages as weights, the REINFORCE surrogate of L_seq."""
        targets, mask = shift_for_next_token(batch["input_ids"], batch["loss_mask"])
        token_weights = token_weights.to(mask.device)
        fused = self.fused_inputs(batch, None, True, False)
        if fused:
            fused["fused"]["token_weights"] = token_weights
        out = engine(**model_inputs(batch), **fused)
        if self.fused_head:
            return out["ce"]
        sequences = Sequences.of_batch(batch)
        return token_ce(out["logits"], targets, mask, self.vocab_size, self.chunk_tokens, token_weights, sequences)

    def terms(
        self, student_out: dict, teacher_out: dict | None, batch: dict, on_policy: bool = False
    ) -> tuple[dict, torch.Tensor]:
        """Per-sequence values [B] of the active terms on the batch (not those on sequence KD's
        rollouts: rollout_terms), and the valid-position mask [B,S]. `on_policy`: the batch is the
        student's own samples."""
        targets, mask = shift_for_next_token(batch["input_ids"], batch["loss_mask"])
        pairs = (batch["pairs_student"], batch["pairs_teacher"]) if "pairs_student" in batch else None
        inputs = TermInputs(
            self, student_out, teacher_out, targets, mask, sequences=Sequences.of_batch(batch), pairs=pairs
        )
        names = self.active_at(rollout_step=False, on_policy=on_policy)
        return {name: TERMS[name].compute(inputs) for name in names}, mask

    def rollout_terms(self, rollout: SampleScores, mask: torch.Tensor) -> dict:
        """Per-sequence values [B] of the active terms on the student's samples (L_seq)."""
        inputs = TermInputs(self, {}, None, mask, mask, rollout)
        return {name: TERMS[name].compute(inputs) for name in self.active if ROLLOUTS in TERMS[name].needs}


class Teacher:
    """The frozen teacher engine, its capture hooks and its valence head: one no-grad forward gives
    logits, mapped hidden states, attention maps and the valence trajectory as the objective needs."""

    def __init__(self, engine, objective: Objective, valence_head: ValenceHead | None):
        self.engine = engine
        self.valence_head = valence_head
        self.capture = HiddenCapture(
            engine.module,
            objective.teacher_layers,
            attention=objective.attention > 0,
            last=valence_head is not None,
        )

    def on_batch(self, batch: dict) -> dict:
        """The teacher's outputs on a collated batch (what a teacher.cache's CachedTeacher also gives); on
        the batch's rows in the teacher's tokens when it has them (across tokenizers)."""
        if "teacher_input_ids" in batch:
            return self(batch["teacher_input_ids"], batch["teacher_attention_mask"])
        return self(**model_inputs(batch))

    @torch.no_grad()
    def __call__(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, position_ids: torch.Tensor | None = None
    ) -> dict:
        """`position_ids` without `attention_mask`: a packed batch (model_inputs)."""
        with teacher_phase():
            out = self.engine(
                input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False
            )
            logits = out.logits
        hiddens, attentions, last = self.capture.take()
        out = {"logits": logits, "hiddens": hiddens, "attentions": attentions}
        if self.valence_head is not None:
            out["valence"] = self.valence_head(last)  # fp32, whatever the teacher's precision
        return out
