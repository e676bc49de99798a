"""vkd-ds's collectives and global-batch bookkeeping on real gloo groups of 1-3 ranks (in-process
helper: no launcher, no DeepSpeed engine), against what one rank holding the whole batch computes."""

import numpy as np
import pytest
import torch

from tests.multirank import run_ranks
from vkd_ds import dist
from vkd_ds.batch_weights import global_batch_weights
from vkd_ds.data import GlobalBatchSampler
from vkd_ds.evaluation import DeviceSums
from vkd_ds.step_read import StepSums

MICRO, ACCUM, ROWS = 2, 2, 50
WEIGHTING = {"lam": 6.0, "z_max": 3.0, "normalize": True, "eps": 1e-6}  # valence_weights' defaults, λ = 6


def global_saliency() -> tuple[torch.Tensor, torch.Tensor]:
    """A saliency and a validity flag for each of ROWS examples (every 7th has no valid position)."""
    gen = torch.Generator().manual_seed(11)
    saliency = torch.rand(ROWS, generator=gen)
    valid = torch.ones(ROWS, dtype=torch.bool)
    valid[::7] = False
    saliency[~valid] = 0.0
    return saliency, valid


def weights_on_this_rank(step: int, micro: int) -> dict:
    """The trainer's weights (`global_batch_weights`) of this rank's micro-batches of the step."""
    world, rank = dist.world_size(), dist.rank()
    sampler = GlobalBatchSampler(ROWS, micro, ACCUM, world, seed=5)
    saliency, valid = global_saliency()
    mine = [sampler.indices(step, a, rank) for a in range(ACCUM)]
    counts = np.full((ACCUM, world), micro, dtype=np.int64)
    w, total, stats = global_batch_weights(
        [saliency[ix] for ix in mine], [valid[ix] for ix in mine], counts, **WEIGHTING
    )
    stats = {name: float(v) for name, v in stats.items()}
    return {"indices": mine, "weights": [ws.tolist() for ws in w], "sum": float(total), "stats": stats}


@pytest.mark.parametrize("world", [2, 3])
def test_every_world_size_weighs_each_example_as_one_rank_does(world):
    step = 4
    one = run_ranks(weights_on_this_rank, 1, step, MICRO * world)[0]  # the concatenated batch
    ranks = run_ranks(weights_on_this_rank, world, step, MICRO)
    # The same examples, and each gets the weight one rank gives it; Σw (L's denominator) and the
    # batch's statistics agree.
    by_example = {}
    for r in ranks:
        for ix, ws in zip(r["indices"], r["weights"], strict=True):
            by_example.update(zip(ix, ws, strict=True))
    one_rank = {}
    for ix, ws in zip(one["indices"], one["weights"], strict=True):
        one_rank.update(zip(ix, ws, strict=True))
    assert by_example.keys() == one_rank.keys()
    for i, w in by_example.items():
        assert w == pytest.approx(one_rank[i], rel=1e-6), i
    assert all(r["sum"] == pytest.approx(one["sum"], rel=1e-6) for r in ranks)
    assert all(r["stats"] == pytest.approx(one["stats"], rel=1e-6) for r in ranks)
    invalid = [i for i in by_example if i % 7 == 0]
    assert invalid and all(by_example[i] == 0 for i in invalid)  # left out of the statistics, weight 0


def packed_weights_on_this_rank(counts: list[list[int]]) -> dict[int, float]:
    """The weights of this rank's documents when its micro-batches hold different numbers of them
    (packed rows): `counts` [accum, world], the global batch's documents 0, 1, ... in the order
    (micro-step, rank)."""
    counts = np.array(counts, dtype=np.int64)
    world, rank = dist.world_size(), dist.rank()
    saliency, valid = global_saliency()
    flat = counts.ravel()
    starts = np.cumsum(flat) - flat
    mine = [
        list(range(starts[a * world + rank], starts[a * world + rank] + counts[a, rank])) for a in range(len(counts))
    ]
    w, _, _ = global_batch_weights([saliency[ix] for ix in mine], [valid[ix] for ix in mine], counts, **WEIGHTING)
    return {i: x for ix, ws in zip(mine, w, strict=True) for i, x in zip(ix, ws.tolist(), strict=True)}


