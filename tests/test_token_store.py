"""The token store: every token a target once, the inputs users have, reuse by fingerprint, a killed
preparation, waiting ranks, mixtures, and the bad inputs (real files, real tokenizer, real processes)."""

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import REPO, base_overrides, cpu_env
from tests.conftest import vkd_cli_in_process as cli
from vkd_ds.corpus import load_examples, resolve_sources
from vkd_ds.data import GlobalBatchSampler, windows
from vkd_ds.errors import VkdError
from vkd_ds.models import load_tokenizer
from vkd_ds.token_store import MANIFEST, open_split, prepare_store


@pytest.fixture(scope="module")
def tokenizer(tiny_assets):
    return load_tokenizer(str(tiny_assets / "tokenizer"))


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def rows_of(value, tokenizer, max_seq_len, store_dir, **kw):
    return open_split(value, "data.train_path", tokenizer, max_seq_len, str(store_dir), **kw)


@pytest.mark.parametrize("length, max_seq_len", [(2, 2), (16, 16), (17, 16), (100, 16), (31, 16), (1000, 7)])
def test_windows_make_every_token_but_the_first_a_target_exactly_once(length, max_seq_len):
    spans = windows(length, max_seq_len)
    targets = [t for a, b in spans for t in range(a + 1, b)]  # a window's first token is its context
    assert sorted(targets) == list(range(1, length))
    assert all(2 <= b - a <= max_seq_len for a, b in spans)
    assert all(spans[j + 1][0] == spans[j][1] - 1 for j in range(len(spans) - 1))  # one token of overlap


def test_a_long_document_in_the_store_is_every_token_once(tokenizer, tmp_path):
    """A document many rows long, with per-token valence: counted over the store's rows, each of its
    tokens after BOS is a target exactly once, and each target keeps its own id and label."""
    text = " ".join(f"The list type {i} is mutable, the tuple is not." for i in range(120))
    body = tokenizer.encode(text, add_special_tokens=False)
    labels = [round((i % 10) / 10, 1) for i in range(len(body))]
    path = write_jsonl(tmp_path / "long.jsonl", [{"text": text, "valence": labels}, {"text": "The list"}])
    rows = rows_of(str(path), tokenizer, 24, tmp_path / "stores")
    document = [tokenizer.bos_token_id, *body]
    assert len(document) > 10 * 24
    seen = np.zeros(len(document), dtype=int)
    position = 0
    for ex in rows:
        if not ex.source.startswith(f"{path}:1"):
            continue
        # The row's tokens are the document's from where the previous row ended (one token back).
        start = 0 if position == 0 else position - 1
        assert ex.input_ids == document[start : start + len(ex.input_ids)]
        assert ex.valence == [float(np.float32(v)) for v in ([labels[0]] + labels)[start : start + len(ex.input_ids)]]
        for t, target in enumerate(ex.loss_mask):
            seen[start + t] += target
        position = start + len(ex.input_ids)
    assert position == len(document)
    assert seen[0] == 0 and (seen[1:] == 1).all()
    counts = rows.manifest["counts"]
    assert counts["targets"] == len(document) - 1 + len(tokenizer.encode("The list", add_special_tokens=False))
    assert counts["windowed_records"] == 1 and rows.notes() == []


def test_the_store_is_found_again_and_a_changed_input_makes_a_new_one(tokenizer, tiny_assets, tmp_path):
    data = tmp_path / "train.jsonl"
    data.write_bytes((tiny_assets / "train.jsonl").read_bytes())
    first = rows_of(str(data), tokenizer, 48, tmp_path / "stores")
    stamp = (first.folder / "tokens.bin").stat().st_mtime_ns
    again = rows_of(str(data), tokenizer, 48, tmp_path / "stores")
    assert again.folder == first.folder and (again.folder / "tokens.bin").stat().st_mtime_ns == stamp
    assert [ex.input_ids for ex in again] == [ex.input_ids for ex in load_examples(data, tokenizer, 48)]
    # Another max_seq_len, or the same file edited, is another store.
    assert rows_of(str(data), tokenizer, 32, tmp_path / "stores").folder != first.folder
    with data.open("a") as handle:
        handle.write(json.dumps({"text": "The list type, appended."}) + "\n")
    changed = rows_of(str(data), tokenizer, 48, tmp_path / "stores")
    assert changed.folder != first.folder and len(changed) == len(first) + 1


