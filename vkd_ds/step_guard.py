"""The commit of an optimizer step: taken, or taken and reverted, the same on every rank.

`StepGuard.commit` is the one place a step is decided. It is skipped (taken and reverted exactly,
its batch consumed) when the loss or the gradient is not finite on any rank, or DeepSpeed itself
discarded it; with the mercy gate on (gate.py) it is rejected when the projected valence falls below
`gate.ratio` × the teacher's baseline: in proxy mode before the step, in lookahead mode after it.
`gate.max_consecutive_rejections` skipped or rejected steps in a row end the run, gate on or off.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from collections import defaultdict
from dataclasses import dataclass

import torch

from vkd_ds import dist
from vkd_ds.errors import VkdError
from vkd_ds.gate import BLOCKED_MESSAGE, DISARM_FACTOR, GateState, MercyGate


@dataclass
class GuardCounts:
    """Metrics and checkpoint."""

    rejected: int = 0  # steps the gate rejected
    nonfinite: int = 0  # steps skipped for a non-finite loss or gradient
    consecutive: int = 0  # rejected or skipped in a row, up to now
    consecutive_rejected: int = 0  # of which the gate rejected (the rest were non-finite)


class StepSnapshot:
    """This rank's share of everything an optimizer step changes, copied aside before the step and
    written back to revert it: its parameters (under ZeRO-3 its partitions), the fp32 master
    partition, the optimizer state (Adam's exp_avg, exp_avg_sq, step), the hyperparameters of every
    parameter group (the LR the scheduler wrote), the LR scheduler's state, the loss scaler and
    DeepSpeed's step counters. A reverted step leaves all of it as if the step never happened.

    Under ZeRO-3 a rank's live parameters are more than its partitions: DeepSpeed's step frees the
    parameters and re-gathers the small persistent ones (norms, biases, every tensor under
    stage3_param_persistence_threshold) into new buffers, and ZeRO++'s secondary partitions copy the
    primary ones. So the revert is bracketed the way DeepSpeed brackets a checkpoint load: every
    gathered copy released, the partitions written, the persistent parameters gathered again from
    them (a collective: every rank reverts the same step).

    The copies go to host buffers allocated at the first snapshot and reused, one per dtype (pinned
    when the state is on a GPU; PyTorch's pinned allocator may round each up to a power of two): for
    fp32 Adam about 16 bytes per parameter (parameters 4, master 4 when separate, moments 8), the
    moments and master divided by the world size under ZeRO 1-3, the parameters too under ZeRO-3,
    held from the first step that may be reverted on."""

    MASTER_ATTRS = ("fp32_partitioned_groups_flat", "single_partition_of_fp32_groups", "fp32_groups_flat_partition")
    COUNTERS = ("global_steps", "global_samples", "skipped_steps")

    def __init__(self, engine):
        self.engine = engine
        self._buffers: dict[tuple, torch.Tensor] = {}
        self._layout: list | None = None
        self._saved = None

    def _base(self):
        optimizer = self.engine.optimizer
        return optimizer, getattr(optimizer, "optimizer", optimizer)  # ZeRO wrappers hold the torch optimizer

    def _live(self, state_params: list) -> dict[tuple, torch.Tensor]:
        """The live tensors a step changes, by a key that names each one's role (the optimizer state by
        its place in `state_params`). Looked up afresh at every snapshot and every revert: a step may
        move ZeRO-3's parameters to new buffers, and loading a checkpoint replaces the optimizer's
        parameter groups and state."""
        optimizer, base = self._base()
        live: dict[tuple, torch.Tensor] = {}
        for name, param in self.engine.module.named_parameters():
            partition = getattr(param, "ds_tensor", None)
            # ZeRO-3: the partition is the parameter; its gathered copies are rebuilt from it.
            live[("param", name)] = param.data if partition is None else partition.data
        for attr in self.MASTER_ATTRS:
            for i, t in enumerate(getattr(optimizer, attr, None) or []):
                live[(attr, i)] = t
        for g, group in enumerate(base.param_groups):  # ZeRO-3 fills these only during its step
            for i, param in enumerate(group["params"]):
                live[("group", g, i)] = param.data
        for n, param in enumerate(state_params):
            for k, v in base.state[param].items():
                if isinstance(v, torch.Tensor):
                    live[("state", n, k)] = v
        return {key: t for key, t in live.items() if t.numel() > 0}

    def _slots(self, unique: dict[tuple, torch.Tensor]) -> dict[tuple, torch.Tensor]:
        """Host buffers for these tensors, as views into one flat buffer per dtype, allocated when the
        layout first appears (or changes: a checkpoint loaded) and reused by every later snapshot.
        One allocation per dtype, not one per tensor: PyTorch's pinned allocator rounds each request
        up to a power of two."""
        layout = [(key, tuple(t.shape), t.dtype) for key, t in unique.items()]
        if layout != self._layout:
            pinned = any(t.is_cuda for t in unique.values())
            totals: dict[torch.dtype, int] = defaultdict(int)
            for _, shape, dtype in layout:
                totals[dtype] += math.prod(shape)
            flats = {dtype: torch.empty(n, dtype=dtype, pin_memory=pinned) for dtype, n in totals.items()}
            offsets: dict[torch.dtype, int] = defaultdict(int)
            self._buffers = {}
            for key, shape, dtype in layout:
                n = math.prod(shape)
                self._buffers[key] = flats[dtype][offsets[dtype] : offsets[dtype] + n].view(shape)
                offsets[dtype] += n
            self._layout = layout
        return self._buffers

    @torch.no_grad()
    def take(self) -> None:
        optimizer, base = self._base()
        state_params = list(base.state)  # ZeRO keys Adam's state by its flat master partitions
        live = self._live(state_params)
        first_of: dict[tuple, tuple] = {}  # one copy of a tensor that several keys name (aliases)
        alias: dict[tuple, tuple] = {}
        for key, t in live.items():
            identity = (t.untyped_storage().data_ptr(), t.storage_offset(), t.numel(), t.dtype)
            alias[key] = first_of.setdefault(identity, key)
        unique = {key: t for key, t in live.items() if alias[key] == key}
        buffers = self._slots(unique)
        for key, t in unique.items():
            buffers[key].copy_(t, non_blocking=True)
        stored = {key: buffers[first] for key, first in alias.items()}
        if any(t.is_cuda for t in live.values()):
            torch.cuda.synchronize()  # the step must not change a tensor before its copy is done
        # The optimizer state's non-tensor entries (e.g. a step count kept as a number).
        plain = [
            {k: copy.deepcopy(v) for k, v in base.state[p].items() if not isinstance(v, torch.Tensor)}
            for p in state_params
        ]
        scaler = self._loss_scaler()
        scale_config = getattr(optimizer, "loss_scale_config", None)
        self._saved = {
            "stored": stored,
            "state_params": state_params,
            "plain_state": plain,
            "groups": [[{k: _clone(v) for k, v in g.items() if k != "params"} for g in gs] for gs in self._groups()],
            "scheduler": _clone(self.engine.lr_scheduler.state_dict()) if self.engine.lr_scheduler else None,
            "counters": {name: getattr(self.engine, name) for name in self.COUNTERS},
            "loss_scaler": copy.deepcopy(vars(scaler)) if scaler is not None else None,
            "loss_scale_config": copy.deepcopy(vars(scale_config)) if scale_config is not None else None,
        }

    def _groups(self) -> list[list[dict]]:
        optimizer, base = self._base()
        return [optimizer.param_groups] + ([base.param_groups] if base is not optimizer else [])

    def _loss_scaler(self):
        """DeepSpeed's loss scaler, where the optimizer has one (static at 1 in fp32 and bf16; vkd-ds
        never enables fp16, whose dynamic scaler a reverted step must not advance either)."""
        return getattr(self.engine.optimizer, "loss_scaler", None)

    def discard(self) -> None:
        self._saved = None

    @torch.no_grad()
    def restore(self) -> None:
        saved, self._saved = self._saved, None
        optimizer, base = self._base()
        zero3 = hasattr(optimizer, "checkpoint_event_prologue")
        if zero3:
            optimizer.checkpoint_event_prologue()  # releases every gathered parameter
        had_state = {id(p) for p in saved["state_params"]}
        created = [p for p in base.state if id(p) not in had_state]
        for param in created:
            del base.state[param]  # state the reverted step created (Adam's first step)
        if created and getattr(optimizer, "_hp_optimizer_states_linked", False):
            # ZeRO-1/2 and the bf16 optimizer linked each parameter's optimizer-state fragments into the
            # state just deleted: relinked at the next step, and the old tensors freed.
            optimizer._hp_optimizer_states_linked = False
        for param, plain in zip(saved["state_params"], saved["plain_state"], strict=True):
            base.state[param].update(copy.deepcopy(plain))
        live = self._live(saved["state_params"])
        for key, value in saved["stored"].items():
            if key in live:
                live[key].copy_(value, non_blocking=True)
        if any(t.is_cuda for t in live.values()):
            torch.cuda.synchronize()
        if zero3:
            optimizer.checkpoint_event_epilogue()  # the persistent parameters, gathered from the partitions
        for gs, values in zip(self._groups(), saved["groups"], strict=True):
            for group, hyper in zip(gs, values, strict=True):
                group.update(hyper)
        if saved["scheduler"] is not None:
            self.engine.lr_scheduler.load_state_dict(saved["scheduler"])
        if saved["loss_scaler"] is not None:
            vars(self._loss_scaler()).update(copy.deepcopy(saved["loss_scaler"]))
        if saved["loss_scale_config"] is not None:  # ZeRO-0's unfused bf16/fp16 optimizer counts steps here
            vars(optimizer.loss_scale_config).update(copy.deepcopy(saved["loss_scale_config"]))
        # DeepSpeed's counters as before the step: the reverted step is counted by vkd-ds (the gate's
        # `rejected` and `nonfinite`, in metrics.csv and the checkpoint), not as a step DeepSpeed took.
        for name, value in saved["counters"].items():
            setattr(self.engine, name, value)


def _clone(value):
    if isinstance(value, torch.Tensor):
        return value.detach().to("cpu", copy=True) if value.device.type != "cpu" else value.detach().clone()
    if isinstance(value, dict):
        return {k: _clone(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_clone(v) for v in value)
    return value


def _as_float(value) -> float:
    if value is None:
        return float("nan")
    return float(value.item() if hasattr(value, "item") else value)


class StepGuard:
    def __init__(self, engine, gate: MercyGate | None, max_consecutive: int, clock, log, can_revert: bool = True):
        """`gate`: None when gate.enabled=false (nothing of the gate is built then). `clock`: the
        trainer's PhaseClock (the snapshot and the gate count as `gate`, the step as `optimizer`).
        `can_revert`: false when the optimizer state lives on NVMe (swapped out between steps, so a
        snapshot would miss it): the settings refuse the gate then, and non-finite steps are left to
        DeepSpeed's own skip."""
        self.can_revert = can_revert
        self.engine = engine
        self.gate = gate
        self.max_consecutive = max_consecutive
        self.clock = clock
        self.log = log
        self.counts = GuardCounts()
        self.snapshot = StepSnapshot(engine)

    @property
    def wants_student_valence(self) -> bool:
        """The proxy gate decides from the student's valence over the step's own forwards."""
        return self.gate is not None and self.gate.settings.mode == "proxy"

    def start_step(self, step: int) -> None:
        """Before the step's forwards (collective): the teacher's baseline, when it is due."""
        gate = self.gate
        if gate is not None and gate.baseline_due(step):
            with self.clock("gate"):
                gate.refresh_baseline(step)
            self.log.info("mercy gate: the teacher's baseline valence is %.6f (step %d)", gate.state.baseline, step)

    def grad_norm_before_step(self) -> torch.Tensor | None:
        """DeepSpeed reports the global gradient norm under ZeRO 1-3 but not under ZeRO-0 with a
        torch optimizer; there the gradients are whole (and already averaged) on every rank. A device
        tensor: the trainer reads it with the rest of the step."""
        if self.engine.zero_optimization_stage() != 0:
            return None
        grads = [p.grad.detach() for p in self.engine.module.parameters() if p.grad is not None]
        if not grads:
            return torch.zeros((), dtype=torch.float64)
        return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g, dtype=torch.float64) for g in grads]))

    def commit(
        self,
        step: int,
        nonfinite: bool,
        valence_sum: float = 0.0,
        teacher_valence: float = 0.0,
        valence_count: float = 0.0,
    ) -> dict:
        """The optimizer step at the accumulation boundary (collective). `step` counts from 0; the
        other arguments are of the whole global batch, already agreed on every rank (the trainer's
        one read of the step): `nonfinite`, some rank saw a non-finite loss or gradient norm;
        `valence_sum`, `teacher_valence`, `valence_count`: the sums over the valid positions of the
        student's and the teacher's valence (proxy gate). Nothing here reads the device (but
        lookahead's rollouts, and a snapshot when a step may be reverted). Returns the `gate/*` metrics."""
        gate, clock = self.gate, self.clock
        skip = nonfinite
        projected, rejected, decides = None, False, False
        if gate is not None:
            with clock("gate"):
                mse = None
                if self.wants_student_valence:
                    projected, mse = gate.proxy_values(valence_sum, teacher_valence, valence_count)
                was_armed = gate.state.armed
                decides = gate.observe(step, None if skip else mse) and not skip
                if decides and gate.settings.mode == "proxy":
                    rejected = gate.rejects(projected)
            self._log_arming(step, was_armed)
        lookahead = decides and gate.settings.mode == "lookahead"
        revert_skip = skip and self.can_revert
        if revert_skip or rejected or lookahead:
            with clock("gate"):
                self.snapshot.take()
        with clock("optimizer"):
            self.engine.step()
        if skip and not self.can_revert:
            self._check_discarded(step)
        engine_skipped = not (skip or rejected) and self._engine_skipped_step()
        if lookahead and not engine_skipped:
            with clock("gate"):
                projected = gate.projected_lookahead()
                rejected = gate.rejects(projected)
        if revert_skip or rejected:
            with clock("gate"):
                self.snapshot.restore()
        else:
            self.snapshot.discard()
        skip = skip or engine_skipped
        if skip and dist.is_main():
            self.log.warning(
                "step %d: non-finite loss or gradients on at least one rank; step skipped on every rank", step + 1
            )
        if rejected and dist.is_main():
            self.log.warning(
                "%s (step %d: projected %.6f < %.2f x teacher baseline %.6f)",
                BLOCKED_MESSAGE,
                step + 1,
                projected,
                gate.settings.ratio,
                gate.state.baseline,
            )
        self._record(step + 1, rejected, skip)
        metrics = {"gate/rejected": self.counts.rejected, "gate/nonfinite": self.counts.nonfinite}
        metrics["gate/step_kept"] = int(not (skip or rejected))
        if gate is not None:
            state = gate.state
            metrics["gate/armed"] = int(state.armed)
            metrics["gate/baseline"] = state.baseline
            metrics["gate/threshold"] = gate.settings.ratio * state.baseline
            if projected is not None:
                metrics["gate/projected"] = projected
            if state.valence_mse is not None:
                metrics["gate/valence_mse"] = state.valence_mse
        return metrics

    def _log_arming(self, step: int, was_armed: bool) -> None:
        gate = self.gate
        s, state = gate.settings, gate.state
        if not dist.is_main():
            return
        if was_armed and not state.armed:
            self.log.warning(
                "mercy gate: disarmed at step %d: the running batch valence MSE (%.3g) drifted to %g x gate.arm_mse "
                "(%g) or above; every step commits until it is below gate.arm_mse again",
                step + 1,
                state.valence_mse,
                DISARM_FACTOR,
                s.arm_mse,
            )
            return
        if was_armed:
            return
        if state.armed:
            why = ""
            if s.mode == "proxy":
                why = f"running batch valence MSE {state.valence_mse:.6g} < gate.arm_mse {s.arm_mse:g}, "
            self.log.info("mercy gate: armed at step %d (%safter %d warm-up steps)", step + 1, why, s.warmup_steps)
        elif step == s.warmup_steps:
            self.log.info(
                "mercy gate: warm-up over; it arms once the running batch valence MSE (%.3g now) is below "
                "gate.arm_mse (%g)",
                state.valence_mse if state.valence_mse is not None else float("nan"),
                s.arm_mse,
            )

    def _check_discarded(self, step: int) -> None:
        """Without a snapshot (optimizer state on NVMe), a non-finite step is left to DeepSpeed,
        which discards it under ZeRO 1-3 (deepspeed >= 0.19.8, checked in `_engine_skipped_step`)."""
        if self.engine.was_step_applied():
            raise VkdError(
                f"step {step + 1}: DeepSpeed applied a step with a non-finite loss or gradient, and with "
                "deepspeed.offload_optimizer=nvme vkd-ds keeps no snapshot to revert it"
            )

    def _engine_skipped_step(self) -> bool:
        """Whether DeepSpeed discarded the step it was just asked for. Under ZeRO 1-3 and bf16 it checks
        the global gradient norm (reduced over ranks, so every rank decides alike) and skips the update
        when it is not finite (deepspeed >= 0.19.8, which pyproject.toml requires). A host flag: no read."""
        return not self.engine.was_step_applied()

    def _record(self, step: int, rejected: bool, nonfinite: bool) -> None:
        c = self.counts
        c.rejected += int(rejected)
        c.nonfinite += int(nonfinite)
        c.consecutive = c.consecutive + 1 if (rejected or nonfinite) else 0
        if rejected:
            c.consecutive_rejected += 1
        elif not nonfinite:
            c.consecutive_rejected = 0
        limit = self.max_consecutive
        if limit > 0 and c.consecutive >= limit:
            raise GuardStop(step, c.consecutive, c.consecutive_rejected, self)

    # The checkpoint's "gate" entry: the counts and, with the gate on, its baseline.
    def state_dict(self) -> dict:
        state = {"rejected": self.counts.rejected, "nonfinite": self.counts.nonfinite}
        state["consecutive"] = self.counts.consecutive
        state["consecutive_rejected"] = self.counts.consecutive_rejected
        if self.gate is not None:
            state.update(dataclasses.asdict(self.gate.state))
        return state

    def load_state_dict(self, state: dict) -> None:
        for key in ("rejected", "nonfinite", "consecutive", "consecutive_rejected"):
            setattr(self.counts, key, int(state.get(key, 0)))
        if self.gate is not None and state.get("baseline") is not None:
            # A checkpoint from before arming existed holds a gate that decided from the start.
            names = [f.name for f in dataclasses.fields(GateState)]
            saved = {"armed_step": 1} | {name: state[name] for name in names if name in state}
            self.gate.state = GateState(**saved)