@pytest.mark.parametrize("counts", [[[2, 3], [1, 2]], [[2, 3, 1], [1, 2, 3]]])
def test_packed_micro_batches_of_unequal_sizes_weigh_each_document_as_one_rank_does(counts):
    ranks = run_ranks(packed_weights_on_this_rank, len(counts[0]), counts)
    one = run_ranks(packed_weights_on_this_rank, 1, [[sum(row)] for row in counts])[0]  # micro-step a: every rank's
    by_document = {i: w for r in ranks for i, w in r.items()}
    assert sorted(by_document) == sorted(one) == list(range(sum(map(sum, counts))))
    for i, w in by_document.items():
        assert w == pytest.approx(one[i], rel=1e-6), i
    assert by_document[0] == 0 and by_document[7] == 0  # no valid position


def reductions() -> dict:
    rank, world = dist.rank(), dist.world_size()
    sums = StepSums(["ce", "soft"], torch.device("cpu"))
    sums.add("loss/ce", torch.tensor(rank + 1.0))
    sums.add("loss/soft", 10.0 * rank)
    sums.add("loss", torch.tensor(0.5, dtype=torch.bfloat16))
    sums.add("tokens", torch.tensor(7))
    device_sums = DeviceSums()
    device_sums.add("tokens", torch.tensor([rank, 1.0], dtype=torch.bfloat16))
    device_sums.add_weighted("student_nats", torch.tensor([2.0]), torch.tensor([rank + 1]))
    extra = [("first", "first", torch.tensor(float(rank + 5))), ("largest", "max", float(rank) * 3)]
    total = dist.read_once(sums.entries() + extra)
    return {
        "step": ({name: total[f"loss/{name}"] for name in sums.terms}, total["loss"], total["tokens"]),
        "first_max": (total["first"], total["largest"]),
        "device": device_sums.all_reduced(torch.device("cpu")),
        "any": dist.any_rank(rank == world - 1),
        "all": dist.all_ranks(rank == world - 1),
        "max": float(dist.all_reduce_max(torch.tensor([float(rank)]))[0]),
    }


def test_step_and_eval_sums_reduce_exactly_and_every_rank_agrees():
    world = 3
    results = run_ranks(reductions, world)
    terms, loss, tokens = results[0]["step"]
    assert terms == {"ce": 6.0, "soft": 30.0} and loss == 1.5 and tokens == 21.0
    device = results[0]["device"]
    assert device["tokens"] == 0 + 1 + 2 + 3 and device["student_nats"] == 2.0 * (1 + 2 + 3)
    assert device["kl_nats"] == 0.0  # a sum no batch added
    for r in results:
        assert r["step"] == results[0]["step"] and r["device"] == device
        assert r["first_max"] == (5.0, 6.0)  # rank 0's value, and the largest
        assert r["any"] is True and r["all"] is False and r["max"] == 2.0


def synthetic_rollout(row: int):
    """Rollout scores of global-batch row `row`: a sample of 1 + row % 4 tokens after a 2-token prompt."""
    from vkd_ds.seq_kd import Rollout

    gen = torch.Generator().manual_seed(100 + row)
    length, width = 1 + row % 4, 8
    mask = torch.zeros(1, width, dtype=torch.bool)
    mask[0, 1 : 1 + length] = True
    teacher = -torch.rand(1, width, generator=gen) * 3 * mask
    student = -torch.rand(1, width, generator=gen) * 3 * mask
    return Rollout({}, mask, teacher, student, [length], 0.0)


def advantages_on_this_rank(settings, steps: int, micro: int) -> list[dict]:
    """What the trainer does at `steps` rollout steps: this rank's micro-batches of the global batch
    (ordered micro-step, rank, row), their advantages from SequenceKD's baseline."""
    from vkd_ds.seq_kd import Advantages, Rollout

    world, rank = dist.world_size(), dist.rank()
    if isinstance(settings, list):
        return [advantages_on_this_rank(one, steps, micro) for one in settings]
    advantages = Advantages(settings)
    out = []
    for step in range(steps):
        micro_batches = []
        for a in range(ACCUM):
            first = (a * world + rank) * micro
            rows = [synthetic_rollout(first + i + 100 * step) for i in range(micro)]
            micro_batches.append(
                Rollout(
                    {},
                    torch.cat([r.mask for r in rows]),
                    torch.cat([r.teacher_token_logprob for r in rows]),
                    torch.cat([r.student_token_logprob for r in rows]),
                    [n for r in rows for n in r.lengths],
                    0.0,
                )
            )
        got, stats = advantages(micro_batches)
        by_row = {}
        for a, adv in enumerate(got):
            first = (a * world + rank) * micro
            by_row.update({first + i: adv[i].tolist() for i in range(micro)})
        out.append({"rows": by_row, "baseline": stats["seq/baseline"], "reward": stats["seq/reward"]})
    return out


