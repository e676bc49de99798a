"""Real DeepSpeed jobs: 2 processes, ZeRO-3, gloo, DeepSpeed's CPU accelerator."""

import json

import pytest
import torch

from tests.conftest import FULL_OBJECTIVE, base_overrides, deepspeed_launch, save_tiny_model, train_job, vkd_cli
from vkd_ds import checkpoint
from vkd_ds.export import consolidated_state_dict
from vkd_ds.metrics import read_metrics
from vkd_ds.schedule import lr_factor
from vkd_ds.seq_kd import REWARDS

pytestmark = pytest.mark.distributed


def losses(run_dir):
    return [float(row["loss"]) for row in read_metrics(run_dir / "metrics.csv")]


def final_weights(run_dir):
    return consolidated_state_dict(checkpoint.latest_checkpoint(run_dir))


@pytest.fixture(scope="module")
def six_step_run(tiny_assets, tmp_path_factory):
    """2 ranks, ZeRO-3, 6 steps straight, checkpoints at 3 and 6: reused by several tests."""
    run_dir = tmp_path_factory.mktemp("straight") / "run"
    result = train_job(
        base_overrides(tiny_assets, run_dir)
        + ["trainer.max_steps=6", "trainer.save_every=3", "trainer.eval_every=3", "trainer.micro_batch_size=2"]
    )
    return run_dir, result


@pytest.mark.parametrize("reward", REWARDS)
def test_two_ranks_equal_one_rank_on_the_concatenated_batch(reward, tiny_assets, tmp_path):
    """2 ranks x ZeRO-3 x micro 2 against 1 rank x ZeRO-0 x micro 4: same weights, loss, gradients,
    with an on-policy step (step 1 of 3 at onpolicy.fraction=0.5 and seed 1234) among them, for each
    of sequence KD's rewards.

    The student starts from a saved model: a fresh init under zero.Init draws differently from a
    plain one, and the comparison across stages needs the same starting point."""
    student = save_tiny_model(tmp_path / "student")
    common = [
        "trainer.max_steps=3",
        "trainer.grad_accum=2",
        "trainer.eval_every=0",
        f"student.path={student}",
        *FULL_OBJECTIVE,
        "onpolicy.fraction=0.5",
        f"seq_kd.reward={reward}",
    ]
    two = tmp_path / "two"
    one = tmp_path / "one"
    train_job(base_overrides(tiny_assets, two) + common + ["trainer.micro_batch_size=2"], num_procs=2)
    train_job(
        base_overrides(tiny_assets, one) + common + ["trainer.micro_batch_size=4", "deepspeed=zero0"], num_procs=1
    )
    loss_two, loss_one = losses(two), losses(one)
    assert len(loss_two) == len(loss_one) == 3
    for a, b in zip(loss_two, loss_one, strict=True):
        assert abs(a - b) < 1e-5, (loss_two, loss_one)
    assert loss_two[-1] != loss_two[0]  # it trained
    rows_two, rows_one = read_metrics(two / "metrics.csv"), read_metrics(one / "metrics.csv")
    # per_token weighs each sampled token's gradient by its own log p_S at sampling time, from a KV-cached
    # forward whose batch (and left padding) differs between the layouts: float noise of ~1e-6 per
    # token reaches the step-2 terms directly, not averaged (measured 2.3e-5 relative on one value).
    rtol = 1e-4 if reward == "per_token" else 1e-5
    assert [r["onpolicy"] for r in rows_two] == [r["onpolicy"] for r in rows_one] == ["1", "0", "0"]
    assert rows_two[0]["loss/ce"] == ""  # no CE on the student's own samples
    columns = ("loss/ce", "loss/soft", "loss/feat", "loss/seq", "loss/val", "loss/reg", "seq/teacher_logprob")
    for column in (*columns, "seq/student_logprob", "ess", "weight_max", "saliency_mean"):
        torch.testing.assert_close(
            [float(r[column] or "nan") for r in rows_two],
            [float(r[column] or "nan") for r in rows_one],
            rtol=rtol,
            atol=1e-7,
            equal_nan=True,
            msg=column,
        )
    assert min(float(r["ess"]) for r in rows_two) < 0.9  # the weights are far from uniform
    # Adam hides a constant gradient scale from the weights; the gradient norm does not.
    norms_two = [float(r["grad_norm"]) for r in read_metrics(two / "metrics.csv")]
    norms_one = [float(r["grad_norm"]) for r in read_metrics(one / "metrics.csv")]
    torch.testing.assert_close(norms_two, norms_one, rtol=1e-4, atol=0)
    w_two, w_one = final_weights(two), final_weights(one)
    assert w_two.keys() == w_one.keys()
    for name in w_two:
        torch.testing.assert_close(w_two[name], w_one[name], atol=1e-4, rtol=0, msg=name)


