#!/usr/bin/env bash
# Issue #31's GPU measurements in one call of under 9 minutes on one H100/H200; a JSON summary on
# stdout and in DIR/summary.json. Needs vkd-ds with a CUDA build of torch; nothing is downloaded.
#   bash bench/gpu_speed.sh [--out DIR] [--work DIR] [--budget SECONDS] [--gpu-run] [--gpu-layout L] [--smoke]
#
# Parts, in order, each under its own timeout (one that fails or runs out of time is recorded, and
# the next one runs):
#   0.            the versions and the GPU, to DIR/environment.json (about 10 s);
#   1. gpu1b      python bench/kd_mfu.py --size gpu1b: 3.5 B teacher, 1.05 B student, packed rows of
#                 4096 tokens, the config's default layout; MFU, and student and teacher TFLOP/s from a
#                 second, phase-timed run. Estimated 150-190 s: assets 30-40 s (the teacher built in
#                 bf16 on the GPU, 7.3 GB written), a 12-step run 60-80 s (about 45 s to its first
#                 step), a 6-step phase-timed run 55-70 s; each run is stopped at its last measured
#                 step, before the final checkpoint (15 GB for this student). Cap 270 s;
#   2. gpu        (only with --gpu-run) python bench/kd_mfu.py --size gpu --layout L: issue #8's 9.3 %
#                 configuration, standalone (about 70 s);
#   3. gpu_check  bash bench/gpu_check.sh: estimated 340-370 s (335 s on an H200 before, now with
#                 kd_mfu's phase-timed run); it gets what is left of the budget. Its
#                 kd_mfu check *is* the 9.3 % configuration as measured before (bench/kd_mfu.py's
#                 defaults: --size gpu, layout as-before), now with its student/teacher split, so the
#                 summary's `gpu` comes from there unless part 2 ran;
#   4. gpu        again, as part 2, if gpu_check gave no kd_mfu figures and at least 100 s are left.
# DIR (default $OUT, else a new temporary directory) receives only small files: each part's JSON
# (NAME.json, or NAME.partial.json: what a part cut short had measured), the tail of its log
# (NAME.log) and summary.json. Assets and runs go to the work directory (default /tmp/vkd-gpu-speed;
# a second call on the same machine reuses the assets). --budget (default 540 s) bounds the whole;
# --smoke rehearses the script on a machine without a GPU (kd_mfu --size tiny, gpu_check.py --smoke).
set -euo pipefail
cd "$(dirname "$0")/.."

out_dir="${OUT:-}"
work=/tmp/vkd-gpu-speed
budget=540
smoke=0
gpu_run=0
gpu_layout=as-before
while [ $# -gt 0 ]; do
  case "$1" in
    --out) out_dir="$2"; shift 2 ;;
    --work) work="$2"; shift 2 ;;
    --budget) budget="$2"; shift 2 ;;
    --gpu-run) gpu_run=1; shift ;;
    --gpu-layout) gpu_layout="$2"; shift 2 ;;
    --smoke) smoke=1; budget=2400; shift ;;
    *) echo "bench/gpu_speed.sh: unknown argument $1" >&2; exit 2 ;;
  esac
done
[ -n "$out_dir" ] || out_dir="$(mktemp -d /tmp/vkd-gpu-speed-out.XXXXXX)"
mkdir -p "$out_dir" "$work"
: >"$out_dir/parts.tsv"
started=$(date +%s)

left() { echo $((budget - ($(date +%s) - started))); }

