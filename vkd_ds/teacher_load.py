"""The teacher's weights, shard by shard, straight into its ZeRO-3 partitions; and whether they fit.

transformers' ZeRO-3 loading merges every checkpoint file into one state dict on rank 0 and
gathers each layer to copy it in, so rank 0 holds the whole teacher at once
(bench/teacher_load_peak.py, a 1.1 B teacher in bf16 files on 2 ranks: rank 0 peaked at 5.34 GB,
against 2.73-2.80 GB here). Here each rank builds the model already partitioned (zero.Init, no
weight init), then reads from each checkpoint file only the elements of its own partition of each
tensor and copies them into that partition: no gather, no collective, and at any moment a rank
holds its share plus its part of the one tensor it is reading.

Formats: what transformers' `from_pretrained` takes from a local directory, in its order of
preference: `model.safetensors`, `model.safetensors.index.json` (sharded), `pytorch_model.bin`,
`pytorch_model.bin.index.json` (sharded). safetensors files are read with plain reads, not mmap, so
no file page stays in a rank's resident set. A `.bin` file is opened with `torch.load(mmap=True,
weights_only=True)`, one file at a time: only the pages of the slices read are touched, each slice
is copied out and the mapping is dropped when the file is done (a pre-torch-1.6 `.bin`, not a zip
archive, cannot be mapped: that one file is read whole, as transformers reads it).

Names: checkpoint keys are matched to the model as transformers matches them on load, with its own
machinery: the weight conversions it registers for the model (`get_model_conversion_mapping`:
renamings, the legacy renamings such as GPT-NeoX's `embed_out` -> `lm_head`, the converters that
fuse MoE experts stored one by one), its `rename_source_key` (which also adds or strips the
`base_model_prefix`), and its rules for keys it ignores (`_adjust_missing_and_unexpected_keys`: the
model's `_keys_to_ignore_on_load_unexpected`, older exports' per-layer `rotary_emb.inv_freq`,
`position_ids`). A key naming one of the model's non-persistent buffers is skipped, as transformers
skips it. A plain (possibly renamed) tensor is read partition by partition as above. A parameter that
transformers builds from several tensors (a `WeightConverter`: e.g. Mixtral's `experts.N.w1/w3`
merged into `experts.gate_up_proj`) is built whole, for that one parameter, from its source tensors
with transformers' converter ops, this rank's slice copied in, then freed: at most one converted
tensor is whole on a rank at a time (with its sources while they are merged, about twice its size),
never the teacher.

`check_checkpoint` matches the files to the model built from the config on the meta device before
anything is loaded, reading headers only (a `.bin` is unpickled onto the meta device; converted
parameters' shapes come from transformers' ops run on meta tensors): a missing parameter, an
unexpected tensor or one of the wrong shape is refused with its name and file, whatever the format.

`check_teacher_fits` is the estimate made before anything is loaded: the teacher's parameter
count from its config (a model built on the meta device), against the memory its shards land in.
"""

from __future__ import annotations

import copy
import json
import math
import os
import struct
import zipfile
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch

from vkd_ds.errors import VkdError, library_reason
from vkd_ds.memory import GIB, available_host_bytes

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
BIN_FILE = "pytorch_model.bin"
BIN_INDEX_FILE = "pytorch_model.bin.index.json"


def _weight_files(directory: Path, single: str, index_name: str) -> list[Path]:
    """One format's files, as transformers finds them: the single file first, else its index's shards."""
    if (directory / single).is_file():
        return [directory / single]
    index = directory / index_name
    if not index.is_file():
        return []
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
        names = sorted(set(weight_map.values()))
    except (ValueError, KeyError, TypeError, AttributeError) as err:
        raise VkdError(f"teacher.path: {index} is not a checkpoint index ({err})") from None
    files = [directory / name for name in names]
    for file in files:
        if not file.is_file():
            raise VkdError(f"teacher.path: {index} names {file.name}, which is missing")
    return files


