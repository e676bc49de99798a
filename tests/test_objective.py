"""Pure parts of the full objective: layer maps, valence targets, attention and contrastive terms,
the chunked losses' in-place backward, and the lexicon labels."""

import json

import pytest
import torch
import torch.nn.functional as F

from vkd_ds.corpus import load_examples
from vkd_ds.data import collate, future_trajectory
from vkd_ds.errors import VkdError
from vkd_ds.features import HiddenCapture, resolve_layer_map, uniform_layer_map
from vkd_ds.losses import Divergence, attention_kd, info_nce, sequence_features, token_ce, token_divergence
from vkd_ds.valence import ValenceHead, load_head, save_head


@pytest.mark.parametrize(
    "n, big_n, want",
    [
        (2, 3, [(0, 1), (1, 2)]),  # round(1.5) = 2 (half up) -> 1; round(3) -> 2
        (4, 12, [(0, 2), (1, 5), (2, 8), (3, 11)]),
        (3, 3, [(0, 0), (1, 1), (2, 2)]),
        (1, 5, [(0, 4)]),
        (4, 2, [(0, 0), (1, 0), (2, 1), (3, 1)]),  # round(0.5) = 1 -> 0; round(1.5) = 2 -> 1
    ],
)
def test_uniform_layer_map_is_the_spec_formula(n, big_n, want):
    assert uniform_layer_map(n, big_n) == want
    assert resolve_layer_map("uniform", n, big_n) == want


def test_explicit_layer_map_and_its_errors():
    assert resolve_layer_map([[1, 0]], 2, 3) == [(1, 0)]
    for spec, message in [
        ([[0, 3]], "teacher layer 3 does not exist"),
        ([[-1, 0]], "student layer -1 does not exist"),
        ([[0, 1], [0, 2]], "appears more than once"),
        ([[0]], "pair of ints"),
        ([], "non-empty list"),
        ("every", "non-empty list"),
    ]:
        with pytest.raises(VkdError, match=message):
            resolve_layer_map(spec, 2, 3)


def test_future_trajectory_repeats_the_last_value():
    traj = future_trajectory([0.1, 0.2, 0.3], k=2)
    torch.testing.assert_close(traj, torch.tensor([[0.2, 0.3], [0.3, 0.3], [0.3, 0.3]]))
    torch.testing.assert_close(future_trajectory([0.4], k=3), torch.tensor([[0.4, 0.4, 0.4]]))


def test_valence_labels_align_with_tokens(tiny_assets, tmp_path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_assets / "tokenizer")
    text = "A good day and a bad night."
    n = len(tok.encode(text, add_special_tokens=False))
    labels = [round(i / n, 4) for i in range(n)]
    path = tmp_path / "v.jsonl"
    path.write_text(
        json.dumps({"text": text, "valence": labels}) + "\n" + json.dumps({"text": text, "valence": 0.25}) + "\n"
    )
    per_token, scalar = load_examples(path, tok, 64)
    assert len(per_token.valence) == len(per_token.input_ids) == n + 1  # BOS takes the first label
    assert per_token.valence == [labels[0]] + labels
    assert scalar.valence == [0.25] * len(scalar.input_ids)
    batch = collate([per_token, scalar], tok.pad_token_id, valence_k=3)
    assert batch["valence_target"].shape == (2, n + 1, 3)
    torch.testing.assert_close(batch["valence_target"][0, 0], torch.tensor(labels[:3]))
    assert batch["valence_mask"][0].sum() == n and not batch["valence_mask"][0, n]


def test_attention_kd_matches_reference():
    torch.manual_seed(0)
    batch, seq = 3, 6
    a_s = torch.softmax(torch.randn(batch, seq, seq), -1).requires_grad_(True)
    a_t = torch.softmax(torch.randn(batch, seq, seq), -1)
    mask = torch.rand(batch, seq) > 0.4
    mask[1] = False
    got = attention_kd([a_s], [a_t], mask)
    want = torch.stack(
        [
            ((a_s[b, mask[b]] - a_t[b, mask[b]]) ** 2).sum(-1).mean() if mask[b].any() else a_s.sum() * 0
            for b in range(3)
        ]
    )
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(torch.autograd.grad(got.sum(), a_s)[0], torch.autograd.grad(want.sum(), a_s)[0])


