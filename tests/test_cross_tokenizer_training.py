"""Distillation across tokenizers in real 2-rank DeepSpeed jobs (issue #34): a teacher with its own
byte-level BPE tokenizer (other merges, digits split), the student on the data's tokenizer."""

from __future__ import annotations

import math

import pytest

from tests.conftest import base_overrides, save_tiny_model, train_job
from tests.test_distributed import losses
from vkd_ds.config import compose
from vkd_ds.errors import VkdError
from vkd_ds.metrics import read_metrics
from vkd_ds.settings import Settings
from vkd_ds.terms import loss_overrides


@pytest.fixture(scope="module")
def other_teacher(tmp_path_factory):
    """(teacher dir, tokenizer dir): a 500-token tokenizer splitting digits, and a teacher for it whose
    LM head is padded past the tokenizer."""
    from vkd_ds.assets import SPECIAL_TOKENS, pydoc_records, train_tokenizer

    root = tmp_path_factory.mktemp("other_teacher")
    tokenizer = train_tokenizer(pydoc_records(300)[:240], 500, root / "tokenizer", split_digits=True)
    assert tokenizer.bos_token == SPECIAL_TOKENS["bos_token"]
    teacher = save_tiny_model(root / "teacher", vocab_size=len(tokenizer) + 12, hidden_size=48, num_hidden_layers=3)
    return teacher, root / "tokenizer"


def _across(assets, run_dir, other_teacher, *extra: str) -> list[str]:
    teacher, tokenizer = other_teacher
    return [
        *base_overrides(assets, run_dir),
        f"teacher.path={teacher}",
        f"teacher.tokenizer_path={tokenizer}",
        "valence.teacher_head=null",
        *loss_overrides(ce=1.0, soft=1.0, reg=0.01),
        "weighting.lam=0",
        "data.packing=false",
        "loss.temperature=2.0",
        "trainer.max_steps=4",
        "trainer.save_every=2",
        "trainer.eval_every=2",
        *extra,
    ]


def test_a_teacher_with_its_own_tokenizer_distills_on_two_zero3_ranks_and_resumes_exactly(
    tiny_assets, tmp_path, other_teacher
):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    result = train_job(_across(tiny_assets, straight, other_teacher))
    rows = read_metrics(straight / "metrics.csv")
    soft = [float(r["loss/soft"]) for r in rows]
    assert len(soft) == 4 and all(math.isfinite(v) and v > 0 for v in soft), soft
    assert rows[-1]["eval/ce"] != "" and rows[-1].get("eval/kl_teacher", "") == ""  # no position pairs in eval
    assert "teacher tokenizer: " in result.stderr and "soft term across tokenizers: aligned" in result.stderr
    train_job(_across(tiny_assets, resumed, other_teacher, "trainer.stop_after_steps=2"))
    train_job(_across(tiny_assets, resumed, other_teacher))
    assert losses(resumed) == losses(straight)
    # ULD pairs positions by index: another soft term from the same first step.
    uld = tmp_path / "uld"
    train_job(_across(tiny_assets, uld, other_teacher, "loss.cross_tokenizer=positional_uld", "trainer.max_steps=1"))
    first = read_metrics(uld / "metrics.csv")[0]
    assert first["loss/ce"] == rows[0]["loss/ce"] and first["loss/soft"] != rows[0]["loss/soft"]


REQUIRED = ["teacher.path=/t", "data.train_path=/d.jsonl", "data.tokenizer_path=/s", "teacher.tokenizer_path=/t2"]


def test_what_does_not_work_across_tokenizers_yet_is_refused_in_one_line():
    with pytest.raises(VkdError) as refused:
        Settings.from_config(compose(REQUIRED))  # the defaults: feature KD, L_val, weights, the gate
    message = str(refused.value)
    assert "\n" not in message and "teacher.tokenizer_path differs from data.tokenizer_path" in message
    assert "loss.feat=0" in message and "loss.val=0" in message
    assert "weighting.lam=0" in message and "gate.enabled=false" in message
    plain = [*REQUIRED, *loss_overrides(ce=1.0, soft=0.8), "weighting.lam=0", "gate.enabled=false"]
    assert Settings.from_config(compose(plain)).cross_tokenizer
    with pytest.raises(VkdError, match="data.packing=false"):
        Settings.from_config(compose([*plain, "data.packing=true"]))
    same = [*plain[:3], "teacher.tokenizer_path=/s", *plain[4:]]
    assert not Settings.from_config(compose(same)).cross_tokenizer
