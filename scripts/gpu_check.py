"""Check the course's GPU code paths in a run of a few minutes and end with a table of what each check found.

    python scripts/gpu_check.py --out DIR [--within-s S] [--pytest]

Every check has a time limit of its own; the plan, printed first, gives them, and they add up to the budget (the
plan's own sum, or --budget-s, scaled down to --within-s). A check that reaches its limit gets SIGTERM, then SIGKILL
after a grace period (both within the limit), and is marked "timed out after N s"; the next check then starts. The
checks run in child processes: one worker runs the in-process checks in turn (after a timeout a new worker takes
the rest, its start-up counted in the next check's limit), the course's runner the notebooks, pytest the tests.

The plan on an H100/H200 from an empty Inductor cache, with `sdxl-random` (full-size SDXL, random weights) at
512x512 and 4 steps. The limits are estimates, with room, not yet measured there:

    check                                        limit  what it does, and why it fits
    environment                                    30   the worker's imports (the first after installing wheels:
                                                        bytecode compiled too), CUDA's start, 53 8192^3 matmuls
    int8 matmul path                               25   one 1280x1280 int8 linear layer, eager and compiled
    flags panel rebuild frees                      25   the tiny model compiled regionally under CUDA graphs
                                                        (reduce-overhead: no matmul autotuning), rebuilt eager
    load beside a busy GPU                         15   a second process fills the GPU; loading is refused
    regional blocks, max-autotune                 110   the check's one cold compile of SDXL code: the blocks at
                                                        their two widths (640 and 1280 channels), autotuned, with
                                                        CUDA graphs; 5 images of 4 steps, 2 of 1 for attention
    regional blocks, max-autotune-no-cudagraphs    35   the same graphs again: kernels and autotuning from the cache
    notebooks 01-03 headless                       90   3 kernels of ~25 s: start, imports, SDXL initialised on the
                                                        GPU, 3 images of 4 steps, the record; the runner's start
    total                                         330   gpu_check.sh passes what is left of its 6 minutes

The regional rows compile the UNet's repeated blocks of step 05's pipeline (bf16, SDPA, fused QKV; int8 has a row
of its own) as step 07 does; the VAE decoder stays eager: a whole-graph compile like step 04's, it would take
longer than the questions need. The first answers whether pytorch/pytorch#152887 (a CUDA-graph output
"overwritten by a subsequent run" when blocks compiled one by one run in sequence) hits SDXL with this torch: its
error, or the fallback to max-autotune-no-cudagraphs that `helpers.generate` reports, is the finding. The
notebooks after 03 and the full size, where one compile takes minutes, are scripts/gpu_reference.sh's.
`--pytest` adds the test suite (without the notebook series and the browser, which other rows and CI cover), with
a limit of its own; it does not fit beside the rest in 6 minutes: give gpu_check.sh GPU_CHECK_S=660 for it.

The regional rows come last among the worker's checks: a timeout in their long compile makes only the row after it
wait for a new worker.
Without a GPU the checks run on the CPU with the tiny model, in at most 3 minutes on 2 cores (limits: environment
20, the flags panel, eager, 50, notebook 01 100). Each new process there imports for 20 to 35 s when others share
the cores, so the int8 and regional checks run in tests/test_scripts.py instead, in the test's process (the regional
one without its compile: the test suite's notebook series compiles regions on the CPU in notebook 07); the rows only
a GPU can answer say "n/a". The children run on one thread each (OMP_NUM_THREADS=1 unless set): they check that each
path runs, not its speed, and threads competing with other work make a small machine several times slower.

DIR gets at most 6 files: check.txt (the table), checks.json, results.json, latency_per_step.png, run.txt (the
runner's console) and pytest.txt. `bash scripts/gpu_check.sh` wraps this with an optional folder of wheels.
"""

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
import weakref
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
CUDA = torch.cuda.is_available()
# The most between SIGTERM and SIGKILL, taken from the check's own limit so that none runs past it: the runner cleans
# up on SIGTERM (pytest has no handler for it and ends at once, the SIGTERM to its group reaching its children too);
# a worker has nothing to clean up and ends at once, its group with it.
GRACE_S, WORKER_GRACE_S = 10, 2
# (check, seconds) in the order they run: on an H100/H200 (see above), and on a 2-core CPU with the tiny model.
GPU_PLAN = [("environment", 30), ("int8 matmul path", 25), ("flags panel rebuild frees", 25),
            ("load beside a busy GPU", 15), ("regional blocks, max-autotune", 110),
            ("regional blocks, max-autotune-no-cudagraphs", 35), ("notebooks", 90)]
