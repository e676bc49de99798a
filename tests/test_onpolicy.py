"""On-policy token-level distillation (onpolicy.fraction): which steps, which terms, which inputs."""

import json

import pytest

from vkd_ds.config import compose
from vkd_ds.errors import VkdError
from vkd_ds.seq_kd import is_on_policy_step
from vkd_ds.settings import Settings
from vkd_ds.terms import TERMS, loss_overrides

REQUIRED = ["teacher.path=/t", "data.train_path=/d.jsonl", "loss.val=0", "weighting.lam=0", "gate.enabled=false"]


def test_on_policy_steps_are_a_function_of_seed_and_step_at_the_fraction():
    steps = range(4000)
    assert not any(is_on_policy_step(1, s, 0.0) for s in steps)
    assert all(is_on_policy_step(1, s, 1.0) for s in steps)
    chosen = [is_on_policy_step(1, s, 0.3) for s in steps]
    assert chosen == [is_on_policy_step(1, s, 0.3) for s in steps]  # every rank, every resume
    assert abs(sum(chosen) / len(chosen) - 0.3) < 0.03
    assert chosen != [is_on_policy_step(2, s, 0.3) for s in steps]  # the seed picks other steps
    # A larger fraction keeps every step a smaller one chose (one uniform per step).
    assert all(is_on_policy_step(1, s, 0.6) for s, on in zip(steps, chosen, strict=True) if on)


def test_on_policy_steps_run_every_term_but_ce():
    from vkd_ds.builders.objective import build_objective

    settings = Settings.from_config(compose(REQUIRED + ["loss.seq=0.3", "onpolicy.fraction=0.5"]))
    objective = build_objective(settings, [(0, 0)], 384)
    off_policy = objective.active_at(rollout_step=False)
    on_policy = objective.active_at(rollout_step=False, on_policy=True)
    assert "ce" in off_policy and set(off_policy) - set(on_policy) == {"ce"}
    assert set(objective.active_at(rollout_step=True, on_policy=True)) - set(on_policy) == {"seq"}
    assert {name for name, term in TERMS.items() if not term.on_samples} == {"ce"}


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["onpolicy.fraction=1.5"], "`onpolicy.fraction` must be in [0, 1], got 1.5"),
        (["onpolicy.fraction=-0.1"], "`onpolicy.fraction` must be in [0, 1]"),
        (["onpolicy.fraction=0.5", *loss_overrides(ce=1.0)], "no term with a weight applies on the student's"),
    ],
)
def test_bad_on_policy_settings_are_refused(overrides, message):
    with pytest.raises(VkdError, match=message.replace("[", r"\[").replace("]", r"\]")):
        Settings.from_config(compose(REQUIRED + overrides))


def test_on_policy_with_text_records_and_no_room_for_a_completion_is_refused(tiny_assets, tmp_path):
    """A record without a prompt is prompted with its first seq_kd.prompt_tokens tokens: with
    prompt_tokens >= data.max_seq_len there is no room left to sample into."""
    from vkd_ds.assets import asset_overrides
    from vkd_ds.builders.inputs import prepare

    common = [*asset_overrides(tiny_assets), f"run.dir={tmp_path / 'run'}", "data.max_seq_len=48"]
    common += ["loss.seq=0", "seq_kd.n_gen=8", "onpolicy.fraction=0.5"]
    with pytest.raises(VkdError, match=r"onpolicy.fraction > 0 samples from prompts, and \d+ row\(s\) of"):
        prepare(compose(common + ["seq_kd.prompt_tokens=48"]))
    prepare(compose(common + ["seq_kd.prompt_tokens=16"]))
    # Prompt/completion records bring their own prompts: no refusal.
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"prompt": "def f(x):", "completion": " return x"}) + "\n" for _ in range(4)))
    prepare(compose(common + ["seq_kd.prompt_tokens=48", f"data.train_path={pairs}"]))
    assert not (tmp_path / "run").exists()
