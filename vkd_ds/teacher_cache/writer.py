"""Writing: `vkd-ds cache-teacher` on every rank of the launched job, the shards still to write
shared among the ranks by records (assign_shards)."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch

from vkd_ds.losses import shift_for_next_token
from vkd_ds.teacher_cache.manifest import MANIFEST, read_manifest, write_json_atomic
from vkd_ds.teacher_cache.prepare import prepare_cache
from vkd_ds.teacher_cache.shards import check_shard, shard_dtypes, write_shard
from vkd_ds.teacher_cache.values import teacher_rows


def write_cache(cfg) -> dict:
    """Runs on every rank of the launched job: the teacher (ZeRO-3, offloaded, as training builds
    it) over every record of the data files; the manifest, complete, on rank 0 at the end."""
    from vkd_ds import dist, engines
    from vkd_ds.builders.objective import build_objective
    from vkd_ds.data import collate
    from vkd_ds.ds_config import teacher_ds_config
    from vkd_ds.memory import free_device_bytes
    from vkd_ds.metrics import setup_logging
    from vkd_ds.objective import Teacher
    from vkd_ds.valence import load_head

    plan = prepare_cache(cfg)
    s, manifest, files, tokenizer, cross = plan.settings, plan.manifest, plan.files, plan.tokenizer, plan.cross
    dist.init()
    log = setup_logging(None, dist.is_main())
    directory = Path(s.cache.dir)
    world, rank = dist.world_size(), dist.rank()
    ds = teacher_ds_config(s, dist.on_gpu())
    engine = engines.build_teacher_engine(s.teacher.path, ds)
    head = None
    if manifest["valence"] is not None:
        head = load_head(s.valence.teacher_head, int(s.valence.k), plan.teacher_width).to(dist.device())
        head.requires_grad_(False)
    # The teacher's logits go through the chunked loss code here: plan the chunks for their width.
    objective = build_objective(s, [], manifest["vocab_size"]).planned(
        plan.teacher_width,
        torch.bfloat16 if ds["bf16"]["enabled"] else torch.float32,
        dist.on_gpu(),
        free_device_bytes(dist.on_gpu(), dist.local_world_size()),
    )
    teacher = Teacher(engine, objective, head)
    if dist.is_main():
        directory.mkdir(parents=True, exist_ok=True)
        if not (directory / MANIFEST).is_file():
            write_json_atomic(directory / MANIFEST, manifest)
    dist.barrier()
    shards = [(split, shard) for split, entry in manifest["splits"].items() for shard in entry["shards"]]
    # Complete on disk as any rank sees it (every rank must make the same plan).
    seen = torch.tensor([(directory / split / shard["name"]).is_dir() for split, shard in shards], dtype=torch.int64)
    complete = dist.all_reduce_max(seen).tolist() if shards else []
    todo = assign_shards([shard for shard, done in zip(shards, complete, strict=True) if not done], world)[rank]
    micro = int(s.trainer.micro_batch_size)
    batches = [(split, shard, first) for split, shard in todo for first in range(*shard["records"], micro)]
    total = int(dist.all_reduce_max(torch.tensor([len(batches)]))[0])
    splits = manifest["splits"]
    log.info(
        "cache-teacher: %s, top-%d at T=%g (%s), %d shard(s) to write on %d rank(s), %d already complete, "
        "%d bytes per position",
        ", ".join(f"{name} {e['records']} records / {e['positions']} positions" for name, e in splits.items()),
        manifest["top_k"],
        manifest["temperature"],
        manifest["precision"],
        len(shards) - sum(complete),
        world,
        sum(complete),
        manifest["bytes_per_position"],
    )
    written = torch.zeros(2, world, dtype=torch.int64)  # records and shards this rank wrote, in its column
    started = time.perf_counter()
    written_positions = 0
    dtypes = shard_dtypes(manifest)
    vocab = manifest["vocab_size"]
    pending: dict[str, list] = {}
    pad = tokenizer.pad_token_id
    dummy = _teacher_inputs(collate([files["train"][1][0]], pad), [files["train"][1][0]], cross)
    for i in range(total):
        if i >= len(batches):
            # ZeRO-3 forwards are collective: a rank with no shard left joins with a batch it discards.
            teacher(*(dummy[k].to(dist.device()) for k in ("input_ids", "attention_mask")))
            continue
        split, shard, first = batches[i]
        examples = files[split][1][first : min(first + micro, shard["records"][1])]
        batch = {k: v.to(dist.device()) for k, v in _teacher_inputs(collate(examples, pad), examples, cross).items()}
        out = teacher(batch["input_ids"], batch["attention_mask"])
        targets, mask = shift_for_next_token(batch["input_ids"], batch["loss_mask"])
        rows = teacher_rows(
            out["logits"], targets, mask, vocab, manifest["top_k"], manifest["temperature"], objective.chunk_tokens
        )
        if head is not None:
            rows["valence"] = out["valence"][mask].float().cpu()
        # In the stored types at once: a shard waits in memory until its last batch.
        rows = {name: value.numpy().astype(dtypes[name]) for name, value in rows.items()}
        rows["counts"] = mask.sum(1).cpu().numpy().astype(np.int64)
        pending.setdefault(shard["name"] + split, []).append(rows)
        written_positions += int(mask.sum())
        if first + micro >= shard["records"][1]:
            write_shard(directory / split / shard["name"], pending.pop(shard["name"] + split), manifest)
            log.info("cache-teacher: rank %d wrote %s/%s", rank, split, shard["name"])
            written[:, rank] += torch.tensor([shard["records"][1] - shard["records"][0], 1])
    dist.barrier()
    records, count = dist.all_reduce_sum(written).tolist()
    log.info(
        "cache-teacher: records (shards) written per rank: %s",
        ", ".join(f"{n} ({c})" for n, c in zip(records, count, strict=True)),
    )
    seconds = time.perf_counter() - started
    positions = int(dist.all_reduce_sum(torch.tensor([written_positions]))[0])
    if dist.is_main():
        for split, entry in manifest["splits"].items():
            for shard in entry["shards"]:
                check_shard(directory / split / shard["name"], shard, manifest)
        disk = sum(f.stat().st_size for f in directory.rglob("*.npy"))
        all_positions = sum(e["positions"] for e in manifest["splits"].values())
        final = read_manifest(directory, "cache.dir")  # a rerun keeps the first write's throughput
        final["complete"] = True
        final["bytes"] = disk
        final["bytes_per_token"] = disk / max(all_positions, 1)
        if positions == all_positions:
            final["write_positions_per_s"] = positions / seconds
        write_json_atomic(directory / MANIFEST, final)
        log.info(
            "cache-teacher: complete, %d positions, %.1f MB, %.1f bytes per token%s",
            all_positions,
            disk / 1e6,
            final["bytes_per_token"],
            f", wrote {positions / seconds:.0f} positions/s" if positions else "",
        )
    dist.barrier()
    return manifest


def _teacher_inputs(batch: dict, examples: list, cross) -> dict:
    """What the teacher reads of a collated batch: the batch itself; across tokenizers (`cross`, a
    CrossVocab) its rows in the teacher's tokens, every one of them with a next token a position."""
    if cross is None:
        return batch
    rows = cross.batch_fields([ex.input_ids for ex in examples], batch["loss_mask"])
    ids, attention = rows["teacher_input_ids"], rows["teacher_attention_mask"]
    return {"input_ids": ids, "attention_mask": attention, "loss_mask": attention}


def assign_shards(shards: list[tuple[str, dict]], world: int) -> list[list[tuple[str, dict]]]:
    """The shards to write, (split, manifest entry) over all splits, given to `world` ranks: largest
    first, each to the rank with the fewest records so far (the lowest-numbered of them). Each rank's
    records are then within one shard's of every other rank's, hence of the mean. Deterministic: every
    rank computes the same plan. Each rank's shards in the order given."""
    loads = [0] * world
    ranks: list[list[int]] = [[] for _ in range(world)]
    size = [shard["records"][1] - shard["records"][0] for _, shard in shards]
    for i in sorted(range(len(shards)), key=lambda i: (-size[i], i)):
        least = min(range(world), key=lambda r: (loads[r], r))
        loads[least] += size[i]
        ranks[least].append(i)
    return [[shards[i] for i in sorted(mine)] for mine in ranks]
