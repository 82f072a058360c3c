"""Run the notebooks headless, in order, with the same parameters: the course's main job.

Each notebook runs in its own kernel with papermill, which injects the parameters after the cell tagged
`parameters`. The run's folder gets the executed notebooks, the images, results.json and the chart. The
kernels run inside that folder with OUT_DIR=".", so nothing written there holds an absolute path.
"""

import os
import tempfile
from pathlib import Path

from .models import check_model, download, resolve_model
from .params import Params, cell_names
from .results import append_record, make_record
from .steps import STEPS, get_step

NOTEBOOKS_DIR = Path(__file__).resolve().parent.parent / "notebooks"
OUT_OF_MEMORY_ERRORS = ("OutOfMemoryError", "OutOfMemory")
OOM_ADVICE = (
    "out of GPU memory: use a smaller --height/--width, free other GPU work, or use a GPU with more memory "
    "(SDXL's fp32 weights alone are 14 GB)"
)


def _ipc_kernel_manager():
    from jupyter_client.manager import AsyncKernelManager
    from traitlets import default

    class IpcKernelManager(AsyncKernelManager):
        """Kernels on local socket files rather than TCP ports: nothing reachable from the network (and so no
        warning from each kernel about unencrypted TCP)."""

        @default("transport")
        def _transport_default(self):
            return "ipc"

    return IpcKernelManager


class RunFailed(RuntimeError):
    """A notebook failed; the message names the notebook, the cell and the error."""


def is_out_of_memory(error_name, message):
    """True for an out-of-memory error, also when Inductor wraps one raised while it compiled or autotuned."""
    if error_name in OUT_OF_MEMORY_ERRORS:
        return True
    return error_name == "InductorError" and "out of memory" in message.lower()


def select_steps(only):
    """The steps to run, in course order: all of them, or those named in `only` ("01,03" or "4-7")."""
    if not only:
        return list(STEPS)
    wanted = set()
    for part in str(only).split(","):
        if "-" in part.strip("-"):
            first, last = (get_step(p).id for p in part.split("-", 1))
            wanted |= {s.id for s in STEPS if first <= s.id <= last}
        else:
            wanted.add(get_step(part).id)
    return [step for step in STEPS if step.id in wanted]


def run_series(params, out_dir, only=None, progress=True, inductor_cache=None):
    """Execute the selected notebooks in order into `out_dir`; returns the list of (step, status).

    Each notebook gets a fresh Inductor cache, so every first call is a cold compile, unless `inductor_cache`
    names a folder that all of them share: faster (kernels compiled once are reused), but then the first calls
    of later notebooks are no longer cold, and the compile-time comparison of notebook 07 says less.
    """
    from .chart import chart_from_dir

    out_dir = Path(out_dir).resolve()
    steps = select_steps(only)
    model = check_model(resolve_model(params.model))  # prints which model "auto" chose, and why
    if params.model != "auto":
        print(f"Model: {model}.")
    download(model)  # once, with a progress bar, before notebook 01: every notebook then loads from disk
    (out_dir / "notebooks").mkdir(parents=True, exist_ok=True)
    # The notebooks read the results of earlier ones (the baseline image, step 06's compile time) from ".".
    params = Params(**{**params.to_dict(), "model": model, "out_dir": "."})
    statuses = []
    with tempfile.TemporaryDirectory(prefix="inductor-") as fresh:
        caches = {step.id: Path(inductor_cache or Path(fresh) / step.id).resolve() for step in steps}
        _run_notebooks(steps, params, out_dir, caches, progress, statuses)
    if any(status == "ok" for _, status in statuses):
        chart = chart_from_dir(out_dir)
        print(f"Chart: {chart}")
    return statuses


def _run_notebooks(steps, params, out_dir, caches, progress, statuses):
    """Execute each notebook in its own kernel, with the Inductor cache folder `caches` gives its step."""
    import papermill

    IpcKernelManager = _ipc_kernel_manager()
    for step in steps:
        print(f"== {step.id} {step.title} ({step.notebook})", flush=True)
        try:
            with _environment({"TORCHINDUCTOR_CACHE_DIR": str(caches[step.id])}):
                papermill.execute_notebook(
                    NOTEBOOKS_DIR / step.notebook,
                    out_dir / "notebooks" / step.notebook,
                    parameters=cell_names(params),
                    cwd=out_dir,
                    progress_bar=progress,
                    kernel_name="python3",
                    kernel_manager_class=IpcKernelManager,
                )
            _relative_paths(out_dir / "notebooks" / step.notebook)
            statuses.append((step.id, "ok"))
        except papermill.PapermillExecutionError as error:
            _relative_paths(out_dir / "notebooks" / step.notebook)
            if is_out_of_memory(error.ename, error.evalue):
                print(f"{step.id}: {OOM_ADVICE}; going on with the next notebook.")
                append_record(out_dir, _failure_record(step, params, "out_of_memory", OOM_ADVICE))
                statuses.append((step.id, "out_of_memory"))
                continue
            if error.ename == "StepUnavailable":
                print(f"{step.id}: skipped: {error.evalue}")
                append_record(out_dir, _failure_record(step, params, "skipped", error.evalue))
                statuses.append((step.id, "skipped"))
                continue
            raise RunFailed(
                f"{step.notebook} failed in cell [{error.exec_count or error.cell_index}]: {error.ename}: "
                f"{error.evalue.strip().splitlines()[0] if error.evalue.strip() else ''} "
                f"(the executed notebook is {Path('notebooks') / step.notebook} in {out_dir.name})"
            ) from None


def _relative_paths(executed):
    """papermill records where it read and wrote the notebook; keep those paths free of this machine's folders."""
    import nbformat

    notebook = nbformat.read(executed, as_version=4)
    paths = notebook.metadata.get("papermill", {})
    for key in ("input_path", "output_path"):
        if paths.get(key):
            paths[key] = f"notebooks/{Path(paths[key]).name}"
    nbformat.write(notebook, executed)


def _failure_record(step, params, status, note):
    import torch

    from .models import low_precision_dtype

    dtype = low_precision_dtype(verbose=False) if step.settings.low_precision else torch.float32
    return make_record(step.id, None, params, dtype=dtype, status=status, note=note)


class _environment:
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
