"""Profile one image of a step of the course, by default its last: where the time goes, part by part and kernel by
kernel. scripts/gpu_reference.sh profiles the last step of its slice (--through 03 after notebooks 01-03).

On a GPU (from the project's root, with `helpers` installed or on PYTHONPATH):
    python scripts/profile_final_step.py --model sdxl-random --through 07 --out profile
Anywhere, in a few seconds:
    python scripts/profile_final_step.py --model tiny --through 03 --height 128 --width 128 --steps 2 --out /tmp/profile

With --inductor-cache DIR, compiled code comes from (and goes to) DIR: give it the folder `python -m helpers run
--inductor-cache DIR` used, and the first call loads what the runner compiled instead of compiling again.

Writes to --out:
- trace.json.gz: the torch.profiler trace of one image (open it in https://ui.perfetto.dev);
- top_kernels.txt: kernels and ops by self device time (self CPU time on a CPU);
- summary.json: the first call's time and what it found in the Inductor cache; wall time, time in the text
  encoders, the denoising loop and the VAE decode, the GPU's idle fraction, the attention backends (found by aten op
  and by GPU kernel name, so also under CUDA graphs; the text encoders' attention included), and TFLOP/s against
  the device's matmul peak where one is known.
"""

import argparse
import gzip
import json
import os
import tempfile
import time
from pathlib import Path

import torch
from torch._dynamo.utils import counters
from torch.profiler import ProfilerActivity, profile, record_function

from helpers.flops import efficiency, image_flops, peak_tflops
from helpers.images import generate
from helpers.ladder import build, pipeline_state
from helpers.machine import device_name, package_versions
from helpers.params import COMPILE_MODES, Params
from helpers.probe import attention_backends
from helpers.timing import synchronize

MAX_FILE_BYTES = 15 * 2**20  # scripts/gpu_reference.sh promises files under 16 MB
GPU_EVENTS = {"kernel", "gpu_memcpy", "gpu_memset"}
ANNOTATIONS = {"user_annotation", "gpu_user_annotation"}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="sdxl-random", help="tiny, sdxl-random, a hub id or a local folder")
    parser.add_argument("--through", default="07", help="the last step of the ladder to apply (default 07)")
    course = Params()  # the course's defaults, from their one source
    parser.add_argument("--height", type=int, default=1024, help="pixels (default 1024, SDXL's native size)")
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=course.steps)
    parser.add_argument("--guidance", type=float, default=course.guidance)
    parser.add_argument("--compile-mode", default=course.compile_mode, choices=COMPILE_MODES)
    parser.add_argument("--warmup", type=int, default=course.warmup, help="untimed calls after the first one")
    parser.add_argument(
        "--inductor-cache", metavar="DIR", default=None,
        help="Inductor's cache folder (TORCHINDUCTOR_CACHE_DIR), e.g. the one `python -m helpers run` was given",
    )
    parser.add_argument("--out", required=True, help="folder for trace.json.gz, top_kernels.txt, summary.json")
    return parser.parse_args(argv)


class Components:
    """Times the pipeline's text encoding and VAE decoding, and names them in the profiler's trace.

    The device is synchronized around each part while `synchronize` is set (for the timed call, not the
    profiled one, whose idle gaps it would change). The denoising loop is what runs in between.
    """

    def __init__(self, pipe):
        self.marks, self.synchronize = {}, True
        pipe.encode_prompt = self._wrap("text_encoders", pipe.encode_prompt)
        pipe.vae.decode = self._wrap("vae_decode", pipe.vae.decode)

    def _wrap(self, name, function):
        def call(*args, **kwargs):
            self._mark(name, "start")
            with record_function(name):
                output = function(*args, **kwargs)
            self._mark(name, "end")
            return output

        return call

    def _mark(self, name, which):
        if self.synchronize:
            synchronize()
        self.marks[name, which] = time.perf_counter()

    def seconds(self, start, end):
        """Seconds per part of the call that ran from `start` to `end` (perf_counter times)."""
        marks = self.marks
        parts = {
            "text_encoders": marks["text_encoders", "end"] - marks["text_encoders", "start"],
            "denoising_loop": marks["vae_decode", "start"] - marks["text_encoders", "end"],
            "vae_decode": marks["vae_decode", "end"] - marks["vae_decode", "start"],
        }
        parts["other"] = (end - start) - sum(parts.values())  # preparing inputs, turning the image into PIL
        return parts


def timed_call(function):
    synchronize()
    start = time.perf_counter()
    function()
    synchronize()
    return start, time.perf_counter()


def gpu_busy(events):
    """(busy seconds, window seconds) on the GPU inside the "image" range: the union of kernels, copies, memsets."""
    image = next(e for e in events if e.get("name") == "image" and e.get("cat") == "user_annotation")
    window_start, window_end = image["ts"], image["ts"] + image["dur"]
    intervals = sorted(
        (max(e["ts"], window_start), min(e["ts"] + e["dur"], window_end))
        for e in events
        if e.get("cat") in GPU_EVENTS and e.get("ph") == "X"
    )
    busy, covered_to = 0.0, window_start
    for start, end in intervals:
        start = max(start, covered_to)
        if end > start:
            busy += end - start
            covered_to = end
    return busy / 1e6, (window_end - window_start) / 1e6  # trace times are microseconds


