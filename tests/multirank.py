"""Collective logic on real gloo process groups, without the deepspeed launcher or an engine.

`run_ranks(fn, world_size, *args)` spawns `world_size` processes that join one gloo group and run
`fn(*args)`; it returns each rank's return value, in rank order. `fn` must be importable (a module-
level function of a test module). A few seconds per call: for the reductions and the global-batch
bookkeeping whose exactness across world sizes is the point, not for training.
"""

from __future__ import annotations

import os
import pickle
import tempfile
import time
from pathlib import Path


def _rank_main(rank: int, world_size: int, port: int, out_dir: str, fn, args) -> None:
    os.environ.update(
        {"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world_size), "DS_ACCELERATOR": "cpu"}
    )
    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    import torch
    import torch.distributed as torch_dist

    torch.set_num_threads(1)
    torch_dist.init_process_group("gloo", rank=rank, world_size=world_size)
    result = fn(*args)
    (Path(out_dir) / f"rank_{rank}.pkl").write_bytes(pickle.dumps(result))
    torch_dist.barrier()
    # As vkd-ds's ranks do (launch.leave): no C++ teardown of the live gloo group.
    os._exit(0)


def run_ranks(fn, world_size: int, *args, timeout: float = 180) -> list:
    import torch.multiprocessing as mp

    from vkd_ds.dist import free_port

    with tempfile.TemporaryDirectory(prefix="vkd-multirank-") as out_dir:
        context = mp.start_processes(
            _rank_main,
            args=(world_size, free_port(), out_dir, fn, args),
            nprocs=world_size,
            join=False,
            start_method="spawn",
        )
        deadline = time.monotonic() + timeout
        while not context.join(timeout=max(0.1, deadline - time.monotonic())):
            if time.monotonic() > deadline:
                for process in context.processes:
                    process.kill()
                raise TimeoutError(f"{fn.__name__} on {world_size} ranks did not finish in {timeout} s")
        return [pickle.loads((Path(out_dir) / f"rank_{r}.pkl").read_bytes()) for r in range(world_size)]
