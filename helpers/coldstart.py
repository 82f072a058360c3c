"""Cold start: what a compiled pipeline costs before its first image, and the ways to pay that cost only once.

- The compile-cache file (`helpers.compile_cache`, re-exported here): torch's portable compile artifacts of each
  compiled step with a manifest of what they are valid for, checked before they are loaded.
- An AOTInductor package of the UNet (`package_unet`, `load_unet_package`): compiled ahead of time into a `.pt2`
  file without the weights, loaded with no compiler at all and given the pipeline's own weights.
- `time_start`: one way of starting, timed in a fresh Python process as an attendee's new kernel starts
  (notebook 08 compares them).
"""

import dataclasses
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from .compile_cache import MUST_MATCH, check_compile_cache, first_call_state, save_compile_cache, use_compile_cache  # noqa: F401  (notebook 08 reads them from here)
from .machine import device_name, matmul_autotuning
from .regions import DEFAULT_REGIONS, REGIONS
from .sentences import measurement_sentence

WAYS = ("cold", "disk", "file", "package")
LAUNCHED_ENV = "SDXL_FAST_LAUNCHED"  # when time_start started the child, as time.time()
# Cache folders that torch writes into os.environ of a process that compiled, and that a "cold" child must not
# inherit: torch._inductor.runtime.triton_heuristics sets TRITON_CACHE_DIR (to the triton/ folder of Inductor's
# cache folder) when it first makes a Triton kernel. TORCHINDUCTOR_CACHE_DIR, which torch writes too, is set anew.
NOT_INHERITED = ("TRITON_CACHE_DIR",)
# Why the package's seconds per image are not comparable with the compiled starts': AOTInductor compiles with CUDA
# graphs off (its C++ wrapper sets triton.cudagraphs to False), and only the UNet is in the package.
PACKAGE_STEADY_CAVEAT = "not comparable: no CUDA graphs, eager VAE"


# AOTInductor: the UNet compiled ahead of time into one package.


class _Captured(Exception):
    pass


def unet_inputs(pipe, params):
    """The UNet's arguments in one denoising step of `pipe` at `params`' size: what `torch.export` traces."""
    from .images import generate

    seen = {}

    def capture(module, args, kwargs):
        seen.update(args=args, kwargs=kwargs)
        raise _Captured  # nothing more to run: the arguments are all export needs

    handle = pipe.unet.register_forward_pre_hook(capture, with_kwargs=True)
    try:
        generate(pipe, dataclasses.replace(params, steps=1))
    except _Captured:
        pass
    finally:
        handle.remove()
    return seen["args"], seen["kwargs"]


def package_unet(pipe, params, path):
    """Export the UNet at `params`' size and compile it ahead of time into the AOTInductor package `path`, without
    its weights (`aot_inductor.package_constants_in_so=False`): `load_unet_package` gives it the pipeline's."""
    args, kwargs = unet_inputs(pipe, params)
    with torch.no_grad():
        program = torch.export.export(pipe.unet, args, kwargs)
    autotune = "max-autotune" in params.compile_mode and matmul_autotuning(pipe.device)["autotunes_matmuls"]
    return torch._inductor.aoti_compile_and_package(program, package_path=str(path), inductor_configs={
        "max_autotune": autotune, "aot_inductor.package_constants_in_so": False})


def load_unet_package(pipe, path):
    """Run the UNet from an AOTInductor package made by `package_unet`: the pipeline calls `pipe.unet` as before (its
    config, dtype and device stay the module's), and the module's forward is the package's compiled code.

    The package's weights are the module's own tensors, by name (`load_constants(..., user_managed=True)`: no
    second copy), so the UNet is moved, cast or made channels_last before this, never after."""
    package = torch._inductor.aoti_load_package(str(path))
    unet = pipe.unet
    tensors = dict(unet.named_parameters(remove_duplicate=False)) | dict(unet.named_buffers(remove_duplicate=False))
    names = package.get_constant_fqns()
    missing = [name for name in names if name not in tensors]
    if missing:
        raise ValueError(f"{Path(path).name} needs {len(missing)} weights this UNet doesn't have (such as "
                         f"{missing[0]}): package this pipeline's UNet again.")
    package.load_constants({name: tensors[name] for name in names}, check_full_update=True, user_managed=True)
    unet.forward = package


