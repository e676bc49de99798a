"""Every documented config key is kept: a row for each key of `vkd-ds train --cfg job` (the typed
settings' fields), with a value that changes behaviour and the effect that value must have.

Rows:
- `Run(job, overrides, check)`: the key runs in a short 2-rank job; jobs group keys whose effects do
  not overlap, and a check compares the job with the reference job (`ref`, defaults on the tiny
  assets) or another job where it says so. Step-1 values depend only on the student's initial
  weights, the batch and the loss settings, so a loss key's effect is a step-1 column that differs.
- `Elsewhere(test, why)`: the key's effect is asserted by that test, which names the key.
- `Refused(overrides, message)`: the key's behaviour is a check (it refuses what it guards).
- `NotHere(reason)`: it cannot run on this machine.

A new key without a row fails `test_every_key_has_a_row`; so does a row for a key that is gone.
"""

from __future__ import annotations

import ast
import dataclasses
import json
import re
import shutil
import struct
import typing
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import REPO, base_overrides, deepspeed_launch, save_tiny_model, vkd_cli
from tests.conftest import vkd_cli_in_process as cli
from vkd_ds.terms import TERM_NAMES


@dataclass(frozen=True)
class Run:
    job: str
    overrides: tuple[str, ...]
    check: Callable


@dataclass(frozen=True)
class Elsewhere:
    test: str  # tests/FILE.py::test_name
    why: str


@dataclass(frozen=True)
class Refused:
    overrides: tuple[str, ...]
    message: str


@dataclass(frozen=True)
class NotHere:
    reason: str


# --- checks: each takes (this job, all jobs) ---------------------------------------------------


def value(job, column: str, step: int = 1) -> float:
    return float(job.rows[step - 1][column])


def relative(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-12)


def differs(column: str, vs: str = "ref", step: int = 1, at_least: float = 1e-4):
    """`column` differs from job `vs`'s by more than `at_least` (relative): above the float noise
    that other keys of the same job may add (e.g. eager against fused attention kernels)."""

    def check(job, jobs):
        a, b = value(job, column, step), value(jobs[vs], column, step)
        assert relative(a, b) > at_least, f"{column} at step {step}: {a} here, {b} in {vs}"

    return check


def same(column: str, vs: str = "ref", step: int = 1, rtol: float = 1e-5):
    def check(job, jobs):
        a, b = value(job, column, step), value(jobs[vs], column, step)
        assert relative(a, b) <= rtol, f"{column} at step {step}: {a} here, {b} in {vs}"

    return check


def logged(text: str):
    def check(job, jobs):
        assert text.format(**job.paths) in job.log, job.log[-3000:]

    return check


def both(*checks):
    def check(job, jobs):
        for one in checks:
            one(job, jobs)

    return check


def lambda_used(term: str, weight: float, step: int = 1):
    """`loss` is Σ λ·loss/<term> with this job's λ for `term`: an identity that the default λ of
    `term` would break (its term is not 0)."""

    def check(job, jobs):
        weights = job.config["loss"]
        row = job.rows[step - 1]
        assert weights[term] == weight
        total = sum(weights[t] * float(row[f"loss/{t}"]) for t in TERM_NAMES if row.get(f"loss/{t}"))
        assert relative(float(row["loss"]), total) < 1e-4, (row["loss"], total)
        assert float(row[f"loss/{term}"]) > 0

    return check


def no_columns(prefix: str):
    def check(job, jobs):
        assert not [c for c in job.rows[0] if c.startswith(prefix)], list(job.rows[0])
        assert [c for c in jobs["ref"].rows[0] if c.startswith(prefix)]

    return check


def lr_follows_the_schedule(job, jobs):
    from vkd_ds.schedule import lr_factor

    t = job.config["trainer"]
    for row in job.rows:
        expected = t["lr"] * lr_factor(int(row["step"]), t["warmup_steps"], t["max_steps"], t["min_lr_ratio"])
        assert relative(float(row["lr"]), expected) < 1e-5, (row["step"], row["lr"], expected)


def student_parameters(job) -> float:
    return float(re.search(r"student: ([0-9.]+)M parameters", job.log).group(1))


def wandb_run_continues(job, jobs):
    """Both invocations log into one W&B run (offline): the same run id, steps 1-2 then 3, the
    metrics of metrics.csv and the resolved config."""
    runs = sorted((job.run_dir / "wandb").glob("offline-run-*"))
    assert len(runs) == 2, runs
    run_id = (job.run_dir / "wandb_id").read_text().strip()
    logged_steps, config = [], {}
    for run in runs:
        records = list(wandb_records(run / f"run-{run_id}.wandb"))
        assert records, f"{run} holds no run-{run_id}.wandb"
        for record in records:
            kind = record.WhichOneof("record_type")
            if kind == "run":
                assert record.run.run_id == run_id
                config.update({i.key: json.loads(i.value_json) for i in record.run.config.update})
            elif kind == "history":
                items = {"/".join(i.nested_key) or i.key: json.loads(i.value_json) for i in record.history.item}
                logged_steps.append(record.history.step.num)
                csv_row = job.rows[record.history.step.num - 1]
                assert relative(items["loss"], float(csv_row["loss"])) < 1e-6
    assert logged_steps == [1, 2, 3], logged_steps
    assert config["trainer"]["max_steps"] == 3 and config["loss"]["divergence"] == "forward_kl"


