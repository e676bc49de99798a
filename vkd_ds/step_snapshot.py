"""A copy of everything an optimizer step changes on this rank, taken before the step and written back
to revert it (`StepGuard`'s rejected and non-finite steps)."""

from __future__ import annotations

import copy
import math
from collections import defaultdict

import torch


class StepSnapshot:
    """This rank's share of everything an optimizer step changes, copied aside before the step and
    written back to revert it: its parameters (under ZeRO-3 its partitions), the fp32 master
    partition, the optimizer state (Adam's exp_avg, exp_avg_sq, step), the hyperparameters of every
    parameter group (the LR the scheduler wrote), the LR scheduler's state, the loss scaler and
    DeepSpeed's step counters. A reverted step leaves all of it as if the step never happened.

    Under ZeRO-3 a rank's live parameters are more than its partitions: DeepSpeed's step frees the
    parameters and re-gathers the small persistent ones (norms, biases, every tensor under
    stage3_param_persistence_threshold) into new buffers, and ZeRO++'s secondary partitions copy the
    primary ones. So the revert is bracketed the way DeepSpeed brackets a checkpoint load: every
    gathered copy released, the partitions written, the persistent parameters gathered again from
    them (a collective: every rank reverts the same step).

    The copies go to host buffers allocated at the first snapshot and reused, one per dtype (pinned
    when the state is on a GPU; PyTorch's pinned allocator may round each up to a power of two): for
    fp32 Adam about 16 bytes per parameter (parameters 4, master 4 when separate, moments 8), the
    moments and master divided by the world size under ZeRO 1-3, the parameters too under ZeRO-3,
    held from the first step that may be reverted on."""

    MASTER_ATTRS = ("fp32_partitioned_groups_flat", "single_partition_of_fp32_groups", "fp32_groups_flat_partition")
    COUNTERS = ("global_steps", "global_samples", "skipped_steps")

    def __init__(self, engine):
        self.engine = engine
        self._buffers: dict[tuple, torch.Tensor] = {}
        self._layout: list | None = None
        self._saved = None

    def _base(self):
        optimizer = self.engine.optimizer
        return optimizer, getattr(optimizer, "optimizer", optimizer)  # ZeRO wrappers hold the torch optimizer

    def _live(self, state_params: list) -> dict[tuple, torch.Tensor]:
        """The live tensors a step changes, by a key that names each one's role (the optimizer state by
        its place in `state_params`). Looked up afresh at every snapshot and every revert: a step may
        move ZeRO-3's parameters to new buffers, and loading a checkpoint replaces the optimizer's
        parameter groups and state."""
        optimizer, base = self._base()
        live: dict[tuple, torch.Tensor] = {}
        for name, param in self.engine.module.named_parameters():
            partition = getattr(param, "ds_tensor", None)
            # ZeRO-3: the partition is the parameter; its gathered copies are rebuilt from it.
            live[("param", name)] = param.data if partition is None else partition.data
        for attr in self.MASTER_ATTRS:
            for i, t in enumerate(getattr(optimizer, attr, None) or []):
                live[(attr, i)] = t
        for g, group in enumerate(base.param_groups):  # ZeRO-3 fills these only during its step
            for i, param in enumerate(group["params"]):
                live[("group", g, i)] = param.data
        for n, param in enumerate(state_params):
            for k, v in base.state[param].items():
                if isinstance(v, torch.Tensor):
                    live[("state", n, k)] = v
        return {key: t for key, t in live.items() if t.numel() > 0}

    def _slots(self, unique: dict[tuple, torch.Tensor]) -> dict[tuple, torch.Tensor]:
        """Host buffers for these tensors, as views into one flat buffer per dtype, allocated when the
        layout first appears (or changes: a checkpoint loaded) and reused by every later snapshot.
        One allocation per dtype, not one per tensor: PyTorch's pinned allocator rounds each request
        up to a power of two."""
        layout = [(key, tuple(t.shape), t.dtype) for key, t in unique.items()]
        if layout != self._layout:
            pinned = any(t.is_cuda for t in unique.values())
            totals: dict[torch.dtype, int] = defaultdict(int)
            for _, shape, dtype in layout:
                totals[dtype] += math.prod(shape)
            flats = {dtype: torch.empty(n, dtype=dtype, pin_memory=pinned) for dtype, n in totals.items()}
            offsets: dict[torch.dtype, int] = defaultdict(int)
            self._buffers = {}
            for key, shape, dtype in layout:
                n = math.prod(shape)
                self._buffers[key] = flats[dtype][offsets[dtype] : offsets[dtype] + n].view(shape)
                offsets[dtype] += n
            self._layout = layout
        return self._buffers

    @torch.no_grad()
    def take(self) -> None:
        optimizer, base = self._base()
        state_params = list(base.state)  # ZeRO keys Adam's state by its flat master partitions
        live = self._live(state_params)
        first_of: dict[tuple, tuple] = {}  # one copy of a tensor that several keys name (aliases)
        alias: dict[tuple, tuple] = {}
        for key, t in live.items():
            identity = (t.untyped_storage().data_ptr(), t.storage_offset(), t.numel(), t.dtype)
            alias[key] = first_of.setdefault(identity, key)
        unique = {key: t for key, t in live.items() if alias[key] == key}
        buffers = self._slots(unique)
        for key, t in unique.items():
            buffers[key].copy_(t, non_blocking=True)
        stored = {key: buffers[first] for key, first in alias.items()}
        if any(t.is_cuda for t in live.values()):
            torch.cuda.synchronize()  # the step must not change a tensor before its copy is done
        # The optimizer state's non-tensor entries (e.g. a step count kept as a number).
        plain = [
            {k: copy.deepcopy(v) for k, v in base.state[p].items() if not isinstance(v, torch.Tensor)}
            for p in state_params
        ]
        scaler = self._loss_scaler()
        scale_config = getattr(optimizer, "loss_scale_config", None)
        self._saved = {
            "stored": stored,
            "state_params": state_params,
            "plain_state": plain,
            "groups": [[{k: _clone(v) for k, v in g.items() if k != "params"} for g in gs] for gs in self._groups()],
            "scheduler": _clone(self.engine.lr_scheduler.state_dict()) if self.engine.lr_scheduler else None,
            "counters": {name: getattr(self.engine, name) for name in self.COUNTERS},
            "loss_scaler": copy.deepcopy(vars(scaler)) if scaler is not None else None,
            "loss_scale_config": copy.deepcopy(vars(scale_config)) if scale_config is not None else None,
        }

    def _groups(self) -> list[list[dict]]:
        optimizer, base = self._base()
        return [optimizer.param_groups] + ([base.param_groups] if base is not optimizer else [])

    def _loss_scaler(self):
        """DeepSpeed's loss scaler, where the optimizer has one (static at 1 in fp32 and bf16; vkd-ds
        never enables fp16, whose dynamic scaler a reverted step must not advance either)."""
        return getattr(self.engine.optimizer, "loss_scaler", None)

    def discard(self) -> None:
        self._saved = None

    @torch.no_grad()
    def restore(self) -> None:
        saved, self._saved = self._saved, None
        optimizer, base = self._base()
        zero3 = hasattr(optimizer, "checkpoint_event_prologue")
        if zero3:
            optimizer.checkpoint_event_prologue()  # releases every gathered parameter
        had_state = {id(p) for p in saved["state_params"]}
        created = [p for p in base.state if id(p) not in had_state]
        for param in created:
            del base.state[param]  # state the reverted step created (Adam's first step)
        if created and getattr(optimizer, "_hp_optimizer_states_linked", False):
            # ZeRO-1/2 and the bf16 optimizer linked each parameter's optimizer-state fragments into the
            # state just deleted: relinked at the next step, and the old tensors freed.
            optimizer._hp_optimizer_states_linked = False
        for param, plain in zip(saved["state_params"], saved["plain_state"], strict=True):
            base.state[param].update(copy.deepcopy(plain))
        live = self._live(saved["state_params"])
        for key, value in saved["stored"].items():
            if key in live:
                live[key].copy_(value, non_blocking=True)
        if any(t.is_cuda for t in live.values()):
            torch.cuda.synchronize()
        if zero3:
            optimizer.checkpoint_event_epilogue()  # the persistent parameters, gathered from the partitions
        for gs, values in zip(self._groups(), saved["groups"], strict=True):
            for group, hyper in zip(gs, values, strict=True):
                group.update(hyper)
        if saved["scheduler"] is not None:
            self.engine.lr_scheduler.load_state_dict(saved["scheduler"])
        if saved["loss_scaler"] is not None:
            vars(self._loss_scaler()).update(copy.deepcopy(saved["loss_scaler"]))
        if saved["loss_scale_config"] is not None:  # ZeRO-0's unfused bf16/fp16 optimizer counts steps here
            vars(optimizer.loss_scale_config).update(copy.deepcopy(saved["loss_scale_config"]))
        # DeepSpeed's counters as before the step: the reverted step is counted by vkd-ds (the gate's
        # `rejected` and `nonfinite`, in metrics.csv and the checkpoint), not as a step DeepSpeed took.
        for name, value in saved["counters"].items():
            setattr(self.engine, name, value)


def _clone(value):
    if isinstance(value, torch.Tensor):
        return value.detach().to("cpu", copy=True) if value.device.type != "cpu" else value.detach().clone()
    if isinstance(value, dict):
        return {k: _clone(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_clone(v) for v in value)
    return value