CPU_PLAN = [("environment", 20), ("flags panel rebuild frees", 50), ("notebooks", 100)]
LEFT_OUT_ON_A_CPU = {  # (status, why)
    "int8 matmul path": ("skipped", "within the CPU form's 3 minutes on 2 cores, left to tests/test_scripts.py"),
    "load beside a busy GPU": ("n/a", "n/a without a GPU"),
    "regional blocks, max-autotune": ("skipped", "its compile takes a minute or more on 2 cores: tests/test_scripts.py "
                                                 "runs the check with the compile left out"),
    "regional blocks, max-autotune-no-cudagraphs": ("n/a", "n/a without CUDA graphs: the max-autotune row's compile"),
}
PYTEST_S = 300


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", help="folder for the table and what the checks wrote")
    parser.add_argument("--budget-s", type=float, default=None,
                        help="the sum of the limits (default: the plan's, 330 s on a GPU); the limits are scaled")
    parser.add_argument("--within-s", type=float, default=None,
                        help="scale the limits down to end within this many seconds (gpu_check.sh passes it)")
    parser.add_argument("--model", default="sdxl-random" if CUDA else "tiny")
    parser.add_argument("--size", type=int, default=512 if CUDA else 96, help="image height and width")
    parser.add_argument("--steps", type=int, default=4 if CUDA else 1)
    parser.add_argument("--notebooks", default="01-03" if CUDA else "01",
                        help="the notebooks to run headless, as the runner's --only (default 01-03; 01 on a CPU)")
    parser.add_argument("--pytest", action=argparse.BooleanOptionalAction, default=False,
                        help=f"run the test suite too, with a limit of {PYTEST_S} s (CI runs it on the CPU)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)  # the checks to run in this process, for the parent
    parser.add_argument("--events", help=argparse.SUPPRESS)  # where the worker says what it is doing and found
    args = parser.parse_args(argv)
    if not args.worker and not args.out:
        parser.error("--out is required")
    return args


def plan(args):
    """[(check, limit in seconds)]: the device's plan, the limits scaled to the budget and to --within-s."""
    steps = [(f"notebooks {args.notebooks} headless" if name == "notebooks" else name, seconds)
             for name, seconds in (GPU_PLAN if CUDA else CPU_PLAN)]
    if args.pytest:
        steps.append(("pytest (no series, no browser)", PYTEST_S))
    total = sum(seconds for _, seconds in steps)
    budget = int(min(args.budget_s or total, args.within_s or float("inf")))
    exact = [seconds * budget / total for _, seconds in steps]
    limits = [int(x) for x in exact]
    for i in sorted(range(len(steps)), key=lambda i: limits[i] - exact[i])[:budget - sum(limits)]:
        limits[i] += 1  # the seconds lost to rounding down, to the checks that lost most: the sum is the budget
    return [(name, limit) for (name, _), limit in zip(steps, limits)]


# The worker's checks. Each returns what it found; an exception is a finding too.

def environment(args):
    import helpers
    from helpers.machine import device_name, package_versions

    found = {"device": device_name(), "versions": package_versions()}
    if CUDA:
        found["matmul_autotuning"] = helpers.matmul_autotuning("cuda")
        found["bf16_matmul_tflops"] = round(helpers.flops.measure_matmul_peak(), 1)
        found["datasheet_peak"] = helpers.flops.peak_tflops(device_name())
    return found


def int8_path(args):
    """torchao's dynamic int8 on one SDXL-sized linear layer: which matmul ran, eager and compiled (on a GPU), and
    how close to the bf16 layer."""
    import helpers

    helpers.require_torchao()
    from torchao.quantization import Int8DynamicActivationInt8WeightConfig, quantize_

    device = "cuda" if CUDA else "cpu"
    dtype = helpers.low_precision_dtype(device, verbose=False)
    layer = torch.nn.Linear(1280, 1280, device=device, dtype=dtype)
    inputs = torch.randn(2, 1024, 1280, device=device, dtype=dtype)  # batch 2 (guidance), 32x32 tokens
    activities = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if CUDA else [])
    with torch.no_grad():
        reference = layer(inputs)
        quantize_(layer, Int8DynamicActivationInt8WeightConfig(set_inductor_config=False))
        found = {} if CUDA else {"compiled": "n/a on a CPU: the compiled kernel is the GPU's question"}
        for label, run in [("eager", layer)] + ([("compiled", torch.compile(layer, fullgraph=True))] if CUDA else []):
            run(inputs)
            with torch.profiler.profile(activities=activities) as prof:
                output = run(inputs)
            names = {event.key for event in prof.key_averages()}
            error = ((output - reference).abs().max() / reference.abs().max()).item()
            found[label] = {"int_mm": sorted(n for n in names if "int_mm" in n)[:3], "relative_error": round(error, 4)}
    helpers.memory.reset_compiler()  # the layer's compiled code stays cached on code that every Linear shares: dropped
    if CUDA and not found["eager"]["int_mm"]:
        raise RuntimeError(f"no _int_mm in the eager int8 layer: {found}")
    return found


