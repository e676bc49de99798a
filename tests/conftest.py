"""Shared fixtures: tiny real assets on disk, and helpers that launch real DeepSpeed jobs."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from vkd_ds.dist import free_port  # noqa: F401  (tests import it from here)
from vkd_ds.terms import loss_overrides

REPO = Path(__file__).resolve().parent.parent
os.environ.setdefault("DS_ACCELERATOR", "cpu")
# Token stores of the tests' data go to a directory of this test session, not ~/.cache (the launched
# jobs inherit it). Every xdist worker shares the controller's, as every rank of a job does.
if "VKD_DS_DATA_CACHE" not in os.environ:
    import tempfile

    os.environ["VKD_DS_DATA_CACHE"] = tempfile.mkdtemp(prefix="vkd-ds-test-stores-")

# A student small enough that a 2-process ZeRO-3 step takes well under a second.
TINY_STUDENT = [
    "student.config.hidden_size=32",
    "student.config.intermediate_size=64",
    "student.config.num_attention_heads=2",
    "student.config.num_key_value_heads=2",
]


def cpu_env() -> dict[str, str]:
    env = os.environ.copy()
    env["DS_ACCELERATOR"] = "cpu"
    env["OMP_NUM_THREADS"] = "1"
    env["PYTHONPATH"] = f"{REPO}{os.pathsep}{env.get('PYTHONPATH', '')}"
    return env


def deepspeed_launch(
    target: list[str], num_procs: int, timeout: int = 600, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess:
    """Run `deepspeed --num_gpus N <target>` for real: N processes, gloo, DeepSpeed's CPU accelerator.
    `target`: a script and its arguments (launcher/train.py is vkd-ds's entry point)."""
    from vkd_ds.launch import launcher_command

    script, *args = target
    cmd = launcher_command(args, num_procs, script=None if script == "launcher/train.py" else script)
    return subprocess.run(
        cmd, cwd=REPO, env={**cpu_env(), **(env or {})}, capture_output=True, text=True, timeout=timeout
    )


def train_job(
    overrides: list[str], num_procs: int = 2, timeout: int = 600, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess:
    """`deepspeed launcher/train.py <overrides>`; fails the test with the job's output if it fails."""
    result = deepspeed_launch(["launcher/train.py", *overrides], num_procs, timeout, env)
    assert result.returncode == 0, f"training job failed:\n{result.stdout[-4000:]}\n{result.stderr[-6000:]}"
    return result


def vkd_cli(args: list[str], timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "vkd_ds.cli", *args],
        cwd=REPO,
        env=cpu_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def vkd_cli_in_process(args: list[str]) -> subprocess.CompletedProcess:
    """`vkd-ds ARGS` in this process, for the commands that fail before starting any process (bad
    input): `vkd_ds.cli.main`'s exit status and what it printed. The same code path as the command,
    without the seconds of importing torch, transformers and DeepSpeed in a fresh interpreter."""
    import contextlib
    import io

    from vkd_ds.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(list(args))
    return subprocess.CompletedProcess(["vkd-ds", *args], code, out.getvalue(), err.getvalue())


@pytest.fixture(scope="session")
def tiny_assets(tmp_path_factory) -> Path:
    """A BPE tokenizer, a tiny random Llama teacher, its valence head and JSONL data, built here."""
    from vkd_ds.assets import write_tiny_assets

    return write_tiny_assets(tmp_path_factory.mktemp("assets"))


def base_overrides(assets: Path, run_dir: Path) -> list[str]:
    from vkd_ds.assets import asset_overrides

    return [
        *asset_overrides(assets),
        f"run.dir={run_dir}",
        "data.max_seq_len=48",
        "trainer.warmup_steps=2",
        "trainer.lr=3e-3",
        "trainer.eval_max_batches=2",
        "trainer.progress_bar=false",
        # Sequence KD (a default term) and the mercy gate (on by default) are switched on by the
        # tests that are about them.
        "loss.seq=0",
        "gate.enabled=false",
        # Both models on ZeRO-3, the teacher's shards offloaded (the layout before `auto` planned one,
        # and the most involved): the tests of the planned layouts set theirs (tests/test_speed_path.py).
        *ZERO3_LAYOUT,
        *TINY_STUDENT,
    ]


ZERO3_LAYOUT = ["deepspeed=zero3", "teacher.layout=zero3", "teacher.offload_param=cpu"]


# Every term of the full objective, the attention-map part of L_feat and a regularized LM
# parameter included; valence weights at the default λ = 6 (the contrastive term is left out:
# its negatives are the micro-batch, which differs between layouts by design).
# Sequence KD samples alike on every layout: each sequence's draws are seeded by its place
# in the global batch, and its baseline is the global batch's mean reward.
FULL_OBJECTIVE = [
    *loss_overrides(ce=1.0, soft=0.8, feat=0.4, seq=0.3, val=0.6, reg=0.01),
    "seq_kd.n_gen=6",
    "feat.attention=0.5",
    "reg.param_patterns=[*norm.weight]",
    "weighting.lam=6.0",
]


def save_tiny_model(path: Path, arch: str = "llama", seed: int = 5, vocab_size: int = 384, **sizes) -> Path:
    """A random causal LM of `arch`, built from a config and saved: a starting point that is the
    same for every layout (a fresh init under ZeRO-3's zero.Init draws differently per layout)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    shape = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2}
    shape.update(sizes)
    shape.setdefault("num_key_value_heads", shape["num_attention_heads"])
    config = AutoConfig.for_model(arch, vocab_size=vocab_size, max_position_embeddings=128, **shape)
    torch.manual_seed(seed)
    AutoModelForCausalLM.from_config(config).save_pretrained(path)
    return path


@pytest.fixture
def logits():
    """Student and teacher logits of the loss tests: [4, 9, V+3] and [4, 9, V+11] (both padded past the
    vocabulary V = 37, the teacher's wider), a mask with one sequence that has no valid token."""
    import torch

    torch.manual_seed(0)
    batch, seq, vocab = 4, 9, 37
    student = torch.randn(batch, seq, vocab + 3, requires_grad=True)
    teacher = torch.randn(batch, seq, vocab + 11) * 3
    mask = torch.rand(batch, seq) > 0.3
    mask[1] = False
    return student, teacher, mask, vocab


def steps_logged(run_dir) -> int:
    try:
        return max(0, len((run_dir / "metrics.csv").read_text().splitlines()) - 1)
    except FileNotFoundError:
        return 0


def kill_at_step(overrides, run_dir, step: int) -> bool:
    """Start the job in its own process group and kill -9 all of it as soon as metrics.csv shows
    `step` steps (mid-step, mid-save or mid-eval: wherever it is then); False if it ended first."""
    from vkd_ds.launch import launcher_command

    job = subprocess.Popen(
        launcher_command(overrides, 2),
        cwd=REPO,
        env=cpu_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    while job.poll() is None:
        if steps_logged(run_dir) >= step:
            os.killpg(job.pid, signal.SIGKILL)
            job.wait()
            return True
        time.sleep(0.01)
    return False
