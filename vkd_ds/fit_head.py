"""`vkd-ds fit-valence-head`: fit the teacher's valence head, teacher body frozen (docs/objective.md, Valence).

Targets come from the data's `valence` labels (per token or per sequence) or,
for raw text, from a lexicon scorer built on the VADER lexicon: each token
takes the valence of the word it belongs to (neutral 0.5 for words the
lexicon does not know), smoothed into a running mood
v_t = decay·v_{t-1} + (1 − decay)·word_t. Single process: the teacher runs
once per batch under no_grad, and only the head's k·(H+1) parameters train.
"""

from __future__ import annotations

import functools
import math
import re
import time
from pathlib import Path

import torch
from omegaconf import DictConfig

from vkd_ds.errors import VkdError
from vkd_ds.settings import LABEL_SOURCES as LABEL_SOURCES  # declared beside the settings field valence.fit.labels

_WORD = re.compile(r"[A-Za-z][A-Za-z']*|[:;=8xX][-o^']?[()DPp/\\|\]\[]")


@functools.cache
def vader_lexicon() -> dict[str, float]:
    """word -> valence in [0, 1]: VADER's mean rating in [-4, 4], rescaled."""
    from importlib.resources import files

    text = (files("vaderSentiment") / "vader_lexicon.txt").read_text(encoding="utf-8", errors="replace")
    table = {}
    for line in text.splitlines():
        parts = line.split("\t")
        if len(parts) >= 2:
            try:
                table[parts[0].lower()] = (float(parts[1]) + 4.0) / 8.0
            except ValueError:
                continue
    return table


def word_valence(text: str, tokenizer) -> list[float]:
    """The lexicon valence of the word each token of `text` belongs to (0.5 where none)."""
    lexicon = vader_lexicon()
    spans = [(m.start(), m.end(), lexicon.get(m.group(0).lower(), 0.5)) for m in _WORD.finditer(text)]
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    values, j = [], 0
    for start, end in encoded["offset_mapping"]:
        while j < len(spans) and spans[j][1] <= start:
            j += 1
        inside = j < len(spans) and spans[j][0] < max(end, start + 1)
        values.append(spans[j][2] if inside else 0.5)
    return values


def running_mood(values: list[float], decay: float) -> list[float]:
    mood, out = 0.5, []
    for v in values:
        mood = decay * mood + (1.0 - decay) * v
        out.append(mood)
    return out


def label_records(records: list[tuple[str, dict]], tokenizer, source: str, decay: float) -> list[tuple[str, dict]]:
    """Records with a `valence` label each, per `source` (auto, data, lexicon)."""
    labelled = []
    for where, record in records:
        if source == "data" and "valence" not in record:
            raise VkdError(f'{where}: valence.fit.labels=data but this record has no "valence" label')
        if (source == "lexicon" or (source == "auto" and "valence" not in record)) and "messages" in record:
            # A conversation takes one label (no per-token labels): the mean mood of its replies.
            replies = " ".join(m["content"] for m in record["messages"] if m["role"] == "assistant")
            mood = running_mood(word_valence(replies, tokenizer), decay)
            record = {**record, "valence": sum(mood) / len(mood) if mood else 0.5}
        elif source == "lexicon" or (source == "auto" and "valence" not in record):
            parts = [record["text"]] if "text" in record else [record["prompt"], record["completion"]]
            words = [v for part in parts for v in word_valence(part, tokenizer)]
            record = {**record, "valence": running_mood(words, decay)}
        labelled.append((where, record))
    return labelled


def validate_fit(cfg: DictConfig) -> None:
    from vkd_ds.settings import check_keys

    check_keys(
        cfg,
        (
            "teacher.path",
            "data.train_path",
            "valence.fit.out",
            "data.tokenizer_path",
            "data.max_seq_len",
            "valence.k",
            "valence.fit.labels",
            "valence.fit.steps",
            "valence.fit.batch_size",
            "valence.fit.lr",
            "valence.fit.lexicon_decay",
            "trainer.seed",
        ),
    )