def safetensors_files(directory: str | Path) -> list[Path]:
    """The checkpoint's safetensors files (one file, or the shards its index names); [] for none."""
    return _weight_files(Path(directory), SINGLE_FILE, INDEX_FILE)


def checkpoint_files(directory: str | Path) -> list[Path]:
    """The files transformers would load the weights from: safetensors where there are any, else
    `.bin` (one file or the shards of its index); [] for neither."""
    return safetensors_files(directory) or _weight_files(Path(directory), BIN_FILE, BIN_INDEX_FILE)


def _partition_range(param: torch.Tensor, rank: int) -> tuple[int, int]:
    """[start, end) of the flattened parameter that this rank's ZeRO-3 partition holds."""
    size = param.partition_numel()
    start = rank * size
    return min(start, param.ds_numel), min(start + size, param.ds_numel)


_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


class SafetensorsReader:
    """Reads element ranges of the tensors in one safetensors file with plain reads, not mmap: the
    bytes land in a buffer this process owns and frees, and no mapped page of the file stays
    counted in its resident set (the format: 8-byte header length, JSON header, raw data)."""

    def __init__(self, path: Path):
        self.path = path
        self.handle = open(path, "rb")  # noqa: SIM115 - closed by close()/__exit__
        try:
            (length,) = struct.unpack("<Q", self.handle.read(8))
            header = json.loads(self.handle.read(length))
        except (struct.error, ValueError) as err:
            self.handle.close()
            raise VkdError(f"teacher.path: {path.name} is not a safetensors file ({err})") from None
        header.pop("__metadata__", None)
        self.data_start = 8 + length
        self.entries = header

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self) -> None:
        self.handle.close()

    def keys(self) -> list[str]:
        return list(self.entries)

    def shape(self, key: str) -> list[int]:
        return list(self.entries[key]["shape"])

    def dtype(self, key: str) -> torch.dtype | None:
        """Its stored dtype; None for one vkd-ds cannot read (refused by `read`; `stored_dtype` names it)."""
        return _DTYPES.get(self.entries[key]["dtype"])

    def stored_dtype(self, key: str) -> str:
        return self.entries[key]["dtype"]

    def read(self, key: str, start: int = 0, end: int | None = None) -> torch.Tensor:
        """Elements [start, end) of the flattened tensor `key`, as a 1-D tensor of its stored dtype."""
        entry = self.entries[key]
        if entry["dtype"] not in _DTYPES:
            raise VkdError(
                f"teacher.path: {self.path.name} stores {key!r} as {entry['dtype']}, which vkd-ds cannot read"
            )
        dtype = _DTYPES[entry["dtype"]]
        size = torch.empty((), dtype=dtype).element_size()
        end = math.prod(entry["shape"]) if end is None else end
        first, _ = entry["data_offsets"]
        buffer = torch.empty((end - start) * size, dtype=torch.uint8)
        self.handle.seek(self.data_start + first + start * size)
        if self.handle.readinto(buffer.numpy()) != buffer.numel():
            raise VkdError(f"teacher.path: {self.path.name} is truncated (reading {key!r})")
        return buffer.view(dtype)