def regional(args, mode):
    """The repeated blocks of step 05's pipeline compiled in `mode`, as step 07 compiles them, the VAE decoder
    eager: compile time, latency, attention kernel, memory, and on a GPU whether pytorch#152887 hit."""
    import helpers
    from helpers import regions

    helpers.memory.reset_compiler()  # earlier pipelines' compiled code would count toward the blocks' recompile limit
    params = helpers.Params(model=args.model, steps=args.steps, height=args.size, width=args.size)
    pipe = helpers.build(args.model, through="05", compile=False, verbose=False)
    helpers.compile_regions(pipe, mode=mode)
    del pipe.vae.decode  # the class's own, eager, decode again
    before = len(regions.cudagraph_fallbacks)  # what helpers.generate said each time it fell back
    stage("the first call, which compiles")
    try:
        measurement = helpers.benchmark(lambda: helpers.generate(pipe, params), warmup=1, runs=3, progress=False)
        stage("the attention probe")
        attention = helpers.attention_kernels(pipe, params) or "none"  # read from ops and GPU kernel names
    except RuntimeError as error:
        if regions.CUDAGRAPH_OVERWRITE not in str(error):  # pytorch#152887's error, where nothing fell back
            raise
        raise RuntimeError(f"pytorch/pytorch#152887 hits SDXL with torch {torch.__version__}: "
                           f"{str(error).strip().splitlines()[0][:300]}") from None
    found = {
        "first_call_s": round(measurement.first_call_s, 3),
        "median_s": round(measurement.median_s, 3),
        "iqr_s": round(measurement.iqr_s, 3),
        "attention": attention,
        "blocks": helpers.pipeline_state(pipe)["compiled"].get("repeated_blocks"),
    }
    if CUDA and mode == "max-autotune":
        fell_back = regions.cudagraph_fallbacks[before:]
        found["pytorch#152887"] = (f"hits: {fell_back[0]}" if fell_back else
                                   f"not hit in 7 images under CUDA graphs, torch {torch.__version__}")
    if CUDA:
        found["peak_gb"] = {"steady": round(measurement.peak_memory_gb, 2),
                            "first_call": round(measurement.first_call_peak_memory_gb, 2)}
    pipe = measurement = None
    helpers.memory.reset_compiler()
    helpers.free_memory()
    return found


def flags_panel_rebuild(args):
    """The flags panel builds one pipeline, then another: the first must be gone, its memory with it. On a GPU the
    first is the tiny model compiled regionally under CUDA graphs, whose memory pools only a compiler reset frees;
    on a CPU it is eager (the compile would take most of the CPU form's minutes; tests/test_widgets compiles it)."""
    import helpers

    params = helpers.Params(model="tiny", steps=args.steps, height=args.size, width=args.size, warmup=0, runs=1)
    panel = helpers.flags_panel(params)
    if CUDA:
        panel.compile.value, panel.compile_mode.value = "regional", "reduce-overhead"
    stage("the first build")
    panel.button.click()
    if panel.message.value:
        raise RuntimeError(panel.message.value)
    first, held = weakref.ref(panel.pipe), gpu_memory_gb()
    panel.compile.value = "off"
    stage("the rebuild")
    panel.button.click()
    found = {"first": "regional, reduce-overhead" if CUDA else "eager", "previous_pipeline_freed": first() is None}
    rebuilt = gpu_memory_gb()
    panel.release_pipeline()
    helpers.free_memory()
    found["pipelines_left"] = len(helpers.live_pipelines())
    if CUDA:
        found["gpu_gb"] = {"first": held, "after_rebuild": rebuilt, "after_release": gpu_memory_gb()}
    if not found["previous_pipeline_freed"] or found["pipelines_left"]:
        raise RuntimeError(f"a pipeline outlived its panel: {found}")
    # Reserved, not allocated: CUDA-graph memory pools are reserved by the caching allocator, and only freed with the
    # compiled code (`torch.compiler.reset()`, which the panel's release runs).
    if CUDA and found["gpu_gb"]["after_release"]["reserved"] > 0.1 + 0.5 * held["reserved"]:
        raise RuntimeError(f"GPU memory stayed reserved after the panel released its pipeline: {found['gpu_gb']}")
    return found


