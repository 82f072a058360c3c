# shellcheck shell=bash
# Sourced by the GPU scripts: install a folder of wheels for a machine without internet.
# On a connected machine with the same Python version and platform as the GPU machine:
#   pip download -d wheels diffusers transformers accelerate torchao safetensors matplotlib pytorch-msssim tqdm \
#     papermill ipykernel ipywidgets pytest
# then delete the torch, triton and nvidia_* wheels from wheels/ (the GPU machine keeps its own CUDA build of
# torch) and copy the folder over. They go into a temporary folder put first on PYTHONPATH; nothing else changes.

# install_wheels DIR TARGET: install DIR/*.whl into TARGET and put it on PYTHONPATH; without DIR, do nothing.
install_wheels() {
  local wheels=$1 target=$2
  if [[ -z $wheels ]]; then
    echo "== no wheel folder: using the packages python3 has"
    return 0
  fi
  local found=("$wheels"/*.whl)
  [[ -e ${found[0]} ]] || { echo "no .whl file in $wheels: make them with pip download (see scripts/wheels.sh)"; return 1; }
  echo "== installing ${#found[@]} wheels from $wheels"
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$target" \
    "${found[@]}" || { echo "could not install the wheels of $wheels"; return 1; }
  export PYTHONPATH="$target:${PYTHONPATH:-}"
}