def wandb_records(path: Path):
    """The records of an offline W&B run file: wandb's record log (a 7-byte header, then 32 KiB
    blocks of records, each a 7-byte header and a piece of one protobuf `Record`)."""
    from wandb.proto import wandb_internal_pb2

    data, block, header = path.read_bytes(), 32768, struct.Struct("<IHB")
    assert data[:4] == b":W&B", data[:7]
    position, payload = 7, b""
    while position + header.size <= len(data):
        if block - position % block < header.size:  # a block's tail too short for a header is padding
            position += block - position % block
            continue
        _, length, kind = header.unpack_from(data, position)
        payload += data[position + header.size : position + header.size + length]
        position += header.size + length
        if kind in (1, 4):  # a whole record, or a record's last piece
            record = wandb_internal_pb2.Record()
            record.ParseFromString(payload)
            yield record
            payload = b""


def ema_at_half(job) -> bool:
    expected = 0.5 * value(job, "seq/baseline", 3) + 0.5 * value(job, "seq/reward", 3)
    return relative(value(job, "seq/baseline", 5), expected) < 1e-4


def fitted(name: str):
    def check(job, jobs):
        assert job.fits[name] != job.fits["base"], (name, job.fits)

    return check


COVERAGE: dict[str, Run | Elsewhere | Refused | NotHere] = {
    # --- teacher, student, data --------------------------------------------------------------
    "teacher.path": Run("teacher", ("teacher.path={other_teacher}",), differs("eval/teacher_ce", step=3)),
    "teacher.offload_param": Run("misc", ("teacher.offload_param=none",), logged("(ZeRO-3, offload=none)")),
    "teacher.layout": Elsewhere(
        "tests/test_speed_path.py::test_the_planned_layout_trains_as_zero3_does_and_shards_when_told_the_device_is_small",
        "teacher.layout=auto keeps the teacher whole on each rank (logged), with ZeRO-3's losses",
    ),
    "teacher.cache": Elsewhere(
        "tests/test_teacher_cache.py::test_at_k_equal_to_the_vocabulary_a_cached_run_has_the_live_runs_losses",
        "a run on teacher.cache loads no teacher and has the live run's losses at k = V",
    ),
    "teacher.tokenizer_path": Elsewhere(
        "tests/test_cross_tokenizer_training.py::test_a_teacher_with_its_own_tokenizer_distills_on_two_zero3_ranks_and_resumes_exactly",
        "teacher.tokenizer_path=<another tokenizer> runs the teacher on its own tokens and logs it",
    ),
    "teacher.nvme_path": NotHere(
        "only with teacher.offload_param=nvme: DeepSpeed's NVMe offload needs its async_io op (libaio), "
        "which this project neither builds nor tests yet (issue #18)"
    ),
    "student.path": Run(
        "teacher", ("student.path={student_dir}",), both(logged("held by rank 0 ({student_dir})"), differs("loss/ce"))
    ),
    "student.config": Run(
        "wide",
        ("student.config.hidden_size=48", "student.config.intermediate_size=96"),
        lambda job, jobs: student_parameters(job) > student_parameters(jobs["ref"]),
    ),
    # Another order of the records: the first global batch holds other sequences.
    "data.train_path": Run("misc", ("data.train_path={reversed_train}",), differs("tokens")),
    "data.valid_path": Run("misc", ("data.valid_path=null",), no_columns("eval/")),
    # The vocabulary must be the teacher's (another is refused: test_bad_input); the run reads this
    # directory and exports its copy of it with the student.
    "data.tokenizer_path": Run(
        "misc",
        ("data.tokenizer_path={tokenizer_copy}",),
        lambda job, jobs: (
            (job.run_dir / "student" / "tokenizer.json").is_file()
            and job.config["data"]["tokenizer_path"] == job.paths["tokenizer_copy"]
        ),
    ),
    # The job's token store (train only: the misc job sets data.valid_path=null) is written there.
    "data.store_dir": Run(
        "misc",
        ("data.store_dir={store_dir}",),
        lambda job, jobs: len(list(Path(job.paths["store_dir"]).glob("*/manifest.json"))) == 1,  # valid_path=null
    ),
    "data.max_seq_len": Run(
        "wide", ("data.max_seq_len=24",), lambda job, jobs: value(job, "tokens") < value(jobs["ref"], "tokens")
    ),
    "data.packing": Elsewhere(
        "tests/test_packing.py::test_packed_two_ranks_equal_one_rank_with_short_documents",
        "data.packing=true packs short documents several to a row (the start-up log says how), and 2 ranks "
        "equal 1; tests/test_packing.py also shows each document's losses and gradients are its unpacked ones",
    ),
    "data.pack_length": Elsewhere(
        "tests/test_packing.py::test_rows_of_another_length_and_their_refusal",
        "data.pack_length=96 packs rows of 96 tokens; below data.max_seq_len it is refused",
    ),
    "data.assistant_turns": Elsewhere(
        "tests/test_chat.py::test_conversations_in_a_token_store_keep_their_assistant_targets",
        "data.assistant_turns=last makes another store whose conversations target their last reply only",
    ),
    # --- loss ---------------------------------------------------------------------------------
    "loss.ce": Run("lambdas", ("loss.ce=0.5",), lambda_used("ce", 0.5)),
    "loss.soft": Run("lambdas", ("loss.soft=0.3",), lambda_used("soft", 0.3)),
    "loss.feat": Run("lambdas", ("loss.feat=0.2",), lambda_used("feat", 0.2)),
    "loss.seq": Run("seq", ("loss.seq=0.2",), lambda_used("seq", 0.2)),
    "loss.val": Run("lambdas", ("loss.val=0.9",), lambda_used("val", 0.9)),
    "loss.reg": Run("lambdas", ("loss.reg=0.001",), lambda_used("reg", 0.001)),
    "loss.divergence": Run("jsd", ("loss.divergence=jsd",), differs("loss/soft")),
    "loss.beta": Run("jsd_beta", ("loss.divergence=jsd", "loss.beta=0.2"), differs("loss/soft", vs="jsd")),
    # α = 0 makes the skewed KL the plain forward KL, which the default α = 0.1 does not.
    "loss.alpha": Run("skew", ("loss.divergence=skew_forward_kl", "loss.alpha=0.0"), same("loss/soft")),
    "loss.temperature": Run("lambdas", ("loss.temperature=2.0",), differs("loss/soft")),
    # Chunking changes memory, not values: CE in 7-token chunks equals the default's.
    "loss.chunk_tokens": Run(
        "lambdas", ("loss.chunk_tokens=7",), both(logged("7 tokens per chunk"), same("loss/ce", rtol=1e-5))
    ),
    "loss.cross_tokenizer": Elsewhere(
        "tests/test_cross_tokenizer_training.py::test_a_teacher_with_its_own_tokenizer_distills_on_two_zero3_ranks_and_resumes_exactly",
        "loss.cross_tokenizer=positional_uld gives another soft term than the aligned default from the same step",
    ),
    "loss.fused_head": Run(
        "jsd", ("loss.fused_head=true",), both(logged("from the fused LM head"), same("loss/ce", rtol=1e-5))
    ),
    # --- valence weights, feature KD, L_reg, valence heads ------------------------------------
    "weighting.lam": Run("lam", ("weighting.lam=2.0",), differs("weight_max")),
    "weighting.z_max": Run("zmax", ("weighting.z_max=0.5",), differs("weight_max")),
    "weighting.normalize": Run("nonorm", ("weighting.normalize=false",), differs("weight_max")),
    "weighting.alphas": Run("alphas", ("weighting.alphas=[0.1,0.1,0.1,0.7]",), differs("saliency_mean")),
    "weighting.eps": Run("eps", ("weighting.eps=1.0",), differs("weight_max")),
    "feat.layer_map": Run(
        "skew",
        ("feat.layer_map=[[0,0],[1,2]]",),
        both(logged("student->teacher layers 0->0 1->2"), differs("loss/feat")),
    ),
    "feat.projectors": Refused(("feat.projectors=false",), "feat.projectors=false but the student's width (32)"),
    "feat.normalize": Run("lambdas", ("feat.normalize=true",), differs("loss/feat")),
    "feat.attention": Run("jsd", ("feat.attention=0.5",), differs("loss/feat")),
    # Σ‖θ‖² is not weighted per sequence: the valence weights of this job leave it as it is.
    "reg.param_patterns": Run("alphas", ("reg.param_patterns=[*norm.weight]",), differs("loss/reg")),
    "reg.contrastive": Run("jsd", ("reg.contrastive=0.5",), differs("loss/reg")),
    "reg.contrastive_temperature": Run(
        "jsd_beta", ("reg.contrastive=0.5", "reg.contrastive_temperature=0.05"), differs("loss/reg", vs="jsd")
    ),
    "valence.k": Run("k4", ("valence.k=4", "valence.teacher_head={head_k4}"), differs("loss/val")),
    "valence.teacher_head": Run("k4", ("valence.teacher_head={head_k4}",), differs("saliency_mean")),
    "valence.fit.out": Run("fit", (), lambda job, jobs: Path(job.paths["fit_out"]).is_file()),
    "valence.fit.labels": Run("fit", (), fitted("labels")),
    "valence.fit.steps": Run("fit", (), fitted("steps")),
    "valence.fit.batch_size": Run("fit", (), fitted("batch_size")),
    "valence.fit.lr": Run("fit", (), fitted("lr")),
    "valence.fit.lexicon_decay": Run("fit", (), lambda job, jobs: job.fits["lexicon_decay"] != job.fits["labels"]),
    # --- sequence KD, on-policy, rollouts, gate -----------------------------------------------
    "seq_kd.every_n_steps": Run(
        "seq",
        ("seq_kd.every_n_steps=2",),
        lambda job, jobs: [bool(r["seq/reward"]) for r in job.rows] == [True, False, True, False, True],
    ),
    "seq_kd.n_gen": Run("seq", ("seq_kd.n_gen=5",), lambda job, jobs: value(job, "seq/gen_len_max") <= 5),
    "seq_kd.prompt_tokens": Run(
        "seq_prompt", ("seq_kd.prompt_tokens=4",), differs("seq/teacher_logprob", vs="seq_base")
    ),
    "seq_kd.temperature": Run("seq_t", ("seq_kd.temperature=0.3",), differs("seq/student_logprob", vs="seq_base")),
    "seq_kd.top_p": Run("seq_p", ("seq_kd.top_p=0.3",), differs("seq/student_logprob", vs="seq_base")),
    # The reverse-KL reward is log p_T - log p_S of the sample, not log p_T alone.
    "seq_kd.reward": Run(
        "seq",
        ("seq_kd.reward=reverse_kl",),
        lambda job, jobs: relative(value(job, "seq/reward"), value(job, "seq/teacher_logprob")) > 1e-4,
    ),
    # Rollouts on steps 1, 3, 5. A batch baseline is the step's mean reward; the moving one (the
    # value a rollout step uses, before it takes in that step's reward) lags it.
    "seq_kd.baseline": Run(
        "seq",
        ("seq_kd.baseline=ema",),
        lambda job, jobs: relative(value(job, "seq/baseline", 3), value(job, "seq/reward", 3)) > 1e-4,
    ),
    # b <- decay·b + (1 - decay)·(the step's mean reward), at decay 0.5.
    "seq_kd.baseline_decay": Run("seq", ("seq_kd.baseline_decay=0.5",), lambda job, jobs: ema_at_half(job)),
    # The surrogate's gradient is divided by each sample's length (its logged value is not).
    "seq_kd.length_normalized": Run("seq_ln", ("seq_kd.length_normalized=true",), differs("grad_norm", vs="seq_base")),
    "seq_kd.normalize_advantages": Elsewhere(
        "tests/test_collectives.py::test_normalized_advantages_are_the_plain_ones_over_the_global_batchs_reward_spread",
        "advantages over the global batch's reward spread, equal on 1 and 2 ranks; the key reaches SeqKDSettings",
    ),
    "onpolicy.fraction": Run(
        "misc", ("onpolicy.fraction=1.0",), lambda job, jobs: [r["onpolicy"] for r in job.rows] == ["1"] * 3
    ),
    "rollout.gather_student": Run("seq", ("rollout.gather_student=never",), logged("student synced")),
    "gate.enabled": Run("gate", ("gate.enabled=true",), lambda job, jobs: bool(job.rows[0]["gate/baseline"])),
    "gate.mode": Elsewhere(
        "tests/test_gate.py::test_a_rejected_step_leaves_weights_optimizer_and_lr_bit_identical",
        "both modes, forced to reject, leave the student bit-identical",
    ),
    "gate.ratio": Elsewhere(
        "tests/test_gate.py::test_ratio_zero_never_rejects_and_trains_like_no_gate",
        "ratio 0 never rejects (and trains like no gate); a very high ratio rejects every step",
    ),
    # The proxy is proxy_factor × the student's mean valence: at step 1 (the same student) 0.5 vs 0.95.
    "gate.proxy_factor": Run(
        "gate_half",
        ("gate.enabled=true", "gate.proxy_factor=0.5"),
        lambda job, jobs: (
            relative(value(job, "gate/projected") / value(jobs["gate"], "gate/projected"), 0.5 / 0.95) < 1e-5
        ),
    ),
    "gate.rollout_steps": Elsewhere(
        "tests/test_gate.py::test_a_rejected_step_leaves_weights_optimizer_and_lr_bit_identical",
        "lookahead continues the probe prompts gate.rollout_steps tokens",
    ),
    "gate.probe_size": Elsewhere(
        "tests/test_bad_input.py::test_a_gate_probe_smaller_than_the_world_is_refused_by_the_ranks",
        "a probe smaller than the world is refused",
    ),
    "gate.baseline_every": Run(
        "gate_half",
        ("gate.baseline_every=1",),
        lambda job, jobs: job.log.count("baseline valence is") > jobs["gate"].log.count("baseline valence is"),
    ),
    "gate.warmup_steps": Elsewhere(
        "tests/test_gate.py::test_a_rejected_step_leaves_weights_optimizer_and_lr_bit_identical",
        "the steps before gate.warmup_steps commit at a ratio that rejects every armed step",
    ),
    "gate.arm_mse": Elsewhere(
        "tests/test_gate.py::test_the_proxy_arms_below_arm_mse_and_kill_9_before_and_after_resumes_exactly",
        "the proxy arms at the first step whose running valence MSE is below gate.arm_mse",
    ),
    "gate.max_consecutive_rejections": Elsewhere(
        "tests/test_gate.py::test_consecutive_failures_stop_the_run_and_keep_the_last_checkpoint",
        "that many rejected steps in a row end the run",
    ),
    # --- metrics, trainer ---------------------------------------------------------------------
    "metrics.tensorboard": Run(
        "misc", ("metrics.tensorboard=false",), lambda job, jobs: not (job.run_dir / "tensorboard").exists()
    ),
    "metrics.wandb_project": Run("resumed", ("metrics.wandb_project=vkd-coverage",), wandb_run_continues),
    "trainer.max_steps": Run("seq", ("trainer.max_steps=5",), lambda job, jobs: len(job.rows) == 5),
    "trainer.micro_batch_size": Run("misc", ("trainer.micro_batch_size=2",), logged("global batch 12 packed rows")),
    "trainer.grad_accum": Run("misc", ("trainer.grad_accum=3",), logged("global batch 12 packed rows")),
    "trainer.global_batch_size": Refused(("trainer.global_batch_size=12",), "trainer.global_batch_size=12 does not"),
    "trainer.lr": Run("opt_lr", ("trainer.lr=0.01",), lr_follows_the_schedule),
    "trainer.min_lr_ratio": Run("opt_lr", ("trainer.min_lr_ratio=0.5",), lr_follows_the_schedule),
    "trainer.warmup_steps": Run("opt_lr", ("trainer.warmup_steps=0",), lr_follows_the_schedule),
    # AdamW's first update does not depend on the betas: they show from the second update on.
    # The job is the reference but for this key (runs repeat bit for bit), so any change is its effect;
    # the tiny student's weights are small, so decoupled decay moves the loss little.
    "trainer.weight_decay": Run("opt_wd", ("trainer.weight_decay=10.0",), differs("loss", step=3, at_least=1e-6)),
    # Alone in their jobs (no other key adds float noise), and weak in 2 steps of a tiny student
    # (about 1.5e-5 of the loss): anything above 1e-6 is the key's own effect.
    "trainer.betas": Run("opt_betas", ("trainer.betas=[0.5,0.5]",), differs("loss", step=3, at_least=1e-6)),
    "trainer.grad_clip": Run("opt_clip", ("trainer.grad_clip=0.01",), differs("loss", step=2, at_least=1e-6)),
    "trainer.seed": Run("opt_lr", ("trainer.seed=7",), differs("loss/ce")),
    "trainer.save_every": Run(
        "misc", ("trainer.save_every=1",), lambda job, jobs: job.log.count("saved checkpoint") == 3
    ),
    "trainer.keep_checkpoints": Run(
        "misc",
        ("trainer.keep_checkpoints=1",),
        lambda job, jobs: [p.name for p in (job.run_dir / "checkpoints").iterdir() if p.is_dir()] == ["step_0000003"],
    ),
    "trainer.eval_every": Run(
        "teacher", ("trainer.eval_every=1",), lambda job, jobs: all(r["eval/ce"] for r in job.rows)
    ),
    "trainer.eval_max_batches": Run("teacher", ("trainer.eval_max_batches=1",), differs("eval/tokens", step=3)),
    "trainer.stop_after_steps": Run(
        "resumed", ("trainer.stop_after_steps=2",), lambda job, jobs: len(job.first_rows) == 2
    ),
    "trainer.preempt_signals": Elsewhere(
        "tests/test_slurm.py::test_a_signalled_job_checkpoints_requeues_and_resumes_exactly",
        "the default signals (trainer.preempt_signals) checkpoint the job and stop it",
    ),
    "trainer.requeue": Elsewhere(
        "tests/test_slurm.py::test_a_signalled_job_checkpoints_requeues_and_resumes_exactly",
        "trainer.requeue=auto requeues the signalled SLURM job",
    ),
    "trainer.log_every": Run(
        "misc",
        ("trainer.log_every=2",),
        lambda job, jobs: "INFO step 2/3" in job.log and "INFO step 1/3" not in job.log,
    ),
    "trainer.progress_bar": Run(
        "misc", ("trainer.progress_bar=true",), lambda job, jobs: re.search(r"it/s|s/it", job.stderr)
    ),
    "trainer.keep_freed_memory": Run(
        "misc",
        ("trainer.keep_freed_memory=false",),
        lambda job, jobs: "host allocator" not in job.log and "host allocator" in jobs["ref"].log,
    ),
    "trainer.time_phases": Run(
        "misc", ("trainer.time_phases=true",), lambda job, jobs: float(job.rows[0]["time/backward"]) > 0
    ),
    # --- DeepSpeed, run, top level ------------------------------------------------------------
    "deepspeed.zero_stage": Run("misc", ("deepspeed.zero_stage=2",), logged("ZeRO-2 student")),
    # DeepSpeed's CPU Adam on the offloaded states takes the same step as torch's AdamW.
    "deepspeed.offload_optimizer": Run(
        "offload",
        ("deepspeed.offload_optimizer=cpu",),
        both(logged("optimizer offloaded to cpu"), same("loss", step=2, rtol=1e-4)),
    ),
    "deepspeed.memory_per_rank_gb": Elsewhere(
        "tests/test_speed_path.py::test_the_planned_layout_trains_as_zero3_does_and_shards_when_told_the_device_is_small",
        "told a rank has 1 MB, the planned layout shards both models (logged)",
    ),
    "deepspeed.nvme_path": NotHere(
        "only with deepspeed.offload_optimizer=nvme: DeepSpeed's async_io op (libaio), not built here (issue #18)"
    ),
    "deepspeed.precision": Run("seq", ("deepspeed.precision=bf16",), logged(", bf16, ZeRO-3 student")),
    # Merged last into DeepSpeed's JSON: a gradient clip given there clips like trainer.grad_clip.
    "deepspeed.extra": Run(
        "extra", ("+deepspeed.extra.gradient_clipping=0.01",), same("loss", vs="opt_clip", step=2, rtol=1e-5)
    ),
    "run.dir": Run("ref", (), lambda job, jobs: (job.run_dir / "metrics.csv").is_file()),
    # --- cache (vkd-ds cache-teacher) ---------------------------------------------------------------
    "cache.dir": Elsewhere(
        "tests/test_teacher_cache.py::test_cache_writer_killed_mid_shard_reruns_to_the_same_bytes",
        "cache-teacher writes its shards and manifest there, and finishes a killed cache there",
    ),
    "cache.top_k": Elsewhere(
        "tests/test_teacher_cache.py::test_at_k_equal_to_the_vocabulary_a_cached_run_has_the_live_runs_losses",
        "top_k = V stores the whole distribution (and top_k out of [1, V] is refused)",
    ),
    "cache.temperature": Elsewhere(
        "tests/test_teacher_cache.py::test_a_cache_without_valence_serves_ce_and_kd_but_not_l_val",
        "a cache at T = 1 serves a run at loss.temperature=1.0, whose eval then has KL at T = 1",
    ),
    "cache.precision": Elsewhere(
        "tests/test_teacher_cache.py::test_at_k_equal_to_the_vocabulary_a_cached_run_has_the_live_runs_losses",
        "fp32 stores 4-byte floats (the exact cache)",
    ),
    "cache.records_per_shard": Elsewhere(
        "tests/test_teacher_cache.py::test_cache_writer_killed_mid_shard_reruns_to_the_same_bytes",
        "32 records per shard: 7 training shards",
    ),
    "assets_dir": Elsewhere(
        "tests/test_demo.py::test_quick_demo_with_sequence_kd_end_to_end",
        "the demo writes its assets to assets_dir and its path keys refer to it",
    ),
    "resume": Run("resumed", ("resume=auto",), lambda job, jobs: "resumed from" in job.log and len(job.rows) == 3),
    "eval_only": Elsewhere(
        "tests/test_distributed.py::test_eval_of_a_run_and_of_an_exported_model",
        "`vkd-ds eval` sets eval_only=true: nothing trained, one eval file written",
    ),
    # `vkd-ds train` (not the deepspeed launcher) starts num_procs processes on a machine without GPUs.
    "num_procs": Run("cli", ("num_procs=1",), logged("vkd-ds: 1 rank(s)")),
}

