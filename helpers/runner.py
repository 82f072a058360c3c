"""Run the notebooks headless, in order, with the same parameters: the course's main job.

Each notebook runs in its own kernel with papermill, which injects the parameters after the cell tagged
`parameters`. The run's folder gets the executed notebooks, the images, results.json and the chart; runs may share
a folder, since every executed notebook and image gets a name no other run has taken. The kernels run inside that
folder with OUT_DIR=".", so nothing written there holds an absolute path.

What only the run itself needs (each notebook's Inductor cache, the kernels' connection files and sockets) lives in
a folder of its own in the system's temporary folder. It is removed when the run ends, also on Ctrl-C and SIGTERM;
a run that was killed outright leaves it behind, and the next run removes it.
"""

import errno
import fcntl
import importlib
import logging
import os
import shutil
import signal
import tempfile
import threading
import time
import uuid
from contextlib import contextmanager
from pathlib import Path

from .models import check_model, download, resolve_model
from .params import Params, cell_names
from .quiet import _DropMatching
from .results import (
    EXECUTED_NOTEBOOK_ENV,
    OutputError,
    append_record,
    load_records,
    make_record,
    new_file,
    output_error,
    write_atomically,
)
from .steps import APPENDICES, STEP_IDS, STEPS, get_notebook

NOTEBOOKS_DIR = Path(__file__).resolve().parent.parent / "notebooks"
RUN_FOLDER_PREFIX = "sdxl-fast-run-"
OUT_OF_MEMORY_ERRORS = ("OutOfMemoryError", "OutOfMemory", "MemoryError")
# How a RuntimeError (or Inductor's wrapping of one) says that an allocation failed, on a GPU or in CPU memory.
OUT_OF_MEMORY_WORDS = ("out of memory", "can't allocate memory", "cannot allocate memory")
OOM_ADVICE = (
    "out of GPU memory: use a smaller --height/--width, free other GPU work, or use a GPU with more memory "
    "(SDXL's fp32 weights alone are 14 GB)"
)
CPU_OOM_ADVICE = (
    "out of memory: use a smaller --height/--width, close other programs, or use a machine with more memory "
    "(SDXL's fp32 weights alone are 14 GB)"
)
# Errors writing a file that another folder (or more disk space) would cure.
WRITE_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOTDIR)


class RunFailed(RuntimeError):
    """A notebook failed; the message names the notebook, the cell and the error."""