# part NAME CAP COMMAND...: COMMAND under a timeout of min(CAP, what is left - 10 s); its stdout to
# DIR/NAME.out, the tail of its stderr to DIR/NAME.log; one line NAME RC SECONDS TIMEOUT to parts.tsv.
part() {
  local name="$1" cap="$2" limit t0 rc=0
  shift 2
  limit=$(($(left) - 10))
  [ "$limit" -lt "$cap" ] || limit="$cap"
  if [ "$limit" -lt 30 ]; then
    echo "gpu_speed: $name skipped, $(left) s left" >&2
    printf '%s\tskipped\t0\t%s\n' "$name" "$limit" >>"$out_dir/parts.tsv"
    return 0
  fi
  echo "gpu_speed: $name (timeout ${limit} s): $*" >&2
  t0=$(date +%s)
  timeout --kill-after=20 "$limit" "$@" >"$out_dir/$name.out" 2>"$work/$name.err" || rc=$?
  tail -c 20000 "$work/$name.err" >"$out_dir/$name.log"
  printf '%s\t%s\t%s\t%s\n' "$name" "$rc" "$(($(date +%s) - t0))" "$limit" >>"$out_dir/parts.tsv"
  echo "gpu_speed: $name exit $rc after $(($(date +%s) - t0)) s" >&2
}

# The machine, and whether a GPU is visible (without one, only --smoke goes on).
# (The JSON goes straight to its file: importing DeepSpeed may print to stdout.)
python - "$smoke" "$out_dir/environment.json" <<'EOF' || exit 1
import json, os, platform, subprocess, sys
import torch, transformers, deepspeed
env = {"torch": torch.__version__, "transformers": transformers.__version__, "deepspeed": deepspeed.__version__,
       "python": platform.python_version(), "cpu_cores": os.cpu_count(), "cuda": torch.cuda.is_available()}
try:
    env["nvidia_smi"] = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version",
                                        "--format=csv,noheader"], capture_output=True, text=True).stdout.strip()
except OSError:
    env["nvidia_smi"] = None
open(sys.argv[2], "w").write(json.dumps(env))
sys.exit(0 if env["cuda"] or sys.argv[1] == "1" else "bench/gpu_speed.sh: no GPU visible (--smoke rehearses it on a CPU)")
EOF

if [ "$smoke" = 1 ]; then
  size=(--size tiny --steps 6 --skip 2 --phase-steps 4)
  gpu_size=(--size tiny --layout "$gpu_layout" --steps 5 --skip 2 --phase-steps 4)
  check=(python bench/gpu_check.py --smoke --out "$work/check")
else
  size=(--size gpu1b)
  gpu_size=(--size gpu --layout "$gpu_layout")
  check=(bash bench/gpu_check.sh --out "$work/check")
fi

# A part's report: its JSON line, else (cut short) the report it had written so far.
salvage() {
  local name="$1" dir="$2"
  if grep -q '^{' "$out_dir/$name.out" 2>/dev/null; then
    grep '^{' "$out_dir/$name.out" | tail -1 >"$out_dir/$name.json"
  elif [ -f "$dir/report.json" ]; then
    cp "$dir/report.json" "$out_dir/$name.partial.json"
  fi
}

rm -f "$work/gpu1b/report.json" "$work/gpu/report.json" "$work/check/summary.json"
for name in gpu1b gpu gpu_check; do rm -f "$out_dir/$name.json" "$out_dir/$name.partial.json"; done
# gpu_check starts from a clean directory (its export refuses one that exists) but for its assets.
if [ -d "$work/check" ]; then
  find "$work/check" -mindepth 1 -maxdepth 1 ! -name assets ! -name mfu -exec rm -rf {} +
fi
part gpu1b "$([ "$smoke" = 1 ] && echo 900 || echo 270)" python bench/kd_mfu.py "${size[@]}" --out "$work/gpu1b"
salvage gpu1b "$work/gpu1b"
if [ "$gpu_run" = 1 ]; then
  part gpu 150 python bench/kd_mfu.py "${gpu_size[@]}" --out "$work/gpu"
  salvage gpu "$work/gpu"
