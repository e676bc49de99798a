"""The commit of an optimizer step: taken, or taken and reverted, the same on every rank.

A step is decided in host values (`decide`, then `settle` once the step is taken) and the `Decision`
carried out by `StepGuard.apply`. It is skipped (taken and reverted exactly, its batch consumed) when
the loss or the gradient is not finite on any rank, or DeepSpeed itself discarded it; with the mercy
gate on (gate.py) it is rejected when the projected valence falls below `gate.ratio` × the teacher's
baseline: in proxy mode before the step, in lookahead mode after it.
`gate.max_consecutive_rejections` skipped or rejected steps in a row end the run, gate on or off.
"""

from __future__ import annotations

import dataclasses
import enum
from dataclasses import dataclass

import torch

from vkd_ds import dist
from vkd_ds.errors import VkdError
from vkd_ds.gate import BLOCKED_MESSAGE, DISARM_FACTOR, GateState, MercyGate
from vkd_ds.step_snapshot import StepSnapshot


class Decision(enum.Enum):
    """What becomes of an optimizer step. `decide` gives one before the step; `settle` the final one
    once the step is taken, when the lookahead gate's score and whether DeepSpeed applied the update
    are known."""

    COMMIT = "commit"  # the step stands
    LOOKAHEAD = "lookahead"  # before the step only: taken, the updated student scored, then COMMIT or REJECT
    REJECT = "reject"  # the mercy gate rejected it: reverted from the snapshot
    REVERT_NONFINITE = "revert_nonfinite"  # a non-finite loss or gradient on some rank: reverted
    # Non-finite without a snapshot (optimizer state on NVMe, swapped out between steps): left to
    # DeepSpeed, which discards it under ZeRO 1-3; `StepGuard.commit` refuses the run if it did not.
    LEFT_TO_DEEPSPEED = "left_to_deepspeed"
    # Finite as far as the step's read saw, but DeepSpeed discarded the update (its global gradient
    # norm was not finite): nothing to revert, counted as non-finite.
    ENGINE_SKIPPED = "engine_skipped"

    @property
    def snapshot(self) -> bool:
        """Whether a snapshot is taken before the step: it may be reverted."""
        return self in (Decision.LOOKAHEAD, Decision.REJECT, Decision.REVERT_NONFINITE)

    @property
    def reverts(self) -> bool:
        return self in (Decision.REJECT, Decision.REVERT_NONFINITE)

    @property
    def nonfinite(self) -> bool:
        """Skipped for a non-finite loss or gradient (the `gate/nonfinite` count)."""
        return self in (Decision.REVERT_NONFINITE, Decision.LEFT_TO_DEEPSPEED, Decision.ENGINE_SKIPPED)


def decide(
    nonfinite: bool, can_revert: bool, armed: bool = False, mode: str = "proxy", rejects: bool = False
) -> Decision:
    """The decision before the step, from values every rank agrees on. `nonfinite`: some rank saw a
    non-finite loss or gradient norm; `can_revert`: a snapshot can be taken (not with the optimizer
    state on NVMe); `armed`: the gate is on and armed for this step; `mode`: its mode; `rejects`: the
    proxy gate's verdict on the projected valence (lookahead's comes after the step, in `settle`).
    A non-finite step is skipped whatever the gate would say."""
    if nonfinite:
        return Decision.REVERT_NONFINITE if can_revert else Decision.LEFT_TO_DEEPSPEED
    if not armed:
        return Decision.COMMIT
    if mode == "lookahead":
        return Decision.LOOKAHEAD
    return Decision.REJECT if rejects else Decision.COMMIT


def settle(decision: Decision, step_applied: bool, lookahead_rejects: bool = False) -> Decision:
    """The final decision once the step is taken. `step_applied`: DeepSpeed applied the update (under
    ZeRO 1-3 and bf16 it discards one whose global gradient norm, reduced over ranks, is not finite;
    deepspeed >= 0.19.8, which pyproject.toml requires). `lookahead_rejects`: the lookahead gate's
    verdict on the updated student, scored only when the update was applied."""
    if decision in (Decision.COMMIT, Decision.LOOKAHEAD) and not step_applied:
        return Decision.ENGINE_SKIPPED
    if decision is Decision.LOOKAHEAD:
        return Decision.REJECT if lookahead_rejects else Decision.COMMIT
    return decision


