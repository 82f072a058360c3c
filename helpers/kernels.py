"""The runner's kernels and signals: each notebook's kernel started over socket files in the run's own temporary
folder, stopped with its children, Ctrl-C and SIGTERM turned into one interrupt where the run is, and the noise of a
dying kernel dropped once the user stopped the run.

The run's folder (kernels' connection files and sockets, each notebook's Inductor cache) is removed when the run
ends, also on Ctrl-C and SIGTERM; a run that was killed outright leaves it behind, and the next run removes it.
"""

import fcntl
import logging
import os
import shutil
import signal
import tempfile
import threading
import uuid
from contextlib import contextmanager
from pathlib import Path

from .files import OutputError
from .quiet import DropMatching

RUN_FOLDER_PREFIX = "sdxl-fast-run-"


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where the run is, so that it ends as Ctrl-C does: kernel stopped, temporary files removed."""


def interrupt_name_and_code(interrupt):
    """("SIGTERM", 143) or ("Ctrl-C", 130): what stopped the run, and the exit status a shell expects for it."""
    return ("SIGTERM", 128 + signal.SIGTERM) if isinstance(interrupt, Terminated) else ("Ctrl-C", 128 + signal.SIGINT)


def ipc_kernel_manager(folder, kernels):
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


# Set once Ctrl-C or SIGTERM has stopped the run: from then on the notebook's kernel is expected to die.
stopped_by_user = threading.Event()
# What papermill and asyncio log when the kernel of an interrupted notebook is shut down under a cell still waiting
# for it: noise after the run's own one line, dropped only once the user stopped the run.
AFTER_STOP_NOISE = (("papermill", "Kernel died while waiting for execute reply"),
                    ("asyncio", "Task exception was never retrieved"),
                    ("asyncio", "Task was destroyed but it is pending"))


class DropAfterStop(DropMatching):
    def filter(self, record):
        return not stopped_by_user.is_set() or super().filter(record)


for _logger_name, _text in AFTER_STOP_NOISE:
    logging.getLogger(_logger_name).addFilter(DropAfterStop(_text))


@contextmanager
def sigterm_as_interrupt():
    """Within the block, SIGTERM raises Terminated where the run is, instead of ending the process on the spot, and
    Ctrl-C raises KeyboardInterrupt as always; both first mark the run as stopped by the user."""

    def stop(signum, frame):
        stopped_by_user.set()
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
def run_folder():
    """A new private folder for this run's temporary files, removed at the end.

    A lock held on it while the run lives tells a later run whether it was abandoned: a killed process's lock is
    released by the system."""
    remove_abandoned_run_folders()
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


def remove_abandoned_run_folders():
    """Remove the run folders of runs that were killed: theirs is the only kind whose lock can be taken."""
    for folder in Path(tempfile.gettempdir()).glob(RUN_FOLDER_PREFIX + "*"):
        try:
            with open(folder / "lock") as lock:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                shutil.rmtree(folder, ignore_errors=True)
        except OSError:  # a live run's, another user's, still being set up, or removed by someone else just now
            continue


def stop_kernels(kernels):
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


def kernel_said(folder):
    """'; the kernel's last words: ...' from the newest kernel log in `folder`, or '' where it logged nothing."""
    logs = sorted(folder.glob("kernel-*.log"), key=lambda path: path.stat().st_mtime)
    lines = logs[-1].read_text(errors="replace").strip().splitlines() if logs else []
    return f"; the kernel's last words: {lines[-1].strip()}" if lines else ""


def running_cell(executed):
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