# What jobs add besides their rows' overrides (the sequence-KD pairs share a base).
# Unpacked, as these rows were measured: packed (data.packing=auto packs the tiny rows), the step-1 grad_norm
# of seq_kd.length_normalized=true moved by 2.4e-5 relative, under `differs`' 1e-4 floor.
SEQ_BASE = ("loss.seq=0.3", "seq_kd.n_gen=5", "data.packing=false")
JOB_EXTRAS: dict[str, tuple[str, ...]] = {
    "seq_base": SEQ_BASE,
    "seq_t": SEQ_BASE,
    "seq_p": SEQ_BASE,
    "seq_prompt": SEQ_BASE,
    "seq_ln": SEQ_BASE,
    "gate": ("trainer.micro_batch_size=2",),
    "gate_half": ("trainer.micro_batch_size=2",),
    "wide": ("seq_kd.n_gen=8",),  # below the job's data.max_seq_len
}


# --- the keys ------------------------------------------------------------------------------------


def settings_keys() -> set[str]:
    """Every key of the typed settings (what `vkd-ds train --cfg job` prints, less the `hydra`
    section): a settings section's fields, `loss.<term>` for every term; `student.config` and
    `deepspeed.extra` are one key each (a model config, a DeepSpeed JSON)."""
    from vkd_ds.settings import LossSettings, Settings
    from vkd_ds.terms import TERM_NAMES

    def walk(cls, prefix: str):
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if f.name == "resolved":
                continue
            if cls is LossSettings and f.name == "weights":
                yield from (f"{prefix}{term}" for term in TERM_NAMES)
            elif dataclasses.is_dataclass(hints[f.name]):
                yield from walk(hints[f.name], f"{prefix}{f.name}.")
            else:
                yield f"{prefix}{f.name}"

    return set(walk(Settings, ""))