def test_info_nce_matches_reference():
    torch.manual_seed(1)
    s = torch.randn(4, 6, requires_grad=True)
    t = torch.randn(4, 6)
    got = info_nce(s, t, temperature=0.5)
    s = s.detach()
    sims = torch.tensor([[float(F.cosine_similarity(s[i], t[j], dim=0)) for j in range(4)] for i in range(4)])
    sims = sims / 0.5
    want = torch.stack([-(sims[i].log_softmax(0)[i]) for i in range(4)])
    torch.testing.assert_close(got.detach(), want, atol=1e-5, rtol=1e-5)
    hidden = torch.randn(2, 3, 4)
    mask = torch.tensor([[True, True, False], [False, False, False]])
    torch.testing.assert_close(sequence_features(hidden, mask), torch.stack([hidden[0, :2].mean(0), torch.zeros(4)]))


@pytest.mark.parametrize("fn", ["soft", "ce"])
def test_chunked_losses_with_every_position_valid(fn):
    """All positions valid and the full width compared: backward takes the in-place path."""
    torch.manual_seed(3)
    student = torch.randn(2, 5, 11, requires_grad=True)
    teacher = torch.randn(2, 5, 11)
    targets = torch.randint(11, (2, 5))
    mask = torch.ones(2, 5, dtype=torch.bool)
    weights = torch.tensor([0.3, 1.7])
    if fn == "soft":
        got = token_divergence(student, teacher, mask, temperature=2.0, chunk_tokens=3)
        log_s, log_t = F.log_softmax(student / 2, -1), F.log_softmax(teacher / 2, -1)
        want = (log_t.exp() * (log_t - log_s)).sum(-1).mean(1) * 4
    else:
        got = token_ce(student, targets, mask, chunk_tokens=3)
        want = F.cross_entropy(student.transpose(1, 2), targets, reduction="none").mean(1)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    (g_got,) = torch.autograd.grad((got * weights).sum(), student)
    (g_want,) = torch.autograd.grad((want * weights).sum(), student)
    torch.testing.assert_close(g_got, g_want, atol=1e-5, rtol=1e-5)


def test_hidden_capture_hooks_only_the_mapped_layers(tiny_assets):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_assets / "teacher")
    capture = HiddenCapture(model, [0, 2], last=True)
    assert len(capture.handles) == 3  # two layers and the LM head, nothing else
    ids = torch.randint(300, (2, 7))
    with torch.no_grad():
        out = model(input_ids=ids, output_hidden_states=True)
    hiddens, attentions, last = capture.take()
    torch.testing.assert_close(hiddens[0], out.hidden_states[1])
    torch.testing.assert_close(last, out.hidden_states[-1])  # the LM head's input: after the final norm
    with torch.no_grad():
        torch.testing.assert_close(model.model.norm(hiddens[1]), last)  # layer 2's output, before it
    assert attentions == []


def test_valence_head_file_round_trip(tmp_path):
    head = ValenceHead(12, 3)
    path = save_head(head, tmp_path / "h.safetensors", note="x")
    loaded = load_head(path, 3, 12)
    x = torch.randn(2, 4, 12)
    torch.testing.assert_close(loaded(x), head(x))
    with pytest.raises(VkdError, match="reads hidden states of width 12"):
        load_head(path, 3, 16)


def test_lexicon_labels_follow_the_words(tiny_assets):
    from transformers import AutoTokenizer

    from vkd_ds.fit_head import running_mood, word_valence

    tok = AutoTokenizer.from_pretrained(tiny_assets / "tokenizer")
    values = word_valence("a wonderful happy day", tok)
    assert len(values) == len(tok.encode("a wonderful happy day", add_special_tokens=False))
    assert max(values) > 0.7 and min(values) == 0.5
    assert min(word_valence("terrible awful disaster", tok)) < 0.3
    mood = running_mood([1.0, 1.0, 0.5], 0.5)
    assert mood == [0.75, 0.875, 0.6875]