def test_parquet_arrow_directories_text_globs_and_lists_read_as_jsonl_does(tokenizer, tmp_path):
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    texts = [f"The list type number {i} holds items." * (1 + i % 4) for i in range(40)]
    pairs = [{"prompt": f"Question {i}:", "completion": f" answer {i}.", "valence": 0.25} for i in range(10)]
    write_jsonl(tmp_path / "texts.jsonl", [{"text": t} for t in texts])
    pq.write_table(pa.table({"text": texts, "other": list(range(40))}), tmp_path / "texts.parquet", row_group_size=7)
    datasets.Dataset.from_list(pairs).save_to_disk(str(tmp_path / "pairs_arrow"))
    write_jsonl(tmp_path / "pairs.jsonl", pairs)
    (tmp_path / "docs").mkdir()
    for i, text in enumerate(texts[:5]):
        (tmp_path / "docs" / f"doc{i}.txt").write_text(text)
    store = tmp_path / "stores"

    def ids(value):
        return [(ex.input_ids, ex.loss_mask, ex.valence, ex.prompt_len) for ex in rows_of(value, tokenizer, 16, store)]

    assert ids(str(tmp_path / "texts.parquet")) == ids(str(tmp_path / "texts.jsonl"))
    assert ids(str(tmp_path / "pairs_arrow")) == ids(str(tmp_path / "pairs.jsonl"))
    assert ids(str(tmp_path / "docs" / "*.txt")) == ids(
        str(write_jsonl(tmp_path / "docs.jsonl", [{"text": t} for t in texts[:5]]))
    )
    both = rows_of([str(tmp_path / "texts.parquet"), str(tmp_path / "pairs_arrow")], tokenizer, 16, store)
    assert [(ex.input_ids, ex.loss_mask) for ex in both] == [
        (a, b) for a, b, _, _ in ids(str(tmp_path / "texts.jsonl"))
    ] + [(a, b) for a, b, _, _ in ids(str(tmp_path / "pairs.jsonl"))]
    assert both[0].source == f"{tmp_path / 'texts.parquet'}:1"
    assert rows_of(str(tmp_path / "docs" / "*.txt"), tokenizer, 16, store)[0].source == str(
        tmp_path / "docs" / "doc0.txt"
    )


