"""`check_checkpoint` matches the files to the model built from the config on the meta device before
anything is loaded, reading headers only (a `.bin` is unpickled onto the meta device; converted
parameters' shapes come from transformers' ops run on meta tensors): a missing parameter, an
unexpected tensor or one of the wrong shape is refused with its name and file, whatever the format."""

from __future__ import annotations

from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path

import torch

from vkd_ds.errors import VkdError, library_reason
from vkd_ds.teacher_load.files import checkpoint_files
from vkd_ds.teacher_load.plan import (
    LoadPlan,
    Target,
    checkpoint_names,
    convert_tensors,
    converter_targets,
    model_shape,
    plan_load,
    transformers_keeps,
)


@dataclass(frozen=True)
class TeacherShape:
    parameters: int
    largest: int  # elements of its largest parameter


def check_checkpoint(config, directory: str | Path) -> TeacherShape:
    """The teacher's parameter count and largest parameter, from a model built from `config` on the
    meta device; where `directory` holds a checkpoint (safetensors or `.bin`), its tensors are matched
    to that model first as transformers matches them (renamed, converted, ignored): every parameter
    present with its shape, nothing the model lacks (the loader relies on it). Reads headers only.
    A directory with no weights passes here (the fit estimate needs only the config); loading it is
    refused (build_teacher_model)."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    model.tie_weights()
    params, _, _ = checkpoint_names(model)
    files = checkpoint_files(directory)
    if files:
        _verify(model, plan_load(model, files), directory)
    return TeacherShape(sum(p.numel() for p in params.values()), max(p.numel() for p in params.values()))


def _verify(model: torch.nn.Module, plan: LoadPlan, directory) -> set[str]:
    """Refuse what transformers would not load into `model` (a meta model) or would report: a tensor
    it has no place for, one of another shape, a missing parameter. The missing parameters
    transformers' rules ignore are returned (they are initialized as transformers does)."""
    params, aliases, _ = checkpoint_names(model)
    if plan.unexpected:
        name, (key, file) = next(iter(plan.unexpected.items()))
        also = f" ({len(plan.unexpected) - 1} more such tensor(s))" if len(plan.unexpected) > 1 else ""
        loaded_as = f" (transformers loads it as {name!r})" if name != key else ""
        raise VkdError(
            f"teacher.path: {file.name} holds {key!r}{loaded_as}, which the model built from its config lacks{also}"
        )
    for target in plan.targets.values():
        for _, key, file in target.sources:
            if key in plan.unreadable:
                raise VkdError(
                    f"teacher.path: {file.name} stores {key!r} as {plan.unreadable[key]}, which vkd-ds cannot read"
                )
    covered: set[str] = set()
    for target in plan.targets.values():
        if target.converter is None:
            _, key, file = target.sources[0]
            shape, expected = plan.shapes[key][0], model_shape(model.get_parameter_or_buffer(target.name))
            if shape != expected:
                loaded_as = f" (transformers loads it as {target.name!r})" if target.name != key else ""
                raise VkdError(
                    f"teacher.path: {file.name} holds {key!r}{loaded_as} with shape {shape}, the model's is {expected}"
                )
            covered.add(target.name)
            continue
        try:
            outputs = convert_tensors(model, target, _meta(plan))
        except Exception as err:
            if "meta" in str(err):  # an op that needs real data: its shapes are checked as it loads
                covered.update(converter_targets(target))
                continue
            raise conversion_problem(model, plan, target, directory, f"an error: {library_reason(err)}") from None
        for name, tensor in outputs.items():
            try:
                expected = model_shape(model.get_parameter_or_buffer(name))
            except AttributeError:
                raise conversion_problem(model, plan, target, directory, f"{name!r}, which the model lacks") from None
            if list(tensor.shape) != expected:
                what = f"shape {list(tensor.shape)} for {name!r}, the model's is {expected}"
                raise conversion_problem(model, plan, target, directory, what)
            covered.add(name)
    found = {aliases.get(name, name) for name in covered}
    missing = {name for name in params if name not in found}
    refused = transformers_keeps(model, missing=missing) if missing else set()
    if refused:
        raise VkdError(f"teacher.path: the checkpoint in {directory} lacks {_names(sorted(refused))}")
    return missing


def _missing_sources(model: torch.nn.Module, plan: LoadPlan, target: Target) -> list[str]:
    """The checkpoint keys transformers would save for `target`'s parameters (its conversions reversed)
    that the files lack; [] where the files name them otherwise (a legacy naming) or it cannot tell."""
    from transformers.core_model_loading import dot_natural_key, revert_weight_conversion

    state = {}
    for name in converter_targets(target):
        try:
            state[name] = torch.empty(model_shape(model.get_parameter(name)), device="meta")
        except AttributeError:
            continue
    try:
        expected = list(revert_weight_conversion(model, state))
    except Exception:
        return []
    missing = [key for key in expected if key not in plan.shapes]
    return sorted(missing, key=dot_natural_key) if len(missing) < len(expected) else []


def conversion_problem(model, plan: LoadPlan, target: Target, directory, what: str) -> VkdError:
    missing = _missing_sources(model, plan, target)
    found = len(target.sources)
    if missing:
        return VkdError(
            f"teacher.path: the checkpoint in {directory} lacks {_names(missing, 'tensor')}, which transformers "
            f"merges with the {found} found into {target.name!r}"
        )
    by_pattern: dict[str, list[tuple[str, Path]]] = defaultdict(list)
    for pattern, key, file in target.sources:
        by_pattern[pattern].append((key, file))
    for sources in by_pattern.values():  # one of a list of like tensors (experts) of another shape
        shapes = Counter(tuple(plan.shapes[key][0]) for key, _ in sources)
        common, count = shapes.most_common(1)[0]
        odd = [(key, file) for key, file in sources if tuple(plan.shapes[key][0]) != common]
        if odd and count > 1:
            key, file = odd[0]
            return VkdError(
                f"teacher.path: {file.name} holds {key!r} with shape {plan.shapes[key][0]}, where the other "
                f"{count} like it that transformers merges into {target.name!r} have {list(common)}"
            )
    files = ", ".join(sorted({file.name for _, _, file in target.sources}))
    ops = ", ".join(type(op).__name__ for op in target.converter.operations)
    first = target.sources[0][1]
    return VkdError(
        f"teacher.path: the {found} tensor(s) of {files} that transformers merges into {target.name!r} "
        f"({first!r}, ...; {ops}) give {what}"
    )


def _meta(plan: LoadPlan):
    def fetch(key: str, file: Path) -> torch.Tensor:
        shape, dtype = plan.shapes[key]
        return torch.empty(shape, dtype=dtype or torch.float32, device="meta")

    return fetch


def _names(missing: list[str], what: str = "parameter") -> str:
    shown = ", ".join(missing[:3]) + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
    return f"{len(missing)} {what}(s): {shown}"
