"""Check every GPU code path of the course in one short run and end with a table of what each check found.

    python scripts/gpu_check.py --out DIR [--budget-s 480]

On a machine with an NVIDIA GPU it checks, with `sdxl-random` (full-size SDXL, random weights) at a small size:
the test suite (without the notebook series and the browser); all seven notebooks headless, with each step's
dtype, compile mode, first call and attention kernel; the int8 matmul path (`torch._int_mm`); regional compilation
with max-autotune (CUDA graphs per block) against max-autotune-no-cudagraphs; the flags panel's rebuild; freeing a
pipeline; and the refusal to load beside another process that holds the GPU's memory.
Without a GPU it runs the same checks on the CPU with the tiny model (the test suite excepted: CI runs it), and says
which ones only a GPU can answer.

DIR gets at most 8 files: check.txt (the table), checks.json, pytest.txt, results.json, latency_per_step.png and
run.txt (the runner's console). `bash scripts/gpu_check.sh` wraps this with an optional folder of wheels.
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
import weakref
from pathlib import Path

import torch

import helpers
from helpers.results import device_name, package_versions

ROOT = Path(__file__).resolve().parent.parent
CUDA = torch.cuda.is_available()


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, help="folder for the table and what the checks wrote")
    parser.add_argument("--budget-s", type=float, default=480, help="stop starting new checks after this (480)")
    parser.add_argument("--model", default="sdxl-random" if CUDA else "tiny")
    parser.add_argument("--size", type=int, default=512 if CUDA else 96, help="image height and width")
    parser.add_argument("--steps", type=int, default=4 if CUDA else 1)
    parser.add_argument("--notebooks", default="01-07", help="the notebooks to run headless, as the runner's --only")
    parser.add_argument("--pytest", action=argparse.BooleanOptionalAction, default=CUDA,
                        help="run the test suite first (default: on a GPU only; CI runs it on the CPU)")
    return parser.parse_args(argv)


class Checks:
    """Runs each check with what is left of the budget, and keeps one row per check: status, seconds, findings."""

    def __init__(self, out, budget_s):
        self.out, self.deadline, self.rows = out, time.monotonic() + budget_s, []

    def left_s(self):
        return self.deadline - time.monotonic()

    def run(self, name, check, *args, needs_s=30):
        if self.left_s() < needs_s:
            self.rows.append({"check": name, "status": "not run", "seconds": 0, "found": "out of time"})
            return None
        print(f"== {name} ({self.left_s():.0f} s left)", flush=True)
        start = time.monotonic()
        try:
            found = check(*args)
            status = "ok"
        except Exception as error:  # a check that breaks is a finding: record it and go on to the next
            traceback.print_exc()
            found, status = f"{type(error).__name__}: {str(error).strip()[:300]}", "FAILED"
        self.rows.append({"check": name, "status": status, "seconds": round(time.monotonic() - start, 1),
                          "found": found})
        print(f"   {status}: {found}", flush=True)
        return found

    def table(self):
        lines = [f"{'check':<46}{'status':<9}{'seconds':>8}  found"]
        for row in self.rows:
            found = row["found"] if isinstance(row["found"], str) else json.dumps(row["found"], default=str)
            lines.append(f"{row['check']:<46}{row['status']:<9}{row['seconds']:>8}  {found}")
        return "\n".join(lines)


def run_logged(command, log, timeout_s):
    """Run `command` from the repository's root with its console kept in `log`; a timeout keeps what it printed."""
    try:
        done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired as expired:
        printed = [part.decode(errors="replace") if isinstance(part, bytes) else part or ""
                   for part in (expired.stdout, expired.stderr)]
        log.write_text("".join(printed)[-250_000:])
        raise RuntimeError(f"stopped after {timeout_s:.0f} s ({log.name} has what it printed)") from None
    log.write_text(done.stdout[-200_000:] + done.stderr[-50_000:])
    return done


def environment():
    found = {"device": device_name(), "versions": package_versions()}
    if CUDA:
        found["matmul_autotuning"] = helpers.matmul_autotuning("cuda")
        found["bf16_matmul_tflops"] = round(helpers.flops.measure_matmul_peak(), 1)
        found["datasheet_peak"] = helpers.flops.peak_tflops(device_name())
    return found