def write_trace(trace, path):
    """Gzipped JSON; if still too big, only GPU events and named ranges (CPU op events dropped). Returns a note."""
    path.write_bytes(gzip.compress(json.dumps(trace).encode()))
    if path.stat().st_size <= MAX_FILE_BYTES:
        return "full"
    kept = ANNOTATIONS | GPU_EVENTS
    trace = {**trace, "traceEvents": [e for e in trace["traceEvents"] if e.get("ph") == "M" or e.get("cat") in kept]}
    path.write_bytes(gzip.compress(json.dumps(trace).encode()))
    if path.stat().st_size <= MAX_FILE_BYTES:
        return "GPU events and named ranges only (the full trace was over 15 MB gzipped)"
    path.unlink()
    return "not written: over 15 MB gzipped even without CPU events"


def inductor_cache():
    """Where Inductor's cache is, and what the compilations so far found in it (read after the first call)."""
    hits, misses, bypasses = (counters["inductor"][f"fxgraph_cache_{k}"] for k in ("hit", "miss", "bypass"))
    if not hits + misses + bypasses:
        state = "nothing compiled"
    elif not misses + bypasses:
        state = "warm: every graph came from the cache"
    elif not hits:
        state = "cold: every graph compiled"
    else:
        state = "partly warm"
    directory = os.environ.get("TORCHINDUCTOR_CACHE_DIR", "Inductor's default (under the temp folder)")
    return {"dir": directory, "state": state, "graphs_from_cache": hits, "graphs_compiled": misses + bypasses}


def attention(pipe, averages):
    """The attention processors of the UNet and the VAE, and the calls each backend got in the profiled image."""
    backends = attention_backends(averages)
    summary = {"processors": pipeline_state(pipe)["attention"], "backends": backends}
    if not backends:
        summary["note"] = "no SDPA op and no attention kernel helpers.probe names: plain attention, off the GPU"
    return summary


def flops_summary(args, wall_s):
    try:
        counted = image_flops(args.model, args.height, args.width, args.steps, args.guidance)
    except ValueError as error:  # a model whose architecture flops.py doesn't know
        return {"note": str(error)}
    peak, source = peak_tflops(device_name()) or (None, None)  # no fraction where the device's peak is unknown
    return {"image_tflop": counted["total"] / 1e12, "peak_tflops": peak, "peak_source": source,
            **efficiency(wall_s, counted["total"], peak)}


def main(argv=None):
    args = parse_args(argv)
    if args.inductor_cache:  # read when Inductor first looks for compiled code: before the first call
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(Path(args.inductor_cache).resolve())
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cuda = torch.cuda.is_available()
    params = Params(model=args.model, steps=args.steps, height=args.height, width=args.width,
                    guidance=args.guidance, compile_mode=args.compile_mode)

    pipe = build(args.model, through=args.through, compile_mode=args.compile_mode)
    components = Components(pipe)
    start, end = timed_call(lambda: generate(pipe, params))
    first_call_s, cache = end - start, inductor_cache()
    print(f"First call (compiles where the step compiles): {first_call_s:.2f} s", flush=True)
    print(f"Inductor cache {cache['dir']}: {cache['state']} ({cache['graphs_from_cache']} graphs loaded, "
          f"{cache['graphs_compiled']} compiled)", flush=True)
    for _ in range(args.warmup):
        generate(pipe, params)
    start, end = timed_call(lambda: generate(pipe, params))
    wall_s, parts_s = end - start, components.seconds(start, end)
    print(f"One image: {wall_s:.3f} s; " + ", ".join(f"{k} {v:.3f} s" for k, v in parts_s.items()), flush=True)

    components.synchronize = False
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        with record_function("image"):
            generate(pipe, params)
        synchronize()
    with tempfile.TemporaryDirectory() as tmp:
        prof.export_chrome_trace(f"{tmp}/trace.json")
        trace = json.loads(Path(f"{tmp}/trace.json").read_text())
    trace_note = write_trace(trace, out / "trace.json.gz")

    averages = prof.key_averages()
    sort_by = "self_device_time_total" if cuda else "self_cpu_time_total"
    (out / "top_kernels.txt").write_text(averages.table(sort_by=sort_by, row_limit=50, max_name_column_width=100))

    busy_s, profiled_s = gpu_busy(trace["traceEvents"])
    summary = {
        "model": args.model,
        "through": args.through,
        "size": [args.height, args.width],
        "steps": args.steps,
        "guidance": args.guidance,
        "compile_mode": args.compile_mode,
        "device": device_name(),
        "versions": package_versions(),
        "first_call_s": first_call_s,
        "inductor_cache": cache,
        "wall_s": wall_s,
        "parts_s": parts_s,
        "profiled_wall_s": profiled_s,
        "gpu_busy_s": busy_s if cuda else None,
        "gpu_idle_fraction": 1 - busy_s / profiled_s if cuda else None,
        "attention": attention(pipe, averages),
        "flops": flops_summary(args, wall_s),
        "trace": trace_note,
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
