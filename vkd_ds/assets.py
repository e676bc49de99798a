"""Offline assets for the demo and the tests: English text from the Python
standard library's docs, a BPE tokenizer trained on it, and small causal LMs.

Nothing here downloads anything.
"""

from __future__ import annotations

import json
import math
import random
import time
from pathlib import Path

import torch

SPECIAL_TOKENS = {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>", "unk_token": "<unk>"}


def pydoc_records(chars_per_record: int = 480) -> list[str]:
    """~465k characters of English from `pydoc_data.topics`, packed into records of whole paragraphs."""
    from pydoc_data.topics import topics

    records = []
    for name in sorted(topics):
        current = ""
        for para in topics[name].split("\n\n"):
            para = " ".join(para.split())
            if not para:
                continue
            if current and len(current) + len(para) > chars_per_record:
                records.append(current)
                current = ""
            current = f"{current} {para}".strip()
        if current:
            records.append(current)
    return records


def write_jsonl(path: Path, texts: list[str]) -> None:
    with path.open("w", encoding="utf-8") as handle:
        for text in texts:
            handle.write(json.dumps({"text": text}) + "\n")


def split_records(records: list[str], valid_every: int = 20) -> tuple[list[str], list[str]]:
    """Deterministic train/valid split: every `valid_every`-th record is held out."""
    train = [r for i, r in enumerate(records) if i % valid_every != 0]
    valid = [r for i, r in enumerate(records) if i % valid_every == 0]
    return train, valid


def train_tokenizer(texts: list[str], vocab_size: int, out_dir: Path, split_digits: bool = False, sentencepiece=False):
    """BPE trained with `tokenizers`, saved as a transformers fast tokenizer: byte-level (GPT-2's, as Llama 3's
    and Qwen's), or with `sentencepiece` SentencePiece's conventions (as Llama 2's, Mistral's and Gemma's:
    "▁" for a space, a "▁" before the text, characters outside the vocabulary as `<0xNN>` byte tokens,
    256 of them past `vocab_size`). `split_digits`: every digit its own token (as Llama's and Qwen's
    tokenizers do), so two tokenizers differ on numbers."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    digits = [pre_tokenizers.Digits(individual_digits=True)] if split_digits else []
    if sentencepiece:
        tok = Tokenizer(models.BPE(byte_fallback=True))
        words = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first")
        tok.decoder = decoders.Sequence(
            [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
        )
        alphabet = {"limit_alphabet": 200}
    else:
        tok = Tokenizer(models.BPE())
        words = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        alphabet = {"initial_alphabet": pre_tokenizers.ByteLevel.alphabet()}
    tok.pre_tokenizer = pre_tokenizers.Sequence([*digits, words]) if digits else words
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS.values()), show_progress=False, **alphabet
    )
    tok.train_from_iterator(texts, trainer=trainer)
    if sentencepiece:  # the byte-fallback tokens are ordinary vocabulary entries, as in SentencePiece's models
        saved = json.loads(tok.to_str())
        vocab = saved["model"]["vocab"]
        for byte in range(256):
            vocab.setdefault(f"<0x{byte:02X}>", len(vocab))
        tok = Tokenizer.from_str(json.dumps(saved))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, **SPECIAL_TOKENS)
    out_dir.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(out_dir)
    return fast


def llama_config(
    vocab_size: int, hidden: int, layers: int, heads: int = 4, intermediate: int | None = None, max_positions: int = 512
):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=intermediate or 3 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        max_position_embeddings=max_positions,
        tie_word_embeddings=False,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=2,
    )


def pretrain_lm(
    model, tokenizer, texts: list[str], *, steps: int, batch_size: int, seq_len: int, lr: float, seed: int, log=print
) -> None:
    """Plain single-process next-token training on packed text (how the demo's teacher is made)."""
    torch.manual_seed(seed)
    ids: list[int] = []
    for text in texts:
        ids += [tokenizer.bos_token_id] + tokenizer.encode(text, add_special_tokens=False)
    stream = torch.tensor(ids)
    num_windows = (len(stream) - 1) // seq_len
    windows = stream[: num_windows * seq_len].view(num_windows, seq_len)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.1)
    warmup = max(1, steps // 20)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min((s + 1) / warmup, 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)) * 0.9 + 0.1)
    )
    rng = random.Random(seed)
    model.train()
    started = time.time()
    for step in range(steps):
        batch = windows[torch.tensor(rng.sample(range(num_windows), batch_size))]
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        if (step + 1) % 100 == 0 or step + 1 == steps:
            log(f"  teacher pretraining step {step + 1}/{steps} loss {loss.item():.3f} ({time.time() - started:.0f}s)")
    model.eval()


def asset_overrides(assets: Path) -> list[str]:
    """Hydra overrides that point a run at assets written by write_tiny_assets / write_bench_assets."""
    assets = Path(assets)
    return [
        f"teacher.path={assets / 'teacher'}",
        f"data.train_path={assets / 'train.jsonl'}",
        f"data.valid_path={assets / 'valid.jsonl'}",
        f"data.tokenizer_path={assets / 'tokenizer'}",
        f"valence.teacher_head={assets / 'teacher_valence_head.safetensors'}",
    ]


def write_tiny_assets(out: Path) -> Path:
    """Tests' and benchmarks' assets: a 384-token BPE tokenizer, a random 3 × 48 Llama teacher (its
    embeddings padded past the tokenizer, as real checkpoints do), train/valid JSONL from pydoc text
    and a random teacher valence head (k = 8). Seconds to build."""
    from transformers import AutoModelForCausalLM

    from vkd_ds.valence import ValenceHead, save_head

    out = Path(out)
    train, valid = split_records(pydoc_records(300)[:240], valid_every=8)
    tokenizer = train_tokenizer(train, 384, out / "tokenizer")
    write_jsonl(out / "train.jsonl", train)
    write_jsonl(out / "valid.jsonl", valid)
    torch.manual_seed(0)
    teacher = AutoModelForCausalLM.from_config(llama_config(len(tokenizer) + 16, 48, 3))
    teacher.save_pretrained(out / "teacher")
    tokenizer.save_pretrained(out / "teacher")
    save_head(ValenceHead(48, 8), out / "teacher_valence_head.safetensors")
    return out


def write_bench_assets(
    out: Path,
    vocab_size: int,
    seq_len: int,
    *,
    records: int = 96,
    teacher_layers: int = 4,
    teacher_width: int = 256,
    teacher_heads: int = 4,
    seed: int = 0,
) -> Path:
    """Benchmark assets of an exact vocabulary size: a word-level tokenizer of `vocab_size` tokens
    (w0, w1, ... plus the special tokens), `records` texts of `seq_len` - 1 Zipf-distributed words
    (BOS + text = `seq_len` tokens), a random `teacher_layers` × `teacher_width` Llama teacher and a
    random teacher valence head (k = 8). Speed and memory depend on the shapes, not on the text."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

    from vkd_ds.valence import ValenceHead, save_head

    out = Path(out)
    specials = list(SPECIAL_TOKENS.values())
    words = [f"w{i}" for i in range(vocab_size - len(specials))]
    vocab = {token: i for i, token in enumerate(specials + words)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token=SPECIAL_TOKENS["unk_token"]))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, **SPECIAL_TOKENS)
    tokenizer.save_pretrained(out / "tokenizer")
    rng = random.Random(seed)
    zipf = [1.0 / (rank + 1) for rank in range(len(words))]
    texts = [" ".join(rng.choices(words, weights=zipf, k=seq_len - 1)) for _ in range(records)]
    train, valid = split_records(texts, valid_every=8)
    write_jsonl(out / "train.jsonl", train)
    write_jsonl(out / "valid.jsonl", valid)
    torch.manual_seed(seed)
    config = llama_config(vocab_size, teacher_width, teacher_layers, teacher_heads, max_positions=max(512, seq_len))
    AutoModelForCausalLM.from_config(config).save_pretrained(out / "teacher")
    tokenizer.save_pretrained(out / "teacher")
    save_head(ValenceHead(teacher_width, 8), out / "teacher_valence_head.safetensors")
    return out


def write_short_records(path, source, count: int, seed: int = 0) -> None:
    """`count` records of 2 to 40 words cut from the text of the JSONL `source`: short records with a wide
    spread of lengths (what packing is for; tests/test_packing.py, bench/packing.py)."""
    words = " ".join(json.loads(line)["text"] for line in source.read_text().splitlines()).split()
    rng = random.Random(seed)
    with path.open("w") as out:
        for _ in range(count):
            n = rng.choice([2, 3, 5, 8, 12, 20, 30, 40])
            start = rng.randrange(len(words) - n)
            out.write(json.dumps({"text": " ".join(words[start : start + n])}) + "\n")