def gpu_memory_gb():
    if not CUDA:
        return None
    return {"allocated": round(torch.cuda.memory_allocated() / 1e9, 3),
            "reserved": round(torch.cuda.memory_reserved() / 1e9, 3)}


HOLD_MEMORY = """
import sys, time, torch
free, _ = torch.cuda.mem_get_info()
block = torch.empty(int(free - float(sys.argv[1]) * 1e9), dtype=torch.uint8, device="cuda")
print("holding", flush=True)
time.sleep(120)
"""


def busy_gpu(args):
    """Another process holds nearly all of the GPU: loading must stop with one sentence, naming the process where
    nvidia-smi lists it (inside a container it usually lists none), not crash later."""
    import helpers
    from helpers.errors import GpuMemoryBusy
    from helpers.memory import gpu_memory_held_by_others

    holder = subprocess.Popen([sys.executable, "-c", HOLD_MEMORY, "2"], stdout=subprocess.PIPE, text=True)
    try:
        if holder.stdout.readline().strip() != "holding":
            raise RuntimeError("the process meant to hold the GPU's memory did not start")
        try:
            helpers.load_pipeline(args.model, dtype=helpers.low_precision_dtype(verbose=False), verbose=False)
        except GpuMemoryBusy as error:
            message, named = str(error), gpu_memory_held_by_others().pids
            if "\n" in message or (named and str(holder.pid) not in message):
                raise RuntimeError(f"the refusal is not one line naming pid {holder.pid}: {message}") from None
            return message if named else f"{message} [nvidia-smi names no process here, so the refusal names none]"
        raise RuntimeError("loaded beside a process holding all but 2 GB of the GPU")
    finally:
        holder.kill()
        holder.wait()
        helpers.free_memory()


WORKER_CHECKS = {
    "environment": environment,
    "int8 matmul path": int8_path,
    "regional blocks, max-autotune": lambda args: regional(args, "max-autotune"),
    "regional blocks, max-autotune-no-cudagraphs": lambda args: regional(args, "max-autotune-no-cudagraphs"),
    "flags panel rebuild frees": flags_panel_rebuild,
    "load beside a busy GPU": busy_gpu,
}
_events = None


def stage(text):
    """Tell the parent what the check is doing: the row of a check that times out says where it was."""
    if _events:
        _events.write(json.dumps({"stage": text}) + "\n")
        _events.flush()


def work(args):
    """The worker: run the named checks in turn, writing what each is doing and found to the events file."""
    global _events
    _events = open(args.events, "a")
    for name in args.worker.split(";"):
        try:
            found, status = WORKER_CHECKS[name](args), "ok"
        except Exception as error:  # a check that breaks is a finding: record it and go on to the next
            traceback.print_exc()
            found, status = f"{type(error).__name__}: {str(error).strip()[:400]}", "FAILED"
        _events.write(json.dumps({"status": status, "found": found}, default=str) + "\n")
        _events.flush()
    return 0


# The parent: starts each child, keeps its limit, makes the table.

def grace_s(limit_s, most=GRACE_S):
    return min(most, limit_s / 3)


def start(command, log=None, env=None):
    """A child in a process group of its own, so that stopping it stops what it started (compile workers, say)."""
    output = open(log, "w") if log else None
    try:
        return subprocess.Popen(command, cwd=ROOT, stdout=output, stderr=subprocess.STDOUT if log else None,
                                env=env, start_new_session=True)
    finally:
        if output:
            output.close()