# Starts timed in a fresh process.


def folder_bytes(folder):
    return sum(path.stat().st_size for path in Path(folder).rglob("*") if path.is_file())


def time_start(way, params, workdir, compile="full", compile_mode=None, cache_dir=None, compile_cache=None,
               save_compile_cache_to=None, package=None, step="04", regions=None):
    """Start a step's pipeline (04's unless `step` says) one `way` in a fresh Python process and return what it
    measured.

    cold: an empty Inductor cache folder, and no Triton cache folder inherited from this process; disk: `cache_dir`,
    the folder an earlier start filled; file: an empty folder plus the artifacts of `compile_cache`; package: the UNet
    from the AOTInductor `package` (no compiler; the VAE runs eagerly). `compile` is "full" or "regional" ("aot" for
    the package); a regional compile compiles the `regions` choice of `regions.REGIONS` (the course's default where
    None). The child's output, and its last image, go to `workdir`.
    """
    if way not in WAYS:
        raise ValueError(f"way must be one of {', '.join(WAYS)}, got {way!r}.")
    if regions is not None and regions not in REGIONS:
        raise ValueError(f"regions must be one of {', '.join(REGIONS)}, got {regions!r}.")
    compile = "aot" if way == "package" else compile  # the package's UNet was compiled ahead of time, not here
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    mode = compile_mode or params.compile_mode
    regions = (regions or DEFAULT_REGIONS) if compile == "regional" else None
    name = f"{way}-{compile}-{mode}-{step}" + (f"-{regions}" if regions else "")
    cache_dir = Path(cache_dir) if cache_dir else Path(tempfile.mkdtemp(prefix=f"inductor-{name}-", dir=workdir))
    spec = {
        "way": way, "compile": compile, "params": {**params.to_dict(), "compile_mode": mode,
                                                   "compile_cache": str(compile_cache) if compile_cache else None},
        "save_compile_cache_to": str(save_compile_cache_to) if save_compile_cache_to else None,
        "package": str(package) if package else None, "step": step, "regions": regions,
        "image": str(workdir / f"{name}.png"),
    }
    spec_file, result_file, log = (workdir / f"{name}{suffix}" for suffix in (".spec.json", ".result.json", ".log"))
    spec_file.write_text(json.dumps(spec))
    result_file.unlink(missing_ok=True)
    course = str(Path(__file__).resolve().parent.parent)  # `import helpers` also where the course isn't installed
    python_path = os.pathsep.join(filter(None, [course, os.environ.get("PYTHONPATH")]))
    env = {key: value for key, value in os.environ.items() if key not in NOT_INHERITED}
    env.update(TORCHINDUCTOR_CACHE_DIR=str(cache_dir), PYTHONUNBUFFERED="1", PYTHONPATH=python_path)
    command = [sys.executable, "-c", "import sys; from helpers.coldstart import main; main(sys.argv[1:])",
               str(spec_file), str(result_file)]
    with open(log, "w") as output:
        env[LAUNCHED_ENV] = repr(time.time())
        launched = time.perf_counter()
        done = subprocess.run(command, stdout=output, stderr=subprocess.STDOUT, env=env)  # here: paths stay relative
        process_s = time.perf_counter() - launched
    if done.returncode != 0 or not result_file.exists():
        last = log.read_text(errors="replace").strip().splitlines()[-1:] or ["no output"]
        raise RuntimeError(f"The {way} start ({compile} compile, {mode}) failed: {last[0]} (its log: {log}).")
    result = json.loads(result_file.read_text())
    result.update(process_s=process_s, cache_dir=str(cache_dir), cache_dir_bytes=folder_bytes(cache_dir))
    return result


def main(argv):
    """The child's side of time_start: `SPEC RESULT`, two JSON files."""
    spec_file, result_file = argv
    result = _start_and_measure(json.loads(Path(spec_file).read_text()), float(os.environ[LAUNCHED_ENV]))
    Path(result_file).write_text(json.dumps(result))