class TorchBinReader:
    """The same reads from one `.bin` file (a torch.save'd state dict), through `torch.load(mmap=True,
    weights_only=True)`: the file is mapped, not read; `read` copies out only the slice asked for (so
    only its pages are touched) and `close` drops the mapping. With `headers_only` the tensors are
    unpickled onto the meta device: names, shapes and dtypes, no data."""

    def __init__(self, path: Path, headers_only: bool = False):
        self.path = path
        try:
            if headers_only:
                state = torch.load(path, map_location="meta", weights_only=True)
            else:  # a pre-torch-1.6 file is not a zip archive and cannot be mapped: read whole, as transformers does
                state = torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
        except Exception as err:  # not a torch file, or pickled objects weights_only refuses
            raise VkdError(f"teacher.path: torch.load cannot read {path.name}: {library_reason(err)}") from None
        if not isinstance(state, dict):
            raise VkdError(f"teacher.path: {path.name} holds a {type(state).__name__}, not a state dict")
        for key, value in state.items():
            if not isinstance(value, torch.Tensor):
                raise VkdError(f"teacher.path: {path.name} holds {key!r}, a {type(value).__name__}, not a tensor")
        self.tensors: dict[str, torch.Tensor] = dict(state)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self) -> None:
        self.tensors = {}  # the last reference to the mapped storages: unmapped here

    def keys(self) -> list[str]:
        return list(self.tensors)

    def shape(self, key: str) -> list[int]:
        return list(self.tensors[key].shape)

    def dtype(self, key: str) -> torch.dtype:
        return self.tensors[key].dtype

    def read(self, key: str, start: int = 0, end: int | None = None) -> torch.Tensor:
        """Elements [start, end) of the flattened tensor `key`, as a 1-D tensor of its stored dtype
        that owns its memory (a copy of those elements only, unless the stored tensor is a
        non-contiguous view, which is flattened whole first)."""
        tensor = self.tensors[key]
        flat = tensor.view(-1) if tensor.is_contiguous() else tensor.reshape(-1)
        return flat[start:end].clone()


def open_checkpoint(path: Path, headers_only: bool = False) -> SafetensorsReader | TorchBinReader:
    """A reader of one checkpoint file, by its format (safetensors reads only its header when opened)."""
    if path.suffix == ".safetensors":
        return SafetensorsReader(path)
    return TorchBinReader(path, headers_only=headers_only)


# -- which tensor goes where: transformers' own renamings and converters ---------------------------


def _checkpoint_names(model: torch.nn.Module) -> tuple[dict, dict, dict]:
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


def _model_shape(tensor: torch.Tensor) -> list[int]:
    return list(getattr(tensor, "ds_shape", tensor.shape))  # a ZeRO-3 parameter's own shape is its partition's


@dataclass
class _Target:
    """What transformers collects under one model key: its source tensors, and the converter that
    builds the model's tensor(s) from them (None: a plain copy of the one source, maybe renamed)."""

    name: str
    converter: Any = None
    sources: list[tuple[str, str, Path]] = field(default_factory=list)  # (pattern, checkpoint key, file)


@dataclass
class _Plan:
    targets: dict[str, _Target]
    unexpected: dict[str, tuple[str, Path]]  # model-side name -> (checkpoint key, file), transformers' ignores left out
    shapes: dict[str, tuple[list[int], torch.dtype | None]]  # checkpoint key -> its stored shape and dtype
    unreadable: dict[str, str] = field(default_factory=dict)  # checkpoint key -> a stored dtype vkd-ds cannot read


def _plan(model: torch.nn.Module, files: list[Path]) -> _Plan:
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
    targets: dict[str, _Target] = {}
    unexpected: dict[str, tuple[str, Path]] = {}
    for key in sorted(where, key=dot_natural_key):  # the order a converter stacks its sources in (experts 0, 1, ...)
        name, pattern = rename_source_key(key, renamings, converters, prefix, names)
        if name not in names and key in names:  # as transformers: the key was right as it was
            name, pattern = rename_source_key(key, [], [], base_model_prefix=prefix, meta_state_dict=names)
        if name in names:
            target = targets.setdefault(name, _Target(name, by_pattern[pattern] if pattern is not None else None))
            target.sources.append((key if pattern is None else pattern, key, where[key]))
        elif pattern is not None:
            patterns = by_pattern[pattern].target_patterns
            for other in patterns:
                unexpected.setdefault(name.replace(patterns[0], other), (key, where[key]))
        else:
            unexpected.setdefault(name, (key, where[key]))
    computed = {name for name, _ in model.named_buffers()}  # non-persistent: the model computes them itself
    unexpected = {name: source for name, source in unexpected.items() if name not in computed}
    kept = _transformers_keeps(model, unexpected=set(unexpected))
    return _Plan(targets, {name: unexpected[name] for name in sorted(kept)}, shapes, unreadable)


