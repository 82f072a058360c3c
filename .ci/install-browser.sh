#!/usr/bin/env bash
# Installs what tests/test_browser.py needs: Debian's Chromium and the Python playwright package.
# Idempotent: each part is skipped when already there. Playwright drives the system Chromium, so its own
# browser download (which can't be fetched here) is never needed.
# Usage: bash .ci/install-browser.sh [python]   (default: the python on PATH)
set -euo pipefail

python="${1:-python}"

if [ ! -x /usr/bin/chromium ]; then
    sudo=""
    if [ "$(id -u)" -ne 0 ]; then sudo="sudo"; fi
    $sudo apt-get update
    # fonts-liberation: without a sans-serif font JupyterLab's text renders as boxes in screenshots.
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y --no-install-recommends chromium fonts-liberation
fi

if ! "$python" -c "import playwright" 2>/dev/null; then
    "$python" -m pip install --quiet "playwright>=1.45"
fi

echo "chromium: $(/usr/bin/chromium --version 2>/dev/null || echo missing)"
echo "playwright: $("$python" -c 'from importlib.metadata import version; print(version("playwright"))')"