@dataclass
class GuardCounts:
    """Metrics and checkpoint."""

    rejected: int = 0  # steps the gate rejected
    nonfinite: int = 0  # steps skipped for a non-finite loss or gradient
    consecutive: int = 0  # rejected or skipped in a row, up to now
    consecutive_rejected: int = 0  # of which the gate rejected (the rest were non-finite)

    def record(self, decision: Decision) -> None:
        rejected, nonfinite = decision is Decision.REJECT, decision.nonfinite
        self.rejected += int(rejected)
        self.nonfinite += int(nonfinite)
        self.consecutive = self.consecutive + 1 if (rejected or nonfinite) else 0
        if rejected:
            self.consecutive_rejected += 1
        elif not nonfinite:
            self.consecutive_rejected = 0


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
        decision, projected = self.consult(step, nonfinite, valence_sum, teacher_valence, valence_count)
        if decision.snapshot:
            with self.clock("gate"):
                self.snapshot.take()
        with self.clock("optimizer"):
            self.engine.step()
        applied = self.engine.was_step_applied()  # a host flag: no read
        if decision is Decision.LEFT_TO_DEEPSPEED and applied:
            raise VkdError(
                f"step {step + 1}: DeepSpeed applied a step with a non-finite loss or gradient, and with "
                "deepspeed.offload_optimizer=nvme vkd-ds keeps no snapshot to revert it"
            )
        lookahead_rejects = False
        if decision is Decision.LOOKAHEAD and applied:
            with self.clock("gate"):
                projected = self.gate.projected_lookahead()
                lookahead_rejects = self.gate.rejects(projected)
        return self.apply(step, settle(decision, applied, lookahead_rejects), projected)

    def consult(
        self, step: int, nonfinite: bool, valence_sum: float, teacher_valence: float, valence_count: float
    ) -> tuple[Decision, float | None]:
        """The decision before step `step` (0-based), and the proxy gate's projected valence (None
        without it). With the gate on, the step is observed first (its arming, logged on a change):
        a non-finite step's valence error does not count towards it."""
        gate = self.gate
        if gate is None:
            return decide(nonfinite, self.can_revert), None
        with self.clock("gate"):
            projected = mse = None
            if self.wants_student_valence:
                projected, mse = gate.proxy_values(valence_sum, teacher_valence, valence_count)
            was_armed = gate.state.armed
            armed = gate.observe(step, None if nonfinite else mse)
            rejects = armed and projected is not None and gate.rejects(projected)
            decision = decide(nonfinite, self.can_revert, armed, gate.settings.mode, rejects)
        self._log_arming(step, was_armed)
        return decision, projected

    def apply(self, step: int, decision: Decision, projected: float | None = None) -> dict:
        """Carries out the settled decision of step `step` (0-based): the snapshot written back
        (collective) or dropped, then `account`."""
        if decision.reverts:
            with self.clock("gate"):
                self.snapshot.restore()
        else:
            self.snapshot.discard()
        return self.account(step, decision, projected)

    def account(self, step: int, decision: Decision, projected: float | None = None) -> dict:
        """A carried-out decision's warning, its count (GuardStop after `gate.max_consecutive_rejections`
        steps in a row rejected or skipped) and the `gate/*` metrics."""
        gate = self.gate
        if decision.nonfinite and dist.is_main():
            self.log.warning(
                "step %d: non-finite loss or gradients on at least one rank; step skipped on every rank", step + 1
            )
        if decision is Decision.REJECT and dist.is_main():
            self.log.warning(
                "%s (step %d: projected %.6f < %.2f x teacher baseline %.6f)",
                BLOCKED_MESSAGE,
                step + 1,
                projected,
                gate.settings.ratio,
                gate.state.baseline,
            )
        c = self.counts
        c.record(decision)
        if self.max_consecutive > 0 and c.consecutive >= self.max_consecutive:
            raise GuardStop(step + 1, c.consecutive, c.consecutive_rejected, self)
        metrics = {"gate/rejected": c.rejected, "gate/nonfinite": c.nonfinite}
        metrics["gate/step_kept"] = int(decision is Decision.COMMIT)
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