class RunStopped(Exception):
    """Ctrl-C or SIGTERM stopped the run; the message says where and what was kept."""

    def __init__(self, message, exit_code):
        super().__init__(message)
        self.exit_code = exit_code


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where the run is, so that it ends as Ctrl-C does: kernel stopped, temporary files removed."""


def interrupt_name_and_code(interrupt):
    """("SIGTERM", 143) or ("Ctrl-C", 130): what stopped the run, and the exit status a shell expects for it."""
    return ("SIGTERM", 128 + signal.SIGTERM) if isinstance(interrupt, Terminated) else ("Ctrl-C", 128 + signal.SIGINT)


def _ipc_kernel_manager(folder, kernels):
    """A kernel manager class whose kernels talk over socket files in `folder` rather than TCP ports (nothing
    reachable from the network, no warning per kernel about unencrypted TCP); each one started joins `kernels`."""
    from jupyter_client.manager import AsyncKernelManager
    from traitlets import default

    class IpcKernelManager(AsyncKernelManager):
        @default("transport")
        def _transport_default(self):
            return "ipc"

        @default("connection_file")
        def _connection_file_default(self):
            # The sockets are named after it: in the run's folder, two runs' kernels never share a name.
            return str(folder / f"kernel-{uuid.uuid4().hex[:8]}.json")

        async def _async_launch_kernel(self, kernel_cmd, **kw):
            kernels.append(self)
            # The kernel's own log (its complaints when Ctrl-C shuts it down mid-cell) goes to a file, not the terminal.
            with open(Path(self.connection_file).with_suffix(".log"), "ab") as log:
                return await super()._async_launch_kernel(kernel_cmd, **{**kw, "stderr": log})

    return IpcKernelManager


def is_out_of_memory(error_name, message):
    """True for an out-of-memory error, on a GPU or in CPU memory, also when Inductor wraps one raised while it
    compiled or autotuned."""
    if error_name in OUT_OF_MEMORY_ERRORS:
        return True
    return error_name in ("RuntimeError", "InductorError") and any(w in message.lower() for w in OUT_OF_MEMORY_WORDS)


def _out_of_memory_advice(error_name, message):
    on_gpu = error_name == "OutOfMemoryError" or "cuda" in message.lower()
    return OOM_ADVICE if on_gpu else CPU_OOM_ADVICE


def select_steps(only):
    """The notebooks to run, in course order: the seven steps (`only` None), or those named in `only` ("01,03",
    "4-7", "08" or "01-09": the appendices run only when named)."""
    notebooks = STEPS + APPENDICES
    if only is None:
        return list(STEPS)
    if not str(only).strip():
        raise ValueError("--only is empty: name the steps to run, e.g. 01,03 or 04-07, or leave it out for 01-07.")
    wanted = set()
    for part in str(only).split(","):
        if "-" in part.strip("-"):
            first, last = (get_notebook(p).id for p in part.split("-", 1))
            if first > last:
                raise ValueError(f"The range {part.strip()!r} in --only runs backwards: write {last}-{first}.")
            wanted |= {s.id for s in notebooks if first <= s.id <= last}
        else:
            wanted.add(get_notebook(part).id)
    return [step for step in notebooks if step.id in wanted]


def _within(path, folder):
    return path == folder or folder in path.parents


def check_writable(folder):
    """Make `folder` if needed and write a file in it; OutputError, in one sentence, where that fails."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as error:
        raise output_error(folder, error) from None


def check_out_dir(out_dir):
    """Refuse, in one sentence, an output folder that is a file, can't be written, or would write among the course's
    own notebooks."""
    out_dir = Path(out_dir).resolve()
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"--out {out_dir} is a file: give a folder for the run, a new one or one of an earlier run.")
    course = NOTEBOOKS_DIR.resolve()
    if _within((out_dir / "notebooks").resolve(), course) or _within(out_dir, course):
        raise ValueError(
            f"--out {out_dir} would put executed notebooks among the course's own in {course}: "
            "give the run a folder of its own, e.g. outputs/run."
        )
    check_writable(out_dir)


def run_series(params, out_dir, only=None, progress=True, inductor_cache=None, extras=True, settings=None):
    """Execute the selected notebooks in order into `out_dir`; returns the list of (step, status).

    Each notebook gets a fresh Inductor cache, so every first call is a cold compile, unless `inductor_cache`
    names a folder that all of them share: faster (kernels compiled once are reused), but then the first calls
    of later notebooks are no longer cold, and the compile-time comparison of notebook 07 says less.
    `extras=False` leaves out the cells tagged "extra" (optional sections: 07's second size, dynamic arm and flags
    panel), for a run that must fit a short time. `settings` ({NAME: value}) sets parameters that only some
    notebooks have, such as 08's COMPILE_MODES or 09's BATCH_SIZES, in each selected notebook that has them.
    """
    from .chart import chart_from_dir

    out_dir = Path(out_dir).resolve()
    steps = select_steps(only)
    settings = check_settings(settings or {}, steps)
    model = check_model(resolve_model(params.model))  # prints which model "auto" chose, and why
    compile_cache = _checked_compile_cache(params, model, steps)
    check_out_dir(out_dir)  # makes the folder: after every refusal that can come before it
    if inductor_cache is not None:
        check_writable(Path(inductor_cache).resolve())
    if params.model != "auto":
        print(f"Model: {model}.")
    statuses = []
    with _sigterm_as_interrupt():
        download(model)  # once, with a progress bar, before notebook 01: every notebook then loads from disk
        # The notebooks read the results of earlier ones (the baseline image, step 06's compile time) from ".".
        params = Params(**{**params.to_dict(), "model": model, "out_dir": ".", "compile_cache": compile_cache})
        with _run_folder() as folder:
            caches = {s.id: Path(inductor_cache).resolve() if inductor_cache else folder / "inductor" / s.id
                      for s in steps}
            _run_notebooks(steps, params, out_dir, caches, folder, progress, statuses, (extras, settings))
        if any(status == "ok" and step_id in STEP_IDS for step_id, status in statuses):  # an appendix alone: no chart
            chart = chart_from_dir(out_dir)
            print(f"Chart: {chart}")
    return statuses


