"""Cold start: what a compiled pipeline costs before its first image, and the ways to pay that cost only once.

- A compile-cache file, made by `python -m helpers warm --out FILE`: torch's portable compile artifacts of each
  compiled step (`torch.compiler.save_cache_artifacts()`, the "mega-cache") with a manifest of what they are valid
  for. `use_compile_cache` checks the manifest against this machine and loads the artifacts into Inductor's caches
  (`torch.compiler.load_cache_artifacts`) before the first compile; a file made for anything else is refused in one
  sentence that names what differs, and never used.
- `first_call_state()`: whether this process's compiles were cold or warm, read from Inductor's own cache counters,
  so a record never calls a compile cold that a cache answered.
- An AOTInductor package of the UNet (`package_unet`, `load_unet_package`): compiled ahead of time into a `.pt2`
  file, loaded with no compiler at all.
- `time_start`: one way of starting, timed in a fresh Python process as an attendee's new kernel starts
  (notebook 08 compares them).
"""

import dataclasses
import datetime
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

import torch
from torch._dynamo.utils import counters

from .results import device_name, package_versions, write_atomically

FORMAT = 1
MANIFEST_NAME = "manifest.json"
ARTIFACTS_NAME = "artifacts.bin"
KERNELS_PREFIX = "kernels/"  # Inductor's compiled C++ kernels, at their paths in its cache folder
# What the compiled code depends on: a file made where any of these differ is refused.
MUST_MATCH = ("device", "torch", "triton", "python", "diffusers", "torchao", "dtype", "compile_mode", "height",
              "width", "unet_batch", "architecture")
WARM_COMMAND = "python -m helpers warm --out FILE"
WAYS = ("cold", "disk", "file", "package")
LAUNCHED_ENV = "SDXL_FAST_LAUNCHED"  # when time_start started the child, as time.time()

_loaded = {}  # the file use_compile_cache loaded into this process, and its manifest


class CompileCacheMismatch(ValueError):
    """A compile-cache file made for another machine, torch, mode, size or model: the message names what differs."""


def triton_version():
    try:
        import triton
    except ImportError:
        return None
    return triton.__version__


def architecture(pipe):
    """A short fingerprint of the UNet's and the VAE's configuration: the real SDXL and `sdxl-random` share it, so a
    file warmed with `sdxl-random` (no download) serves the real weights; `tiny` has another."""
    configs = {
        name: {key: value for key, value in dict(model.config).items() if not key.startswith("_")}
        for name, model in (("unet", pipe.unet), ("vae", pipe.vae))
    }
    return hashlib.sha256(json.dumps(configs, sort_keys=True, default=str).encode()).hexdigest()[:12]


def expected_manifest(params, pipe=None, device=None):
    """The MUST_MATCH fields for this machine and these parameters; `architecture` only where `pipe` is given."""
    from .images import image_size
    from .models import low_precision_dtype

    versions = package_versions()
    height, width = image_size(params)
    return {
        "device": device_name(device),
        "torch": torch.__version__,
        "triton": triton_version(),
        "python": ".".join(versions["python"].split(".")[:2]),
        "diffusers": versions["diffusers"],
        "torchao": versions["torchao"],
        "dtype": str(low_precision_dtype(device, verbose=False)).removeprefix("torch."),
        "compile_mode": params.compile_mode,
        "height": height,
        "width": width,
        "unet_batch": 2 if params.guidance > 1 else 1,  # classifier-free guidance doubles the UNet's batch
        "architecture": architecture(pipe) if pipe is not None else None,
    }


def _cache_folder():
    """The Inductor cache folder of this process (TORCHINDUCTOR_CACHE_DIR, or torch's default)."""
    from torch._inductor.runtime.cache_dir_utils import cache_dir

    return Path(cache_dir())


