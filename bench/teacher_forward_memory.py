"""Each rank's peak resident set and time over a few forwards of the ZeRO-3 teacher alone, under
vkd-ds's teacher settings or DeepSpeed's defaults and under each allocator policy (issue #18: the
figures behind `ds_config.teacher_ds_config` and `malloc.teacher_phase`). Under the launcher:

    DS_ACCELERATOR=cpu OMP_NUM_THREADS=1 deepspeed --num_gpus 2 bench/teacher_forward_memory.py \\
        --zero vkd-ds --allocator vkd-ds -- teacher.path=DIR data.train_path=... data.tokenizer_path=...

--zero: `vkd-ds` (release each gathered layer, little prefetch) or `deepspeed-defaults` (without
those three keys). --allocator: `vkd-ds` (what train does: mapped blocks while loading, then
trainer.keep_freed_memory with the teacher's forward mapped), `keep-all` (keep_freed_memory for
the forward too) or `glibc` (defaults throughout). Each forward: one 128-token sequence per rank,
then a loss-sized pause in the heap (four 16 MiB blocks, as the chunked loss allocates). Prints,
per rank and forward, seconds, RSS and peak RSS since the load (GB).
"""

import argparse
import sys
import time

from vkd_ds.launch import strip_local_rank

parser = argparse.ArgumentParser()
parser.add_argument("--zero", choices=["vkd-ds", "deepspeed-defaults"], default="vkd-ds")
parser.add_argument("--allocator", choices=["vkd-ds", "keep-all", "glibc"], default="vkd-ds")
parser.add_argument("--forwards", type=int, default=3)
parser.add_argument("overrides", nargs="*")
args = parser.parse_args(strip_local_rank(sys.argv[1:]))

import torch  # noqa: E402

from vkd_ds import dist, engines, malloc  # noqa: E402
from vkd_ds.config import compose  # noqa: E402
from vkd_ds.ds_config import teacher_ds_config  # noqa: E402
from vkd_ds.memory import peak_rss_bytes, reset_peak_rss, rss_bytes  # noqa: E402
from vkd_ds.settings import Settings  # noqa: E402

cfg = Settings.from_config(compose(args.overrides))
dist.init()
ds = teacher_ds_config(cfg, on_gpu=False)
if args.zero == "deepspeed-defaults":
    for key in ("stage3_max_live_parameters", "stage3_max_reuse_distance", "stage3_prefetch_bucket_size"):
        ds["zero_optimization"].pop(key)
if args.allocator == "vkd-ds":
    malloc.return_freed_memory()
teacher = engines.build_teacher_engine(cfg.teacher.path, ds)
if args.allocator != "glibc":
    malloc.keep_freed_memory()
phase = malloc.teacher_phase if args.allocator == "vkd-ds" else torch.no_grad  # keep-all: no mapping
reset_peak_rss()
ids = torch.randint(0, teacher.module.config.vocab_size, (1, 128), generator=torch.Generator().manual_seed(0))
for forward in range(args.forwards):
    started = time.perf_counter()
    with torch.no_grad(), phase():
        teacher(input_ids=ids, attention_mask=torch.ones_like(ids))
    seconds = time.perf_counter() - started
    blocks = [torch.empty(2**22).fill_(1.0) for _ in range(4)]  # the loss's chunks
    del blocks
    print(
        f"rank {dist.rank()} forward {forward}: {seconds:.1f} s, RSS {rss_bytes() / 1e9:.3f} GB, "
        f"peak {peak_rss_bytes() / 1e9:.3f} GB ({args.zero}, {args.allocator})",
        flush=True,
    )
