"""Sequence-level KD under ZeRO-3 with 2 real processes: generation modes, lockstep, learning, resume."""

import json
import statistics

import pytest
import torch

from tests.conftest import base_overrides, deepspeed_launch, train_job
from vkd_ds.metrics import read_metrics
from vkd_ds.terms import loss_overrides

pytestmark = pytest.mark.distributed

SEQ_ONLY = [
    *loss_overrides(seq=1.0),
    "weighting.lam=0",
]


def test_gathered_and_synced_generation_sample_the_same_and_uneven_lengths_do_not_hang(tiny_assets, tmp_path):
    result = deepspeed_launch(
        ["tests/scripts/rollout_modes.py", str(tmp_path), *base_overrides(tiny_assets, tmp_path / "unused")],
        num_procs=2,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    reports = [json.loads((tmp_path / f"rank_{r}.json").read_text()) for r in range(2)]
    for report in reports:
        assert report["modes"] == ["gathered", "synced"]
        assert report["gathered"] == report["synced"]
        assert all(len(tokens) == 10 for tokens in report["gathered"])
    assert reports[0]["gathered"] != reports[1]["gathered"]  # the ranks had different prompts
    # Rank 0 stopped at EOS after one token while rank 1 generated all 10, in both modes.
    assert reports[0]["uneven"]["gathered"] == reports[0]["uneven"]["synced"] == [reports[0]["gathered"][0][:1]]
    assert reports[1]["uneven"]["gathered"] == reports[1]["uneven"]["synced"] == reports[1]["gathered"]
    # A training step on those samples, of different shapes on the two ranks, kept them in agreement.
    assert reports[0]["shape"][0] == 1 and reports[1]["shape"][0] == 3
    for report in reports:
        assert report["same_model_on_every_rank"] and torch.isfinite(torch.tensor(report["loss"]))


def write_preferring_teacher(tokenizer_dir, out_dir, preferred=range(10, 42), score=6.0):
    """A teacher whose next-token distribution ignores the context and puts 97% of its mass on
    `preferred`: every position's last hidden state is the same vector (attention and MLP outputs
    zeroed, one shared embedding row), and the LM head maps it to `score` on those tokens, 0 elsewhere."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from vkd_ds.assets import llama_config

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(llama_config(len(tokenizer), 48, 2))
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        shared = torch.randn(48)
        model.model.embed_tokens.weight.copy_(shared.expand_as(model.model.embed_tokens.weight))
        normed = model.model.norm(shared[None, None])[0, 0]
        scores = torch.zeros(len(tokenizer))
        scores[list(preferred)] = score
        model.lm_head.weight.copy_(scores[:, None] * (normed / normed.dot(normed))[None, :])
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)


def test_seq_kd_alone_raises_the_teachers_logprob_of_student_samples(tiny_assets, tmp_path):
    teacher = tmp_path / "teacher"
    write_preferring_teacher(tiny_assets / "tokenizer", teacher)
    run_dir = tmp_path / "run"
    train_job(
        base_overrides(tiny_assets, run_dir)
        + SEQ_ONLY
        + [
            f"teacher.path={teacher}",
            "valence.teacher_head=null",
            "trainer.max_steps=30",
            "trainer.micro_batch_size=8",
            "trainer.lr=3e-2",
            "trainer.eval_every=0",
            "trainer.save_every=0",
            "seq_kd.n_gen=16",
        ]
    )
    rows = read_metrics(run_dir / "metrics.csv")
    logprob = [float(r["seq/teacher_logprob"]) for r in rows]
    # A random student hits the preferred tokens 8% of the time: about -9 nats per token.
    before, after = statistics.mean(logprob[:5]), statistics.mean(logprob[-5:])
    noise = statistics.stdev(logprob[:5])
    assert noise < 0.4, logprob
    # Measured by hand (trainer.seed=1 and 2): -9.0 -> -3.6 over the 30 steps, noise ~0.1.
    assert after - before > 3.0, logprob
    assert all(0 < float(r["seq/gen_len_mean"]) <= float(r["seq/gen_len_max"]) == 16 for r in rows)
    assert "loss/ce" not in rows[0] and float(rows[0]["seq/rollout_tokens_per_s"]) > 0


def test_resume_with_seq_kd_reverse_kl_and_a_moving_baseline_continues_exactly(tiny_assets, tmp_path):
    common = [
        "loss.seq=0.5",
        "seq_kd.n_gen=6",
        "seq_kd.baseline=ema",
        "seq_kd.reward=reverse_kl",
        "seq_kd.every_n_steps=2",
        "trainer.max_steps=5",
        "trainer.micro_batch_size=2",
        "trainer.eval_every=0",
        "trainer.save_every=0",
    ]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    train_job(base_overrides(tiny_assets, straight) + common)
    train_job(base_overrides(tiny_assets, resumed) + common + ["trainer.stop_after_steps=3"])
    train_job(base_overrides(tiny_assets, resumed) + common)
    rows_straight, rows_resumed = read_metrics(straight / "metrics.csv"), read_metrics(resumed / "metrics.csv")
    for column in ("loss", "loss/seq", "seq/baseline", "seq/teacher_logprob"):
        assert [r[column] for r in rows_straight] == [r[column] for r in rows_resumed], column
    # Rollouts on steps 0, 2, 4 only (rows 1, 3, 5); the baseline moves from the second one on.
    assert [bool(r["loss/seq"]) for r in rows_straight] == [True, False, True, False, True]
    baselines = [float(r["seq/baseline"]) for r in rows_straight if r["seq/baseline"]]
    rewards = [float(r["seq/reward"]) for r in rows_straight if r["seq/reward"]]
    assert baselines[0] == rewards[0] and baselines[1] == pytest.approx(rewards[0], abs=1e-6)
    assert baselines[2] == pytest.approx(0.9 * rewards[0] + 0.1 * rewards[1], abs=1e-6)
    for row in rows_straight[::2]:  # the reverse-KL reward: log p_T - log p_S of the samples
        expected = float(row["seq/teacher_logprob"]) - float(row["seq/student_logprob"])
        assert float(row["seq/reward"]) == pytest.approx(expected, abs=1e-5)