def cfg_job_keys(assets: Path) -> set[str]:
    """The keys `vkd-ds train --cfg job` prints, down to the settings' leaves."""
    import yaml

    result = vkd_cli(["train", "--cfg", "job", *base_overrides(assets, Path("/nonexistent/run"))])
    assert result.returncode == 0, result.stderr
    printed = yaml.safe_load(result.stdout)

    def walk(node, prefix):
        for key, sub in node.items():
            name = f"{prefix}{key}"
            if isinstance(sub, dict) and name not in ("student.config", "deepspeed.extra"):
                yield from walk(sub, f"{name}.")
            else:
                yield name

    return set(walk(printed, ""))


def test_every_key_has_a_row(tiny_assets):
    keys = settings_keys()
    assert cfg_job_keys(tiny_assets) == keys
    assert not keys - set(COVERAGE), f"keys without a coverage row: {sorted(keys - set(COVERAGE))}"
    assert not set(COVERAGE) - keys, f"rows for keys that do not exist: {sorted(set(COVERAGE) - keys)}"


def test_removing_a_row_is_noticed(tiny_assets):
    """The check above is not vacuous: without one row, a key is missing."""
    keys = settings_keys()
    assert keys - (set(COVERAGE) - {"trainer.time_phases"}) == {"trainer.time_phases"}


