"""What samples from the student: one sampler (and, gathered, one plain copy of the student) shared by
sequence KD, on-policy steps and the mercy gate's lookahead."""

from __future__ import annotations

from dataclasses import dataclass

from vkd_ds.builders.start import Start
from vkd_ds.gate import MercyGate
from vkd_ds.rollout import StudentSampler
from vkd_ds.seq_kd import SeqKDSettings, SequenceKD


@dataclass
class SamplingPart:
    sampler: StudentSampler | None
    gate: MercyGate | None
    seq_kd: SequenceKD | None  # sequence KD's rollouts and on-policy steps

    def log_startup(self, log, start: Start) -> None:
        s, objective = start.settings, start.objective
        if objective.lambdas["seq"] > 0:
            log.info(
                "sequence KD: %d tokens per rollout every %d step(s), student %s",
                s.seq_kd.n_gen,
                s.seq_kd.every_n_steps,
                self.sampler.mode,
            )
        if s.onpolicy.fraction > 0:
            log.info(
                "on-policy distillation: %g of the steps on the student's own samples (%d tokens, student %s); "
                "terms there: %s",
                s.onpolicy.fraction,
                s.seq_kd.n_gen,
                self.sampler.mode,
                " ".join(objective.active_at(rollout_step=False, on_policy=True)),
            )
        gate = s.gate
        if gate.enabled:
            arming = f" and the running batch valence MSE is below {gate.arm_mse:g}" if gate.mode == "proxy" else ""
            log.info(
                "mercy gate: %s mode, reject when projected valence < %g x the teacher's baseline; it arms after "
                "%d warm-up steps%s (gate.enabled=false turns it off)",
                gate.mode,
                gate.ratio,
                gate.warmup_steps,
                arming,
            )


def build_sampling(start: Start, engine, teacher) -> SamplingPart:
    """Nothing samples in `vkd-ds eval`."""
    s, prepared, objective = start.settings, start.prepared, start.objective
    if s.eval_only:
        return SamplingPart(None, None, None)
    samples_needed = objective.lambdas["seq"] > 0 or s.onpolicy.fraction > 0
    sampler = gate = seq_kd = None
    if samples_needed or (s.gate.enabled and s.gate.mode == "lookahead"):
        sampler = StudentSampler(engine, s.rollout.gather_student)
    if s.gate.enabled:
        gate = MercyGate(
            s.gate,
            engine,
            teacher,
            prepared.tokenizer,
            prepared.valid_data or prepared.train_data,
            int(s.trainer.seed),
            sampler,
            int(s.data.max_seq_len),
        )
    if samples_needed:
        seq_kd = SequenceKD(
            SeqKDSettings.from_settings(s),
            sampler,
            teacher,
            prepared.tokenizer,
            objective.chunk_tokens,
            seq_term=objective.lambdas["seq"] > 0,
        )
    return SamplingPart(sampler, gate, seq_kd)
