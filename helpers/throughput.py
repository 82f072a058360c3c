"""Many images per call: throughput (images per second) against latency (seconds until a call's images are ready).

A batch of B prompts is one pipeline call: the UNet sees 2B latents (classifier-free guidance doubles them), so a
bigger batch fills the device better, and every image of it waits for the whole batch. `measure_batch` times one
batch size with `benchmark` and counts the graphs Dynamo compiled for it; `draw_latency_throughput` draws the
trade-off as a plain `matplotlib.figure.Figure` (no pyplot state).
"""

from pathlib import Path

import torch
from matplotlib.figure import Figure
from torch._dynamo.utils import counters

from .images import image_size
from .ladder import pipeline_state
from .results import append_record, make_record, write_atomically
from .timing import benchmark

THROUGHPUT_DIR = "throughput"  # inside OUT_DIR: its own results.json, so the ladder's chart never reads these
CHART_FILE = "latency_vs_throughput.png"


def generators(seeds):
    """One generator per image: image i gets seed `seeds[i]` whatever batch, or process, it is made in."""
    return [torch.Generator("cpu").manual_seed(seed) for seed in seeds]


def generate_batch(pipe, params, prompts, seeds=None):
    """The images of `prompts`, made in one call; seeds default to params.seed, params.seed + 1, ..."""
    height, width = image_size(params)
    seeds = range(params.seed, params.seed + len(prompts)) if seeds is None else seeds
    return pipe(
        prompt=list(prompts),
        negative_prompt=[params.negative_prompt] * len(prompts) if params.negative_prompt else None,
        num_inference_steps=params.steps,
        guidance_scale=params.guidance,
        height=height,
        width=width,
        generator=generators(seeds),
    ).images


def graphs_compiled():
    """Graphs Dynamo has compiled in this process so far (each recompile adds one)."""
    return counters["stats"]["unique_graphs"]


def measure_batch(pipe, params, batch_size, progress=True):
    """Time calls of `batch_size` prompts; returns a record (step 07's fields, plus the batch's) and prints a line.

    The first call is timed apart: on a compiled pipeline it is where a new batch size recompiles.
    """
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
        raise ValueError(f"A batch size must be a whole number of 1 or more (see BATCH_SIZES), got {batch_size!r}.")
    compiled_per_call = []

    def call():
        before = graphs_compiled()
        images = generate_batch(pipe, params, [params.prompt] * batch_size)
        compiled_per_call.append(graphs_compiled() - before)
        return images

    measurement = benchmark(call, warmup=params.warmup, runs=params.runs, progress=progress,
                            description=f"batch {batch_size}")
    extra = {
        "batch_size": batch_size,
        "images_per_s": batch_size / measurement.median_s,
        "s_per_image": measurement.median_s / batch_size,
        "graphs_compiled": compiled_per_call[0],
        "graphs_compiled_later": sum(compiled_per_call[1:]),  # above 0: recompiling in steady state, see caveat
        "compiled": pipeline_state(pipe)["compiled"],  # what was compiled and how ({} when nothing was)
    }
    record = make_record("07", measurement, params, dtype=pipe.unet.dtype, extra=extra)
    print(summary(record))
    return record


def summary(record):
    """'batch 4: 3.21 images/s, 0.311 s per image (...)': one record in a line."""
    memory = record.get("peak_memory_gb")
    memory = f", peak memory {memory:.2f} GB" if memory is not None else ""
    text = (
        f"batch {record['batch_size']}: {record['images_per_s']:.2f} images/s, {record['s_per_image']:.3f} s per "
        f"image ({record['median_s']:.3f} s per call, IQR {record['iqr_s']:.3f} s){memory}; first call "
        f"{record['first_call_s']:.1f} s, {record['graphs_compiled']} graph(s) compiled"
    )
    if record["noisy"]:
        spread = f"{100 * record['iqr_s'] / record['median_s']:.0f}%"
        text += f"\nNoisy: the IQR is {spread} of the median; did something else use the machine? Measure again."
    if record["graphs_compiled_later"]:
        text += (f"\nRecompiled {record['graphs_compiled_later']} graph(s) after the first call: the median holds "
                 "compile time; raise WARMUP, or see the notebook's caveat on torch's recompile limit.")
    return text


def table(records):
    """The records as a table: a row per batch size."""
    lines = [f"{'batch':>5} {'images/s':>9} {'s/image':>8} {'s/call':>8} {'IQR s':>7} {'first call s':>13} "
             f"{'graphs':>7} {'peak GB':>8}"]
    for r in records:
        memory = "n/a" if r["peak_memory_gb"] is None else f"{r['peak_memory_gb']:.2f}"
        lines.append(f"{r['batch_size']:>5} {r['images_per_s']:>9.2f} {r['s_per_image']:>8.3f} {r['median_s']:>8.3f} "
                     f"{r['iqr_s']:>7.3f} {r['first_call_s']:>13.1f} {r['graphs_compiled']:>7} {memory:>8}")
    return "\n".join(lines)


def save_records(out_dir, records):
    """Append `records` to `<out_dir>/throughput/results.json` (atomic, locked); returns that folder."""
    folder = Path(out_dir) / THROUGHPUT_DIR
    for record in records:
        append_record(folder, record)
    return folder


def draw_latency_throughput(records, path=None):
    """Images per second against seconds per call, a point per batch size, as a Figure; saved as PNG at `path`."""
    records = sorted(records, key=lambda r: r["batch_size"])
    if not records:
        raise ValueError("There are no throughput records to draw: measure at least one batch size first.")
    fig = Figure(figsize=(7, 4.5), layout="constrained")
    ax = fig.add_subplot()
    latency = [r["median_s"] for r in records]
    rate = [r["images_per_s"] for r in records]
    # The error bars span the IQR of a call's seconds: the middle half of the timed calls.
    ax.errorbar(latency, rate, xerr=[r["iqr_s"] / 2 for r in records], marker="o", capsize=3)
    for record in records:
        ax.annotate(_point_label(record), (record["median_s"], record["images_per_s"]), textcoords="offset points",
                    xytext=(6, -12), fontsize=8)
    first = records[0]
    ax.set_title(f"{first['device']} · {first['model']} · {first['width']}x{first['height']}, "
                 f"{first['params']['steps']} steps", fontsize=10)
    ax.set_xlabel("latency: seconds per call (every image of a batch waits this long)")
    ax.set_ylabel("throughput: images per second")
    ax.set_xlim(0, max(latency) * 1.25)
    ax.set_ylim(0, max(rate) * 1.25)
    ax.grid(alpha=0.3)
    if path is not None:
        write_atomically(path, lambda f: fig.savefig(f, format="png", dpi=120))
    return fig


def _point_label(record):
    memory = record.get("peak_memory_gb")
    return f"batch {record['batch_size']}" + (f", {memory:.1f} GB" if memory is not None else "")
