#!/usr/bin/env bash
# The reference run on one GPU (H100/H200 class), one slice per call of at most 10 minutes: the environment, the
# bf16 matmul peak, the course's runner on full-size SDXL with random weights (nothing to download) at 1024x1024 and
# 30 steps for the slice's notebooks, then a profile of the slice's own last step while time remains.
#
# Usage, from anywhere:
#   bash scripts/gpu_reference.sh --plan
#   bash scripts/gpu_reference.sh [--wheels DIR] --slice N|NAME [BUDGET_S, default 540] [more `python -m helpers run`
#     arguments]
# Without --wheels (or a WHEELS variable), the packages the GPU machine's python3 has are used; scripts/wheels.sh
# says how to make a folder of wheels for a machine without internet.
# Slices 2-5 repeat step 03, so that every ratio comes from one run on one machine; slices 6-9 compare with their own
# full-compile arm. Each slice compiles once, so that compile is a cold one. The profiler reuses the runner's Inductor
# cache. PROFILE_ARGS replaces the profiler's own arguments (default "--through" the slice's last step). OUT defaults
# to /tmp/gpu_reference_out.
#
# $OUT gets at most 8 files, each under 16 MB: log.txt, env.txt (nvidia-smi, versions, matmul TFLOP/s),
# results.json, latency_per_step.png, notebooks.tar.gz (executed notebooks, images left out) and
# profile/{summary.json,top_kernels.txt,trace.json.gz}; slices 6-9 (one arm each of scripts/compare_regions.py,
# no profile) give log.txt, env.txt and regions/{regions.json,regions.png,<the arm's start log>}.
set -uo pipefail

# The slices: number, name, the runner's --only and other arguments, and minutes on an H100 for the run and for the
# profile after it (which runs only while 2 minutes of the budget remain), estimated from
#   the start: 1.0 (wheels 0.5; nvidia-smi, versions and the matmul peak 0.3; the runner's own start 0.2);
#   each notebook: 0.5 to start its kernel, import and initialise SDXL on the GPU, then 7 images (a first call, 1
#     warm-up, 5 timed) of 1024x1024 and 30 steps at the A100 tutorial's seconds per image as an upper bound (02:
#     4.63, 03: 3.31 and 2 one-step images for its attention probe, 04-07: 2.6, 04 one image more for its
#     synchronization count), except 01, whose fp32 linear layers run without tensor cores (TF32 is off): 12 s,
#     about 75% of 416 TFLOP at 35-40 TFLOP/s and the rest;
#   a cold compile: the whole UNet and VAE decoder (04-06) 3 to 10 minutes; the regional one (07: the blocks and the
#     VAE decoder), counted at 4;
#   the profile: 1.0, or 1.5 where the step compiles (built again, its compile loaded from the Inductor cache).
# 01-03: 1.0 + (0.5 + 1.4) + (0.5 + 0.5) + (0.5 + 0.4) = 4.8. 03,04: 1.0 + 0.9 + (0.5 + compile + 0.4) = 2.8 +
# compile, 5.8 to 12.8; 05 the same; 06 0.2 more (eager bf16 and int8 images of 4 steps; a FLOP count on the meta
# device). 03,07 without 07's extra sections (a second size, dynamic shapes): 2.8 + 4 + 0.1 = 6.9.
# The runner gets what the start leaves of the budget (540 s by default) less 40 s, about 7.5 minutes: a whole-UNet
# compile over about 5.5 minutes cuts it off, and the record of the step it stopped says so.
# Slices 6-9 run scripts/compare_regions.py, one arm each (`--merge` their regions.json files afterwards): 1.0 +
# the fp32 baseline 0.7 (built on the GPU, one image) + the arm's fresh process 0.5 + its cold compile + 13 images
# (a first call, 2 warm-ups, 10 timed) at 2.6 s, 0.6 = 2.8 + compile: the full compile 5.8-12.8, `blocks` (counted at
# 4, as 07) 6.8, and the two larger choices like the full compile (on the CPU their first calls took 0.84-0.92x its).
SLICES=(
  "1|eager|01-03||4.8|1.0"
  "2|compile|03,04||5.8-12.8|1.5"
  "3|fused-qkv|03,05||5.8-12.8|1.5"
  "4|int8|03,06||6.0-13.0|1.5"
  "5|regional|03,07|--no-extras|6.9|1.5"
  "6|regions-full|regions|--arms full|5.8-12.8|-"
  "7|regions-blocks|regions|--arms blocks|6.8|-"
  "8|regions-resnets|regions|--arms attention+resnets|5.8-12.8|-"
  "9|regions-samplers|regions|--arms attention+resnets+samplers|5.8-12.8|-"
)

