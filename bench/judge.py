"""How good a trained student is, measured after training in one process (no DeepSpeed), the same way
for every run of bench/objectives.py: on text (perplexity, KL to the teacher) and on the student's own
samples (the teacher's log-prob of them, and the reverse KL the student pays on them: the exposure-bias
view of GKD and MiniLLM)."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

# Samples: the first PROMPT_TOKENS tokens of a record, continued by N_GEN tokens at T = 1, with the
# same per-row seeded draws for every student.
PROMPT_TOKENS, N_GEN, MAX_SEQ_LEN = 16, 32, 128


def non_embedding_params(model) -> int:
    """Parameters a token's forward multiplies by (the input embedding is a lookup; an untied LM head counts)."""
    embedding = model.get_input_embeddings().weight
    total = sum(p.numel() for p in model.parameters())
    tied = model.get_output_embeddings().weight is embedding
    return total if tied else total - embedding.numel()


def _log_probs(model, batch: dict[str, torch.Tensor], vocab: int) -> torch.Tensor:
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    return F.log_softmax(logits[..., :vocab].float(), dim=-1)


def _on_text(student, teacher, examples, pad_id: int, vocab: int) -> dict[str, float]:
    from vkd_ds.data import collate
    from vkd_ds.losses import shift_for_next_token

    nll = kl = tokens = 0.0
    for start in range(0, len(examples), 16):
        batch = collate(examples[start : start + 16], pad_id)
        targets, mask = shift_for_next_token(batch["input_ids"], batch["loss_mask"])
        s, t = _log_probs(student, batch, vocab), _log_probs(teacher, batch, vocab)
        nll -= float(s.gather(-1, targets.clamp(max=vocab - 1)[..., None]).squeeze(-1)[mask].sum())
        kl += float((t.exp() * (t - s)).sum(-1)[mask].sum())
        tokens += float(mask.sum())
    return {"ppl": float(torch.tensor(nll / tokens).exp()), "kl_teacher": kl / tokens}


def _on_samples(student, teacher, examples, tokenizer, probes: int, vocab: int) -> dict[str, float]:
    from vkd_ds.losses import shift_for_next_token
    from vkd_ds.rollout import SamplingSettings, prompt_of, rollout_batch, row_uniforms, sample

    settings = SamplingSettings(n_gen=N_GEN, prompt_tokens=PROMPT_TOKENS, max_seq_len=MAX_SEQ_LEN)
    prompts = [prompt_of(ex, settings) for ex in examples[:probes]]
    uniforms = row_uniforms(0, 0, list(range(len(prompts))), N_GEN)
    pad = tokenizer.pad_token_id
    samples = sample(student, prompts, uniforms, settings, vocab, tokenizer.eos_token_id, pad)
    batch = rollout_batch(samples, pad)
    targets, mask = shift_for_next_token(batch["input_ids"], batch["loss_mask"])
    s, t = _log_probs(student, batch, vocab), _log_probs(teacher, batch, vocab)
    n = float(mask.sum())
    return {
        "sample_teacher_logprob": float(t.gather(-1, targets[..., None]).squeeze(-1)[mask].sum()) / n,
        "sample_reverse_kl": float((s.exp() * (s - t)).sum(-1)[mask].sum()) / n,
    }


@torch.no_grad()
def judge(student_dir: Path, assets: Path, splits: dict[str, Path], probes: int = 32) -> dict[str, float]:
    """{split/metric: value} for each split: ppl and KL(teacher‖student) per token at T = 1 on the
    split's text; the teacher's mean log-prob and KL(student‖teacher) per token on the student's samples
    from the prompts of the split's first `probes` records."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from vkd_ds.corpus import load_examples

    tokenizer = AutoTokenizer.from_pretrained(assets / "tokenizer")
    student = AutoModelForCausalLM.from_pretrained(student_dir).eval()
    teacher = AutoModelForCausalLM.from_pretrained(assets / "teacher").eval()
    vocab = len(tokenizer)
    result: dict[str, float] = {
        "student_params": non_embedding_params(student),
        "teacher_params": non_embedding_params(teacher),
    }
    for split, path in splits.items():
        examples = load_examples(path, tokenizer, MAX_SEQ_LEN)
        measured = {
            **_on_text(student, teacher, examples, tokenizer.pad_token_id, vocab),
            **_on_samples(student, teacher, examples, tokenizer, probes, vocab),
        }
        result.update({f"{split}/{key}": value for key, value in measured.items()})
    return result


@torch.no_grad()
def teacher_ppl(assets: Path, splits: dict[str, Path]) -> dict[str, float]:
    """The teacher's own perplexity on each split: the floor the students are measured against."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from vkd_ds.corpus import load_examples

    tokenizer = AutoTokenizer.from_pretrained(assets / "tokenizer")
    teacher = AutoModelForCausalLM.from_pretrained(assets / "teacher").eval()
    vocab = len(tokenizer)
    return {
        f"{split}/ppl": _on_text(
            teacher, teacher, load_examples(path, tokenizer, MAX_SEQ_LEN), tokenizer.pad_token_id, vocab
        )["ppl"]
        for split, path in splits.items()
    }
