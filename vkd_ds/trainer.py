"""The training loop: global-batch loss, gradient accumulation, eval, metrics, checkpoints."""

from __future__ import annotations

import json
import math
import os
import signal
import sys
import time
from collections import defaultdict
from contextlib import contextmanager
from pathlib import Path

import psutil
import torch
from omegaconf import DictConfig, OmegaConf

from vkd_ds import checkpoint, dist
from vkd_ds.data import Example, GlobalBatchSampler, collate, eval_shards, global_batch_order, rank_rows
from vkd_ds.errors import VkdError
from vkd_ds.gate import BLOCKED_MESSAGE, MercyGate
from vkd_ds.losses import (
    combine_terms,
    shift_for_next_token,
    soft_kd,
    token_ce,
    valence_mse,
    weighted_batch_loss,
)
from vkd_ds.metrics import MetricsSinks, get_logger
from vkd_ds.objective import Objective, Teacher
from vkd_ds.seq_kd import SequenceKD
from vkd_ds.terms import Rollout
from vkd_ds.valence import effective_sample_size, valence_weights


class Trainer:
    def __init__(
        self,
        cfg: DictConfig,
        engine,
        teacher: Teacher | None,
        objective: Objective,
        tokenizer,
        train_data: list[Example],
        valid_data: list[Example],
        run_dir: Path,
        gate: MercyGate,
        seq_kd: SequenceKD | None = None,
    ):
        self.cfg = cfg
        self.gate = gate
        self.seq_kd = seq_kd
        self.engine = engine
        self.teacher = teacher
        self.objective = objective
        self.vocab_size = len(tokenizer)
        self.pad_id = tokenizer.pad_token_id
        self.train_data = train_data
        self.valid_data = valid_data
        self.run_dir = run_dir
        self.chunk_tokens = int(cfg.loss.chunk_tokens)
        self.world = dist.world_size()
        self.rank = dist.rank()
        self.device = dist.device()
        self.on_gpu = dist.on_gpu()
        self.sampler = GlobalBatchSampler(
            len(train_data), cfg.trainer.micro_batch_size, cfg.trainer.grad_accum, self.world, cfg.trainer.seed
        )
        self.step = 0
        self.log = get_logger()
        self.nan_faults = _faults("VKD_FAULT_NAN_LOSS")
        self.nan_grad_faults = _faults("VKD_FAULT_NAN_GRAD")
        self.clock = PhaseClock(bool(cfg.trainer.time_phases), dist.on_gpu())
        # The latest step's metrics row goes into its checkpoint: a kill after the checkpoint but
        # before the row reached metrics.csv (during the eval that follows it) loses nothing.
        self.last_metrics: dict[str, float] | None = None
        self.resumed_metrics: dict[str, float] | None = None

    # ---- one optimizer step -------------------------------------------------------------
    def _batch(self, examples: list[Example]) -> dict[str, torch.Tensor]:
        return {k: v.to(self.device) for k, v in collate(examples, self.pad_id).items()}

    def _weights(
        self, saliencies: list[torch.Tensor], masks: list[torch.Tensor]
    ) -> tuple[list[torch.Tensor], torch.Tensor, dict[str, float]]:
        """w_i of this rank's micro-batches, from the saliencies of the whole global batch.

        The gathered vector is ordered (micro-step, rank, row), the order in which one rank
        with the concatenated batch would hold it, so every world size computes the same weights.
        A sequence with no valid position gets weight 0 and stays out of the batch statistics.
        """
        obj = self.objective
        valid = [m.any(1).to(s.dtype) for s, m in zip(saliencies, masks, strict=True)]
        # [accum, micro, 2] per rank: each row's saliency and whether it has a valid position.
        local = torch.stack([torch.stack(saliencies), torch.stack(valid)], dim=-1)
        rows = global_batch_order(dist.all_gather(local))  # [global batch, 2]
        global_s, global_valid = rows[:, 0], rows[:, 1] > 0
        w = valence_weights(global_s, obj.lam, obj.z_max, obj.normalize, obj.eps, valid=global_valid)
        mine = rank_rows(w, len(saliencies), self.world, self.rank)
        kept = global_s[global_valid].double() if bool(global_valid.any()) else global_s.double()
        stats = {
            "ess": float(effective_sample_size(w, global_valid)),
            "weight_max": float(w.max()),
            "saliency_mean": float(kept.mean()),
            "saliency_std": float(kept.std(unbiased=False)),
        }
        return list(mine), w.sum(), stats

    def _grad_norm_before_step(self) -> float | None:
        """DeepSpeed reports the global gradient norm under ZeRO 1-3 but not under ZeRO-0 with a
        torch optimizer; there the gradients are whole (and already averaged) on every rank."""
        if self.engine.zero_optimization_stage() != 0:
            return None
        grads = [p.grad.detach().double() for p in self.engine.module.parameters() if p.grad is not None]
        return float(torch.sqrt(sum((g * g).sum() for g in grads))) if grads else 0.0

    def _commit(self, step: int, nonfinite: bool, student_valence: torch.Tensor) -> dict[str, float]:
        """The optimizer step at the accumulation boundary, unless a non-finite loss on any rank or
        the mercy gate rejects it: then it is taken and reverted (see gate.py). A step DeepSpeed
        itself discards (ZeRO 1-3 and bf16 skip a step whose gradients are not finite) counts as
        skipped too, on every rank."""
        gate = self.gate
        skip = dist.any_rank(nonfinite)
        projected, rejected = None, False
        if not skip and gate.settings.enabled and gate.settings.mode == "proxy":
            projected = gate.projected_proxy(float(student_valence[0]), float(student_valence[1]))
            rejected = gate.rejects(projected)
        clock = self.clock
        lookahead = not skip and gate.settings.enabled and gate.settings.mode == "lookahead"
        revertible = skip or rejected or lookahead
        if revertible:
            with clock("gate"):
                gate.snapshot.take()
        with clock("optimizer"):
            self.engine.step()
        if not (skip or rejected) and self._engine_skipped_step():
            skip = True
        if lookahead and not skip:
            with clock("gate"):
                projected = gate.projected_lookahead()
                rejected = gate.rejects(projected)
        if revertible and (skip or rejected):
            with clock("gate"):
                gate.snapshot.restore()
        if skip and dist.is_main():
            self.log.warning(
                "step %d: non-finite loss or gradients on at least one rank; step skipped on every rank", step + 1
            )
        if rejected and dist.is_main():
            self.log.warning(
                "%s (step %d: projected %.6f < %.2f x teacher baseline %.6f)",
                BLOCKED_MESSAGE,
                step + 1,
                projected,
                gate.settings.ratio,
                gate.state.baseline,
            )
        gate.record(step + 1, rejected, skip)
        metrics = {"gate/rejected": gate.state.rejected, "gate/nonfinite": gate.state.nonfinite}
        metrics["gate/step_kept"] = int(not (skip or rejected))
        if gate.settings.enabled:
            metrics["gate/baseline"] = gate.state.baseline
            if projected is not None:
                metrics["gate/projected"] = projected
        return metrics

    def _engine_skipped_step(self) -> bool:
        """Whether DeepSpeed discarded the step it was just asked for, agreed over ranks. Under ZeRO 1-3
        and bf16 it checks the global gradient norm and skips the update when it is not finite
        (deepspeed >= 0.19.8; older releases applied it, which this refuses rather than let pass)."""
        applied = self.engine.was_step_applied()
        norm = self.engine.get_global_grad_norm()
        if applied and norm is not None and not math.isfinite(_as_float(norm)):
            raise VkdError(
                "DeepSpeed applied an optimizer step whose gradient norm is not finite; vkd-ds needs a "
                "DeepSpeed that skips such steps (pip install 'deepspeed>=0.19.8')"
            )
        return dist.any_rank(not applied)

    def train_step(self) -> dict[str, float]:
        started = time.perf_counter()
        if self.on_gpu:
            torch.cuda.reset_peak_memory_stats()  # mem_gpu_gb is this step's peak
        clock = self.clock
        clock.reset()
        step = self.step
        accum = self.cfg.trainer.grad_accum
        obj = self.objective
        examples = [[self.train_data[i] for i in self.sampler.indices(step, a, self.rank)] for a in range(accum)]
        micro_batches = [self._batch(ex) for ex in examples]
        stats: dict[str, float] = {}
        # Rollouts, like the teacher passes, all come before the first backward: the baseline
        # of L_seq is a statistic of the whole global batch.
        rollouts, advantages = [None] * accum, [None] * accum
        if self.seq_kd is not None and self.seq_kd.due(step):
            micro = self.cfg.trainer.micro_batch_size
            with clock("rollout"):
                rollouts = [
                    self.seq_kd.rollout(ex, step, (a * self.world + self.rank) * micro) for a, ex in enumerate(examples)
                ]
                advantages, seq_stats = self.seq_kd.advantages(rollouts)
            stats.update(seq_stats)
        # Every micro-batch's teacher pass comes first: the weights of the first backward
        # depend on the saliencies of the whole global batch.
        teacher_outs = [None] * accum
        if self.teacher is not None:
            with clock("teacher_forward"):
                teacher_outs = [self.teacher(mb["input_ids"], mb["attention_mask"]) for mb in micro_batches]
        if obj.teacher_valence:
            with clock("weights"):
                masks = [shift_for_next_token(mb["input_ids"], mb["loss_mask"])[1] for mb in micro_batches]
                saliencies = [obj.saliency(t, m) for t, m in zip(teacher_outs, masks, strict=True)]
                # global_weight_sum, the denominator of L, is the same number on every rank.
                weights, global_weight_sum, weight_stats = self._weights(saliencies, masks)
            stats.update(weight_stats)
        else:
            weights = [torch.ones(mb["input_ids"].shape[0], device=self.device) for mb in micro_batches]
            global_weight_sum = torch.tensor(float(self.sampler.global_batch_size), device=self.device)
        names = obj.active_at(rollout_step=rollouts[0] is not None)
        local = torch.zeros(len(names) + 2, dtype=torch.float64)
        lr = float(self.engine.get_lr()[0])  # the rate this step applies
        gate = self.gate
        if gate.settings.enabled and gate.baseline_due(step):
            with clock("gate"):
                gate.refresh_baseline(step)
            self.log.info("mercy gate: the teacher's baseline valence is %.6f (step %d)", gate.state.baseline, step)
        proxy = gate.settings.enabled and gate.settings.mode == "proxy"
        student_valence = torch.zeros(2, dtype=torch.float64)  # sum and count, for the proxy
        nonfinite = False
        for a, (batch, w) in enumerate(zip(micro_batches, weights, strict=True)):
            with clock("student_forward"):
                inputs = obj.train_inputs(batch, teacher_outs[a])
                student_out = self.engine(batch["input_ids"], batch["attention_mask"], **inputs)
            with clock("loss"):
                terms, mask = obj.terms(student_out, teacher_outs[a], batch)
            teacher_outs[a] = None  # free this micro-batch's teacher logits before the next
            if rollouts[a] is not None:
                # A second forward of the student, on its own samples; one backward covers both.
                with clock("student_forward"):
                    nll = obj.student_nll(self.engine, rollouts[a].batch)
                terms.update(obj.rollout_terms(Rollout(nll, rollouts[a].teacher_logprob, advantages[a]), mask))
                rollouts[a] = None
            with clock("loss"):
                base = combine_terms(terms, obj.lambdas)
                loss = weighted_batch_loss(base, w, global_weight_sum)
            if a == 0 and (step + 1, self.rank) in self.nan_faults:
                loss = loss * float("nan")  # fault injection (VKD_FAULT_NAN_LOSS), for tests
            if a == 0 and (step + 1, self.rank) in self.nan_grad_faults:
                loss = _NanGradient.apply(loss)  # fault injection (VKD_FAULT_NAN_GRAD): the loss stays finite
            if proxy:
                v = student_out["valence"].detach().float().mean(-1)
                student_valence += torch.tensor([float(v[mask].double().sum()), float(mask.sum())], dtype=torch.float64)
            nonfinite |= not bool(torch.isfinite(loss.detach()))
            # DeepSpeed averages gradients over ranks, while `loss` is already this rank's
            # share of the global sum: scale by the world size so the update is of L itself.
            with clock("backward"):
                self.engine.backward(loss * self.world, scale_wrt_gas=False)
            if a == accum - 1:
                grad_norm = self._grad_norm_before_step()
                nonfinite |= grad_norm is not None and not math.isfinite(grad_norm)
                stats.update(self._commit(step, nonfinite, student_valence))
            else:
                with clock("optimizer"):
                    self.engine.step()
            for j, name in enumerate(names):
                local[j] += float((w * terms[name].detach()).sum())
            local[-2] += float(loss.detach())
            local[-1] += float(mask.sum())
        total = dist.all_reduce_sum(local)
        elapsed = time.perf_counter() - started
        rss = dist.all_reduce_max(torch.tensor([_rss_gb(), _peak_rss_gb()]))  # the largest rank's
        metrics = {"step": step + 1, "loss": float(total[-2])}
        for j, name in enumerate(names):
            metrics[f"loss/{name}"] = float(total[j] / global_weight_sum)
        metrics.update(stats)
        metrics.update(clock.metrics(elapsed))
        metrics.update(
            {
                "lr": lr,
                "grad_norm": _as_float(self.engine.get_global_grad_norm()) if grad_norm is None else grad_norm,
                "tokens": int(total[-1]),
                "tokens_per_s": float(total[-1]) / elapsed,
                "step_time_s": elapsed,
                "epoch": self.sampler.epoch_of(step + 1),
                "mem_rss_gb": float(rss[0]),
                "mem_peak_rss_gb": float(rss[1]),
            }
        )
        if self.on_gpu:
            metrics["mem_gpu_gb"] = float(
                dist.all_reduce_max(torch.tensor([torch.cuda.max_memory_allocated() / 2**30]))[0]
            )
        self.step = step + 1
        return metrics

    # ---- held-out evaluation ------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Token-averaged held-out CE, perplexity, KL(teacher||student) at T=1, the teacher's CE and,
        with both valence heads, the MSE of the student's valence trajectory to the teacher's.
        Per-sequence values come from the fp32 chunked losses; their sums are float64 and stay on the
        batches' device until one all-reduce at the end."""
        if not self.valid_data:
            return {}
        self.engine.eval()
        sums = DeviceSums()
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
            counts = mask.sum(1)
            teacher_out = None
            if self.teacher is not None:
                teacher_out = self.teacher(batch["input_ids"], batch["attention_mask"])
            # KL to the teacher at T = 1, whatever the training temperature.
            inputs = self.objective.fused_inputs(batch, teacher_out, True, teacher_out is not None, temperature=1.0)
            student_out = self.engine(batch["input_ids"], batch["attention_mask"], **inputs)
            if inputs:
                ce, kl = student_out["ce"], student_out["soft"]
            else:
                logits = student_out["logits"]
                ce = token_ce(logits, targets, mask, self.vocab_size, self.chunk_tokens)
                if teacher_out is not None:
                    kl = soft_kd(logits, teacher_out["logits"], mask, 1.0, self.vocab_size, self.chunk_tokens)
            sums.add_weighted("student_nats", ce, counts)
            sums.add("tokens", counts)
            if teacher_out is not None:
                t_logits = teacher_out["logits"]
                sums.add_weighted("kl_nats", kl, counts)
                teacher_ce = token_ce(t_logits, targets, mask, self.vocab_size, self.chunk_tokens)
                sums.add_weighted("teacher_nats", teacher_ce, counts)
                if "valence" in student_out and "valence" in teacher_out:
                    mse = valence_mse(student_out["valence"], teacher_out["valence"], mask)
                    sums.add_weighted("valence_se", mse, counts)
                if not inputs:  # the fused LM head builds no student logits to compare
                    vocab = self.vocab_size
                    same = logits[..., :vocab].argmax(-1) == t_logits[..., :vocab].argmax(-1)
                    sums.add("top1_agree", same & mask)
        self.engine.train()
        total = sums.all_reduced(self.device)
        tokens = max(total["tokens"], 1.0)
        result = {"eval/ce": total["student_nats"] / tokens}
        result["eval/ppl"] = math.exp(min(result["eval/ce"], 50.0))
        if self.teacher is not None:
            result["eval/kl_teacher"] = total["kl_nats"] / tokens
            result["eval/teacher_ce"] = total["teacher_nats"] / tokens
            result["eval/teacher_ppl"] = math.exp(min(result["eval/teacher_ce"], 50.0))
            if not self.objective.fused_head:
                result["eval/top1_agreement"] = total["top1_agree"] / tokens
            if self.objective.valence_k is not None and self.objective.teacher_valence:
                result["eval/valence_mse"] = total["valence_se"] / tokens
        result["eval/tokens"] = int(total["tokens"])
        return result

    # ---- the loop -----------------------------------------------------------------------
    def client_state(self) -> dict:
        state = {
            "step": self.step,
            "samples_seen": self.step * self.sampler.global_batch_size,
            "world_size": self.world,
        }
        if self.seq_kd is not None:
            state["seq_kd"] = self.seq_kd.state_dict()
        state["gate"] = self.gate.state_dict()
        state["metrics"] = self.last_metrics
        return state

    def restore(self, client_state: dict) -> None:
        self.step = int(client_state["step"])
        if self.seq_kd is not None:
            self.seq_kd.load_state_dict(client_state.get("seq_kd", {}))
        self.gate.load_state_dict(client_state.get("gate", {}))
        self.resumed_metrics = client_state.get("metrics")

    def _due(self, every: int) -> bool:
        return (every > 0 and self.step % every == 0) or self.step == self.cfg.trainer.max_steps

    def fit(self) -> dict[str, float]:
        cfg = self.cfg.trainer
        sinks = None
        if dist.is_main():
            m = self.cfg.metrics
            config = OmegaConf.to_container(self.cfg, resolve=True)
            sinks = MetricsSinks(self.run_dir, self.step, bool(m.tensorboard), m.wandb_project, config)
        bar = self._progress_bar(cfg.max_steps)
        if self.step >= cfg.max_steps:
            self.log.info("run already complete at step %d (trainer.max_steps=%d)", self.step, cfg.max_steps)
        stop_at = cfg.max_steps
        if cfg.stop_after_steps is not None:
            stop_at = min(cfg.max_steps, self.step + cfg.stop_after_steps)
        last_eval = self._recover_resumed_row(sinks)
        preemption = Preemption(cfg.preempt_signals)
        preempted = False
        try:
            while self.step < stop_at and not preempted:
                metrics = self.train_step()
                self.last_metrics = metrics
                # A signal may reach some ranks only, or mid-step: the ranks agree at each step's end.
                preempted = dist.any_rank(preemption.received is not None)
                # The checkpoint comes before the eval: a failing or killed eval must not cost it.
                if self._due(cfg.save_every) or self.step == stop_at or preempted:
                    path = checkpoint.save(
                        self.engine,
                        self.run_dir,
                        self.step,
                        self.client_state(),
                        cfg.keep_checkpoints,
                        self.sampler.global_batch_size,
                    )
                    self.log.info("saved checkpoint %s", path)
                if self._due(cfg.eval_every):
                    last_eval = self.evaluate()
                    metrics.update(last_eval)
                if sinks is not None:
                    sinks.write(metrics)
                self._report(metrics, bar)
        finally:
            preemption.uninstall()
        if bar is not None:
            bar.close()
        if sinks is not None:
            sinks.close()
        if preempted:
            self.log.info(
                "preempted (%s) at step %d of %d; checkpoint saved", preemption.received, self.step, cfg.max_steps
            )
            if dist.is_main():
                _requeue(cfg.requeue, self.log)
            dist.barrier()
            return last_eval
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

    def _recover_resumed_row(self, sinks) -> dict[str, float]:
        """Collective. When the checkpoint resumed from holds a metrics row that metrics.csv lacks (the
        run was killed between that checkpoint and writing the row), write it now, with the step's
        eval when one was due (the weights are the checkpoint's, so it gives the same figures).
        Returns that eval, if any."""
        if self.resumed_metrics is None:
            return {}
        row, self.resumed_metrics = dict(self.resumed_metrics), None
        if not dist.any_rank(sinks is not None and not sinks.has_step(self.step)):  # only rank 0 reads the file
            return {}
        evaluated = self.evaluate() if self._due(self.cfg.trainer.eval_every) else {}
        row.update(evaluated)
        if sinks is not None:
            sinks.write(row)
            self.log.info("step %d: metrics row recovered from its checkpoint", self.step)
        return evaluated

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


