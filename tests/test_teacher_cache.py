"""The teacher cache for real: `vkd-ds cache-teacher` on 2 ranks, training with teacher.cache=DIR (the
teacher never loaded), exactness at k = V, kill -9 of the cache writer and of a cached run, and every
mismatch between a cache and a run refused before anything starts."""

import json
import math
import random
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest

from tests.conftest import REPO, base_overrides, cpu_env, deepspeed_launch, vkd_cli_in_process
from tests.test_reliability import kill_at_step, steps_logged
from vkd_ds.assets import write_short_records
from vkd_ds.metrics import read_metrics
from vkd_ds.terms import loss_overrides

pytestmark = pytest.mark.distributed

# What the cache serves: CE, token KD, L_val, L_reg and the valence weights (λ = 6).
CACHED_OBJECTIVE = [*loss_overrides(ce=1.0, soft=0.8, val=0.6, reg=1e-5), "weighting.lam=6.0"]


def cache_overrides(assets, cache_dir, *extra) -> list[str]:
    return [*base_overrides(assets, cache_dir / "unused-run"), f"cache.dir={cache_dir}", *extra]


def run_cache_teacher(overrides, env=None):
    """The ranks of `vkd-ds cache-teacher` under the deepspeed launcher (what the command starts)."""
    from vkd_ds.teacher_cache import CACHE_TEACHER_FLAG

    return deepspeed_launch(["launcher/train.py", CACHE_TEACHER_FLAG, *overrides], 2, env=env)


def cached_overrides(assets, run_dir, cache_dir) -> list[str]:
    """A run on the cache: no teacher.path, the tokenizer given."""
    return [*base_overrides(assets, run_dir), "teacher.path=null", f"teacher.cache={cache_dir}", *CACHED_OBJECTIVE]


def shard_bytes(cache_dir) -> dict[str, bytes]:
    return {str(p.relative_to(cache_dir)): p.read_bytes() for p in sorted(cache_dir.rglob("*.npy"))}


@pytest.fixture(scope="module")
def cache64(tiny_assets, tmp_path_factory):
    """The default cache (top-64, fp16, valence) of the tiny assets, in shards of 32 records."""
    cache_dir = tmp_path_factory.mktemp("cache") / "top64"
    result = run_cache_teacher(cache_overrides(tiny_assets, cache_dir, "cache.records_per_shard=32"))
    assert result.returncode == 0, result.stderr[-4000:]
    return cache_dir


@pytest.mark.parametrize("packed", [False, True], ids=["rows", "packed"])
def test_at_k_equal_to_the_vocabulary_a_cached_run_has_the_live_runs_losses(packed, tiny_assets, tmp_path):
    """k = V, fp32: the losses of every term the cache serves, the valence weights' statistics and
    the held-out figures equal the live teacher's within 1e-5, 2 ranks; the teacher is never loaded.
    Packed: short records several to a row (data.packing=true), each finding its own cached positions."""
    cache_dir = tmp_path / "full"
    vocab = 384
    data = ["data.packing=false"]
    if packed:
        write_short_records(tmp_path / "short.jsonl", tiny_assets / "train.jsonl", 200)
        data = [f"data.train_path={tmp_path / 'short.jsonl'}", "data.max_seq_len=128", "data.packing=true"]
    result = run_cache_teacher(
        cache_overrides(tiny_assets, cache_dir, f"cache.top_k={vocab}", "cache.precision=fp32", *data)
    )
    assert result.returncode == 0, result.stderr[-4000:]
    manifest = json.loads((cache_dir / "manifest.json").read_text())
    assert manifest["dtypes"]["logp"] == "<f4" and manifest["top_k"] == vocab
    steps = ["trainer.max_steps=3", "trainer.eval_every=3"]
    live = deepspeed_launch(
        ["launcher/train.py", *base_overrides(tiny_assets, tmp_path / "live"), *CACHED_OBJECTIVE, *steps, *data], 2
    )
    cached = deepspeed_launch(
        ["launcher/train.py", *cached_overrides(tiny_assets, tmp_path / "cached", cache_dir), *steps, *data], 2
    )
    for job in (live, cached):
        assert job.returncode == 0, job.stderr[-4000:]
    cached_log = (tmp_path / "cached" / "train.log").read_text()
    assert ("data: packing:" in cached_log) == packed
    assert "teacher: not loaded" in cached_log and "parameters, " not in cached_log.split("student:")[0]
    rows_live = read_metrics(tmp_path / "live" / "metrics.csv")
    rows_cached = read_metrics(tmp_path / "cached" / "metrics.csv")
    columns = ["loss", "loss/ce", "loss/soft", "loss/val", "loss/reg", "ess", "weight_max", "saliency_mean"]
    columns += ["eval/ce", "eval/divergence", "eval/teacher_ce", "eval/valence_mse", "eval/top1_agreement"]
    for live_row, cached_row in zip(rows_live, rows_cached, strict=True):
        for column in columns:
            if live_row.get(column, "") == "":
                continue
            a, b = float(cached_row[column]), float(live_row[column])
            assert abs(a - b) <= 1e-5 * max(1.0, abs(b)), (live_row["step"], column, a, b)
    # KL at T = 1 needs the teacher at T = 1; this cache holds it at loss.temperature = 4.
    assert rows_cached[-1].get("eval/kl_teacher", "") == "" and rows_live[-1]["eval/kl_teacher"] != ""