class GuardStop(VkdError):
    """`gate.max_consecutive_rejections` steps in a row rejected or skipped: the run ends. The message
    says why and what to change; `record()` is what `checkpoint.write_stop` keeps in the run directory, so
    that a resume with nothing changed is refused before it repeats the same stop."""

    def __init__(self, step: int, consecutive: int, rejected: int, guard: StepGuard):
        self.step, self.consecutive, self.rejected = step, consecutive, rejected
        nonfinite = consecutive - rejected
        gate_part, nonfinite_part = "rejected by the mercy gate", "skipped for a non-finite loss or gradient"
        if rejected and nonfinite:
            what = f"{gate_part} ({rejected}) or {nonfinite_part} ({nonfinite})"
        else:
            what = gate_part if rejected else nonfinite_part
        self.advice = stop_advice(guard, rejected, nonfinite)
        super().__init__(
            f"step {step}: {consecutive} steps in a row were {what} "
            f"(gate.max_consecutive_rejections={guard.max_consecutive}); the last complete checkpoint is intact. "
            f"Resuming as it is would end the same way: {self.advice}"
        )

    def record(self) -> dict:
        return {"step": self.step, "consecutive": self.consecutive, "rejected": self.rejected, "advice": self.advice}


def stop_advice(guard: StepGuard, rejected: int, nonfinite: int) -> str:
    """What to change, by what ended the run."""
    parts = []
    gate = guard.gate
    if rejected and gate is not None:
        s = gate.settings
        parts.append(
            f"lower gate.ratio (now {s.ratio:g}), switch gate.mode (now {s.mode}; lookahead scores the updated "
            f"student itself), raise gate.warmup_steps (now {s.warmup_steps})"
            + (f" or lower gate.arm_mse (now {s.arm_mse:g})" if s.mode == "proxy" else "")
            + ", or set gate.enabled=false"
        )
    if nonfinite:
        parts.append("lower trainer.lr or trainer.grad_clip, train with deepspeed.precision=fp32, or check the data")
    parts.append(f"or raise gate.max_consecutive_rejections (now {guard.max_consecutive})")
    return "; ".join(parts)
