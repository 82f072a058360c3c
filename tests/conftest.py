import atexit
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import huggingface_hub
import huggingface_hub.constants  # a submodule: imported here, not left to whichever test imports diffusers first
import nbformat
import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = ROOT / "notebooks"
# A fake token: the tests check that it never reaches an output.
FAKE_HF_TOKEN = "hf_FAKEtokenThatMustNeverBePrinted0000"
# Small enough for a 2-core CPU: the tiny model at 96x96, 2 denoising steps (the model is added by `series_run`).
SERIES_ARGS = ["--steps", "2", "--height", "96", "--width", "96", "--warmup", "1", "--runs", "3"]


# Without a GPU the series and the appendix run beside the other tests (`series_in_the_background`), so three or
# more processes share the cores. Each then runs one thread, as the GPU check's CPU form does: an OpenMP thread whose
# sibling is descheduled spins while it waits. Three of tests/test_throughput.py's tests beside two busy loops on
# 2 cores: 39 CPU-seconds with 2 threads, 24 with one, 26 with 2 threads and OMP_WAIT_POLICY=PASSIVE (no spinning).
# A value set before the tests start is kept.
if not torch.cuda.is_available() and "OMP_NUM_THREADS" not in os.environ:
    os.environ["OMP_NUM_THREADS"] = "1"  # for every process the tests start
    torch.set_num_threads(1)  # for this one, whose torch has read the variable already

# One copy of each compiled C++ kernel for the session, shared by every process the tests start: the cold starts of
# notebook 08 and the tests that start from an empty Inductor cache compile the same kernels again (compiler_cache/g++
# says what it caches). Only where the compiler is g++: Inductor chooses its flags by the compiler's name.
if "CXX_CACHE_DIR" not in os.environ and (compiler := shutil.which(os.environ.get("CXX", "g++"))):
    if Path(compiler).name.startswith("g++"):
        os.environ.update(CXX=str(ROOT / "tests" / "compiler_cache" / "g++"), CXX_CACHE_REAL=compiler,
                          CXX_CACHE_DIR=tempfile.mkdtemp(prefix="compiler-cache-"))
        atexit.register(shutil.rmtree, os.environ["CXX_CACHE_DIR"], ignore_errors=True)

# The runs that execute the notebooks in the background (`series_in_the_background`).
BACKGROUND_RUNS = ("series", "appendix")
# Fixtures that take over 15 s here: those runs, a compile-cache file made by a compile, a two-process job.
SLOW_FIXTURES = {*BACKGROUND_RUNS, "cache_file", "job"}


def pytest_collection_modifyitems(items):
    """Every test that executes notebooks, drives the browser or needs a slow fixture is slow too. The tests that
    read the background runs go last, so that the other tests run while those run (`series_in_the_background`)."""
    for item in items:
        if (item.get_closest_marker("notebooks") or item.get_closest_marker("browser")
                or SLOW_FIXTURES & set(item.fixturenames)):
            item.add_marker(pytest.mark.slow)
    # a stable sort: the order is otherwise kept
    items.sort(key=lambda item: any(name in item.fixturenames for name in BACKGROUND_RUNS))


def load_script(name):
    """scripts/<name>.py as a module, to call its functions in this process."""
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


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


class RunInBackground:
    """`python -m helpers run ... ARGS` in a process of its own, its output going to `<out>.log` beside `out`; at
    `nice` 10 it takes the cores that the other processes leave."""

    def __init__(self, out, args, nice=0):
        self.out, self.log = out, out.parent / f"{out.name}.log"
        env = {**os.environ, "HF_TOKEN": FAKE_HF_TOKEN, "PYTHONUNBUFFERED": "1"}
        with open(self.log, "w") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "helpers", "run", "--out", str(out), "--no-progress", *args, *SERIES_ARGS],
                stdout=log, stderr=subprocess.STDOUT, text=True, env=env, cwd=ROOT,
                preexec_fn=(lambda: os.nice(nice)) if nice else None)

    def result(self):
        """(the output folder, the runner's output) once the run has ended; fails if it failed."""
        returncode = self.process.wait()
        printed = self.log.read_text()
        assert returncode == 0, printed[-8000:]
        return self.out, printed

    def stop(self):
        if self.process.poll() is None:  # the session ended first (a failure under -x, Ctrl-C)
            self.process.terminate()
            try:
                self.process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.process.kill()


@pytest.fixture(scope="session")
def series_run(tmp_path_factory, tiny_folder):
    """The seven steps run once headless by the README's main command, on the tiny model loaded from a folder by
    `from_pretrained`: the path users take with SDXL (the model built in memory is `--model tiny`)."""
    # One Inductor cache for all notebooks: kernels compiled by 04 are reused by 05 to 07 (CI time).
    cache = tmp_path_factory.mktemp("inductor")
    run = RunInBackground(tmp_path_factory.mktemp("series"),
                          ["--model", str(tiny_folder), "--inductor-cache", str(cache), "--only", "01-07"])
    yield run
    run.stop()


@pytest.fixture(scope="session")
def appendix_run(tmp_path_factory, tiny_folder):
    """Appendix 08 run the same way, into a folder of its own: in the course's compile mode only, and with one choice
    of regions (the other modes and choices are the same code; test_regional checks what each choice compiles). It
    needs nothing from the seven steps, so it runs beside them; its comparison with their results is run on the
    series' own folder by test_coldstart."""
    run = RunInBackground(tmp_path_factory.mktemp("appendix"),
                          ["--model", str(tiny_folder), "--only", "08", "--set", 'COMPILE_MODES=["max-autotune"]',
                           "--set", 'REGION_CHOICES=["blocks"]'], nice=10)
    yield run
    run.stop()


@pytest.fixture(scope="session", autouse=True)
def series_in_the_background(request):
    """On a machine without a GPU the series and the appendix start with the session, each when a collected test
    reads it, and the other tests run meanwhile: three chains of about equal length on 2 cores. With a GPU each
    starts when a test first reads it, and nothing runs beside it."""
    if not torch.cuda.is_available():
        for name in BACKGROUND_RUNS:
            if any(name in item.fixturenames for item in request.session.items):
                request.getfixturevalue(f"{name}_run")


@pytest.fixture(scope="session")
def series(series_run):
    """(output folder, records, runner output) of the seven steps, waiting for them to end."""
    out, printed = series_run.result()
    return out, json.loads((out / "results.json").read_text()), printed


@pytest.fixture(scope="session")
def appendix(appendix_run):
    """(output folder, runner output) of appendix 08, waiting for it to end."""
    return appendix_run.result()


@pytest.fixture
def offline_hub(monkeypatch, tmp_path):
    """HF_HUB_OFFLINE=1 as if set before the start (huggingface_hub reads it on import), over an empty cache."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
