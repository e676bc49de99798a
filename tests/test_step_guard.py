"""StepGuard's decision, from host values only: every case of `decide` and `settle`, the counting of
steps rejected or skipped in a row and the GuardStop that ends the run, and the gate's arming as the
guard consults it (a real MercyGate; no engine, no process group). How a decision is carried out on
real engines (the revert) is tests/test_gate.py's."""

import logging

import pytest

from vkd_ds.data import Example
from vkd_ds.gate import BLOCKED_MESSAGE, MercyGate
from vkd_ds.models import load_tokenizer
from vkd_ds.phase_clock import PhaseClock
from vkd_ds.settings import GateSettings
from vkd_ds.step_guard import Decision, GuardCounts, GuardStop, StepGuard, decide, settle

D = Decision
LOG = "test_step_guard"


@pytest.mark.parametrize(
    ("nonfinite", "can_revert", "armed", "mode", "rejects", "want"),
    [
        (False, True, False, "proxy", False, D.COMMIT),  # gate off, or not armed (warm-up, disarmed)
        (False, True, False, "proxy", True, D.COMMIT),  # an unarmed gate's verdict counts for nothing
        (False, True, True, "proxy", False, D.COMMIT),
        (False, True, True, "proxy", True, D.REJECT),  # decided before the step
        (False, True, True, "lookahead", False, D.LOOKAHEAD),  # decided after it
        (True, True, False, "proxy", False, D.REVERT_NONFINITE),
        (True, True, True, "proxy", True, D.REVERT_NONFINITE),  # non-finite wins over the gate
        (True, True, True, "lookahead", False, D.REVERT_NONFINITE),
        (True, False, False, "proxy", False, D.LEFT_TO_DEEPSPEED),  # NVMe: no snapshot
        (False, False, False, "proxy", False, D.COMMIT),
    ],
)
def test_decide_before_the_step(nonfinite, can_revert, armed, mode, rejects, want):
    assert decide(nonfinite, can_revert, armed, mode, rejects) is want


def test_decide_with_the_gate_off():
    assert decide(False, True) is D.COMMIT
    assert decide(True, True) is D.REVERT_NONFINITE and decide(True, False) is D.LEFT_TO_DEEPSPEED


@pytest.mark.parametrize(
    ("before", "applied", "lookahead_rejects", "want"),
    [
        (D.COMMIT, True, False, D.COMMIT),
        (D.COMMIT, False, False, D.ENGINE_SKIPPED),  # DeepSpeed discarded a step the read found finite
        (D.LOOKAHEAD, True, False, D.COMMIT),
        (D.LOOKAHEAD, True, True, D.REJECT),
        (D.LOOKAHEAD, False, False, D.ENGINE_SKIPPED),  # nothing to score: counted non-finite, not rejected
        (D.REJECT, True, False, D.REJECT),
        (D.REJECT, False, False, D.REJECT),  # the proxy gate's rejection stands whatever DeepSpeed did
        (D.REVERT_NONFINITE, True, False, D.REVERT_NONFINITE),
        (D.REVERT_NONFINITE, False, False, D.REVERT_NONFINITE),
        (D.LEFT_TO_DEEPSPEED, False, False, D.LEFT_TO_DEEPSPEED),
    ],
)
def test_settle_after_the_step(before, applied, lookahead_rejects, want):
    assert settle(before, applied, lookahead_rejects) is want


def test_what_each_decision_does():
    """A snapshot before the step where it may be reverted; reverted when rejected or non-finite (but
    without a snapshot, or where DeepSpeed discarded the update itself); counted as non-finite whenever
    the step was skipped for a non-finite loss or gradient."""
    assert {d for d in D if d.snapshot} == {D.LOOKAHEAD, D.REJECT, D.REVERT_NONFINITE}
    assert {d for d in D if d.reverts} == {D.REJECT, D.REVERT_NONFINITE}
    assert {d for d in D if d.nonfinite} == {D.REVERT_NONFINITE, D.LEFT_TO_DEEPSPEED, D.ENGINE_SKIPPED}


def test_counts_of_steps_rejected_or_skipped_in_a_row():
    """A kept step resets both runs; a non-finite step continues the run without resetting its
    rejections."""
    counts = GuardCounts()
    seen = []
    for decision in (D.REJECT, D.ENGINE_SKIPPED, D.REJECT, D.COMMIT, D.REVERT_NONFINITE, D.LEFT_TO_DEEPSPEED):
        counts.record(decision)
        seen.append((counts.consecutive, counts.consecutive_rejected))
    assert seen == [(1, 1), (2, 1), (3, 2), (0, 0), (1, 0), (2, 0)]
    assert (counts.rejected, counts.nonfinite) == (2, 3)