def test_cache_writer_killed_mid_shard_reruns_to_the_same_bytes(tiny_assets, cache64, tmp_path):
    cache_dir = tmp_path / "killed"
    overrides = cache_overrides(tiny_assets, cache_dir, "cache.records_per_shard=32")
    killed = run_cache_teacher(overrides, env={"VKD_FAULT_CACHE_KILL": "2"})
    assert killed.returncode != 0
    manifest = json.loads((cache_dir / "manifest.json").read_text())
    assert manifest["complete"] is False
    assert list(cache_dir.rglob("*.partial")), "the kill should leave a half-written shard"
    # Training refuses the incomplete cache before anything starts.
    refused = vkd_cli_in_process(["train", *cached_overrides(tiny_assets, tmp_path / "run", cache_dir)])
    assert refused.returncode == 2 and "is incomplete: rerun `vkd-ds cache-teacher`" in refused.stderr
    rerun = run_cache_teacher(overrides)
    assert rerun.returncode == 0, rerun.stderr[-4000:]
    assert "already complete" in rerun.stdout + rerun.stderr
    assert not list(cache_dir.rglob("*.partial"))
    assert shard_bytes(cache_dir) == shard_bytes(cache64)
    final = json.loads((cache_dir / "manifest.json").read_text())
    assert final["complete"] and final["bytes_per_token"] <= 300
    # cache.records_per_shard=32: the training store's rows (its 210 records, long ones as windows of
    # data.max_seq_len) in shards of 32, the last one holding the rest.
    rows = final["splits"]["train"]["records"]
    shards = final["splits"]["train"]["shards"]
    assert rows > 210 and len(shards) == math.ceil(rows / 32)
    assert shards[-1]["records"] == [32 * (len(shards) - 1), rows]
    assert len(list((cache_dir / "train").iterdir())) == len(shards)