def _transformers_keeps(model, missing: set[str] = frozenset(), unexpected: set[str] = frozenset()) -> set[str]:
    """Of these missing or unexpected keys, those transformers reports: it drops the ones its rules
    ignore (`_keys_to_ignore_on_load_missing`/`_unexpected`, older exports' per-layer inv_freq, ...)."""
    info = SimpleNamespace(missing_keys=set(missing), unexpected_keys=set(unexpected))
    model._adjust_missing_and_unexpected_keys(info)
    return info.missing_keys if missing else info.unexpected_keys


def _convert(model: torch.nn.Module, target: _Target, fetch) -> dict[str, torch.Tensor]:
    """The model's tensor(s) that transformers' converter builds from `target`'s sources, each fetched
    whole by `fetch(key, file)`: {model name: tensor}."""
    converter = copy.deepcopy(target.converter)
    for pattern, key, file in target.sources:
        converter.add_tensor(target.name, key, pattern, lambda key=key, file=file: fetch(key, file))
    outputs = converter.convert(target.name, model=model, config=model.config)
    return {name: value[0] if isinstance(value, list) else value for name, value in outputs.items()}


def _converter_targets(target: _Target) -> list[str]:
    """The model names a converter target is expected to fill (as transformers expands them)."""
    patterns = target.converter.target_patterns
    return [target.name.replace(patterns[0], other) for other in patterns]


def _missing_sources(model: torch.nn.Module, plan: _Plan, target: _Target) -> list[str]:
    """The checkpoint keys transformers would save for `target`'s parameters (its conversions reversed)
    that the files lack; [] where the files name them otherwise (a legacy naming) or it cannot tell."""
    from transformers.core_model_loading import dot_natural_key, revert_weight_conversion

    state = {}
    for name in _converter_targets(target):
        try:
            state[name] = torch.empty(_model_shape(model.get_parameter(name)), device="meta")
        except AttributeError:
            continue
    try:
        expected = list(revert_weight_conversion(model, state))
    except Exception:
        return []
    missing = [key for key in expected if key not in plan.shapes]
    return sorted(missing, key=dot_natural_key) if len(missing) < len(expected) else []


def _conversion_problem(model, plan: _Plan, target: _Target, directory, what: str) -> VkdError:
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


def _meta(plan: _Plan):
    def fetch(key: str, file: Path) -> torch.Tensor:
        shape, dtype = plan.shapes[key]
        return torch.empty(shape, dtype=dtype or torch.float32, device="meta")

    return fetch


def _verify(model: torch.nn.Module, plan: _Plan, directory) -> set[str]:
    """Refuse what transformers would not load into `model` (a meta model) or would report: a tensor
    it has no place for, one of another shape, a missing parameter. The missing parameters
    transformers' rules ignore are returned (they are initialized as transformers does)."""
    params, aliases, _ = _checkpoint_names(model)
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
            shape, expected = plan.shapes[key][0], _model_shape(model.get_parameter_or_buffer(target.name))
            if shape != expected:
                loaded_as = f" (transformers loads it as {target.name!r})" if target.name != key else ""
                raise VkdError(
                    f"teacher.path: {file.name} holds {key!r}{loaded_as} with shape {shape}, the model's is {expected}"
                )
            covered.add(target.name)
            continue
        try:
            outputs = _convert(model, target, _meta(plan))
        except Exception as err:
            if "meta" in str(err):  # an op that needs real data: its shapes are checked as it loads
                covered.update(_converter_targets(target))
                continue
            raise _conversion_problem(model, plan, target, directory, f"an error: {library_reason(err)}") from None
        for name, tensor in outputs.items():
            try:
                expected = _model_shape(model.get_parameter_or_buffer(name))
            except AttributeError:
                raise _conversion_problem(model, plan, target, directory, f"{name!r}, which the model lacks") from None
            if list(tensor.shape) != expected:
                what = f"shape {list(tensor.shape)} for {name!r}, the model's is {expected}"
                raise _conversion_problem(model, plan, target, directory, what)
            covered.add(name)
    found = {aliases.get(name, name) for name in covered}
    missing = {name for name in params if name not in found}
    refused = _transformers_keeps(model, missing=missing) if missing else set()
    if refused:
        raise VkdError(f"teacher.path: the checkpoint in {directory} lacks {_names(sorted(refused))}")
    return missing


