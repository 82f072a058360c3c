"""The compile-cache file, made by `python -m helpers warm --out FILE`: torch's portable compile artifacts of each
compiled step (`torch.compiler.save_cache_artifacts()`, the "mega-cache") with a manifest of what they are valid for.

`use_compile_cache` checks the file against this machine and loads the artifacts into Inductor's caches
(`torch.compiler.load_cache_artifacts`) before the first compile. A file that is not one, is damaged, was made for
anything else or for other steps is refused in one sentence that says which, and never used. `first_call_state()`
says whether this process's compiles were cold or warm, from Inductor's own cache counters.
"""

import dataclasses
import datetime
import hashlib
import json
import logging
import tempfile
import time
import zipfile
import zlib
from pathlib import Path

import torch

from .files import check_writable, environment, write_atomically
from .machine import device_name, package_versions
from .memory import compiler_counters, reset_compiler
from .steps import COMPILED_STEPS, WARMED_STEPS, select_steps

FORMAT = 2  # 2: the manifest holds each member's SHA-256
MANIFEST_NAME = "manifest.json"
ARTIFACTS_NAME = "artifacts.bin"
KERNELS_PREFIX = "kernels/"  # Inductor's compiled C++ kernels, at their paths in its cache folder
# What the compiled code depends on: a file made where any of these differ is refused.
MUST_MATCH = ("device", "torch", "triton", "python", "diffusers", "torchao", "dtype", "compile_mode", "height",
              "width", "unet_batch", "architecture")
# Every field of a manifest and its JSON type, checked in one place (read_manifest) so that no later line meets a
# missing one or one of another type: a type; a tuple of them (None: null); [type]: a list; {str: type}: an object.
FIELDS = {"format": int, "device": str, "torch": str, "triton": (str, None), "python": str, "diffusers": str,
          "torchao": (str, None), "dtype": str, "compile_mode": str, "height": int, "width": int, "unet_batch": int,
          "architecture": (str, None), "model": str, "steps": [str], "artifacts": {str: int}, "cpp_kernels": int,
          "made": str, "sha256": {str: str}}
WARM_COMMAND = "python -m helpers warm --out FILE"

_loaded = {}  # the file use_compile_cache loaded into this process, and its manifest


class CompileCacheMismatch(ValueError):
    """A compile-cache file refused: not one, damaged, or made for another machine, torch, mode, size, model or other
    steps. The message says which, in one sentence."""


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
    members = {ARTIFACTS_NAME: blob, **{KERNELS_PREFIX + kernel.relative_to(folder).as_posix(): kernel.read_bytes()
                                        for kernel in sorted(folder.rglob("*.so"))}}
    manifest = {
        "format": FORMAT,
        **expected_manifest(params, pipe),
        **({"architecture": architecture_id} if architecture_id else {}),
        "model": params.model,
        "steps": sorted(steps),
        "artifacts": {kind: len(keys) for kind, keys in info.artifacts.items() if keys},
        "cpp_kernels": len(members) - 1,
        "made": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "sha256": {name: hashlib.sha256(data).hexdigest() for name, data in members.items()},
    }

    def write(f):
        with zipfile.ZipFile(f, "w", compression=zipfile.ZIP_DEFLATED) as archive:
            archive.writestr(MANIFEST_NAME, json.dumps(manifest, indent=1))
            for name, data in members.items():
                archive.writestr(name, data)

    write_atomically(path, write)
    return manifest


def _fits(value, kind):
    """Whether a JSON value is of `kind`, as FIELDS writes kinds."""
    if isinstance(kind, tuple):
        return any(_fits(value, one) for one in kind)
    if isinstance(kind, list):
        return type(value) is list and all(_fits(item, kind[0]) for item in value)
    if isinstance(kind, dict):
        return type(value) is dict and all(_fits(item, kind[str]) for item in value.values())
    return value is None if kind is None else type(value) is kind  # type(): a JSON true is no number here