@pytest.mark.parametrize("key", sorted(k for k, row in COVERAGE.items() if isinstance(row, Elsewhere)))
def test_rows_that_point_elsewhere_name_a_test_of_the_key(key):
    row = COVERAGE[key]
    path, name = row.test.split("::")
    source = (REPO / path).read_text()
    functions = {n.name: n for n in ast.walk(ast.parse(source)) if isinstance(n, ast.FunctionDef)}
    assert name in functions, f"{row.test} does not exist"
    body = ast.get_source_segment(source, functions[name])
    assert key in body or key in source, f"{path} does not mention {key}"


@pytest.mark.parametrize("key", sorted(k for k, row in COVERAGE.items() if isinstance(row, Refused)))
def test_keys_whose_behaviour_is_a_refusal(key, tiny_assets, tmp_path):
    row = COVERAGE[key]
    result = cli(["train", *base_overrides(tiny_assets, tmp_path / "run"), *row.overrides])
    assert result.returncode == 2 and row.message in result.stderr, result.stderr[-2000:]


# --- the jobs ------------------------------------------------------------------------------------


@dataclass
class Job:
    run_dir: Path
    rows: list[dict]
    log: str
    stderr: str
    config: dict
    paths: dict[str, str]
    first_rows: list[dict] = dataclasses.field(default_factory=list)
    fits: dict[str, float] = dataclasses.field(default_factory=dict)