# -- loading ---------------------------------------------------------------------------------------


def load_partitioned(model: torch.nn.Module, directory: str | Path, rank: int) -> None:
    """Copy the checkpoint in `directory` into `model`, built under zero.Init (its parameters
    partitioned), reading only this rank's partitions (and, for a parameter transformers converts,
    its sources, one parameter at a time). `check_checkpoint` has matched the files' names and shapes
    to the model beforehand (build_teacher_engine)."""
    params, aliases, _ = _checkpoint_names(model)
    files = checkpoint_files(directory)
    plan = _plan(model, files)
    loaded: set[str] = set()

    def place(name: str, read) -> None:
        canonical = aliases.get(name, name)
        if canonical in params:
            if canonical not in loaded:  # a tied weight may be stored under both its names
                _copy_into(params[canonical], read, rank)
                loaded.add(canonical)
        else:  # a persistent buffer: not partitioned
            buffer = model.get_buffer(name)
            with torch.no_grad():
                buffer.copy_(read(0, None).view(buffer.shape))
            buffer._is_hf_initialized = True

    # A plain tensor is read from its file; a converted one once the last file it reads from is open.
    order = {file: i for i, file in enumerate(files)}
    plain: dict[Path, list[_Target]] = defaultdict(list)
    merged: dict[Path, list[_Target]] = defaultdict(list)
    for target in plan.targets.values():
        if target.converter is None:
            plain[target.sources[0][2]].append(target)
        else:
            merged[max((file for _, _, file in target.sources), key=order.__getitem__)].append(target)
    for file in files:
        with open_checkpoint(file) as reader:
            for target in plain[file]:
                key = target.sources[0][1]
                place(target.name, lambda start, end, key=key: reader.read(key, start, end))
            for target in merged[file]:  # one converted parameter whole at a time, freed before the next
                _place_whole(_convert_whole(model, plan, target, file, reader, directory), place)
    missing = [name for name in params if name not in loaded]
    if missing:  # parameters transformers' rules let a checkpoint omit: initialized as transformers does
        _initialize(model, params, missing)


def _convert_whole(model, plan: _Plan, target: _Target, file: Path, reader, directory) -> dict[str, torch.Tensor]:
    """`target`'s parameter(s), built whole from its sources with transformers' converter ops; each
    source cast to the parameter's dtype first, as transformers casts it. Sources in other files
    (experts split across shards) are read from them, each opened for this one conversion."""
    first = _converter_targets(target)[0]
    dtype = model.get_parameter_or_buffer(first).dtype
    others: dict[Path, Any] = {}

    def fetch(key: str, source_file: Path) -> torch.Tensor:
        if source_file == file:
            source = reader
        else:
            source = others.get(source_file) or others.setdefault(source_file, open_checkpoint(source_file))
        tensor = source.read(key).view(plan.shapes[key][0])
        return tensor.to(dtype) if tensor.is_floating_point() and dtype.is_floating_point else tensor

    try:
        outputs = _convert(model, target, fetch)
    except VkdError:
        raise
    except Exception as err:
        raise _conversion_problem(model, plan, target, directory, f"an error: {library_reason(err)}") from None
    finally:
        for other in others.values():
            other.close()
    for name, tensor in outputs.items():
        expected = _model_shape(model.get_parameter_or_buffer(name))
        if list(tensor.shape) != expected:
            what = f"shape {list(tensor.shape)} for {name!r}, the model's is {expected}"
            raise _conversion_problem(model, plan, target, directory, what)
    return outputs