def _start_and_measure(spec, launched):
    """Start as `spec` says; the times are from `launched` (the moment the process was started), as a user waits."""
    from torch._dynamo.utils import counters

    from .images import generate
    from .ladder import build_pipeline, compile_pipeline, compile_regions
    from .params import Params
    from .regions import recompile_limit_hits
    from .steps import get_step
    from .timing import benchmark

    imported = time.time() - launched  # Python, torch, diffusers and the helpers
    params = Params(**spec["params"])
    settings = dataclasses.replace(get_step(spec["step"]).settings, compile="off")
    pipe = build_pipeline(params.model, settings, verbose=False)
    pipe.set_progress_bar_config(disable=True)
    loaded = time.time() - launched
    if spec["way"] == "package":
        from .ladder import set_inductor_flags

        set_inductor_flags()
        pipe.unet.to(memory_format=torch.channels_last)
        load_unet_package(pipe, spec["package"])
    else:
        if spec["way"] == "file":
            use_compile_cache(pipe, params, "04")
        if spec["compile"] == "regional":
            compile_regions(pipe, mode=params.compile_mode, regions=spec["regions"])
        else:
            compile_pipeline(pipe, mode=params.compile_mode)
    prepared = time.time() - launched
    graphs = []  # graphs Dynamo compiled in each call: the first call's are its regions (and the VAE decoder)

    def call():
        before = counters["stats"]["unique_graphs"]
        image = generate(pipe, params)
        graphs.append(counters["stats"]["unique_graphs"] - before)
        return image

    measurement = benchmark(call, warmup=params.warmup, runs=params.runs, progress=False)
    measurement.output.save(spec["image"])
    if spec["save_compile_cache_to"]:
        save_compile_cache(spec["save_compile_cache_to"], params, pipe, ["04"])
    return {
        "way": spec["way"], "compile": spec["compile"], "compile_mode": params.compile_mode, "device": device_name(),
        "step": spec["step"], "regions": spec["regions"], "image": spec["image"], "graphs": graphs[0],
        "graphs_later": sum(graphs[1:]), "recompile_limit_hits": recompile_limit_hits(),
        "import_s": imported, "load_s": loaded - imported, "prepare_s": prepared - loaded,
        "first_call_s": measurement.first_call_s,
        "to_first_image_s": prepared + measurement.first_call_s,  # since Python started
        "median_s": measurement.median_s, "iqr_s": measurement.iqr_s, **first_call_state(),
    }


# Planning figures, assumed and not measured by this course: minutes of one fresh process on an H100-class GPU with
# SDXL at 1024x1024, loading included. A cold max-autotune compile of the whole UNet (it benchmarks kernel
# configurations) 3-10, any other cold compile of it 1-4, a cold regional compile (the blocks and the VAE decoder, in
# any mode; scripts/gpu_reference.sh plans 4 for 07's) 1-4, a start from a cache or from the package 0.5-2.
GPU_MINUTES = {"cold max-autotune compile": (3, 10), "other cold compile": (1, 4), "regional cold compile": (1, 4),
               "warm start": (0.5, 2)}


def gpu_estimate(modes, compile_mode, region_choices):
    """Notebook 08's GPU time in one sentence, from what it runs: a cold start per mode of `modes` (the course's
    mode last), the package compiled in the notebook, three warm starts (cache folder, file, package) and a regional
    cold start per choice of `region_choices`, each at GPU_MINUTES."""
    def kind(mode):
        return "cold max-autotune compile" if mode.startswith("max-autotune") else "other cold compile"

    runs = ([kind(mode) for mode in modes] + [kind(compile_mode)] + ["regional cold compile"] * len(region_choices)
            + ["warm start"] * 3)
    low, high = (sum(GPU_MINUTES[run][end] for run in runs) for end in (0, 1))
    assumed = ", ".join(f"{a:g}-{b:g} minutes per {run}" for run, (a, b) in GPU_MINUTES.items())

    def counted(items, name):
        return f"{len(items)} {name}{'s' * (len(items) != 1)} ({', '.join(items)})"

    return (f"Estimated GPU time of this notebook with SDXL at 1024x1024 on an H100-class GPU: {low:g}-{high:g} "
            f"minutes, for {counted(modes, 'cold start')}, the package's compile, "
            f"{counted(region_choices, 'regional cold start')} and 3 warm starts, assuming {assumed} (planning "
            f"figures, not measurements).")


