"""The objective from the checked settings, built here (the composition root) so that the objective
and its terms need not know the settings."""

from __future__ import annotations

from vkd_ds.cross_tokenizer import CrossVocab
from vkd_ds.losses import Divergence
from vkd_ds.objective import Objective
from vkd_ds.settings import Settings


def build_objective(
    s: Settings, layer_map: list[tuple[int, int]], vocab_size: int, cross: CrossVocab | None = None
) -> Objective:
    """The objective of the settings `s`, capturing the (student, teacher) layer pairs `layer_map` where
    a term needs hidden states, over a vocabulary of `vocab_size`; `cross`: the teacher's own tokenizer
    (teacher.tokenizer_path), when it differs."""
    lambdas = dict(s.loss.weights)
    contrastive = float(s.reg.contrastive) if lambdas["reg"] > 0 else 0.0
    captures = lambdas["feat"] > 0 or contrastive > 0
    lam = float(s.weighting.lam)
    return Objective(
        lambdas=lambdas,
        divergence=Divergence(s.loss.divergence, float(s.loss.temperature), float(s.loss.beta), float(s.loss.alpha)),
        chunk_tokens=None if s.loss.chunk_tokens == "auto" else int(s.loss.chunk_tokens),
        vocab_size=vocab_size,
        layer_map=list(layer_map) if captures else [],
        feat_normalize=bool(s.feat.normalize),
        attention=float(s.feat.attention) if lambdas["feat"] > 0 else 0.0,
        contrastive=contrastive,
        contrastive_temperature=float(s.reg.contrastive_temperature),
        valence_k=int(s.valence.k) if lambdas["val"] > 0 else None,
        # The head serves L_val and the weights' saliency (the settings require it for them);
        # with λ = 0 and L_val off the weights are uniform and no saliency is computed.
        teacher_valence=s.valence_feeds_the_loss,
        lam=lam,
        z_max=None if s.weighting.z_max is None else float(s.weighting.z_max),
        normalize=bool(s.weighting.normalize),
        alphas=tuple(float(a) for a in s.weighting.alphas),
        eps=float(s.weighting.eps),
        fused_head=bool(s.loss.fused_head),
        cross=cross,
    )
