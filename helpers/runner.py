"""Run the notebooks headless, in order, with the same parameters: the course's main job.

Each notebook runs in its own kernel with papermill, which injects the parameters after the cell tagged
`parameters`. The run's folder gets the executed notebooks, the images, results.json and the chart; runs may share
a folder, since every executed notebook and image gets a name no other run has taken. The kernels run inside that
folder with OUT_DIR=".", so nothing written there holds an absolute path.

What only the run itself needs (each notebook's Inductor cache, the kernels' connection files and sockets) lives in
a folder of its own in the system's temporary folder. It is removed when the run ends, also on Ctrl-C and SIGTERM;
a run that was killed outright leaves it behind, and the next run removes it.
"""

import importlib
import time
from dataclasses import dataclass, field
from pathlib import Path

from .errors import is_out_of_memory, out_of_memory_advice
from .files import (
    WRITE_ERRNOS,
    OutputError,
    check_writable,
    environment,
    new_file,
    output_error,
    within,
    write_atomically,
)
from .kernels import (
    interrupt_name_and_code,
    ipc_kernel_manager,
    kernel_said,
    run_folder,
    running_cell,
    sigterm_as_interrupt,
    stop_kernels,
)
from .params import Params, cell_names
from .results import EXECUTED_NOTEBOOK_ENV, append_record, make_record
from .sources import check_model, download, resolve_model
from .steps import STEP_IDS, select_steps

NOTEBOOKS_DIR = Path(__file__).resolve().parent.parent / "notebooks"


class RunFailed(RuntimeError):
    """A notebook failed; the message names the notebook, the cell and the error."""


class RunStopped(Exception):
    """Ctrl-C or SIGTERM stopped the run; the message says where and what was kept."""

    def __init__(self, message, exit_code):
        super().__init__(message)
        self.exit_code = exit_code


def check_out_dir(out_dir):
    """Refuse, in one sentence, an output folder that is a file, can't be written, or would write among the course's
    own notebooks."""
    out_dir = Path(out_dir).resolve()
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"--out {out_dir} is a file: give a folder for the run, a new one or one of an earlier run.")
    course = NOTEBOOKS_DIR.resolve()
    if within((out_dir / "notebooks").resolve(), course) or within(out_dir, course):
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
    `extras=False` leaves out the cells tagged "extra" (optional sections: 07's second size and dynamic arm; the
    flags panel stays), for a run that must fit a short time. `settings` ({NAME: value}) sets parameters that only some
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
    with sigterm_as_interrupt():
        download(model)  # once, with a progress bar, before notebook 01: every notebook then loads from disk
        with run_folder() as folder:
            # The notebooks read the results of earlier ones (the baseline image, step 06's compile time) from ".".
            run = Run(Params(**{**params.to_dict(), "model": model, "out_dir": ".", "compile_cache": compile_cache}),
                      out_dir, folder, Path(inductor_cache).resolve() if inductor_cache else None, progress, extras,
                      settings)
            _run_notebooks(run, steps)
        if any(status == "ok" and step_id in STEP_IDS for step_id, status in run.statuses):  # appendices: no chart
            chart = chart_from_dir(out_dir)
            print(f"Chart: {chart}")
    return run.statuses


@dataclass
class Run:
    """What every notebook of one run shares, and what the run has done so far."""

    params: Params  # the notebooks' parameters, with the model resolved and OUT_DIR "." (the kernels run in out_dir)
    out_dir: Path
    folder: Path  # the run's own temporary folder: kernels' sockets, each notebook's Inductor cache
    inductor_cache: Path | None  # one Inductor cache folder for every notebook, or None for one each, cold
    progress: bool
    extras: bool  # False: leave out the cells tagged "extra"
    settings: dict  # {NAME: value} for the notebooks that have that parameter
    statuses: list = field(default_factory=list)  # (step id, status), in order
    kernels: list = field(default_factory=list)  # the kernels started and not yet stopped

    def inductor_cache_of(self, step):
        return self.inductor_cache or self.folder / "inductor" / step.id


def _checked_compile_cache(params, model, steps):
    """The compile-cache file as an absolute path (the kernels run in the output folder), once its manifest matches
    this machine and these parameters; None where there is none. The notebooks check the model's architecture."""
    if params.compile_cache is None:
        return None
    from .compile_cache import check_compile_cache

    path = Path(params.compile_cache).resolve()
    manifest = check_compile_cache(path, Params(**{**params.to_dict(), "model": model}), steps=[s.id for s in steps])
    print(f"Compile cache: {path.name}, steps {', '.join(manifest['steps'])}, made on {manifest['device']} "
          f"({manifest['made']}).")
    return str(path)


def _run_notebooks(run, steps):
    """Execute each notebook in its own kernel, with its own Inductor cache folder unless the run shares one."""
    import papermill

    manager = ipc_kernel_manager(run.folder, run.kernels)
    for step in steps:
        print(f"== {step.id} {step.title} ({step.notebook})", flush=True)
        executed, start = None, time.monotonic()
        try:
            executed = _new_notebook(run.out_dir, step)
            notebook = executed.relative_to(run.out_dir).as_posix()
            env = {"TORCHINDUCTOR_CACHE_DIR": str(run.inductor_cache_of(step)), EXECUTED_NOTEBOOK_ENV: notebook}
            _execute(run, step, executed, env, manager)
            _print_result(run.out_dir, notebook, step)
            run.statuses.append((step.id, "ok"))
        except papermill.PapermillExecutionError as error:
            run.statuses.append((step.id, _recorded_failure(run, step, error, notebook)))
        except RuntimeError as error:  # nbclient's DeadKernelError, or jupyter_client's on a kernel that won't start
            raise _kernel_failure(step, error, run.folder, notebook) from None
        except KeyboardInterrupt as interrupt:
            if step.charted and executed is not None:
                _record_stop(run, step, executed, interrupt, time.monotonic() - start)
            raise RunStopped(*_stopped(run, step, executed, interrupt)) from None


