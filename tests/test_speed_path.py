"""What makes a step fast on a GPU, checked where there is none: the host reads the device once per
optimizer step (the rank-agreed commit), the layout fits the models to the memory, and the LM head
multiplies in bf16 where the math allows."""

import json

import pytest

from tests.conftest import FULL_OBJECTIVE, base_overrides, deepspeed_launch, save_tiny_model, train_job
from vkd_ds.metrics import read_metrics

pytestmark = pytest.mark.distributed

# The mercy gate armed from the first step (proxy mode reads the step's valence at the commit),
# valence weights on (a global gather of saliencies), every term but sequence KD, 2 micro-steps.
GATED = ["gate.enabled=true", "gate.warmup_steps=0", "gate.arm_mse=1.0", "gate.baseline_every=0"]
LAYOUTS = {
    "zero0-rows": ["deepspeed=zero0", "data.packing=false"],
    "zero3-packed-fused-head": ["deepspeed=zero3", "data.packing=true", "data.pack_length=96", "loss.fused_head=true"],
}


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_a_training_step_reads_the_device_once(layout, tiny_assets, tmp_path):
    """tests/scripts/host_syncs.py counts every read of a tensor into the host (`item`, `tolist`,
    float/int/bool of a tensor, `numpy`, `nonzero`, a boolean index) made by vkd-ds code inside a
    training step, on each of 2 ranks. Step 1 refreshes the gate's baseline (the teacher generates);
    every later step reads once: the all-gather that decides the commit and carries the metrics.
    DeepSpeed's own reads inside engine.step() (torch's AdamW step counters on a CPU) are not ours."""
    out = tmp_path / "counts"
    out.mkdir()
    overrides = base_overrides(tiny_assets, tmp_path / "run") + GATED + LAYOUTS[layout]
    overrides += ["trainer.max_steps=4", "trainer.grad_accum=2", "trainer.micro_batch_size=2"]
    result = deepspeed_launch(["tests/scripts/host_syncs.py", str(out), *overrides], 2)
    assert result.returncode == 0, result.stderr[-3000:]
    for rank in (0, 1):
        steps = json.loads((out / f"rank_{rank}.json").read_text())
        assert len(steps) == 4
        for number, sites in enumerate(steps[1:], start=2):
            ours = {site: n for site, n in sites.items() if not site.startswith("library via")}
            assert sum(ours.values()) == 1, (rank, number, ours)
            (site,) = ours
            assert site.startswith("dist.py") and site.endswith(" tolist"), site  # dist.read_once


# ---- the layout ---------------------------------------------------------------------------------

GIB = 2**30
DEMO_STUDENT, DEMO_TEACHER = 700_000, 2_700_000  # about the demo's models (README "What the demo does")


def planned(overrides: list[str], world: int, free_gib: float, bf16: bool = False, student=DEMO_STUDENT, **kw):
    from vkd_ds.config import compose
    from vkd_ds.layout import plan_layout
    from vkd_ds.settings import Settings

    base = ["teacher.path=/t", "data.train_path=/d.jsonl", "loss.val=0", "weighting.lam=0", "gate.enabled=false"]
    s = Settings.from_config(compose([*base, *overrides]))
    return plan_layout(s, student, kw.pop("teacher", DEMO_TEACHER), world, bf16, int(free_gib * GIB), **kw)


def test_auto_trains_a_student_that_fits_without_zero3_beside_a_replicated_teacher():
    one, two = planned([], 1, 12.0), planned([], 2, 12.0)
    assert (one.student_stage, one.teacher, one.teacher_offload) == (0, "replicated", "none")
    assert (two.student_stage, two.teacher, two.teacher_offload) == (2, "replicated", "none")
    # bf16 on one rank with micro-steps: ZeRO-1, which accumulates them in fp32 (ZeRO-0 would in bf16).
    assert planned(["trainer.grad_accum=2"], 1, 12.0, bf16=True).student_stage == 1


def test_auto_shards_what_does_not_fit_teacher_first():
    # A 1 B student (bf16: 20 bytes a parameter on one rank, 4 + 16/8 on eight under ZeRO-2) and an 8 B
    # teacher (16 GB in bf16) on 80 GB devices: the student fits on ZeRO-2, the teacher whole beside it.
    big = dict(student=10**9, teacher=8 * 10**9)
    fits = planned([], 8, 78.0, bf16=True, **big)
    assert (fits.student_stage, fits.teacher) == (2, "replicated")
    # 24 GB devices: half of it (12 GB) holds the student's 6 GB but not the teacher's 16 GB whole; its
    # eighth (2 GB) fits on the device.
    small = planned([], 8, 24.0, bf16=True, **big)
    assert (small.student_stage, small.teacher, small.teacher_offload) == (2, "zero3", "none")
    # 14 GB: the teacher's shards go to host memory; 8 GB: the student goes to ZeRO-3 (20 / 8 bytes a
    # parameter) too.
    offloaded = planned([], 8, 14.0, bf16=True, **big)
    assert (offloaded.student_stage, offloaded.teacher, offloaded.teacher_offload) == (2, "zero3", "cpu")
    tiny = planned([], 8, 8.0, bf16=True, **big)
    assert (tiny.student_stage, tiny.teacher, tiny.teacher_offload) == (3, "zero3", "cpu")
    assert "more than" not in tiny.reason
    smallest = planned([], 8, 1.0, bf16=True, **big)
    assert (smallest.student_stage, smallest.teacher, smallest.teacher_offload) == (3, "zero3", "cpu")
    assert "more than the 50%" in smallest.reason  # nothing fits: the most sharded, and said so