def test_a_cached_run_killed_with_kill_9_resumes_to_the_uninterrupted_curve(tiny_assets, cache64, tmp_path):
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    common = ["trainer.max_steps=40", "trainer.save_every=4", "trainer.eval_every=20", "trainer.micro_batch_size=2"]
    result = deepspeed_launch(["launcher/train.py", *cached_overrides(tiny_assets, straight, cache64), *common], 2)
    assert result.returncode == 0, result.stderr[-4000:]
    overrides = cached_overrides(tiny_assets, killed, cache64) + common
    rng = random.Random(3)
    kills = sum(kill_at_step(overrides, killed, min(39, steps_logged(killed) + rng.randint(3, 12))) for _ in range(2))
    assert kills == 2
    result = deepspeed_launch(["launcher/train.py", *overrides], 2)
    assert result.returncode == 0, result.stderr[-4000:]
    rows_killed, rows_straight = read_metrics(killed / "metrics.csv"), read_metrics(straight / "metrics.csv")
    assert [r["step"] for r in rows_killed] == [str(s) for s in range(1, 41)]
    for column in ("loss", "loss/ce", "loss/soft", "loss/val", "ess", "eval/ce", "eval/divergence"):
        assert [r.get(column) for r in rows_killed] == [r.get(column) for r in rows_straight], column


def split_arrays(cache_dir) -> dict[str, np.ndarray]:
    """Each split's arrays, its shards' concatenated in order (offsets as each record's position count)."""
    manifest = json.loads((cache_dir / "manifest.json").read_text())
    out = {}
    for split, entry in manifest["splits"].items():
        folders = [cache_dir / split / shard["name"] for shard in entry["shards"]]
        for name in ("ids", "logp", "tail", "entropy", "target_logp", "valence", "offsets"):
            parts = [np.load(folder / f"{name}.npy") for folder in folders]
            out[f"{split}/{name}"] = np.concatenate([np.diff(a) for a in parts] if name == "offsets" else parts)
    return out


def written_per_rank(log: str) -> list[int]:
    """Each rank's records, from the writer's summary line."""
    line = re.search(r"cache-teacher: records \(shards\) written per rank: (.*)", log).group(1)
    return [int(n) for n in re.findall(r"(\d+) \(\d+\)", line)]


