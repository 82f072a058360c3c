import json
import os
import subprocess
import sys
from pathlib import Path

import huggingface_hub
import huggingface_hub.constants  # a submodule: imported here, not left to whichever test imports diffusers first
import nbformat
import pytest

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = ROOT / "notebooks"
# A fake token: the tests check that it never reaches an output.
FAKE_HF_TOKEN = "hf_FAKEtokenThatMustNeverBePrinted0000"
# Small enough for a 2-core CPU: the tiny model at 96x96, 2 denoising steps (the model is added by `series`).
SERIES_ARGS = ["--steps", "2", "--height", "96", "--width", "96", "--warmup", "1", "--runs", "3"]


# Fixtures that take over 15 s here: the series, a compile-cache file made by a compile, a two-process job.
SLOW_FIXTURES = {"series", "cache_file", "job"}


def pytest_collection_modifyitems(items):
    """Every test that executes notebooks, drives the browser or needs a slow fixture is slow too."""
    for item in items:
        if (item.get_closest_marker("notebooks") or item.get_closest_marker("browser")
                or SLOW_FIXTURES & set(item.fixturenames)):
            item.add_marker(pytest.mark.slow)


def notebook_cells(notebook, tag):
    """The source of the code cells of `notebook` tagged `tag`, in order."""
    nb = nbformat.read(NOTEBOOKS / notebook, as_version=4)
    return [c.source for c in nb.cells if c.cell_type == "code" and tag in c.metadata.get("tags", [])]


@pytest.fixture(scope="session")
def tiny_folder(tmp_path_factory):
    """The tiny model saved as a diffusers folder, so that it loads by `from_pretrained`, the way SDXL does."""
    import helpers

    folder = tmp_path_factory.mktemp("tiny-sdxl")
    helpers.load_pipeline("tiny", verbose=False).save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def series(tmp_path_factory, tiny_folder):
    """The whole course run once headless by the README's main command, on the tiny model loaded from a folder
    by `from_pretrained`: the path users take with SDXL (the model built in memory is `--model tiny`). Appendix 08
    runs after the seven steps in the course's compile mode only, and with one choice of regions (the other modes and
    choices are the same code; test_regional checks what each choice compiles)."""
    out = tmp_path_factory.mktemp("series")
    # One Inductor cache for all notebooks: kernels compiled by 04 are reused by 05 to 07 (CI time).
    cache = tmp_path_factory.mktemp("inductor")
    env = {**os.environ, "HF_TOKEN": FAKE_HF_TOKEN, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "helpers", "run", "--out", str(out), "--no-progress", "--inductor-cache", str(cache),
         "--model", str(tiny_folder), "--only", "01-08", "--set", 'COMPILE_MODES=["max-autotune"]',
         "--set", 'REGION_CHOICES=["blocks"]', *SERIES_ARGS],
        capture_output=True, text=True, env=env, cwd=ROOT,
    )
    (out.parent / "runner.log").write_text(proc.stdout + proc.stderr)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return out, json.loads((out / "results.json").read_text()), proc.stdout + proc.stderr


@pytest.fixture
def offline_hub(monkeypatch, tmp_path):
    """HF_HUB_OFFLINE=1 as if set before the start (huggingface_hub reads it on import), over an empty cache."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
