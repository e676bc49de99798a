"""Each rank's peak resident set while the teacher engine is built, for any checkout of vkd-ds (the
before/after figure of issue #18's loader). Run under the deepspeed launcher, with vkd-ds's
overrides naming the teacher (and the tokenizer and data that `Settings` wants):

    DS_ACCELERATOR=cpu OMP_NUM_THREADS=1 PYTHONPATH=CHECKOUT deepspeed --num_gpus 2 \\
        bench/teacher_load_peak.py teacher.path=DIR data.train_path=... data.tokenizer_path=...

Prints one line per rank: RSS before, peak RSS while building (VmHWM, reset just before) and RSS
after, in GB. The model's code is imported first (a meta-device model), so the figures are the
load's own. No allocator setting is applied: glibc's defaults, for both loaders.
"""

import os
import sys

from vkd_ds.launch import strip_local_rank

args = strip_local_rank(sys.argv[1:])
import torch  # noqa: E402
from transformers import AutoConfig, AutoModelForCausalLM  # noqa: E402

from vkd_ds import dist, engines  # noqa: E402
from vkd_ds.config import compose  # noqa: E402
from vkd_ds.ds_config import teacher_ds_config  # noqa: E402
from vkd_ds.settings import Settings  # noqa: E402


def peak_gb() -> float:
    with open("/proc/self/status") as handle:
        return next(int(line.split()[1]) * 1024 / 1e9 for line in handle if line.startswith("VmHWM:"))


def rss_gb() -> float:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 1e9


cfg = Settings.from_config(compose(args))
dist.init()
with torch.device("meta"):
    AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(cfg.teacher.path))
dist.barrier()
before = rss_gb()
with open("/proc/self/clear_refs", "w") as handle:
    handle.write("5")
engine = engines.build_teacher_engine(cfg.teacher.path, teacher_ds_config(cfg, on_gpu=False))
print(f"rank {dist.rank()}: before {before:.3f} GB, peak {peak_gb():.3f} GB, after {rss_gb():.3f} GB", flush=True)
