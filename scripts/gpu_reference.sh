#!/usr/bin/env bash
# The reference run on one GPU (H100/H200 class): the environment, the bf16 matmul peak, the course's runner on
# full-size SDXL with random weights (nothing to download), then a profile of the last step while time remains.
#
# Usage, from anywhere:
#   bash scripts/gpu_reference.sh [--wheels DIR] [BUDGET_S, default 540] [more arguments for `python -m helpers run`]
#   bash scripts/gpu_reference.sh --wheels wheels 540 --only 01-03
# Without --wheels (or a WHEELS variable), the packages the GPU machine's python3 has are used; scripts/wheels.sh
# says how to make a folder of wheels for a machine without internet.
# PROFILE_ARGS replaces the profiler's own arguments (default "--through 07"). OUT defaults to /tmp/gpu_reference_out.
# The notebooks share one Inductor cache, which the profiler reuses: quicker, but the first calls of notebooks 05
# to 07 then load kernels compiled by an earlier notebook, so their compile times are not cold ones.
#
# $OUT gets at most 8 files, each under 16 MB: log.txt, env.txt (nvidia-smi, versions, matmul TFLOP/s),
# results.json, latency_per_step.png, notebooks.tar.gz (executed notebooks, images left out) and
# profile/{summary.json,top_kernels.txt,trace.json.gz}.
set -uo pipefail

wheels=${WHEELS:-}
if [[ ${1:-} == --wheels ]]; then
  wheels=${2:?--wheels needs a folder}
  shift 2
fi
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

  local run_s=$(($(left) - 30))
  echo "== python -m helpers run (timeout ${run_s} s)"
  timeout --kill-after=10 "$run_s" python3 -m helpers run --model sdxl-random --out "$OUT/run" --steps 30 \
    --height 1024 --width 1024 --no-progress --inductor-cache "$cache" "$@"
  echo "runner exit status: $?"
  collect_run

  if (($(left) > 120)); then
    echo "== profile (timeout $(($(left) - 15)) s, the runner's Inductor cache)"
    # shellcheck disable=SC2086  # PROFILE_ARGS is a list of arguments
    timeout --kill-after=10 $(($(left) - 15)) python3 scripts/profile_final_step.py --model sdxl-random \
      --inductor-cache "$cache" --out "$OUT/profile" ${PROFILE_ARGS:---through 07}
    echo "profiler exit status: $?"
  else
    echo "== profile skipped: $(left) s left"
  fi
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
status=$?
echo "== $OUT (exit status $status, $(left) s of the budget left)" | tee -a "$OUT/log.txt"
find "$OUT" -type f -printf '%10s  %P\n' | sort -k2 | tee -a "$OUT/log.txt"
exit "$status"
