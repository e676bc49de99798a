"""Rollouts and the L_seq estimator on real (tiny) transformers models, single process."""

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from vkd_ds.data import Example, tokenize
from vkd_ds.losses import sequence_kd
from vkd_ds.rollout import SamplingSettings, _pick, prompt_of, rollout_batch, row_uniforms, sample

VOCAB = 50


@pytest.fixture(scope="module")
def tiny_lm():
    torch.manual_seed(0)
    config = AutoConfig.for_model(
        "llama",
        vocab_size=VOCAB + 6,  # embeddings padded past the tokenizer: never sampled
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
    )
    return AutoModelForCausalLM.from_config(config).eval()


PROMPTS = [[1, 5, 7, 9, 11], [1, 3], [1, 4, 4, 4]]
SETTINGS = SamplingSettings(n_gen=7, max_seq_len=64)


def reference_sample(lm, prompt, uniforms, settings):
    """No KV cache, no padding: the whole sequence through the model at every step."""
    ids, logprob = list(prompt), 0.0
    with torch.no_grad():
        for t in range(settings.n_gen):
            logits = lm(torch.tensor([ids])).logits[0, -1, :VOCAB].double()
            probs = torch.softmax(logits / settings.temperature, -1)
            cdf = probs.cumsum(-1)
            token = int(torch.searchsorted(cdf, uniforms[t] * cdf[-1]))
            logprob += float(torch.log_softmax(logits, -1)[token])
            ids.append(token)
    return ids[len(prompt) :], logprob / settings.n_gen


def test_batched_cached_sampling_equals_the_uncached_reference(tiny_lm):
    uniforms = row_uniforms(3, 0, [0, 1, 2], SETTINGS.n_gen)
    batched = sample(tiny_lm, PROMPTS, uniforms, SETTINGS, VOCAB, eos_id=None, pad_id=0)
    for row, prompt in enumerate(PROMPTS):
        tokens, logprob = reference_sample(tiny_lm, prompt, uniforms[row], SETTINGS)
        assert batched.tokens[row] == tokens
        assert abs(float(batched.student_logprob[row]) - logprob) < 1e-5
        # Left padding with explicit positions: a row samples the same alone as in a batch.
        alone = sample(tiny_lm, [prompt], uniforms[row : row + 1], SETTINGS, VOCAB, None, 0)
        assert alone.tokens[0] == tokens
    assert all(t < VOCAB for row in batched.tokens for t in row)


def test_samples_depend_on_seed_step_and_row_only(tiny_lm):
    a = row_uniforms(3, 5, [0, 1, 2], 4)
    assert torch.equal(a[1:], row_uniforms(3, 5, [1, 2], 4))  # a row's draws do not depend on its neighbours
    assert not torch.equal(a, row_uniforms(3, 6, [0, 1, 2], 4))
    assert not torch.equal(a, row_uniforms(4, 5, [0, 1, 2], 4))


def test_eos_ends_only_its_row(tiny_lm):
    uniforms = row_uniforms(3, 0, [0, 1, 2], SETTINGS.n_gen)
    free = sample(tiny_lm, PROMPTS, uniforms, SETTINGS, VOCAB, None, 0)
    eos = free.tokens[0][2]
    stopped = sample(tiny_lm, PROMPTS, uniforms, SETTINGS, VOCAB, eos, 0)
    for row in range(3):
        cut = free.tokens[row].index(eos) + 1 if eos in free.tokens[row] else SETTINGS.n_gen
        assert stopped.tokens[row] == free.tokens[row][:cut]
    assert stopped.lengths[0] <= 3
    batch = rollout_batch(stopped, pad_id=0)
    assert batch["loss_mask"].sum(1).tolist() == stopped.lengths  # the loss covers the samples only
    assert batch["attention_mask"].sum(1).tolist() == [
        len(p) + n for p, n in zip(PROMPTS, stopped.lengths, strict=True)
    ]


def test_top_p_never_samples_outside_the_nucleus():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]])).expand(200, 4)
    uniforms = torch.linspace(0.001, 1, 200, dtype=torch.float64)
    full = _pick(logits, uniforms, 1.0, 1.0)
    assert set(full.tolist()) == {0, 1, 2, 3}
    # top_p = 0.8: the smallest prefix with mass >= 0.8 is {0, 1}.
    nucleus = _pick(logits, uniforms, 1.0, 0.8)
    assert set(nucleus.tolist()) == {0, 1}
    assert (nucleus == 0).float().mean().item() == pytest.approx(0.5 / 0.8, abs=0.02)


def test_prompts_come_from_the_prompt_or_a_prefix_of_the_text(tiny_assets):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_assets / "tokenizer")
    records = [
        ("a:1", {"prompt": "def f(x):", "completion": " return x"}),
        ("a:2", {"text": "the quick brown fox " * 8}),
    ]
    pair, text = tokenize(records, tokenizer, 128)
    settings = SamplingSettings(n_gen=8, prompt_tokens=5, max_seq_len=64)
    assert prompt_of(pair, settings) == pair.input_ids[: pair.prompt_len]
    assert pair.prompt_len == len(tokenizer.encode("def f(x):", add_special_tokens=False)) + 1  # + BOS
    assert text.prompt_len is None and prompt_of(text, settings) == text.input_ids[:5]
    # A prompt longer than max_seq_len - n_gen keeps its end.
    long = Example(list(range(100)), [0] * 60 + [1] * 40, "a:3", prompt_len=60)
    assert prompt_of(long, settings) == list(range(4, 60))