def save_compile_cache(path, params, pipe, steps, architecture_id=None):
    """Write this process's compile artifacts, the compiled C++ kernels of its cache folder and their manifest to
    `path` (one zip file); returns the manifest.

    torch's blob (`save_cache_artifacts`) holds Inductor's output code and, on a GPU, the Triton kernels' binaries;
    it leaves out the shared libraries that C++ compiled on a CPU, which Inductor finds by their own keys in its
    cache folder. They are added from this process's cache folder: make the file in a process that started with an
    empty one (`python -m helpers warm` does), so that it holds this compile's kernels and no others.
    """
    saved = torch.compiler.save_cache_artifacts()
    if saved is None or not any(saved[1].artifacts.values()):
        raise RuntimeError("Nothing was compiled in this process yet: run a compiled pipeline once, then save.")
    blob, info = saved
    folder = _cache_folder()
    kernels = sorted(folder.rglob("*.so"))
    manifest = {
        "format": FORMAT,
        **expected_manifest(params, pipe),
        **({"architecture": architecture_id} if architecture_id else {}),
        "model": params.model,
        "steps": sorted(steps),
        "artifacts": {kind: len(keys) for kind, keys in info.artifacts.items() if keys},
        "cpp_kernels": len(kernels),
        "made": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }

    def write(f):
        with zipfile.ZipFile(f, "w", compression=zipfile.ZIP_DEFLATED) as archive:
            archive.writestr(MANIFEST_NAME, json.dumps(manifest, indent=1))
            archive.writestr(ARTIFACTS_NAME, blob)
            for kernel in kernels:
                archive.write(kernel, KERNELS_PREFIX + kernel.relative_to(folder).as_posix())

    write_atomically(path, write)
    return manifest


