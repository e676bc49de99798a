"""Valence heads, saliency and per-sequence weights (docs/objective.md, Valence), as pure functions of tensors.

Shapes: B sequences, S positions, k trajectory steps, V vocabulary.
`mask[b, t]` marks the valid positions. Nothing here talks to other ranks:
the trainer gathers the global batch's saliencies and calls
`valence_weights` on them, so N ranks get exactly the weights one rank gets
on the concatenated batch.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from vkd_ds.errors import VkdError
from vkd_ds.losses import chunk_rows
from vkd_ds.sequences import Sequences, selected

DEFAULT_ALPHAS = (0.55, 0.20, 0.15, 0.10)


class ValenceHead(nn.Module):
    """Last hidden state [B,S,H] -> predicted valence of the next k steps [B,S,k], each in [0, 1], fp32.

    Computed in fp32 whatever the dtype of its weights and input: a bf16 sigmoid resolves valence
    only to about 0.004, coarser than the MSE differences L_val and the mercy gate work with.
    Reading `proj.weight` outside `proj`'s own forward is safe under ZeRO-3 because StudentModule
    registers the head's parameters as external ones, gathered for its whole forward."""

    def __init__(self, hidden_size: int, k: int = 8):
        super().__init__()
        self.k = k
        self.proj = nn.Linear(hidden_size, k)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        bias = self.proj.bias.float() if self.proj.bias is not None else None
        return torch.sigmoid(F.linear(hidden.float(), self.proj.weight.float(), bias))


def normalized_entropy(
    logits: torch.Tensor,
    mask: torch.Tensor,
    vocab_size: int | None = None,
    chunk_tokens: int = 1024,
    sequences: Sequences | None = None,
) -> torch.Tensor:
    """Mean over a sequence's valid positions of the token entropy at T = 1, divided by log(V): [B] in [0, 1].

    Computed in fp32 token chunks (no fp32 [tokens, V] copy). 0 for a sequence without valid positions.
    """
    vocab = vocab_size or logits.shape[-1]
    flat_logits = logits.flatten(0, 1)
    index = selected(mask)
    entropy = torch.empty(index.numel(), dtype=torch.float32, device=logits.device)
    chunk_tokens = chunk_rows(chunk_tokens, vocab)
    for start in range(0, index.numel(), chunk_tokens):
        chunk = flat_logits[index[start : start + chunk_tokens], :vocab].float()
        log_p = F.log_softmax(chunk, dim=-1)
        entropy[start : start + chunk_tokens] = -(log_p.exp() * log_p).sum(-1)
    return Sequences.of(mask, sequences).mean_selected(entropy, index) / math.log(vocab)


def cached_normalized_entropy(
    entropy: torch.Tensor, mask: torch.Tensor, vocab_size: int, sequences: Sequences | None = None
) -> torch.Tensor:
    """`normalized_entropy` from per-position entropies [B,S] (a teacher cache's): [B] in [0, 1]."""
    return Sequences.of(mask, sequences).mean(entropy.float(), mask) / math.log(vocab_size)


@torch.no_grad()
def saliency(
    trajectory: torch.Tensor,
    teacher_logits: torch.Tensor | None,
    mask: torch.Tensor,
    alphas: tuple[float, float, float, float] = DEFAULT_ALPHAS,
    vocab_size: int | None = None,
    chunk_tokens: int = 1024,
    entropy: torch.Tensor | None = None,
    sequences: Sequences | None = None,
) -> torch.Tensor:
    """s_i = α1·mean(V_i) + α2·min(V_i) + α3·(1 − H_i) + α4·C_i, per sequence [B], without gradient.

    trajectory [B,S,k]: the teacher's valence trajectory; V_i is its [valid positions, k] slice.
    H_i: `normalized_entropy` of the teacher's logits. C_i: mean cosine similarity of consecutive
    rows V_i[t], V_i[t+1] over the valid positions (1 when there are fewer than two: a single
    step is trivially coherent). A sequence without valid positions gets s_i = 0. `entropy` [B]: H_i
    given (`cached_normalized_entropy`), the logits unused. `sequences`: a packed batch's (one
    sequence per row by default).
    """
    a1, a2, a3, a4 = alphas
    seqs = Sequences.of(mask, sequences)
    if entropy is None:
        entropy = normalized_entropy(teacher_logits, mask, vocab_size, chunk_tokens, seqs)
    index = selected(mask)
    # The valid positions in row-major order: each sequence's in its own order, one sequence after another.
    rows = trajectory.flatten(0, 1)[index].float()  # [N, k]
    seq_of = seqs.of_positions(index)
    counts = seqs.counts(index)
    mean = seqs.mean_selected(rows.mean(-1), index)
    minimum = torch.zeros(seqs.count, dtype=torch.float32, device=rows.device)
    minimum = minimum.scatter_reduce(0, seq_of, rows.amin(-1), reduce="amin", include_self=False)
    # Coherence: consecutive valid positions of the same sequence; 1 where a sequence has fewer than two.
    # Every consecutive pair is computed and the pairs across two sequences count 0: selecting the
    # pairs (a boolean index) would make the host wait for the device.
    same = seq_of[1:] == seq_of[:-1]
    cosines = torch.where(same, F.cosine_similarity(rows[:-1], rows[1:], dim=-1), 0.0)
    pairs = (counts - 1).clamp(min=0)
    coherence = torch.zeros(seqs.count, dtype=torch.float32, device=rows.device).index_add(0, seq_of[1:], cosines)
    coherence = torch.where(pairs > 0, coherence / pairs.clamp(min=1), torch.ones_like(coherence))
    value = a1 * mean + a2 * minimum + a3 * (1.0 - entropy.to(rows.device)) + a4 * coherence
    return torch.where(counts > 0, value, torch.zeros_like(value))


