#!/usr/bin/env bash
# The GPU checks of issue #8 on one GPU, under 10 minutes: one JSON summary on stdout (see
# bench/gpu_check.py for what runs). Needs vkd-ds installed with a CUDA build of torch.
#   bash bench/gpu_check.sh [--out DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
python -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else "bench/gpu_check.sh: no GPU visible (python bench/gpu_check.py --smoke checks the script on a CPU)")'
exec python bench/gpu_check.py "$@"