class DeviceSums:
    """Named float64 sums of per-batch values, kept on the device the values are on: nothing is read
    back to the host per batch (a GPU eval never stalls on `.item()`), and values of any dtype
    (bf16 batches) or device add up without a host-side accumulator that CUDA tensors cannot be
    added into in place. Only arithmetic on the values themselves, no tensor factory."""

    NAMES = ("student_nats", "kl_nats", "teacher_nats", "tokens", "valence_se", "top1_agree")

    def __init__(self):
        self.sums: dict[str, torch.Tensor] = {}

    def add(self, name: str, values: torch.Tensor) -> None:
        """sums[name] += Σ values."""
        if name not in self.NAMES:
            raise KeyError(f"DeviceSums: unknown sum {name!r}")
        value = values.double().sum()
        self.sums[name] = value if name not in self.sums else self.sums[name] + value

    def add_weighted(self, name: str, values: torch.Tensor, weights: torch.Tensor) -> None:
        """sums[name] += Σ values · weights (e.g. a per-sequence mean times its token count)."""
        self.add(name, values.double() * weights.double())

    def all_reduced(self, device: torch.device) -> dict[str, float]:
        """Every name's sum over all ranks (a name no batch added is 0 on every rank): one all-reduce."""
        vector = torch.zeros(len(self.NAMES), dtype=torch.float64, device=device)
        for i, name in enumerate(self.NAMES):
            if name in self.sums:
                vector[i] = self.sums[name].to(device)
        total = dist.all_reduce_sum(vector).tolist()
        return dict(zip(self.NAMES, total, strict=True))