def valence_weights(
    saliency: torch.Tensor,
    lam: float = 6.0,
    z_max: float | None = 3.0,
    normalize: bool = True,
    eps: float = 1e-6,
    valid: torch.Tensor | None = None,
) -> torch.Tensor:
    """w_i = exp(λ·clip(z_i, ±z_max)), z_i = (s_i − μ)/(σ + ε), μ and σ the mean and population std of
    `saliency` [B]; then scaled to mean 1 when `normalize`. `z_max=None, normalize=False` is the raw formula.

    `valid` [B] (bool): the sequences that have at least one valid position. The others (e.g. a prompt
    that fills data.max_seq_len) have no loss and no saliency: they get weight 0 and stay out of μ, σ
    and the mean-1 scaling, which their s_i = 0 would otherwise skew for every other sequence.

    Pass the whole global batch's saliencies: weights depend on the batch statistics.
    """
    s = saliency.double()
    keep = torch.ones_like(s, dtype=torch.bool) if valid is None else valid.to(s.device, torch.bool)
    # Masked reductions, not s[keep]: a boolean index (and asking whether any is valid) would make the
    # host wait for the device in the middle of a training step.
    mu, sigma = masked_mean_std(s, keep)
    z = (s - mu) / (sigma + eps)
    if z_max is not None:
        z = z.clamp(-z_max, z_max)
    w = torch.where(keep, torch.exp(lam * z), torch.zeros_like(z))
    if normalize:
        w = w / masked_mean_std(w, keep)[0]
    # Nothing to weigh (no valid sequence): every term is 0 on every sequence; weights of 1.
    return torch.where(keep.any(), w, torch.ones_like(w)).to(saliency.dtype)


def masked_mean_std(values: torch.Tensor, keep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and population std of `values` [B] where `keep` (0 and 0 where none is kept)."""
    k = keep.to(values.dtype)
    count = k.sum().clamp(min=1)
    mean = (values * k).sum() / count
    return mean, (((values - mean) ** 2) * k).sum().div(count).sqrt()


def effective_sample_size(weights: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
    """ESS = (Σw)² / Σw² as a fraction of the (valid) batch size: 1 for uniform weights, 1/B for one dominant."""
    w = weights.double()
    k = torch.ones_like(w) if valid is None else valid.to(w.device, w.dtype)
    n, total, squares = k.sum(), (w * k).sum(), (w * w * k).sum()
    ess = total**2 / squares.clamp(min=torch.finfo(w.dtype).tiny) / n.clamp(min=1)
    return torch.where(n > 0, ess, torch.ones_like(ess)).to(weights.dtype)


HEAD_FORMAT = "vkd-ds valence head v1"


def save_head(head: ValenceHead, path: str | Path, **metadata: str) -> Path:
    """Write a valence head as safetensors (k and width in the metadata), published with one rename."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {name: t.detach().float().cpu().contiguous() for name, t in head.state_dict().items()}
    meta = {"format": HEAD_FORMAT, "k": str(head.k), "hidden_size": str(head.proj.in_features), **metadata}
    staging = path.with_name(path.name + ".partial")
    save_file(tensors, str(staging), metadata=meta)
    os.replace(staging, path)
    return path


def load_head(path: str | Path, k: int, hidden_size: int, key: str = "valence.teacher_head") -> ValenceHead:
    """A valence head from `save_head`'s file, checked against the k and width it must have."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.is_file():
        raise VkdError(f"{key}: file not found: {path} (write one with `vkd-ds fit-valence-head`)")
    try:
        with safe_open(str(path), framework="pt") as handle:
            meta = handle.metadata() or {}
            tensors = {name: handle.get_tensor(name) for name in handle.keys()}
    except (SafetensorError, OSError, ValueError) as err:
        raise VkdError(f"{key}: {path} is not a safetensors file: {str(err).splitlines()[0]}") from None
    if meta.get("format") != HEAD_FORMAT or set(tensors) != {"proj.weight", "proj.bias"}:
        raise VkdError(f"{key}: {path} is not a vkd-ds valence head (no {HEAD_FORMAT!r} metadata)")
    file_k, file_width = tensors["proj.weight"].shape
    if file_k != k:
        raise VkdError(f"{key}: {path} predicts k={file_k} steps but valence.k={k}")
    if file_width != hidden_size:
        raise VkdError(f"{key}: {path} reads hidden states of width {file_width}, the model's are {hidden_size}")
    head = ValenceHead(hidden_size, k)
    head.load_state_dict(tensors)
    return head