def test_resume_continues_exactly(six_step_run, tiny_assets, tmp_path):
    straight, _ = six_step_run
    run_dir = tmp_path / "resumed"
    overrides = base_overrides(tiny_assets, run_dir) + [
        "trainer.max_steps=6",
        "trainer.save_every=3",
        "trainer.eval_every=3",
        "trainer.micro_batch_size=2",
    ]
    train_job(overrides + ["trainer.stop_after_steps=3"])
    assert len(losses(run_dir)) == 3 and not (run_dir / "eval.json").exists()
    # As if killed during step 3's eval, which follows its checkpoint: the row never reached the file.
    metrics_file = run_dir / "metrics.csv"
    metrics_file.write_text("".join(metrics_file.read_text().splitlines(keepends=True)[:-1]))
    assert len(losses(run_dir)) == 2
    second = train_job(overrides + ["resume=auto"])
    assert "resumed from" in second.stderr and "step 3: metrics row recovered from its checkpoint" in second.stderr
    assert losses(run_dir) == losses(straight)  # loss for loss, exactly
    # The recovered row, its eval included, is the row the straight run wrote (but for time and memory).
    measured = ("tokens_per_s", "real_tokens_per_s", "step_time_s", "mem_rss_gb", "mem_peak_rss_gb")

    def values(row):
        return {k: v for k, v in row.items() if k not in measured}

    assert values(read_metrics(metrics_file)[2]) == values(read_metrics(straight / "metrics.csv")[2])
    assert values(read_metrics(metrics_file)[2])["eval/ppl"] != ""
    assert json.loads((run_dir / "eval.json").read_text()) == json.loads((straight / "eval.json").read_text())


def test_run_directory_layout(six_step_run):
    run_dir, result = six_step_run
    for name in ("config.yaml", "metrics.csv", "train.log", "eval.json", "student/config.json"):
        assert (run_dir / name).is_file(), name
    rows = read_metrics(run_dir / "metrics.csv")
    assert [int(r["step"]) for r in rows] == list(range(1, 7))
    for column in ("loss", "loss/ce", "loss/soft", "lr", "tokens_per_s", "mem_rss_gb", "eval/ppl", "eval/kl_teacher"):
        assert column in rows[0], column
    assert [p.name for p in checkpoint.complete_checkpoints(run_dir)] == ["step_0000003", "step_0000006"]
    assert "step 6/6" in (run_dir / "train.log").read_text()
    # The LR each step applied (lr=3e-3, 2 warmup steps of 6, min_lr_ratio 0.1): step 1 the first
    # warmup LR (DeepSpeed's WarmupCosineLR applied 0), step 2 the peak, the last step the minimum.
    applied = [float(r["lr"]) for r in rows]
    expected = [3e-3 * lr_factor(step, 2, 6, 0.1) for step in range(1, 7)]
    assert applied == pytest.approx(expected, rel=1e-6)
    assert applied[0] == pytest.approx(1.5e-3) and applied[1] == pytest.approx(3e-3)
    assert applied[-1] == pytest.approx(3e-4)


def test_teacher_is_sharded_frozen_and_not_checkpointed(six_step_run, tiny_assets, tmp_path):
    run_dir, _ = six_step_run
    result = deepspeed_launch(
        ["tests/scripts/teacher_shards.py", str(tmp_path), *base_overrides(tiny_assets, tmp_path / "unused")],
        num_procs=2,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    reports = [json.loads((tmp_path / f"rank_{r}.json").read_text()) for r in range(2)]
    from transformers import AutoModelForCausalLM

    teacher_numel = sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(tiny_assets / "teacher").parameters())
    for report in reports:
        assert report["world"] == 2 and report["total"] == teacher_numel
        assert abs(report["local"] - teacher_numel / 2) <= 0.02 * teacher_numel  # about 1/N each
        assert report["frozen"] and report["eval_mode"]
    # The checkpoint holds the student module only: its LM, projectors and valence head.
    weights = final_weights(run_dir)
    assert {name.split(".")[0] for name in weights} == {"lm", "projectors", "valence_head"}
    student_numel = sum(t.numel() for t in weights.values())
    assert student_numel < teacher_numel
    files = {p.name for p in checkpoint.latest_checkpoint(run_dir).iterdir()}
    assert files == {
        "COMPLETE",
        "rng",
        "zero_pp_rank_0_mp_rank_00_model_states.pt",
        "zero_pp_rank_1_mp_rank_00_model_states.pt",
        "zero_pp_rank_0_mp_rank_00_optim_states.pt",
        "zero_pp_rank_1_mp_rank_00_optim_states.pt",
    }


