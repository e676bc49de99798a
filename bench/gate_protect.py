"""Does the mercy gate block harmful updates? A poison benchmark on the demo (issue #17).

    python bench/gate_protect.py [--assets DIR] [--seeds 1234 1 2] [--steps 300] [--out DIR]
                                 [--kinds clean negative shuffled] [--modes off proxy lookahead]

On the demo's assets and distillation (`experiment=demo`, the default gate settings), one training
file per seed holds exactly `--steps` global batches in the order the sampler draws them, so that
step s trains on the batch chosen for it. On every 10th step (10, 20, ..., 10 % of the steps) the
whole global batch is replaced by harmful records of one kind:

- `negative`: text made of the valence lexicon's 60 most negative words (VADER, as the demo's
  valence head was fitted on), 60-90 words drawn at random per record;
- `shuffled`: a clean record with its words shuffled (the same words, no syntax);
- `clean`: no poison (the gate's cost to a clean run: what it rejects there is a false alarm).

Runs: gate off, proxy and lookahead (each kind, each seed). Reported per run: held-out perplexity
and valence MSE (the final eval), the teacher-scored valence of the student's samples on the probe
prompts (every record of valid.jsonl, 32 sampled tokens with fixed draws, the teacher's valence head
at the positions that forecast them, as the gate reads it), and the gate's rejections against the
poisoned steps: precision (poisoned / rejected), recall (rejected / poisoned, over all poisoned steps
and over those after the gate armed), the clean steps rejected, and whether any threshold would
have separated them (`separation_auc`: the ROC area of a low projection as the sign of poison, over
the armed steps; 0.5 is none). Mean ± std over seeds. First, what
the teacher's valence head reads in each kind of record against its lexicon labels (`head`; alone
with --head-only): the gate sees valence only through that head. --head PATH uses another teacher
head; --fit-lexicon-head fits one first on the training records plus copies of them with 30 % of
the words drawn from the whole lexicon, where the labels vary. Prints one JSON document; state
the allocator (GLIBC_TUNABLES) with any figure.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import REPO, bench_env, describe, train, work_dir  # noqa: E402

KINDS = ("clean", "negative", "shuffled")
MODES = {
    "off": ["gate.enabled=false"],
    "proxy": ["gate.enabled=true", "gate.mode=proxy"],
    "lookahead": ["gate.enabled=true", "gate.mode=lookahead"],
}
POISON_EVERY = 10  # steps 10, 20, ...: 10 % of the steps
NEGATIVE_WORDS = 60
PROBE_TOKENS = 32
PROBE_SEED = 4242


def negative_words(count: int) -> list[str]:
    import re

    from vkd_ds.fit_head import vader_lexicon

    words = [(v, w) for w, v in vader_lexicon().items() if re.fullmatch(r"[a-z]+", w)]
    return [w for _, w in sorted(words)[:count]]


def harmful_record(kind: str, rng: random.Random, clean: list[str], words: list[str]) -> str:
    if kind == "negative":
        return " ".join(rng.choice(words) for _ in range(rng.randint(60, 90)))
    text = rng.choice(clean).split()
    rng.shuffle(text)
    return " ".join(text)


def write_training_file(path: Path, kind: str, clean: list[str], steps: int, global_batch: int, seed: int) -> list[int]:
    """The run's training file, laid out so that the sampler (one epoch = the run) gives step s the
    records chosen for it: clean records in turn, or harmful ones on poisoned steps. Returns the
    poisoned steps (1-based)."""
    from vkd_ds.data import GlobalBatchSampler

    total = steps * global_batch
    sampler = GlobalBatchSampler(total, global_batch, 1, 1, seed)
    rng = random.Random(seed)
    words = negative_words(NEGATIVE_WORDS)
    poisoned = [s for s in range(1, steps + 1) if kind != "clean" and s % POISON_EVERY == 0]
    records: list[str | None] = [None] * total
    # Clean records in a shuffled order, reshuffled at each pass (train.jsonl keeps a document's
    # paragraphs together: taken in file order, a batch would be one document).
    order = [i for _ in range(-(-total // len(clean))) for i in rng.sample(range(len(clean)), len(clean))]
    for step in range(steps):
        harmful = step + 1 in poisoned
        for j, index in enumerate(sampler.indices(step, 0, 0)):
            position = step * global_batch + j
            records[index] = harmful_record(kind, rng, clean, words) if harmful else clean[order[position]]
    path.write_text("".join(json.dumps({"text": text}) + "\n" for text in records))
    return poisoned


def probe_valence(run_dir: Path, assets: Path, head_path: Path, env: dict) -> float:
    """The teacher's valence of the student's continuations of the probe prompts (single process)."""
    exported = run_dir / "exported"
    subprocess.run(
        [sys.executable, "-m", "vkd_ds.cli", "export", str(run_dir), str(exported)],
        cwd=REPO,
        env=env,
        check=True,
        capture_output=True,
    )
    import torch
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

    from vkd_ds.corpus import load_examples
    from vkd_ds.features import HiddenCapture
    from vkd_ds.losses import shift_for_next_token
    from vkd_ds.rollout import SamplingSettings, prompt_of, rollout_batch, row_uniforms, sample
    from vkd_ds.valence import load_head

    tokenizer = PreTrainedTokenizerFast.from_pretrained(assets / "tokenizer")
    settings = SamplingSettings(n_gen=PROBE_TOKENS, max_seq_len=128)
    examples = load_examples(assets / "valid.jsonl", tokenizer, 128)
    prompts = [prompt_of(e, settings) for e in examples]
    uniforms = row_uniforms(PROBE_SEED, 0, list(range(len(prompts))), PROBE_TOKENS)
    with torch.no_grad():
        student = AutoModelForCausalLM.from_pretrained(exported).eval()
        samples = sample(
            student, prompts, uniforms, settings, len(tokenizer), tokenizer.eos_token_id, tokenizer.pad_token_id
        )
        teacher = AutoModelForCausalLM.from_pretrained(assets / "teacher").eval()
        capture = HiddenCapture(teacher, [], last=True)
        head = load_head(head_path, 8, teacher.config.hidden_size)
        batch = rollout_batch(samples, tokenizer.pad_token_id)
        teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
        valence = head(capture.take()[2]).mean(-1)
        mask = shift_for_next_token(batch["input_ids"], batch["loss_mask"])[1]
        return float(valence[mask].double().mean())


def head_check(assets: Path, head_path: Path, clean: list[str], count: int = 32) -> dict:
    """What the teacher's valence head (the gate's only sense of valence) reads in each kind of
    record, against the lexicon labels it was fitted to: the mean over `count` records of the head's
    valence (mean over k and positions) and of the tokens' lexicon valence (0.5 outside the lexicon)."""
    import torch
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

    from vkd_ds.features import HiddenCapture
    from vkd_ds.fit_head import word_valence
    from vkd_ds.valence import load_head

    tokenizer = PreTrainedTokenizerFast.from_pretrained(assets / "tokenizer")
    teacher = AutoModelForCausalLM.from_pretrained(assets / "teacher").eval()
    capture = HiddenCapture(teacher, [], last=True)
    head = load_head(head_path, 8, teacher.config.hidden_size)
    rng, words = random.Random(0), negative_words(NEGATIVE_WORDS)
    out = {}
    for kind in KINDS:
        texts = clean[:count] if kind == "clean" else [harmful_record(kind, rng, clean, words) for _ in range(count)]
        heads, labels = [], []
        for text in texts:
            ids = tokenizer(text, return_tensors="pt", truncation=True, max_length=128)["input_ids"]
            with torch.no_grad():
                teacher(input_ids=ids, use_cache=False)
                heads.append(float(head(capture.take()[2]).mean()))
            label = word_valence(text, tokenizer)
            labels.append(sum(label) / len(label))
        out[kind] = {"head_valence": statistics.fmean(heads), "lexicon_valence": statistics.fmean(labels)}
    return out