def stop(process, grace):
    """SIGTERM to the child's process group, SIGKILL `grace` seconds later; returns once the child is gone."""
    for signum in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(process.pid, signum)
        except ProcessLookupError:  # nothing is left in the group
            break
        try:
            process.wait(timeout=grace)
            break
        except subprocess.TimeoutExpired:
            continue
    process.wait()


def read_events(path):
    """The worker's events so far: the complete lines of its file."""
    lines = path.read_text().splitlines(keepends=True) if path.exists() else []
    return [json.loads(line) for line in lines if line.endswith("\n")]


class Checks:
    def __init__(self, args, work_dir):
        self.args, self.work_dir, self.rows, self.child = args, work_dir, [], None

    def add(self, name, status, seconds, found):
        self.rows.append({"check": name, "status": status, "seconds": round(seconds, 1), "found": found})
        print(f"   {status}: {found}", flush=True)

    def workers(self, limits):
        """Run the worker's checks, `limits` {name: seconds}; after a timeout or a crash a new worker takes the
        rest. A check's clock starts when the one before it ends, or when its worker starts."""
        left = list(limits)
        while left:
            events = self.work_dir / f"events-{len(self.rows)}.jsonl"
            command = [sys.executable, __file__, "--worker", ";".join(left), "--events", str(events), "--model",
                       self.args.model, "--size", str(self.args.size), "--steps", str(self.args.steps)]
            print(f"== {left[0]} (limit {limits[left[0]]} s)", flush=True)
            # One Inductor cache for the workers, empty at first: the second regional row reuses the first's kernels.
            env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(self.work_dir / "inductor")}
            self.child, started, seen, doing = start(command, env=env), time.monotonic(), 0, None
            while left:
                ended = self.child.poll() is not None  # before reading, so that no last event is missed
                for event in read_events(events)[seen:]:
                    seen += 1
                    if "stage" in event:
                        doing = event["stage"]
                        continue
                    now = time.monotonic()
                    self.add(left.pop(0), event["status"], now - started, event["found"])
                    started, doing = now, None
                    if left:
                        print(f"== {left[0]} (limit {limits[left[0]]} s)", flush=True)
                if not left:
                    break
                elapsed, limit = time.monotonic() - started, limits[left[0]]
                if ended:
                    self.add(left.pop(0), "FAILED", elapsed, f"the worker ended (exit {self.child.returncode})")
                    break
                grace = grace_s(limit, WORKER_GRACE_S)
                if elapsed >= limit - grace:
                    stop(self.child, grace)
                    during = f", in {doing}" if doing else ""
                    self.add(left.pop(0), "timed out", elapsed, f"timed out after {elapsed:.0f} s{during}")
                    break
                time.sleep(0.2)
            try:  # done: the worker ends by itself; stopping it then ends what it may have left in its group
                self.child.wait(timeout=WORKER_GRACE_S)
            except subprocess.TimeoutExpired:
                pass
            stop(self.child, WORKER_GRACE_S)
            self.child = None

    def limited(self, command, log, limit_s):
        """Run `command`, its console in `log`, until it ends or its limit does: (exit status, None where it was
        stopped; the seconds until it ended or got SIGTERM)."""
        self.child, started = start(command, log), time.monotonic()
        try:
            self.child.wait(timeout=max(0, limit_s - grace_s(limit_s)))
            code = self.child.returncode
        except subprocess.TimeoutExpired:
            code = None
        seconds = time.monotonic() - started
        stop(self.child, grace_s(limit_s))
        self.child = None
        return code, seconds

    def notebooks(self, name, limit_s, out):
        """The notebooks headless in the course's runner; per step: status, dtype, compile, first call, median and
        the note (where the limit cut a step off, the runner's record says after how long and in which cell)."""
        from helpers.results import load_records

        run, args = self.work_dir / "run", self.args
        command = [
            sys.executable, "-m", "helpers", "run", "--model", args.model, "--out", str(run), "--steps",
            str(args.steps), "--height", str(args.size), "--width", str(args.size), "--warmup", "0", "--runs", "2",
            "--compile-mode", "default", "--only", args.notebooks, "--no-progress",
        ]
        print(f"== {name} (limit {limit_s} s)", flush=True)
        code, seconds = self.limited(command, out / "run.txt", limit_s)
        for file in ("results.json", "latency_per_step.png"):
            if (run / file).exists():
                shutil.copy(run / file, out / file)
        records = load_records(run, quiet=True)  # [] where the runner wrote none
        steps = {r["step"]: {"status": r["status"], "dtype": r["dtype"],
                             "compile": r["params"]["compile_mode"] if r["step"] >= "04" else "eager",
                             "first_call_s": r["first_call_s"] and round(r["first_call_s"], 3),
                             "median_s": r["median_s"] and round(r["median_s"], 3), "note": r["note"]}
                 for r in records}
        if code is None:
            self.add(name, "timed out", seconds, f"timed out after {seconds:.0f} s; steps: {json.dumps(steps)}")
        elif code != 0 or not steps or any(step["status"] != "ok" for step in steps.values()):
            self.add(name, "FAILED", seconds, f"runner exit {code} (run.txt has its console); {json.dumps(steps)}")
        else:
            self.add(name, "ok", seconds, steps)

    def pytest(self, name, limit_s, out):
        """The tests on this machine, less the notebook series and the browser, which other rows and CI cover, and
        less the lint test where ruff is not installed beside this python (a GPU machine's often lacks it)."""
        command = [sys.executable, "-m", "pytest", "-q", "-x", "-m", "not notebooks and not browser"]
        no_ruff = not (Path(sys.executable).parent / "ruff").exists()
        if no_ruff:
            command += ["--deselect", "tests/test_packaging.py::test_code_is_linted"]
        print(f"== {name} (limit {limit_s} s)", flush=True)
        code, seconds = self.limited(command, out / "pytest.txt", limit_s)
        last = ((out / "pytest.txt").read_text(errors="replace").strip().splitlines() or ["no output"])[-1]
        last += " (lint test deselected: no ruff beside this python)" if no_ruff else ""
        if code is None:
            self.add(name, "timed out", seconds, f"timed out after {seconds:.0f} s; {last}")
        else:
            self.add(name, "ok" if code == 0 else "FAILED", seconds, last if code == 0 else f"exit {code}: {last}")

    def table(self, limits):
        lines = [f"{'check':<46}{'status':<11}{'limit':>6}{'seconds':>9}  found"]
        for row in self.rows:
            found = row["found"] if isinstance(row["found"], str) else json.dumps(row["found"], default=str)
            limit = limits.get(row["check"], "-")
            lines.append(f"{row['check']:<46}{row['status']:<11}{limit:>6}{row['seconds']:>9}  {found}")
        return "\n".join(lines)


