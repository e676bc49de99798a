"""Device- and dtype-correct code paths that a CPU run never exercises, checked on the CPU."""

import pytest
import torch

from vkd_ds.checkpoint import device_rng_entry
from vkd_ds.dist import device_index
from vkd_ds.engines import _reason
from vkd_ds.errors import VkdError
from vkd_ds.evaluation import DeviceSums


def test_eval_sums_are_exact_float64_of_bf16_batch_values():
    sums = DeviceSums()
    ce = torch.tensor([2.5, 3.25, 0.0], dtype=torch.bfloat16)  # per-sequence means, as a bf16 model gives
    counts = torch.tensor([3, 5, 0])  # integer token counts
    for _ in range(3):
        sums.add_weighted("student_nats", ce, counts)
        sums.add("tokens", counts)
        sums.add("top1_agree", torch.tensor([[True, False], [True, True]]))
    assert all(value.dtype == torch.float64 for value in sums.sums.values())
    total = sums.all_reduced(torch.device("cpu"))  # no process group: a group of one
    assert total["student_nats"] == 3 * (2.5 * 3 + 3.25 * 5) and total["tokens"] == 24
    assert total["top1_agree"] == 9 and total["kl_nats"] == 0.0  # never added: 0
    with pytest.raises(KeyError, match="unknown sum"):
        sums.add("typo", counts)


def test_eval_sums_stay_on_the_batches_device():
    """A CUDA batch, simulated by fake tensors: the sums stay on its device. The accumulation this
    replaced added device values into a CPU tensor in place, which CUDA refuses (and so does this)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode(allow_non_fake_inputs=True):
        ce = torch.ones(4, device="cuda", dtype=torch.bfloat16)
        counts = torch.full((4,), 7, device="cuda")
        sums = DeviceSums()
        sums.add_weighted("student_nats", ce, counts)
        sums.add_weighted("student_nats", ce, counts)
        sums.add("tokens", counts)
        assert {value.device.type for value in sums.sums.values()} == {"cuda"}
        host = torch.zeros(6, dtype=torch.float64)
        with pytest.raises(RuntimeError):  # the old way
            host[0] += (ce.double() * counts).sum()


@pytest.mark.parametrize(
    ("local", "visible", "slurm", "index"),
    # every GPU of the node, under any launcher; or SLURM's one GPU per task, whatever SLURM_LOCALID
    [(0, 8, False, 0), (5, 8, False, 5), (5, 8, True, 5), (5, 1, True, 0), (0, 1, False, 0)],
)
def test_each_rank_picks_a_visible_gpu(local, visible, slurm, index):
    assert device_index(local, visible, slurm) == index


@pytest.mark.parametrize(("local", "visible", "slurm"), [(5, 4, True), (1, 1, False)])
def test_a_local_rank_past_the_visible_gpus_is_a_clear_error(local, visible, slurm):
    """Outside SLURM, a rank past the only GPU means more processes than GPUs: refused, not doubled up."""
    with pytest.raises(VkdError, match=f"LOCAL_RANK={local} but this process sees {visible} GPUs"):
        device_index(local, visible, slurm)


def test_gpu_rng_restores_on_fewer_visible_gpus():
    """A checkpoint now keeps the rank's own device's generator; older ones kept every visible
    device's, and a process that sees fewer GPUs restores only what it has."""
    own = torch.tensor([1, 2, 3], dtype=torch.uint8)
    assert device_rng_entry({"cuda_device": own}, local_rank=3) is own
    # Saved by a process that saw its node's 8 GPUs; restored by SLURM task 3, which sees one.
    every = [torch.tensor([i], dtype=torch.uint8) for i in range(8)]
    assert device_rng_entry({"cuda": every}, local_rank=3) is every[3]
    assert device_rng_entry({"cuda": every[:1]}, local_rank=3) is None
    assert device_rng_entry({"python": None}, local_rank=0) is None  # saved without a GPU


def test_a_bare_deepspeed_assertion_is_reported_with_its_place_and_source():
    def defragment(tensors):  # as DeepSpeed's zero/utils.py asserts, without a message (pytest
        # rewrites `assert` statements in test files to add one, so it is spelled out here)
        if len({t.dtype for t in tensors}) != 1: raise AssertionError  # noqa: E701  # fmt: skip

    with pytest.raises(AssertionError) as caught:
        defragment([torch.zeros(1), torch.zeros(1, dtype=torch.bfloat16)])
    reason = _reason(caught.value)
    assert "AssertionError at" in reason and "test_devices.py" in reason
    assert "if len({t.dtype for t in tensors}) != 1: raise AssertionError" in reason
    assert _reason(ValueError("stage must be 0-3\nmore")) == "stage must be 0-3"