class PhaseClock:
    """Seconds of each phase of a step (`trainer.time_phases`), and `time/other`: what is left of the
    step (batching, the metric reductions, Python between phases). On GPUs every phase boundary
    synchronizes so that kernels count in the phase that launched them, which costs some speed;
    off by default."""

    def __init__(self, enabled: bool, synchronize: bool):
        self.enabled = enabled
        self.synchronize = synchronize and torch.cuda.is_available()
        self.seconds: dict[str, float] = defaultdict(float)

    def reset(self) -> None:
        self.seconds.clear()

    @contextmanager
    def __call__(self, phase: str):
        if not self.enabled:
            yield
            return
        if self.synchronize:
            torch.cuda.synchronize()
        started = time.perf_counter()
        try:
            yield
        finally:
            if self.synchronize:
                torch.cuda.synchronize()
            self.seconds[phase] += time.perf_counter() - started

    def metrics(self, step_seconds: float) -> dict[str, float]:
        if not self.enabled:
            return {}
        result = {f"time/{phase}": seconds for phase, seconds in sorted(self.seconds.items())}
        result["time/other"] = step_seconds - sum(self.seconds.values())
        return result


class Preemption:
    """Records the first of `names` (e.g. SIGUSR1, SIGTERM) this process receives; the loop checkpoints
    and stops at the end of the step. SLURM sends SIGUSR1 ahead of the time limit with
    `--signal=USR1@SECONDS`, and SIGTERM when it preempts or cancels a job."""

    def __init__(self, names):
        self.received: str | None = None
        self._previous = {}
        for name in names:
            number = getattr(signal, str(name))
            self._previous[number] = signal.signal(number, self._handler)

    def _handler(self, number, frame) -> None:
        if self.received is None:
            self.received = signal.Signals(number).name

    def uninstall(self) -> None:
        for number, handler in self._previous.items():
            signal.signal(number, handler)