def _print_result(out_dir, notebook, step):
    """The step's result in one line, from the records that its executed notebook wrote."""
    line = importlib.import_module(f"{__package__}.{step.module}").summary_of(out_dir, notebook)
    if line:
        print(f"   {line}", flush=True)


def _kernel_failure(step, error, folder, notebook):
    """RunFailed, in one sentence, for a kernel that died or did not start; `error` itself for any other."""
    from nbclient.exceptions import DeadKernelError

    if isinstance(error, DeadKernelError):
        return RunFailed(
            f"The kernel running {step.notebook} died{kernel_said(folder)}; most often the machine ran out of "
            f"memory: use a smaller --height/--width, or close other programs (the executed notebook is {notebook})."
        )
    if str(error).startswith("Kernel"):  # "Kernel died before replying to kernel_info", "Kernel didn't respond"
        return RunFailed(
            f"The kernel for {step.notebook} did not start ({error}{kernel_said(folder)}): check this "
            "environment's Jupyter kernel with `python -m ipykernel_launcher --help`, or set it up again."
        )
    return error


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


def without_extras(path):
    """The notebook at `path` without its cells tagged "extra" (optional sections, such as 07's second size and dynamic
    arm), and a line in their place that says so."""
    import nbformat

    notebook = nbformat.read(path, as_version=4)
    kept = [cell for cell in notebook.cells if "extra" not in cell.metadata.get("tags", [])]
    if len(kept) < len(notebook.cells):
        note = nbformat.v4.new_markdown_cell(
            f"*{len(notebook.cells) - len(kept)} cells of optional sections were left out (`--no-extras`).*")
        kept.insert(next(i for i, cell in enumerate(kept) if cell.cell_type == "code") + 1, note)
    notebook.cells = kept
    return notebook


def _execute(run, step, executed, env, manager):
    import papermill

    own = notebook_parameters(step)
    try:
        with environment(env):
            papermill.execute_notebook(
                NOTEBOOKS_DIR / step.notebook if run.extras else without_extras(NOTEBOOKS_DIR / step.notebook),
                executed,
                parameters={**cell_names(run.params), **{k: v for k, v in run.settings.items() if k in own}},
                cwd=run.out_dir,
                progress_bar=run.progress,
                kernel_name="python3",
                kernel_manager_class=manager,
            )
    except OSError as error:  # papermill could not write the executed notebook
        if isinstance(error, OutputError) or error.errno not in WRITE_ERRNOS:
            raise
        raise output_error(executed, error) from None
    finally:
        stop_kernels(run.kernels)
        _tidy(executed, step, run.out_dir)


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


def _recorded_failure(run, step, error, notebook):
    """Record an out-of-memory or unavailable step and return its status; raise for any other failure."""
    if is_out_of_memory(error.ename, error.evalue):
        advice = out_of_memory_advice(error.ename, error.evalue)
        print(f"{step.id}: {advice}; going on with the next notebook.")
        if step.charted:
            append_record(run.out_dir, _failure_record(run, step, "out_of_memory", advice, notebook))
        return "out_of_memory"
    if error.ename == "StepUnavailable":
        print(f"{step.id}: skipped: {error.evalue}")
        if step.charted:
            append_record(run.out_dir, _failure_record(run, step, "skipped", error.evalue, notebook))
        return "skipped"
    if error.ename == "OutputError":  # a write inside the notebook failed: its sentence says it all
        raise OutputError(error.evalue)
    first_line = error.evalue.strip().splitlines()[0] if error.evalue.strip() else ""
    raise RunFailed(
        f"{step.notebook} failed in cell [{error.exec_count or error.cell_index}]: {error.ename}: {first_line} "
        f"(the executed notebook is {notebook} in {run.out_dir.name})"
    )


def _stopped(run, step, executed, interrupt):
    """The one line that says which notebook an interrupt stopped and what was kept, and the exit status."""
    how, code = interrupt_name_and_code(interrupt)
    out_dir = run.out_dir
    done = [step_id for step_id, status in run.statuses if status == "ok"]
    finished = f"steps {', '.join(done)} finished; " if done else ""
    shown = f"; {executed.relative_to(out_dir)} shows how far it got" if executed and executed.exists() else ""
    kept = f"what this run recorded stays in {out_dir / 'results.json'}"
    return f"Stopped {step.notebook} ({how}): {finished}{kept}{shown}.", code


def _record_stop(run, step, executed, interrupt, seconds):
    """Record the step that Ctrl-C or SIGTERM (`timeout`, say) cut off: by what, after how long, in which cell.

    Its status is "stopped"; the note and the `stopped` field say by what, when and where."""
    how, _ = interrupt_name_and_code(interrupt)
    cell, source = running_cell(executed)
    where = f", in cell [{cell}] ({source})" if cell else ", before its first cell ran"
    note = f"stopped by {how} after {seconds:.0f} s{where}"
    stopped = {"by": how, "seconds": round(seconds, 1), "cell": cell, "cell_source": source}
    notebook = executed.relative_to(run.out_dir).as_posix()
    try:
        append_record(run.out_dir, _failure_record(run, step, "stopped", note, notebook, stopped=stopped))
    except OutputError:  # a full disk, say: the stop still ends in its one line
        pass


def _failure_record(run, step, status, note, notebook, **extra):
    import torch

    from .models import low_precision_dtype

    dtype = low_precision_dtype(verbose=False) if step.settings.low_precision else torch.float32
    return make_record(step.id, None, run.params, dtype=dtype, status=status, note=note,
                       extra={"notebook": notebook, **extra})