def main(argv=None):
    args = parse_args(argv)
    if args.worker:
        return work(args)
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    steps = plan(args)
    print(f"Plan on {'a GPU' if CUDA else 'the CPU'}: {sum(seconds for _, seconds in steps)} s in all")
    for name, seconds in steps:
        print(f"   {name:<46}{seconds:>5} s")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))  # so that `finally` stops the child
    work_dir = Path(tempfile.mkdtemp(prefix="gpu-check-"))
    if not CUDA:
        os.environ.setdefault("OMP_NUM_THREADS", "1")
    checks = Checks(args, work_dir)
    try:
        checks.workers({name: seconds for name, seconds in steps if name in WORKER_CHECKS})
        for name, seconds in steps:
            if name.startswith("notebooks"):
                checks.notebooks(name, seconds, out)
            elif name.startswith("pytest"):
                checks.pytest(name, seconds, out)
    finally:
        if checks.child is not None:
            stop(checks.child, GRACE_S)
        shutil.rmtree(work_dir, ignore_errors=True)
    for name, (status, found) in ({} if CUDA else LEFT_OUT_ON_A_CPU).items():
        checks.rows.append({"check": name, "status": status, "seconds": 0, "found": found})
    device = next((row["found"]["device"] for row in checks.rows
                   if row["check"] == "environment" and row["status"] == "ok"), "a device the check could not name")
    header = (f"GPU check on {device}: {args.model} at {args.size}x{args.size}, {args.steps} steps, "
              f"notebooks {args.notebooks}")
    table = checks.table(dict(steps))
    (out / "check.txt").write_text(header + "\n" + table + "\n")
    (out / "checks.json").write_text(json.dumps({"header": header, "plan": dict(steps), "rows": checks.rows},
                                                indent=1, default=str))
    print(header, table, sep="\n")
    return 0 if all(row["status"] in ("ok", "n/a", "skipped") for row in checks.rows) else 1


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
