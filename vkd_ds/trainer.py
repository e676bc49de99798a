"""The training loop: global-batch loss, gradient accumulation, eval, metrics, checkpoints."""

from __future__ import annotations

import json
import math
import os
import signal
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import psutil
import torch

from vkd_ds import checkpoint, dist
from vkd_ds.data import Example, GlobalBatchSampler, collate, collate_packed, global_batch_order
from vkd_ds.evaluation import evaluate
from vkd_ds.gate import MercyGate
from vkd_ds.losses import combine_terms, shift_for_next_token, weighted_batch_loss
from vkd_ds.memory import GIB, peak_rss_bytes, rss_bytes
from vkd_ds.metrics import MetricsSinks, get_logger
from vkd_ds.objective import Objective, Teacher
from vkd_ds.packing import PackedRows
from vkd_ds.phase_clock import PhaseClock
from vkd_ds.rollout import Samples
from vkd_ds.seq_kd import SequenceKD, is_on_policy_step
from vkd_ds.sequences import Sequences, model_inputs, on_device, to_device
from vkd_ds.settings import Settings
from vkd_ds.step_guard import StepGuard
from vkd_ds.terms import SampleScores
from vkd_ds.token_store import TokenRows
from vkd_ds.valence import effective_sample_size, masked_mean_std, valence_weights


class StepSums:
    """This rank's sums over its micro-batches of one optimizer step, kept on the device: adding to them
    reads nothing into the host. They are read once, with everything else the step's commit needs
    (`Trainer._read_step`)."""

    FIXED = (
        "loss",  # Σ of the micro-batches' losses (each is its share of the global L)
        "tokens",  # valid positions
        "real_tokens",  # the micro-batches' tokens that are not padding
        "positions",  # all their positions, padding included
        "valence",  # Σ of the student's valence over valid positions (the proxy gate's)
        "teacher_valence",  # Σ of the teacher's valence over the same positions (the gate's arming)
        "valence_count",
        "nonfinite",  # micro-batches whose loss was not finite
    )

    def __init__(self, terms: list[str], device: torch.device):
        self.terms = list(terms)  # Σ_i w_i · term_i for each term computed at the step
        names = [f"loss/{name}" for name in self.terms] + list(self.FIXED)
        self.slots = {name: i for i, name in enumerate(names)}
        self.values = torch.zeros(len(names), dtype=torch.float64, device=device)

    def add(self, name: str, value: torch.Tensor | float) -> None:
        slot = self.values[self.slots[name]]
        slot.add_(value.detach().double() if isinstance(value, torch.Tensor) else float(value))

    def entries(self) -> list[tuple[str, str, torch.Tensor]]:
        """What `dist.read_once` sums over ranks."""
        return [(name, "sum", self.values[i]) for name, i in self.slots.items()]


