"""The course's file primitives: new names no other run has taken, atomic writes, the writable check, and one
sentence for every file error (OutputError), which says what to do.

Images and executed notebooks get names no other run has taken (`01.png`, then `01-2.png`, ...), so each record
keeps pointing at its own; a write goes to a temporary file renamed over the old one, so readers never see half.
"""

import errno
import itertools
import os
import tempfile
from pathlib import Path

# Errors that say "not here": another folder would do.
READ_ONLY_ERRNOS = (errno.EACCES, errno.EPERM, errno.EROFS)
# Errors writing a file that another folder (or more disk space) would cure.
WRITE_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOTDIR)


class OutputError(OSError):
    """A file of the results can't be written (or read); the message is one sentence that names it and what to do."""


def output_error(path, error, reading=False):
    """An OutputError, with `error`'s errno, for the OSError `error` met on `path`."""
    if error.errno in (errno.ENOSPC, errno.EDQUOT):
        advice = "free some space, or choose a folder on another disk, and run again"
    elif error.errno in READ_ONLY_ERRNOS:
        advice = "copy the folder somewhere you can read it" if reading else (
            "choose a folder you can write (--out, or OUT_DIR in a notebook)"
        )
    elif error.errno in (errno.ENOTDIR, errno.EEXIST):
        advice = "a file stands where a folder is needed: choose another folder"
    else:
        advice = "check that folder and run again"
    problem = OutputError(f"Can't {'read' if reading else 'write'} {path} ({error.strerror or error}): {advice}.")
    problem.errno = error.errno
    return problem


def new_file(folder, stem, suffix):
    """Create `<folder>/<stem><suffix>` empty, or `<stem>-2<suffix>`, `-3`, ... where the name is taken; its path.

    Creation is exclusive, so runs writing one folder, even at the same time, never get the same file."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for number in itertools.count(1):
        path = folder / (f"{stem}{suffix}" if number == 1 else f"{stem}-{number}{suffix}")
        try:
            os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
            return path
        except FileExistsError:
            continue


def write_atomically(path, write):
    """Call `write(file)` on a temporary file beside `path`, then rename it over `path`: readers never see half.

    A failed write leaves `path` as it was and raises OutputError."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    except OSError as error:
        raise output_error(path, error) from None
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; a shared results folder must stay readable
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as error:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(error, OSError) and not isinstance(error, OutputError):
            raise output_error(path, error) from None
        raise


def write_new(folder, stem, suffix, write):
    """`write` a new file named as `new_file` says, atomically; returns its path. A failure leaves no file."""
    try:
        path = new_file(folder, stem, suffix)
    except OSError as error:
        raise output_error(Path(folder), error) from None
    try:
        write_atomically(path, write)
    except BaseException:
        path.unlink(missing_ok=True)
        raise
    return path


def within(path, folder):
    return path == folder or folder in path.parents


def check_writable(folder):
    """Make `folder` if needed and write a file in it; OutputError, in one sentence, where that fails."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as error:
        raise output_error(folder, error) from None


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
