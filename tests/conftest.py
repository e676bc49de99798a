"""Shared fixtures: tiny real assets on disk, and helpers that launch real DeepSpeed jobs."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
os.environ.setdefault("DS_ACCELERATOR", "cpu")

# A student small enough that a 2-process ZeRO-3 step takes well under a second.
TINY_STUDENT = [
    "student.config.hidden_size=32",
    "student.config.intermediate_size=64",
    "student.config.num_attention_heads=2",
    "student.config.num_key_value_heads=2",
]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def cpu_env() -> dict[str, str]:
    env = os.environ.copy()
    env["DS_ACCELERATOR"] = "cpu"
    env["OMP_NUM_THREADS"] = "1"
    env["PYTHONPATH"] = f"{REPO}{os.pathsep}{env.get('PYTHONPATH', '')}"
    return env


def deepspeed_launch(target: list[str], num_procs: int, timeout: int = 600) -> subprocess.CompletedProcess:
    """Run `deepspeed --num_gpus N <target>` for real: N processes, gloo, DeepSpeed's CPU accelerator."""
    cmd = [
        sys.executable,
        "-m",
        "deepspeed.launcher.runner",
        "--num_gpus",
        str(num_procs),
        "--master_port",
        str(free_port()),
        *target,
    ]
    return subprocess.run(cmd, cwd=REPO, env=cpu_env(), capture_output=True, text=True, timeout=timeout)


def train_job(overrides: list[str], num_procs: int = 2, timeout: int = 600) -> subprocess.CompletedProcess:
    """`deepspeed launcher/train.py <overrides>`; fails the test with the job's output if it fails."""
    result = deepspeed_launch(["launcher/train.py", *overrides], num_procs, timeout)
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


@pytest.fixture(scope="session")
def tiny_assets(tmp_path_factory) -> Path:
    """A BPE tokenizer, a tiny random Llama teacher and JSONL data, all built here from pydoc text."""
    import torch
    from transformers import AutoModelForCausalLM

    from vkd_ds.assets import llama_config, pydoc_records, split_records, train_tokenizer, write_jsonl
    from vkd_ds.valence import ValenceHead, save_head

    out = tmp_path_factory.mktemp("assets")
    train, valid = split_records(pydoc_records(300)[:240], valid_every=8)
    tokenizer = train_tokenizer(train, 384, out / "tokenizer")
    write_jsonl(out / "train.jsonl", train)
    write_jsonl(out / "valid.jsonl", valid)
    torch.manual_seed(0)
    # Embeddings padded past the tokenizer (as real checkpoints do) must be accepted.
    teacher = AutoModelForCausalLM.from_config(llama_config(len(tokenizer) + 16, 48, 3))
    teacher.save_pretrained(out / "teacher")
    tokenizer.save_pretrained(out / "teacher")
    # A teacher valence head (random, seeded): enough for the objective's mechanics.
    save_head(ValenceHead(48, 8), out / "teacher_valence_head.safetensors")
    return out


def base_overrides(assets: Path, run_dir: Path) -> list[str]:
    return [
        f"teacher.path={assets / 'teacher'}",
        f"data.train_path={assets / 'train.jsonl'}",
        f"data.valid_path={assets / 'valid.jsonl'}",
        f"data.tokenizer_path={assets / 'tokenizer'}",
        f"valence.teacher_head={assets / 'teacher_valence_head.safetensors'}",
        f"run.dir={run_dir}",
        "data.max_seq_len=48",
        "trainer.warmup_steps=2",
        "trainer.lr=3e-3",
        "trainer.eval_max_batches=2",
        "trainer.progress_bar=false",
        # Sequence KD (a default term) is switched on by the tests that are about it.
        "loss.seq=0",
        *TINY_STUDENT,
    ]
