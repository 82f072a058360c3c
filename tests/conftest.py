import atexit
import contextlib
import importlib.util
import io
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import huggingface_hub
import huggingface_hub.constants  # a submodule: imported here, not left to whichever test imports diffusers first
import pytest
import torch

# As in the runner's own process (helpers/__main__.py says why): jsonschema, which nbformat imports, without its "iri"
# format check, whose import takes about 3 CPU-seconds. Before the first `import nbformat` of the session.
sys.modules.setdefault("rfc3987_syntax", None)

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = ROOT / "notebooks"
COMPILER_CACHE = ROOT / "tests" / "compiler_cache" / "g++"  # the session's compiler cache (below)
# A fake token: the tests check that it never reaches an output.
FAKE_HF_TOKEN = "hf_FAKEtokenThatMustNeverBePrinted0000"
# Small enough for a 2-core CPU: the tiny model at 96x96, 2 denoising steps (the model is added by `series`). Tests
# that compile what the series compiles do it at this size, in the course's compile mode: the C++ kernels are then the
# same, and the session's compiler cache (tests/compiler_cache/g++) compiles each once.
SERIES_SIZE = 96
SERIES_ARGS = ["--steps", "2", "--height", str(SERIES_SIZE), "--width", str(SERIES_SIZE), "--warmup", "1",
               "--runs", "3"]


# Without a GPU the series runs beside the other tests (`series_in_the_background`), so two or more processes share
# the cores. Each then runs one thread, as the GPU check's CPU form does: an OpenMP thread whose sibling is descheduled
# spins while it waits. Three of tests/test_throughput.py's tests beside two busy loops on 2 cores: 39 CPU-seconds
# with 2 threads, 24 with one, 26 with 2 threads and OMP_WAIT_POLICY=PASSIVE (no spinning). A value set before the
# tests start is kept.
if not torch.cuda.is_available() and "OMP_NUM_THREADS" not in os.environ:
    os.environ["OMP_NUM_THREADS"] = "1"  # for every process the tests start
    torch.set_num_threads(1)  # for this one, whose torch has read the variable already

# Without a GPU, Inductor's C++ kernels are compiled scalar, without SIMD intrinsics: less code to generate and to
# compile. A cold compile of the tiny pipeline at 96x96 through step 04 (`helpers.build`, then one `helpers.generate`,
# in a fresh Inductor cache folder, the real g++) took 154 CPU-seconds vectorized (65 in Python, 90 in g++) and 123
# scalar (48 and 75); through step 06, 198 and 156. What the course does with a compile (records, cache files,
# packages, recompiles) is the same for either kernel; a GPU compiles Triton kernels, which this leaves as they are.
# A value set before the tests start is kept.
if not torch.cuda.is_available() and "TORCHINDUCTOR_VEC_ISA_OK" not in os.environ:
    os.environ["TORCHINDUCTOR_VEC_ISA_OK"] = "0"  # read when torch._inductor.config is imported, in every process
    if "torch._inductor.config" in sys.modules:  # for this one, should it have been imported already
        sys.modules["torch._inductor.config"].cpp.vec_isa_ok = False

# Without a GPU, AOTInductor compiles the wrapper of notebook 08's package (one large C++ file of glue code that calls
# the kernels; the kernels keep their flags) at -O0 instead of torch's default -O1: exporting the tiny UNet at 96x96
# and `torch._inductor.aoti_compile_and_package` in a fresh Inductor cache took 75 CPU-seconds at -O0 and 95 at -O1,
# system-wide. A value set before the tests start is kept.
if not torch.cuda.is_available():
    os.environ.setdefault("AOT_INDUCTOR_COMPILE_WRAPPER_OPT_LEVEL", "O0")  # read when torch._inductor.config loads

