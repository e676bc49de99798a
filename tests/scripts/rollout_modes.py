"""Run under the deepspeed launcher (ZeRO-3): sample from the same student gathered once and
synced per token, with each rank on different prompts; then rank 0 alone stops at EOS after one
token while rank 1 goes on. Each rank writes what it sampled to OUT_DIR/rank_R.json."""

import json

import deepspeed
import torch
from student_setup import student_engine  # the script's directory is on sys.path

from vkd_ds import dist
from vkd_ds.losses import shift_for_next_token, token_ce
from vkd_ds.rollout import SamplingSettings, StudentSampler, prompt_of, rollout_batch, row_uniforms

out_dir, cfg, prepared, engine = student_engine(seed=7)
rank = dist.rank()
tokenizer = prepared.tokenizer
settings = SamplingSettings(n_gen=10, temperature=1.0, top_p=0.95, prompt_tokens=5, max_seq_len=48)
vocab, pad = len(tokenizer), tokenizer.pad_token_id

# Different prompts (and prompt lengths) on each rank.
examples = prepared.train_data[rank * 3 : rank * 3 + 3]
prompts = [prompt_of(ex, settings)[: 3 + row + rank] for row, ex in enumerate(examples)]
uniforms = row_uniforms(11, 0, [rank * 3 + row for row in range(3)], settings.n_gen)
gathered, synced = StudentSampler(engine, "always"), StudentSampler(engine, "never")
report = {"modes": [gathered.mode, synced.mode]}
report["gathered"] = gathered(prompts, uniforms, settings, vocab, None, pad).tokens
report["synced"] = synced(prompts, uniforms, settings, vocab, None, pad).tokens

# Uneven lengths: rank 0's EOS is the first token its single prompt samples, so it finishes after
# one step; rank 1 never stops early. Synced generation must keep both ranks in step.
eos = report["gathered"][0][0] if rank == 0 else None
mine = [prompts[0]] if rank == 0 else prompts
uneven = {
    name: sampler(mine, uniforms[: len(mine)], settings, vocab, eos, pad).tokens
    for name, sampler in (("gathered", gathered), ("synced", synced))
}
report["uneven"] = uneven

# One training step on those uneven samples (different shapes on each rank): no hang, and the
# ranks still hold one and the same model afterwards.
samples = gathered(mine, uniforms[: len(mine)], settings, vocab, eos, pad)
batch = rollout_batch(samples, pad)
targets, mask = shift_for_next_token(batch["input_ids"], batch["loss_mask"])
loss = token_ce(engine(batch["input_ids"], batch["attention_mask"])["logits"], targets, mask, vocab).mean()
engine.backward(loss)
engine.step()
sums = []
for param in engine.module.parameters():
    with deepspeed.zero.GatheredParameters([param]):
        sums.append(float(param.double().sum()))
everyone = dist.all_gather(torch.tensor(sums, dtype=torch.float64))
report["loss"] = float(loss)
report["shape"] = list(batch["input_ids"].shape)
report["same_model_on_every_rank"] = bool((everyone == everyone[0]).all())
(out_dir / f"rank_{rank}.json").write_text(json.dumps(report))
dist.barrier()

# End as the ranks of a job do (launch.leave): the interpreter's C++ teardown with a gloo group alive
# aborted about one process in 60 ("terminate called without an active exception").
from vkd_ds.launch import leave  # noqa: E402

dist.barrier()
leave(0)
