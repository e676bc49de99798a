"""Packed rows (data.packing): the packing plan, packed batches, and the point of it all: a document's
losses, saliency and gradients are the same packed as alone in its row."""

import numpy as np
import pytest
import torch

from tests.conftest import base_overrides, train_job
from tests.multirank import run_ranks
from vkd_ds.assets import write_short_records
from vkd_ds.data import Example, collate_packed
from vkd_ds.metrics import read_metrics
from vkd_ds.packing import best_fit_decreasing
from vkd_ds.terms import TERM_NAMES, loss_overrides


def test_best_fit_decreasing_places_every_document_once_within_the_rows():
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 65, size=500)
    members, offsets = best_fit_decreasing(lengths, 64)
    assert sorted(members.tolist()) == list(range(500))
    rows = [members[offsets[j] : offsets[j + 1]] for j in range(len(offsets) - 1)]
    assert all(lengths[r].sum() <= 64 for r in rows)
    assert all(list(r) == sorted(r) for r in rows)  # a row's documents in their store order
    assert lengths.sum() / (len(rows) * 64) > 0.94  # uniform lengths: about half need a row of their own
    again = best_fit_decreasing(lengths, 64)
    assert (again[0] == members).all() and (again[1] == offsets).all()
    with pytest.raises(ValueError, match="does not fit"):
        best_fit_decreasing(np.array([65]), 64)


def test_a_packed_batch_restarts_positions_and_never_targets_a_document_start():
    docs = [
        Example([5, 6, 7], [0, 1, 1], "a", index=10),
        Example([8, 9], [1, 1], "b", index=11),  # a mask that starts with a target: not in a packed row
        Example([4, 4, 4, 4], [0, 0, 1, 1], "c", index=12),
    ]
    batch = collate_packed(docs, pad_id=0, rows=[2, 1])
    assert batch["input_ids"].tolist() == [[5, 6, 7, 8, 9], [4, 4, 4, 4, 0]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1], [0, 1, 2, 3, 0]]
    assert batch["sequence"].tolist() == [[0, 0, 0, 1, 1], [2, 2, 2, 2, -1]]
    assert batch["loss_mask"].int().tolist() == [[0, 1, 1, 0, 1], [0, 0, 1, 1, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1, 1], [1, 1, 1, 1, 0]]
    assert batch["row"].tolist() == [10, 11, 12]
    # Padding sits at position 0, however long the row: a packed row may exceed the model's context.
    short = collate_packed([docs[2], docs[1]], pad_id=0, rows=[1, 1])
    assert short["position_ids"].tolist() == [[0, 1, 2, 3], [0, 1, 0, 0]]


# Every term but L_seq, with the attention maps in L_feat and InfoNCE in L_reg (whose negatives are the
# batch's documents: the same set in both layouts), and valence weights far from uniform.
EVERY_TERM = [
    *loss_overrides(ce=1.0, soft=0.8, feat=0.4, val=0.6, reg=0.01),
    "feat.attention=0.5",
    "reg.contrastive=0.2",
    "reg.param_patterns=[*norm.weight]",
    "weighting.lam=6.0",
    "loss.chunk_tokens=64",
    "deepspeed=zero0",
]


