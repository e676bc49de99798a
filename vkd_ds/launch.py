"""Per-rank entry point started by the deepspeed launcher (also `launcher/train.py`).

The launcher appends `--local_rank=N`, which Hydra would reject as an
override: it is moved into the LOCAL_RANK environment variable first.
"""

from __future__ import annotations

import os
import sys


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


def run_job(cfg) -> None:
    from vkd_ds import dist
    from vkd_ds.errors import EXIT_USER_ERROR, VkdError
    from vkd_ds.train import train

    try:
        train(cfg)
    except VkdError as err:
        if dist.rank() == 0:
            print(f"vkd-ds: error: {err}", file=sys.stderr, flush=True)
        sys.exit(EXIT_USER_ERROR)
    # Ranks leave together, as they did when a checkpoint's barrier ended every run. Since the
    # checkpoint moved before the eval, the last collective can be the eval's all-reduce, after which
    # rank 0 still writes files while the others exit; test runs then showed rare aborts at exit
    # ("terminate called without an active exception", exit 250) after the work was done. That
    # this barrier removes them is a hypothesis, not yet measured.
    dist.barrier()


def quiet_warnings() -> None:
    import warnings

    # torch.distributed deprecations triggered inside DeepSpeed, once per collective kind and rank.
    warnings.filterwarnings("ignore", category=FutureWarning, message=r".*torch\.distributed\.")


CONFIG_FILE_FLAG = "--config-file"


def config_from_file(path: str, overrides: list[str]):
    """A saved, resolved config (a run's config.yaml) over today's defaults, then `key=value`
    overrides: how `vkd-ds eval RUN_DIR` rebuilds a run's config without its command line."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    from vkd_ds.config import compose
    from vkd_ds.errors import VkdError

    try:
        saved = OmegaConf.load(path)
        return OmegaConf.merge(compose([]), saved, OmegaConf.from_dotlist(overrides))
    except (OSError, OmegaConfBaseException) as err:
        raise VkdError(f"cannot use the config {path} with {overrides}: {str(err).splitlines()[0]}") from None


def main() -> None:
    quiet_warnings()
    sys.argv = [sys.argv[0]] + strip_local_rank(sys.argv[1:])
    select_accelerator()
    if sys.argv[1:2] == [CONFIG_FILE_FLAG]:
        from vkd_ds.errors import EXIT_USER_ERROR, VkdError

        try:
            cfg = config_from_file(sys.argv[2], sys.argv[3:])
        except VkdError as err:
            print(f"vkd-ds: error: {err}", file=sys.stderr, flush=True)
            sys.exit(EXIT_USER_ERROR)
        run_job(cfg)
        return
    import hydra

    from vkd_ds.config import CONFIG_NAME, config_dir

    hydra.main(config_path=str(config_dir()), config_name=CONFIG_NAME, version_base="1.3")(run_job)()


if __name__ == "__main__":
    main()