def vkd_cli_with(args, env, timeout=600):
    """`vkd-ds ARGS` in a process of its own (the launcher's checks, then the ranks), with `env` added."""
    return subprocess.run(
        [sys.executable, "-m", "vkd_ds.cli", *args],
        cwd=REPO,
        env={**cpu_env(), **env},
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_cache_teacher_on_4_ranks_shares_records_evenly_and_hashes_the_teacher_once(tiny_assets, cache64, tmp_path):
    """`vkd-ds cache-teacher` on 4 ranks, shards of 160 records: train 754 records (4 x 160 + 114), valid 118
    (1 shard). Shard s of each split to rank s % 4 gave rank 0 train 0 and 4 and valid 0, 392 records, 174
    over the mean of 218 (more than a shard); by records, largest first to the least loaded rank: 278, 274,
    160, 160. The cache holds the values of the 2-rank cache of 32-record shards (both write every split in
    the same micro-batches of 4), and the teacher's weights were hashed once for the job (by the command,
    not by its ranks), and once for a training run that checks teacher.path against the cache."""
    cache_dir, trace = tmp_path / "four", tmp_path / "hashes.txt"
    writer = cache_overrides(tiny_assets, cache_dir, "cache.records_per_shard=160", "num_procs=4")
    result = vkd_cli_with(["cache-teacher", *writer], {"VKD_TRACE_TEACHER_HASH": str(trace)})
    assert result.returncode == 0, result.stderr[-4000:]
    manifest = json.loads((cache_dir / "manifest.json").read_text())
    assert manifest["complete"]
    sizes = {split: [b - a for a, b in (s["records"] for s in e["shards"])] for split, e in manifest["splits"].items()}
    assert sizes == {"train": [160, 160, 160, 160, 114], "valid": [118]}
    mean = sum(map(sum, sizes.values())) / 4
    old = [sum(n for shards in sizes.values() for s, n in enumerate(shards) if s % 4 == r) for r in range(4)]
    assert max(abs(n - mean) for n in old) > 160  # the assignment this replaced fails the check below
    records = written_per_rank(result.stderr)
    assert len(records) == 4 and sum(records) == 4 * mean
    assert all(abs(n - mean) <= 160 for n in records), records
    ours, reference = split_arrays(cache_dir), split_arrays(cache64)
    assert ours.keys() == reference.keys()
    for name in ours:
        assert np.array_equal(ours[name], reference[name]), name
    assert len(trace.read_text().splitlines()) == 1, trace.read_text()
    # Training with teacher.path and teacher.cache: the command checks the teacher's fingerprint, its 2
    # ranks check it again (prepare) without hashing.
    trace.unlink()
    run = [*cached_overrides(tiny_assets, tmp_path / "run", cache_dir), f"teacher.path={tiny_assets / 'teacher'}"]
    steps = ["trainer.max_steps=1", "trainer.eval_every=0", "trainer.save_every=0"]
    trained = vkd_cli_with(["train", *run, *steps], {"VKD_TRACE_TEACHER_HASH": str(trace)})
    assert trained.returncode == 0, trained.stderr[-4000:]
    assert len(trace.read_text().splitlines()) == 1, trace.read_text()


def test_a_teacher_changed_after_it_was_hashed_is_hashed_again_and_refused(
    tiny_assets, cache64, tmp_path, monkeypatch, capsys
):
    """The fingerprint a launcher hands its ranks (what `python -m vkd_ds.teacher_cache` prints for a
    launch script) is reused only while each weight file's size and mtime_ns are the same; a teacher
    changed since is hashed again, and training refuses it."""
    from vkd_ds import teacher_cache
    from vkd_ds.teacher_cache import fingerprints

    teacher = tmp_path / "teacher"
    shutil.copytree(tiny_assets / "teacher", teacher)
    trace = tmp_path / "hashes.txt"
    monkeypatch.setenv("VKD_TRACE_TEACHER_HASH", str(trace))
    run = [*cached_overrides(tiny_assets, tmp_path / "run", cache64), f"teacher.path={teacher}"]
    teacher_cache.main(run)  # hashes the teacher, prints the value for the ranks' environment
    handed = capsys.readouterr().out.strip()
    assert handed == teacher_cache.fingerprint_env(teacher)[teacher_cache.FINGERPRINT_ENV]
    assert len(trace.read_text().splitlines()) == 1
    # A rank: a process that has not hashed the teacher, with the launcher's value.
    monkeypatch.setattr(fingerprints, "_hashed", {})
    monkeypatch.setenv(teacher_cache.FINGERPRINT_ENV, handed)
    from vkd_ds.builders.inputs import prepare
    from vkd_ds.config import compose

    assert prepare(compose(run)).cache_manifest["top_k"] == 64
    assert len(trace.read_text().splitlines()) == 1  # reused
    # The teacher changes (other weights, same sizes) after the launcher hashed it: hashed again, refused.
    monkeypatch.setattr(fingerprints, "_hashed", {})
    _other_teacher(tiny_assets, teacher)
    refused = vkd_cli_in_process(["train", *run])
    assert refused.returncode == 2 and "was made from another teacher" in refused.stderr, refused.stderr
    assert len(trace.read_text().splitlines()) == 2


def _other_teacher(assets, out):
    """The tiny teacher with one weight changed: the same config, other weights."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(assets / "teacher")
    with torch.no_grad():
        model.lm_head.weight[0, 0] += 1.0
    model.save_pretrained(out)
    return out


def _other_tokenizer(assets, out):
    from vkd_ds.assets import pydoc_records, train_tokenizer

    train_tokenizer(pydoc_records(50), 300, out)
    return out


def _shorter_data(assets, out):
    lines = (assets / "train.jsonl").read_text().splitlines()
    out.write_text("\n".join(lines[:-1]) + "\n")
    return out


def _damaged(cache_dir, out, damage):
    shutil.copytree(cache_dir, out)
    damage(out)
    return out


def _truncate(cache_dir):
    path = cache_dir / "train" / "shard_00001" / "logp.npy"
    path.write_bytes(path.read_bytes()[:-10])


MISMATCHES = {
    "another teacher": (
        lambda a, c, t: [f"teacher.path={_other_teacher(a, t / 'other_teacher')}"],
        "was made from another teacher",
    ),
    "another tokenizer": (
        lambda a, c, t: [f"data.tokenizer_path={_other_tokenizer(a, t / 'tok')}"],
        "was made with another tokenizer than data.tokenizer_path",
    ),
    "another data file": (
        lambda a, c, t: [f"data.train_path={_shorter_data(a, t / 'train.jsonl')}"],
        "was made from other train data",
    ),
    "another max_seq_len": (
        lambda a, c, t: ["data.max_seq_len=40"],
        "was made with data.max_seq_len=48, this run has 40",
    ),
    "another temperature": (
        lambda a, c, t: ["loss.temperature=2.0"],
        "holds the teacher at T=4 but loss.temperature=2",
    ),
    "a truncated shard": (
        lambda a, c, t: [f"teacher.cache={_damaged(c, t / 'cut', _truncate)}"],
        "train/shard_00001/logp.npy is truncated",
    ),
    "a missing shard": (
        lambda a, c, t: [
            f"teacher.cache={_damaged(c, t / 'gone', lambda d: shutil.rmtree(d / 'valid' / 'shard_00000'))}"
        ],
        "valid/shard_00000 is missing",
    ),
    "a term that needs the live teacher": (lambda a, c, t: ["loss.feat=0.4"], "loss.feat=0.4 need(s) the live teacher"),
    # Without valence.teacher_head (the cache carries the valence), so that the head's own check does not answer.
    "another valence k": (
        lambda a, c, t: ["valence.k=4", "valence.teacher_head=null"],
        "holds valence trajectories of k=8, valence.k=4",
    ),
}


@pytest.mark.parametrize("case", sorted(MISMATCHES))
def test_a_cache_that_does_not_match_the_run_is_refused_before_anything_starts(case, tiny_assets, cache64, tmp_path):
    make, message = MISMATCHES[case]
    run_dir = tmp_path / "run"
    result = vkd_cli_in_process(
        ["train", *cached_overrides(tiny_assets, run_dir, cache64), *make(tiny_assets, cache64, tmp_path)]
    )
    assert result.returncode == 2, result.stderr
    assert message in result.stderr, result.stderr
    assert result.stderr.count("vkd-ds: error:") == 1 and "Traceback" not in result.stderr
    assert not run_dir.exists()


def test_with_teacher_path_given_a_matching_teacher_is_accepted(tiny_assets, cache64, tmp_path):
    """teacher.path with the cache's own teacher: its fingerprint matches, and the run starts (the first
    checks pass; it is stopped by an unrelated bad key right after them, so nothing runs)."""
    from vkd_ds.builders.inputs import prepare
    from vkd_ds.config import compose

    prepared = prepare(
        compose([*cached_overrides(tiny_assets, tmp_path / "run", cache64), f"teacher.path={tiny_assets / 'teacher'}"])
    )
    assert prepared.cache_manifest["top_k"] == 64


def test_cache_teacher_refuses_bad_settings(tiny_assets, cache64, tmp_path):
    def cache_teacher(*extra):
        return vkd_cli_in_process(["cache-teacher", *base_overrides(tiny_assets, tmp_path / "r"), *extra])

    cases = [
        (("cache.top_k=0", f"cache.dir={tmp_path / 'a'}"), "config key `cache.top_k` must be >= 1, got 0"),
        (("cache.top_k=385", f"cache.dir={tmp_path / 'a'}"), "config key `cache.top_k` must be in [1, 384]"),
        ((), "config key `cache.dir` is required by cache-teacher"),
        # The cache.dir holds a cache of other settings: never mixed.
        ((f"cache.dir={cache64}", "cache.top_k=8"), "holds a cache made with another cache.top_k"),
        ((f"cache.dir={tiny_assets}",), "is not empty and holds no teacher cache"),
        ((f"cache.dir={tiny_assets / 'train.jsonl'}",), "is a file, not a directory"),
    ]
    for extra, message in cases:
        result = cache_teacher(*extra)
        assert result.returncode == 2 and message in result.stderr, (extra, result.stderr)
    assert not (tmp_path / "a").exists()


def test_a_cache_without_valence_serves_ce_and_kd_but_not_l_val(tiny_assets, tmp_path):
    """Also at cache.temperature=1.0 (training's loss.temperature must match): eval then has KL at T = 1."""
    cache_dir = tmp_path / "plain"
    no_valence = ["valence.teacher_head=null", "loss.val=0", "weighting.lam=0", "loss.temperature=1.0"]
    # The gate is on by default; the writer, which trains nothing, does not ask for its valence head.
    writer = cache_overrides(tiny_assets, cache_dir, *no_valence, "cache.temperature=1.0", "gate.enabled=true")
    result = run_cache_teacher(writer)
    assert result.returncode == 0, result.stderr[-4000:]
    manifest = json.loads((cache_dir / "manifest.json").read_text())
    assert manifest["valence"] is None and manifest["bytes_per_token"] < 270  # no 8 fp16 valence values
    assert manifest["temperature"] == 1.0
    refused = vkd_cli_in_process(
        ["train", *cached_overrides(tiny_assets, tmp_path / "run", cache_dir), "loss.temperature=1.0"]
    )
    assert refused.returncode == 2 and "holds no teacher valence, and loss.val > 0" in refused.stderr
    ok = deepspeed_launch(
        [
            "launcher/train.py",
            *cached_overrides(tiny_assets, tmp_path / "run", cache_dir),
            *no_valence,
            "trainer.max_steps=2",
        ],
        2,
    )
    assert ok.returncode == 0, ok.stderr[-4000:]
    rows = read_metrics(tmp_path / "run" / "metrics.csv")
    assert float(rows[-1]["loss/soft"]) > 0 and "loss/val" not in rows[-1]
    assert float(rows[-1]["eval/kl_teacher"]) > 0


def _resident_kb_of(path) -> int:
    """Resident kilobytes of this process's mappings of `path` (/proc/self/smaps)."""
    total, inside = 0, False
    for line in open("/proc/self/smaps"):
        head = line.split()
        if head and "-" in head[0] and len(head) >= 5:  # a mapping's header line
            inside = line.rstrip().endswith(str(path))
        elif inside and line.startswith("Rss:"):
            total += int(head[1])
    return total


def test_reading_the_whole_cache_keeps_none_of_it_resident(tiny_assets, cache64, monkeypatch):
    """Every training record through CachedTeacher.on_batch: the shards stay memory-mapped, at most
    MAX_OPEN_SHARDS at a time (here 2 of the training shards: the others are closed as new ones are
    mapped), and the pages a batch read are released once it is copied out."""
    import torch

    from vkd_ds.teacher_cache import reader

    monkeypatch.setattr(reader, "MAX_OPEN_SHARDS", 2)

    from vkd_ds.builders.inputs import prepare
    from vkd_ds.config import compose
    from vkd_ds.data import collate
    from vkd_ds.teacher_cache import CachedTeacher

    prepared = prepare(compose(cached_overrides(tiny_assets, tiny_assets / "unused", cache64)))
    teacher = CachedTeacher(cache64, prepared.cache_manifest, prepared.data_splits, torch.device("cpu"))
    pad = prepared.tokenizer.pad_token_id
    positions = 0
    for first in range(0, len(prepared.train_data), 8):
        out = teacher.on_batch(collate(prepared.train_data[first : first + 8], pad))
        positions += len(out["logits"])
    assert positions == prepared.cache_manifest["splits"]["train"]["positions"]
    assert len(teacher.open_shards) == 2
    logp = cache64 / "train" / "shard_00000" / "logp.npy"
    assert logp.stat().st_size > 100_000  # 32 records x ~46 positions x 64 x 2 bytes
    assert _resident_kb_of(logp) == 0