def _examples(value, key: str, tokenizer, cfg: DictConfig):
    """The records of `value` (data.train_path's inputs, any kind vkd_ds.corpus reads), in memory:
    fitting the head is a short job on the first records' worth of batches."""
    from omegaconf import OmegaConf

    from vkd_ds.corpus import file_kind, read_records, resolve_sources, source_name
    from vkd_ds.data import is_empty, tokenize

    if not isinstance(value, str):
        value = OmegaConf.to_container(value, resolve=True)
    records = []
    for source in resolve_sources(value, key):
        for path in source.files:
            kind = file_kind(path)
            for number, record, _ in read_records(path):
                if not is_empty(record):
                    records.append((source_name(path, kind, number), record))
    if not records:
        raise VkdError(f"{key}: every record has empty text; there is nothing to fit on")
    records = label_records(records, tokenizer, cfg.valence.fit.labels, float(cfg.valence.fit.lexicon_decay))
    return tokenize(records, tokenizer, int(cfg.data.max_seq_len), str(cfg.data.assistant_turns))


def fit_valence_head(cfg: DictConfig, log=print) -> dict:
    """Fit, save as safetensors (published with one rename) and return a summary."""
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    from vkd_ds.data import collate
    from vkd_ds.features import HiddenCapture, hidden_width
    from vkd_ds.models import load_model_config, load_tokenizer
    from vkd_ds.valence import ValenceHead, save_head

    validate_fit(cfg)
    load_model_config(cfg.teacher.path, "teacher.path")
    tokenizer = load_tokenizer(cfg.data.tokenizer_path)
    train = _examples(cfg.data.train_path, "data.train_path", tokenizer, cfg)
    valid = (
        _examples(cfg.data.valid_path, "data.valid_path", tokenizer, cfg) if cfg.data.valid_path else train[: 8 * 16]
    )
    fit = cfg.valence.fit
    k = int(cfg.valence.k)
    out = Path(fit.out)

    hf_logging.disable_progress_bar()
    teacher = AutoModelForCausalLM.from_pretrained(cfg.teacher.path, dtype=torch.float32)
    teacher.requires_grad_(False)
    teacher.eval()
    capture = HiddenCapture(teacher, [], last=True)
    torch.manual_seed(int(cfg.trainer.seed))
    head = ValenceHead(hidden_width(teacher.config), k)
    optimizer = torch.optim.AdamW(head.parameters(), lr=float(fit.lr), weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=int(fit.steps), eta_min=float(fit.lr) / 10)

    def features(examples):
        batch = collate(examples, tokenizer.pad_token_id, valence_k=k)
        with torch.no_grad():
            teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
        _, _, last = capture.take()
        return last, batch["valence_target"], batch["valence_mask"]

    def mse(examples) -> tuple[float, float]:
        """(the head's MSE, the MSE of the best constant prediction) over the labelled positions."""
        total = count = 0.0
        moments = torch.zeros(2, dtype=torch.float64)
        with torch.no_grad():
            for i in range(0, len(examples), int(fit.batch_size)):
                last, target, mask = features(examples[i : i + int(fit.batch_size)])
                err = (head(last) - target).pow(2).mean(-1)
                total += float(err[mask].sum())
                count += float(mask.sum())
                rows = target[mask].double()
                moments += torch.stack([rows.sum(), rows.pow(2).sum()]) / k
        count = max(count, 1.0)
        mean = moments[0] / count
        return total / count, float(moments[1] / count - mean**2)

    started = time.time()
    initial, constant = mse(valid)
    generator = torch.Generator().manual_seed(int(cfg.trainer.seed))
    for step in range(int(fit.steps)):
        rows = torch.randint(len(train), (int(fit.batch_size),), generator=generator).tolist()
        last, target, mask = features([train[r] for r in rows])
        loss = (head(last) - target).pow(2).mean(-1)[mask].mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        if (step + 1) % max(int(fit.steps) // 5, 1) == 0:
            log(f"  valence head step {step + 1}/{fit.steps} train mse {loss.item():.5f}")
    final, _ = mse(valid)
    if not math.isfinite(final):
        raise VkdError("fit-valence-head: the fit diverged (non-finite MSE); lower valence.fit.lr")
    save_head(
        head,
        out,
        teacher=str(cfg.teacher.path),
        labels=str(fit.labels),
        valid_mse=f"{final:.6f}",
    )
    summary = {
        "out": str(out),
        "initial_mse": initial,
        "final_mse": final,
        "constant_mse": constant,
        "seconds": time.time() - started,
    }
    log(
        f"valence head: held-out mse {initial:.5f} -> {final:.5f} "
        f"(best constant prediction: {constant:.5f}), saved {out}"
    )
    return summary