def _layouts_compared(overrides: list[str], fused: bool) -> dict:
    """One process: real engines; the same documents unpacked (one per row), packed, and packed
    with positions that do not restart (attention then crosses documents); each layout's
    per-document terms, saliency and the gradient of the weighted loss."""
    from vkd_ds import engines
    from vkd_ds.builders.inputs import prepare
    from vkd_ds.builders.student import build_student
    from vkd_ds.config import compose
    from vkd_ds.data import collate
    from vkd_ds.ds_config import checked_deepspeed_configs
    from vkd_ds.losses import combine_terms, shift_for_next_token, weighted_batch_loss
    from vkd_ds.objective import Teacher
    from vkd_ds.sequences import Sequences, model_inputs
    from vkd_ds.valence import load_head, valence_weights

    prepared = prepare(compose([*overrides, f"loss.fused_head={str(fused).lower()}"]))
    s, obj = prepared.settings, prepared.objective
    ds_config, teacher_ds = checked_deepspeed_configs(s, 1, False)
    head = load_head(s.valence.teacher_head, int(s.valence.k), prepared.teacher_width)
    teacher = Teacher(engines.build_teacher_engine(s.teacher.path, teacher_ds, True), obj, head)
    engine, _, _ = engines.build_student_engine(build_student(s, prepared, ds_config, 0), ds_config)
    docs = [prepared.train_data[i] for i in range(24)]
    members, offsets = best_fit_decreasing(np.array([len(d.input_ids) for d in docs]), int(s.data.max_seq_len))
    docs = [docs[i] for i in members]  # the packed order, for both layouts
    rows = np.diff(offsets).tolist()
    pad = prepared.tokenizer.pad_token_id
    packed = collate_packed(docs, pad, rows)
    crossing = {**packed, "position_ids": torch.arange(packed["input_ids"].shape[1]).expand_as(packed["input_ids"])}
    params = [p for p in engine.module.parameters() if p.requires_grad]
    out = {"rows": rows, "first_in_row": (np.concatenate([[0], np.cumsum(rows)[:-1]])).tolist()}
    for name, batch in (("unpacked", collate(docs, pad)), ("packed", packed), ("crossing", crossing)):
        teacher_out = teacher.on_batch(batch)
        student_out = engine(**model_inputs(batch), **obj.train_inputs(batch, teacher_out))
        terms, mask = obj.terms(student_out, teacher_out, batch)
        sequences = Sequences.of_batch(batch)
        saliency = obj.saliency(teacher_out, mask, sequences)
        w = valence_weights(saliency, obj.lam, obj.z_max, obj.normalize, obj.eps, valid=sequences.any(mask))
        loss = weighted_batch_loss(combine_terms(terms, obj.lambdas), w, w.sum())
        engine.backward(loss)
        grads = [p.grad.clone() for p in params]
        engine.zero_grad()
        out[name] = {
            "terms": {k: v.detach() for k, v in terms.items()},
            "saliency": saliency,
            "weights": w,
            "grads": [g.detach() for g in grads],
            "targets": int(shift_for_next_token(batch["input_ids"], batch["loss_mask"])[1].sum()),
        }
    return out


@pytest.fixture(scope="module")
def short_records(tiny_assets, tmp_path_factory):
    path = tmp_path_factory.mktemp("short") / "short.jsonl"
    write_short_records(path, tiny_assets / "train.jsonl", 400)
    return path


