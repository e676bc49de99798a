"""Run under the deepspeed launcher: a step the mercy gate rejects, against a run where that step never
happened. Engine A takes batches b1, b2, b3 with the step at REJECT (argv[1]: 1 or 2) rejected; engine B,
of the same seed, takes the same batches without it. Each rank saves OUT_DIR/rank_R.pt: its live
parameters (`p.data` where gathered, every ZeRO-3 partition), master weights, optimizer state, LR and
DeepSpeed's counters right after the revert and at the end, and every step's loss."""

import sys

import torch
from student_setup import student_engine  # the script's directory is on sys.path

from vkd_ds import dist
from vkd_ds.data import collate
from vkd_ds.gate import MercyGate
from vkd_ds.launch import leave, strip_local_rank
from vkd_ds.phase_clock import PhaseClock
from vkd_ds.step_guard import StepGuard
from vkd_ds.step_snapshot import StepSnapshot

sys.argv[1:] = strip_local_rank(sys.argv[1:])  # the launcher's --local_rank comes first
REJECT = int(sys.argv.pop(1))


def live_state(engine) -> dict:
    """What the next forward and step read, as this rank holds it now (copied)."""
    state = {}
    for name, p in engine.module.named_parameters():
        if p.data.numel() > 0:
            state[f"data:{name}"] = p.data.clone()
        if hasattr(p, "ds_tensor"):
            state[f"partition:{name}"] = p.ds_tensor.data.clone()
    optimizer = engine.optimizer
    base = getattr(optimizer, "optimizer", optimizer)
    for i, value in enumerate(base.state.values()):
        for k, v in value.items():
            state[f"optim:{i}:{k}"] = v.clone() if isinstance(v, torch.Tensor) else torch.tensor(float(v))
    for attr in StepSnapshot.MASTER_ATTRS:
        for i, t in enumerate(getattr(optimizer, attr, None) or []):
            state[f"master:{attr}:{i}"] = t.clone()
    state["lr"] = torch.tensor([g["lr"] for g in base.param_groups], dtype=torch.float64)
    state["counters"] = torch.tensor([engine.global_steps, engine.global_samples, engine.skipped_steps])
    return state


def step(engine, guard, batch, number, valence) -> float:
    out = engine(batch["input_ids"], batch["attention_mask"])
    logits = out["logits"][:, :-1].float()
    targets = batch["input_ids"][:, 1:].reshape(-1)
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets)
    engine.backward(loss)
    # The proxy gate: the student's valence sum over 10 positions against a teacher baseline of 0.5.
    guard.commit(number, False, valence_sum=10 * valence, teacher_valence=5.0, valence_count=10.0)
    return loss.item()


out_dir, settings, prepared, engine_a = student_engine(seed=7)
_, _, _, engine_b = student_engine(seed=7)
rank = dist.rank()
rows = [prepared.train_data[i] for i in range(12)]
batches = [collate(rows[rank * 2 + 4 * i : rank * 2 + 4 * i + 2], prepared.tokenizer.pad_token_id) for i in range(3)]


def guard_of(engine):
    gate = MercyGate(settings.gate, engine, None, prepared.tokenizer, prepared.train_data, 1, None, 48)
    gate.state.baseline = 0.5
    return StepGuard(engine, gate, 0, PhaseClock(False, False), __import__("logging").getLogger("revert"))


guard_a, guard_b = guard_of(engine_a), guard_of(engine_b)
KEEP, REJECTED = 1.0, 0.0  # projected = proxy_factor x valence against ratio x 0.5
result = {"a": {"losses": []}, "b": {"losses": []}}
for number, batch in enumerate(batches, start=1):
    rejected = number == REJECT
    result["a"]["losses"].append(step(engine_a, guard_a, batch, number - 1, REJECTED if rejected else KEEP))
    if rejected:
        result["a"]["reverted"] = live_state(engine_a)
        result["b"]["reverted"] = live_state(engine_b)  # B, which never sees this batch, as it stands
        continue
    result["b"]["losses"].append(step(engine_b, guard_b, batch, guard_b.engine.global_steps, KEEP))
result["a"]["rejected"] = guard_a.counts.rejected
result["a"]["after"] = live_state(engine_a)
result["b"]["after"] = live_state(engine_b)
torch.save(result, out_dir / f"rank_{rank}.pt")

dist.barrier()
leave(0)
