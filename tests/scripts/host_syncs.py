"""Run under the deepspeed launcher: `host_syncs.py OUT_DIR [overrides ...]` trains as
launcher/train.py does, counting every read of a tensor's value into the host that vkd-ds code makes
inside `Trainer.train_step` (`item`, `tolist`, `float`/`int`/`bool` of a tensor, `.cpu()`, `.numpy()`,
a boolean-mask index or `nonzero`, whose output size needs the values). On a GPU each of these blocks
the host until the device has caught up; on a CPU they are cheap, but the same calls run. DeepSpeed's
own reads inside `engine.step()` are counted apart. Each rank writes OUT_DIR/rank_R.json: the calls per
step, by call site."""

import json
import sys
import traceback
from collections import Counter
from pathlib import Path

import torch
from torch.overrides import TorchFunctionMode

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from vkd_ds.launch import strip_local_rank  # noqa: E402

READS = {"item", "tolist", "__bool__", "__float__", "__int__", "__index__", "numpy", "nonzero", "masked_select"}
OURS = str(REPO / "vkd_ds")
# Code that only ever reads host tensors: the collation of a micro-batch and the sampler (data.py), and
# the batch's valid positions found before it moves to the device. On a CPU every tensor is a host
# tensor, so these are named rather than told apart by device. (`.to()`/`.cpu()` are not counted: on a
# CPU their direction cannot be seen; vkd_ds.sequences.to_device makes the step's copies asynchronous.)
HOST_SIDE = {("data.py", None), ("sequences.py", "on_device")}


def _is_read(name: str, args) -> bool:
    if name in READS:
        return True
    if name == "__getitem__":
        index = args[1] if len(args) > 1 else None
        parts = index if isinstance(index, tuple) else (index,)
        return any(isinstance(p, torch.Tensor) and p.dtype == torch.bool for p in parts)
    return False


class CountReads(TorchFunctionMode):
    def __init__(self):
        super().__init__()
        self.by_site: Counter = Counter()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if _is_read(name, args):
            frames = traceback.extract_stack(limit=12)[:-1]
            ours = [f for f in frames if f.filename.startswith(OURS)]
            # The innermost frame decides whose read it is: vkd-ds's own, or a library's it called.
            innermost = frames[-1]
            if any(
                (Path(f.filename).name, None) in HOST_SIDE or (Path(f.filename).name, f.name) in HOST_SIDE for f in ours
            ):
                pass
            elif innermost.filename.startswith(OURS):
                self.by_site[f"{Path(innermost.filename).name}:{innermost.lineno} {name}"] += 1
            elif ours:
                self.by_site[f"library via {Path(ours[-1].filename).name}:{ours[-1].lineno} {name}"] += 1
        return func(*args, **(kwargs or {}))


def main() -> None:
    out, *overrides = strip_local_rank(sys.argv[1:])
    out_dir = Path(out)
    from vkd_ds import dist, trainer

    steps: list[dict] = []
    original = trainer.Trainer.train_step

    def counted(self):
        mode = CountReads()
        with mode:
            metrics = original(self)
        steps.append(dict(mode.by_site))
        # Written at every step: the job ends in os._exit (launch.leave), past any `finally` here.
        (out_dir / f"rank_{dist.rank()}.json").write_text(json.dumps(steps, indent=1))
        return metrics

    trainer.Trainer.train_step = counted
    sys.argv = [sys.argv[0], *overrides]
    from vkd_ds.launch import main as launch_main

    launch_main()


if __name__ == "__main__":
    main()