@pytest.mark.parametrize("reward", ["teacher_logprob", "reverse_kl", "per_token"])
def test_every_reward_gives_each_sample_the_advantage_one_rank_gives_it(reward):
    """L_seq's advantages (and the baseline, a global-batch statistic) on 2 ranks equal those of one
    rank holding the concatenated batch, for each reward and both baselines (the moving one over two
    rollout steps), length-normalized or not, and divided by the batch's spread (seq_kd.normalize_advantages)."""
    from vkd_ds.rollout import SamplingSettings
    from vkd_ds.seq_kd import SeqKDSettings

    settings = [
        SeqKDSettings(1, reward, baseline, 0.9, by_length, by_spread, SamplingSettings(n_gen=4), seed=0)
        for baseline, by_length, by_spread in (("batch", False, False), ("ema", True, False), ("batch", False, True))
    ]
    ones = run_ranks(advantages_on_this_rank, 1, settings, 2, MICRO * 2)[0]
    twos = run_ranks(advantages_on_this_rank, 2, settings, 2, MICRO)
    for case, one in enumerate(ones):
        two = [rank[case] for rank in twos]
        for step in range(2):
            rows = {**two[0][step]["rows"], **two[1][step]["rows"]}
            assert rows.keys() == one[step]["rows"].keys()
            for row, adv in rows.items():
                want = torch.tensor(one[step]["rows"][row])
                torch.testing.assert_close(torch.tensor(adv), want, rtol=1e-6, atol=1e-7)
            for r in two:
                assert r[step]["baseline"] == pytest.approx(one[step]["baseline"], rel=1e-9)
        assert any(abs(a) > 1e-3 for adv in one[1]["rows"].values() for a in adv)


@pytest.mark.parametrize("reward", ["teacher_logprob", "reverse_kl", "per_token"])
def test_normalized_advantages_are_the_plain_ones_over_the_global_batchs_reward_spread(reward):
    """seq_kd.normalize_advantages: each advantage divided by the population standard deviation of the
    reward over the global batch (per_token: of r_t over every sampled token); with the batch baseline
    they then have mean 0 and standard deviation 1. A batch of equal rewards keeps advantages of 0."""
    from vkd_ds.rollout import SamplingSettings
    from vkd_ds.seq_kd import Advantages, SeqKDSettings

    def settings(normalize: bool) -> SeqKDSettings:
        return SeqKDSettings(1, reward, "batch", 0.9, False, normalize, SamplingSettings(n_gen=4), seed=0)

    rollouts = [synthetic_rollout(row) for row in range(12)]
    plain, _ = Advantages(settings(False))(rollouts)
    normalized, _ = Advantages(settings(True))(rollouts)
    if reward == "per_token":
        values = torch.cat([r.rewards(reward)[r.mask] for r in rollouts]).double()
    else:
        values = torch.cat([r.rewards(reward) for r in rollouts]).double()
    spread = float(values.std(unbiased=False))
    assert spread > 0.1
    for p, n in zip(plain, normalized, strict=True):
        torch.testing.assert_close(n, p / spread, rtol=1e-6, atol=1e-7)
    seen = torch.cat(
        [n[r.mask] if reward == "per_token" else n[:, 1] for n, r in zip(normalized, rollouts, strict=True)]
    )
    assert float(seen.double().std(unbiased=False)) == pytest.approx(1.0, rel=1e-5)
    assert float(seen.double().mean()) == pytest.approx(0.0, abs=1e-6)

    same = [synthetic_rollout(0) for _ in range(3)]  # equal rewards: no spread
    for advantage in Advantages(settings(True))(same)[0]:
        assert torch.isfinite(advantage).all() and float(advantage.abs().max()) == 0.0


def test_the_config_key_reaches_sequence_kd():
    from vkd_ds.config import compose
    from vkd_ds.seq_kd import SeqKDSettings
    from vkd_ds.settings import Settings

    required = ["teacher.path=/t", "data.train_path=/d.jsonl", "loss.val=0", "weighting.lam=0", "gate.enabled=false"]
    for value in (False, True):
        s = Settings.from_config(compose([*required, f"seq_kd.normalize_advantages={str(value).lower()}"]))
        assert SeqKDSettings.from_settings(s).normalize_advantages is value