def test_mixture_weights_set_each_sources_share_of_an_epoch(tokenizer, tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", [{"text": f"The list {i}"} for i in range(30)])
    b = write_jsonl(tmp_path / "b.jsonl", [{"text": f"The tuple {i}"} for i in range(10)])
    value = [{"path": str(a), "weight": 1.0}, {"path": str(b), "weight": 3.0}]
    rows = rows_of(value, tokenizer, 16, tmp_path / "stores")
    mixture = rows.mixture()
    assert mixture == [(0, 30, 1.0), (30, 40, 3.0)]
    sampler = GlobalBatchSampler(len(rows), 2, 1, 2, seed=5, mixture=mixture)
    assert sampler.num_examples == 40
    epoch = [sampler._index(p) for p in range(40)]
    from_b = [i for i in epoch if i >= 30]
    assert len(from_b) == 30 and sorted(set(from_b)) == list(range(30, 40))  # b's 10 rows, 3 times each
    assert len(set(i for i in epoch if i < 30)) == 10  # a's share: 10 different rows of its 30
    again = GlobalBatchSampler(len(rows), 2, 1, 2, seed=5, mixture=mixture)
    assert [again._index(p) for p in range(200)] == [sampler._index(p) for p in range(200)]  # resumable
    assert "mixture" in rows.summary("train")
    with pytest.raises(VkdError, match="give every input a weight, or none"):
        resolve_sources([{"path": str(a), "weight": 1}, str(b)], "data.train_path")
    with pytest.raises(VkdError, match=r"data.train_path\[0\].weight` must be a number > 0"):
        resolve_sources([{"path": str(a), "weight": 0}], "data.train_path")


def big_corpus(path: Path, records: int, seed: int = 0) -> Path:
    rng = random.Random(seed)
    words = "the list type tuple dict set mutable object class method value returns".split()
    with path.open("w") as handle:
        for _ in range(records):
            handle.write(json.dumps({"text": " ".join(rng.choice(words) for _ in range(rng.randint(20, 400)))}) + "\n")
    return path


def prepare_data_command(tiny_assets, data: Path, store_dir: Path) -> list[str]:
    return [
        sys.executable,
        "-m",
        "vkd_ds.cli",
        "prepare-data",
        f"data.tokenizer_path={tiny_assets / 'tokenizer'}",
        f"data.train_path={data}",
        "data.max_seq_len=64",
        f"data.store_dir={store_dir}",
    ]


def test_a_killed_preparation_leaves_no_store_and_reruns_to_the_same_bytes(tiny_assets, tmp_path):
    data = big_corpus(tmp_path / "big.jsonl", 15_000)
    clean = subprocess.run(
        prepare_data_command(tiny_assets, data, tmp_path / "clean"), env=cpu_env(), capture_output=True, text=True
    )
    assert clean.returncode == 0, clean.stderr
    (reference,) = [p for p in (tmp_path / "clean").iterdir()]
    killed = tmp_path / "killed"
    rng = random.Random(7)
    for _ in range(2):
        job = subprocess.Popen(
            prepare_data_command(tiny_assets, data, killed), env=cpu_env(), stderr=subprocess.PIPE, text=True
        )
        # Kill it while it tokenizes (after its first progress line), at a random moment.
        assert "vkd-ds data:" in job.stderr.readline()
        time.sleep(rng.uniform(0.0, 1.0))
        job.send_signal(signal.SIGKILL)
        job.wait()
        assert not list(killed.glob(f"*/{MANIFEST}"))  # nothing that looks complete
        assert list(killed.glob(".*.partial-*"))  # what it had written stays aside
    rerun = subprocess.run(prepare_data_command(tiny_assets, data, killed), env=cpu_env(), capture_output=True)
    assert rerun.returncode == 0
    assert not list(killed.glob(".*.partial-*"))  # the dead preparations' leftovers are removed
    store = killed / reference.name
    assert sorted(p.name for p in store.iterdir()) == sorted(p.name for p in reference.iterdir())
    for file in reference.iterdir():
        assert (store / file.name).read_bytes() == file.read_bytes(), file.name


def test_ranks_wait_for_rank_zeros_preparation_and_give_up_without_one(tiny_assets, tmp_path, monkeypatch, tokenizer):
    data = big_corpus(tmp_path / "big.jsonl", 8_000)
    writer = subprocess.Popen(
        prepare_data_command(tiny_assets, data, tmp_path / "stores"),
        env=cpu_env(),
        stderr=subprocess.DEVNULL,
    )
    try:
        sources = resolve_sources(str(data), "data.train_path")
        folder = prepare_store(tmp_path / "stores", sources, tokenizer, 64, wait=True)
        assert (folder / MANIFEST).is_file() and writer.wait(60) == 0
    finally:
        writer.kill()
    monkeypatch.setattr("vkd_ds.token_store.writer.WAIT_FOR_WRITER_S", 1.0)
    with pytest.raises(VkdError, match="did not appear within 1 s .* a filesystem every node shares"):
        prepare_store(tmp_path / "elsewhere", sources, tokenizer, 64, wait=True)


# ---- bad inputs: one line, exit 2, nothing written that looks complete -----------------------------


def refused(tiny_assets, tmp_path, *overrides, store_dir=None) -> str:
    run_dir = tmp_path / "run"
    stores = store_dir or tmp_path / "stores"
    result = cli(["train", *base_overrides(tiny_assets, run_dir), f"data.store_dir={stores}", *overrides])
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("vkd-ds: error:")]
    assert len(lines) == 1, result.stderr
    assert not run_dir.exists()
    if store_dir is None:
        assert not list(stores.glob(f"*/{MANIFEST}"))
    return lines[0]


def test_a_parquet_file_without_a_text_column_is_refused(tiny_assets, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"content": ["The list"], "id": [1]}), tmp_path / "bad.parquet")
    line = refused(tiny_assets, tmp_path, f"data.train_path={tmp_path / 'bad.parquet'}")
    want = 'bad.parquet: no "text" column, nor "prompt" + "completion", nor "messages" (its columns: content, id)'
    assert want in line


def test_a_glob_that_matches_nothing_is_refused(tiny_assets, tmp_path):
    line = refused(tiny_assets, tmp_path, f"data.train_path={tmp_path}/nothing/*.jsonl")
    assert "config key `data.train_path`: the glob" in line and "matches no file" in line


