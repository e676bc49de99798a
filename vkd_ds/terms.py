"""Every loss term of the objective (docs/objective.md), declared once: its name, what it needs, its function.

A term's name is its config key (`loss.<name>`, its λ) and its metrics column (`loss/<name>`).
Config validation, the objective, the demo's CE-only baseline, the benches and the tests all
derive their lists of terms from `TERMS`; adding a term is one `Term(...)` here (and its default
λ in configs/loss/default.yaml). A term declares what it reads beyond the student's forward (its
`needs`, from NEEDS): the settings refuse a configuration that cannot serve the needs of a term with
λ > 0 (the fused LM head, a teacher cache).

A term's function maps a `TermInputs` (one micro-batch) to a per-sequence value [B]: the loss is
Σ_term λ_term · term[B], weighted over the global batch by the trainer.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from vkd_ds.cross_tokenizer import CrossVocab
from vkd_ds.losses import (
    Divergence,
    SparseTeacher,
    attention_kd,
    cached_token_losses,
    divergence_per_sequence,
    feature_kd,
    info_nce,
    sequence_features,
    sequence_kd,
    token_ce,
    valence_mse,
)
from vkd_ds.sequences import Sequences

# What a term can need, beyond the student's forward on the batch.
STUDENT_LOGITS = "student_logits"  # [B,S,V]; loss.fused_head=true gives none (a fused term runs inside the head)
TEACHER_LOGITS = "teacher_logits"  # the teacher's distribution: its logits, or a teacher.cache's top-k (SparseTeacher)
DENSE_TEACHER_LOGITS = "dense_teacher_logits"  # the teacher's logits [B,S,V] themselves: the live teacher only
TEACHER_HIDDENS = "teacher_hiddens"  # the mapped layers' hidden states (feature hooks)
VALENCE_HEADS = "valence_heads"  # the student's valence head and the teacher's
ROLLOUTS = "rollouts"  # the student's samples, scored by the teacher (only on rollout steps)
NEEDS = (STUDENT_LOGITS, TEACHER_LOGITS, DENSE_TEACHER_LOGITS, TEACHER_HIDDENS, VALENCE_HEADS, ROLLOUTS)
TEACHER_NEEDS = (TEACHER_LOGITS, DENSE_TEACHER_LOGITS, TEACHER_HIDDENS, VALENCE_HEADS, ROLLOUTS)
# What training from a teacher.cache serves: `vkd-ds cache-teacher` stores the teacher's top-k token
# distribution, its entropy and its valence, not its hidden states nor its scores of the student's samples.
CACHED_TEACHER_SERVES = (STUDENT_LOGITS, TEACHER_LOGITS, VALENCE_HEADS)


@dataclass
class SampleScores:
    """The sequence-KD inputs of a micro-batch: the REINFORCE surrogate Σ_t A_t·(−log p_S(y_t)) of each
    sample (differentiable; A_t the advantages) and the teacher's mean log-prob of its tokens (a constant)."""

    weighted_nll: torch.Tensor
    teacher_logprob: torch.Tensor


@dataclass(frozen=True)
class TermParams:
    """The objective's values the terms read (the objective is a TermParams: it adds the weights' and
    the valence heads' values)."""

    lambdas: dict[str, float]
    divergence: Divergence  # the soft term's D, its temperature and parameters (loss.divergence, ...)
    chunk_tokens: int | None  # positions per loss chunk; None: `auto`, until `planned`
    vocab_size: int
    layer_map: list[tuple[int, int]] = field(default_factory=list)  # (student, teacher) layer pairs captured
    feat_normalize: bool = False  # layer-normalize both hidden states (no affine) before the MSE
    attention: float = 0.0  # weight of the attention-map part of L_feat
    contrastive: float = 0.0  # weight of the InfoNCE part of L_reg
    contrastive_temperature: float = 0.1
    fused_head: bool = False  # CE and soft KD from the student's last hidden state and LM head, no logits
    cross: CrossVocab | None = None  # the teacher reads its own tokenizer (teacher.tokenizer_path)


@dataclass
class TermInputs:
    objective: TermParams
    student: dict  # the student module's forward outputs
    teacher: dict | None  # the teacher's (logits, hiddens, attentions, valence)
    targets: torch.Tensor  # [B,S] next-token targets
    mask: torch.Tensor  # [B,S] valid positions
    rollout: SampleScores | None = None
    sequences: Sequences | None = None  # which sequence each position is in (None: one per row)
    shared: dict = field(default_factory=dict)  # values two terms compute together (_one_pass)
    pairs: tuple[torch.Tensor, torch.Tensor] | None = None  # across tokenizers: (student, teacher) positions


@dataclass(frozen=True)
class Term:
    name: str
    compute: Callable[[TermInputs], torch.Tensor]
    needs: tuple[str, ...] = field(default_factory=tuple)
    fused: bool = False  # computed inside the student module when loss.fused_head=true
    on_samples: bool = True  # applies on on-policy steps, to the student's own samples (CE does not)
    summary: str = ""

    @property
    def needs_teacher(self) -> bool:
        return any(need in self.needs for need in TEACHER_NEEDS)