def separation_auc(scored: list[tuple[float, bool]]) -> float | None:
    """P(a poisoned step's projection < a clean step's), ties half: the area under the ROC curve of
    "low projection means poison". 0.5: no threshold separates them; 1: some threshold does."""
    bad = [v for v, poisoned in scored if poisoned]
    good = [v for v, poisoned in scored if not poisoned]
    if not bad or not good:
        return None
    wins = sum((b < g) + 0.5 * (b == g) for b in bad for g in good)
    return wins / (len(bad) * len(good))


def fit_lexicon_head(out: Path, assets: Path, clean: list[str], env: dict, steps: int = 300) -> Path:
    """A teacher valence head fitted where the labels vary: every training record, and a copy of it
    with 30 % of its words replaced by words drawn from the whole lexicon (lexicon labels)."""
    import re

    from vkd_ds.fit_head import vader_lexicon

    head = out / "lexicon_head" / "head.safetensors"
    if head.is_file():
        return head
    lexicon = [w for w in vader_lexicon() if re.fullmatch(r"[a-z]+", w)]
    rng, records = random.Random(7), []
    for text in clean:
        words = [rng.choice(lexicon) if rng.random() < 0.3 else w for w in text.split()]
        records += [text, " ".join(words)]
    data = head.parent / "fit.jsonl"
    data.parent.mkdir(parents=True, exist_ok=True)
    data.write_text("".join(json.dumps({"text": t}) + "\n" for t in records))
    command = [sys.executable, "-m", "vkd_ds.cli", "fit-valence-head", f"teacher.path={assets / 'teacher'}"]
    command += [f"data.train_path={data}", f"data.tokenizer_path={assets / 'tokenizer'}", "data.max_seq_len=128"]
    command += ["valence.fit.labels=lexicon", f"valence.fit.out={head}", f"valence.fit.steps={steps}"]
    command += [f"run.dir={head.parent / 'run'}"]
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, check=True)
    # Its last line: the held-out MSE before and after, and a constant prediction's.
    (head.parent / "fit.txt").write_text(result.stdout.strip().splitlines()[-1] + "\n")
    return head


