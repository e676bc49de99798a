"""The training loop: global-batch loss, gradient accumulation, eval, metrics, checkpoints."""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path

import psutil
import torch
from omegaconf import DictConfig

from vkd_ds import checkpoint, dist
from vkd_ds.data import Example, GlobalBatchSampler, collate, eval_shards
from vkd_ds.losses import combine_terms, shift_for_next_token, soft_kd, token_ce, weighted_batch_loss
from vkd_ds.metrics import MetricsCSV, get_logger
from vkd_ds.models import lm_forward_logits

# Terms whose value needs the teacher's logits.
TEACHER_TERMS = ("soft",)
TRAIN_TERMS = ("ce", "soft")


class Trainer:
    def __init__(
        self,
        cfg: DictConfig,
        engine,
        teacher,
        tokenizer,
        train_data: list[Example],
        valid_data: list[Example],
        run_dir: Path,
    ):
        self.cfg = cfg
        self.engine = engine
        self.teacher = teacher
        self.vocab_size = len(tokenizer)
        self.pad_id = tokenizer.pad_token_id
        self.train_data = train_data
        self.valid_data = valid_data
        self.run_dir = run_dir
        self.lambdas = {term: float(cfg.loss[term]) for term in TRAIN_TERMS}
        self.temperature = float(cfg.loss.temperature)
        self.chunk_tokens = int(cfg.loss.chunk_tokens)
        self.world = dist.world_size()
        self.rank = dist.rank()
        self.device = dist.device()
        self.sampler = GlobalBatchSampler(
            len(train_data), cfg.trainer.micro_batch_size, cfg.trainer.grad_accum, self.world, cfg.trainer.seed
        )
        self.step = 0
        self.log = get_logger()

    # ---- one optimizer step -------------------------------------------------------------
    def _batch(self, examples: list[Example]) -> dict[str, torch.Tensor]:
        return {k: v.to(self.device) for k, v in collate(examples, self.pad_id).items()}

    def _terms(self, batch: dict[str, torch.Tensor], lambdas: dict[str, float]):
        """Per-sequence loss terms [B] of the student on `batch` (the teacher runs only when needed)."""
        targets, mask = shift_for_next_token(batch["input_ids"], batch["loss_mask"])
        teacher_logits = None
        if self.teacher is not None and any(lambdas.get(t, 0) > 0 for t in TEACHER_TERMS):
            with torch.no_grad():
                teacher_logits = lm_forward_logits(self.teacher, batch["input_ids"], batch["attention_mask"])
        logits = self.engine(batch["input_ids"], batch["attention_mask"])
        terms = {}
        if lambdas.get("ce", 0) > 0:
            terms["ce"] = token_ce(logits, targets, mask, self.vocab_size, self.chunk_tokens)
        if teacher_logits is not None and lambdas.get("soft", 0) > 0:
            terms["soft"] = soft_kd(logits, teacher_logits, mask, self.temperature, self.vocab_size, self.chunk_tokens)
        return terms, mask

    def train_step(self) -> dict[str, float]:
        started = time.perf_counter()
        step = self.step
        accum = self.cfg.trainer.grad_accum
        micro_batches = [
            self._batch([self.train_data[i] for i in self.sampler.indices(step, a, self.rank)]) for a in range(accum)
        ]
        # Per-sequence weights w_i (uniform until valence weighting) and their global sum,
        # the denominator of L over the whole global batch.
        weights = [torch.ones(mb["input_ids"].shape[0], device=self.device) for mb in micro_batches]
        global_weight_sum = dist.all_reduce_sum(torch.stack([w.sum() for w in weights]).sum())
        names = [t for t in TRAIN_TERMS if self.lambdas[t] > 0]
        local = torch.zeros(len(names) + 2, dtype=torch.float64)
        lr = float(self.engine.get_lr()[0])  # the rate this step applies
        for batch, w in zip(micro_batches, weights, strict=True):
            terms, mask = self._terms(batch, self.lambdas)
            base = combine_terms(terms, self.lambdas)
            loss = weighted_batch_loss(base, w, global_weight_sum)
            # DeepSpeed averages gradients over ranks, while `loss` is already this rank's
            # share of the global sum: scale by the world size so the update is of L itself.
            self.engine.backward(loss * self.world, scale_wrt_gas=False)
            self.engine.step()
            for j, name in enumerate(names):
                local[j] += float((w * terms[name].detach()).sum())
            local[-2] += float(loss.detach())
            local[-1] += float(mask.sum())
        total = dist.all_reduce_sum(local)
        elapsed = time.perf_counter() - started
        metrics = {"step": step + 1, "loss": float(total[-2])}
        for j, name in enumerate(names):
            metrics[f"loss/{name}"] = float(total[j] / global_weight_sum)
        metrics.update(
            {
                "lr": lr,
                "grad_norm": _as_float(self.engine.get_global_grad_norm()),
                "tokens": int(total[-1]),
                "tokens_per_s": float(total[-1]) / elapsed,
                "step_time_s": elapsed,
                "epoch": self.sampler.epoch_of(step + 1),
                "mem_rss_gb": float(dist.all_reduce_max(torch.tensor([_rss_gb()]))[0]),
            }
        )
        if torch.cuda.is_available() and dist.on_gpu():
            metrics["mem_gpu_gb"] = float(
                dist.all_reduce_max(torch.tensor([torch.cuda.max_memory_allocated() / 2**30]))[0]
            )
        self.step = step + 1
        return metrics

    # ---- held-out evaluation ------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Token-averaged held-out CE, perplexity, KL(teacher||student) at T=1, and the teacher's CE."""
        if not self.valid_data:
            return {}
        self.engine.eval()
        sums = torch.zeros(4, dtype=torch.float64)  # student nats, KL nats, teacher nats, tokens
        shards = eval_shards(
            len(self.valid_data),
            self.cfg.trainer.micro_batch_size,
            self.world,
            self.rank,
            self.cfg.trainer.eval_max_batches,
        )
        for indices in shards:
            # Padding entries (None) keep every rank's forward count equal; their mask is emptied.
            examples = [self.valid_data[i if i is not None else 0] for i in indices]
            batch = self._batch(examples)
            for row, i in enumerate(indices):
                if i is None:
                    batch["loss_mask"][row] = False
            targets, mask = shift_for_next_token(batch["input_ids"], batch["loss_mask"])
            counts = mask.sum(1).double()
            logits = self.engine(batch["input_ids"], batch["attention_mask"])
            sums[0] += (token_ce(logits, targets, mask, self.vocab_size, self.chunk_tokens).double() * counts).sum()
            if self.teacher is not None:
                t_logits = lm_forward_logits(self.teacher, batch["input_ids"], batch["attention_mask"])
                sums[1] += (
                    soft_kd(logits, t_logits, mask, 1.0, self.vocab_size, self.chunk_tokens).double() * counts
                ).sum()
                sums[2] += (
                    token_ce(t_logits, targets, mask, self.vocab_size, self.chunk_tokens).double() * counts
                ).sum()
            sums[3] += counts.sum()
        self.engine.train()
        total = dist.all_reduce_sum(sums)
        tokens = max(float(total[3]), 1.0)
        result = {"eval/ce": float(total[0]) / tokens}
        result["eval/ppl"] = math.exp(min(result["eval/ce"], 50.0))
        if self.teacher is not None:
            result["eval/kl_teacher"] = float(total[1]) / tokens
            result["eval/teacher_ce"] = float(total[2]) / tokens
            result["eval/teacher_ppl"] = math.exp(min(result["eval/teacher_ce"], 50.0))
        result["eval/tokens"] = int(total[3])
        return result

    # ---- the loop -----------------------------------------------------------------------
    def client_state(self) -> dict:
        return {"step": self.step, "samples_seen": self.step * self.sampler.global_batch_size, "world_size": self.world}

    def restore(self, client_state: dict) -> None:
        self.step = int(client_state["step"])

    def _due(self, every: int) -> bool:
        return (every > 0 and self.step % every == 0) or self.step == self.cfg.trainer.max_steps

    def fit(self) -> dict[str, float]:
        cfg = self.cfg.trainer
        csv = MetricsCSV(self.run_dir / "metrics.csv", resume_step=self.step) if dist.is_main() else None
        bar = self._progress_bar(cfg.max_steps)
        last_eval: dict[str, float] = {}
        if self.step >= cfg.max_steps:
            self.log.info("run already complete at step %d (trainer.max_steps=%d)", self.step, cfg.max_steps)
        stop_at = cfg.max_steps
        if cfg.stop_after_steps is not None:
            stop_at = min(cfg.max_steps, self.step + cfg.stop_after_steps)
        while self.step < stop_at:
            metrics = self.train_step()
            if self._due(cfg.eval_every):
                last_eval = self.evaluate()
                metrics.update(last_eval)
            if csv is not None:
                csv.write(metrics)
            self._report(metrics, bar)
            if self._due(cfg.save_every) or self.step == stop_at:
                path = checkpoint.save(self.engine, self.run_dir, self.step, self.client_state(), cfg.keep_checkpoints)
                self.log.info("saved checkpoint %s", path)
        if bar is not None:
            bar.close()
        if self.step < cfg.max_steps:
            self.log.info(
                "stopping at step %d of %d (trainer.stop_after_steps); resume=auto continues", self.step, cfg.max_steps
            )
            return last_eval
        if not last_eval:
            last_eval = self.evaluate()
        if dist.is_main():
            summary = {"step": self.step, **last_eval}
            (self.run_dir / "eval.json").write_text(json.dumps(summary, indent=2) + "\n")
        return last_eval

    def _progress_bar(self, total: int):
        wanted = self.cfg.trainer.progress_bar
        if not dist.is_main() or wanted is False or (wanted == "auto" and not sys.stderr.isatty()):
            return None
        from tqdm import tqdm

        return tqdm(total=total, initial=self.step, desc="distill", dynamic_ncols=True)

    def _report(self, metrics: dict[str, float], bar) -> None:
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{metrics['loss']:.4f}", tok_s=f"{metrics['tokens_per_s']:.0f}")
        if metrics["step"] % self.cfg.trainer.log_every == 0 or "eval/ce" in metrics:
            shown = {k: v for k, v in metrics.items() if k.startswith(("loss", "eval/")) or k in ("lr", "tokens_per_s")}
            self.log.info(
                "step %d/%d %s",
                metrics["step"],
                self.cfg.trainer.max_steps,
                " ".join(f"{k}={_short(v)}" for k, v in shown.items()),
            )


def _as_float(value) -> float:
    if value is None:
        return float("nan")
    return float(value.item() if hasattr(value, "item") else value)


def _rss_gb() -> float:
    return psutil.Process().memory_info().rss / 2**30


def _short(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)