def _checked_compile_cache(params, model, steps):
    """The compile-cache file as an absolute path (the kernels run in the output folder), once its manifest matches
    this machine and these parameters; None where there is none. The notebooks check the model's architecture."""
    if params.compile_cache is None:
        return None
    from .coldstart import check_compile_cache

    path = Path(params.compile_cache).resolve()
    manifest = check_compile_cache(path, Params(**{**params.to_dict(), "model": model}), steps=[s.id for s in steps])
    print(f"Compile cache: {path.name}, steps {', '.join(manifest['steps'])}, made on {manifest['device']} "
          f"({manifest['made']}).")
    return str(path)


# Set once Ctrl-C or SIGTERM has stopped the run: from then on the notebook's kernel is expected to die.
_stopped_by_user = threading.Event()
# What papermill and asyncio log when the kernel of an interrupted notebook is shut down under a cell still waiting
# for it: noise after the run's own one line, dropped only once the user stopped the run.
AFTER_STOP_NOISE = (("papermill", "Kernel died while waiting for execute reply"),
                    ("asyncio", "Task exception was never retrieved"),
                    ("asyncio", "Task was destroyed but it is pending"))


class _DropAfterStop(_DropMatching):
    def filter(self, record):
        return not _stopped_by_user.is_set() or super().filter(record)


for _logger_name, _text in AFTER_STOP_NOISE:
    logging.getLogger(_logger_name).addFilter(_DropAfterStop(_text))


@contextmanager
def _sigterm_as_interrupt():
    """Within the block, SIGTERM raises Terminated where the run is, instead of ending the process on the spot, and
    Ctrl-C raises KeyboardInterrupt as always; both first mark the run as stopped by the user."""

    def stop(signum, frame):
        _stopped_by_user.set()
        raise Terminated() if signum == signal.SIGTERM else KeyboardInterrupt()

    previous = {}
    try:
        for signum in (signal.SIGTERM, signal.SIGINT):
            previous[signum] = signal.signal(signum, stop)
    except ValueError:  # not the main thread, where only the main thread may handle signals
        pass
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