def guard(gate=None, max_consecutive=0, can_revert=True) -> StepGuard:
    """No engine: `account` and `consult` read none, and a decision that reverts nothing only drops
    the (empty) snapshot."""
    return StepGuard(None, gate, max_consecutive, PhaseClock(False, False), logging.getLogger(LOG), can_revert)


@pytest.fixture(scope="module")
def tokenizer(tiny_assets):
    return load_tokenizer(str(tiny_assets / "tokenizer"))


def mercy_gate(tokenizer, mode="proxy", warmup_steps=2) -> MercyGate:
    """A real gate of one probe prompt (never continued here), its baseline 0.5, arm_mse 1e-3."""
    settings = GateSettings(True, mode, 0.9, 1.0, 4, 1, 0, warmup_steps, 1e-3, 2)
    probe = Example(list(range(3, 13)), [0] + [1] * 9, "probe:1")
    gate = MercyGate(settings, None, None, tokenizer, [probe], 0, None, 48)
    gate.state.baseline = 0.5
    return gate


def test_non_finite_steps_in_a_row_end_the_run_with_what_to_change(caplog):
    g = guard(max_consecutive=3)
    with caplog.at_level(logging.WARNING, LOG):
        metrics = g.apply(0, D.ENGINE_SKIPPED)
        assert metrics == {"gate/rejected": 0, "gate/nonfinite": 1, "gate/step_kept": 0}
        assert g.apply(1, D.COMMIT)["gate/step_kept"] == 1
        g.apply(2, D.LEFT_TO_DEEPSPEED)
        g.apply(3, D.ENGINE_SKIPPED)
        with pytest.raises(GuardStop) as stop:
            g.apply(4, D.LEFT_TO_DEEPSPEED)
    assert str(stop.value) == (
        "step 5: 3 steps in a row were skipped for a non-finite loss or gradient "
        "(gate.max_consecutive_rejections=3); the last complete checkpoint is intact. Resuming as it is would "
        "end the same way: lower trainer.lr or trainer.grad_clip, train with deepspeed.precision=fp32, or check "
        "the data; or raise gate.max_consecutive_rejections (now 3)"
    )
    assert stop.value.record() == {"step": 5, "consecutive": 3, "rejected": 0, "advice": stop.value.advice}
    skipped = [r.getMessage() for r in caplog.records]
    assert skipped == [
        f"step {n}: non-finite loss or gradients on at least one rank; step skipped on every rank" for n in (1, 3, 4, 5)
    ]


def test_rejections_and_skips_in_a_row_name_the_gate_keys(tokenizer, caplog):
    gate = mercy_gate(tokenizer)
    gate.state.armed_step = 1
    g = guard(gate, max_consecutive=3)
    with caplog.at_level(logging.WARNING, LOG):
        metrics = g.account(6, D.REJECT, 0.25)
        g.account(7, D.ENGINE_SKIPPED)
        with pytest.raises(GuardStop) as stop:
            g.account(8, D.REJECT, 0.125)
    assert metrics == {
        "gate/rejected": 1,
        "gate/nonfinite": 0,
        "gate/step_kept": 0,
        "gate/armed": 1,
        "gate/baseline": 0.5,
        "gate/threshold": 0.9 * 0.5,
        "gate/projected": 0.25,
    }
    assert [r.getMessage() for r in caplog.records] == [
        f"{BLOCKED_MESSAGE} (step 7: projected 0.250000 < 0.90 x teacher baseline 0.500000)",
        "step 8: non-finite loss or gradients on at least one rank; step skipped on every rank",
        f"{BLOCKED_MESSAGE} (step 9: projected 0.125000 < 0.90 x teacher baseline 0.500000)",
    ]
    message = str(stop.value)
    assert message.startswith(
        "step 9: 3 steps in a row were rejected by the mercy gate (2) or skipped for a non-finite loss or "
        "gradient (1) (gate.max_consecutive_rejections=3)"
    )
    assert stop.value.advice == (
        "lower gate.ratio (now 0.9), switch gate.mode (now proxy; lookahead scores the updated student itself), "
        "raise gate.warmup_steps (now 2) or lower gate.arm_mse (now 0.001), or set gate.enabled=false; "
        "lower trainer.lr or trainer.grad_clip, train with deepspeed.precision=fp32, or check the data; "
        "or raise gate.max_consecutive_rejections (now 3)"
    )
    assert stop.value.record()["rejected"] == 2


