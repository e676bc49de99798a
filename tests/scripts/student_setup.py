"""What the test scripts share: parse `OUT HYDRA_OVERRIDES...` past the launcher's --local_rank,
join the process group and build the student engine of that config."""

import sys
from pathlib import Path

from vkd_ds.launch import strip_local_rank


def student_engine(seed: int):
    """(output path, settings, prepared inputs, student engine) of this rank."""
    args = strip_local_rank(sys.argv[1:])
    from vkd_ds import dist, engines
    from vkd_ds.builders.inputs import prepare
    from vkd_ds.builders.student import build_student
    from vkd_ds.config import compose
    from vkd_ds.ds_config import student_ds_config, student_lr_schedule

    prepared = prepare(compose(args[1:]))
    settings = prepared.settings
    dist.init()
    ds_config = student_ds_config(settings, dist.world_size(), on_gpu=False)
    engine, _, _ = engines.build_student_engine(
        build_student(settings, prepared, ds_config, seed=seed), ds_config, student_lr_schedule(settings, ds_config)
    )
    return Path(args[0]), settings, prepared, engine