def test_a_store_prepared_with_another_tokenizer_or_truncated_is_refused(tiny_assets, tmp_path):
    from vkd_ds.assets import pydoc_records, train_tokenizer

    other = tmp_path / "other_tokenizer"
    train_tokenizer(pydoc_records(300)[:50], 384, other)
    prepared = subprocess.run(
        [
            sys.executable,
            "-m",
            "vkd_ds.cli",
            "prepare-data",
            f"data.tokenizer_path={other}",
            f"data.train_path={tiny_assets / 'train.jsonl'}",
            "data.max_seq_len=48",
            f"data.store_dir={tmp_path / 'prepared'}",
        ],
        cwd=REPO,
        env=cpu_env(),
        capture_output=True,
        text=True,
    )
    assert prepared.returncode == 0, prepared.stderr
    (store,) = (tmp_path / "prepared").iterdir()
    assert f"token store {store}" in prepared.stdout
    line = refused(tiny_assets, tmp_path, f"data.train_path={store}")
    assert f"the token store {store} was prepared with another tokenizer than data.tokenizer_path" in line

    # The same store made with the run's tokenizer trains; cut short, it is refused.
    rows = rows_of(
        str(tiny_assets / "train.jsonl"), load_tokenizer(str(tiny_assets / "tokenizer")), 48, tmp_path / "p2"
    )
    tokens = rows.folder / "tokens.bin"
    size = tokens.stat().st_size
    os.truncate(tokens, size - 10)
    line = refused(tiny_assets, tmp_path, f"data.train_path={rows.folder}")
    assert f"the token store {rows.folder} is damaged: tokens.bin holds {size - 10:,} bytes" in line
    # And a store found by fingerprint under data.store_dir is checked the same way.
    line = refused(tiny_assets, tmp_path, store_dir=tmp_path / "p2")
    assert "is damaged: tokens.bin" in line


@pytest.mark.distributed
def test_a_two_rank_run_on_a_weighted_mixture_of_parquet_and_jsonl(tiny_assets, tmp_path):
    """The mixture reaches the trainer's sampler: logged at start, trained on both inputs' rows."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from tests.conftest import train_job
    from vkd_ds.metrics import read_metrics

    texts = [json.loads(line)["text"] for line in (tiny_assets / "train.jsonl").read_text().splitlines()]
    pq.write_table(pa.table({"text": texts[:60]}), tmp_path / "part.parquet")
    write_jsonl(tmp_path / "rest.jsonl", [{"text": t} for t in texts[60:]])
    part, rest = tmp_path / "part.parquet", tmp_path / "rest.jsonl"
    mixture = f"data.train_path=[{{path: {part}, weight: 3}}, {{path: {rest}, weight: 1}}]"
    run_dir = tmp_path / "run"
    result = train_job([*base_overrides(tiny_assets, run_dir), mixture, "trainer.max_steps=3"])
    assert f"mixture {part} 0.75, {rest} 0.25" in result.stderr
    assert [r["step"] for r in read_metrics(run_dir / "metrics.csv")] == ["1", "2", "3"]


@pytest.mark.distributed
def test_resuming_on_edited_data_says_so(tiny_assets, tmp_path):
    """The checkpoint records its training store: a resume whose data file changed since (another
    store) trains on, and warns that its rows are not the interrupted run's."""
    from tests.conftest import train_job

    data = tmp_path / "train.jsonl"
    data.write_bytes((tiny_assets / "train.jsonl").read_bytes())
    run_dir = tmp_path / "run"
    overrides = [*base_overrides(tiny_assets, run_dir), f"data.train_path={data}", "trainer.save_every=2"]
    first = train_job([*overrides, "trainer.max_steps=2"])
    assert "resuming on other training data" not in first.stderr
    same = train_job([*overrides, "trainer.max_steps=3"])
    assert "resumed from" in same.stderr and "resuming on other training data" not in same.stderr
    with data.open("a") as handle:
        handle.write(json.dumps({"text": "The list type, appended after the checkpoint."}) + "\n")
    edited = train_job([*overrides, "trainer.max_steps=4"])
    assert "resuming on other training data than the checkpoint's" in edited.stderr
    assert "resuming with other packing" not in edited.stderr  # the tiny rows pack (data.packing=auto)
    unpacked = train_job([*overrides, "trainer.max_steps=5", "data.packing=false"])
    assert "resuming with other packing than the checkpoint's (unpacked now, rows of 48 tokens packed then)" in (
        unpacked.stderr
    )


def test_a_store_of_another_format_is_refused_with_what_to_do(tokenizer, tmp_path):
    """A store an older vkd-ds wrote (another format line), named directly: one line saying so."""
    import shutil

    source = write_jsonl(tmp_path / "a.jsonl", [{"text": "The list type."}])
    rows = open_split(str(source), "data.train_path", tokenizer, 64, str(tmp_path / "stores"))
    old = tmp_path / "old_store"
    shutil.copytree(rows.folder, old)
    manifest = json.loads((old / MANIFEST).read_text())
    manifest["format"] = "vkd-ds token store v1"
    (old / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(VkdError, match="was prepared by another vkd-ds .'vkd-ds token store v1'"):
        open_split(str(old), "data.train_path", tokenizer, 64, None)