# One copy of each compiled C++ kernel for the session, shared by every process the tests start: the cold starts of
# notebook 08 and the tests that start from an empty Inductor cache compile the same kernels again (compiler_cache/g++
# says what it caches). Only where the compiler is g++: Inductor chooses its flags by the compiler's name. Inductor
# runs it once per kernel, over 300 times in a session: a shell script of that name starts the cache with this Python,
# without site-packages (-S; it needs only the standard library), rather than through the `python3` on the PATH (on the
# machine measured, a pyenv shim): a cached compile then took 0.07 CPU-seconds instead of 0.19.
if "CXX_CACHE_DIR" not in os.environ and (compiler := shutil.which(os.environ.get("CXX", "g++"))):
    if Path(compiler).name.startswith("g++"):
        launcher = Path(tempfile.mkdtemp(prefix="compiler-cache-bin-")) / "g++"
        command = shlex.join([sys.executable, "-S", "-E", str(COMPILER_CACHE)])
        launcher.write_text(f'#!/bin/sh\nexec {command} "$@"\n')
        launcher.chmod(0o755)
        os.environ.update(CXX=str(launcher), CXX_CACHE_REAL=compiler,
                          CXX_CACHE_DIR=tempfile.mkdtemp(prefix="compiler-cache-"))
        for folder in (launcher.parent, os.environ["CXX_CACHE_DIR"]):
            atexit.register(shutil.rmtree, folder, ignore_errors=True)


def pytest_configure(config):
    """helpers' warning filters (helpers/quiet.py) as the session's own: pytest restores the filters it found after
    loading conftest files, after collecting and after each test, so those that `import helpers` installs there would
    be gone by the next test."""
    from helpers.quiet import SILENCED_WARNINGS

    for text, category in SILENCED_WARNINGS:
        config.addinivalue_line("filterwarnings", f"ignore:{re.escape(text)}:{category.__name__}")


# Fixtures that take over 15 s here: the series, a compile-cache file made by a compile, a two-process job.
SLOW_FIXTURES = {"series", "cache_file", "job"}


def pytest_collection_modifyitems(items):
    """Every test that executes notebooks, drives the browser or needs a slow fixture is slow too. The tests that
    read the series run last, so that the other tests run while it runs in the background (`series_run`). Before
    them run the tests that keep several processes busy: should the series end first, they keep both cores busy
    where a test of one process would leave one idle."""
    for item in items:
        if (item.get_closest_marker("notebooks") or item.get_closest_marker("browser")
                or SLOW_FIXTURES & set(item.fixturenames)):
            item.add_marker(pytest.mark.slow)
    # a stable sort: the order is otherwise kept
    items.sort(key=lambda item: ("series" in item.fixturenames, bool(item.get_closest_marker("several_processes"))))


def load_script(name):
    """scripts/<name>.py as a module, to call its functions in this process."""
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def notebook_cells(notebook, tag):
    """The source of the code cells of `notebook` tagged `tag`, in order."""
    import nbformat

    nb = nbformat.read(NOTEBOOKS / notebook, as_version=4)
    return [c.source for c in nb.cells if c.cell_type == "code" and tag in c.metadata.get("tags", [])]


def save_tiny(tmp_path_factory):
    """The tiny model saved as a diffusers folder, so that it loads by `from_pretrained`, the way SDXL does."""
    import helpers

    folder = tmp_path_factory.mktemp("tiny-sdxl")
    helpers.load_pipeline("tiny", verbose=False).save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_folder(tmp_path_factory):
    """The tiny model's folder (`save_tiny`): the one the series was started with, if it started before collection."""
    return EARLY["tiny_folder"] if "tiny_folder" in EARLY else save_tiny(tmp_path_factory)


