#!/usr/bin/env bash
# The GPU check: the course's GPU code paths in at most 6 minutes (GPU_CHECK_S, default 360, wheels included),
# ending with a table; scripts/gpu_check.py says what it checks, and the limit of each check. On a machine with an
# NVIDIA GPU, from anywhere:
#   bash scripts/gpu_check.sh [--wheels DIR] [OUT, default /tmp/gpu_check_out] [more arguments for gpu_check.py]
# --wheels (or a WHEELS variable): a folder of wheels for a machine without internet (see scripts/wheels.sh);
# without it, the packages python3 has are used. Without a GPU the checks run on the CPU with the tiny model.
# OUT gets at most 7 files: log.txt, check.txt, checks.json, pytest.txt, results.json, latency_per_step.png, run.txt.
set -uo pipefail

wheels=${WHEELS:-}
if [[ ${1:-} == --wheels ]]; then
  wheels=${2:?--wheels needs a folder}
  shift 2
fi
out=${1:-/tmp/gpu_check_out}
[[ $# -gt 0 ]] && shift
repo=$(cd "$(dirname "$0")/.." && pwd)
[[ -z $wheels ]] || wheels=$(cd "$wheels" && pwd) || exit 2
mkdir -p "$out"
out=$(cd "$out" && pwd)
work=$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")
trap 'rm -rf "$work"' EXIT
# shellcheck source=scripts/wheels.sh
source "$repo/scripts/wheels.sh"

main() {
  cd "$repo" || return 1
  install_wheels "$wheels" "$work/site" || return 1
  export PYTHONPATH="$repo:${PYTHONPATH:-}" PYTHONUNBUFFERED=1
  command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
  # What is left of the time, less 20 s for gpu_check.py's own start and its table; a later --within-s wins.
  python3 scripts/gpu_check.py --out "$out" --within-s $((limit_s - (SECONDS - start) - 20)) "$@"
}

limit_s=${GPU_CHECK_S:-360}
[[ $limit_s =~ ^[0-9]+$ ]] || { echo "GPU_CHECK_S must be a number of seconds, not '$limit_s'" >&2; exit 2; }
start=$SECONDS
main "$@" 2>&1 | tee "$out/log.txt"
status=${PIPESTATUS[0]}
echo "== $out (exit status $status, $((SECONDS - start)) s)" | tee -a "$out/log.txt"
exit "$status"
