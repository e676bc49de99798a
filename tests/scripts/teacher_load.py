"""Run under the deepspeed launcher: build the teacher engine from teacher.path and report, per rank,
the memory the build took at its peak, what the rank holds, and (rank 0) the logits on fixed ids."""

import json
import sys
from pathlib import Path

from vkd_ds.launch import strip_local_rank

args = strip_local_rank(sys.argv[1:])
import torch  # noqa: E402

from vkd_ds import dist, engines  # noqa: E402
from vkd_ds.config import compose  # noqa: E402
from vkd_ds.ds_config import teacher_ds_config  # noqa: E402
from vkd_ds.malloc import return_freed_memory  # noqa: E402
from vkd_ds.memory import peak_rss_bytes, reset_peak_rss, rss_bytes  # noqa: E402
from vkd_ds.models import load_model_config  # noqa: E402
from vkd_ds.settings import Settings  # noqa: E402
from vkd_ds.teacher_load import check_checkpoint  # noqa: E402

out_dir = Path(args[0])
cfg = Settings.from_config(compose(args[1:]))
dist.init()
# What train does before loading, and what imports the model's code: the fit estimate (a meta model).
check_checkpoint(load_model_config(cfg.teacher.path, "teacher.path"), cfg.teacher.path)
return_freed_memory()  # as train() does while the teacher loads
dist.barrier()
before = rss_bytes()
reset_peak_rss()
teacher = engines.build_teacher_engine(cfg.teacher.path, teacher_ds_config(cfg, on_gpu=False))
peak = peak_rss_bytes()
local, total = engines.local_param_count(teacher)
ids = torch.arange(2 * 12).view(2, 12) % teacher.module.config.vocab_size
with torch.no_grad():
    logits = teacher(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
swapped = [p for p in teacher.module.parameters() if str(getattr(p.ds_tensor, "final_location", None)).endswith("nvme")]
report = {
    "rank": dist.rank(),
    "local": local,
    "total": total,
    "before": before,
    "peak_extra": peak - before,
    "nvme_params": len(swapped),
    "nvme_dirs": [str(path) for path in Path(cfg.teacher.nvme_path or out_dir).glob("vkd-ds-*")],
}
(out_dir / f"rank_{dist.rank()}.json").write_text(json.dumps(report))
if dist.is_main():
    torch.save({"input_ids": ids, "logits": logits.float()}, out_dir / "logits.pt")

# End as the ranks of a job do (launch.leave): the interpreter's C++ teardown with a gloo group alive
# aborted about one process in 60 ("terminate called without an active exception").
from vkd_ds.launch import leave  # noqa: E402

dist.barrier()
leave(0)
