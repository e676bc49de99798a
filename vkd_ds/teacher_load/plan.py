"""Which tensor goes where: transformers' own renamings and converters.

Checkpoint keys are matched to the model as transformers matches them on load, with its own
machinery: the weight conversions it registers for the model (`get_model_conversion_mapping`:
renamings, the legacy renamings such as GPT-NeoX's `embed_out` -> `lm_head`, the converters that
fuse MoE experts stored one by one), its `rename_source_key` (which also adds or strips the
`base_model_prefix`), and its rules for keys it ignores (`_adjust_missing_and_unexpected_keys`: the
model's `_keys_to_ignore_on_load_unexpected`, older exports' per-layer `rotary_emb.inv_freq`,
`position_ids`). A key naming one of the model's non-persistent buffers is skipped, as transformers
skips it.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch

from vkd_ds.teacher_load.readers import open_checkpoint


def checkpoint_names(model: torch.nn.Module) -> tuple[dict, dict, dict]:
    """(parameters by name, each name a checkpoint may use -> the parameter's first name, buffers):
    a tied weight is one parameter with two names, stored under either or both."""
    params = dict(model.named_parameters())
    canonical = {id(p): name for name, p in params.items()}
    aliases = {name: canonical[id(p)] for name, p in model.named_parameters(remove_duplicate=False)}
    return params, aliases, dict(model.named_buffers())


def _state_names(model: torch.nn.Module) -> dict[str, bool]:
    """The names of the model's state dict (every parameter name, tied aliases included, and the
    persistent buffers), in the form transformers' `rename_source_key` takes (name -> not None)."""
    names = {name: True for name, _ in model.named_parameters(remove_duplicate=False)}
    for module_name, module in model.named_modules(remove_duplicate=False):
        for name, buffer in module._buffers.items():
            if buffer is not None and name not in module._non_persistent_buffers_set:
                names[f"{module_name}.{name}" if module_name else name] = True
    return names


def model_shape(tensor: torch.Tensor) -> list[int]:
    return list(getattr(tensor, "ds_shape", tensor.shape))  # a ZeRO-3 parameter's own shape is its partition's


@dataclass
class Target:
    """What transformers collects under one model key: its source tensors, and the converter that
    builds the model's tensor(s) from them (None: a plain copy of the one source, maybe renamed)."""

    name: str
    converter: Any = None
    sources: list[tuple[str, str, Path]] = field(default_factory=list)  # (pattern, checkpoint key, file)


@dataclass
class LoadPlan:
    targets: dict[str, Target]
    unexpected: dict[str, tuple[str, Path]]  # model-side name -> (checkpoint key, file), transformers' ignores left out
    shapes: dict[str, tuple[list[int], torch.dtype | None]]  # checkpoint key -> its stored shape and dtype
    unreadable: dict[str, str] = field(default_factory=dict)  # checkpoint key -> a stored dtype vkd-ds cannot read


def plan_load(model: torch.nn.Module, files: list[Path]) -> LoadPlan:
    """Every checkpoint key's place in `model`, decided as transformers' `convert_and_load_state_dict_in_model`
    decides it (same renamings and converters, same key order), from the files' headers."""
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import WeightConverter, WeightRenaming, dot_natural_key, rename_source_key

    where: dict[str, Path] = {}
    shapes: dict[str, tuple[list[int], torch.dtype | None]] = {}
    unreadable: dict[str, str] = {}
    for file in files:
        with open_checkpoint(file, headers_only=True) as reader:
            for key in reader.keys():  # a key in two files: the later file's, as transformers merges them
                where[key] = file
                shapes[key] = (reader.shape(key), reader.dtype(key))
                if shapes[key][1] is None:
                    unreadable[key] = reader.stored_dtype(key)
    transforms = get_model_conversion_mapping(model)
    renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
    converters = [t for t in transforms if isinstance(t, WeightConverter)]
    by_pattern = {pattern: converter for converter in converters for pattern in converter.source_patterns}
    names = _state_names(model)
    prefix = model.base_model_prefix
    targets: dict[str, Target] = {}
    unexpected: dict[str, tuple[str, Path]] = {}
    for key in sorted(where, key=dot_natural_key):  # the order a converter stacks its sources in (experts 0, 1, ...)
        name, pattern = rename_source_key(key, renamings, converters, prefix, names)
        if name not in names and key in names:  # as transformers: the key was right as it was
            name, pattern = rename_source_key(key, [], [], base_model_prefix=prefix, meta_state_dict=names)
        if name in names:
            target = targets.setdefault(name, Target(name, by_pattern[pattern] if pattern is not None else None))
            target.sources.append((key if pattern is None else pattern, key, where[key]))
        elif pattern is not None:
            patterns = by_pattern[pattern].target_patterns
            for other in patterns:
                unexpected.setdefault(name.replace(patterns[0], other), (key, where[key]))
        else:
            unexpected.setdefault(name, (key, where[key]))
    computed = {name for name, _ in model.named_buffers()}  # non-persistent: the model computes them itself
    unexpected = {name: source for name, source in unexpected.items() if name not in computed}
    kept = transformers_keeps(model, unexpected=set(unexpected))
    return LoadPlan(targets, {name: unexpected[name] for name in sorted(kept)}, shapes, unreadable)


def transformers_keeps(model, missing: set[str] = frozenset(), unexpected: set[str] = frozenset()) -> set[str]:
    """Of these missing or unexpected keys, those transformers reports: it drops the ones its rules
    ignore (`_keys_to_ignore_on_load_missing`/`_unexpected`, older exports' per-layer inv_freq, ...)."""
    info = SimpleNamespace(missing_keys=set(missing), unexpected_keys=set(unexpected))
    model._adjust_missing_and_unexpected_keys(info)
    return info.missing_keys if missing else info.unexpected_keys


def convert_tensors(model: torch.nn.Module, target: Target, fetch) -> dict[str, torch.Tensor]:
    """The model's tensor(s) that transformers' converter builds from `target`'s sources, each fetched
    whole by `fetch(key, file)`: {model name: tensor}."""
    converter = copy.deepcopy(target.converter)
    for pattern, key, file in target.sources:
        converter.add_tensor(target.name, key, pattern, lambda key=key, file=file: fetch(key, file))
    outputs = converter.convert(target.name, model=model, config=model.config)
    return {name: value[0] if isinstance(value, list) else value for name, value in outputs.items()}


def converter_targets(target: Target) -> list[str]:
    """The model names a converter target is expected to fill (as transformers expands them)."""
    patterns = target.converter.target_patterns
    return [target.name.replace(patterns[0], other) for other in patterns]
