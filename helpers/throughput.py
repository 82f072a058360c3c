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

from .files import write_atomically
from .images import image_size
from .ladder import pipeline_state
from .memory import free_memory
from .models import ACTIVATION_BYTES
from .regions import call_with_cudagraph_fallback, last_cudagraph_fallback, recompile_limit_hits
from .results import append_record, make_record
from .sentences import measurement_sentence, noisy_sentence
from .timing import benchmark

THROUGHPUT_DIR = "throughput"  # inside OUT_DIR: its own results.json, so the ladder's chart never reads these
THROUGHPUT_CHART_FILE = "latency_vs_throughput.png"


def generators(seeds):
    """One generator per image: image i gets seed `seeds[i]` whatever batch, or process, it is made in."""
    return [torch.Generator("cpu").manual_seed(seed) for seed in seeds]


def generate_batch(pipe, params, prompts, seeds=None):
    """The images of `prompts`, made in one call; seeds default to params.seed, params.seed + 1, ..."""
    height, width = image_size(params)
    seeds = range(params.seed, params.seed + len(prompts)) if seeds is None else seeds
    return call_with_cudagraph_fallback(pipe, lambda: pipe(
        prompt=list(prompts),
        negative_prompt=[params.negative_prompt] * len(prompts) if params.negative_prompt else None,
        num_inference_steps=params.steps,
        guidance_scale=params.guidance,
        height=height,
        width=width,
        generator=generators(seeds),
    ).images)


MAX_BATCH_SIZE = 256  # far past any GPU's knee at SDXL's size; a bound that keeps a typo from running for hours
GRID_IMAGES = 8  # the most images a grid shows: a row of hundreds is wider than a picture can be


def check_batch_sizes(batch_sizes):
    """`batch_sizes` as a sorted list without repeats; ValueError with one sentence where it can't work."""
    sizes = list(batch_sizes) if isinstance(batch_sizes, (list, tuple)) else None
    if not sizes or not all(isinstance(s, int) and not isinstance(s, bool) and 1 <= s <= MAX_BATCH_SIZE
                            for s in sizes):
        raise ValueError(f"BATCH_SIZES must be a list of whole numbers from 1 to {MAX_BATCH_SIZE}, such as "
                         f"[1, 2, 4], got {batch_sizes!r}.")
    return sorted(set(sizes))


def block_widths(pipe):
    """The widths at which the UNet's repeated blocks run: each is a graph of its own with static shapes."""
    unet = getattr(pipe.unet, "_orig_mod", pipe.unet)
    return sorted({m.norm1.normalized_shape[0] for m in unet.modules() if type(m).__name__ in unet._repeated_blocks})


def allow_recompiles(pipe, batch_sizes):
    """Raise `torch._dynamo.config.recompile_limit` to what `batch_sizes` need with static shapes, and say so.

    Every block shares one code object, on which Dynamo keeps one compiled version per width and batch size (the
    batch of 1 of the comparison included); past the limit a `fullgraph=True` compile raises
    `FailOnRecompileLimitHit`. Returns the limit now in force.
    """
    needed = len(block_widths(pipe)) * len(set(batch_sizes) | {1})
    limit = torch._dynamo.config.recompile_limit
    if needed > limit:
        torch._dynamo.config.recompile_limit = needed
        print(f"torch._dynamo.config.recompile_limit raised from {limit} to {needed}: with static shapes every "
              f"batch size compiles the block once per width ({len(block_widths(pipe))} widths).")
    return torch._dynamo.config.recompile_limit


def decode_in_slices_if_needed(pipe, params, batch_size):
    """Have the VAE decode a batch one image at a time where all at once would not fit in the GPU's free memory.

    The estimate is the course's peak activations of one image's decode (`models.ACTIVATION_BYTES`, measured at
    1024x1024) times the batch; returns whether slicing is on. On a CPU nothing changes.
    """
    if not torch.cuda.is_available():
        return False
    height, width = image_size(params)
    per_image = ACTIVATION_BYTES[4 if pipe.vae.dtype.itemsize >= 4 else 2] * height * width / 1024**2
    need = per_image * batch_size
    free = torch.cuda.mem_get_info()[0] + torch.cuda.memory_reserved() - torch.cuda.memory_allocated()
    if need > free and not getattr(pipe.vae, "use_slicing", False):
        pipe.vae.enable_slicing()
        print(f"batch {batch_size}: the VAE decodes one image at a time (`pipe.vae.enable_slicing()`): all at once "
              f"needs about {need / 1e9:.1f} GB, and {free / 1e9:.1f} GB is free.")
    return bool(getattr(pipe.vae, "use_slicing", False))


