"""The teacher of the run: its cache (teacher.cache), the live teacher engine when a term or the gate
needs it, or none; and the host allocator's setting around its load."""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from vkd_ds import dist, engines
from vkd_ds.builders.start import Start
from vkd_ds.malloc import keep_freed_memory, return_freed_memory
from vkd_ds.memory import GIB, peak_rss_bytes, reset_peak_rss, rss_bytes
from vkd_ds.objective import Teacher
from vkd_ds.settings import Settings
from vkd_ds.teacher_cache import CachedTeacher
from vkd_ds.valence import load_head


class TeacherLoadClock:
    """Each rank's time, peak resident set and share of the teacher while the teacher engine is built;
    `figures` (every rank's, gathered) once stopped."""

    def __init__(self):
        self.before = rss_bytes()
        reset_peak_rss()
        self.started = time.perf_counter()
        self.figures: dict = {}

    def stop(self, engine, bf16: bool) -> None:
        seconds = time.perf_counter() - self.started
        local, total = engines.local_param_count(engine)
        mine = torch.tensor(
            [local, local * (2 if bf16 else 4) / GIB, seconds, peak_rss_bytes() / GIB, self.before / GIB],
            dtype=torch.float64,
        )
        rows = dist.all_gather(mine).tolist()
        self.figures = {
            "parameters": total,
            "bytes_per_parameter": 2 if bf16 else 4,
            "seconds": max(row[2] for row in rows),
            "ranks": [
                {
                    "parameters": int(r[0]),
                    "weights_gb": r[1],
                    "seconds": r[2],
                    "peak_rss_gb": r[3],
                    "rss_before_gb": r[4],
                }
                for r in rows
            ],
        }


@dataclass
class TeacherPart:
    teacher: Teacher | CachedTeacher | None
    load: TeacherLoadClock | None  # the live teacher's load figures (startup.json)
    allocator_tuned: bool

    @property
    def live(self) -> Teacher | None:
        return self.teacher if isinstance(self.teacher, Teacher) else None

    def log_startup(self, log, start: Start) -> None:
        s, world = start.settings, start.world
        if s.teacher.cache:
            m = start.prepared.cache_manifest
            log.info(
                "teacher: not loaded; its top-%d at T=%g, entropy%s from the cache %s (%.0f bytes per token%s)",
                m["top_k"],
                m["temperature"],
                " and valence" if m["valence"] else "",
                s.teacher.cache,
                m["bytes_per_token"],
                "; on the teacher's own tokens, aligned at every step" if m.get("teacher_tokenizer_sha256") else "",
            )
        if self.load is not None:
            figures = self.load.figures
            log.info(
                "teacher: %.2fM parameters, %.2fM held by rank 0 (%s); loaded in %.1f s, "
                "peak RSS while loading %s GiB (ranks 0..%d), %.2f GiB of teacher weights per rank at most",
                figures["parameters"] / 1e6,
                figures["ranks"][0]["parameters"] / 1e6,
                "replicated" if s.teacher.layout == "replicated" else f"ZeRO-3, offload={s.teacher.offload_param}",
                figures["seconds"],
                ", ".join(f"{r['peak_rss_gb']:.2f}" for r in figures["ranks"]),
                world - 1,
                max(r["weights_gb"] for r in figures["ranks"]),
            )
        cross = start.prepared.objective.cross
        if cross is not None:
            log.info(
                "teacher tokenizer: %s (%d tokens, %d shared with the student's %d); soft term across tokenizers: %s",
                s.teacher.tokenizer_path,
                cross.teacher_vocab,
                len(cross.teacher_ids),
                start.prepared.objective.vocab_size,
                s.loss.cross_tokenizer,
            )
        if self.allocator_tuned:
            log.info("host allocator: glibc mmap threshold 32 MiB, no trim (trainer.keep_freed_memory)")


def return_memory_until_the_teacher_is_loaded(s: Settings) -> bool:
    """From the process group's start (trainer.keep_freed_memory, CPU only): glibc returns freed memory
    until the teacher is loaded, then keeps it (vkd_ds/malloc.py). Whether it does."""
    tune_allocator = s.trainer.keep_freed_memory and not dist.on_gpu()
    if tune_allocator:
        return_freed_memory()
    return tune_allocator


def build_teacher(start: Start, tune_allocator: bool) -> TeacherPart:
    """Collective when the live teacher is loaded (ZeRO-3 builds its shards on every rank).
    `tune_allocator`: `return_memory_until_the_teacher_is_loaded`'s answer."""
    s, prepared, objective = start.settings, start.prepared, start.objective
    teacher = clock = None
    if s.teacher.cache:  # the settings refused every term that would need the live teacher
        teacher = CachedTeacher(s.teacher.cache, prepared.cache_manifest, prepared.data_splits, dist.device())
    # The gate's baseline is the teacher's valence of its own continuations: it needs both.
    elif prepared.loads_teacher:
        clock = TeacherLoadClock()
        engine = engines.build_teacher_engine(s.teacher.path, start.teacher_ds, objective.attention > 0)
        clock.stop(engine, bool(start.teacher_ds["bf16"]["enabled"]))
        head = None
        if objective.teacher_valence or s.gate.enabled:
            head = load_head(s.valence.teacher_head, int(s.valence.k), prepared.teacher_width).to(dist.device())
            head.requires_grad_(False)
        teacher = Teacher(engine, objective, head)
    return TeacherPart(teacher, clock, tune_allocator and keep_freed_memory())