@pytest.mark.parametrize("with_bias", [False, True])
def test_fused_head_equals_dense_logits(with_bias):
    from vkd_ds.losses import fused_head_losses

    torch.manual_seed(4)
    batch, seq, width, vocab = 3, 7, 10, 23
    hidden = torch.randn(batch, seq, width, requires_grad=True)
    weight = torch.randn(vocab + 2, width, requires_grad=True)  # rows past the tokenizer get no gradient
    bias = torch.randn(vocab + 2, requires_grad=True) if with_bias else None
    teacher = torch.randn(batch, seq, vocab + 5) * 2
    targets = torch.randint(vocab, (batch, seq))
    mask = torch.rand(batch, seq) > 0.3
    mask[2] = False
    weights = torch.tensor([0.5, 1.5, 1.0])
    ce, soft = fused_head_losses(hidden, weight, bias, mask, targets, teacher, Divergence(temperature=2.0), vocab, 4)
    logits = hidden @ weight.T + (bias if bias is not None else 0)
    want_ce = token_ce(logits, targets, mask, vocab)
    want_soft = token_divergence(logits, teacher, mask, temperature=2.0, vocab_size=vocab)
    torch.testing.assert_close(ce, want_ce, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(soft, want_soft, atol=1e-5, rtol=1e-5)
    params = [hidden, weight] + ([bias] if bias is not None else [])
    got = torch.autograd.grad(((ce + 0.7 * soft) * weights).sum(), params)
    want = torch.autograd.grad(((want_ce + 0.7 * want_soft) * weights).sum(), params)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_fit_valence_head_learns_the_labels(tiny_assets, tmp_path):
    """Data labels that depend on the text: the fitted head beats its initial error and the
    best constant prediction, and the file loads as the teacher's head."""
    from vkd_ds.config import compose
    from vkd_ds.fit_head import fit_valence_head

    records = [json.loads(line) for line in (tiny_assets / "train.jsonl").read_text().splitlines()[:64]]
    for i, record in enumerate(records):
        record["valence"] = 0.9 if i % 2 else 0.1
        record["text"] = ("happy sunny " if i % 2 else "gloomy rainy ") + record["text"]
    data = tmp_path / "labelled.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    out = tmp_path / "head.safetensors"
    cfg = compose(
        [
            f"teacher.path={tiny_assets / 'teacher'}",
            f"data.train_path={data}",
            f"data.tokenizer_path={tiny_assets / 'tokenizer'}",
            "data.max_seq_len=160",  # one row per record: every row sees the words its label depends on
            "valence.fit.labels=data",
            "valence.fit.steps=60",
            "valence.fit.lr=0.05",
            f"valence.fit.out={out}",
        ]
    )
    summary = fit_valence_head(cfg, log=lambda line: None)
    assert summary["final_mse"] < 0.5 * summary["initial_mse"]
    assert summary["final_mse"] < summary["constant_mse"]
    head = load_head(out, 8, 48)
    assert head.k == 8


def test_every_loss_term_is_declared_once():
    """The registry is the one list of terms: each has its λ key in configs/loss/default.yaml (and
    every numeric λ key there is a term); no other source file writes out a list of term names."""
    import re
    from pathlib import Path

    from omegaconf import OmegaConf

    from vkd_ds.terms import NEEDS, TERM_NAMES, TERMS, loss_overrides, only_terms

    repo = Path(__file__).resolve().parent.parent
    loss_keys = OmegaConf.load(repo / "configs" / "loss" / "default.yaml")
    settings = {
        "divergence",
        "beta",
        "alpha",
        "temperature",
        "chunk_tokens",
        "fused_head",
        "cross_tokenizer",
    }  # how the token-level terms run
    assert set(loss_keys) - settings == set(TERM_NAMES)
    for term in TERMS.values():
        assert set(term.needs) <= set(NEEDS), term.name
    assert loss_overrides(ce=1.0)[0] == "loss.ce=1.0" and len(loss_overrides()) == len(TERM_NAMES)
    assert "loss.ce=0" not in only_terms("ce") and len(only_terms("ce")) == len(TERM_NAMES) - 1
    with pytest.raises(KeyError, match="unknown loss term"):
        loss_overrides(sof=1.0)
    names = "|".join(TERM_NAMES)
    listed = re.compile(rf"""(["'](loss\.)?({names})(=0)?["']\s*,\s*){{2,}}""")
    offenders = []
    for path in [*repo.glob("vkd_ds/**/*.py"), *repo.glob("bench/*.py"), *repo.glob("tests/**/*.py")]:
        if path.name == "terms.py" or path == Path(__file__).resolve():
            continue
        if listed.search(path.read_text()):
            offenders.append(str(path.relative_to(repo)))
    assert offenders == [], f"hand-written lists of loss terms in {offenders}: derive them from vkd_ds.terms"