def _digest(archive, name):
    digest = hashlib.sha256()
    with archive.open(name) as member:
        for chunk in iter(lambda: member.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def read_manifest(path):
    """The manifest of a compile-cache file, once each of its fields is there with its type and each member of the
    file is the one that was saved; otherwise one sentence: not a compile-cache file, another version's, or damaged."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"No compile-cache file at {path}: make one with `{WARM_COMMAND}`.")
    again = f"make it again with `{WARM_COMMAND}`."
    try:
        with zipfile.ZipFile(path) as archive:
            manifest = json.loads(archive.read(MANIFEST_NAME))
            held = [name for name in archive.namelist() if name != MANIFEST_NAME]
        if ARTIFACTS_NAME not in held:
            raise KeyError(ARTIFACTS_NAME)
    except (zipfile.BadZipFile, KeyError, ValueError, OSError) as error:
        raise CompileCacheMismatch(
            f"{path} is not a compile-cache file ({type(error).__name__}): make one with `{WARM_COMMAND}`."
        ) from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise CompileCacheMismatch(f"{path} was made by another version of this course: {again}")
    wrong = [f"{key} {'missing' if key not in manifest else 'of another type'}"
             for key, kind in FIELDS.items() if key not in manifest or not _fits(manifest[key], kind)]
    if wrong:
        raise CompileCacheMismatch(f"{path.name} has a damaged manifest ({', '.join(wrong)}): {again}")
    saved = manifest["sha256"]
    try:
        with zipfile.ZipFile(path) as archive:
            changed = [name for name in held if name in saved and _digest(archive, name) != saved[name]]
    except (zipfile.BadZipFile, zlib.error, EOFError, OSError) as error:  # bytes that no longer match their CRC
        raise CompileCacheMismatch(f"{path.name} is damaged ({error}): {again}") from None
    differ = sorted(set(saved) ^ set(held)) + changed
    if manifest["cpp_kernels"] != sum(name.startswith(KERNELS_PREFIX) for name in held):
        differ.append("the count of C++ kernels")
    if differ:
        shown = ", ".join(differ[:3]) + (f" and {len(differ) - 3} more" if len(differ) > 3 else "")
        raise CompileCacheMismatch(f"{path.name} is damaged ({shown} not as saved): {again}")
    return manifest


def load_compile_cache(path):
    """Put a compile-cache file's contents into this process's caches: its artifacts through
    `torch.compiler.load_cache_artifacts`, then its compiled C++ kernels into the cache folder (where absent).
    Returns the artifacts' count; refuses, in one sentence and having written nothing, artifacts that don't load."""
    folder = _cache_folder().resolve()
    with zipfile.ZipFile(path) as archive:
        kernels = {name: (folder / name.removeprefix(KERNELS_PREFIX)).resolve() for name in archive.namelist()
                   if name.startswith(KERNELS_PREFIX)}
        for name, target in kernels.items():
            if folder not in target.parents:
                raise CompileCacheMismatch(f"{Path(path).name} holds a file outside the cache folder ({name}): "
                                           "it was not made by this course; don't use it.")
        # torch logs a traceback and returns None where it can't read the artifacts back: one sentence instead.
        log = logging.getLogger("torch.compiler._cache")
        was_disabled, log.disabled = log.disabled, True
        try:
            info = torch.compiler.load_cache_artifacts(archive.read(ARTIFACTS_NAME))
        finally:
            log.disabled = was_disabled
        if info is None:
            raise CompileCacheMismatch(f"{Path(path).name}'s compile artifacts did not load (torch could not read "
                                       f"them back), so nothing of it was used: make it again with `{WARM_COMMAND}`.")
        for name, target in kernels.items():
            if not target.exists():
                write_atomically(target, lambda f, name=name: f.write(archive.read(name)))
    return sum(len(keys) for keys in info.artifacts.values())


def check_compile_cache(path, params, pipe=None, steps=(), device=None):
    """The file's manifest, if its artifacts were made for this machine, these parameters and each compiled step of
    `steps` (one step id, or the ids of the steps about to run); otherwise CompileCacheMismatch, in one sentence
    naming each difference."""
    manifest = read_manifest(path)
    here = expected_manifest(params, pipe, device)
    differ = [key for key in MUST_MATCH
              if manifest[key] != here[key] and not (key == "architecture" and pipe is None)]
    if differ:
        theirs = ", ".join(f"{key} {manifest[key]!r}" for key in differ)
        ours = ", ".join(f"{key} {here[key]!r}" for key in differ)
        raise CompileCacheMismatch(
            f"{Path(path).name} was made for {theirs}, but here it is {ours}: its compiled code would not match, so "
            f"it is not used; warm a file here with `{WARM_COMMAND}` and the same parameters."
        )
    steps = [steps] if isinstance(steps, str) else steps
    missing = [step for step in steps if step in COMPILED_STEPS and step not in manifest["steps"]]
    if missing:
        held = ", ".join(manifest["steps"]) or "none"
        raise CompileCacheMismatch(
            f"{Path(path).name} holds the compiled steps {held}, not {', '.join(missing)}: warm it with "
            f"`{WARM_COMMAND} --only {','.join(missing)}` (or 04-07 for all of them)."
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
    counters = compiler_counters()
    hits, misses = counters["inductor"]["fxgraph_cache_hit"], counters["inductor"]["fxgraph_cache_miss"]
    state = {(0, 0): "not compiled"}.get((hits, misses)) or ("warm" if not misses else "cold" if not hits
                                                             else "partly warm")
    source = None
    if hits:
        source = Path(_loaded["file"]).name if _loaded else "Inductor's cache folder"
    return {"first_call": state, "warm_from": source, "fx_graph_cache": {"hits": hits, "misses": misses}}


def warm(params, out, only=WARMED_STEPS, progress=True):
    """`python -m helpers warm`: compile each compiled step of `only` once and save their artifacts to `out`."""
    from .sources import check_model, download, resolve_model

    steps = [step for step in select_steps(only) if step.id in COMPILED_STEPS]
    if not steps:
        raise ValueError(f"--only {only} names no compiled step: choose among 04-07.")
    _check_out_file(Path(out))
    model = check_model(resolve_model(params.model))
    download(model, verbose=progress)
    params = dataclasses.replace(params, model=model, steps=2)  # two steps compile all a 30-step image does
    with tempfile.TemporaryDirectory(prefix="inductor-warm-") as folder:
        with environment({"TORCHINDUCTOR_CACHE_DIR": folder}):
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
        reset_compiler()  # this step's compiled code and CUDA graphs go too; the artifacts to save stay
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

    if path.is_dir():
        raise ValueError(f"--out {path} is a folder: name the file to write, e.g. {path / 'compile-cache.zip'}.")
    check_writable(path.parent)