# Started with the series: waits until the run in process argv[2] has recorded step argv[3] in the results file argv[1]
# (or has ended), then becomes the runner with the arguments that follow.
START_AFTER_STEP = """
import json, os, sys, time
import psutil
results, pid, step, *runner = sys.argv[1:]

def recorded():
    try:
        return any(record.get("step") == step for record in json.loads(open(results).read()))
    except (OSError, ValueError):
        return False

while not recorded():
    try:
        if psutil.Process(int(pid)).status() == psutil.STATUS_ZOMBIE:
            sys.exit(f"the run ended before step {step} was recorded")
    except psutil.NoSuchProcess:
        sys.exit(f"the run ended before step {step} was recorded")
    time.sleep(1)
os.execv(sys.executable, [sys.executable, "-m", "helpers", "run", *runner])
"""


class SeriesRun:
    """The runner executing the series in a process of its own, its output going to `runner.log` beside `out`.
    Without a GPU, appendix 08 runs in a second runner into the same folder (runs may share one), its output going to
    `appendix.log`: it starts once step 05 is recorded, so that it runs beside notebooks 06 and 07 and the other
    tests, not after them with one core left idle, and its starts find the C++ kernels of step 04 compiled. Its
    comparison with notebooks 06 and 07, its last cells, still finds their records: in two fresh clones' runs, 07
    recorded its step 4.2 and 4.6 minutes after 05 did, 06 compiling meanwhile, and 08 ended 7.5 and 8.3 minutes after
    it started, past its five starts (test_coldstart checks that it printed the comparison)."""

    def __init__(self, out, tiny_folder, cache, appendix_beside=True):
        self.out, self.logs, self.processes = out, [], []
        common = ["--out", str(out), "--no-progress", "--inductor-cache", str(cache), "--model", str(tiny_folder),
                  *SERIES_ARGS]
        appendix_settings = ["--set", 'COMPILE_MODES=["max-autotune"]', "--set", 'REGION_CHOICES=["blocks"]']
        only = ["--only", "01-07"] if appendix_beside else ["--only", "01-08", *appendix_settings]
        self._start("runner.log", ["-m", "helpers", "run", *common, *only])
        if appendix_beside:
            self._start("appendix.log", ["-c", START_AFTER_STEP, str(out / "results.json"), str(self.process.pid),
                                         "05", *common, "--only", "08", *appendix_settings])

    def _start(self, log_name, args):
        """`python ARGS` in a process of its own, its output going to `log_name` beside the output folder."""
        self.logs.append(self.out.parent / log_name)
        env = {**os.environ, "HF_TOKEN": FAKE_HF_TOKEN, "PYTHONUNBUFFERED": "1"}
        with open(self.logs[-1], "w") as log:
            self.processes.append(subprocess.Popen([sys.executable, *args], stdout=log, stderr=subprocess.STDOUT,
                                                   text=True, env=env, cwd=ROOT))

    @property
    def process(self):
        """The runner of the seven steps."""
        return self.processes[0]

    def result(self):
        """(the output folder, its records, the runners' output) once the runs have ended; fails if one failed."""
        returncodes = [process.wait() for process in self.processes]
        printed = "".join(log.read_text() for log in self.logs)
        assert returncodes == [0] * len(returncodes), printed[-8000:]
        return self.out, json.loads((self.out / "results.json").read_text()), printed

    def stop(self):
        for process in self.processes:
            if process.poll() is None:  # the session ended first (a failure under -x, Ctrl-C)
                process.terminate()
                try:
                    process.wait(timeout=60)
                except subprocess.TimeoutExpired:
                    process.kill()


@pytest.fixture(scope="session")
def series_run(tmp_path_factory, tiny_folder):
    """The whole course run once headless by the README's main command, on the tiny model loaded from a folder
    by `from_pretrained`: the path users take with SDXL (the model built in memory is `--model tiny`). Appendix 08
    runs in the course's compile mode only, and with one choice of regions (the other modes and choices are the same
    code; test_regional checks what each choice compiles); with a GPU after the seven steps, in the same run."""
    run = EARLY.get("series_run") or start_series(tmp_path_factory, tiny_folder)
    yield run
    run.stop()