def assert_export_matches_engine(run_dir, overrides, num_procs, tmp_path, dtype=torch.float32):
    """Export the run, reload it with transformers in `dtype` (the engine's precision) and compare its
    logits with those of the engine that loads the same checkpoint."""
    out_dir = tmp_path / "exported"
    result = vkd_cli(["export", str(run_dir), str(out_dir)])
    assert result.returncode == 0, result.stderr
    logits_file = tmp_path / "engine_logits.pt"
    result = deepspeed_launch(["tests/scripts/engine_logits.py", str(logits_file), *overrides], num_procs=num_procs)
    assert result.returncode == 0, result.stderr[-4000:]
    engine = torch.load(logits_file)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(out_dir, dtype=dtype)
    assert len(AutoTokenizer.from_pretrained(out_dir)) == engine["logits"].shape[-1]
    with torch.no_grad():
        logits = model(input_ids=engine["input_ids"]).logits
    # bf16: a few ulps (2^-8 relative) apart, as two attention kernels (eager for the attention-map
    # term in the engine, the default one on reload) round differently.
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(logits, engine["logits"], atol=tol, rtol=tol)
    return out_dir


def test_export_round_trip_logits_equal_the_engine(six_step_run, tiny_assets, tmp_path):
    run_dir, _ = six_step_run
    out_dir = assert_export_matches_engine(run_dir, base_overrides(tiny_assets, run_dir), 2, tmp_path)
    # A second export into a non-empty directory refuses and leaves it untouched.
    again = vkd_cli(["export", str(run_dir), str(out_dir)])
    assert again.returncode == 2 and "not empty" in again.stderr


@pytest.mark.parametrize("stage", ["zero0", "zero2"])
def test_export_from_other_zero_stages(stage, tiny_assets, tmp_path):
    run_dir = tmp_path / "run"
    overrides = base_overrides(tiny_assets, run_dir) + [f"deepspeed={stage}", "trainer.eval_every=0"]
    train_job(overrides + ["trainer.max_steps=2"], num_procs=1)
    assert_export_matches_engine(run_dir, overrides, 1, tmp_path)


def test_fused_lm_head_trains_like_the_logits_path(tiny_assets, tmp_path):
    """loss.fused_head=true (no student logits at all) under ZeRO-3 on 2 ranks: same losses, same eval
    and same weights as the logits path, with another divergence than forward KL (eval then also runs
    the training divergence) and an on-policy step (no CE there)."""
    common = ["trainer.max_steps=3", "trainer.eval_every=3", "trainer.micro_batch_size=2", *FULL_OBJECTIVE]
    common += ["loss.divergence=jsd", "loss.beta=0.3", "onpolicy.fraction=0.5"]
    plain, fused = tmp_path / "plain", tmp_path / "fused"
    train_job(base_overrides(tiny_assets, plain) + common)
    train_job(base_overrides(tiny_assets, fused) + common + ["loss.fused_head=true"])
    torch.testing.assert_close(losses(fused), losses(plain), rtol=1e-5, atol=1e-6)
    eval_plain = json.loads((plain / "eval.json").read_text())
    eval_fused = json.loads((fused / "eval.json").read_text())
    for key in ("eval/ce", "eval/kl_teacher", "eval/divergence", "eval/valence_mse"):
        assert eval_fused[key] == pytest.approx(eval_plain[key], rel=1e-5), key
    assert eval_plain["eval/divergence"] != pytest.approx(eval_plain["eval/kl_teacher"], rel=1e-3)
    w_plain, w_fused = final_weights(plain), final_weights(fused)
    for name in w_plain:
        torch.testing.assert_close(w_fused[name], w_plain[name], atol=1e-5, rtol=0, msg=name)