class Jobs:
    """Each job runs once, when a check first asks for it."""

    def __init__(self, assets: Path, root: Path, paths: dict[str, str]):
        self.assets, self.root, self.paths, self.done = assets, root, paths, {}

    def overrides(self, name: str) -> list[str]:
        rows = [row for row in COVERAGE.values() if isinstance(row, Run) and row.job == name]
        merged = dict(o.split("=", 1) for o in JOB_EXTRAS.get(name, ()))
        for row in rows:
            merged.update(o.split("=", 1) for o in row.overrides)
        return [f"{k}={v.format(**self.paths)}" for k, v in merged.items()]

    def __getitem__(self, name: str) -> Job:
        if name not in self.done:
            self.done[name] = self.fit() if name == "fit" else self.train(name)
        return self.done[name]

    def train(self, name: str) -> Job:
        import yaml

        from vkd_ds.metrics import read_metrics

        run_dir = self.root / name
        base = [
            *base_overrides(self.assets, run_dir),
            "trainer.max_steps=3",
            "trainer.save_every=0",
            "trainer.eval_every=0",
        ]
        overrides = self.overrides(name)
        env = {"WANDB_MODE": "offline", "WANDB_SILENT": "true"}
        first_rows = []
        if name == "cli":  # through `vkd-ds train`, which starts the processes itself
            result = vkd_cli(["train", *base, *overrides])
            assert result.returncode == 0, result.stderr[-5000:]
        elif name == "resumed":
            first = [o for o in overrides if not o.startswith("resume=")]
            launched(deepspeed_launch(["launcher/train.py", *base, *first], 2, env=env))
            first_rows = read_metrics(run_dir / "metrics.csv")
            overrides = [o for o in overrides if not o.startswith("trainer.stop_after_steps=")]
        if name != "cli":
            result = launched(deepspeed_launch(["launcher/train.py", *base, *overrides], 2, env=env))
        return Job(
            run_dir,
            read_metrics(run_dir / "metrics.csv"),
            (run_dir / "train.log").read_text(),
            result.stderr,
            yaml.safe_load((run_dir / "config.yaml").read_text()),
            self.paths,
            first_rows,
        )

    def fit(self) -> Job:
        """`vkd-ds fit-valence-head` (one process): the base fit, then one key changed at a time."""
        from vkd_ds.config import compose
        from vkd_ds.fit_head import fit_valence_head

        common = [
            f"teacher.path={self.assets / 'teacher'}",
            f"data.train_path={self.paths['labelled_train']}",
            f"data.tokenizer_path={self.assets / 'tokenizer'}",
            "data.max_seq_len=48",
            "valence.fit.steps=3",
            "valence.fit.batch_size=4",
        ]
        variants = {
            "base": [],
            "labels": ["valence.fit.labels=lexicon"],
            "steps": ["valence.fit.steps=5"],
            "batch_size": ["valence.fit.batch_size=2"],
            "lr": ["valence.fit.lr=0.05"],
            "lexicon_decay": ["valence.fit.labels=lexicon", "valence.fit.lexicon_decay=0.3"],
        }
        fits = {}
        for variant, extra in variants.items():
            out = self.paths["fit_out"] if variant == "base" else str(self.root / f"head_{variant}.safetensors")
            cfg = compose([*common, *extra, f"valence.fit.out={out}"])
            fits[variant] = fit_valence_head(cfg, log=lambda *_: None)["final_mse"]
        return Job(self.root, [], "", "", {}, self.paths, fits=fits)


