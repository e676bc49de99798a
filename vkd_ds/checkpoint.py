"""Checkpoints: DeepSpeed format plus client state and every rank's RNG, published atomically.

Layout: run_dir/checkpoints/step_XXXXXXX/ holds DeepSpeed's files, rng/rank_R.pt
and, written last, COMPLETE. A directory without COMPLETE (a kill during the
write) is never loaded. `latest` names the newest complete one.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
from pathlib import Path

import numpy as np
import torch

from vkd_ds import dist
from vkd_ds.errors import VkdError

COMPLETE = "COMPLETE"


def checkpoint_root(run_dir: Path) -> Path:
    return Path(run_dir) / "checkpoints"


def tag_of(step: int) -> str:
    return f"step_{step:07d}"


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w", encoding="utf-8") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def complete_checkpoints(run_dir: Path) -> list[Path]:
    root = checkpoint_root(run_dir)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and p.name.startswith("step_") and (p / COMPLETE).is_file()]
    return sorted(found, key=lambda p: p.name)


def latest_checkpoint(run_dir: Path) -> Path | None:
    found = complete_checkpoints(run_dir)
    return found[-1] if found else None


def save(engine, run_dir: Path, step: int, client_state: dict, keep: int) -> Path:
    """Collective: every rank writes its shards and RNG; rank 0 publishes once all are done."""
    root = checkpoint_root(run_dir)
    tag = tag_of(step)
    target = root / tag
    if dist.is_main() and target.exists():
        shutil.rmtree(target)  # a leftover of a run killed while writing this very step
    dist.barrier()
    engine.save_checkpoint(str(root), tag=tag, client_state=client_state, save_latest=False)
    (target / "rng").mkdir(parents=True, exist_ok=True)
    torch.save(rng_state(), target / "rng" / f"rank_{dist.rank()}.pt")
    if f"{step}:{dist.rank()}" in os.environ.get("VKD_FAULT_KILL_IN_SAVE", "").split(","):
        # Fault injection for tests: die like `kill -9` with this step's shards written, unpublished.
        os.kill(os.getpid(), signal.SIGKILL)
    dist.barrier()
    if dist.is_main():
        meta = {"step": step, "world_size": dist.world_size()}
        _write_atomic(target / COMPLETE, json.dumps(meta) + "\n")
        _write_atomic(root / "latest", tag + "\n")
        _prune(root, keep, newest=target)
    dist.barrier()
    return target


def _prune(root: Path, keep: int, newest: Path) -> None:
    for old in complete_checkpoints(root.parent)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    for partial in root.iterdir():
        if (
            partial.is_dir()
            and partial.name.startswith("step_")
            and not (partial / COMPLETE).exists()
            and partial.name < newest.name
        ):
            shutil.rmtree(partial, ignore_errors=True)


def load(engine, checkpoint_dir: Path) -> dict:
    """Restore the engine (weights, optimizer, LR schedule) and this rank's RNG; returns the client state."""
    checkpoint_dir = Path(checkpoint_dir)
    if not (checkpoint_dir / COMPLETE).is_file():
        raise VkdError(f"resume: {checkpoint_dir} is not a complete vkd-ds checkpoint (no {COMPLETE} marker)")
    meta = json.loads((checkpoint_dir / COMPLETE).read_text())
    if meta["world_size"] != dist.world_size():
        raise VkdError(
            f"resume: {checkpoint_dir} was written by {meta['world_size']} ranks, this run has "
            f"{dist.world_size()}; resuming on a different world size is not supported yet"
        )
    try:
        path, client_state = engine.load_checkpoint(
            str(checkpoint_dir.parent),
            tag=checkpoint_dir.name,
            load_optimizer_states=True,
            load_lr_scheduler_states=True,
        )
    except (OSError, RuntimeError, KeyError, ValueError) as err:
        raise VkdError(f"resume: cannot load {checkpoint_dir}: {str(err).splitlines()[0]}") from None
    if path is None:
        raise VkdError(f"resume: DeepSpeed found no checkpoint in {checkpoint_dir}")
    rng_file = checkpoint_dir / "rng" / f"rank_{dist.rank()}.pt"
    set_rng_state(torch.load(rng_file, weights_only=False))
    return client_state