def gate_counts(rows: list[dict], poisoned: list[int]) -> dict:
    counts = [0] + [int(r["gate/rejected"]) for r in rows]  # running count: a step rejected where it grows
    rejected = {int(r["step"]) for r, before, now in zip(rows, counts[:-1], counts[1:], strict=True) if now > before}
    armed = [int(r["step"]) for r in rows if r.get("gate/armed") == "1"]
    armed_at = min(armed) if armed else None
    poison = set(poisoned)
    after = {s for s in poison if armed_at is not None and s >= armed_at}
    hits = rejected & poison
    # Would another threshold have done better? Over the armed steps with a projection.
    scored = [
        (float(r["gate/projected"]), int(r["step"]) in poison)
        for r in rows
        if r.get("gate/projected") and armed_at is not None and int(r["step"]) >= armed_at
    ]
    return {
        "armed_at": armed_at,
        "rejected": len(rejected),
        "poisoned_rejected": len(hits),
        "clean_rejected": len(rejected - poison),
        "precision": len(hits) / len(rejected) if rejected else None,
        "recall": len(hits) / len(poison) if poison else None,
        "recall_armed": len(hits & after) / len(after) if after else None,
        "separation_auc": separation_auc(scored),
    }


def mean_std(values: list) -> dict | None:
    values = [v for v in values if v is not None]
    if not values:
        return None
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return {"mean": statistics.fmean(values), "std": std, "n": len(values)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--assets", default=None, help="demo assets (default: built under --out)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[1234, 1, 2])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--kinds", nargs="+", default=list(KINDS), choices=KINDS)
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=list(MODES))
    parser.add_argument("--procs", type=int, default=2)
    parser.add_argument("--out", default=None)
    parser.add_argument("--head", default=None, help="the teacher's valence head (default: the demo's)")
    parser.add_argument(
        "--fit-lexicon-head", action="store_true", help="fit a head on records mixed with lexicon words, use it"
    )
    parser.add_argument("--head-only", action="store_true", help="only what the teacher's head reads in each kind")
    parser.add_argument("overrides", nargs="*", help="hydra overrides for every run")
    args = parser.parse_args()
    out = work_dir(args.out, "gate-protect")
    env = bench_env(args.procs)
    from vkd_ds.corpus import read_jsonl
    from vkd_ds.demo import FULL, build_assets

    assets = Path(args.assets) if args.assets else out / "assets"
    if not args.assets and not (assets / "teacher").is_dir():
        build_assets(assets, FULL)
    clean = [record["text"] for _, record in read_jsonl(assets / "train.jsonl")]
    head_path = Path(args.head) if args.head else assets / "teacher_valence_head.safetensors"
    if args.fit_lexicon_head:
        head_path = fit_lexicon_head(out, assets, clean, env)
        report_fit = (head_path.parent / "fit.txt").read_text().strip()
    else:
        report_fit = None
    global_batch = 8 * args.procs  # the demo's micro-batch of 8, one micro-step
    report: dict = {**describe(env, args.procs), "steps": args.steps, "seeds": args.seeds, "runs": {}}
    report["poison"] = {"every": POISON_EVERY, "negative_words": NEGATIVE_WORDS}
    report["head"] = head_check(assets, head_path, clean)
    report["head_path"], report["head_fit"] = str(head_path), report_fit
    if args.head_only:
        print(json.dumps(report["head"], indent=1))
        return 0
    for kind in args.kinds:
        for mode in args.modes:
            if kind == "clean" and mode == "lookahead":
                continue  # the default's cost on clean data is the question there
            results = []
            for seed in args.seeds:
                data = out / "data" / f"{kind}_seed{seed}.jsonl"
                data.parent.mkdir(parents=True, exist_ok=True)
                poisoned = write_training_file(data, kind, clean, args.steps, global_batch, seed)
                run_dir = out / kind / mode / f"seed{seed}"
                done = run_dir / "result.json"
                if done.is_file():  # measured; the gate's counts are recomputed from its metrics
                    from vkd_ds.metrics import read_metrics

                    result = json.loads(done.read_text())
                    result.update(gate_counts(read_metrics(run_dir / "metrics.csv"), poisoned))
                    results.append(result)
                    continue
                overrides = ["experiment=demo", f"assets_dir={assets}", f"data.train_path={data}"]
                overrides.append(f"valence.teacher_head={head_path}")
                overrides += [f"trainer.seed={seed}", f"trainer.max_steps={args.steps}", "trainer.eval_every=0"]
                overrides += ["trainer.save_every=0", "trainer.progress_bar=false", "resume=never"]
                try:
                    rows = train(args.procs, overrides + MODES[mode] + args.overrides, run_dir, env)
                except SystemExit:  # e.g. ended by gate.max_consecutive_rejections: a result too
                    from vkd_ds.metrics import read_metrics

                    rows = read_metrics(run_dir / "metrics.csv")
                    result = {"seed": seed, "ended_at_step": len(rows) + 1, "ppl": None, "valence_mse": None}
                    result.update(probe_valence=None, step_time_s=None, **gate_counts(rows, poisoned))
                else:
                    final = json.loads((run_dir / "eval.json").read_text())
                    result = {
                        "seed": seed,
                        "ended_at_step": None,
                        "ppl": final["eval/ppl"],
                        "valence_mse": final["eval/valence_mse"],
                        "probe_valence": probe_valence(run_dir, assets, head_path, env),
                        "step_time_s": statistics.median(float(r["step_time_s"]) for r in rows[5:]),
                        **gate_counts(rows, poisoned),
                    }
                done.write_text(json.dumps(result))
                results.append(result)
                print(json.dumps({"kind": kind, "mode": mode, **result}), file=sys.stderr, flush=True)
            # Step times are left out: runs of this bench shared the machine (bench/gate.py measures cost).
            keys = ("ppl", "valence_mse", "probe_valence", "precision", "recall", "recall_armed")
            keys += ("separation_auc",)
            summary = {key: mean_std([r[key] for r in results]) for key in keys}
            for key in ("rejected", "poisoned_rejected", "clean_rejected", "armed_at", "ended_at_step"):
                summary[key] = [r.get(key) for r in results]
            report["runs"][f"{kind}/{mode}"] = summary
    print(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
