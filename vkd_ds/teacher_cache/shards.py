"""A shard on disk (DIR/<split>/shard_NNNNN/<array>.npy): its arrays' shapes and types, written whole
into a `.partial` directory and published with one rename, and checked against the manifest."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np

from vkd_ds.errors import VkdError


def shard_shapes(shard: dict, m: dict) -> dict[str, tuple[int, ...]]:
    n, k = shard["positions"], m["top_k"]
    records = shard["records"][1] - shard["records"][0]
    shapes = {"ids": (n, k), "logp": (n, k), "tail": (n,), "entropy": (n,), "target_logp": (n,)}
    if m["valence"] is not None:
        shapes["valence"] = (n, m["valence"]["k"])
    shapes["offsets"] = (records + 1,)
    return shapes


def shard_dtypes(m: dict) -> dict[str, np.dtype]:
    return {**{k: np.dtype(v) for k, v in m["dtypes"].items()}, "offsets": np.dtype(np.int64)}


def check_shard(path: Path, shard: dict, m: dict) -> None:
    if not path.is_dir():
        raise VkdError(f"teacher.cache: shard {path} is missing: rerun vkd-ds cache-teacher with the cache's settings")
    dtypes = shard_dtypes(m)
    for name, shape in shard_shapes(shard, m).items():
        file = path / f"{name}.npy"
        if not file.is_file():
            raise VkdError(f"teacher.cache: {file} is missing (a damaged shard: delete {path} and rerun cache-teacher)")
        try:
            got_shape, dtype, offset = npy_header(file)
        except (ValueError, OSError) as err:
            raise VkdError(f"teacher.cache: {file} is damaged ({str(err).splitlines()[0]})") from None
        if got_shape != shape or dtype != dtypes[name]:
            raise VkdError(
                f"teacher.cache: {file} holds {dtype}{list(got_shape)}, the manifest says {dtypes[name]}{list(shape)}"
            )
        size = file.stat().st_size
        want = offset + int(np.prod(shape)) * dtype.itemsize
        if size != want:
            raise VkdError(
                f"teacher.cache: {file} is truncated ({size} of {want} bytes): delete {path} and rerun cache-teacher"
            )


def npy_header(path: Path) -> tuple[tuple[int, ...], np.dtype, int]:
    with open(path, "rb") as handle:
        version = np.lib.format.read_magic(handle)
        if version == (1, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(handle)
        else:
            shape, fortran, dtype = np.lib.format.read_array_header_2_0(handle)
        if fortran:
            raise ValueError("Fortran order")
        return tuple(shape), np.dtype(dtype), handle.tell()


def write_shard(path: Path, parts: list[dict], manifest: dict) -> None:
    """A shard's arrays into PATH.partial, published with one rename."""
    staging = path.with_name(path.name + ".partial")
    if staging.exists():
        shutil.rmtree(staging)  # left by a killed run
    staging.mkdir(parents=True)
    dtypes = shard_dtypes(manifest)
    counts = np.concatenate([p["counts"] for p in parts])
    arrays = {"offsets": np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)}
    for name in dtypes:
        if name == "offsets":
            continue
        arrays[name] = np.concatenate([p[name] for p in parts]).astype(dtypes[name], copy=False)
    for number, (name, array) in enumerate(arrays.items()):
        with open(staging / f"{name}.npy", "wb") as handle:
            np.save(handle, array)
            handle.flush()
            os.fsync(handle.fileno())
        if number == 0:
            _maybe_die_mid_shard()
    os.replace(staging, path)


_shards_begun = 0


def _maybe_die_mid_shard() -> None:
    """Fault injection for tests: with VKD_FAULT_CACHE_KILL=N, this process kills itself (SIGKILL) after
    the first array of its Nth shard is on disk, before the shard is published. Unset in normal runs."""
    global _shards_begun
    limit = os.environ.get("VKD_FAULT_CACHE_KILL")
    if not limit:
        return
    _shards_begun += 1
    if _shards_begun >= int(limit):
        import signal

        os.kill(os.getpid(), signal.SIGKILL)