def _place_whole(outputs: dict[str, torch.Tensor], place) -> None:
    """Copy this rank's slice of each converted tensor in; each is freed as soon as it is copied."""
    while outputs:
        name, tensor = outputs.popitem()
        flat = tensor.reshape(-1)
        place(name, lambda start, end, flat=flat: flat[start:end])
        del tensor, flat


def _initialize(model, params: dict[str, torch.Tensor], missing: list[str]) -> None:
    """Initialize the parameters a checkpoint may omit (transformers' `_keys_to_ignore_on_load_missing`)
    as transformers' ZeRO-3 loading does: everything else marked initialized, the missing ones
    gathered, `initialize_weights` on rank 0, the result scattered back."""
    import deepspeed

    for name, param in params.items():
        if name not in missing:
            param._is_hf_initialized = True
    with deepspeed.zero.GatheredParameters([params[name] for name in missing], modifier_rank=0):
        model.initialize_weights()


def _copy_into(param: torch.Tensor, read, rank: int) -> None:
    """Copy this rank's part of a checkpoint tensor into `param`; `read(start, end)` gives elements
    [start, end) of the flattened tensor (end None: to its end)."""
    from deepspeed.runtime.zero.partition_parameters import PartitionedParamStatus

    with torch.no_grad():
        if not hasattr(param, "ds_tensor"):  # not partitioned: the whole tensor, one at a time
            param.data.copy_(read(0, None).view(param.shape))
            return
        start, end = _partition_range(param, rank)
        if end <= start:
            return  # this rank's partition is all padding
        swapped = param.ds_tensor.status == PartitionedParamStatus.NOT_AVAILABLE  # offload_param=nvme
        if swapped:
            param.nvme_swapper.swap_in([param], async_op=False)
        param.ds_tensor.data[: end - start].copy_(read(start, end))
        if swapped:
            param.nvme_swapper.swap_out_and_release([param])


NO_WEIGHTS = f"holds no weights transformers loads: none of {SINGLE_FILE}, {INDEX_FILE}, {BIN_FILE}, {BIN_INDEX_FILE}"


def build_teacher_model(path: str, ds_config: dict[str, Any], dtype: torch.dtype, attention: dict[str, str]):
    """The teacher built already partitioned (zero.Init with `ds_config`; whole, on this rank's device,
    when `ds_config` is not ZeRO-3), weights not initialized, then loaded with `load_partitioned`,
    whatever the checkpoint's format; a VkdError where `path` holds none."""
    import contextlib

    import deepspeed
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.initialization import no_init_weights
    from transformers.integrations.deepspeed import prevent_arange_dtype_change

    from vkd_ds import dist

    if not checkpoint_files(path):
        raise VkdError(f"teacher.path: {path} {NO_WEIGHTS}")
    config = AutoConfig.from_pretrained(path)
    if ds_config["zero_optimization"]["stage"] == 3:
        placement = deepspeed.zero.Init(config_dict_or_path=ds_config)
    else:  # built where it runs: its tensors are read straight into device memory
        placement = torch.device(dist.device()) if dist.on_gpu() else contextlib.nullcontext()
    with no_init_weights(), prevent_arange_dtype_change(), placement:
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, **attention)
    model.tie_weights()  # no_init_weights skips init_weights, which is where transformers ties them
    load_partitioned(model, path, torch.distributed.get_rank() if torch.distributed.is_initialized() else 0)
    return model


# -- will it fit? -------------------------------------------------------------------------------


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
    params, _, _ = _checkpoint_names(model)
    files = checkpoint_files(directory)
    if files:
        _verify(model, _plan(model, files), directory)
    return TeacherShape(sum(p.numel() for p in params.values()), max(p.numel() for p in params.values()))


def _names(missing: list[str], what: str = "parameter") -> str:
    shown = ", ".join(missing[:3]) + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
    return f"{len(missing)} {what}(s): {shown}"


