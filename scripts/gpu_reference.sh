#!/usr/bin/env bash
# The one script to run on a lent GPU machine (H100/H200, Python 3.12 and torch there, no internet): the
# environment, the bf16 matmul peak, the course's runner on full-size SDXL with random weights, then a profile
# of the last step while time remains.
#
# First, on this machine, from the project's root:  ../shared/gpu/fetch-wheels.sh   (fills .whl/)
# Then with the device tool:
#   run(command="bash scripts/gpu_reference.sh", carry=[".whl"], timeout_s=600)
#   run(command="bash scripts/gpu_reference.sh 540 --only 01-03", carry=[".whl"], timeout_s=600)
# Arguments: [BUDGET_S, default 540] [more arguments for `python -m helpers run`, e.g. --only 04-07 --runs 3].
# PROFILE_ARGS replaces the profiler's own arguments (default "--through 07"). OUT defaults to /tmp/gpu_reference_out.
#
# $OUT gets at most 8 files, each under 16 MB: log.txt, env.txt (nvidia-smi, versions, matmul TFLOP/s),
# results.json, latency_per_step.png, notebooks.tar.gz (executed notebooks, images left out) and
# profile/{summary.json,top_kernels.txt,trace.json.gz}.
set -uo pipefail

budget_s=${1:-540}
[[ $# -gt 0 ]] && shift
repo=$(cd "$(dirname "$0")/.." && pwd)
OUT=${OUT:-/tmp/gpu_reference_out}
mkdir -p "$OUT"
deadline=$((SECONDS + budget_s))
left() { echo $((deadline - SECONDS)); }

main() {
  cd "$repo" || return 1
  echo "== wheels ($(ls .whl/*.whl 2>/dev/null | wc -l) in .whl/)"
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || { echo "Could not install .whl/: run ../shared/gpu/fetch-wheels.sh here and carry .whl"; return 1; }
  export PYTHONPATH="/tmp/site:$repo" PYTHONUNBUFFERED=1
  # The runner gives each notebook its own inductor cache under TMPDIR; the profiler reuses step 07's.
  export TMPDIR=/tmp/gpu_reference_tmp
  mkdir -p "$TMPDIR"

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
    --height 1024 --width 1024 --no-progress "$@"
  echo "runner exit status: $?"
  collect_run

  if (($(left) > 120)); then
    local cache
    cache=$(ls -d "$TMPDIR"/inductor-*/07 2>/dev/null | head -n 1)
    [[ -n $cache ]] && export TORCHINDUCTOR_CACHE_DIR=$cache
    echo "== profile (timeout $(($(left) - 15)) s, inductor cache: ${cache:-default})"
    # shellcheck disable=SC2086  # PROFILE_ARGS is a list of arguments
    timeout --kill-after=10 $(($(left) - 15)) python3 scripts/profile_final_step.py --model sdxl-random \
      --out "$OUT/profile" ${PROFILE_ARGS:---through 07}
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
from helpers.flops import efficiency, image_flops
try:
    records = json.load(open(sys.argv[1]))
except OSError:
    sys.exit("no results.json")
for r in records:
    if r.get("median_s"):
        p = r["params"]  # the record's own height and width are the sizes used, native ones resolved
        total = image_flops(p["model"], r["height"], r["width"], p["steps"], p["guidance"])["total"]
        e = efficiency(r["median_s"], total)
        print(f"{r['step']} {r['title']:<18} {r['median_s']:.3f} s (IQR {r['iqr_s']:.3f}) "
              f"{e['tflops_per_s']:.0f} TFLOP/s, {e['peak_fraction']:.0%} of peak, {r['device']}")
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
