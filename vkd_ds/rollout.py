"""Student rollouts: prompts from the data, sampling from the student, scoring by the teacher.

Sequence-level KD (docs/objective.md, Sequence KD) and the mercy gate's lookahead both need the student to
generate. Two ways to run the student's LM under ZeRO-3:

- *gathered*: copy the full parameters into a plain (unsharded) model once per rollout,
  then generate with no collective at all;
- *synced*: generate through the ZeRO-3 module itself, which all-gathers every layer at
  every token; every rank must then run the same number of forwards, so each token step
  first agrees (one small all-reduce) whether any rank still generates.

Both give the same samples: each sequence draws its own uniforms from a generator seeded by
(seed, step, its index in the global batch), so samples do not depend on the mode, on the
number of ranks, or on how the batch is split.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from vkd_ds import dist
from vkd_ds.data import Example, collate
from vkd_ds.errors import VkdError
from vkd_ds.settings import GATHER_MODES  # declared beside the settings field rollout.gather_student

# `auto` gathers the student when its full parameters take at most this fraction of the
# memory left on the device (GPU) or machine (CPU).
AUTO_GATHER_MEMORY_FRACTION = 0.25


@dataclass(frozen=True)
class SamplingSettings:
    n_gen: int  # tokens to generate (fewer when a sequence samples EOS)
    temperature: float = 1.0
    top_p: float = 1.0
    prompt_tokens: int = 16  # prompt of a text record: its first tokens
    max_seq_len: int = 256  # prompt + generation never exceed this


def prompt_of(example: Example, settings: SamplingSettings) -> list[int]:
    """The prompt of a record: BOS + `prompt` for prompt/completion records, else the first
    `prompt_tokens` tokens of the text; long prompts keep their end so that prompt + n_gen
    fits in max_seq_len."""
    if example.prompt_len:
        n = example.prompt_len
    else:
        n = min(settings.prompt_tokens, len(example.input_ids) - 1)
    room = settings.max_seq_len - settings.n_gen
    return example.input_ids[:n][-room:]


def row_uniforms(seed: int, step: int, rows: list[int], n_gen: int) -> torch.Tensor:
    """[len(rows), n_gen] uniforms in (0, 1]; row r's come from a generator seeded by (seed, step, rows[r])."""
    out = torch.empty((len(rows), n_gen), dtype=torch.float64)
    for j, row in enumerate(rows):
        gen = torch.Generator().manual_seed((seed * 1_000_003 + step) * 1_000_033 + row)
        out[j] = 1.0 - torch.rand(n_gen, generator=gen, dtype=torch.float64)
    return out


def _pick(logits: torch.Tensor, uniforms: torch.Tensor, temperature: float, top_p: float) -> torch.Tensor:
    """Inverse-CDF sampling of one token per row from softmax(logits / T), nucleus-filtered at top_p.

    Deterministic given the uniforms, so the same uniforms give the same tokens wherever it runs."""
    probs = F.softmax(logits / temperature, dim=-1, dtype=torch.float64)
    order = None
    if top_p < 1.0:
        probs, order = probs.sort(dim=-1, descending=True)
        # Keep the smallest prefix whose mass reaches top_p (the first token always stays).
        probs = probs * ((probs.cumsum(-1) - probs) < top_p)
    cdf = probs.cumsum(-1)
    # The first index whose cdf reaches the draw: for a draw in (0, total] that token has mass > 0.
    draw = (uniforms.to(cdf.device) * cdf[:, -1]).unsqueeze(-1)
    index = torch.searchsorted(cdf, draw).clamp_(max=probs.shape[-1] - 1).squeeze(-1)
    return index if order is None else order.gather(-1, index[:, None]).squeeze(-1)


@dataclass
class Samples:
    prompts: list[list[int]]
    tokens: list[list[int]]  # generated tokens of each row (ending at EOS when it was sampled)
    token_logprobs: list[list[float]]  # log p_S (T = 1) of each generated token
    seconds: float

    @property
    def student_logprob(self) -> torch.Tensor:
        """[B] mean log p_S (T = 1) of each row's generated tokens."""
        return torch.tensor([sum(lp) / max(len(lp), 1) for lp in self.token_logprobs], dtype=torch.float32)

    @property
    def lengths(self) -> list[int]:
        return [len(t) for t in self.tokens]


