"""One record per measured step, kept in `<out>/results.json`.

Writes are atomic (a temporary file renamed over the old one) and serialised with a lock file, so two
runs writing the same folder lose nothing. A results file that can't be read is moved aside, never
overwritten.
"""

import datetime
import fcntl
import json
import os
import platform
import tempfile
from contextlib import contextmanager
from importlib import metadata
from pathlib import Path

import torch

RESULTS_FILE = "results.json"
VERSIONED_PACKAGES = ("torch", "diffusers", "torchao", "transformers")


def package_versions():
    versions = {}
    for name in VERSIONED_PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    versions["python"] = platform.python_version()
    versions["cuda"] = torch.version.cuda
    return versions


def precision_settings():
    """The settings that decide what "fp32" means on this machine: TF32 makes fp32 matmuls faster and less exact."""
    return {
        "float32_matmul_precision": torch.get_float32_matmul_precision(),
        "cuda_matmul_allow_tf32": torch.backends.cuda.matmul.allow_tf32,
        "cudnn_allow_tf32": torch.backends.cudnn.allow_tf32,
    }


def device_name(device=None):
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU {platform.machine()} ({torch.get_num_threads()} threads)"


def driver_version():
    if not torch.cuda.is_available():
        return None
    try:
        import subprocess

        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True, text=True, timeout=10,
        )
        return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else None
    except (OSError, subprocess.SubprocessError):
        return None


def make_record(step, measurement, params, *, dtype, image_file=None, quality=None, status="ok", note=None, extra=None):
    """A plain-JSON record of one step's measurement and of everything needed to reproduce and compare it."""
    from .images import image_size
    from .models import resolve_model
    from .steps import get_step

    step = get_step(step)
    height, width = image_size(params)
    record = {
        "step": step.id,
        "title": step.title,
        "status": status,
        "model": resolve_model(params.model, verbose=False),
        "height": height,
        "width": width,
        "median_s": None,
        "samples_s": [],
        "first_call_s": None,
        "peak_memory_gb": None,
        "device": device_name(),
        "driver": driver_version(),
        "dtype": str(dtype).removeprefix("torch."),
        "precision": precision_settings(),
        "versions": package_versions(),
        "params": params.to_dict(),
        "image": image_file,
        "quality": quality,
        "note": note,
        "time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    if measurement is not None:
        record.update(measurement.to_dict())
    record.update(extra or {})
    return record


@contextmanager
def _locked(out_dir):
    out_dir.mkdir(parents=True, exist_ok=True)
    with open(out_dir / (RESULTS_FILE + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _read(path):
    """The records in `path`; a file that isn't a JSON list is moved aside with a warning and counts as empty."""
    if not path.exists():
        return []
    try:
        records = json.loads(path.read_text())
        if not isinstance(records, list) or not all(isinstance(r, dict) for r in records):
            raise ValueError("not a list of records")
        return records
    except (ValueError, UnicodeDecodeError) as error:
        stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S-%f")
        aside = path.with_name(f"{path.name}.corrupt-{stamp}")
        path.rename(aside)
        print(f"Warning: {path.name} could not be read ({error}); kept it as {aside.name} and started a new one.")
        return []


def write_atomically(path, write):
    """Call `write(file)` on a temporary file beside `path`, then rename it over `path`: readers never see half."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; a shared results folder must stay readable
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _write_atomically(path, records):
    write_atomically(path, lambda f: f.write(json.dumps(records, indent=1).encode()))


def append_record(out_dir, record):
    """Add `record` to `<out_dir>/results.json`; returns the record."""
    out_dir = Path(out_dir)
    path = out_dir / RESULTS_FILE
    with _locked(out_dir):
        records = _read(path)
        records.append(record)
        _write_atomically(path, records)
    return record


def load_records(out_dir):
    """Every record in `<out_dir>/results.json`, oldest first ([] where there is none)."""
    out_dir = Path(out_dir)
    if not (out_dir / RESULTS_FILE).exists():
        return []
    with _locked(out_dir):
        return _read(out_dir / RESULTS_FILE)


def latest_records(records):
    """The newest record of each (device, model, step), in step order, devices in order of first appearance."""
    from .steps import STEP_IDS

    latest = {}
    for record in records:
        latest[(record["device"], record["model"], record["step"])] = record
    devices = list(dict.fromkeys((r["device"], r["model"]) for r in records))
    return [
        latest[(device, model, step)]
        for device, model in devices
        for step in STEP_IDS
        if (device, model, step) in latest
    ]
