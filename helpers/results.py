"""One record per measured step, kept in `<out>/results.json`.

Writes are atomic and serialised with a lock file, so two runs writing the same folder lose nothing; reading takes
no lock, so a folder that can only be read can still be charted. A results file cut off mid-write is never
overwritten: reading uses its complete records and leaves it alone; the next write keeps a copy of it first.
"""

import datetime
import fcntl
import json
import math
import os
import re
from contextlib import contextmanager
from pathlib import Path

from .files import OutputError, output_error, write_atomically, write_new
from .sentences import measurement_sentence

RESULTS_FILE = "results.json"
STATUSES = ("ok", "out_of_memory", "failed", "stopped", "skipped")
# The runner names each kernel's executed notebook here, so that the records it makes point at it.
EXECUTED_NOTEBOOK_ENV = "SDXL_FAST_NOTEBOOK"
_BETWEEN_RECORDS = re.compile(r"[\s,]*")


def base_record(params):
    """What every record says, whatever it measured: where (device, driver, versions), with what parameters, from
    which executed notebook (where the runner made one), and when. The machine's facts are read through torch, which
    this module imports only here: the runner's own process, which makes a record only for a step that failed, starts
    without it."""
    from .machine import device_name, driver_version, package_versions

    return {
        "device": device_name(),
        "driver": driver_version(),
        "versions": package_versions(),
        "params": params.to_dict(),
        "notebook": os.environ.get(EXECUTED_NOTEBOOK_ENV),
        "time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def make_record(step, measurement, params, *, dtype, image_file=None, quality=None, status="ok", note=None, extra=None,
                baseline_file=None):
    """A plain-JSON record of one step's measurement and of everything needed to reproduce and compare it.

    It names its own image, the baseline image its quality was scored against, and the executed notebook that made
    it (where the runner made one)."""
    from .images import image_size
    from .machine import precision_settings
    from .sources import resolve_model
    from .steps import get_step

    if status not in STATUSES:
        raise ValueError(f"status must be one of {', '.join(STATUSES)}, got {status!r}.")
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
        "dtype": str(dtype).removeprefix("torch."),
        "precision": precision_settings(),
        "image": image_file,
        "baseline_image": baseline_file,
        "quality": quality,
        "note": note,
        **base_record(params),
    }
    if measurement is not None:
        record.update(measurement.to_dict())
    record.update(extra or {})
    return record


def _write_atomically(path, records):
    write_atomically(path, lambda f: f.write(json.dumps(records, indent=1).encode()))


