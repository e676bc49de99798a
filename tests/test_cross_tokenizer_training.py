"""Distillation across tokenizers in real 2-rank DeepSpeed jobs (issue #34): a teacher with its own
byte-level BPE tokenizer (other merges, digits split), the student on the data's tokenizer."""

from __future__ import annotations

import math

import pytest

from tests.conftest import base_overrides, deepspeed_launch, save_tiny_model, train_job
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


@pytest.fixture(scope="module")
def sentencepiece_teacher(tmp_path_factory):
    """(teacher dir, tokenizer dir): a tokenizer with SentencePiece's conventions ("▁", a dummy prefix,
    byte fallback; as Llama 2's, Mistral's, Gemma's), and a teacher for it."""
    from vkd_ds.assets import pydoc_records, train_tokenizer

    root = tmp_path_factory.mktemp("sentencepiece_teacher")
    tokenizer = train_tokenizer(pydoc_records(300)[:240], 400, root / "tokenizer", sentencepiece=True)
    teacher = save_tiny_model(root / "teacher", vocab_size=len(tokenizer), hidden_size=48, num_hidden_layers=3)
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


@pytest.mark.distributed
def test_a_teacher_with_its_own_tokenizer_distills_on_two_zero3_ranks_and_resumes_exactly(
    tiny_assets, tmp_path, other_teacher
):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    result = train_job(_across(tiny_assets, straight, other_teacher))
    rows = read_metrics(straight / "metrics.csv")
    soft = [float(r["loss/soft"]) for r in rows]
    assert len(soft) == 4 and all(math.isfinite(v) and v > 0 for v in soft), soft
    # Aligned pairs sit at group ends only: some target positions, not all; every row here is text.
    assert all(0 < float(r["paired_share"]) < 1 and float(r["unaligned_rows"]) == 0 for r in rows)
    assert rows[-1]["eval/ce"] != "" and rows[-1].get("eval/kl_teacher", "") == ""  # no position pairs in eval
    assert "teacher tokenizer: " in result.stderr and "soft term across tokenizers: projected" in result.stderr
    train_job(_across(tiny_assets, resumed, other_teacher, "trainer.stop_after_steps=2"))
    train_job(_across(tiny_assets, resumed, other_teacher))
    assert losses(resumed) == losses(straight)
    # ULD pairs positions by index, aligned compares shared tokens and sorts the rest: other soft terms
    # from the same first step.
    for pairing in ("positional_uld", "aligned"):
        run = tmp_path / pairing
        train_job(_across(tiny_assets, run, other_teacher, f"loss.cross_tokenizer={pairing}", "trainer.max_steps=1"))
        first = read_metrics(run / "metrics.csv")[0]
        assert first["loss/ce"] == rows[0]["loss/ce"] and first["loss/soft"] != rows[0]["loss/soft"]
        if pairing == "aligned":  # at the projected term's positions: the groups' ends
            assert first["paired_share"] == rows[0]["paired_share"]
        assert math.isfinite(float(first["loss/soft"])) and float(first["loss/soft"]) > 0


@pytest.mark.distributed
def test_a_cache_of_the_teacher_on_its_own_tokens_gives_the_live_teachers_losses(tiny_assets, tmp_path, other_teacher):
    """`vkd-ds cache-teacher` across tokenizers on 2 ranks stores every teacher token of each record;
    a run on it (no teacher loaded) aligns them at training: at k = V_T, fp32, its losses are the live
    teacher's within 1e-5. A cached run without the teacher's tokenizer is refused before it starts."""
    from tests.test_teacher_cache import run_cache_teacher

    cache_dir, steps = tmp_path / "cache", ["trainer.max_steps=3", "trainer.eval_every=3"]
    written = run_cache_teacher(
        [*_across(tiny_assets, tmp_path / "unused", other_teacher), f"cache.dir={cache_dir}", "cache.top_k=500"]
        + ["cache.precision=fp32"]
    )
    assert written.returncode == 0, written.stderr[-4000:]
    live = tmp_path / "live"
    train_job(_across(tiny_assets, live, other_teacher, *steps))
    on_cache = [f"teacher.cache={cache_dir}", "teacher.path=null", *steps]
    cached = tmp_path / "cached"
    train_job(_across(tiny_assets, cached, other_teacher, *on_cache))
    assert "teacher: not loaded" in (cached / "train.log").read_text()
    live_rows, cached_rows = read_metrics(live / "metrics.csv"), read_metrics(cached / "metrics.csv")
    assert len(live_rows) == 3 and float(live_rows[0]["loss/soft"]) > 0
    for live_row, cached_row in zip(live_rows, cached_rows, strict=True):
        for column in ("loss", "loss/ce", "loss/soft", "loss/reg", "eval/ce"):
            if column == "eval/ce" and live_row[column] == "":
                continue
            a, b = float(cached_row[column]), float(live_row[column])
            assert abs(a - b) <= 1e-5 * max(1.0, abs(b)), (live_row["step"], column, a, b)
    same_tokenizer = [*_across(tiny_assets, tmp_path / "refused", other_teacher, *on_cache)]
    same_tokenizer = [o for o in same_tokenizer if not o.startswith("teacher.tokenizer_path=")]
    refused = deepspeed_launch(["launcher/train.py", *same_tokenizer], 1)
    assert refused.returncode != 0 and "holds the teacher on its own tokens" in refused.stderr
    assert not (tmp_path / "refused").exists()


