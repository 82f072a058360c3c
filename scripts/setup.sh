#!/usr/bin/env bash
# Create .venv with everything the course needs; `--test` adds what the tests need (pytest, Playwright, Chromium).
#   bash scripts/setup.sh [--test]
# A torch the current python already has (a cloud GPU image's CUDA build, say) is kept: the venv then sees it, and
# pip installs the rest (uv would not see that torch). Otherwise uv (installed by pip) installs everything, faster
# than pip (51 s against 120 s on a 2-core machine); with no NVIDIA GPU, torch comes from the configured index or else
# PyTorch's CPU index.
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}
cpu_torch="torch==2.13.0"

if [ ! -x .venv/bin/python ]; then
  if "$python" -c "import torch" 2>/dev/null; then
    echo "setup: keeping the torch $("$python" -c 'import torch; print(torch.__version__)') that $python already has"
    "$python" -m venv --system-site-packages .venv
  else
    "$python" -m venv .venv
  fi
fi
pip=(.venv/bin/python -m pip install --quiet --disable-pip-version-check)
if ! grep -q "include-system-site-packages = true" .venv/pyvenv.cfg; then
  "${pip[@]}" uv
  # uv reads no pip configuration (docs.astral.sh/uv/pip/compatibility): where pip finds local wheels, uv looks too.
  export UV_FIND_LINKS="${UV_FIND_LINKS:-${PIP_FIND_LINKS:-}}"
  [ -n "$UV_FIND_LINKS" ] || unset UV_FIND_LINKS
  pip=(.venv/bin/uv pip install --quiet --python .venv/bin/python)
  # Where PYTHONDONTWRITEBYTECODE is set, Python writes no .pyc files, so every process would compile what it imports
  # again (`import torch, diffusers`: 16 s instead of 5 s here): then --compile-bytecode writes them all at install,
  # as pip does. Otherwise the first import of each module writes its own, and the install is faster: from a fresh
  # clone, `bash scripts/setup.sh --test` took 34 s with it and 18 s without on a 2-core machine (packages cached).
  [ -z "${PYTHONDONTWRITEBYTECODE:-}" ] || pip+=(--compile-bytecode)
fi
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null && nvidia-smi >/dev/null 2>&1; then
    "${pip[@]}" torch
  else
    "${pip[@]}" "$cpu_torch" || "${pip[@]}" "$cpu_torch" --index-url https://download.pytorch.org/whl/cpu
  fi
fi
if [ "${1:-}" = "--test" ]; then
  "${pip[@]}" -e ".[test]"
  if ! bash .ci/install-browser.sh .venv/bin/python; then
    [ "${CI:-}" = "true" ] && exit 1
    echo "setup: Chromium could not be installed (apt-get needs root): the browser test will be skipped"
  fi
else
  "${pip[@]}" -e .
fi
# papermill starts notebooks with the "python3" kernel: make it this venv's python.
.venv/bin/python -m ipykernel install --sys-prefix --name python3 --display-name "Python 3 (sdxl-fast)" >/dev/null
# diffusers' version from its metadata: with diffusers imported, this line takes 5.9 s here instead of 2.4.
echo "setup: ready ($(.venv/bin/python -c 'import torch; from importlib.metadata import version; print("torch", torch.__version__, "· diffusers", version("diffusers"), "· CUDA", torch.cuda.is_available())'))"
