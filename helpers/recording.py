"""What each notebook does with its measurement: save the image, compare it with the baseline, record it."""

from pathlib import Path

from PIL import Image

from .compile_cache import first_call_state
from .flops import efficiency, image_flops, peak_tflops
from .images import describe_quality, image_size, quality, save_image
from .machine import device_name, matmul_autotuning
from .models import default_device
from .regions import last_cudagraph_fallback, recompile_limit_hits
from .results import append_record, load_records, make_record
from .steps import get_step

# The parameters that decide the image: a baseline is comparable only when all of them match.
IMAGE_PARAMS = ("model", "prompt", "negative_prompt", "steps", "height", "width", "guidance", "seed")


def comparable_record(step, params):
    """The newest successful record of `step` on this device with the same image parameters, or None."""
    step_id = get_step(step).id
    wanted = {name: getattr(params, name) for name in IMAGE_PARAMS}
    device = device_name()
    for record in reversed(load_records(params.out_dir, quiet=True)):
        same = all(record["params"].get(name) == value for name, value in wanted.items())
        if record["step"] == step_id and record["status"] == "ok" and record["device"] == device and same:
            return record
    return None


def _baseline(params):
    """(the baseline image's path relative to the output folder, the image) for these parameters, or (None, None).

    The path is the one the baseline's own record names, so a later run's image can never stand in for it."""
    record = comparable_record("01", params)
    if record is None or not isinstance(record.get("image"), str):
        return None, None
    path = Path(params.out_dir) / record["image"]
    try:
        return record["image"], Image.open(path).convert("RGB")
    except (OSError, ValueError):  # deleted or damaged since: no baseline rather than a wrong one
        return None, None


def baseline_image(params):
    """The fp32 baseline image for these parameters, if notebook 01 has made one."""
    return _baseline(params)[1]


def compute_efficiency(params, median_s):
    """FLOPs of one image, TFLOP/s achieved and the fraction of this GPU's datasheet peak, where they can be known."""
    height, width = image_size(params)
    try:
        flops = image_flops(params.model, height, width, params.steps, params.guidance)["total"]
    except ValueError:  # a local folder of another architecture: not counted
        return {}
    peak, source = peak_tflops(device_name()) or (None, None)
    return {"flops_per_image": flops, **efficiency(median_s, flops, peak), "peak_source": source}


def compile_facts(step):
    """For a compiled step: whether max-autotune autotunes matmuls on this device, and why (`matmul_autotuning`);
    whether the first call was compiled or cached; how often Dynamo met its recompile limit, which means a region
    ran eagerly or raised (`recompile_limit_hits`); and the CUDA-graph fallback, if there was one."""
    if step.settings.compile == "off":
        return {}
    return {"matmul_autotuning": matmul_autotuning(default_device()), "compile_cache": first_call_state(),
            "recompile_limit_hits": recompile_limit_hits(),
            "cudagraph_fallback": last_cudagraph_fallback()}


def record_step(step, measurement, params, dtype, image, note=None, extra=None):
    """Save the step's image and its record (with quality against the baseline); print a one-line summary."""
    step = get_step(step)
    baseline_file, baseline = (None, None) if step.id == "01" else _baseline(params)
    scores = quality(image, baseline) if baseline is not None else None
    image_file = save_image(image, params.out_dir, step.id)
    record = make_record(
        step.id, measurement, params, dtype=dtype, image_file=image_file, quality=scores, note=note,
        baseline_file=baseline_file if scores is not None else None,
        extra={**compute_efficiency(params, measurement.median_s), **compile_facts(step), **(extra or {})},
    )
    append_record(params.out_dir, record)
    print(f"{step.id} {step.title} on {record['device']}: {measurement}")
    if record.get("tflops_per_s"):
        fraction = record.get("peak_fraction")
        peak = f", {100 * fraction:.0f}% of the {record['peak_source']} peak" if fraction else ""
        rate = record["tflops_per_s"]
        rate = f"{rate:.1f} TFLOP/s" if rate >= 0.1 else f"{rate * 1e3:.2f} GFLOP/s"
        print(f"   {rate} of matmul, convolution and attention{peak}")
    if record.get("compile_cache"):
        cache = record["compile_cache"]
        source = f" from {cache['warm_from']}" if cache["warm_from"] else ""
        print(f"   first call: {cache['first_call']}{source} ({cache['fx_graph_cache']['hits']} compiled graphs from a "
              f"cache, {cache['fx_graph_cache']['misses']} compiled now)")
    if record.get("recompile_limit_hits"):
        print(f"   Dynamo met its recompile limit {record['recompile_limit_hits']} time(s): a region ran eagerly, or "
              "raised; release() the pipelines you no longer use, or raise torch._dynamo.config.recompile_limit")
    if step.tutorial_a100_s is not None:
        print(f"   the tutorial's A100 (1024x1024, 30 steps): {step.tutorial_a100_s:.2f} s")
    if step.id != "01":
        print(f"   image: {describe_quality(scores)}")
    return record