def start_series(tmp_path_factory, tiny_folder):
    # One Inductor cache for all notebooks: kernels compiled by 04 are reused by 05 to 07 (CI time).
    return SeriesRun(tmp_path_factory.mktemp("series"), tiny_folder, tmp_path_factory.mktemp("inductor"),
                     appendix_beside=not torch.cuda.is_available())


# The series started before collection, and the tiny model's folder it runs on (pytest_sessionstart).
EARLY = {}


def pytest_sessionstart(session):
    """Without a GPU, the whole suite (the README's command: the configured test folder, no -k, -m, --lf, --sw or
    --co) starts the series before collecting the tests, which takes up to about 30 s on one core on a fresh clone
    (each module's first import compiles its bytecode). Saving the tiny model imports what collection would import
    anyway; the series starts after that and runs beside the rest of collection, on the core it leaves idle: in two
    fresh-clone runs it started 23 and 25 s after pytest did, against 27 and 38 s when it started after collection.
    Should no collected test read the series after all, `series_in_the_background` stops it."""
    config = session.config
    factory = getattr(config, "_tmp_path_factory", None)  # what the tmp_path_factory fixture returns
    # --lf and --sw belong to plugins that `-p no:cacheprovider` or `-p no:stepwise` leave out: read with a default.
    narrowed = any(config.getoption(name, default=False) for name in ("keyword", "markexpr", "lf", "stepwise",
                                                                     "collectonly"))
    whole_suite = config.args_source is pytest.Config.ArgsSource.TESTPATHS and not narrowed
    if factory is not None and whole_suite and not torch.cuda.is_available():
        with contextlib.redirect_stderr(io.StringIO()):  # diffusers' progress bar: no fixture's capture runs yet
            EARLY["tiny_folder"] = save_tiny(factory)
        EARLY["series_run"] = start_series(factory, EARLY["tiny_folder"])


def pytest_sessionfinish(session):
    if "series_run" in EARLY:  # the session ended before any test ran (a collection error, Ctrl-C): nothing stopped it
        EARLY["series_run"].stop()


@pytest.fixture(scope="session", autouse=True)
def series_in_the_background(request):
    """On a machine without a GPU the series starts before collection (`pytest_sessionstart`) or else with the
    session when a collected test reads it, and the other tests run meanwhile: a cold compile of the tiny pipeline
    keeps about 1.3 of 2 cores busy (user+sys over wall time), and the other tests wait on process starts. From two
    fresh clones of the same tests on a 2-core machine: 1557 s so, 1969 s one after the other. With a GPU it starts
    when a test first reads it, and nothing runs beside it."""
    needed = any("series" in item.fixturenames for item in request.session.items)
    if not torch.cuda.is_available() and needed:
        yield_to(request.getfixturevalue("series_run").process.pid)
    elif "series_run" in EARLY:  # started before collection, but no collected test reads it
        EARLY.pop("series_run").stop()


def yield_to(series_pid):
    """The series is the session's longest chain, so the tests beside it take what it leaves: this process, and those
    it starts from now on, run at nice 10; the series, started before, keeps its priority. Linux gives each thread a
    nice value of its own, so every thread of this process gets it. In fresh-clone runs on 2 cores the series'
    notebooks took 903 and 894 s with this, 1033 s without."""
    for task in os.listdir("/proc/self/task") if os.path.isdir("/proc/self/task") else [0]:
        try:
            os.setpriority(os.PRIO_PROCESS, int(task), 10)
        except OSError:  # a thread that ended meanwhile
            pass
    assert os.getpriority(os.PRIO_PROCESS, series_pid) < os.getpriority(os.PRIO_PROCESS, 0)


@pytest.fixture(scope="session")
def series(series_run):
    """(output folder, records, runner output) of the series, waiting for it to end."""
    return series_run.result()


@pytest.fixture
def offline_hub(monkeypatch, tmp_path):
    """HF_HUB_OFFLINE=1 as if set before the start (huggingface_hub reads it on import), over an empty cache."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