def test_suite(out, timeout_s):
    """The tests, on this machine's device; the notebook series and the browser are checked elsewhere."""
    command = [sys.executable, "-m", "pytest", "-q", "-x", "-m", "not notebooks and not browser"]
    done = run_logged(command, out / "pytest.txt", timeout_s)
    summary = (done.stdout.strip().splitlines() or ["no output"])[-1]
    if done.returncode != 0:
        raise RuntimeError(f"pytest exit {done.returncode}: {summary}")
    return summary


def notebooks(out, args, timeout_s):
    """All seven notebooks headless, one shared Inductor cache; per step: status, dtype, compile, first call."""
    run = Path(tempfile.mkdtemp(prefix="gpu-check-run-"))
    cache = Path(tempfile.mkdtemp(prefix="gpu-check-inductor-"))
    command = [
        sys.executable, "-m", "helpers", "run", "--model", args.model, "--out", str(run), "--steps", str(args.steps),
        "--height", str(args.size), "--width", str(args.size), "--warmup", "0", "--runs", "2",
        "--compile-mode", "default", "--inductor-cache", str(cache), "--only", args.notebooks, "--no-progress",
    ]
    try:
        done = run_logged(command, out / "run.txt", timeout_s)
        for name in ("results.json", "latency_per_step.png"):
            if (run / name).exists():
                shutil.copy(run / name, out / name)
        records = json.loads((run / "results.json").read_text()) if (run / "results.json").exists() else []
    finally:
        shutil.rmtree(run, ignore_errors=True)
        shutil.rmtree(cache, ignore_errors=True)
    steps = {
        r["step"]: {
            "status": r["status"], "dtype": r["dtype"],
            "compile": r["params"]["compile_mode"] if r["step"] >= "04" else "eager",
            "first_call_s": r["first_call_s"] and round(r["first_call_s"], 1),
            "median_s": r["median_s"] and round(r["median_s"], 3),
        }
        for r in records
    }
    if done.returncode != 0 or not steps:
        raise RuntimeError(f"runner exit {done.returncode}, {len(steps)} records (run.txt has its console)")
    return steps


def int8_path():
    """torchao's dynamic int8 on one SDXL-sized linear layer: which matmul ran, eager and compiled, and how close."""
    helpers.require_torchao()
    from torchao.quantization import Int8DynamicActivationInt8WeightConfig, quantize_

    device = "cuda" if CUDA else "cpu"
    dtype = helpers.low_precision_dtype(device, verbose=False)
    layer = torch.nn.Linear(1280, 1280, device=device, dtype=dtype)
    inputs = torch.randn(2, 1024, 1280, device=device, dtype=dtype)  # batch 2 (guidance), 32x32 tokens
    with torch.no_grad():
        reference = layer(inputs)
        quantize_(layer, Int8DynamicActivationInt8WeightConfig(set_inductor_config=False))
        found = {}
        for label, run in (("eager", layer), ("compiled", torch.compile(layer, fullgraph=True))):
            run(inputs)
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]
                                        + ([torch.profiler.ProfilerActivity.CUDA] if CUDA else [])) as prof:
                output = run(inputs)
            names = {event.key for event in prof.key_averages()}
            error = ((output - reference).abs().max() / reference.abs().max()).item()
            found[label] = {"int_mm": sorted(n for n in names if "int_mm" in n)[:3], "relative_error": round(error, 4)}
    if CUDA and not found["eager"]["int_mm"]:
        raise RuntimeError(f"no _int_mm in the eager int8 layer: {found}")
    return found


def regional(args, mode):
    """Step 07's pipeline compiled regionally in `mode`: compile time, steady latency, attention kernel, memory."""
    params = helpers.Params(model=args.model, steps=args.steps, height=args.size, width=args.size)
    pipe = helpers.build(args.model, through="06", compile=False, verbose=False)
    helpers.compile_regions(pipe, mode=mode)
    measurement = helpers.benchmark(lambda: helpers.generate(pipe, params), warmup=1, runs=3, progress=False)
    found = {
        "first_call_s": round(measurement.first_call_s, 1),
        "median_s": round(measurement.median_s, 3),
        "iqr_s": round(measurement.iqr_s, 3),
        "attention": helpers.attention_kernels(pipe, params) or "none",  # read from ops and GPU kernel names
    }
    if CUDA:
        found["peak_gb"] = {"steady": round(measurement.peak_memory_gb, 2),
                            "first_call": round(measurement.first_call_peak_memory_gb, 2)}
    pipe = measurement = None
    helpers.free_memory()
    return found


