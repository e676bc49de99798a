"""The teacher's weights, shard by shard, straight into its ZeRO-3 partitions; and whether they fit.

transformers' ZeRO-3 loading merges every checkpoint file into one state dict on rank 0 and
gathers each layer to copy it in, so rank 0 holds the whole teacher at once
(bench/teacher_load_peak.py, a 1.1 B teacher in bf16 files on 2 ranks: rank 0 peaked at 5.34 GB,
against 2.73-2.80 GB here). Here each rank builds the model already partitioned (zero.Init, no
weight init), then reads from each checkpoint file only the elements of its own partition of each
tensor and copies them into that partition: no gather, no collective, and at any moment a rank
holds its share plus its part of the one tensor it is reading.

The modules, in the order a load runs through them:
- `files`: which files of a checkpoint directory hold the weights, as transformers finds them;
- `readers`: element ranges of one tensor read out of a safetensors or `.bin` file;
- `plan`: which checkpoint tensor goes into which parameter, by transformers' own renamings and
  converters;
- `check`: the plan matched to a model built on the meta device, before anything is loaded
  (`check_checkpoint`);
- `load`: the teacher built partitioned and each rank's partitions copied in (`build_teacher_model`);
- `fit`: whether the teacher's shards fit where they land, and its NVMe swap sized
  (`check_teacher_fits`, `nvme_swap_config`).
"""

from vkd_ds.teacher_load.check import TeacherShape, check_checkpoint
from vkd_ds.teacher_load.files import (
    BIN_FILE,
    BIN_INDEX_FILE,
    INDEX_FILE,
    NO_WEIGHTS,
    SINGLE_FILE,
    checkpoint_files,
    safetensors_files,
)
from vkd_ds.teacher_load.fit import NVME_BUFFERS, FitEstimate, check_teacher_fits, estimate_fit, nvme_swap_config
from vkd_ds.teacher_load.load import build_teacher_model, load_partitioned
from vkd_ds.teacher_load.readers import SafetensorsReader, TorchBinReader, open_checkpoint

__all__ = [
    "BIN_FILE",
    "BIN_INDEX_FILE",
    "INDEX_FILE",
    "NO_WEIGHTS",
    "NVME_BUFFERS",
    "SINGLE_FILE",
    "FitEstimate",
    "SafetensorsReader",
    "TeacherShape",
    "TorchBinReader",
    "build_teacher_model",
    "check_checkpoint",
    "check_teacher_fits",
    "checkpoint_files",
    "estimate_fit",
    "load_partitioned",
    "nvme_swap_config",
    "open_checkpoint",
    "safetensors_files",
]
