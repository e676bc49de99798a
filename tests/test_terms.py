"""A term declares what it needs (vkd_ds.terms.NEEDS), and the settings refuse, in one line, a term with a
weight whose needs the configuration cannot serve: the student's logits under the fused LM head, the
teacher's dense logits from a teacher cache (its top-k)."""

import pytest

from vkd_ds.config import compose
from vkd_ds.errors import VkdError
from vkd_ds.settings import Settings
from vkd_ds.terms import (
    CACHED_TEACHER_SERVES,
    DENSE_TEACHER_LOGITS,
    NEEDS,
    STUDENT_LOGITS,
    TEACHER_LOGITS,
    TERM_NAMES,
    TERMS,
    Term,
    loss_overrides,
)

# Without a teacher valence head file, L_val, the weighting and the mercy gate must be off.
REQUIRED = ["teacher.path=/t", "data.train_path=/d.jsonl", "loss.val=0", "weighting.lam=0", "gate.enabled=false"]
FUSED = [*REQUIRED, "loss.fused_head=true"]
# A teacher cache serves CE, token KD, L_val and L_reg (feat and seq need the live teacher).
CACHED = [*REQUIRED, "teacher.cache=/cache", "loss.feat=0", "loss.seq=0"]


@pytest.fixture
def probe_term(monkeypatch):
    """Registers a term `probe` with these needs for the test (its λ: `+loss.probe=...`)."""

    def register(*needs: str, fused: bool = False) -> list[str]:
        monkeypatch.setitem(TERMS, "probe", Term("probe", lambda inputs: None, needs, fused=fused))
        return ["+loss.probe=0.5"]

    return register


def refusal(overrides: list[str]) -> str:
    with pytest.raises(VkdError) as err:
        Settings.from_config(compose(overrides))
    message = str(err.value)
    assert "\n" not in message
    return message


def test_a_term_that_reads_the_students_logits_is_refused_with_the_fused_head(probe_term):
    overrides = probe_term(STUDENT_LOGITS)
    assert refusal([*FUSED, *overrides]) == (
        "loss.probe=0.5 reads the student's logits, which loss.fused_head=true does not make (it computes "
        "loss.ce, loss.soft inside the student): set loss.fused_head=false or loss.probe=0"
    )
    Settings.from_config(compose([*REQUIRED, *overrides]))  # the logits path serves it
    Settings.from_config(compose([*FUSED, *overrides, "loss.probe=0"]))  # without a weight it does not run


def test_a_fused_term_runs_inside_the_fused_head(probe_term):
    Settings.from_config(compose([*FUSED, *probe_term(STUDENT_LOGITS, fused=True)]))


def test_a_term_that_reads_the_teachers_dense_logits_is_refused_with_a_teacher_cache(probe_term):
    overrides = probe_term(STUDENT_LOGITS, DENSE_TEACHER_LOGITS)
    assert refusal([*CACHED, *overrides]) == (
        "loss.probe=0.5 reads the teacher's dense logits, and teacher.cache holds only their top-k: "
        "set loss.probe=0, or train with teacher.path and teacher.cache=null"
    )
    Settings.from_config(compose([*REQUIRED, *overrides]))  # the live teacher serves them
    assert TERMS["probe"].needs_teacher


def test_a_term_that_reads_the_teachers_distribution_runs_from_a_teacher_cache(probe_term):
    Settings.from_config(compose([*CACHED, *probe_term(STUDENT_LOGITS, TEACHER_LOGITS)]))


def test_a_cached_teacher_refuses_the_needs_it_does_not_hold(probe_term):
    """Every need a teacher cache does not serve sends the term to the live teacher (the message of
    feat and seq)."""
    for need in sorted(set(NEEDS) - set(CACHED_TEACHER_SERVES) - {DENSE_TEACHER_LOGITS}):
        assert "loss.probe=0.5 need(s) the live teacher" in refusal([*CACHED, *probe_term(need)]), need


def test_the_built_in_terms_run_with_the_fused_head_and_from_a_teacher_cache(tmp_path):
    head = tmp_path / "head.safetensors"
    head.write_bytes(b"")
    every_term = loss_overrides(**dict.fromkeys(TERM_NAMES, 0.5))
    Settings.from_config(compose([*FUSED, *every_term, f"valence.teacher_head={head}"]))
    served = [name for name, term in TERMS.items() if set(term.needs) <= set(CACHED_TEACHER_SERVES)]
    assert set(TERMS) - set(served) == {"feat", "seq"}
    Settings.from_config(compose([*CACHED, *loss_overrides(**dict.fromkeys(served, 0.5))]))
    Settings.from_config(compose([*CACHED, "loss.fused_head=true", *loss_overrides(**dict.fromkeys(served, 0.5))]))