def flags_panel_rebuild(args):
    """The flags panel builds a compiled pipeline, then an eager one: the first must be gone, its memory with it."""
    params = helpers.Params(model=args.model, steps=args.steps, height=args.size, width=args.size, warmup=0, runs=1)
    panel = helpers.flags_panel(params)
    panel.compile.value, panel.compile_mode.value = "regional", "default"
    panel.button.click()
    if panel.message.value:
        raise RuntimeError(panel.message.value)
    first = weakref.ref(panel.pipe)
    held_gb = torch.cuda.memory_allocated() / 1e9 if CUDA else None
    panel.compile.value = "off"
    panel.button.click()
    found = {"previous_pipeline_freed": first() is None}
    if CUDA:
        after_gb = torch.cuda.memory_allocated() / 1e9
        found["allocated_gb"] = {"compiled": round(held_gb, 2), "after_rebuild": round(after_gb, 2)}
    panel.release_pipeline()
    helpers.free_memory()
    found["pipelines_left"] = len(helpers.live_pipelines())
    if CUDA:
        found["allocated_gb"]["after_release"] = round(torch.cuda.memory_allocated() / 1e9, 2)
    if not found["previous_pipeline_freed"] or found["pipelines_left"]:
        raise RuntimeError(f"a pipeline outlived its panel: {found}")
    return found


HOLD_MEMORY = """
import sys, time, torch
free, _ = torch.cuda.mem_get_info()
block = torch.empty(int(free - float(sys.argv[1]) * 1e9), dtype=torch.uint8, device="cuda")
print("holding", flush=True)
time.sleep(120)
"""


def busy_gpu(args):
    """Another process holds nearly all of the GPU: loading must stop with one sentence naming it, not crash later."""
    if not CUDA:
        return "n/a without a GPU"
    holder = subprocess.Popen([sys.executable, "-c", HOLD_MEMORY, "2"], stdout=subprocess.PIPE, text=True)
    try:
        if holder.stdout.readline().strip() != "holding":
            raise RuntimeError("the process meant to hold the GPU's memory did not start")
        try:
            helpers.load_pipeline(args.model, dtype=helpers.low_precision_dtype(verbose=False), verbose=False)
        except helpers.models.GpuMemoryBusy as error:
            message = str(error)
            if str(holder.pid) not in message or "\n" in message:
                raise RuntimeError(f"the refusal does not name pid {holder.pid} in one line: {message}") from None
            return message
        raise RuntimeError("loaded beside a process holding all but 2 GB of the GPU")
    finally:
        holder.kill()
        holder.wait()
        helpers.free_memory()


def main(argv=None):
    args = parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    checks = Checks(out, args.budget_s)
    checks.run("environment", environment, needs_s=0)
    if args.pytest:
        checks.run("pytest (no series, no browser)", lambda: test_suite(out, max(60, checks.left_s() * 0.3)))
    checks.run("seven notebooks headless", lambda: notebooks(out, args, max(120, checks.left_s() * 0.5)), needs_s=120)
    checks.run("int8 matmul path", int8_path)
    for mode in ("max-autotune", "max-autotune-no-cudagraphs"):
        checks.run(f"regional compile, {mode}", regional, args, mode, needs_s=60)
    checks.run("flags panel rebuild frees", flags_panel_rebuild, args, needs_s=60)
    checks.run("load beside a busy GPU", busy_gpu, args)
    table = checks.table()
    header = (f"GPU check on {device_name()}: {args.model} at {args.size}x{args.size}, {args.steps} steps, "
              f"notebooks {args.notebooks}")
    (out / "check.txt").write_text(header + "\n" + table + "\n")
    (out / "checks.json").write_text(json.dumps({"header": header, "rows": checks.rows}, indent=1, default=str))
    print(header, table, sep="\n")
    return 0 if all(row["status"] != "FAILED" for row in checks.rows) else 1


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