@contextmanager
def _locked(out_dir):
    out_dir.mkdir(parents=True, exist_ok=True)
    with open(out_dir / (RESULTS_FILE + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def read_records_file(path):
    """(records, None) from `path`; ([], None) where there is none; (its complete records, what is wrong with it)
    where it is damaged: cut off mid-write, or not a JSON list."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return [], None
    except OSError as error:
        raise output_error(path, error, reading=True) from None
    try:
        records = json.loads(data)
    except ValueError:  # cut off mid-write, or bytes that aren't UTF-8 text
        records = _complete_records(data.decode("utf-8", errors="replace"))
        return records, f"is cut off or damaged after {len(records)} complete record(s)"
    if not isinstance(records, list):
        return [], "is not a JSON list of records"
    return records, None


def _complete_records(text):
    """The records before the point where `text`, a JSON list, stops being valid."""
    decoder = json.JSONDecoder()
    records, index = [], _BETWEEN_RECORDS.match(text).end()
    if not text.startswith("[", index):
        return []
    index += 1
    while True:
        index = _BETWEEN_RECORDS.match(text, index).end()
        try:
            record, index = decoder.raw_decode(text, index)
        except ValueError:
            return records
        records.append(record)


def append_record(out_dir, record):
    """Add `record` to `<out_dir>/results.json`; returns the record.

    A damaged results file is kept, as `results.json.corrupt-<time>`, before its complete records and the new one
    are written in its place."""
    out_dir = Path(out_dir)
    path = out_dir / RESULTS_FILE
    try:
        with _locked(out_dir):
            records, damage = read_records_file(path)
            if damage:
                stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
                aside = write_new(out_dir, f"{RESULTS_FILE}.corrupt-{stamp}", "", lambda f: f.write(path.read_bytes()))
                print(f"Warning: {path} {damage}; kept it as {aside.name}, and {path.name} now holds those records "
                      "and the new one.")
            _write_atomically(path, [*records, record])
    except OutputError:
        raise
    except OSError as error:
        raise output_error(path, error) from None
    return record


def load_records(out_dir, quiet=False, problem=None):
    """The usable records of `<out_dir>/results.json`, oldest first ([] where there is none); writes nothing.

    Each record that `problem` (`record_problem` for the ladder's step records) finds fault with is left out with a
    line that says which and why; a file cut off mid-write gives its complete records, and a line says so (unless
    `quiet`). Every kind of record is read here: steps, cold starts (`coldstart.start_problem`) and batches."""
    path = Path(out_dir) / RESULTS_FILE
    records, damage = read_records_file(path)
    if damage and not quiet:
        print(f"Warning: {path} {damage}: using those, and leaving the file as it is.")
    return usable_records(records, path, quiet, problem)


def usable_records(records, where="these records", quiet=False, problem=None):
    """`records` without those `problem` (by default `record_problem`) finds fault with; each one left out is named
    in a line."""
    usable = []
    for number, record in enumerate(records, 1):
        found = (problem or record_problem)(record)
        if found is None:
            usable.append(record)
        elif not quiet:
            step = f" (step {record.get('step')})" if isinstance(record, dict) and "step" in record else ""
            print(f"Skipped record {number}{step} of {where}: {found}.")
    return usable


def record_problem(record):
    """Why the chart and the baseline lookup can't use `record` (a hand-edited one, say), or None."""
    from .steps import STEP_IDS

    if not isinstance(record, dict):
        return f"it is {shown(record)}, not a JSON object"
    if record.get("step") not in STEP_IDS:
        return f"step {shown(record.get('step'))} is not one of the course's steps ({', '.join(STEP_IDS)})"
    if record.get("status") not in STATUSES:
        return f"status {shown(record.get('status'))} is not one of {', '.join(STATUSES)}"
    for name in ("device", "model"):
        if not isinstance(record.get(name), str) or not record[name].strip():
            return f"{name} is {shown(record.get(name))}, not a name"
    if not isinstance(record.get("params"), dict):
        return f"params is {shown(record.get('params'))}, not a JSON object"
    for name in ("height", "width"):
        value = record.get(name)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            return f"{name} is {shown(value)}, not a positive whole number"
    return _numbers_problem(record)


def _numbers_problem(record):
    """What is wrong with the measured numbers of `record`, or None."""
    measured = record["status"] == "ok"
    checks = [("median_s", True, measured), ("first_call_s", True, False), ("iqr_s", False, False),
              ("peak_memory_gb", False, False), ("peak_fraction", False, False)]
    for name, positive, required in checks:
        value = record.get(name)
        if (value is not None or required) and not is_number(value, positive):
            return f"{name} is {shown(value)}, not {'a positive number' if positive else 'a number of 0 or more'}"
    samples = record.get("samples_s")
    if samples is not None and not (isinstance(samples, list) and all(is_number(s, False) for s in samples)):
        return f"samples_s is {shown(samples)}, not a list of seconds"
    quality = record.get("quality")
    if quality is None:
        return None
    if not isinstance(quality, dict) or not is_number(quality.get("ssim"), False):
        return f"quality is {shown(quality)}, not an object with an ssim number"
    if quality.get("psnr_db") is not None and not is_number(quality["psnr_db"], False):
        return f"quality's psnr_db is {shown(quality['psnr_db'])}, not a number"
    return None


def is_number(value, positive):
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
        return False
    return value > 0 if positive else value >= 0


def shown(value):
    """`value` as it reads in the JSON file, cut short."""
    try:
        text = json.dumps(value)
    except (TypeError, ValueError):
        text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


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


def summary_of(out_dir, notebook):
    """The runner's line for an executed step of the ladder, from the last record it wrote; None if it measured
    nothing."""
    records = [r for r in load_records(out_dir, quiet=True) if r.get("notebook") == notebook]
    if not records or not records[-1].get("median_s"):
        return None
    record = records[-1]
    quality = record.get("quality") or {}
    ssim = f", SSIM {quality['ssim']:.3f} against 01" if quality.get("ssim") is not None else ""
    return measurement_sentence(record["median_s"], record["iqr_s"], device=record["device"],
                                first_call_s=record["first_call_s"]) + ssim