@contextmanager
def _run_folder():
    """A new private folder for this run's temporary files, removed at the end.

    A lock held on it while the run lives tells a later run whether it was abandoned: a killed process's lock is
    released by the system."""
    _remove_abandoned_run_folders()
    try:
        folder = Path(tempfile.mkdtemp(prefix=RUN_FOLDER_PREFIX))
    except OSError as error:
        raise OutputError(
            f"Can't make the run's temporary folder in {tempfile.gettempdir()} ({error.strerror or error}): free some "
            "space there, or point TMPDIR at a folder you can write."
        ) from None
    try:
        with open(folder / "lock.new", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            os.rename(folder / "lock.new", folder / "lock")  # seen by others only once locked: never taken for dead
            yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _remove_abandoned_run_folders():
    """Remove the run folders of runs that were killed: theirs is the only kind whose lock can be taken."""
    for folder in Path(tempfile.gettempdir()).glob(RUN_FOLDER_PREFIX + "*"):
        try:
            with open(folder / "lock") as lock:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                shutil.rmtree(folder, ignore_errors=True)
        except OSError:  # a live run's, another user's, still being set up, or removed by someone else just now
            continue


def _run_notebooks(steps, params, out_dir, caches, folder, progress, statuses, options):
    """Execute each notebook in its own kernel, with the Inductor cache folder `caches` gives its step."""
    import papermill

    kernels = []
    manager = _ipc_kernel_manager(folder, kernels)
    for step in steps:
        print(f"== {step.id} {step.title} ({step.notebook})", flush=True)
        executed, start = None, time.monotonic()
        try:
            executed = _new_notebook(out_dir, step)
            notebook = executed.relative_to(out_dir).as_posix()
            env = {"TORCHINDUCTOR_CACHE_DIR": str(caches[step.id]), EXECUTED_NOTEBOOK_ENV: notebook}
            _execute(step, executed, params, out_dir, env, manager, kernels, progress, options)
            _print_result(out_dir, notebook, step)
            statuses.append((step.id, "ok"))
        except papermill.PapermillExecutionError as error:
            statuses.append((step.id, _recorded_failure(step, error, params, out_dir, notebook)))
        except RuntimeError as error:  # nbclient's DeadKernelError, or jupyter_client's on a kernel that won't start
            raise _kernel_failure(step, error, folder, notebook) from None
        except KeyboardInterrupt as interrupt:
            if step in STEPS and executed is not None:  # an appendix adds no step to the chart
                _record_stop(step, executed, params, out_dir, interrupt, time.monotonic() - start)
            raise RunStopped(*_stopped(step, executed, out_dir, statuses, interrupt)) from None


def _print_result(out_dir, notebook, step):
    """The step's result in one line, from the record that its executed notebook wrote."""
    if step in APPENDICES:
        line = importlib.import_module(f"{__package__}.{step.module}").summary_of(out_dir, notebook)
        if line:
            print(f"   {line}", flush=True)
        return
    records = [r for r in load_records(out_dir, quiet=True) if r.get("notebook") == notebook]
    if records and records[-1].get("median_s"):
        record = records[-1]
        quality = record.get("quality") or {}
        ssim = f", SSIM {quality['ssim']:.3f} against 01" if quality.get("ssim") is not None else ""
        print(f"   {record['median_s']:.3f} s median (IQR {record['iqr_s']:.3f} s) on {record['device']}; "
              f"first call {record['first_call_s']:.1f} s{ssim}", flush=True)


def _kernel_failure(step, error, folder, notebook):
    """RunFailed, in one sentence, for a kernel that died or did not start; `error` itself for any other."""
    from nbclient.exceptions import DeadKernelError

    if isinstance(error, DeadKernelError):
        return RunFailed(
            f"The kernel running {step.notebook} died{_kernel_said(folder)}; most often the machine ran out of "
            f"memory: use a smaller --height/--width, or close other programs (the executed notebook is {notebook})."
        )
    if str(error).startswith("Kernel"):  # "Kernel died before replying to kernel_info", "Kernel didn't respond"
        return RunFailed(
            f"The kernel for {step.notebook} did not start ({error}{_kernel_said(folder)}): check this "
            "environment's Jupyter kernel with `python -m ipykernel_launcher --help`, or set it up again."
        )
    return error


def _kernel_said(folder):
    """'; the kernel's last words: ...' from the newest kernel log in `folder`, or '' where it logged nothing."""
    logs = sorted(folder.glob("kernel-*.log"), key=lambda path: path.stat().st_mtime)
    lines = logs[-1].read_text(errors="replace").strip().splitlines() if logs else []
    return f"; the kernel's last words: {lines[-1].strip()}" if lines else ""


def _new_notebook(out_dir, step):
    """A new, empty file in `<out_dir>/notebooks` for the step's executed notebook: its own name, never another's."""
    try:
        return new_file(out_dir / "notebooks", Path(step.notebook).stem, ".ipynb")
    except OSError as error:
        raise output_error(out_dir / "notebooks", error) from None


def notebook_parameters(step):
    """The names and default values of `step`'s notebook's parameters cell."""
    import nbformat

    notebook = nbformat.read(NOTEBOOKS_DIR / step.notebook, as_version=4)
    cell = next(c for c in notebook.cells if "parameters" in c.metadata.get("tags", []))
    values = {}
    exec(cell.source, {}, values)
    return values


def check_settings(settings, steps):
    """`settings` checked against the selected notebooks' parameters cells: ValueError, in one sentence, for a name
    that none of them has, one that `Params` already sets, or a value of another type than the cell's default."""
    shared = set(cell_names())
    for name, value in settings.items():
        if name in shared:
            raise ValueError(f"--set {name}: {name} is a course parameter; use --{name.lower().replace('_', '-')}.")
        defaults = [notebook_parameters(step)[name] for step in steps if name in notebook_parameters(step)]
        if not defaults:
            raise ValueError(f"--set {name}: none of the selected notebooks has a parameter {name} "
                             f"({', '.join(s.notebook for s in steps)}).")
        if type(value) is not type(defaults[0]):
            raise ValueError(f"--set {name}: give a {type(defaults[0]).__name__} like {defaults[0]!r}, "
                             f"got {value!r}.")
    return dict(settings)


def _without_extras(path):
    """The notebook at `path` without its cells tagged "extra" (optional sections, such as 07's second size, dynamic
    arm and flags panel), and a line in their place that says so."""
    import nbformat

    notebook = nbformat.read(path, as_version=4)
    kept = [cell for cell in notebook.cells if "extra" not in cell.metadata.get("tags", [])]
    if len(kept) < len(notebook.cells):
        note = nbformat.v4.new_markdown_cell(
            f"*{len(notebook.cells) - len(kept)} cells of optional sections were left out (`--no-extras`).*")
        kept.insert(next(i for i, cell in enumerate(kept) if cell.cell_type == "code") + 1, note)
    notebook.cells = kept
    return notebook


def _execute(step, executed, params, out_dir, env, manager, kernels, progress, options=(True, {})):
    import papermill

    extras, settings = options
    own = notebook_parameters(step)
    try:
        with environment(env):
            papermill.execute_notebook(
                NOTEBOOKS_DIR / step.notebook if extras else _without_extras(NOTEBOOKS_DIR / step.notebook),
                executed,
                parameters={**cell_names(params), **{k: v for k, v in settings.items() if k in own}},
                cwd=out_dir,
                progress_bar=progress,
                kernel_name="python3",
                kernel_manager_class=manager,
            )
    except OSError as error:  # papermill could not write the executed notebook
        if isinstance(error, OutputError) or error.errno not in WRITE_ERRNOS:
            raise
        raise output_error(executed, error) from None
    finally:
        _stop_kernels(kernels)
        _tidy(executed, step, out_dir)


def _stop_kernels(kernels):
    """End each kernel still running (an interrupted papermill leaves its kernel busy), its child processes too."""
    for manager in kernels:
        process = getattr(manager.provisioner, "process", None)
        if process is not None and process.poll() is None:
            try:
                os.killpg(process.pid, signal.SIGKILL)  # the kernel leads a session of its own
            except OSError:
                process.kill()
            process.wait()
    kernels.clear()


def _tidy(executed, step, out_dir):
    """Keep the executed notebook free of this machine's paths; remove it where what was written can't be read (the
    disk filled up mid-write, say), rather than leave an empty or broken file."""
    import nbformat

    try:
        notebook = nbformat.read(executed, as_version=4)
    except (OSError, ValueError):
        executed.unlink(missing_ok=True)
        return
    paths = notebook.metadata.get("papermill", {})
    for key, relative in (("input_path", f"notebooks/{step.notebook}"),
                          ("output_path", executed.relative_to(out_dir).as_posix())):
        if paths.get(key):
            paths[key] = relative
    try:
        write_atomically(executed, lambda f: f.write(nbformat.writes(notebook).encode()))
    except OutputError:
        pass  # the notebook stays as papermill wrote it, whole; the error that matters is raised elsewhere


def _recorded_failure(step, error, params, out_dir, notebook):
    """Record an out-of-memory or unavailable step and return its status; raise for any other failure."""
    if is_out_of_memory(error.ename, error.evalue):
        advice = _out_of_memory_advice(error.ename, error.evalue)
        print(f"{step.id}: {advice}; going on with the next notebook.")
        if step in STEPS:  # an appendix adds no step to the chart
            append_record(out_dir, _failure_record(step, params, "out_of_memory", advice, notebook))
        return "out_of_memory"
    if error.ename == "StepUnavailable":
        print(f"{step.id}: skipped: {error.evalue}")
        if step in STEPS:
            append_record(out_dir, _failure_record(step, params, "skipped", error.evalue, notebook))
        return "skipped"
    if error.ename == "OutputError":  # a write inside the notebook failed: its sentence says it all
        raise OutputError(error.evalue)
    first_line = error.evalue.strip().splitlines()[0] if error.evalue.strip() else ""
    raise RunFailed(
        f"{step.notebook} failed in cell [{error.exec_count or error.cell_index}]: {error.ename}: {first_line} "
        f"(the executed notebook is {notebook} in {out_dir.name})"
    )


def _stopped(step, executed, out_dir, statuses, interrupt):
    """The one line that says which notebook an interrupt stopped and what was kept, and the exit status."""
    how, code = interrupt_name_and_code(interrupt)
    done = [step_id for step_id, status in statuses if status == "ok"]
    finished = f"steps {', '.join(done)} finished; " if done else ""
    shown = f"; {executed.relative_to(out_dir)} shows how far it got" if executed and executed.exists() else ""
    kept = f"what this run recorded stays in {out_dir / 'results.json'}"
    return f"Stopped {step.notebook} ({how}): {finished}{kept}{shown}.", code


def _record_stop(step, executed, params, out_dir, interrupt, seconds):
    """Record the step that Ctrl-C or SIGTERM (`timeout`, say) cut off: by what, after how long, in which cell.

    Its status is "stopped"; the note and the `stopped` field say by what, when and where."""
    how, _ = interrupt_name_and_code(interrupt)
    cell, source = _running_cell(executed)
    where = f", in cell [{cell}] ({source})" if cell else ", before its first cell ran"
    note = f"stopped by {how} after {seconds:.0f} s{where}"
    stopped = {"by": how, "seconds": round(seconds, 1), "cell": cell, "cell_source": source}
    notebook = executed.relative_to(out_dir).as_posix()
    try:
        append_record(out_dir, _failure_record(step, params, "stopped", note, notebook, stopped=stopped))
    except OutputError:  # a full disk, say: the stop still ends in its one line
        pass


def _running_cell(executed):
    """(number, first line) of the last cell papermill started in the executed notebook, the one a stop cut off,
    numbered as Jupyter shows it; (None, None) where none started or the notebook can't be read. (Papermill marks
    even an interrupted cell "completed"; the cells it never reached stay "pending", without a start time.)"""
    import nbformat

    try:
        notebook = nbformat.read(executed, as_version=4)
    except (OSError, ValueError):
        return None, None
    started = [(number, cell) for number, cell in enumerate((c for c in notebook.cells if c.cell_type == "code"), 1)
               if cell.metadata.get("papermill", {}).get("start_time")]
    if not started:
        return None, None
    number, cell = started[-1]
    return cell.get("execution_count") or number, (cell.source.strip().splitlines() or [""])[0][:100]


def _failure_record(step, params, status, note, notebook, **extra):
    import torch

    from .models import low_precision_dtype

    dtype = low_precision_dtype(verbose=False) if step.settings.low_precision else torch.float32
    return make_record(step.id, None, params, dtype=dtype, status=status, note=note,
                       extra={"notebook": notebook, **extra})


class environment:
    """Set environment variables for the kernels started inside the block, then restore them."""

    def __init__(self, values):
        self.values = values

    def __enter__(self):
        self.saved = {key: os.environ.get(key) for key in self.values}
        os.environ.update(self.values)

    def __exit__(self, *exc):
        for key, value in self.saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