show_plan() {
  echo "slice  name              notebooks  run, minutes on an H100  then the profile  arguments"
  local entry number name only extra minutes profile
  for entry in "${SLICES[@]}"; do
    IFS='|' read -r number name only extra minutes profile <<<"$entry"
    printf '%-6s %-17s %-10s %-24s %-17s %s\n' "$number" "$name" "$only" "$minutes" "$profile" "${extra:--}"
  done
  echo "(a range: a cold whole-UNet compile of 3 to 10 minutes; past about 5.5 it does not fit a 10-minute call)"
  echo "(slices 6-9: one arm each of scripts/compare_regions.py; then: python scripts/compare_regions.py --merge" \
    "DIR6/regions.json DIR7/regions.json DIR8/regions.json DIR9/regions.json --out DIR)"
}

wheels=${WHEELS:-} slice=
while [[ ${1:-} == --* ]]; do
  case $1 in
    --plan) show_plan; exit 0 ;;
    --wheels) wheels=${2:?--wheels needs a folder}; shift 2 ;;
    --slice) slice=${2:?--slice needs a number or a name}; shift 2 ;;
    *) break ;;
  esac
done
chosen=
for entry in "${SLICES[@]}"; do
  IFS='|' read -r number name _ <<<"$entry"
  [[ $slice == "$number" || $slice == "$name" ]] && chosen=$entry
done
if [[ -z $chosen ]]; then
  show_plan >&2
  echo "choose a slice with --slice NUMBER or --slice NAME${slice:+ (not '$slice')}" >&2
  exit 2
