"""vkd-ds's collectives and global-batch bookkeeping on real gloo groups of 1-3 ranks (in-process
helper: no launcher, no DeepSpeed engine), against what one rank holding the whole batch computes."""

import pytest
import torch

from tests.multirank import run_ranks
from vkd_ds import dist
from vkd_ds.data import GlobalBatchSampler, global_batch_order, rank_rows
from vkd_ds.evaluation import DeviceSums
from vkd_ds.trainer import StepSums
from vkd_ds.valence import valence_weights

MICRO, ACCUM, ROWS = 2, 2, 50


def global_saliency() -> tuple[torch.Tensor, torch.Tensor]:
    """A saliency and a validity flag for each of ROWS examples (every 7th has no valid position)."""
    gen = torch.Generator().manual_seed(11)
    saliency = torch.rand(ROWS, generator=gen)
    valid = torch.ones(ROWS, dtype=torch.bool)
    valid[::7] = False
    saliency[~valid] = 0.0
    return saliency, valid


def weights_on_this_rank(step: int, micro: int) -> dict:
    """What Trainer._weights does: gather this rank's rows, weigh the global batch, keep its own."""
    world, rank = dist.world_size(), dist.rank()
    sampler = GlobalBatchSampler(ROWS, micro, ACCUM, world, seed=5)
    saliency, valid = global_saliency()
    mine = [sampler.indices(step, a, rank) for a in range(ACCUM)]
    local = torch.stack([torch.stack([saliency[ix], valid[ix].float()], dim=-1) for ix in mine])  # [accum, micro, 2]
    rows = global_batch_order(dist.all_gather(local))
    w = valence_weights(rows[:, 0], lam=6.0, valid=rows[:, 1] > 0)
    return {"indices": mine, "weights": rank_rows(w, ACCUM, world, rank).tolist(), "sum": float(w.sum())}


@pytest.mark.parametrize("world", [2, 3])
def test_every_world_size_weighs_each_example_as_one_rank_does(world):
    step = 4
    one = run_ranks(weights_on_this_rank, 1, step, MICRO * world)[0]  # the concatenated batch
    ranks = run_ranks(weights_on_this_rank, world, step, MICRO)
    # The same examples, and each gets the weight one rank gives it; Σw (L's denominator) agrees.
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
    invalid = [i for i in by_example if i % 7 == 0]
    assert invalid and all(by_example[i] == 0 for i in invalid)  # left out of the statistics, weight 0


def reductions() -> dict:
    rank, world = dist.rank(), dist.world_size()
    sums = StepSums.zeros(["ce", "soft"])
    sums.terms["ce"], sums.terms["soft"], sums.loss, sums.tokens = rank + 1.0, 10.0 * rank, 0.5, 7.0
    device_sums = DeviceSums()
    device_sums.add("tokens", torch.tensor([rank, 1.0], dtype=torch.bfloat16))
    device_sums.add_weighted("student_nats", torch.tensor([2.0]), torch.tensor([rank + 1]))
    total = sums.all_reduced()
    return {
        "step": (total.terms, total.loss, total.tokens),
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
        assert r["any"] is True and r["all"] is False and r["max"] == 2.0
