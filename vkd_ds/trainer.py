"""The training loop: global-batch loss, gradient accumulation, eval, metrics, checkpoints.

A step's parts live beside it: which documents each micro-batch holds (step_layout), sequence KD's
samples (step_rollouts), the valence weights (batch_weights), the step's one read and its metrics
row (step_read), the commit (step_guard); preemption, progress, phase_clock and faults serve the loop."""

from __future__ import annotations

import json
import math
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import psutil
import torch

from vkd_ds import checkpoint, dist
from vkd_ds.batch_weights import global_batch_weights
from vkd_ds.data import Example
from vkd_ds.evaluation import evaluate
from vkd_ds.faults import Faults
from vkd_ds.gate import MercyGate
from vkd_ds.losses import combine_terms, shift_for_next_token, weighted_batch_loss
from vkd_ds.metrics import MetricsSinks, get_logger
from vkd_ds.objective import Objective, Teacher
from vkd_ds.packing import PackedRows
from vkd_ds.phase_clock import PhaseClock
from vkd_ds.preemption import Preemption, requeue
from vkd_ds.progress import Progress
from vkd_ds.seq_kd import SequenceKD, is_on_policy_step
from vkd_ds.sequences import Sequences, model_inputs
from vkd_ds.settings import Settings
from vkd_ds.step_guard import StepGuard
from vkd_ds.step_layout import StepLayout
from vkd_ds.step_read import StepSums, host_row, read_step, step_row
from vkd_ds.step_rollouts import PendingRollout, StepRollouts
from vkd_ds.terms import SampleScores
from vkd_ds.token_store import TokenRows


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
        self.layout = StepLayout(
            train_data, packs, t.micro_batch_size, t.grad_accum, t.seed, self.pad_id, self.device, objective.cross
        )
        self.step = 0
        self.log = get_logger()
        self.faults = Faults()
        self.clock = PhaseClock(t.time_phases, dist.on_gpu())
        self.rollouts = StepRollouts(seq_kd, self.layout, self.clock)
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
        drawn = [self.layout.documents(step, a) for a in range(accum)]
        examples = [docs for docs, _ in drawn]
        counts = self.layout.document_counts(step)
        stats: dict[str, float] = {}
        on_policy = is_on_policy_step(self.settings.trainer.seed, step, self.onpolicy_fraction)
        if self.onpolicy_fraction > 0:
            stats["onpolicy"] = float(on_policy)
        samples = self.rollouts.on_policy_samples(step, examples, counts) if on_policy else None
        micro_batches = [b for b, _ in samples] if on_policy else [self.layout.batch(ex, rows) for ex, rows in drawn]
        teacher_outs = self._teacher_passes(micro_batches)
        rollouts = self.rollouts.scored(step, examples, counts, stats, samples, teacher_outs)
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
        read = read_step(sums, weight_sum, stats, self.guard.grad_norm_before_step(), self.on_gpu)
        nonfinite = read.pop("nonfinite") > 0 or not math.isfinite(read.get("grad_norm", 0.0))
        paired, unaligned = read.pop("paired"), read.pop("unaligned_rows")
        if self.objective.cross is not None:  # how much of the batch the soft term reaches
            stats.update({"paired_share": paired / max(read["tokens"], 1.0), "unaligned_rows": unaligned})
        stats.update(
            self.guard.commit(
                step, nonfinite, read.pop("valence"), read.pop("teacher_valence"), read.pop("valence_count")
            )
        )
        self.step = step + 1
        elapsed = time.perf_counter() - started
        phases = self.clock.metrics(elapsed)
        # Under ZeRO 1-3 DeepSpeed's norm: a device tensor until the row is written (`host_row`).
        grad_norm = read["grad_norm"] if "grad_norm" in read else self.engine.get_global_grad_norm()
        epoch = self.layout.sampler.epoch_of(self.step)
        return step_row(self.step, read, sums.terms, stats, phases, lr, grad_norm, elapsed, epoch)

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
            weights, weight_sum, weight_stats = global_batch_weights(
                saliencies, valid, counts, lam=obj.lam, z_max=obj.z_max, normalize=obj.normalize, eps=obj.eps
            )
        stats.update(weight_stats)
        return weights, weight_sum

    def _forward_backward(
        self,
        step: int,
        micro_step: int,
        batch: dict,
        teacher_outs: list[dict | None],
        rollout: PendingRollout | None,
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
        if micro_step == 0:
            loss = self.faults.inject(loss, step, self.rank)  # for tests; none in normal runs
        if self.guard.wants_student_valence:
            with clock("gate"):
                sums.add_valence(student_out["valence"], teacher_out, mask)
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
        if "pairs_student" in batch:
            sums.add("paired", len(batch["pairs_student"]))
            sums.add("unaligned_rows", batch["unaligned_rows"])
        sums.add("real_tokens", batch["attention_mask"].sum())
        sums.add("positions", batch["attention_mask"].numel())

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
            "samples_seen": self.step * self.layout.sampler.global_batch_size,
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
        progress = Progress(cfg, self.step)
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
                        self.layout.sampler.global_batch_size,
                    )
                    self.log.info("saved checkpoint %s", path)
                if self._due(cfg.eval_every):
                    last_eval = self.evaluate()
                    metrics.update(last_eval)
                if sinks is not None:
                    sinks.write(metrics)
                progress.report(metrics)
        finally:
            preemption.uninstall()
        progress.close()
        if sinks is not None:
            sinks.close()
        if preempted:
            self.log.info(
                "preempted (%s) at step %d of %d; checkpoint saved", preemption.received, self.step, cfg.max_steps
            )
            if dist.is_main():
                requeue(cfg.requeue, self.log)
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


def _packing_name(pack_length: int | None) -> str:
    return "unpacked" if pack_length is None else f"rows of {pack_length} tokens packed"