# What notebook 08 keeps and shows.

COLD_START_DIR = "cold_start"  # inside OUT_DIR: its own results.json, so the ladder's chart never reads these
WAY_NAMES = {"cold": "cold", "disk": "Inductor's cache folder", "file": "compile-cache file",
             "package": "AOTInductor package"}
PHASES = (("import_s", "import"), ("load_s", "load the pipeline"), ("prepare_s", "prepare (load a cache or package)"),
          ("first_call_s", "first call"))


def record_start(params, result):
    """Append one start to `<out_dir>/cold_start/results.json`, with the device, versions and parameters, and why its
    steady time can't be compared with the others' where it can't; returns the record."""
    from .results import append_record, base_record

    record = {
        **base_record(params),
        **{key: value for key, value in result.items() if key != "cache_dir"},  # its device: the child's
        "steady_caveat": PACKAGE_STEADY_CAVEAT if result["way"] == "package" else None,
    }
    append_record(Path(params.out_dir) / COLD_START_DIR, record)
    return record


def load_start_records(out_dir, quiet=True):
    """The usable records of `<out_dir>/cold_start/results.json`, oldest first ([] where there is none)."""
    from .results import load_records

    return load_records(Path(out_dir) / COLD_START_DIR, quiet=quiet, problem=start_problem)


def start_problem(record):
    """Why the runner's line for notebook 08 can't use `record` (a hand-edited one, say), or None."""
    from .results import is_number, shown

    if not isinstance(record, dict):
        return f"it is {shown(record)}, not a JSON object"
    if record.get("way") not in WAYS:
        return f"way {shown(record.get('way'))} is not one of {', '.join(WAYS)}"
    if record.get("compile") not in ("full", "regional", "aot"):
        return f"compile {shown(record.get('compile'))} is not one of full, regional, aot"
    params = record.get("params")
    if not (isinstance(record.get("compile_mode"), str) and isinstance(params, dict)
            and isinstance(params.get("compile_mode"), str)):
        return "its compile_mode or its params' compile_mode is missing"
    if not is_number(record.get("to_first_image_s"), True):
        return f"to_first_image_s is {shown(record.get('to_first_image_s'))}, not a positive number"
    return None


def describe_start(result):
    """'cold, full compile, max-autotune: 61.2 s to the first image (...), then 0.084 s per image (...)'."""
    phases = ", ".join(f"{label} {result[key]:.1f} s" for key, label in PHASES)
    cache = result["fx_graph_cache"]
    return (f"{WAY_NAMES[result['way']]}, {compile_description(result)}, {result['compile_mode']}: "
            f"{result['to_first_image_s']:.1f} s to the first image ({phases}), then {steady_sentence(result)}; "
            f"FX graphs from a cache {cache['hits']}, compiled {cache['misses']}")


def steady_sentence(result):
    """'0.084 s per image (IQR 0.002 s)', and why it can't be compared where it can't."""
    return measurement_sentence(result["median_s"], result["iqr_s"], per="image", note=result.get("steady_caveat"))


def compile_description(result):
    return "the UNet compiled ahead of time" if result["compile"] == "aot" else f"{result['compile']} compile"


def summary_of(out_dir, notebook):
    """The runner's line for an executed notebook 08, from the records it wrote."""
    records = [r for r in load_start_records(out_dir) if r.get("notebook") == notebook]
    return summary_line(records) if records else None


def summary_line(records):
    """The runner's one line for notebook 08: time to the first image of each way, full compile, the course's mode."""
    mode = records[-1]["params"]["compile_mode"]
    shown = {r["way"]: r for r in records if r["compile"] in ("full", "aot") and r["compile_mode"] == mode}
    parts = [f"{WAY_NAMES[way]} {shown[way]['to_first_image_s']:.1f} s" for way in WAYS if way in shown]
    return f"time to the first image ({mode}): {', '.join(parts)}"
