"""An optimizer step's one read into the host: this rank's sums over its micro-batches, kept on the
device while the step runs, read with everything else the step's commit and metrics row need."""

from __future__ import annotations

import torch

from vkd_ds import dist
from vkd_ds.memory import GIB, peak_rss_bytes, rss_bytes


class StepSums:
    """This rank's sums over its micro-batches of one optimizer step, kept on the device: adding to them
    reads nothing into the host. They are read once, with everything else the step's commit needs
    (`read_step`)."""

    FIXED = (
        "loss",  # Σ of the micro-batches' losses (each is its share of the global L)
        "tokens",  # valid positions
        "real_tokens",  # the micro-batches' tokens that are not padding
        "positions",  # all their positions, padding included
        "valence",  # Σ of the student's valence over valid positions (the proxy gate's)
        "teacher_valence",  # Σ of the teacher's valence over the same positions (the gate's arming)
        "valence_count",
        "nonfinite",  # micro-batches whose loss was not finite
        "paired",  # across tokenizers: student positions the soft term compares with a teacher position
        "unaligned_rows",  # across tokenizers: rows whose bytes are not text (not distilled)
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

    def add_valence(self, student: torch.Tensor, teacher_out: dict | None, mask: torch.Tensor) -> None:
        """The proxy gate's sums over the valid positions (the shifted mask, as L_val's): the student's
        valence and the teacher's (means over the k steps), whose batch means arm the gate."""
        self.add("valence", _masked_sum(student.detach().float().mean(-1), mask))
        self.add("valence_count", mask.sum())
        if teacher_out is not None and teacher_out.get("valence") is not None:
            self.add("teacher_valence", _masked_sum(teacher_out["valence"].float().mean(-1), mask))


def read_step(
    sums: StepSums, weight_sum: torch.Tensor, stats: dict, grad_norm: torch.Tensor | None, on_gpu: bool
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
    if on_gpu:
        # The peak since the previous step's read: this step's forwards and backwards, and the
        # previous step's optimizer update.
        entries.append(("mem_gpu_gb", "max", torch.cuda.max_memory_allocated() / 2**30))
        torch.cuda.reset_peak_memory_stats()
    read = dist.read_once(entries)
    for name in stats:
        if name in read:
            stats[name] = read.pop(name)
    return read


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


def step_row(
    step: int,
    read: dict[str, float],
    terms: list[str],
    stats: dict,
    phases: dict[str, float],
    lr: float,
    grad_norm,
    elapsed: float,
    epoch: float,
) -> dict[str, float]:
    """The step's metrics row (its columns in this order), from the step's read (`read_step`), the
    batch's statistics, the phases' seconds (`PhaseClock.metrics`) and the gradient norm (None: not
    known)."""
    metrics = {"step": step, "loss": read["loss"]}
    for name in terms:
        metrics[f"loss/{name}"] = read[f"loss/{name}"] / read["weight_sum"] if read["weight_sum"] else float("nan")
    metrics.update(stats)
    metrics.update(phases)
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
            "epoch": epoch,
            "mem_rss_gb": read["mem_rss_gb"],
            "mem_peak_rss_gb": read["mem_peak_rss_gb"],
        }
    )
    if "mem_gpu_gb" in read:
        metrics["mem_gpu_gb"] = read["mem_gpu_gb"]
    return metrics