def test_explicit_keys_are_kept_and_auto_decides_around_them():
    assert planned(["deepspeed=zero3"], 2, 12.0).student_stage == 3
    assert planned(["deepspeed.zero_stage=1"], 2, 12.0).student_stage == 1
    kept = planned(["teacher.layout=zero3"], 2, 12.0)
    assert (kept.student_stage, kept.teacher, kept.teacher_offload) == (2, "zero3", "none")
    offloaded = planned(["teacher.offload_param=cpu"], 2, 12.0)  # an explicit offload: a ZeRO-3 teacher
    assert (offloaded.teacher, offloaded.teacher_offload) == ("zero3", "cpu")
    assert planned(["deepspeed.offload_optimizer=cpu"], 1, 12.0).student_stage == 1
    # A resumed checkpoint's stage: DeepSpeed loads it only into the stage that wrote it.
    assert planned([], 2, 12.0, resumed_stage=3).student_stage == 3


def test_a_replicated_teacher_cannot_be_offloaded():
    from vkd_ds.config import compose
    from vkd_ds.errors import VkdError
    from vkd_ds.settings import Settings

    with pytest.raises(VkdError, match="teacher.layout=replicated keeps the whole teacher"):
        Settings.from_config(compose(["teacher.path=/t", "teacher.layout=replicated", "teacher.offload_param=cpu"]))


AUTO = ["deepspeed=auto", "teacher.layout=auto", "teacher.offload_param=auto"]


def test_the_planned_layout_trains_as_zero3_does_and_shards_when_told_the_device_is_small(tiny_assets, tmp_path):
    """2 ranks, every term (sequence KD's rollouts, attention maps, valence weights) and the proxy gate:
    `auto` puts the student on ZeRO-2 and the teacher whole on each rank, and trains as both models on
    ZeRO-3 do, step for step. Told a rank has 1 MB (deepspeed.memory_per_rank_gb), it shards both."""
    student = save_tiny_model(tmp_path / "student")  # a fresh init under zero.Init draws differently
    common = FULL_OBJECTIVE + GATED + ["trainer.max_steps=3", "trainer.micro_batch_size=2", "trainer.eval_every=0"]
    common.append(f"student.path={student}")
    runs = {}
    for name, layout in (("zero3", []), ("auto", AUTO), ("small", [*AUTO, "deepspeed.memory_per_rank_gb=0.001"])):
        run_dir = tmp_path / name
        train_job(base_overrides(tiny_assets, run_dir) + common + layout)
        log = (run_dir / "train.log").read_text()
        runs[name] = (log, [float(row["loss"]) for row in read_metrics(run_dir / "metrics.csv")])
    assert (
        "layout: student ZeRO-3, teacher ZeRO-3, its shards offloaded to cpu (student: deepspeed.zero_stage"
        in (runs["zero3"][0])
    )
    assert "layout: student ZeRO-2, teacher replicated on every rank (the models' states take" in runs["auto"][0]
    assert "teacher: " in runs["auto"][0] and "held by rank 0 (replicated)" in runs["auto"][0]
    assert "layout: student ZeRO-3, teacher ZeRO-3, its shards offloaded to cpu (the models' states" in runs["small"][0]
    assert "attention: sdpa (student), sdpa (teacher)" not in runs["auto"][0]  # feat.attention reads eager maps
    assert "attention: eager (student), eager (teacher)" in runs["auto"][0]
    zero3, auto, small = (runs[name][1] for name in ("zero3", "auto", "small"))
    assert len(auto) == 3
    assert auto == pytest.approx(zero3, rel=1e-5) and small == pytest.approx(zero3, rel=1e-5)


def test_nvme_optimizer_offload_keeps_the_student_on_zero3():
    """DeepSpeed swaps optimizer state to NVMe only under ZeRO-3 (ZeRO-1/2 would keep it in memory)."""
    nvme = ["deepspeed.offload_optimizer=nvme", "deepspeed.nvme_path=/tmp"]
    assert planned(nvme, 1, 12.0).student_stage == 3 and planned(nvme, 4, 12.0).student_stage == 3


def test_a_resumed_checkpoint_tells_its_stage(tmp_path):  # what deepspeed.zero_stage=auto resumes on
    """Recorded in COMPLETE since layouts are planned; before, the run's config.yaml said it, or only
    ZeRO-3's per-rank model-states files; a checkpoint that tells nothing is refused with what to set."""
    from vkd_ds.builders.start import resumed_stage as written_stage
    from vkd_ds.errors import VkdError

    step = tmp_path / "run" / "checkpoints" / "step_0000004"
    step.mkdir(parents=True)
    assert written_stage(step, {"zero_stage": 2}) == 2
    with pytest.raises(VkdError, match="set deepspeed.zero_stage to the stage it was trained with"):
        written_stage(step, {})
    (step / "zero_pp_rank_1_mp_rank_00_model_states.pt").write_bytes(b"")
    assert written_stage(step, {}) == 3
    (tmp_path / "run" / "config.yaml").write_text("deepspeed:\n  zero_stage: 1\n")
    assert written_stage(step, {}) == 1
