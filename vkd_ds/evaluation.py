"""Held-out evaluation: one function, used by training's eval steps and by `vkd-ds eval` alike."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from vkd_ds import dist
from vkd_ds.data import Example, collate, eval_shards
from vkd_ds.losses import (
    FORWARD_KL_T1,
    SparseTeacher,
    divergence_per_sequence,
    shift_for_next_token,
    token_ce,
    valence_mse,
)
from vkd_ds.objective import Objective, Teacher


class DeviceSums:
    """Named float64 sums of per-batch values, kept on the device the values are on: nothing is read
    back to the host per batch (a GPU eval never stalls on `.item()`), and values of any dtype
    (bf16 batches) or device add up without a host-side accumulator that CUDA tensors cannot be
    added into in place. Only arithmetic on the values themselves, no tensor factory."""

    NAMES = ("student_nats", "kl_nats", "divergence", "teacher_nats", "tokens", "valence_se", "top1_agree")

    def __init__(self):
        self.sums: dict[str, torch.Tensor] = {}

    def add(self, name: str, values: torch.Tensor) -> None:
        """sums[name] += Σ values."""
        if name not in self.NAMES:
            raise KeyError(f"DeviceSums: unknown sum {name!r}")
        value = values.double().sum()
        self.sums[name] = value if name not in self.sums else self.sums[name] + value

    def add_weighted(self, name: str, values: torch.Tensor, weights: torch.Tensor) -> None:
        """sums[name] += Σ values · weights (e.g. a per-sequence mean times its token count)."""
        self.add(name, values.double() * weights.double())

    def all_reduced(self, device: torch.device) -> dict[str, float]:
        """Every name's sum over all ranks (a name no batch added is 0 on every rank): one all-reduce."""
        vector = torch.zeros(len(self.NAMES), dtype=torch.float64, device=device)
        for i, name in enumerate(self.NAMES):
            if name in self.sums:
                vector[i] = self.sums[name].to(device)
        total = dist.all_reduce_sum(vector).tolist()
        return dict(zip(self.NAMES, total, strict=True))


@torch.no_grad()
def evaluate(
    engine,
    teacher: Teacher | None,
    objective: Objective,
    valid_data: Sequence[Example],
    pad_id: int,
    micro_batch_size: int,
    max_batches: int | None,
) -> dict[str, float]:
    """Token-averaged held-out CE, perplexity, KL(teacher‖student) at T = 1, the teacher's CE and,
    with both valence heads, the MSE of the student's valence trajectory to the teacher's
    (collective: every rank calls it, with its shard of `valid_data`). Per-sequence values come
    from the fp32 chunked losses; their sums are float64 and stay on the batches' device until
    one all-reduce at the end. {} without held-out data."""
    if not valid_data:
        return {}
    if objective.cross is not None:  # no teacher position matches a student position across tokenizers
        teacher = None
    device, vocab, chunk = dist.device(), objective.vocab_size, objective.chunk_tokens
    kl_measured = False
    was_training = engine.training
    engine.eval()
    sums = DeviceSums()
    for indices in eval_shards(len(valid_data), micro_batch_size, dist.world_size(), dist.rank(), max_batches):
        # Padding entries (None) keep every rank's forward count equal; their mask is emptied.
        examples = [valid_data[i if i is not None else 0] for i in indices]
        batch = {k: v.to(device) for k, v in collate(examples, pad_id).items()}
        for row, i in enumerate(indices):
            if i is None:
                batch["loss_mask"][row] = False
        targets, mask = shift_for_next_token(batch["input_ids"], batch["loss_mask"])
        counts = mask.sum(1)
        teacher_out = teacher.on_batch(batch) if teacher is not None else None
        # A teacher cache holds the teacher at its own T: KL at T = 1 only when that T is 1.
        cached = teacher_out is not None and isinstance(teacher_out["logits"], SparseTeacher)
        kl_at_t1 = teacher_out is not None and (not cached or teacher_out["logits"].temperature == 1.0)
        # KL to the teacher at T = 1, whatever the training divergence and temperature; and the
        # training divergence itself (the same number when it is forward KL at T = 1).
        inputs = objective.fused_inputs(batch, teacher_out, True, kl_at_t1, FORWARD_KL_T1)
        student_out = engine(batch["input_ids"], batch["attention_mask"], **inputs)
        trained = objective.divergence
        kl = divergence = None
        if inputs:
            ce, kl = student_out["ce"], student_out["soft"]
            if teacher_out is not None and trained != FORWARD_KL_T1:
                # The fused head computes one divergence per forward: a second one for this.
                again = objective.fused_inputs(batch, teacher_out, False, True, trained)
                divergence = engine(batch["input_ids"], batch["attention_mask"], **again)["soft"]
        else:
            logits = student_out["logits"]
            ce = token_ce(logits, targets, mask, vocab, chunk)
            if kl_at_t1:
                kl = divergence_per_sequence(logits, teacher_out["logits"], mask, FORWARD_KL_T1, vocab, chunk)
            if teacher_out is not None and trained != FORWARD_KL_T1:
                divergence = divergence_per_sequence(logits, teacher_out["logits"], mask, trained, vocab, chunk)
        if teacher_out is not None and trained == FORWARD_KL_T1:
            divergence = kl
        sums.add_weighted("student_nats", ce, counts)
        sums.add("tokens", counts)
        if teacher_out is not None:
            t_logits = teacher_out["logits"]
            if kl is not None:
                sums.add_weighted("kl_nats", kl, counts)
            sums.add_weighted("divergence", divergence, counts)
            if cached:
                sums.add("teacher_nats", -teacher_out["target_logp"])
            else:
                sums.add_weighted("teacher_nats", token_ce(t_logits, targets, mask, vocab, chunk), counts)
            if "valence" in student_out and "valence" in teacher_out:
                mse = valence_mse(student_out["valence"], teacher_out["valence"], mask)
                sums.add_weighted("valence_se", mse, counts)
            if not inputs:  # the fused LM head builds no student logits to compare
                student_top1 = logits[..., :vocab].argmax(-1)
                if cached:  # the cache's ids come most probable first
                    sums.add("top1_agree", student_top1[mask] == t_logits.ids[:, 0])
                else:
                    sums.add("top1_agree", (student_top1 == t_logits[..., :vocab].argmax(-1)) & mask)
        kl_measured = kl_at_t1
    if was_training:
        engine.train()
    total = sums.all_reduced(device)
    tokens = max(total["tokens"], 1.0)
    result = {"eval/ce": total["student_nats"] / tokens}
    result["eval/ppl"] = math.exp(min(result["eval/ce"], 50.0))
    if teacher is not None:
        if kl_measured:
            result["eval/kl_teacher"] = total["kl_nats"] / tokens
        result["eval/divergence"] = total["divergence"] / tokens  # loss.divergence at loss.temperature, ×T²
        result["eval/teacher_ce"] = total["teacher_nats"] / tokens
        result["eval/teacher_ppl"] = math.exp(min(result["eval/teacher_ce"], 50.0))
        if not objective.fused_head:
            result["eval/top1_agreement"] = total["top1_agree"] / tokens
        if objective.valence_k is not None and objective.teacher_valence:
            result["eval/valence_mse"] = total["valence_se"] / tokens
    result["eval/tokens"] = int(total["tokens"])
    return result