@dataclass(frozen=True)
class FitEstimate:
    parameters: int
    bytes_per_parameter: int
    world_size: int
    local_ranks: int
    where: str  # "host memory", "GPU memory", "the NVMe path's disk"
    available: int

    @property
    def teacher_bytes(self) -> int:
        return self.parameters * self.bytes_per_parameter

    @property
    def share_bytes(self) -> int:
        return -(-self.teacher_bytes // self.world_size)

    @property
    def needed(self) -> int:
        """What this node (or this GPU) must hold of the teacher alone."""
        per = 1 if self.where == "GPU memory" else self.local_ranks
        return per * self.share_bytes

    @property
    def fits(self) -> bool:
        return self.needed <= self.available

    def message(self) -> str:
        per = "this GPU holds" if self.where == "GPU memory" else f"this node's {self.local_ranks} rank(s) hold"
        return (
            f"teacher.path: the teacher does not fit: {self.parameters:,} parameters are "
            f"{self.teacher_bytes / GIB:.2f} GiB at {self.bytes_per_parameter} bytes each; ZeRO-3 shards them over "
            f"{self.world_size} rank(s), so {per} {self.needed / GIB:.2f} GiB in {self.where}, but only "
            f"{self.available / GIB:.2f} GiB is available there. Run on more ranks or nodes, in bf16, or with "
            "teacher.offload_param=nvme"
        )


def estimate_fit(
    parameters: int, bf16: bool, offload: str, nvme_path: str | None, world_size: int, local_ranks: int, on_gpu: bool
) -> FitEstimate:
    """Where the teacher's shards live and how much room there is, before anything is loaded."""
    if offload == "nvme":
        where, available = "the NVMe path's disk", _disk_free(nvme_path)
    elif on_gpu and offload == "none":
        where, available = "GPU memory", torch.cuda.mem_get_info()[1]
    else:
        where, available = "host memory", available_host_bytes()
    return FitEstimate(parameters, 2 if bf16 else 4, world_size, local_ranks, where, available)


def check_teacher_fits(
    parameters: int, ds_config: dict[str, Any], world_size: int, local_ranks: int, on_gpu: bool
) -> FitEstimate:
    """The estimate for the teacher engine's `ds_config`; a VkdError with its numbers where it does not fit."""
    offload = ds_config["zero_optimization"].get("offload_param", {})
    estimate = estimate_fit(
        parameters,
        bool(ds_config["bf16"]["enabled"]),
        offload.get("device", "none"),
        offload.get("nvme_path"),
        world_size,
        local_ranks,
        on_gpu,
    )
    if not estimate.fits:
        raise VkdError(estimate.message())
    return estimate


def nvme_swap_config(ds_config: dict[str, Any], largest: int, world_size: int) -> dict[str, Any]:
    """`ds_config` with its NVMe parameter swap sized for this teacher, in a folder of this process.

    DeepSpeed swaps each partition through pinned buffers that must hold the largest partition (its
    default, 1e8 elements in 5 buffers, is 2 GB of locked memory per rank); the teacher gathers
    little ahead (ds_config.TEACHER_PREFETCH_ELEMENTS), so 4 buffers. Two jobs given one nvme_path
    would overwrite each other's swap files (both write rank0/, rank1/, ...): each process swaps
    under its own folder, removed when it exits (a killed one leaves it behind; safe to delete)."""
    import atexit
    import copy
    import shutil
    import socket

    ds = copy.deepcopy(ds_config)
    offload = ds["zero_optimization"]["offload_param"]
    folder = Path(offload["nvme_path"]) / f"vkd-ds-{socket.gethostname()}-{os.getpid()}"
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    offload["nvme_path"] = str(folder)
    offload.setdefault("buffer_size", max(-(-largest // world_size), 2**20))
    offload.setdefault("buffer_count", NVME_BUFFERS)
    return ds


NVME_BUFFERS = 4


def _disk_free(path: str | None) -> int:
    probe = Path(path or ".").resolve()
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    stat = os.statvfs(probe)
    return stat.f_bavail * stat.f_frsize