def _one_pass(x: TermInputs) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(CE, token KD) from one pass over the student's logits, when a teacher cache serves both (both
    λ > 0, the logits path, one tokenizer): computed by whichever of the two terms comes first."""
    obj = x.objective
    teacher = x.teacher["logits"] if x.teacher is not None else None
    if obj.fused_head or obj.cross is not None or not isinstance(teacher, SparseTeacher):
        return None
    if not obj.lambdas["ce"] > 0 < obj.lambdas["soft"]:
        return None
    if "ce_soft" not in x.shared:
        x.shared["ce_soft"] = cached_token_losses(
            x.student["logits"],
            x.targets,
            teacher,
            x.mask,
            obj.divergence,
            obj.vocab_size,
            obj.chunk_tokens,
            x.sequences,
        )
    return x.shared["ce_soft"]


def _ce(x: TermInputs) -> torch.Tensor:
    if x.objective.fused_head:
        return x.student["ce"]
    if (pair := _one_pass(x)) is not None:
        return pair[0]
    obj = x.objective
    return token_ce(x.student["logits"], x.targets, x.mask, obj.vocab_size, obj.chunk_tokens, sequences=x.sequences)


def _soft(x: TermInputs) -> torch.Tensor:
    if x.objective.fused_head:
        return x.student["soft"]
    if (pair := _one_pass(x)) is not None:
        return pair[1]
    obj = x.objective
    if obj.cross is not None:
        return obj.cross.soft(
            x.student["logits"], x.teacher["logits"], x.pairs, obj.divergence, obj.vocab_size, obj.chunk_tokens or 1024
        )
    # Nothing reads the teacher's logits after this term: they may hold its stored gradient.
    return divergence_per_sequence(
        x.student["logits"],
        x.teacher["logits"],
        x.mask,
        obj.divergence,
        obj.vocab_size,
        obj.chunk_tokens,
        x.sequences,
        overwrite_teacher=True,
    )


def _standardize(hidden: torch.Tensor) -> torch.Tensor:
    """Zero mean, unit variance over the hidden units of each position (layer norm without affine)."""
    return F.layer_norm(hidden.float(), hidden.shape[-1:])


def _feat(x: TermInputs) -> torch.Tensor:
    obj = x.objective
    projectors = [None] * len(obj.layer_map)  # the student module already projected its hiddens
    h_s, h_t = x.student["hiddens"], x.teacher["hiddens"]
    if obj.feat_normalize:
        h_s, h_t = [_standardize(h) for h in h_s], [_standardize(h) for h in h_t]
    value = feature_kd(h_s, h_t, projectors, x.mask, x.sequences)
    if obj.attention > 0:
        attention = attention_kd(x.student["attentions"], x.teacher["attentions"], x.mask, x.sequences)
        value = value + obj.attention * attention
    return value


def _seq(x: TermInputs) -> torch.Tensor:
    r = x.rollout
    return sequence_kd(r.weighted_nll, r.teacher_logprob.to(r.weighted_nll.device))


def _val(x: TermInputs) -> torch.Tensor:
    return valence_mse(x.student["valence"], x.teacher["valence"], x.mask, x.sequences)


def _reg(x: TermInputs) -> torch.Tensor:
    obj = x.objective
    value = x.student["reg"].expand(Sequences.of(x.mask, x.sequences).count)
    if obj.contrastive > 0:
        s_feats = sequence_features(x.student["hiddens"][-1], x.mask, x.sequences)
        t_feats = sequence_features(x.teacher["hiddens"][-1], x.mask, x.sequences)
        value = value + obj.contrastive * info_nce(s_feats, t_feats, obj.contrastive_temperature)
    return value


_DECLARED = (
    Term("ce", _ce, (STUDENT_LOGITS,), fused=True, on_samples=False, summary="cross-entropy on the data's next tokens"),
    Term(
        "soft",
        _soft,
        (STUDENT_LOGITS, TEACHER_LOGITS),
        fused=True,
        summary="token-level KD: T²·D(p_T, p_S), D = loss.divergence",
    ),
    Term("feat", _feat, (TEACHER_HIDDENS,), summary="MSE of mapped hidden states (and attention maps)"),
    Term("seq", _seq, (ROLLOUTS,), summary="sequence KD: REINFORCE on the teacher's score of student samples"),
    Term("val", _val, (VALENCE_HEADS,), summary="MSE of the student's valence trajectory to the teacher's"),
    Term("reg", _reg, summary="Σ‖θ‖² of the regularized parameters (and InfoNCE with reg.contrastive)"),
)
TERMS: dict[str, Term] = {term.name: term for term in _DECLARED}
TERM_NAMES: tuple[str, ...] = tuple(TERMS)


def loss_overrides(**weights: float) -> list[str]:
    """`loss.<term>=λ` for every term: the given weights, 0 for the rest (e.g. `loss_overrides(ce=1.0)`
    is CE only). An unknown term name is an error, so a list built here can never go stale."""
    _check_names(weights)
    return [f"loss.{name}={weights.get(name, 0)}" for name in TERM_NAMES]


def only_terms(*names: str) -> list[str]:
    """`loss.<term>=0` for every term but `names`, which keep their configured λ (e.g. the demo's
    CE-only baseline: `only_terms("ce")`)."""
    _check_names(names)
    return [f"loss.{name}=0" for name in TERM_NAMES if name not in names]


def _check_names(names) -> None:
    unknown = set(names) - set(TERMS)
    if unknown:
        raise KeyError(f"unknown loss term(s) {sorted(unknown)}; the terms are {', '.join(TERM_NAMES)}")