def read_manifest(path):
    """The manifest of a compile-cache file; one sentence where the file isn't one."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"No compile-cache file at {path}: make one with `{WARM_COMMAND}`.")
    try:
        with zipfile.ZipFile(path) as archive:
            manifest = json.loads(archive.read(MANIFEST_NAME))
            if ARTIFACTS_NAME not in archive.namelist():
                raise KeyError(ARTIFACTS_NAME)
    except (zipfile.BadZipFile, KeyError, ValueError, OSError) as error:
        raise CompileCacheMismatch(
            f"{path} is not a compile-cache file ({type(error).__name__}): make one with `{WARM_COMMAND}`."
        ) from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise CompileCacheMismatch(f"{path} was made by another version of this course: warm it again with "
                                   f"`{WARM_COMMAND}`.")
    return manifest


def load_compile_cache(path):
    """Put a compile-cache file's contents into this process's caches: its compiled C++ kernels into the cache
    folder (where absent), its artifacts through `torch.compiler.load_cache_artifacts`. Returns their count."""
    folder = _cache_folder().resolve()
    with zipfile.ZipFile(path) as archive:
        for name in archive.namelist():
            if not name.startswith(KERNELS_PREFIX):
                continue
            target = (folder / name.removeprefix(KERNELS_PREFIX)).resolve()
            if folder not in target.parents:
                raise CompileCacheMismatch(f"{Path(path).name} holds a file outside the cache folder ({name}): "
                                           "it was not made by this course; don't use it.")
            if not target.exists():
                write_atomically(target, lambda f, name=name: f.write(archive.read(name)))
        info = torch.compiler.load_cache_artifacts(archive.read(ARTIFACTS_NAME))
    return sum(len(keys) for keys in info.artifacts.values()) if info else 0


def check_compile_cache(path, params, pipe=None, step=None, device=None, manifest=None):
    """The file's manifest, if its artifacts were made for this machine, these parameters and `step`; otherwise
    CompileCacheMismatch, in one sentence naming each difference."""
    manifest = manifest or read_manifest(path)
    here = expected_manifest(params, pipe, device)
    differ = [key for key in MUST_MATCH
              if manifest.get(key) != here[key] and not (key == "architecture" and pipe is None)]
    if differ:
        theirs = ", ".join(f"{key} {manifest.get(key)!r}" for key in differ)
        ours = ", ".join(f"{key} {here[key]!r}" for key in differ)
        raise CompileCacheMismatch(
            f"{Path(path).name} was made for {theirs}, but here it is {ours}: its compiled code would not match, so "
            f"it is not used; warm a file here with `{WARM_COMMAND}` and the same parameters."
        )
    if step is not None and step not in manifest.get("steps", []):
        raise CompileCacheMismatch(
            f"{Path(path).name} holds the compiled steps {', '.join(manifest.get('steps', [])) or 'none'}, not {step}: "
            f"warm it with `{WARM_COMMAND} --only {step}` (or 04-07 for all of them)."
        )
    return manifest


def use_compile_cache(pipe, params, step):
    """Step 04 and later, before the first call: load the compile artifacts of `params.compile_cache`, if it names a
    file, after checking that they were made for this pipeline and machine. Returns the manifest, or None."""
    if params.compile_cache is None:
        print("No compile cache (COMPILE_CACHE = None): the first call compiles, from scratch unless Inductor's cache "
              "folder already holds this work.")
        return None
    manifest = check_compile_cache(params.compile_cache, params, pipe, step)
    count = load_compile_cache(params.compile_cache)
    _loaded.update(file=str(params.compile_cache), manifest=manifest)
    print(f"Compile cache: loaded {count} compile artifacts and {manifest['cpp_kernels']} C++ kernels from "
          f"{Path(params.compile_cache).name} (made on "
          f"{manifest['device']} with torch {manifest['torch']}, {manifest['made']}).")
    return manifest


def first_call_state():
    """Were this process's compiles answered by a cache? From Inductor's FX graph cache counters:
    "cold" (every graph compiled), "warm" (every graph from a cache), "partly warm", or "not compiled"."""
    hits, misses = counters["inductor"]["fxgraph_cache_hit"], counters["inductor"]["fxgraph_cache_miss"]
    state = {(0, 0): "not compiled"}.get((hits, misses)) or ("warm" if not misses else "cold" if not hits
                                                             else "partly warm")
    source = None
    if hits:
        source = Path(_loaded["file"]).name if _loaded else "Inductor's cache folder"
    return {"first_call": state, "warm_from": source, "fx_graph_cache": {"hits": hits, "misses": misses}}


def warm(params, out, only="04-07", progress=True):
    """`python -m helpers warm`: compile each compiled step of `only` once and save their artifacts to `out`."""
    from .models import check_model, download, resolve_model
    from .runner import _environment, select_steps
    from .steps import STEPS

    steps = [step for step in select_steps(only) if step in STEPS and step.settings.compile != "off"]
    if not steps:
        raise ValueError(f"--only {only} names no compiled step: choose among 04-07.")
    _check_out_file(Path(out))
    model = check_model(resolve_model(params.model))
    download(model, verbose=progress)
    params = dataclasses.replace(params, model=model, steps=2)  # two steps compile all a 30-step image does
    with tempfile.TemporaryDirectory(prefix="inductor-warm-") as folder:
        with _environment({"TORCHINDUCTOR_CACHE_DIR": folder}):
            return _warm(params, out, steps, progress)


def _warm(params, out, steps, progress):
    """Compile `steps` in an empty cache folder, so that the file holds their work and nothing older."""
    from .images import generate
    from .ladder import build_pipeline
    from .memory import free_memory

    fingerprint = None
    for step in steps:
        start = time.perf_counter()
        pipe = build_pipeline(params.model, step.settings, compile_mode=params.compile_mode, verbose=False)
        pipe.set_progress_bar_config(disable=not progress)
        fingerprint = fingerprint or architecture(pipe)
        generate(pipe, params)
        print(f"{step.id} {step.title}: compiled in {time.perf_counter() - start:.1f} s", flush=True)
        del pipe
        free_memory()  # one pipeline on the GPU at a time
    manifest = save_compile_cache(out, params, None, [step.id for step in steps], architecture_id=fingerprint)
    size = Path(out).stat().st_size / 1e6
    print(f"Saved {sum(manifest['artifacts'].values())} compile artifacts and {manifest['cpp_kernels']} C++ kernels "
          f"of steps {', '.join(manifest['steps'])} to {out} ({size:.1f} MB), valid on {manifest['device']} with "
          f"torch {manifest['torch']}, {manifest['height']}x{manifest['width']}, {manifest['compile_mode']}. "
          "Attendees pass "
          f"--compile-cache {out} to the runner, or set COMPILE_CACHE = {str(out)!r} in a notebook.")
    return manifest


def _check_out_file(path):
    from .runner import _check_writable

    if path.is_dir():
        raise ValueError(f"--out {path} is a folder: name the file to write, e.g. {path / 'compile-cache.zip'}.")
    _check_writable(path.parent)


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
    """Export the UNet at `params`' size and compile it ahead of time into the AOTInductor package `path`."""
    from .ladder import matmul_autotuning

    args, kwargs = unet_inputs(pipe, params)
    with torch.no_grad():
        program = torch.export.export(pipe.unet, args, kwargs)
    autotune = "max-autotune" in params.compile_mode and matmul_autotuning(pipe.device)["autotunes_matmuls"]
    return torch._inductor.aoti_compile_and_package(
        program, package_path=str(path), inductor_configs={"max_autotune": autotune}
    )


