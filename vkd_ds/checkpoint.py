"""Checkpoints: DeepSpeed format plus client state and every rank's RNG, published atomically.

Layout: run_dir/checkpoints/step_XXXXXXX/ holds DeepSpeed's files, rng/rank_R.pt
and, written last, COMPLETE. A directory without COMPLETE (a kill during the
write) is never loaded. `latest` names the newest complete one.

Elastic resume: a checkpoint written by another number of ranks is converted once
into DeepSpeed's universal format (step_XXXXXXX/universal/, also published last)
and loaded from there; the global batch must stay the same.
"""

from __future__ import annotations

import json
import os
import pickle
import random
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

from vkd_ds import dist
from vkd_ds.errors import VkdError

COMPLETE = "COMPLETE"
UNIVERSAL = "universal"


def checkpoint_root(run_dir: Path) -> Path:
    return Path(run_dir) / "checkpoints"


def tag_of(step: int) -> str:
    return f"step_{step:07d}"


def write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w", encoding="utf-8") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def rng_state() -> dict:
    """This rank's RNG streams. On a GPU, only the rank's own device's generator: a resumed job may see
    fewer GPUs per process than the one that saved (e.g. one per SLURM task instead of the node's)."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if dist.on_gpu():
        state["cuda_device"] = torch.cuda.get_rng_state()  # the current device's
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if dist.on_gpu():
        device_state = device_rng_entry(state, dist.launcher_local_rank())
        if device_state is not None:
            torch.cuda.set_rng_state(device_state)  # the current device's


def device_rng_entry(state: dict, local_rank: int):
    """The GPU generator state this rank restores: its own device's, or, from checkpoints that saved
    every device the process saw (`cuda`, a list), the entry of the rank's launcher LOCAL_RANK, which
    was its device there (the process saw the node's GPUs) and may not be its index now (one GPU per
    task). None: nothing to restore (a checkpoint written without a GPU, or no such entry)."""
    if "cuda_device" in state:
        return state["cuda_device"]
    every = state.get("cuda") or []
    return every[local_rank] if local_rank < len(every) else None


def complete_checkpoints(run_dir: Path) -> list[Path]:
    root = checkpoint_root(run_dir)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and p.name.startswith("step_") and (p / COMPLETE).is_file()]
    return sorted(found, key=lambda p: p.name)


def latest_checkpoint(run_dir: Path) -> Path | None:
    found = complete_checkpoints(run_dir)
    return found[-1] if found else None


def save(engine, run_dir: Path, step: int, client_state: dict, keep: int, global_batch: int) -> Path:
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
        meta = {"step": step, "world_size": dist.world_size(), "global_batch": global_batch}
        meta["zero_stage"] = engine.zero_optimization_stage()  # what deepspeed.zero_stage=auto resumes on
        # Every file and its size: a resume checks them on every rank before DeepSpeed reads any,
        # so a truncated or missing shard is one clear error rather than a rank failing alone.
        meta["files"] = {str(f.relative_to(target)): f.stat().st_size for f in sorted(target.rglob("*")) if f.is_file()}
        write_atomic(target / COMPLETE, json.dumps(meta) + "\n")
        write_atomic(root / "latest", tag + "\n")
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


# ---- a run ended by the step guard ---------------------------------------------------------------

STOPPED = "stopped.json"
# Keys that change where a run writes and how often it reports, not what it computes: a resume that
# changes only these repeats a guard stop exactly.
BOOKKEEPING = {"run", "resume", "eval_only", "num_procs", "metrics", "hydra", "assets_dir"}
BOOKKEEPING_TRAINER = {
    "save_every",
    "keep_checkpoints",
    "eval_every",
    "eval_max_batches",
    "stop_after_steps",
    "preempt_signals",
    "requeue",
    "log_every",
    "progress_bar",
    "keep_freed_memory",
    "time_phases",
}


def _computing(resolved: dict) -> dict:
    """The resolved config without its bookkeeping keys, as JSON reads it back."""
    kept = {k: v for k, v in resolved.items() if k not in BOOKKEEPING}
    if isinstance(kept.get("trainer"), dict):
        kept["trainer"] = {k: v for k, v in kept["trainer"].items() if k not in BOOKKEEPING_TRAINER}
    return json.loads(json.dumps(kept, default=str))


def write_stop(run_dir: Path, record: dict, resolved: dict) -> None:
    """Rank 0, when `gate.max_consecutive_rejections` ends the run: why, what to change, and the
    config that got there (RUN_DIR/stopped.json)."""
    write_atomic(Path(run_dir) / STOPPED, json.dumps({**record, "config": _computing(resolved)}, indent=2) + "\n")


def check_resume_after_stop(run_dir: Path, resume_step: int, resolved: dict) -> tuple[int, list[str]] | None:
    """Before a run starts (or resumes from `resume_step`, 0 for none) in a run directory whose last
    run was ended by the step guard at a later step: a VkdError saying why and what to change when
    nothing that computes differs (it would end the same way); else (the stop's step, the changed
    keys); None when no such stop lies ahead."""
    path = Path(run_dir) / STOPPED
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text())
        step, advice, before = int(record["step"]), str(record["advice"]), record["config"]
    except (ValueError, KeyError, TypeError):
        raise VkdError(f"run.dir: {path} is damaged (delete it to resume)") from None
    if resume_step >= step:
        return None
    changed = sorted(_changed_keys(before, _computing(resolved)))
    if not changed:
        kind = "rejected by the mercy gate or skipped as non-finite"
        raise VkdError(
            f"run.dir: this run ended at step {step}: {record.get('consecutive', '?')} steps in a row were {kind} "
            f"(see {path}). Resuming from step {resume_step} with the same settings would end the same way: change "
            f"what ended it ({advice}); or delete {path.name} to repeat the run as it was"
        )
    return step, changed


def _changed_keys(a, b, prefix: str = "") -> set[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        out = set()
        for key in a.keys() | b.keys():
            out |= _changed_keys(a.get(key), b.get(key), f"{prefix}{key}.")
        return out
    return set() if a == b else {prefix.rstrip(".")}


def read_meta(checkpoint_dir: Path) -> dict:
    """What COMPLETE records: step, world_size and (since elastic resume) global_batch."""
    checkpoint_dir = Path(checkpoint_dir)
    if not (checkpoint_dir / COMPLETE).is_file():
        raise VkdError(f"resume: {checkpoint_dir} is not a complete vkd-ds checkpoint (no {COMPLETE} marker)")
    try:
        meta = json.loads((checkpoint_dir / COMPLETE).read_text())
    except ValueError:
        raise VkdError(f"resume: {checkpoint_dir / COMPLETE} is not valid JSON; the checkpoint is damaged") from None
    for name, size in meta.get("files", {}).items():
        path = checkpoint_dir / name
        if not path.is_file():
            raise VkdError(f"resume: checkpoint {checkpoint_dir} is damaged: {name} is missing")
        if path.stat().st_size != size:
            raise VkdError(
                f"resume: checkpoint {checkpoint_dir} is damaged: {name} has {path.stat().st_size} bytes, "
                f"{size} when it was written"
            )
    return meta


def written_stage(checkpoint_dir: Path, meta: dict, configured: int | None = None) -> int:
    """The student's ZeRO stage a checkpoint was written with (DeepSpeed loads it only into that stage):
    recorded in COMPLETE since layouts are planned (vkd_ds/layout.py); for an older checkpoint,
    `configured` (the explicit `deepspeed.zero_stage` of its run directory's config.yaml, which the
    caller reads), else ZeRO-3 when DeepSpeed wrote a model-states file per rank (only ZeRO-3 does).
    Otherwise the files cannot tell (bf16 ZeRO-0, 1 and 2 write alike): a VkdError asks for it."""
    if "zero_stage" in meta:
        return int(meta["zero_stage"])
    if configured is not None:
        return configured
    checkpoint_dir = Path(checkpoint_dir)
    if any(checkpoint_dir.glob("zero_pp_rank_*_model_states.pt")):
        return 3
    raise VkdError(
        f"resume: {checkpoint_dir} does not record the student's ZeRO stage (written before vkd-ds planned "
        "layouts, and its run directory has no config.yaml saying it): set deepspeed.zero_stage to the stage "
        "it was trained with"
    )


def needs_universal(
    checkpoint_dir: Path,
    meta: dict,
    world_size: int,
    zero_stage: int,
    global_batch: int | None,
    nvme_optimizer: bool = False,
) -> bool:
    """True when the checkpoint was written by another number of ranks and its ZeRO optimizer state
    is partitioned by rank (stages 1-3): it must go through DeepSpeed's universal format. Under
    ZeRO-0 every rank holds the whole state and loads it as it is. `global_batch` None: not training
    on (eval), so any batch layout will do. `meta`: read_meta(checkpoint_dir)."""
    written = meta.get("global_batch")
    if None not in (written, global_batch) and written != global_batch:
        raise VkdError(
            f"resume: {checkpoint_dir} was trained with a global batch of {written} sequences, this run has "
            f"{global_batch}; keep trainer.micro_batch_size x trainer.grad_accum x world size = {written} "
            "(e.g. double trainer.grad_accum when halving the ranks)"
        )
    elastic = meta["world_size"] != world_size and zero_stage > 0
    if elastic and nvme_optimizer:
        raise VkdError(
            f"resume: {checkpoint_dir} was written by {meta['world_size']} ranks, this run has {world_size}, and "
            "DeepSpeed's universal checkpoint does not carry NVMe-offloaded optimizer state: resume on "
            f"{meta['world_size']} ranks, or with deepspeed.offload_optimizer=none or cpu"
        )
    return elastic


def make_universal(checkpoint_dir: Path) -> Path:
    """Collective: rank 0 converts the checkpoint once (DeepSpeed's ds_to_universal) into
    checkpoint_dir/universal, published by a rename; the other ranks wait for it."""
    target = Path(checkpoint_dir) / UNIVERSAL
    failure = None
    if dist.is_main() and not target.is_dir():
        staging = target.with_name(UNIVERSAL + ".tmp")
        shutil.rmtree(staging, ignore_errors=True)
        command = [
            sys.executable,
            "-m",
            "deepspeed.checkpoint.ds_to_universal",
            "--input_folder",
            str(checkpoint_dir),
            "--output_folder",
            str(staging),
            "--num_extract_workers",
            "1",
            "--num_merge_workers",
            "1",
            # ZeRO-1/2 checkpoints of plain models carry no `universal_checkpoint_info`; let it be added.
            "--inject_missing_state",
        ]
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode == 0:
            os.replace(staging, target)
            # The converter also leaves a `latest_universal` naming its staging directory: not ours.
            (Path(checkpoint_dir) / "latest_universal").unlink(missing_ok=True)
        else:
            shutil.rmtree(staging, ignore_errors=True)
            lines = (done.stderr or done.stdout).strip().splitlines() or ["no output"]
            failure = f"resume: converting {checkpoint_dir} to DeepSpeed's universal format failed: {lines[-1]}"
    if dist.any_rank(failure is not None):
        raise VkdError(failure or f"resume: rank 0 could not convert {checkpoint_dir} to the universal format")
    return target


def load(engine, checkpoint_dir: Path, meta: dict, seed: int = 0) -> dict:
    """Restore the engine (weights, optimizer, LR schedule) and this rank's RNG; returns the client state.
    `meta` is read_meta(checkpoint_dir), already checked. An engine built with DeepSpeed's
    `checkpoint.load_universal` reads checkpoint_dir/universal."""
    checkpoint_dir = Path(checkpoint_dir)
    universal = bool(engine.load_universal_checkpoint())
    if meta["world_size"] != dist.world_size() and not universal and engine.zero_optimization_stage() > 0:
        raise VkdError(
            f"resume: {checkpoint_dir} was written by {meta['world_size']} ranks, this run has "
            f"{dist.world_size()}; its ZeRO state must be converted first (checkpoint.make_universal)"
        )
    load_dir, tag = (checkpoint_dir, UNIVERSAL) if universal else (checkpoint_dir.parent, checkpoint_dir.name)
    try:
        path, client_state = engine.load_checkpoint(
            str(load_dir),
            tag=tag,
            load_optimizer_states=True,
            load_lr_scheduler_states=True,
        )
    except (OSError, RuntimeError, KeyError, ValueError, AssertionError, EOFError, pickle.UnpicklingError) as err:
        raise VkdError(f"resume: cannot load {checkpoint_dir}: {str(err).splitlines()[0]}") from None
    if path is None:
        raise VkdError(f"resume: DeepSpeed found no checkpoint in {checkpoint_dir}")
    if meta["world_size"] == dist.world_size():
        set_rng_state(torch.load(checkpoint_dir / "rng" / f"rank_{dist.rank()}.pt", weights_only=False))
    else:
        # Another layout has other RNG streams; each rank starts a fresh one, reproducibly.
        stream = seed + 1_000_003 * int(meta["step"]) + dist.rank()
        torch.manual_seed(stream)
        random.seed(stream)
        np.random.seed(stream % 2**32)
    return client_state