def _requeue(mode: str, log) -> None:
    """Under SLURM (`trainer.requeue=auto`), put the job back in the queue: the requeued job runs the
    batch script again and resume=auto continues from the checkpoint just written."""
    job = os.environ.get("SLURM_JOB_ID")
    if mode == "never" or job is None:
        log.info("resume=auto continues from this checkpoint")
        return
    import subprocess

    result = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True)
    if result.returncode == 0:
        log.info("requeued SLURM job %s; it resumes from this checkpoint", job)
    else:
        log.warning("scontrol requeue %s failed (%s); resubmit to resume", job, result.stderr.strip())


class _NanGradient(torch.autograd.Function):
    """Identity forward, NaN backward: a finite loss whose gradient is NaN everywhere."""

    @staticmethod
    def forward(ctx, value):
        return value.view_as(value)

    @staticmethod
    def backward(ctx, grad):
        return grad * float("nan")


def _faults(variable: str) -> set[tuple[int, int]]:
    """(step, rank) pairs to inject a fault at, e.g. `VKD_FAULT_NAN_LOSS="3:1,4:1"` (steps count from 1):
    the hooks for testing the non-finite guard (VKD_FAULT_NAN_LOSS makes the loss NaN,
    VKD_FAULT_NAN_GRAD only its gradient). Unset in normal runs."""
    spec = os.environ.get(variable, "").strip()
    if not spec:
        return set()
    return {(int(a), int(b)) for a, b in (item.split(":") for item in spec.split(","))}


def _as_float(value) -> float:
    if value is None:
        return float("nan")
    return float(value.item() if hasattr(value, "item") else value)


def _rss_gb() -> float:
    return psutil.Process().memory_info().rss / 2**30


def _peak_rss_gb() -> float:
    """This process's peak resident memory since it started (Linux reports kilobytes)."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def _short(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)