def test_tensorboard_events_and_the_report(six_step_run, tmp_path):
    run_dir, _ = six_step_run
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    loss = events.Scalars("loss")
    assert [e.step for e in loss] == list(range(1, 7))
    assert [round(e.value, 5) for e in loss] == [round(x, 5) for x in losses(run_dir)]
    assert "eval/ppl" in events.Tags()["scalars"]

    result = vkd_cli(["report", str(run_dir), "--out", str(tmp_path / "report")])
    assert result.returncode == 0, result.stderr
    report = (tmp_path / "report" / "report.md").read_text()
    for png in ("loss.png", "weights.png", "lr.png", "throughput.png", "eval.png"):
        data = (tmp_path / "report" / png).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000, png
        assert f"]({png})" in report
    assert "Mercy gate: projected valence" in report.split("## Not logged by this run")[1]  # gate off here
    missing = vkd_cli(["report", str(tmp_path)])
    assert missing.returncode == 2 and "has no metrics.csv" in missing.stderr


def test_eval_of_a_run_and_of_an_exported_model(six_step_run, tiny_assets, tmp_path):
    run_dir, _ = six_step_run
    result = vkd_cli(["eval", str(run_dir)])  # the run's config with eval_only=true
    assert result.returncode == 0, result.stderr[-3000:]
    again = json.loads((run_dir / "eval" / "step_0000006.json").read_text())
    final = json.loads((run_dir / "eval.json").read_text())
    for key in ("eval/ce", "eval/ppl", "eval/kl_teacher", "eval/valence_mse", "eval/tokens"):
        assert again[key] == pytest.approx(final[key], rel=1e-6), key
    assert 0 <= again["eval/top1_agreement"] <= 1

    # An exported model against itself as the teacher: no KL, full top-1 agreement.
    exported = tmp_path / "exported"
    assert vkd_cli(["export", str(run_dir), str(exported)]).returncode == 0
    overrides = base_overrides(tiny_assets, tmp_path / "unused") + [
        f"student.path={exported}",
        f"teacher.path={exported}",
        "valence.teacher_head=null",
        "loss.val=0",
        "weighting.lam=0",
        "trainer.micro_batch_size=2",  # the run's: the same held-out batches
    ]
    result = vkd_cli(["eval", *overrides])
    assert result.returncode == 0, result.stderr[-3000:]
    figures = json.loads(result.stdout[result.stdout.index("{") :])
    assert figures["eval/kl_teacher"] < 1e-6 and figures["eval/top1_agreement"] == 1.0
    assert figures["eval/tokens"] == again["eval/tokens"]
    assert figures["eval/ce"] == pytest.approx(again["eval/ce"], rel=1e-5)  # the exported weights are the run's
    assert not (tmp_path / "unused").exists()  # eval writes no run directory


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2", "mistral"])
def test_architectures_as_teacher_and_student_train_and_export(arch, tiny_assets, tmp_path):
    """Teacher and student of one architecture, built from configs: the feature hooks find both
    models' decoder layers, training runs on ZeRO-3, and the export reloads with from_pretrained
    with the engine's logits."""
    from transformers import AutoConfig, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_assets / "tokenizer")
    teacher = save_tiny_model(
        tmp_path / "teacher",
        arch,
        seed=0,
        vocab_size=len(tokenizer),
        hidden_size=48,
        intermediate_size=96,
        num_hidden_layers=3,
        num_attention_heads=4,
    )
    tokenizer.save_pretrained(teacher)
    run_dir = tmp_path / "run"
    overrides = base_overrides(tiny_assets, run_dir) + [
        f"teacher.path={teacher}",
        f"student.config.model_type={arch}",
        "trainer.max_steps=2",
        "trainer.eval_every=0",
        "loss.feat=0.4",  # the hooks on both models' decoder layers
    ]
    result = train_job(overrides, num_procs=1)
    rows = read_metrics(run_dir / "metrics.csv")
    assert float(rows[-1]["loss/feat"]) > 0 and "loss/val" in rows[-1]
    exported = assert_export_matches_engine(run_dir, overrides, 1, tmp_path)
    assert AutoConfig.from_pretrained(exported).model_type == arch, result.stderr[-500:]