def graphs_compiled():
    """Graphs Dynamo has compiled in this process so far (each recompile adds one)."""
    return counters["stats"]["unique_graphs"]


def measure_batch(pipe, params, batch_size, progress=True):
    """Time calls of `batch_size` prompts; returns a record (step 07's fields, plus the batch's) and prints a line.

    The first call is timed apart: on a compiled pipeline it is where a new batch size recompiles.
    """
    (batch_size,) = check_batch_sizes([batch_size])
    sliced = decode_in_slices_if_needed(pipe, params, batch_size)
    compiled_per_call, hits_before = [], recompile_limit_hits()

    def call():
        before = graphs_compiled()
        images = generate_batch(pipe, params, [params.prompt] * batch_size)
        compiled_per_call.append(graphs_compiled() - before)
        return images

    extra = {"batch_size": batch_size, "vae_slicing": sliced}
    try:
        measurement = benchmark(call, warmup=params.warmup, runs=params.runs, progress=progress,
                                description=f"batch {batch_size}")
    except torch.OutOfMemoryError:
        measurement = None
        free_memory()
        record = make_record("07", None, params, dtype=pipe.unet.dtype, status="out_of_memory", extra=extra,
                             note=f"batch {batch_size} ran out of memory")
        print(f"batch {batch_size}: out of memory; the next batch size still runs (smaller images or a GPU with "
              "more memory would fit it).")
        return record
    extra |= {
        "images_per_s": batch_size / measurement.median_s,
        "s_per_image": measurement.median_s / batch_size,
        "graphs_compiled": compiled_per_call[0],
        "graphs_compiled_later": sum(compiled_per_call[1:]),  # above 0: recompiling in steady state, see caveat
        "recompile_limit_hits": recompile_limit_hits() - hits_before,  # above 0: a region ran eagerly, or raised
        "cudagraph_fallback": last_cudagraph_fallback(),
        "compiled": pipeline_state(pipe)["compiled"],  # what was compiled and how ({} when nothing was)
    }
    record = make_record("07", measurement, params, dtype=pipe.unet.dtype, extra=extra)
    print(summary(record))
    return record


def measured(records):
    """The records of the batch sizes that ran (not out of memory)."""
    return [r for r in records if r["status"] == "ok"]


def summary_of(out_dir, notebook):
    """The runner's line for an executed notebook 09: its batch sizes and the best images per second."""
    from .results import load_records

    records = [r for r in load_records(Path(out_dir) / THROUGHPUT_DIR, quiet=True) if r.get("notebook") == notebook]
    ran = [r for r in measured(records) if r.get("images_per_s")]
    if not ran:
        return None
    best = max(ran, key=lambda r: r["images_per_s"])
    sizes = ", ".join(str(s) for s in sorted({r["batch_size"] for r in records}))
    return (f"batch sizes {sizes}: at most {best['images_per_s']:.2f} images/s (batch {best['batch_size']}, "
            f"{best['median_s']:.3f} s per call) on {best['device']}")


def summary(record):
    """'batch 4: 3.21 images/s, 0.311 s per image (...)': one record in a line."""
    memory = record.get("peak_memory_gb")
    memory = f", peak memory {memory:.2f} GB" if memory is not None else ""
    text = (
        f"batch {record['batch_size']}: {record['images_per_s']:.2f} images/s, {record['s_per_image']:.3f} s per "
        f"image, {measurement_sentence(record['median_s'], record['iqr_s'], per='call')}{memory}; first call "
        f"{record['first_call_s']:.1f} s, {record['graphs_compiled']} graph(s) compiled"
    )
    if record["noisy"]:
        text += "\n" + noisy_sentence(record["median_s"], record["iqr_s"])
    if record["graphs_compiled_later"]:
        text += (f"\nRecompiled {record['graphs_compiled_later']} graph(s) after the first call: the median holds "
                 "compile time; raise WARMUP, or see the notebook's caveat on torch's recompile limit.")
    return text


def table(records):
    """The records as a table: a row per batch size."""
    lines = [f"{'batch':>5} {'images/s':>9} {'s/image':>8} {'s/call':>8} {'IQR s':>7} {'first call s':>13} "
             f"{'graphs':>7} {'peak GB':>8}"]
    for r in records:
        if r["status"] != "ok":
            lines.append(f"{r['batch_size']:>5} {r['status'].replace('_', ' ')}")
            continue
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
    records = sorted(measured(records), key=lambda r: r["batch_size"])
    if not records:
        raise ValueError("There are no throughput records to draw: measure at least one batch size that fits first.")
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