def launched(result):
    assert result.returncode == 0, f"job failed:\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}"
    return result


@pytest.fixture(scope="module")
def jobs(tiny_assets, tmp_path_factory) -> Jobs:
    """The extra assets the rows name, and the jobs."""
    from vkd_ds.valence import ValenceHead, save_head

    root = tmp_path_factory.mktemp("coverage")
    records = (tiny_assets / "train.jsonl").read_text().splitlines()
    (root / "reversed_train.jsonl").write_text("\n".join(reversed(records)) + "\n")
    # Records with a valence label: labels=auto fits to them, labels=lexicon to VADER's words.
    labelled = [json.dumps({**json.loads(r), "valence": 0.2 + 0.6 * (i % 2)}) for i, r in enumerate(records)]
    (root / "labelled_train.jsonl").write_text("\n".join(labelled) + "\n")
    shutil.copytree(tiny_assets / "tokenizer", root / "tokenizer_copy")
    import torch

    torch.manual_seed(11)
    paths = {
        "other_teacher": str(
            save_tiny_model(root / "other_teacher", seed=9, hidden_size=48, intermediate_size=96, num_hidden_layers=3)
        ),
        "student_dir": str(save_tiny_model(root / "student_dir", seed=3)),
        "reversed_train": str(root / "reversed_train.jsonl"),
        "labelled_train": str(root / "labelled_train.jsonl"),
        "tokenizer_copy": str(root / "tokenizer_copy"),
        "store_dir": str(root / "stores"),
        "head_k4": str(save_head(ValenceHead(48, 4), root / "head_k4.safetensors")),
        "fit_out": str(root / "fitted_head.safetensors"),
    }
    return Jobs(tiny_assets, root, paths)


RUN_KEYS = sorted(k for k, row in COVERAGE.items() if isinstance(row, Run))


@pytest.mark.distributed
@pytest.mark.parametrize("key", RUN_KEYS)
def test_key_has_its_effect(key, jobs):
    row = COVERAGE[key]
    job = jobs[row.job]
    assert row.check(job, jobs) is not False, f"{key}: no effect in job {row.job!r} ({jobs.overrides(row.job)})"
