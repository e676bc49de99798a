"""Starting jobs: the one deepspeed launcher command line, and the per-rank entry point it runs.

`launcher_command` / `run_launcher` are how every job is started (the CLI, the demo, the benches,
the tests). The per-rank entry point is `main` (`python -m vkd_ds.launch`, or `launcher/train.py`).
The launcher appends `--local_rank=N`, which Hydra would reject as an override: it is moved into
the LOCAL_RANK environment variable first.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from typing import NoReturn

ENTRY_MODULE = "vkd_ds.launch"


def launcher_command(
    args: Sequence[str],
    num_procs: int | None,
    *,
    script: str | None = None,
    master_port: int | None = None,
    launcher_args: Sequence[str] = (),
) -> list[str]:
    """`python -m deepspeed.launcher.runner ... <entry> <args>`: `num_procs` processes on this machine
    (None: the launcher's own choice, e.g. with a --hostfile in `launcher_args`), each running
    vkd-ds's entry point (or `script`, a Python file) with `args`."""
    command = [sys.executable, "-m", "deepspeed.launcher.runner", "--log_level", "warning", *launcher_args]
    if num_procs is not None:
        command += ["--num_gpus", str(num_procs)]
    if master_port is not None or not any(a.startswith("--master_port") for a in launcher_args):
        from vkd_ds.dist import free_port

        command += ["--master_port", str(master_port or free_port())]
    command += [script] if script is not None else ["--module", ENTRY_MODULE]
    return command + list(args)


def run_launcher(args: Sequence[str], num_procs: int | None, *, env: dict[str, str] | None = None, **options) -> int:
    """Run `launcher_command(args, num_procs, **options)` to its end; its exit status."""
    import subprocess

    return subprocess.call(launcher_command(args, num_procs, **options), env=os.environ.copy() if env is None else env)


def start_training(overrides: list[str]) -> int:
    """`vkd-ds train [overrides]`: every input check once, here, before any process starts; then the
    ranks (one per GPU, or `num_procs` on a CPU machine). The exit status of the job."""
    select_accelerator()
    from vkd_ds.builders.inputs import prepare
    from vkd_ds.config import check_global_batch, compose
    from vkd_ds.ds_config import checked_deepspeed_configs

    cfg = compose(overrides)
    prepared = prepare(cfg)
    num_procs = procs_for(cfg)
    check_global_batch(cfg, num_procs)
    _, teacher_ds = checked_deepspeed_configs(prepared.settings, num_procs, on_gpu=num_procs_are_gpus())
    s = prepared.settings
    if prepared.loads_teacher and (not num_procs_are_gpus() or s.teacher.offload_param in ("cpu", "nvme")):
        from vkd_ds.teacher_load import check_teacher_fits

        # Host memory or disk, shared by the ranks this command starts here, on one machine: at the
        # least the teacher's ZeRO-3 shards (what an `auto` layout falls back to; each rank checks the
        # layout it plans). GPU memory each rank checks itself: asking CUDA here would hold a context
        # on GPU 0.
        check_teacher_fits(prepared.teacher_parameters, teacher_ds, num_procs, num_procs, num_procs_are_gpus())
    return run_launcher(overrides, num_procs, env=env_with_teacher_fingerprint(s.teacher.path))


def start_cache_teacher(overrides: list[str]) -> int:
    """`vkd-ds cache-teacher [overrides]`: its checks here (settings, teacher, tokenizer, data, cache.*,
    an existing cache.dir), then the ranks, each writing its share of the shards."""
    select_accelerator()
    from vkd_ds.config import compose
    from vkd_ds.ds_config import check_deepspeed_config, teacher_ds_config
    from vkd_ds.teacher_cache import prepare_cache

    cfg = cache_writer_config(compose(overrides))
    plan = prepare_cache(cfg)
    num_procs = procs_for(cfg)
    check_deepspeed_config(teacher_ds_config(plan.settings, num_procs_are_gpus()), num_procs, "teacher")
    env = env_with_teacher_fingerprint(plan.settings.teacher.path)
    from vkd_ds.teacher_cache import CACHE_TEACHER_FLAG

    return run_launcher([CACHE_TEACHER_FLAG, *overrides], num_procs, env=env)


def env_with_teacher_fingerprint(teacher_path) -> dict[str, str]:
    """This process's environment for the ranks, with the teacher's weights fingerprint when the checks
    here hashed them (a teacher cache's, written or read): the ranks reuse it while the files' sizes and
    mtimes are unchanged, so a job hashes the teacher once, not once per process."""
    from vkd_ds.teacher_cache import fingerprint_env

    return {**os.environ, **fingerprint_env(teacher_path)}


def cache_writer_config(cfg):
    """The cache writer trains nothing: the mercy gate (on by default) must not ask it for a valence head."""
    from omegaconf import OmegaConf

    return OmegaConf.merge(cfg, {"gate": {"enabled": False}})


def num_procs_are_gpus() -> bool:
    import torch

    return os.environ.get("DS_ACCELERATOR") != "cpu" and torch.cuda.is_available()


def procs_for(cfg) -> int:
    """Ranks on this machine: one per visible GPU, else `num_procs`."""
    import torch

    if num_procs_are_gpus():
        return torch.cuda.device_count()
    return int(cfg.num_procs)


def strip_local_rank(argv: list[str]) -> list[str]:
    out, skip = [], False
    for i, arg in enumerate(argv):
        if skip:
            skip = False
            continue
        if arg.startswith("--local_rank=") or arg.startswith("--local-rank="):
            os.environ["LOCAL_RANK"] = arg.split("=", 1)[1]
        elif arg in ("--local_rank", "--local-rank") and i + 1 < len(argv):
            os.environ["LOCAL_RANK"] = argv[i + 1]
            skip = True
        else:
            out.append(arg)
    return out


def select_accelerator() -> None:
    """DeepSpeed's CPU accelerator when there is no GPU (must be decided before deepspeed is imported)."""
    if "DS_ACCELERATOR" not in os.environ:
        import torch

        if not torch.cuda.is_available():
            os.environ["DS_ACCELERATOR"] = "cpu"


CACHE_TEACHER_FLAG = "--job=cache-teacher"  # the ranks of `vkd-ds cache-teacher` (first argument)
_job = "train"


def run_job(cfg) -> None:
    from vkd_ds import dist
    from vkd_ds.errors import EXIT_USER_ERROR, VkdError

    try:
        if _job == "cache-teacher":
            from vkd_ds.teacher_cache import write_cache

            write_cache(cache_writer_config(cfg))
        else:
            from vkd_ds.train import train

            train(cfg)
    except VkdError as err:
        if dist.rank() == 0:
            print(f"vkd-ds: error: {err}", file=sys.stderr, flush=True)
        leave(EXIT_USER_ERROR)
    # Ranks finish a job together: rank 0 may still be writing files after the last collective.
    dist.barrier()


def leave(code: int) -> NoReturn:
    """End a rank's process once its work is done, without the interpreter's teardown.

    With a gloo process group alive, C++ destructors at interpreter exit ended about one job in 60
    with "terminate called without an active exception" (SIGABRT, a failed job after every file was
    written; bench/exit_aborts.py); destroying the group first made it more frequent, not less. So
    the Python exit handlers run (W&B's, TensorBoard's, logging's), the streams are flushed, and the
    process ends here: every file vkd-ds writes is already closed and renamed into place. Called by
    ranks only (launch.main, run_job), never by the CLI process."""
    import atexit
    import logging

    atexit._run_exitfuncs()
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(code)


def quiet_warnings() -> None:
    import warnings

    # torch.distributed deprecations triggered inside DeepSpeed, once per collective kind and rank.
    warnings.filterwarnings("ignore", category=FutureWarning, message=r".*torch\.distributed\.")


CONFIG_FILE_FLAG = "--config-file"


def config_from_file(path: str, overrides: list[str]):
    """A saved, resolved config (a run's config.yaml) over today's defaults, then `key=value`
    overrides: how `vkd-ds eval RUN_DIR` rebuilds a run's config without its command line."""
    from omegaconf import DictConfig, OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    from vkd_ds.config import REMOVED_KEYS, compose
    from vkd_ds.errors import VkdError

    try:
        saved = OmegaConf.load(path)
        for key in REMOVED_KEYS:  # written by an older vkd-ds: the key did nothing and is gone
            group, _, name = key.rpartition(".")
            node = OmegaConf.select(saved, group) if group else saved
            if isinstance(node, DictConfig) and name in node:
                node.pop(name)
        return OmegaConf.merge(compose([]), saved, OmegaConf.from_dotlist(overrides))
    except (OSError, OmegaConfBaseException) as err:
        raise VkdError(f"cannot use the config {path} with {overrides}: {str(err).splitlines()[0]}") from None


def main() -> None:
    import faulthandler

    # A hard crash of a rank (SIGSEGV, SIGABRT from C++) prints every thread's Python stack.
    faulthandler.enable()
    quiet_warnings()
    global _job
    sys.argv = [sys.argv[0]] + strip_local_rank(sys.argv[1:])
    from vkd_ds.teacher_cache import CACHE_TEACHER_FLAG  # neither DeepSpeed nor transformers: before select_accelerator

    if sys.argv[1:2] == [CACHE_TEACHER_FLAG]:
        _job = "cache-teacher"
        del sys.argv[1]
    select_accelerator()
    if sys.argv[1:2] == [CONFIG_FILE_FLAG]:
        from vkd_ds.errors import EXIT_USER_ERROR, VkdError

        try:
            cfg = config_from_file(sys.argv[2], sys.argv[3:])
        except VkdError as err:
            print(f"vkd-ds: error: {err}", file=sys.stderr, flush=True)
            sys.exit(EXIT_USER_ERROR)
        run_job(cfg)
    else:
        import hydra

        from vkd_ds.config import CONFIG_NAME, config_dir

        # One job, or a sweep's jobs one after another (`-m`).
        hydra.main(config_path=str(config_dir()), config_name=CONFIG_NAME, version_base="1.3")(run_job)()
    import torch.distributed

    if torch.distributed.is_initialized():
        leave(0)


if __name__ == "__main__":
    main()