@pytest.mark.distributed
def test_projected_across_a_copy_of_the_data_tokenizer_is_same_tokenizer_kd(tiny_assets, tmp_path):
    """The whole cross-tokenizer path (re-tokenized rows, prefixed pairs, the carry table, the chunked
    term) across a copy of the data's tokenizer: the same losses as same-tokenizer soft KD, 2 ranks."""
    import shutil

    copy = tmp_path / "tokenizer_copy"
    shutil.copytree(tiny_assets / "tokenizer", copy)
    common = [*loss_overrides(ce=1.0, soft=1.0), "weighting.lam=0", "valence.teacher_head=null"]
    common += ["data.packing=false", "loss.temperature=2.0", "trainer.max_steps=2", "trainer.eval_every=0"]
    same, across = tmp_path / "same", tmp_path / "across"
    train_job([*base_overrides(tiny_assets, same), *common])
    projected = [f"teacher.tokenizer_path={copy}", "loss.cross_tokenizer=projected"]
    train_job([*base_overrides(tiny_assets, across), *common, *projected])
    for a, b in zip(read_metrics(same / "metrics.csv"), read_metrics(across / "metrics.csv"), strict=True):
        for column in ("loss", "loss/ce", "loss/soft"):
            assert abs(float(a[column]) - float(b[column])) <= 1e-5 * max(1.0, abs(float(a[column]))), column
    assert "soft term across tokenizers: projected" in (across / "train.log").read_text()


@pytest.mark.distributed
@pytest.mark.parametrize("pairing", ["aligned", "projected"])
def test_a_sentencepiece_teacher_distills_into_a_byte_level_student(
    tiny_assets, tmp_path, sentencepiece_teacher, pairing
):
    """A teacher whose tokenizer writes "▁" for a space and bytes as `<0xNN>` tokens, on 2 ranks: every row
    aligns (none left out), the soft term is reached at group ends and trains."""
    run = tmp_path / "run"
    train_job(
        _across(tiny_assets, run, sentencepiece_teacher, f"loss.cross_tokenizer={pairing}", "trainer.max_steps=2")
    )
    rows = read_metrics(run / "metrics.csv")
    assert all(math.isfinite(float(r["loss/soft"])) and float(r["loss/soft"]) > 0 for r in rows)
    assert all(0.3 < float(r["paired_share"]) < 1 and float(r["unaligned_rows"]) == 0 for r in rows), rows


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


@pytest.mark.distributed
def test_conversations_across_tokenizers_are_refused_before_anything_is_written(tiny_assets, tmp_path, other_teacher):
    """`messages` records across tokenizers: training and cache-teacher both refuse them in one line (the
    student's chat template is not the teacher's), and the run leaves no folder."""
    from transformers import AutoTokenizer

    from tests.test_chat import TINY_TEMPLATE, write_conversations
    from tests.test_teacher_cache import run_cache_teacher

    tok = AutoTokenizer.from_pretrained(tiny_assets / "tokenizer")
    tok.chat_template = TINY_TEMPLATE
    tok.save_pretrained(tmp_path / "tokenizer")
    write_conversations(tmp_path / "chat.jsonl", 24)
    chat = [f"data.train_path={tmp_path / 'chat.jsonl'}", f"data.tokenizer_path={tmp_path / 'tokenizer'}"]
    overrides = [*_across(tiny_assets, tmp_path / "run", other_teacher), *chat]
    message = 'data.train_path holds conversations ("messages" records), which distillation across tokenizers'
    refused = deepspeed_launch(["launcher/train.py", *overrides], 1)
    assert refused.returncode != 0 and message in refused.stderr, refused.stderr[-3000:]
    assert not (tmp_path / "run").exists()
    cached = run_cache_teacher([*overrides, f"cache.dir={tmp_path / 'cache'}"])
    assert cached.returncode != 0 and message in cached.stderr, cached.stderr[-3000:]
    assert not (tmp_path / "cache").exists()