@torch.no_grad()
def sample(
    lm,
    prompts: list[list[int]],
    uniforms: torch.Tensor,
    settings: SamplingSettings,
    vocab_size: int,
    eos_id: int | None,
    pad_id: int,
    synced: bool = False,
) -> Samples:
    """Batched sampling with a KV cache. Prompts are left-padded with explicit position ids.

    `synced`: `lm` is a ZeRO-3 module whose forward is collective: keep stepping (on a dummy
    token) until every rank is done, agreeing before each step."""
    started = time.perf_counter()
    device = next(lm.parameters()).device
    batch, width = len(prompts), max(len(p) for p in prompts)
    ids = torch.full((batch, width), pad_id, dtype=torch.long)
    attention = torch.zeros((batch, width), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt) :] = torch.tensor(prompt)
        attention[row, width - len(prompt) :] = 1
    ids, attention = ids.to(device), attention.to(device)
    positions = (attention.cumsum(-1) - 1).clamp_(min=0)
    done = torch.zeros(batch, dtype=torch.bool, device=device)
    tokens: list[list[int]] = [[] for _ in prompts]
    logprobs: list[list[float]] = [[] for _ in prompts]
    cache_key, extra = _forward_kwargs(lm)
    past = None
    step_ids, step_positions = ids, positions
    for t in range(settings.n_gen):
        finished = bool(done.all())
        if (dist.any_rank(not finished) is False) if synced else finished:
            break
        out = lm(
            input_ids=step_ids,
            attention_mask=attention,
            position_ids=step_positions,
            use_cache=True,
            **extra,
            **{cache_key: past},
        )
        past = out[cache_key]
        logits = out.logits[:, -1, :vocab_size].float()
        picked = _pick(logits, uniforms[:, t], settings.temperature, settings.top_p)
        active = ~done
        picked_logprob = F.log_softmax(logits, -1).gather(-1, picked[:, None]).squeeze(-1).tolist()
        for row, (token, live) in enumerate(zip(picked.tolist(), active.tolist(), strict=True)):
            if live:
                tokens[row].append(token)
                logprobs[row].append(picked_logprob[row])
        if eos_id is not None:
            done |= active & (picked == eos_id)
        step_ids = torch.where(active, picked, pad_id)[:, None]
        # Finished rows keep stepping on padding that nothing attends to.
        attention = torch.cat([attention, active.long()[:, None]], dim=1)
        step_positions = step_positions[:, -1:] + 1
    return Samples(prompts, tokens, logprobs, time.perf_counter() - started)


def _forward_kwargs(lm) -> tuple[str, dict]:
    """The KV cache's argument name (transformers 5 renamed `past_key_values` to `cache`), and
    `logits_to_keep=1` where supported: sampling needs the last position's logits only."""
    import inspect

    params = inspect.signature(lm.forward).parameters
    cache_key = "cache" if "cache" in params else "past_key_values"
    return cache_key, ({"logits_to_keep": 1} if "logits_to_keep" in params else {})


def rollout_batch(samples: Samples, pad_id: int) -> dict[str, torch.Tensor]:
    """Prompt + continuation of each row, right-padded like a data batch; the loss mask covers
    the generated tokens only."""
    examples = [
        Example(prompt + gen, [0] * len(prompt) + [1] * len(gen), "rollout")
        for prompt, gen in zip(samples.prompts, samples.tokens, strict=True)
    ]
    return collate(examples, pad_id)


class StudentSampler:
    """Generates with the student engine's LM, gathered once per rollout or synced (see module doc)."""

    def __init__(self, engine, gather: str):
        if gather not in GATHER_MODES:
            raise VkdError(f"config key `rollout.gather_student` must be one of {', '.join(GATHER_MODES)}")
        self.lm = engine.module.lm
        self.zero3 = engine.zero_optimization_stage() == 3
        self.gathered = self.zero3 and _gather_decision(self.lm, gather)
        self._copy = None

    @property
    def mode(self) -> str:
        if not self.zero3:
            return "whole"  # ZeRO 0-2: every rank holds the full parameters already
        return "gathered" if self.gathered else "synced"

    def _plain_copy(self):
        if self._copy is None:
            from transformers import AutoModelForCausalLM

            param = next(self.lm.parameters())
            # Building a model draws random init values; keep the training RNG streams untouched.
            with torch.random.fork_rng(devices=[dist.device()] if dist.on_gpu() else []):
                self._copy = AutoModelForCausalLM.from_config(
                    self.lm.config, dtype=param.dtype, attn_implementation=self.lm.config._attn_implementation
                )
            self._copy.to(dist.device()).eval().requires_grad_(False)
        dist.copy_full_params(self.lm, self._copy)
        return self._copy

    def __call__(self, prompts, uniforms, settings: SamplingSettings, vocab_size, eos_id, pad_id) -> Samples:
        lm = self._plain_copy() if self.gathered else self.lm
        with _eval_mode(lm):
            return sample(lm, prompts, uniforms, settings, vocab_size, eos_id, pad_id, synced=self.mode == "synced")


def _gather_decision(lm, gather: str) -> bool:
    if gather != "auto":
        return gather == "always"
    full_bytes = sum(getattr(p, "ds_numel", p.numel()) * p.element_size() for p in lm.parameters())
    if dist.on_gpu():
        free = torch.cuda.mem_get_info()[0]
    else:
        import psutil

        free = psutil.virtual_memory().available
    # Every rank must take the same path: gathering is collective.
    return dist.all_ranks(full_bytes <= AUTO_GATHER_MEMORY_FRACTION * free)


@contextlib.contextmanager
def _eval_mode(module):
    was_training = module.training
    module.eval()
    try:
        yield
    finally:
        module.train(was_training)
