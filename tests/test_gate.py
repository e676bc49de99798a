"""The mercy gate and the non-finite guard, with 2 real processes on ZeRO-3 (docs/gate.md)."""

import json
from pathlib import Path

import pytest
import torch

from tests.conftest import base_overrides, deepspeed_launch, train_job
from tests.test_reliability import kill_at_step
from vkd_ds import checkpoint
from vkd_ds.metrics import read_metrics

pytestmark = pytest.mark.distributed

# The gate deciding from the first step (no warm-up, armed at once in proxy mode too).
GATE = ["gate.enabled=true", "gate.probe_size=4", "gate.rollout_steps=6", "gate.baseline_every=0"]
GATE += ["gate.warmup_steps=0", "gate.arm_mse=1e9"]
SHORT = ["trainer.micro_batch_size=2", "trainer.eval_every=0", "loss.feat=0"]


def column(run_dir, name):
    return [row[name] for row in read_metrics(run_dir / "metrics.csv")]


def rank_states(step_dir: Path) -> list[dict]:
    """Every rank's model and optimizer state files of a DeepSpeed checkpoint (ZeRO-3 writes a model
    file per rank, ZeRO-1/2 one for all; bf16 optimizer files carry a `bf16_` prefix)."""

    def load(pattern: str) -> dict:
        (path,) = step_dir.glob(pattern)
        return torch.load(path, weights_only=False)

    states = []
    for r in range(2):
        sharded = (step_dir / f"zero_pp_rank_{r}_mp_rank_00_model_states.pt").exists()
        model = load(f"zero_pp_rank_{r}_mp_rank_00_model_states.pt" if sharded else "mp_rank_00_model_states.pt")
        states.append({"model": model, "optim": load(f"*zero_pp_rank_{r}_mp_rank_00_optim_states.pt")})
    return states