fi
IFS='|' read -r number name only extra _ <<<"$chosen"
last=${only: -2}  # the slice's own last step, the one the profiler profiles
budget_s=${1:-540}
[[ $budget_s =~ ^[0-9]+$ ]] || { echo "BUDGET_S must be a number of seconds, not '$budget_s'" >&2; exit 2; }
[[ $# -gt 0 ]] && shift
repo=$(cd "$(dirname "$0")/.." && pwd)
[[ -z $wheels ]] || wheels=$(cd "$wheels" && pwd) || exit 2
OUT=${OUT:-/tmp/gpu_reference_out}
mkdir -p "$OUT"
work=$(mktemp -d "${TMPDIR:-/tmp}/gpu_reference.XXXXXX")
trap 'rm -rf "$work"' EXIT
cache=$work/inductor
deadline=$((SECONDS + budget_s))
left() { echo $((deadline - SECONDS)); }
# shellcheck source=scripts/wheels.sh
source "$repo/scripts/wheels.sh"

main() {
  cd "$repo" || return 1
  export PYTHONPATH="$repo" PYTHONUNBUFFERED=1
  install_wheels "$wheels" "$work/site" || return 1

  echo "== environment -> env.txt"
  {
    date -u
    echo "commit: $(git rev-parse HEAD 2>/dev/null || echo unknown)"
    nvidia-smi
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,power.limit --format=csv
    python3 - <<'EOF'
import importlib, platform
print("python", platform.python_version())
for name in ("torch", "diffusers", "transformers", "accelerate", "torchao", "triton", "papermill", "ipykernel"):
    try:
        print(name, importlib.import_module(name).__version__)
    except Exception as error:  # a missing or broken package is worth a line, not a stop
        print(name, "unavailable:", type(error).__name__, str(error)[:200])
import torch
print("CUDA", torch.version.cuda, "| cuDNN", torch.backends.cudnn.version(), "|", torch.cuda.get_device_name(),
      torch.cuda.get_device_capability())
EOF
    echo "bf16 matmul 8192^3:"
    python3 - <<'EOF'
import statistics
import torch
n, iterations = 8192, 50
a, b = (torch.randn(n, n, device="cuda", dtype=torch.bfloat16) for _ in range(2))
for _ in range(5):
    a @ b
tflops = []
for _ in range(5):
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iterations):
        a @ b
    end.record()
    torch.cuda.synchronize()
    tflops.append(2 * n**3 * iterations / (start.elapsed_time(end) / 1e3) / 1e12)
print(f"matmul_bf16_tflops median {statistics.median(tflops):.1f} max {max(tflops):.1f} (5 x {iterations} calls)")
EOF
  } >"$OUT/env.txt" 2>&1
  cat "$OUT/env.txt"

  if [[ $only == regions ]]; then
    regions_arm "$@"
    return
  fi
  local run_s=$(($(left) - 40))
  echo "== slice $number ($name): python -m helpers run --only $only $extra (timeout ${run_s} s)"
  # SIGTERM at the timeout: the runner records the step it stops, with its cell and seconds, before it ends.
  # shellcheck disable=SC2086  # $extra is a list of arguments
  timeout --kill-after=20 "$run_s" python3 -m helpers run --model sdxl-random --out "$OUT/run" --steps 30 \
    --height 1024 --width 1024 --no-progress --inductor-cache "$cache" --only "$only" $extra "$@"
  local ran=$?
  echo "runner exit status: $ran"
  collect_run

  if (($(left) > 120)); then
    echo "== profile of step $last (timeout $(($(left) - 15)) s, the runner's Inductor cache)"
    # shellcheck disable=SC2086  # PROFILE_ARGS is a list of arguments
    timeout --kill-after=10 $(($(left) - 15)) python3 scripts/profile_final_step.py --model sdxl-random \
      --inductor-cache "$cache" --out "$OUT/profile" ${PROFILE_ARGS:---through $last}
    echo "profiler exit status: $?"
  else
    echo "== profile skipped: $(left) s left"
  fi
  return "$ran"  # the runner's: a slice the budget cut off (124) or a notebook that failed is not a success
}

# One arm of the regions comparison at 1024x1024; back come its regions.json and chart and each start's log, not
# the arm's Inductor cache folder.
regions_arm() {
  local run_s=$(($(left) - 20))
  echo "== slice $number ($name): scripts/compare_regions.py $extra (timeout ${run_s} s)"
  # shellcheck disable=SC2086  # $extra is a list of arguments
  timeout --kill-after=20 "$run_s" python3 scripts/compare_regions.py --model sdxl-random --height 1024 \
    --width 1024 --steps 30 --warmup 2 --runs 10 --out "$work/regions" $extra "$@"
  local ran=$?
  echo "compare_regions exit status: $ran"
  mkdir -p "$OUT/regions"
  cp "$work/regions/regions.json" "$work/regions/regions.png" "$OUT/regions/" 2>/dev/null
  local log
  for log in "$work"/regions/arms/*/*.log; do
    [[ -f $log ]] && cp "$log" "$OUT/regions/$(basename "$(dirname "$log")")-$(basename "$log")"
  done
  return "$ran"
}

# Keep what comes back small: results and chart at the top, notebooks without their images in one archive.
collect_run() {
  local run=$OUT/run
  [[ -d $run ]] || return 0
  cp "$run/results.json" "$run/latency_per_step.png" "$OUT/" 2>/dev/null
  python3 - "$OUT/results.json" <<'EOF'
import json, sys
try:
    records = json.load(open(sys.argv[1]))
except OSError:
    sys.exit("no results.json")
for r in records:
    if r.get("median_s"):
        rate = f", {r['tflops_per_s']:.0f} TFLOP/s" if r.get("tflops_per_s") else ""
        share = f", {r['peak_fraction']:.0%} of the measured peak" if r.get("peak_fraction") else ""
        print(f"{r['step']} {r['title']:<18} {r['median_s']:.3f} s (IQR {r['iqr_s']:.3f}){rate}{share}, {r['device']}")
    else:
        print(f"{r['step']} {r['title']:<18} {r['status']}: {r.get('note')}")
EOF
  if [[ -d $run/notebooks ]]; then
    python3 - "$run/notebooks" <<'EOF'
import json, pathlib, sys
for path in pathlib.Path(sys.argv[1]).glob("*.ipynb"):
    notebook = json.loads(path.read_text())
    for cell in notebook["cells"]:
        for output in cell.get("outputs", []):
            for kind in [k for k in output.get("data", {}) if k.startswith("image/")]:
                output["data"][kind] = ""
    path.write_text(json.dumps(notebook, indent=1))
EOF
    tar -czf "$OUT/notebooks.tar.gz" -C "$run" notebooks
    if (($(stat -c %s "$OUT/notebooks.tar.gz") > 15 * 1024 * 1024)); then
      echo "notebooks.tar.gz is over 15 MB: dropped"
      rm -f "$OUT/notebooks.tar.gz"
    fi
  fi
  rm -rf "$run"
}

main "$@" 2>&1 | tee "$OUT/log.txt"
status=${PIPESTATUS[0]}
echo "== $OUT, slice $number ($name): exit status $status, $(left) s of the budget left" | tee -a "$OUT/log.txt"
find "$OUT" -type f -printf '%10s  %P\n' | sort -k2 | tee -a "$OUT/log.txt"
exit "$status"
