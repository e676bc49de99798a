"""`deepspeed launcher/train.py [hydra overrides]`: one process per device, one job.

Same as `vkd-ds train [overrides]`, which starts the launcher for you.
"""

import sys
from pathlib import Path

# Runnable from a checkout without installing the package.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from vkd_ds.launch import main  # noqa: E402

if __name__ == "__main__":
    main()