@pytest.mark.parametrize("fused", [False, True], ids=["logits", "fused_head"])
def test_packed_documents_have_the_losses_and_gradients_of_unpacked_ones(fused, tiny_assets, short_records, tmp_path):
    overrides = [
        *base_overrides(tiny_assets, tmp_path / "run"),
        f"data.train_path={short_records}",
        "data.max_seq_len=128",
        *EVERY_TERM,
    ]
    (result,) = run_ranks(_layouts_compared, 1, overrides, fused, timeout=300)
    unpacked, packed, crossing = result["unpacked"], result["packed"], result["crossing"]
    assert len(result["rows"]) < 24 / 2  # several documents per row
    assert packed["targets"] == unpacked["targets"]
    assert set(packed["terms"]) == set(TERM_NAMES) - {"seq"}
    for name, value in unpacked["terms"].items():
        assert value.shape == (24,)
        torch.testing.assert_close(packed["terms"][name], value, rtol=1e-5, atol=1e-5, msg=name)
    torch.testing.assert_close(packed["saliency"], unpacked["saliency"], rtol=1e-5, atol=1e-6)
    assert float(unpacked["weights"].max()) > 1.5  # far from uniform
    for a, b in zip(packed["grads"], unpacked["grads"], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    # The check can fail: with positions that run on across a row, transformers builds one causal mask per
    # row, and every document after the first of its row sees the ones before it.
    later = [d for d in range(24) if d not in result["first_in_row"]]
    moved = (crossing["terms"]["ce"] - unpacked["terms"]["ce"]).abs()
    assert float(moved[later].min()) > 1e-4  # ten times the tolerance above, for each of them
    assert float(moved[result["first_in_row"]].max()) < 1e-5


def test_packed_two_ranks_equal_one_rank_with_short_documents(tiny_assets, short_records, tmp_path):
    """2 ranks x ZeRO-3 x micro 2 packed rows against 1 rank x ZeRO-0 x micro 4, over documents of 2 to
    40 words packed several to a row: the same losses, valence weights and gradients."""
    from tests.conftest import save_tiny_model

    student = save_tiny_model(tmp_path / "student")
    common = [
        f"data.train_path={short_records}",
        "data.max_seq_len=128",
        "data.packing=true",
        "trainer.max_steps=3",
        "trainer.grad_accum=2",
        "trainer.eval_every=0",
        f"student.path={student}",
        # InfoNCE's negatives are the micro-batch, which differs between these layouts by design.
        *[o for o in EVERY_TERM if o not in ("reg.contrastive=0.2", "deepspeed=zero0", "loss.chunk_tokens=64")],
    ]
    two, one = tmp_path / "two", tmp_path / "one"
    train_job(base_overrides(tiny_assets, two) + common + ["trainer.micro_batch_size=2"], num_procs=2)
    train_job(
        base_overrides(tiny_assets, one) + common + ["trainer.micro_batch_size=4", "deepspeed=zero0"], num_procs=1
    )
    log = (two / "train.log").read_text()
    assert "attention within each document" in log and "attention: eager (student), eager (teacher)" in log
    rows_two, rows_one = read_metrics(two / "metrics.csv"), read_metrics(one / "metrics.csv")
    terms = [f"loss/{t}" for t in TERM_NAMES if t != "seq"]
    columns = ("loss", *terms, "ess", "weight_max", "tokens")
    for column in columns:
        torch.testing.assert_close(
            [float(r[column]) for r in rows_two], [float(r[column]) for r in rows_one], rtol=1e-5, atol=1e-7
        )
    assert min(float(r["ess"]) for r in rows_two) < 0.9
    torch.testing.assert_close(
        [float(r["grad_norm"]) for r in rows_two], [float(r["grad_norm"]) for r in rows_one], rtol=1e-4, atol=0
    )


def test_rows_of_another_length_and_their_refusal(tiny_assets, short_records, tmp_path):
    """data.pack_length: rows of that many tokens, each document whole (max_seq_len stays the longest);
    shorter than data.max_seq_len is refused before anything starts."""
    from tests.conftest import vkd_cli_in_process
    from vkd_ds.builders.inputs import prepare
    from vkd_ds.config import compose

    overrides = [*base_overrides(tiny_assets, tmp_path / "run"), f"data.train_path={short_records}"]
    plain = prepare(compose([*overrides, "data.max_seq_len=48", "data.packing=true"])).packs
    longer = prepare(compose([*overrides, "data.max_seq_len=48", "data.packing=true", "data.pack_length=96"])).packs
    assert plain.capacity == 48 and longer.capacity == 96 and len(longer) < len(plain)
    for packs in (plain, longer):
        assert all(sum(len(d.input_ids) for d in packs[j]) <= packs.capacity for j in range(len(packs)))
    result = vkd_cli_in_process(["train", *overrides, "data.max_seq_len=48", "data.pack_length=32"])
    assert result.returncode == 2
    assert "`data.pack_length` (32) must be at least data.max_seq_len (48)" in result.stderr
    assert not (tmp_path / "run").exists()


def test_packs_never_mix_the_inputs_of_a_mixture(tiny_assets, short_records, tmp_path):
    """Weighted inputs are packed apart: each pack's documents come from one input, and the mixture's
    ranges are those inputs' packs, so a weight is a share of packed rows."""
    from vkd_ds.models import load_tokenizer
    from vkd_ds.packing import PackedRows
    from vkd_ds.token_store import open_split

    lines = short_records.read_text().splitlines()
    first, second = tmp_path / "first.jsonl", tmp_path / "second.jsonl"
    first.write_text("\n".join(lines[:150]) + "\n")
    second.write_text("\n".join(lines[150:]) + "\n")
    value = [{"path": str(first), "weight": 1.0}, {"path": str(second), "weight": 3.0}]
    rows = open_split(value, "data.train_path", load_tokenizer(str(tiny_assets / "tokenizer")), 64, str(tmp_path))
    packs = PackedRows(rows, 64)
    (a_first, a_stop, a_weight), (b_first, b_stop, b_weight) = packs.mixture()
    assert (a_first, b_stop, a_weight, b_weight) == (0, len(packs), 1.0, 3.0) and a_stop == b_first
    for j in range(len(packs)):
        files = {doc.source.rsplit(":", 1)[0] for doc in packs[j]}
        assert files == {str(first if j < a_stop else second)}, j
    assert sum(packs.sizes()) == len(rows) and packs.fill() > 0.9