def test_sequence_kd_value_and_reinforce_gradient():
    torch.manual_seed(1)
    weighted_nll = torch.randn(4, requires_grad=True)  # Σ_t A_t·(−log p_S(y_t)) of each sample
    teacher_logprob = torch.randn(4)
    value = sequence_kd(weighted_nll, teacher_logprob)
    torch.testing.assert_close(value, -teacher_logprob)  # the value is L_seq itself
    value.sum().backward()
    torch.testing.assert_close(weighted_nll.grad, torch.ones(4))  # the gradient is the surrogate's


def _toy_policy_sequences(vocab=3, eos=0, n_gen=3):
    """Every continuation of a one-token prompt: up to n_gen tokens, ending at EOS or at n_gen."""
    import itertools

    out = []
    for length in range(1, n_gen + 1):
        for body in itertools.product(range(vocab), repeat=length):
            if eos in body[:-1] or (length < n_gen and body[-1] != eos):
                continue
            out.append(list(body))
    return out


@pytest.mark.parametrize("reward", ["teacher_logprob", "per_token"])
def test_reinforce_estimators_on_an_enumerated_toy_policy(reward):
    """A toy student (a logit table per position) with every sample y enumerated with its exact
    probability: the expected gradient of sequence_kd's surrogate, Σ_y p_S(y)·∇surrogate(y), against
    the exact gradient of the expected objective.
    - teacher_logprob (the estimator of docs/objective.md, summed log-probability): exactly ∇E[L_seq]; the
      length-normalized estimator is not.
    - per_token (A_t = r_t, zero discount): the exact gradient of the samples' reverse KL
      E[Σ_t −r_t] credits token t with its reward-to-go Σ_{u≥t} r_u; with those weights the
      machinery is exact, and per_token's own credit (r_t alone) is the documented biased,
      lower-variance estimator of on-policy distillation."""
    from vkd_ds.losses import shift_for_next_token, token_ce

    torch.manual_seed(0)
    vocab, n_gen = 3, 3
    theta = torch.randn(n_gen + 1, vocab, requires_grad=True)  # student logits at each position
    teacher = torch.randn(n_gen + 1, vocab)  # teacher logits at each position
    seqs = _toy_policy_sequences(vocab, 0, n_gen)
    ids = torch.tensor([[1, *y] + [0] * (n_gen - len(y)) for y in seqs])
    loss_mask = torch.tensor([[0] + [1] * len(y) + [0] * (n_gen - len(y)) for y in seqs], dtype=torch.bool)
    targets, mask = shift_for_next_token(ids, loss_mask)
    logits_s = theta[None].expand(len(seqs), -1, -1)
    lp_s = torch.log_softmax(logits_s, -1).gather(-1, targets[..., None]).squeeze(-1) * mask
    lp_t = torch.log_softmax(teacher, -1)[None].expand(len(seqs), -1, -1).gather(-1, targets[..., None]).squeeze(-1)
    lp_t = lp_t * mask
    prob = lp_s.sum(1).exp()  # p_S(y), differentiable
    assert torch.isclose(prob.sum(), torch.tensor(1.0))
    lengths = mask.sum(1).float()
    if reward == "teacher_logprob":
        objective = -(lp_t.sum(1) / lengths)  # L_seq = −R
        r = (lp_t.sum(1) / lengths).detach()
        advantage = (r - 0.37)[:, None] * mask  # any constant baseline
    else:
        objective = -(lp_t - lp_s).sum(1)  # the sample's reverse KL to the teacher, Σ_t −r_t
        advantage = (lp_t - lp_s).detach() * mask
    (true_grad,) = torch.autograd.grad((prob * objective).sum(), theta)

    def expected_estimate(weights):
        surrogate = token_ce(logits_s, targets, mask, token_weights=weights)
        value = sequence_kd(surrogate, (lp_t.sum(1) / lengths).detach())
        (grad,) = torch.autograd.grad((prob.detach() * value).sum(), theta)
        return grad

    if reward == "teacher_logprob":
        torch.testing.assert_close(expected_estimate(advantage), true_grad, atol=1e-6, rtol=1e-5)
        biased = expected_estimate(advantage / lengths[:, None])
        assert (biased - true_grad).abs().max() > 1e-2
    else:
        future = torch.zeros_like(advantage)  # Σ_{u>t} r_u
        for t in range(advantage.shape[1] - 2, -1, -1):
            future[:, t] = future[:, t + 1] + advantage[:, t + 1]
        assert (expected_estimate(advantage) - true_grad).abs().max() > 1e-2
        torch.testing.assert_close(expected_estimate(advantage + future), true_grad, atol=1e-6, rtol=1e-5)