class Trainer:
    def __init__(
        self,
        settings: Settings,
        engine,
        teacher: Teacher | None,
        objective: Objective,
        tokenizer,
        train_data: TokenRows,
        valid_data: Sequence[Example],
        run_dir: Path,
        gate: MercyGate | None,
        seq_kd: SequenceKD | None = None,
        packs: PackedRows | None = None,
    ):
        """`gate`: None with gate.enabled=false. `seq_kd`: the student's sampling, for L_seq and for
        on-policy steps (None when neither is on). `packs`: the training rows packed (data.packing),
        which the sampler then draws instead of single rows."""
        self.settings = settings
        t = settings.trainer
        self.seq_kd = seq_kd
        self.onpolicy_fraction = settings.onpolicy.fraction
        self.engine = engine
        self.teacher = teacher
        self.objective = objective
        self.vocab_size = len(tokenizer)
        self.pad_id = tokenizer.pad_token_id
        self.train_data = train_data
        self.packs = packs
        self.valid_data = valid_data
        self.run_dir = run_dir
        self.world = dist.world_size()
        self.rank = dist.rank()
        self.device = dist.device()
        self.on_gpu = dist.on_gpu()
        units = train_data if packs is None else packs
        self.sampler = GlobalBatchSampler(
            len(units), t.micro_batch_size, t.grad_accum, self.world, t.seed, units.mixture()
        )
        # Documents in each packed row (1 each unpacked): what the per-document bookkeeping counts.
        self.pack_sizes = None if packs is None else packs.sizes()
        self.step = 0
        self.log = get_logger()
        self.nan_faults = _faults("VKD_FAULT_NAN_LOSS")
        self.nan_grad_faults = _faults("VKD_FAULT_NAN_GRAD")
        self.clock = PhaseClock(t.time_phases, dist.on_gpu())
        self.guard = StepGuard(
            engine,
            gate,
            settings.gate.max_consecutive_rejections,
            self.clock,
            self.log,
            can_revert=settings.deepspeed.offload_optimizer != "nvme",
        )
        # The latest step's metrics row goes into its checkpoint: a kill after the checkpoint but
        # before the row reached metrics.csv (during the eval that follows it) loses nothing.
        self.last_metrics: dict[str, float] | None = None
        self.resumed_metrics: dict[str, float] | None = None
        # How this start went (the teacher's load): rank 0 writes it to startup.json after the first
        # step, with the time from the process's start to that step's end.
        self.startup: dict = {}

    # ---- one optimizer step -------------------------------------------------------------
    def train_step(self) -> dict[str, float]:
        """One optimizer step over the global batch, in phases: rollouts, teacher passes, weights,
        forward and backward per micro-batch, the commit, metrics. Everything global (L_seq's
        baseline, the weights' batch statistics) is known before the first backward."""
        started = time.perf_counter()
        self.clock.reset()
        step, accum = self.step, self.settings.trainer.grad_accum
        layouts = [self._documents(step, a) for a in range(accum)]
        examples = [docs for docs, _ in layouts]
        counts = self._document_counts(step)
        stats: dict[str, float] = {}
        on_policy = is_on_policy_step(self.settings.trainer.seed, step, self.onpolicy_fraction)
        if self.onpolicy_fraction > 0:
            stats["onpolicy"] = float(on_policy)
        samples = self._on_policy_samples(step, examples, counts) if on_policy else None
        micro_batches = [b for b, _ in samples] if on_policy else [self._batch(ex, rows) for ex, rows in layouts]
        teacher_outs = self._teacher_passes(micro_batches)
        rollouts = self._rollouts(step, examples, counts, stats, samples, teacher_outs)
        weights, weight_sum = self._sequence_weights(micro_batches, teacher_outs, counts, stats)
        lr = float(self.engine.get_lr()[0])  # the rate this step applies
        self.guard.start_step(step)
        active = self.objective.active_at(rollout_step=rollouts[0] is not None, on_policy=on_policy)
        sums = StepSums(active, self.device)
        for a, batch in enumerate(micro_batches):
            # The list gives up its teacher outputs here: _forward_backward drops them before backward.
            self._forward_backward(step, a, batch, teacher_outs, rollouts[a], weights[a], weight_sum, sums, on_policy)
            rollouts[a] = None
            if a < accum - 1:
                with self.clock("optimizer"):
                    self.engine.step()  # DeepSpeed counts the micro-step; the update waits for the boundary
        read = self._read_step(sums, weight_sum, stats, self.guard.grad_norm_before_step())
        nonfinite = read.pop("nonfinite") > 0 or not math.isfinite(read.get("grad_norm", 0.0))
        stats.update(
            self.guard.commit(
                step, nonfinite, read.pop("valence"), read.pop("teacher_valence"), read.pop("valence_count")
            )
        )
        self.step = step + 1
        return self._step_metrics(read, sums.terms, stats, lr, started)

    def _read_step(
        self, sums: StepSums, weight_sum: torch.Tensor, stats: dict, grad_norm: torch.Tensor | None
    ) -> dict[str, float]:
        """The step's one read into the host, before its commit: the sums over every rank, whether any
        rank's loss or gradient norm was not finite, the proxy gate's valence sums, the batch's
        statistics (tensors in `stats`, replaced by their values) and the memory figures (the largest
        rank's, as of this point)."""
        entries = sums.entries()
        entries.append(("weight_sum", "first", weight_sum))  # Σw of the global batch: alike on every rank
        entries += [(name, "first", v) for name, v in stats.items() if isinstance(v, torch.Tensor)]
        if grad_norm is not None:  # ZeRO-0: whole, averaged gradients, alike on every rank
            entries.append(("grad_norm", "first", grad_norm))
        entries += [("mem_rss_gb", "max", _rss_gb()), ("mem_peak_rss_gb", "max", _peak_rss_gb())]
        if self.on_gpu:
            # The peak since the previous step's read: this step's forwards and backwards, and the
            # previous step's optimizer update.
            entries.append(("mem_gpu_gb", "max", torch.cuda.max_memory_allocated() / 2**30))
            torch.cuda.reset_peak_memory_stats()
        read = dist.read_once(entries)
        for name in stats:
            if name in read:
                stats[name] = read.pop(name)
        return read

    def _documents(self, step: int, micro_step: int) -> tuple[list[Example], list[int] | None]:
        """This rank's documents of a micro-step, and how many of them each packed row holds (None unpacked)."""
        units = self.sampler.indices(step, micro_step, self.rank)
        if self.packs is None:
            return [self.train_data[i] for i in units], None
        packs = [self.packs[i] for i in units]
        return [doc for pack in packs for doc in pack], [len(pack) for pack in packs]

    def _document_counts(self, step: int) -> np.ndarray:
        """[accum, world] documents of every rank's micro-batches of a step (the same on every rank:
        the sampler is deterministic), in the stream order (micro-step, rank) of the global batch.
        Host numbers (numpy): the step's bookkeeping reads them without touching the device."""
        accum, micro = self.settings.trainer.grad_accum, self.settings.trainer.micro_batch_size
        if self.pack_sizes is None:
            return np.full((accum, self.world), micro, dtype=np.int64)
        sizes = np.asarray(self.pack_sizes)
        return np.array(
            [[sizes[self.sampler.indices(step, a, r)].sum() for r in range(self.world)] for a in range(accum)],
            dtype=np.int64,
        )

    def _first_document(self, counts: np.ndarray, micro_step: int) -> int:
        """The global-batch index of this rank's first document of a micro-step (it seeds the draws)."""
        return int(counts.flatten()[: micro_step * self.world + self.rank].sum())

    def _batch(self, examples: list[Example], rows: list[int] | None) -> dict[str, torch.Tensor]:
        batch = collate(examples, self.pad_id) if rows is None else collate_packed(examples, self.pad_id, rows)
        return on_device(batch, self.device)

    def _on_policy_samples(
        self, step: int, examples: list[list[Example]], counts: torch.Tensor
    ) -> list[tuple[dict, Samples]]:
        """On an on-policy step: every micro-batch's sequences replaced by the student's samples from
        their prompts (as batches of one sample per row, the loss mask on the samples)."""
        with self.clock("rollout"):
            return [
                self.seq_kd.sample_batch(ex, step, self._first_document(counts, a)) for a, ex in enumerate(examples)
            ]

    def _rollouts(
        self,
        step: int,
        examples: list[list[Example]],
        counts: torch.Tensor,
        stats: dict,
        on_policy: list[tuple[dict, Samples]] | None,
        teacher_outs: list[dict | None],
    ) -> list[_PendingRollout | None]:
        """Sequence KD's samples of every micro-batch, scored by the teacher, with their advantages
        (the baseline is a statistic of the whole global batch); [None] * accum off rollout steps.
        On an on-policy step they are that step's samples (the same draws), scored by its teacher pass."""
        if self.seq_kd is None or not self.seq_kd.due(step):
            return [None] * len(examples)
        with self.clock("rollout"):
            if on_policy is not None:
                samples = [
                    self.seq_kd.score(batch, drawn, out["logits"])
                    for (batch, drawn), out in zip(on_policy, teacher_outs, strict=True)
                ]
            else:
                samples = [
                    self.seq_kd.rollout(ex, step, self._first_document(counts, a)) for a, ex in enumerate(examples)
                ]
            advantages, seq_stats = self.seq_kd.advantages(samples)
        stats.update(seq_stats)
        # The student's log-prob of its samples comes later, with the micro-batch's forward.
        return [_PendingRollout(s.batch, s.teacher_logprob, adv) for s, adv in zip(samples, advantages, strict=True)]

    def _teacher_passes(self, micro_batches: list[dict]) -> list[dict | None]:
        """Every micro-batch's teacher pass before the first backward: the weights of the first
        backward depend on the saliencies of the whole global batch."""
        if self.teacher is None:
            return [None] * len(micro_batches)
        with self.clock("teacher_forward"):
            return [self.teacher.on_batch(mb) for mb in micro_batches]

    def _sequence_weights(
        self, micro_batches: list[dict], teacher_outs: list[dict | None], counts: np.ndarray, stats: dict
    ) -> tuple[list[torch.Tensor], torch.Tensor]:
        """w_i of this rank's sequences (documents) per micro-batch, and Σ w over the global batch (the
        same number on every rank: the denominator of L). Uniform without the teacher's valence."""
        obj = self.objective
        if not obj.teacher_valence:
            weights = [torch.ones(int(n), device=self.device) for n in counts[:, self.rank]]
            return weights, torch.full((), float(counts.sum()), device=self.device)
        with self.clock("weights"):
            masks = [shift_for_next_token(mb["input_ids"], mb["loss_mask"])[1] for mb in micro_batches]
            sequences = [Sequences.of_batch(mb) for mb in micro_batches]
            saliencies = [obj.saliency(t, m, q) for t, m, q in zip(teacher_outs, masks, sequences, strict=True)]
            valid = [q.any(m) for q, m in zip(sequences, masks, strict=True)]
            weights, weight_sum, weight_stats = self._weights(saliencies, valid, counts)
        stats.update(weight_stats)
        return weights, weight_sum

    def _forward_backward(
        self,
        step: int,
        micro_step: int,
        batch: dict,
        teacher_outs: list[dict | None],
        rollout: _PendingRollout | None,
        w: torch.Tensor,
        weight_sum: torch.Tensor,
        sums: StepSums,
        on_policy: bool,
    ) -> None:
        """One micro-batch: the student's forwards, the terms, this rank's share of L, backward; its
        contributions added to `sums`. `teacher_outs`: the step's teacher outputs; this micro-batch's
        is taken out of the list, and it and the student's outputs are dropped before backward, which
        needs neither: their logits ([tokens, vocab] each) would otherwise be held beside the loss's
        stored gradients."""
        obj, clock = self.objective, self.clock
        teacher_out, teacher_outs[micro_step] = teacher_outs[micro_step], None
        with clock("student_forward"):
            student_out = self.engine(**model_inputs(batch), **obj.train_inputs(batch, teacher_out, on_policy))
        with clock("loss"):
            terms, mask = obj.terms(student_out, teacher_out, batch, on_policy)
        if rollout is not None:
            # A second forward of the student, on its own samples; one backward covers both.
            with clock("student_forward"):
                surrogate = obj.student_nll(self.engine, rollout.batch, rollout.token_advantage)
            terms.update(obj.rollout_terms(SampleScores(surrogate, rollout.teacher_logprob), mask))
        with clock("loss"):
            loss = weighted_batch_loss(combine_terms(terms, obj.lambdas), w, weight_sum)
        if micro_step == 0 and (step + 1, self.rank) in self.nan_faults:
            loss = loss * float("nan")  # fault injection (VKD_FAULT_NAN_LOSS), for tests
        if micro_step == 0 and (step + 1, self.rank) in self.nan_grad_faults:
            loss = _NanGradient.apply(loss)  # fault injection (VKD_FAULT_NAN_GRAD): the loss stays finite
        if self.guard.wants_student_valence:
            with clock("gate"):
                self._add_valence(student_out["valence"], teacher_out, mask, sums)
        del student_out, teacher_out
        # DeepSpeed averages gradients over ranks, while `loss` is already this rank's
        # share of the global sum: scale by the world size so the update is of L itself.
        with clock("backward"):
            self.engine.backward(loss * self.world, scale_wrt_gas=False)
        for name in sums.terms:
            sums.add(f"loss/{name}", (w * terms[name].detach()).sum())
        sums.add("loss", loss)
        sums.add("nonfinite", ~torch.isfinite(loss.detach()))
        sums.add("tokens", mask.sum())
        sums.add("real_tokens", batch["attention_mask"].sum())
        sums.add("positions", batch["attention_mask"].numel())

    @staticmethod
    def _add_valence(student: torch.Tensor, teacher_out: dict | None, mask: torch.Tensor, sums: StepSums) -> None:
        """The proxy gate's sums over the valid positions (the shifted mask, as L_val's): the student's
        valence and the teacher's (means over the k steps), whose batch means arm the gate."""
        sums.add("valence", _masked_sum(student.detach().float().mean(-1), mask))
        sums.add("valence_count", mask.sum())
        if teacher_out is not None and teacher_out.get("valence") is not None:
            sums.add("teacher_valence", _masked_sum(teacher_out["valence"].float().mean(-1), mask))

    def _weights(
        self, saliencies: list[torch.Tensor], valid: list[torch.Tensor], counts: np.ndarray
    ) -> tuple[list[torch.Tensor], torch.Tensor, dict[str, torch.Tensor]]:
        """w_i of this rank's micro-batches, from the saliencies of the whole global batch.

        The gathered vector is ordered (micro-step, rank, document), the order in which one rank
        with the concatenated batch would hold it, so every world size computes the same weights.
        Micro-batches hold different numbers of documents when rows are packed: each is padded to the
        step's largest for the gather, and the padding dropped again by `counts` (known on every rank).
        A sequence with no valid position gets weight 0 and stays out of the batch statistics.
        """
        obj = self.objective
        slots = int(counts.max())
        local = torch.zeros((len(saliencies), slots, 2), dtype=saliencies[0].dtype, device=saliencies[0].device)
        for a, (s, v) in enumerate(zip(saliencies, valid, strict=True)):
            local[a, : s.numel(), 0] = s
            local[a, : s.numel(), 1] = v.to(s.dtype)
        ordered = global_batch_order(dist.all_gather(local))  # [accum·world·slots, 2], (micro-step, rank, slot)
        # The filled slots, found from `counts` on the host (a boolean index on the device would wait for it).
        filled = np.flatnonzero((np.arange(slots)[None, None, :] < counts[:, :, None]).ravel())
        rows = ordered.index_select(0, to_device(torch.from_numpy(filled), ordered.device))  # [documents, 2]
        global_s, global_valid = rows[:, 0], rows[:, 1] > 0
        w = valence_weights(global_s, obj.lam, obj.z_max, obj.normalize, obj.eps, valid=global_valid)
        flat = counts.ravel()
        starts = np.cumsum(flat) - flat
        mine = [
            w[int(starts[a * self.world + self.rank]) :][: int(counts[a, self.rank])] for a in range(len(saliencies))
        ]
        # The saliency's statistics over the valid documents (over all of them when none is valid);
        # device tensors, read with the step's commit.
        keep = global_valid | ~global_valid.any()
        mean, std = masked_mean_std(global_s.double(), keep)
        stats = {
            "ess": effective_sample_size(w, global_valid),
            "weight_max": w.max(),
            "saliency_mean": mean,
            "saliency_std": std,
        }
        return list(mine), w.sum(), stats

    def _step_metrics(
        self, read: dict[str, float], terms: list[str], stats: dict, lr: float, started: float
    ) -> dict[str, float]:
        """The step's metrics row, from the step's read (`_read_step`) and, under ZeRO 1-3, DeepSpeed's
        gradient norm (a device tensor until the row is written: `host_row`)."""
        elapsed = time.perf_counter() - started
        metrics = {"step": self.step, "loss": read["loss"]}
        for name in terms:
            metrics[f"loss/{name}"] = read[f"loss/{name}"] / read["weight_sum"] if read["weight_sum"] else float("nan")
        metrics.update(stats)
        metrics.update(self.clock.metrics(elapsed))
        grad_norm = read["grad_norm"] if "grad_norm" in read else self.engine.get_global_grad_norm()
        metrics.update(
            {
                "lr": lr,
                "grad_norm": float("nan") if grad_norm is None else grad_norm,
                "tokens": int(read["tokens"]),
                "tokens_per_s": read["tokens"] / elapsed,
                # Non-padding tokens per second, and their share of the rows (data.packing's point).
                "real_tokens_per_s": read["real_tokens"] / elapsed,
                "fill": read["real_tokens"] / max(read["positions"], 1.0),
                "step_time_s": elapsed,
                "epoch": self.sampler.epoch_of(self.step),
                "mem_rss_gb": read["mem_rss_gb"],
                "mem_peak_rss_gb": read["mem_peak_rss_gb"],
            }
        )
        if "mem_gpu_gb" in read:
            metrics["mem_gpu_gb"] = read["mem_gpu_gb"]
        return metrics

    # ---- held-out evaluation ------------------------------------------------------------
    def evaluate(self) -> dict[str, float]:
        t = self.settings.trainer
        return evaluate(
            self.engine,
            self.teacher,
            self.objective,
            self.valid_data,
            self.pad_id,
            int(t.micro_batch_size),
            t.eval_max_batches,
        )

    # ---- the loop -----------------------------------------------------------------------
    def client_state(self) -> dict:
        state = {
            "step": self.step,
            "samples_seen": self.step * self.sampler.global_batch_size,
            "world_size": self.world,
        }
        if self.seq_kd is not None:
            state["seq_kd"] = self.seq_kd.state_dict()
        state["gate"] = self.guard.state_dict()
        state["metrics"] = self.last_metrics
        state["data"] = self.train_data.fingerprint  # the token store's
        state["pack_length"] = None if self.packs is None else self.packs.capacity  # what the sampler draws
        return state

    def restore(self, client_state: dict) -> None:
        self.step = int(client_state["step"])
        if self.seq_kd is not None:
            self.seq_kd.load_state_dict(client_state.get("seq_kd", {}))
        self.guard.load_state_dict(client_state.get("gate", {}))
        self.resumed_metrics = client_state.get("metrics")
        saved, now = client_state.get("data"), self.train_data.fingerprint
        if saved is not None and saved != now:  # None: a checkpoint from before token stores
            # The data order goes on by step, but over other rows: the curve is not the one that was
            # interrupted (an edited data file, another max_seq_len or tokenizer make another store).
            self.log.warning(
                "resuming on other training data than the checkpoint's (token store %s now, %s then): "
                "the run continues, its data order by step over the new rows",
                now[:20],
                saved[:20],
            )

        packing = (client_state.get("pack_length"), None if self.packs is None else self.packs.capacity)
        if "pack_length" in client_state and packing[0] != packing[1]:
            # The sampler draws packs, or rows: the same step is another place in another stream.
            self.log.warning(
                "resuming with other packing than the checkpoint's (%s now, %s then): the run continues, "
                "its data order by step over the new rows",
                _packing_name(packing[1]),
                _packing_name(packing[0]),
            )

    def _due(self, every: int) -> bool:
        return (every > 0 and self.step % every == 0) or self.step == self.settings.trainer.max_steps

    def fit(self) -> dict[str, float]:
        cfg = self.settings.trainer
        sinks = None
        if dist.is_main():
            m = self.settings.metrics
            config = self.settings.resolved
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
        first_step = True
        try:
            while self.step < stop_at and not preempted:
                metrics = host_row(self.train_step())  # logging reads the step's last device values
                self.last_metrics = metrics
                if first_step:
                    self._record_startup()
                    first_step = False
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

    def _record_startup(self) -> None:
        seconds = time.time() - psutil.Process().create_time()
        self.log.info("first step done %.1f s after the process started", seconds)
        if dist.is_main():
            figures = {**self.startup, "first_step": self.step, "time_to_first_step_s": seconds}
            checkpoint.write_atomic(self.run_dir / "startup.json", json.dumps(figures, indent=2) + "\n")

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
        evaluated = self.evaluate() if self._due(self.settings.trainer.eval_every) else {}
        row.update(evaluated)
        if sinks is not None:
            sinks.write(row)
            self.log.info("step %d: metrics row recovered from its checkpoint", self.step)
        return evaluated

    def _progress_bar(self, total: int):
        wanted = self.settings.trainer.progress_bar
        if not dist.is_main() or wanted is False or (wanted == "auto" and not sys.stderr.isatty()):
            return None
        from tqdm import tqdm

        return tqdm(total=total, initial=self.step, desc="distill", dynamic_ncols=True)

    def _report(self, metrics: dict[str, float], bar) -> None:
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{metrics['loss']:.4f}", tok_s=f"{metrics['tokens_per_s']:.0f}")
        if metrics["step"] % self.settings.trainer.log_every == 0 or "eval/ce" in metrics:
            shown = {k: v for k, v in metrics.items() if k.startswith(("loss", "eval/")) or k in ("lr", "tokens_per_s")}
            self.log.info(
                "step %d/%d %s",
                metrics["step"],
                self.settings.trainer.max_steps,
                " ".join(f"{k}={_short(v)}" for k, v in shown.items()),
            )


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

    # Logged first: the requeue cancels this job's own tasks, possibly before scontrol returns here.
    log.info("requeueing SLURM job %s; it resumes from this checkpoint", job)
    result = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True)
    if result.returncode != 0:
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


def host_row(metrics: dict) -> dict[str, float]:
    """A metrics row with its device tensors (DeepSpeed's gradient norm) read into the host."""
    return {k: float(v.item()) if isinstance(v, torch.Tensor) else v for k, v in metrics.items()}


def _masked_sum(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Σ of `values` where `mask`, in float64, without selecting (a boolean index waits for the device)."""
    return torch.where(mask, values.double(), 0.0).sum()


def _rss_gb() -> float:
    return rss_bytes() / GIB


def _peak_rss_gb() -> float:
    """This process's peak resident memory since training began (train() resets it after loading)."""
    return peak_rss_bytes() / GIB


def _packing_name(pack_length: int | None) -> str:
    return "unpacked" if pack_length is None else f"rows of {pack_length} tokens packed"


def _short(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


@dataclass
class _PendingRollout:
    """A micro-batch's samples (as a batch), the teacher's mean log-prob of them and the advantage of
    every sampled token."""

    batch: dict
    teacher_logprob: torch.Tensor  # [B]
    token_advantage: torch.Tensor  # [B,S], 0 off the samples
