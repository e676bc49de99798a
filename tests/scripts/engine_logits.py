"""Run under the deepspeed launcher: rebuild the student engine, load a run's latest checkpoint,
and save its logits on fixed token ids (rank 0), to compare with an exported model."""

import sys
from pathlib import Path

from vkd_ds.launch import strip_local_rank

args = strip_local_rank(sys.argv[1:])
import torch  # noqa: E402

from vkd_ds import checkpoint, dist, engines  # noqa: E402
from vkd_ds.builders.inputs import prepare  # noqa: E402
from vkd_ds.builders.student import build_student  # noqa: E402
from vkd_ds.config import compose  # noqa: E402
from vkd_ds.ds_config import student_ds_config, student_lr_schedule  # noqa: E402

out_file = Path(args[0])
prepared = prepare(compose(args[1:]))
cfg = prepared.settings
dist.init()
ds_config = student_ds_config(cfg, dist.world_size(), on_gpu=False)
student = build_student(cfg, prepared, ds_config, seed=999)
engine, _, _ = engines.build_student_engine(student, ds_config, student_lr_schedule(cfg, ds_config))
latest = checkpoint.latest_checkpoint(Path(cfg.run.dir))
checkpoint.load(engine, latest, checkpoint.read_meta(latest))
engine.eval()
ids = torch.arange(2 * 12).view(2, 12) % len(prepared.tokenizer)
with torch.no_grad():
    logits = engine(ids, torch.ones_like(ids))["logits"]
if dist.is_main():
    torch.save({"input_ids": ids, "logits": logits}, out_file)

# End as the ranks of a job do (launch.leave): the interpreter's C++ teardown with a gloo group alive
# aborted about one process in 60 ("terminate called without an active exception").
from vkd_ds.launch import leave  # noqa: E402

dist.barrier()
leave(0)