fi
part gpu_check "$([ "$smoke" = 1 ] && echo 1500 || echo 600)" "${check[@]}"
[ ! -f "$work/check/summary.json" ] || cp "$work/check/summary.json" "$out_dir/gpu_check.json"
if [ "$gpu_run" = 0 ] && ! python -c 'import json, sys; sys.exit(not isinstance(json.load(open(sys.argv[1])).get("kd_mfu"), dict))' \
  "$out_dir/gpu_check.json" 2>/dev/null && [ "$(left)" -ge 100 ]; then
  part gpu 150 python bench/kd_mfu.py "${gpu_size[@]}" --out "$work/gpu"
  salvage gpu "$work/gpu"
fi

python - "$out_dir" "$(($(date +%s) - started))" "$budget" "$smoke" <<'EOF'
import json, sys
from pathlib import Path

out, wall, budget, smoke = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4] == "1"


def load(name):
    for suffix, partial in ((".json", False), (".partial.json", True)):
        path = out / f"{name}{suffix}"
        if path.is_file():
            try:
                return {**json.loads(path.read_text()), **({"partial": True} if partial else {})}
            except ValueError:
                return None
    return None


parts = {}
for line in (out / "parts.tsv").read_text().splitlines():
    name, rc, seconds, limit = line.split("\t")
    parts[name] = {"rc": rc if rc == "skipped" else int(rc), "seconds": int(seconds), "timeout_s": int(limit),
                   "timed_out": rc in ("124", "137")}
check = load("gpu_check")
gpu1b, gpu = load("gpu1b"), load("gpu")
if gpu is None and check is not None and isinstance(check.get("kd_mfu"), dict):
    gpu = {**check["kd_mfu"], "source": "gpu_check.sh's kd_mfu check"}
checks = {}
if check is not None:
    bf16 = check.get("bf16_every_term") or {}
    checks = {
        "unit_tests": (check.get("unit_tests") or {}).get("passed") is True,
        "bf16_all_finite": bf16.get("all_finite") is True,
        "resume_ok": bf16.get("resume_ok") is True,
        "export_reloads": bf16.get("export_reloads") is True,
        "nan_gradient_skipped": (check.get("nan_gradient") or {}).get("skipped_and_counted") is True,
        "grad_accum_ran": "grad_accum_1_vs_2" in check,
        "teacher_offload_ran": isinstance(check.get("teacher_offload"), dict),
        "kd_mfu_ran": isinstance(check.get("kd_mfu"), dict),
        "chunk_tokens_ran": isinstance(check.get("chunk_tokens"), dict),
        "completed": "seconds" in check,
    }
keys = ("mfu", "mfu_full_row_attention", "achieved_tflops", "median_step_s", "tokens_per_step", "tokens_per_s",
        "student_tflops", "teacher_tflops", "peak_gpu_gb", "attention", "layout", "partial")


def headline(report):
    if report is None:
        return None
    figures = {k: report.get(k) for k in keys if k in report}
    phases = report.get("phases") or {}
    figures["phase_seconds"] = phases.get("seconds")
    figures["phase_sync_ratio"] = phases.get("step_time_ratio_to_unsynchronized")
    logged = (report.get("run") or {}).get("log", [])
    figures["engines"] = [line for line in logged if line.startswith(("vkd-ds:", "layout:", "teacher:"))]
    return figures


summary = {
    "smoke": smoke,
    "wall_s": wall,
    "budget_s": budget,
    "environment": json.loads((out / "environment.json").read_text()),
    "parts": parts,
    "gpu1b": headline(gpu1b),
    "gpu": headline(gpu),
    "goal_mfu": 0.40,
    "goal_met": None if gpu1b is None or "mfu" not in gpu1b else gpu1b["mfu"] >= 0.40,
    "gpu_check_passed": bool(checks) and all(checks.values()) and parts.get("gpu_check", {}).get("rc") == 0,
    "gpu_check_checks": checks,
    "reports": {"gpu1b": gpu1b, "gpu": gpu},
}
(out / "summary.json").write_text(json.dumps(summary, indent=1))
print(json.dumps(summary))
EOF
