"""Run under the deepspeed launcher: build the teacher engine and report what each rank holds."""

import json
import sys
from pathlib import Path

from vkd_ds.launch import strip_local_rank

args = strip_local_rank(sys.argv[1:])
from vkd_ds import dist, engines  # noqa: E402
from vkd_ds.config import compose  # noqa: E402
from vkd_ds.ds_config import teacher_ds_config  # noqa: E402
from vkd_ds.settings import Settings  # noqa: E402

out_dir = Path(args[0])
cfg = Settings.from_config(compose(args[1:]))
dist.init()
teacher = engines.build_teacher_engine(cfg.teacher.path, teacher_ds_config(cfg, on_gpu=False))
local, total = engines.local_param_count(teacher)
report = {
    "rank": dist.rank(),
    "world": dist.world_size(),
    "local": local,
    "total": total,
    "frozen": all(not p.requires_grad for p in teacher.module.parameters()),
    "eval_mode": not teacher.module.training,
}
(out_dir / f"rank_{dist.rank()}.json").write_text(json.dumps(report))

# End as the ranks of a job do (launch.leave): the interpreter's C++ teardown with a gloo group alive
# aborted about one process in 60 ("terminate called without an active exception").
from vkd_ds.launch import leave  # noqa: E402

dist.barrier()
leave(0)