def test_a_lookahead_gates_advice_has_no_arm_mse_and_zero_never_stops(tokenizer):
    g = guard(mercy_gate(tokenizer, "lookahead"), max_consecutive=1)
    with pytest.raises(GuardStop) as stop:
        g.account(0, D.REJECT, 0.0)
    assert stop.value.advice == (
        "lower gate.ratio (now 0.9), switch gate.mode (now lookahead; lookahead scores the updated student "
        "itself), raise gate.warmup_steps (now 2), or set gate.enabled=false; "
        "or raise gate.max_consecutive_rejections (now 1)"
    )
    unlimited = guard(max_consecutive=0)
    for step in range(50):
        unlimited.account(step, D.REVERT_NONFINITE)
    assert unlimited.counts.consecutive == 50


def sums(valence: float) -> tuple[float, float, float]:
    """The proxy gate's sums over 10 positions: the student's mean valence `valence`, the teacher's 0.5."""
    return 10 * valence, 5.0, 10.0


def test_the_proxy_gate_decides_once_armed_and_never_a_non_finite_step(tokenizer, caplog):
    """Warm-up steps commit; armed after them (the valence error below arm_mse), a low projection is
    rejected and a high one kept; a non-finite step is reverted whatever the gate says, and its
    valence error does not count towards the arming."""
    gate = mercy_gate(tokenizer)
    g = guard(gate)
    with caplog.at_level(logging.INFO, LOG):
        assert g.consult(0, False, *sums(0.3)) == (D.COMMIT, pytest.approx(0.3))  # warm-up: 0.3 < 0.9 x 0.5
        assert g.consult(1, False, *sums(0.5)) == (D.COMMIT, pytest.approx(0.5))
        assert g.consult(2, False, *sums(0.5))[0] is D.COMMIT  # warm-up over, the error still above arm_mse
        assert not gate.state.armed
        for step in range(3, 60):
            decision, _ = g.consult(step, False, *sums(0.5))
            if gate.state.armed:
                break
        assert (decision, gate.state.armed_step) == (D.COMMIT, step + 1)
        assert g.consult(step + 1, False, *sums(0.44))[0] is D.REJECT
        assert g.consult(step + 2, False, *sums(0.46))[0] is D.COMMIT
        mse = gate.state.valence_mse
        assert g.consult(step + 3, True, *sums(-50.0))[0] is D.REVERT_NONFINITE
        assert gate.state.valence_mse == mse and gate.state.armed
    assert guard(gate, can_revert=False).consult(step + 4, True, *sums(0.0))[0] is D.LEFT_TO_DEEPSPEED
    logged = [r.getMessage() for r in caplog.records]
    assert len(logged) == 2 and logged[0].startswith("mercy gate: warm-up over; it arms once the running batch")
    assert logged[1].startswith(f"mercy gate: armed at step {step + 1} (running batch valence MSE ")
    assert logged[1].endswith(" < gate.arm_mse 0.001, after 2 warm-up steps)")


def test_a_drifting_valence_error_disarms_the_proxy_gate_and_every_step_commits(tokenizer, caplog):
    gate = mercy_gate(tokenizer, warmup_steps=0)
    g = guard(gate)
    assert g.consult(0, False, *sums(0.49))[0] is D.COMMIT and gate.state.armed  # 0.49 >= 0.9 x 0.5
    decisions = []
    with caplog.at_level(logging.WARNING, LOG):
        while gate.state.armed:
            decisions.append(g.consult(len(decisions) + 1, False, *sums(0.4))[0])  # the error grows
    # Rejected while armed; the step that disarmed the gate commits, low as its projection is.
    assert len(decisions) > 2 and decisions == [D.REJECT] * (len(decisions) - 1) + [D.COMMIT]
    assert caplog.records[-1].getMessage().startswith(f"mercy gate: disarmed at step {len(decisions) + 1}: the")
    assert g.consult(len(decisions) + 1, False, *sums(0.4))[0] is D.COMMIT


def test_the_lookahead_gate_decides_after_the_step_once_the_warm_up_is_over(tokenizer):
    gate = mercy_gate(tokenizer, "lookahead")
    g = guard(gate)
    assert not g.wants_student_valence
    assert [g.consult(step, False, 0.0, 0.0, 0.0) for step in range(2)] == [(D.COMMIT, None)] * 2
    assert g.consult(2, False, 0.0, 0.0, 0.0) == (D.LOOKAHEAD, None)
    assert g.consult(3, True, 0.0, 0.0, 0.0) == (D.REVERT_NONFINITE, None)
    assert guard().consult(0, False, 0.0, 0.0, 0.0) == (D.COMMIT, None)  # the gate off
