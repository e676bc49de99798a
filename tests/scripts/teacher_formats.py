"""Run under the deepspeed launcher: build the teacher engine (as vkd-ds builds it) from each of
several checkpoint directories in turn, in one process per rank, and report per teacher what each
rank holds and (rank 0) the logits on fixed ids.

    teacher_formats.py OUT_DIR TEACHER_DIR[,TEACHER_DIR...] [overrides]

Writes OUT_DIR/rank_R.json ({teacher dir: {"local": .., "total": ..}}) and OUT_DIR/logits.pt
({"input_ids": ids, teacher dir: logits})."""

import gc
import json
import sys
from pathlib import Path

from vkd_ds.launch import strip_local_rank

args = strip_local_rank(sys.argv[1:])
import torch  # noqa: E402

from vkd_ds import dist, engines  # noqa: E402
from vkd_ds.config import compose  # noqa: E402
from vkd_ds.ds_config import teacher_ds_config  # noqa: E402
from vkd_ds.settings import Settings  # noqa: E402

out_dir, teachers = Path(args[0]), args[1].split(",")
cfg = Settings.from_config(compose(args[2:]))
dist.init()
ids = torch.arange(2 * 12).view(2, 12) * 7 % 384
held, logits = {}, {"input_ids": ids}
for path in teachers:
    teacher = engines.build_teacher_engine(path, teacher_ds_config(cfg, on_gpu=False))
    local, total = engines.local_param_count(teacher)
    held[path] = {"local": local, "total": total}
    with torch.no_grad():
        logits[path] = teacher(input_ids=ids, attention_mask=torch.ones_like(ids)).logits.float()
    teacher.destroy()
    del teacher
    gc.collect()
(out_dir / f"rank_{dist.rank()}.json").write_text(json.dumps(held))
if dist.is_main():
    torch.save(logits, out_dir / "logits.pt")

# End as the ranks of a job do (launch.leave): no C++ teardown of a live gloo group.
from vkd_ds.launch import leave  # noqa: E402

dist.barrier()
leave(0)