def load_unet_package(pipe, path):
    """Run the UNet from an AOTInductor package: the pipeline calls `pipe.unet` as before (its config, dtype and
    device stay the module's), and the module's forward is the package's compiled code."""
    pipe.unet.forward = torch._inductor.aoti_load_package(str(path))


# Starts timed in a fresh process.


def folder_bytes(folder):
    return sum(path.stat().st_size for path in Path(folder).rglob("*") if path.is_file())


def time_start(way, params, workdir, compile="full", compile_mode=None, cache_dir=None, compile_cache=None,
               save_compile_cache_to=None, package=None):
    """Start the step-04 pipeline one `way` in a fresh Python process and return what it measured.

    cold: an empty Inductor cache folder; disk: `cache_dir`, the folder an earlier start filled; file: an empty
    folder plus the artifacts of `compile_cache`; package: the UNet from the AOTInductor `package` (no compiler;
    the VAE runs eagerly). `compile` is "full" or "regional" ("aot" for the package). The child's output goes to a
    log in `workdir`.
    """
    if way not in WAYS:
        raise ValueError(f"way must be one of {', '.join(WAYS)}, got {way!r}.")
    compile = "aot" if way == "package" else compile  # the package's UNet was compiled ahead of time, not here
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    mode = compile_mode or params.compile_mode
    name = f"{way}-{compile}-{mode}"
    cache_dir = Path(cache_dir) if cache_dir else Path(tempfile.mkdtemp(prefix=f"inductor-{name}-", dir=workdir))
    spec = {
        "way": way, "compile": compile, "params": {**params.to_dict(), "compile_mode": mode,
                                                   "compile_cache": str(compile_cache) if compile_cache else None},
        "save_compile_cache_to": str(save_compile_cache_to) if save_compile_cache_to else None,
        "package": str(package) if package else None,
    }
    spec_file, result_file, log = (workdir / f"{name}{suffix}" for suffix in (".spec.json", ".result.json", ".log"))
    spec_file.write_text(json.dumps(spec))
    result_file.unlink(missing_ok=True)
    course = str(Path(__file__).resolve().parent.parent)  # `import helpers` also where the course isn't installed
    python_path = os.pathsep.join(filter(None, [course, os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(cache_dir), "PYTHONUNBUFFERED": "1", "PYTHONPATH": python_path}
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
    result = _start(json.loads(Path(spec_file).read_text()), float(os.environ[LAUNCHED_ENV]))
    Path(result_file).write_text(json.dumps(result))


def _start(spec, launched):
    """Start as `spec` says; the times are from `launched` (the moment the process was started), as a user waits."""
    from .images import generate
    from .ladder import build_pipeline, compile_pipeline, compile_regions
    from .params import Params
    from .steps import get_step
    from .timing import benchmark

    imported = time.time() - launched  # Python, torch, diffusers and the helpers
    params = Params(**spec["params"])
    settings = dataclasses.replace(get_step("04").settings, compile="off")
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
        (compile_regions if spec["compile"] == "regional" else compile_pipeline)(pipe, mode=params.compile_mode)
    prepared = time.time() - launched
    measurement = benchmark(lambda: generate(pipe, params), warmup=params.warmup, runs=params.runs, progress=False)
    if spec["save_compile_cache_to"]:
        save_compile_cache(spec["save_compile_cache_to"], params, pipe, ["04"])
    return {
        "way": spec["way"], "compile": spec["compile"], "compile_mode": params.compile_mode, "device": device_name(),
        "import_s": imported, "load_s": loaded - imported, "prepare_s": prepared - loaded,
        "first_call_s": measurement.first_call_s,
        "to_first_image_s": prepared + measurement.first_call_s,  # since Python started
        "median_s": measurement.median_s, "iqr_s": measurement.iqr_s, **first_call_state(),
    }


# What notebook 08 keeps and shows.

COLD_START_DIR = "cold_start"  # inside OUT_DIR: its own results.json, so the ladder's chart never reads these
WAY_NAMES = {"cold": "cold", "disk": "Inductor's cache folder", "file": "compile-cache file",
             "package": "AOTInductor package"}
PHASES = (("import_s", "import"), ("load_s", "load the pipeline"), ("prepare_s", "prepare (load a cache or package)"),
          ("first_call_s", "first call"))


def record_start(params, result):
    """Append one start to `<out_dir>/cold_start/results.json`, with the device, versions and parameters; returns
    the record."""
    from .results import EXECUTED_NOTEBOOK_ENV, append_record, driver_version

    record = {
        **{key: value for key, value in result.items() if key != "cache_dir"},
        "driver": driver_version(), "versions": package_versions(), "params": params.to_dict(),
        "notebook": os.environ.get(EXECUTED_NOTEBOOK_ENV),
        "time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    append_record(Path(params.out_dir) / COLD_START_DIR, record)
    return record


def load_start_records(out_dir):
    """The records of `<out_dir>/cold_start/results.json`, oldest first ([] where there is none)."""
    from .results import RESULTS_FILE, _read

    return _read(Path(out_dir) / COLD_START_DIR / RESULTS_FILE)[0]


def describe_start(result):
    """'cold, full compile, max-autotune: 61.2 s to the first image (...), then 0.084 s per image (...)'."""
    phases = ", ".join(f"{label} {result[key]:.1f} s" for key, label in PHASES)
    cache = result["fx_graph_cache"]
    return (f"{WAY_NAMES[result['way']]}, {_how(result)}, {result['compile_mode']}: "
            f"{result['to_first_image_s']:.1f} s to the first image ({phases}), then {result['median_s']:.3f} s per "
            f"image (IQR {result['iqr_s']:.3f} s); FX graphs from a cache {cache['hits']}, compiled {cache['misses']}")


def _how(result):
    return "the UNet compiled ahead of time" if result["compile"] == "aot" else f"{result['compile']} compile"


def summary_line(records):
    """The runner's one line for notebook 08: time to the first image of each way, full compile, the course's mode."""
    mode = records[-1]["params"]["compile_mode"]
    shown = {r["way"]: r for r in records if r["compile"] in ("full", "aot") and r["compile_mode"] == mode}
    parts = [f"{WAY_NAMES[way]} {shown[way]['to_first_image_s']:.1f} s" for way in WAYS if way in shown]
    return f"time to the first image ({mode}): {', '.join(parts)}"


def draw_compile_modes(records, path=None):
    """Each compile mode's first call (compile and run) beside its steady seconds per image, in two panels."""
    from matplotlib.figure import Figure

    modes = [r["compile_mode"] for r in records]
    figure = Figure(figsize=(10, 0.6 * len(records) + 1.6), layout="constrained")
    first, steady = figure.subplots(1, 2, sharey=True)
    for axis, key, title in ((first, "first_call_s", "first call: compile + one image (s)"),
                             (steady, "median_s", "steady: seconds per image (median, IQR)")):
        values = [r[key] for r in records]
        errors = [r["iqr_s"] / 2 for r in records] if key == "median_s" else None
        bars = axis.barh(modes, values, xerr=errors, color="#4c72b0" if key == "median_s" else "#dd8452")
        axis.bar_label(bars, labels=[f"{v:.3f}" if key == "median_s" else f"{v:.1f}" for v in values], padding=3)
        axis.set_title(title)
        axis.margins(x=0.25)
    first.invert_yaxis()
    figure.suptitle(f"Compile modes on {records[0]['device']}, {records[0]['params']['model']}")
    if path is not None:
        figure.savefig(path, dpi=110)
    return figure


def draw_starts(records, path=None):
    """Each way of starting as one stacked bar: import, load, load cache or package, first call."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=(10, 0.7 * len(records) + 1.6), layout="constrained")
    axis = figure.subplots()
    labels = [f"{WAY_NAMES[r['way']]}\n({_how(r)})" for r in records]
    left = [0.0] * len(records)
    for key, label in PHASES:
        values = [r[key] for r in records]
        axis.barh(labels, values, left=left, label=label)
        left = [a + b for a, b in zip(left, values)]
    for y, r in enumerate(records):
        axis.text(left[y], y, f" {r['to_first_image_s']:.1f} s", va="center")
    axis.invert_yaxis()
    axis.margins(x=0.15)
    axis.set_xlabel("seconds from a new Python process to its first image")
    axis.legend(loc="lower right")
    axis.set_title(f"Starting the step-04 pipeline on {records[0]['device']}, {records[0]['params']['model']}")
    if path is not None:
        figure.savefig(path, dpi=110)
    return figure
