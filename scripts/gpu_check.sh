#!/usr/bin/env bash
# The GPU check: every GPU code path of the course in one short run, ending with a table (scripts/gpu_check.py
# says what it checks). On a machine with an NVIDIA GPU, from anywhere:
#   bash scripts/gpu_check.sh [--wheels DIR] [OUT, default /tmp/gpu_check_out] [more arguments for gpu_check.py]
# --wheels (or a WHEELS variable): a folder of wheels for a machine without internet (see scripts/wheels.sh);
# without it, the packages python3 has are used. Without a GPU the same checks run on the CPU with the tiny model.
# OUT gets at most 8 files: log.txt, check.txt, checks.json, pytest.txt, results.json, latency_per_step.png, run.txt.
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
  python3 scripts/gpu_check.py --out "$out" "$@"
}

start=$SECONDS
main "$@" 2>&1 | tee "$out/log.txt"
status=${PIPESTATUS[0]}
echo "== $out (exit status $status, $((SECONDS - start)) s)" | tee -a "$out/log.txt"
exit "$status"