def assert_identical(a, b, path="state"):
    """Tensors bit for bit, numbers and strings exactly."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), path
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), path
        for key in a:
            assert_identical(a[key], b[key], f"{path}.{key}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_identical(x, y, f"{path}[{i}]")
    elif hasattr(a, "__dict__"):  # e.g. DeepSpeed's loss scaler, which has no __eq__
        assert type(a) is type(b), path
        assert_identical(vars(a), vars(b), path)
    else:
        assert a == b, (path, a, b)


@pytest.mark.parametrize(
    ("mode", "engine"),
    [
        ("lookahead", []),
        ("proxy", []),
        # DeepSpeed's BF16_Optimizer (ZeRO-1, bf16, fp32 accumulation): its own master partitions.
        ("proxy", ["deepspeed.precision=bf16", "deepspeed.zero_stage=1"]),
    ],
    ids=["lookahead", "proxy", "proxy-bf16-zero1"],
)
def test_a_rejected_step_leaves_weights_optimizer_and_lr_bit_identical(mode, engine, tiny_assets, tmp_path):
    """A ratio that rejects every step the gate decides: the two warm-up steps commit (unarmed, it
    trains), the two armed steps are rejected, and the checkpoints after 2 and 4 steps are equal."""
    run_dir = tmp_path / "run"
    common = base_overrides(tiny_assets, run_dir) + SHORT + GATE + [f"gate.mode={mode}", "trainer.save_every=2"]
    common += engine + ["gate.warmup_steps=2", "gate.arm_mse=1e9", "gate.ratio=100"]
    result = train_job(common + ["trainer.max_steps=4"])
    kept, rejected = (
        rank_states(run_dir / "checkpoints/step_0000002"),
        rank_states(run_dir / "checkpoints/step_0000004"),
    )
    for before, after in zip(kept, rejected, strict=True):
        # This rank's partitions: fp32 master weights, exp_avg, exp_avg_sq and Adam's step count,
        # the parameter groups' LR, and the LR scheduler.
        assert_identical(before["optim"]["optimizer_state_dict"], after["optim"]["optimizer_state_dict"])
        assert_identical(before["model"]["module"], after["model"]["module"])
        assert_identical(before["model"]["lr_scheduler"], after["model"]["lr_scheduler"])
        optim = after["optim"]["optimizer_state_dict"]
        state = (optim.get("optimizer_state_dict") or optim["base_optimizer_state"])["state"]
        assert {"exp_avg", "exp_avg_sq", "step"} <= set(state[0]) and int(state[0]["step"]) == 2
        # DeepSpeed's counters as if the rejected steps never happened (vkd-ds counts them).
        assert (after["model"]["global_steps"], after["model"]["skipped_steps"]) == (2, 0)
        assert (before["model"]["global_steps"], before["model"]["skipped_steps"]) == (2, 0)
    assert column(run_dir, "gate/armed") == ["0", "0", "1", "1"]
    assert column(run_dir, "gate/rejected") == ["0", "0", "1", "2"]
    assert column(run_dir, "gate/step_kept") == ["1", "1", "0", "0"]
    losses = [float(x) for x in column(run_dir, "loss")]
    assert losses[1] != losses[0]  # unarmed, the first step trained the student
    if mode == "proxy":  # decided before the step from the batch: logged on every step, armed or not
        assert all(float(p) >= 0 for p in column(run_dir, "gate/projected"))
    else:  # the student's continuations, only when armed
        assert column(run_dir, "gate/projected")[:2] == ["", ""]
    # Rank 0 alone logs the decision, once per rejected step, with the step and both values.
    assert result.stderr.count("Mercy gate blocked – low projected valence trajectory") == 2
    log = (run_dir / "train.log").read_text()
    assert "(step 3: projected" in log and "mercy gate: armed at step 3" in log


@pytest.mark.parametrize(
    ("reject", "engine"),
    [(2, ["deepspeed.zero_stage=3"]), (1, ["deepspeed.precision=bf16", "deepspeed.zero_stage=1"])],
    ids=["zero3-step2", "bf16-zero1-first-step"],
)
def test_a_rejected_step_leaves_every_ranks_live_state_as_if_it_never_happened(reject, engine, tiny_assets, tmp_path):
    """2 ranks, the proxy gate deciding through StepGuard.commit: batches b1, b2, b3 with step `reject`
    rejected, against a second engine of the same seed that never sees that batch. Every rank's live
    tensors (under ZeRO-3 the gathered persistent parameters a forward reads, not a saved checkpoint,
    which re-gathers first), partitions, master weights, optimizer state, LR and DeepSpeed counters after
    the revert, the next steps' losses and everything after them: bit for bit. A rejected first step
    (DeepSpeed's bf16 optimizer, ZeRO-1) deletes the Adam state it created, and the optimizer's links
    into that state are made again at the next step."""
    overrides = base_overrides(tiny_assets, tmp_path / "unused") + ["trainer.micro_batch_size=2", *engine]
    overrides += ["gate.enabled=true", "gate.warmup_steps=0", "gate.arm_mse=1e9", "gate.ratio=0.9"]
    result = deepspeed_launch(["tests/scripts/revert_live.py", str(reject), str(tmp_path), *overrides], 2)
    assert result.returncode == 0, result.stderr[-4000:]
    for rank in range(2):
        saved = torch.load(tmp_path / f"rank_{rank}.pt", weights_only=False)
        rejected, never = saved["a"], saved["b"]
        assert rejected["rejected"] == 1
        assert any(key.startswith("data:") for key in never["reverted"])
        for point in ("reverted", "after"):
            assert_identical(rejected[point], never[point], f"rank {rank} {point}")
        kept = [loss for i, loss in enumerate(rejected["losses"], start=1) if i != reject]
        assert kept == never["losses"] and len(kept) == 2
        assert not torch.equal(never["reverted"]["lr"], never["after"]["lr"])  # the schedule moves


def test_the_proxy_arms_below_arm_mse_and_kill_9_before_and_after_resumes_exactly(tiny_assets, tmp_path):
    """The proxy arms at the first step after the warm-up whose running valence MSE is below
    gate.arm_mse; then every step is rejected (ratio 100). kill -9 before and after arming: resume
    continues with the uninterrupted run's rows, gate/* included."""
    common = SHORT + GATE + ["gate.mode=proxy", "gate.warmup_steps=1", "trainer.max_steps=9", "trainer.save_every=1"]
    probe = tmp_path / "probe"
    # Never rejecting, the gate does not change training: this run's MSE column is the one to come.
    train_job(base_overrides(tiny_assets, probe) + common + ["gate.ratio=0", "gate.arm_mse=1e9"])
    running = [float(x) for x in column(probe, "gate/valence_mse")]
    # An arm_mse between step s's running MSE and every earlier one's arms the gate at step s.
    candidates = [s for s in range(3, 7) if running[s - 1] < min(running[: s - 1])]
    assert candidates, f"the tiny student's running valence MSE did not fall in steps 3-6: {running}"
    arm_step = candidates[0]
    arm_mse = (running[arm_step - 1] + min(running[: arm_step - 1])) / 2
    overrides = common + ["gate.ratio=100", f"gate.arm_mse={arm_mse!r}"]
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    train_job(base_overrides(tiny_assets, straight) + overrides)
    armed = column(straight, "gate/armed")
    assert armed == ["0"] * (arm_step - 1) + ["1"] * (10 - arm_step)
    assert column(straight, "gate/step_kept") == ["1"] * (arm_step - 1) + ["0"] * (10 - arm_step)
    for step in (arm_step - 1, arm_step + 1):  # kill -9 before arming, then after it
        assert kill_at_step(base_overrides(tiny_assets, killed) + overrides, killed, step)
    train_job(base_overrides(tiny_assets, killed) + overrides)
    a, b = read_metrics(straight / "metrics.csv"), read_metrics(killed / "metrics.csv")
    assert [r["step"] for r in b] == [str(s) for s in range(1, 10)]
    timing = ("tokens_per_s", "real_tokens_per_s", "step_time_s", "mem_rss_gb", "mem_peak_rss_gb")
    for name in a[0]:
        if name not in timing and not name.startswith("time/"):
            assert [r[name] for r in a] == [r[name] for r in b], name


@pytest.mark.parametrize("mode", ["proxy", "lookahead"])
def test_ratio_zero_never_rejects_and_trains_like_no_gate(mode, tiny_assets, tmp_path):
    common = SHORT + ["trainer.max_steps=4", "trainer.save_every=0"]
    off, on = tmp_path / "off", tmp_path / "on"
    train_job(base_overrides(tiny_assets, off) + common)
    train_job(base_overrides(tiny_assets, on) + common + GATE + [f"gate.mode={mode}", "gate.ratio=0"])
    assert column(on, "loss") == column(off, "loss")  # loss for loss
    assert column(on, "gate/rejected") == ["0"] * 4 and len(set(column(on, "gate/baseline"))) == 1


def test_ranks_with_different_valences_make_the_same_decision(tiny_assets, tmp_path):
    result = deepspeed_launch(
        ["tests/scripts/gate_decision.py", str(tmp_path), *base_overrides(tiny_assets, tmp_path / "unused"), *GATE],
        num_procs=2,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    ranks = [json.loads((tmp_path / f"rank_{r}.json").read_text()) for r in range(2)]
    for case in range(2):
        local = [ranks[r][case]["local_would_reject"] for r in range(2)]
        assert local[0] != local[1]  # on its own, each rank would have decided differently
        assert ranks[0][case]["rejected"] == ranks[1][case]["rejected"]
        assert ranks[0][case]["projected"] == ranks[1][case]["projected"]
    # Global means: 0.95 * 12/40 = 0.285 < 0.45 rejects; 0.95 * 28/40 = 0.665 accepts.
    assert [ranks[0][c]["rejected"] for c in range(2)] == [True, False]


def test_a_nan_on_one_rank_is_skipped_on_every_rank_and_training_goes_on(tiny_assets, tmp_path):
    run_dir = tmp_path / "run"
    train_job(
        base_overrides(tiny_assets, run_dir) + SHORT + ["trainer.max_steps=5"],
        env={"VKD_FAULT_NAN_LOSS": "3:1"},  # rank 1's loss at step 3
    )
    assert column(run_dir, "gate/step_kept") == ["1", "1", "0", "1", "1"]
    assert column(run_dir, "gate/nonfinite") == ["0", "0", "1", "1", "1"]
    losses = [float(x) for x in column(run_dir, "loss")]
    assert losses[2] != losses[2] and all(x == x for x in losses[3:])  # NaN, then finite again
    weights = checkpoint.latest_checkpoint(run_dir)
    from vkd_ds.export import consolidated_state_dict

    assert all(torch.isfinite(t).all() for t in consolidated_state_dict(weights).values())


@pytest.mark.parametrize("precision", ["bf16", "fp32"])
def test_a_nan_gradient_under_zero3_is_skipped_and_counted_on_every_rank(precision, tiny_assets, tmp_path):
    """A finite loss with a NaN gradient (rank 1 at step 3, rank 0 at 5, rank 1 at 6): DeepSpeed
    discards the update under ZeRO-3; every rank counts the step as skipped, and two in a row end
    the run on every rank (one error, no hang) with the last checkpoint intact and finite."""
    run_dir = tmp_path / "run"
    overrides = base_overrides(tiny_assets, run_dir) + SHORT
    result = deepspeed_launch(
        [
            "launcher/train.py",
            *overrides,
            f"deepspeed.precision={precision}",
            "trainer.max_steps=8",
            "trainer.save_every=2",
            "gate.max_consecutive_rejections=2",
        ],
        num_procs=2,
        env={"VKD_FAULT_NAN_GRAD": "3:1,5:0,6:1"},
    )
    assert result.returncode == 2, result.stderr[-3000:]
    assert "vkd-ds: error: step 6: 2 steps in a row were skipped for a non-finite loss or gradient" in result.stderr
    assert "Traceback" not in result.stderr
    assert column(run_dir, "gate/step_kept") == ["1", "1", "0", "1", "0"]
    assert column(run_dir, "gate/nonfinite") == ["0", "0", "1", "1", "2"]
    assert all(float(x) == float(x) for x in column(run_dir, "loss"))  # the losses were finite
    assert [p.name for p in checkpoint.complete_checkpoints(run_dir)] == ["step_0000002", "step_0000004"]
    from vkd_ds.export import consolidated_state_dict

    weights = consolidated_state_dict(checkpoint.latest_checkpoint(run_dir))
    assert all(torch.isfinite(t).all() for t in weights.values())


def test_consecutive_failures_stop_the_run_and_keep_the_last_checkpoint(tiny_assets, tmp_path):
    run_dir = tmp_path / "run"
    overrides = base_overrides(tiny_assets, run_dir) + SHORT + ["trainer.max_steps=8", "trainer.save_every=2"]
    result = deepspeed_launch(
        ["launcher/train.py", *overrides, "gate.max_consecutive_rejections=3"],
        num_procs=2,
        env={"VKD_FAULT_NAN_LOSS": "3:1,4:0,5:1"},
    )
    assert result.returncode != 0
    assert "vkd-ds: error: step 5: 3 steps in a row were skipped for a non-finite loss or gradient" in result.stderr
    assert "lower trainer.lr" in result.stderr  # what to change, with the stop itself
    assert "Traceback" not in result.stderr
    assert [p.name for p in checkpoint.complete_checkpoints(run_dir)] == ["step_0000002", "step_0000004"]
    # The last complete checkpoint resumes once something that computes is changed.
    resumed = train_job(overrides + ["gate.max_consecutive_rejections=4"])
    assert "going on with changed gate.max_consecutive_rejections" in resumed.stderr
    assert column(run_dir, "step")[-1] == "8"


def test_a_run_ended_by_the_gate_resumed_as_it_was_is_told_why_and_what_to_change(tiny_assets, tmp_path):
    """Two warm-up steps commit, then the gate rejects every step: max_consecutive_rejections=2 ends
    the run at step 4, its last checkpoint at step 2. Resuming unchanged would end the same way: it is
    refused before anything is built, with the stop and what to change; a bookkeeping key changed is
    not a change. With gate.ratio lowered it goes on to the end."""
    run_dir = tmp_path / "run"
    overrides = base_overrides(tiny_assets, run_dir) + SHORT + GATE + ["gate.mode=proxy", "trainer.save_every=2"]
    overrides += ["trainer.max_steps=6", "gate.warmup_steps=2", "gate.ratio=100", "gate.max_consecutive_rejections=2"]
    stopped = deepspeed_launch(["launcher/train.py", *overrides], num_procs=2)
    assert stopped.returncode == 2, stopped.stderr[-3000:]
    assert "step 4: 2 steps in a row were rejected by the mercy gate" in stopped.stderr
    assert "lower gate.ratio (now 100)" in stopped.stderr
    record = json.loads((run_dir / "stopped.json").read_text())
    assert (record["step"], record["rejected"]) == (4, 2)
    rows = len(column(run_dir, "step"))
    again = deepspeed_launch(["launcher/train.py", *overrides, "trainer.log_every=3"], num_procs=2)
    assert again.returncode == 2
    assert "this run ended at step 4: 2 steps in a row were rejected" in again.stderr
    assert "Resuming from step 2 with the same settings would end the same way" in again.stderr
    assert "lower gate.ratio (now 100)" in again.stderr and "Traceback" not in again.stderr
    assert len(column(run_dir, "step")) == rows  # nothing written
    resumed = train_job(overrides + ["gate.ratio=0"])
    assert "going on with changed gate.ratio" in resumed.stderr
    assert column(run_dir, "step")[-1] == "6"


def test_the_proxy_gate_disarms_when_the_valence_error_drifts_and_rearms_below_arm_mse():
    """The running batch valence MSE (an EMA, decay 0.9) against arm_mse = 1e-3: armed below it after the
    warm-up, disarmed once it reaches DISARM_FACTOR x 1e-3, armed again below 1e-3; lookahead arms at the
    warm-up's end and has no error to disarm on."""
    from vkd_ds.gate import DISARM_FACTOR, GateState
    from vkd_ds.settings import GateSettings

    def settings(mode):
        return GateSettings(True, mode, 0.9, 0.95, 4, 4, 0, 2, 1e-3, 20)

    state, proxy = GateState(), settings("proxy")
    armed = [state.observe(proxy, step, 1e-4) for step in range(4)]
    assert armed == [False, False, True, True] and state.armed_step == 3
    drift, before = [], []
    for step in range(4, 60):
        before.append(state.valence_mse)
        drift.append(state.observe(proxy, step, 1e-2))
        if not drift[-1]:
            break
    assert len(drift) > 2 and all(drift[:-1])  # armed until the running error crossed DISARM_FACTOR x arm_mse
    assert before[-1] < DISARM_FACTOR * 1e-3 <= state.valence_mse and state.armed_step is None
    step = 4 + len(drift)
    while not state.observe(proxy, step, 0.0):
        assert state.valence_mse >= 1e-3
        step += 1
    assert state.valence_mse < 1e-3 and state.armed_step == step + 1
    lookahead, ahead = settings("lookahead"), GateState()
    assert [ahead.observe(lookahead, step, None) for step in range(4)] == [False, False, True, True]


def test_resume_keeps_the_gate_counters_and_baseline(tiny_assets, tmp_path):
    common = SHORT + GATE + ["gate.ratio=0", "trainer.max_steps=5", "trainer.save_every=0"]
    env = {"VKD_FAULT_NAN_LOSS": "2:0"}
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    train_job(base_overrides(tiny_assets, straight) + common, env=env)
    train_job(base_overrides(tiny_assets, resumed) + common + ["trainer.stop_after_steps=3"], env=env)
    second = train_job(base_overrides(tiny_assets, resumed) + common, env=env)
    assert "the teacher's baseline valence" not in second.stderr  # restored, not recomputed
    for name in ("loss", "gate/nonfinite", "gate/rejected", "gate/baseline", "gate/projected"):
        assert column(resumed, name) == column(straight, name), name
    assert column(resumed, "gate/nonfinite")[-1] == "1"
