"""Which model a name means, whether it can be loaded, and its files: everything about a model that needs no torch,
so that the runner's own process (`python -m helpers run`), which checks the model before any notebook starts,
imports neither torch nor diffusers (a model named "auto" asks torch whether it has a GPU, and a hub id is
downloaded with diffusers; only then are they imported).

`model` is one of:
- a hub id or a local folder in diffusers format, loaded with `StableDiffusionXLPipeline.from_pretrained`
  (safetensors only, the fp16 files where there are some: see `download`);
- "tiny": an SDXL-shaped pipeline built in code, for machines without a GPU or without the hub;
- "sdxl-random": full-size SDXL with random weights: real latency, images of noise;
- "auto": the real SDXL on a GPU, "tiny" on a machine without one.
"""

import json
import re
from contextlib import contextmanager
from pathlib import Path

from .errors import ModelUnavailable

SDXL_HUB_ID = "stabilityai/stable-diffusion-xl-base-1.0"
OFFLINE_MODELS = ("tiny", "sdxl-random")
NATIVE_SIZE = {"tiny": 128}  # everything else is SDXL: 1024x1024
_HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+$")
OFFLINE_CHOICES = (
    "use model='tiny' (built in code, any machine), 'sdxl-random' (full-size SDXL with random weights, for "
    "timing on a GPU) or a local folder holding a diffusers SDXL pipeline"
)

PIPELINE_MODELS = ("unet", "vae", "text_encoder", "text_encoder_2")


def resolve_model(model, verbose=True):
    """The concrete model for `model`, with "auto" decided by whether torch can use a GPU."""
    if model != "auto":
        return model
    import torch

    from .machine import nvidia_smi_gpu

    if torch.cuda.is_available():
        chosen, why = SDXL_HUB_ID, f"a GPU is present ({torch.cuda.get_device_name()})"
    elif gpu := nvidia_smi_gpu():
        build = f" (built for CUDA {torch.version.cuda})" if torch.version.cuda else ""
        raise ModelUnavailable(
            f"nvidia-smi sees a GPU ({gpu}) but this torch {torch.__version__}{build} can't use it: install a CUDA "
            "build of torch that matches the driver (see pytorch.org's install selector), or pass model='tiny' to "
            "run on the CPU on purpose."
        )
    else:
        chosen, why = "tiny", "no GPU here, so the small SDXL-shaped model built in code; its images are noise"
    if verbose:
        print(f"Model: {chosen} ({why}).")
    return chosen


def check_model(model):
    """Raise ModelUnavailable, without loading anything, if `model` can't name a pipeline."""
    model = resolve_model(model, verbose=False)
    if model in OFFLINE_MODELS:
        return model
    folder = Path(model).expanduser()
    if not folder.is_dir():
        if not _HUB_ID.match(model):
            raise ModelUnavailable(
                f"Unknown model {model!r}: give a hub id like {SDXL_HUB_ID!r}, or {OFFLINE_CHOICES}."
            )
        return model
    try:
        index = json.loads((folder / "model_index.json").read_text())
    except (OSError, ValueError):
        index = None
    if not isinstance(index, dict) or index.get("_class_name") != "StableDiffusionXLPipeline":
        raise ModelUnavailable(
            f"{folder.name!r} is not a diffusers SDXL folder (its model_index.json must be a JSON object naming "
            f"StableDiffusionXLPipeline); {OFFLINE_CHOICES}."
        )
    pickled = [
        name for name in PIPELINE_MODELS if (folder / name).is_dir() and not list((folder / name).glob("*.safetensors"))
    ]
    if pickled:
        raise ModelUnavailable(
            f"Could not load {folder.name!r}: there are no .safetensors weights in {', '.join(pickled)}, and the "
            "course loads no pickled .bin files (save the pipeline with safe_serialization=True); or "
            f"{OFFLINE_CHOICES}."
        )
    return model


def native_size(model):
    return NATIVE_SIZE.get(resolve_model(model, verbose=False), 1024)


def download(model, verbose=True):
    """Fetch a hub model's files once, with a progress bar, and return the local folder that holds them.

    The fp16 files where the repository has them: for the real SDXL about 6.9 GB (3.47 billion parameters at two
    bytes) instead of 13.9 GB of fp32 ones. Every step loads these same files, the fp32 baseline upcasting them, so
    every step starts from identical weights and quality differences measure only the optimizations. A repository
    without fp16 files gives its default ones. A local folder is returned as it is; the models built in code give None.
    """
    model = check_model(resolve_model(model, verbose=False))
    if model in OFFLINE_MODELS:
        return None
    if Path(model).expanduser().is_dir():
        return Path(model).expanduser()
    try:
        with quiet_diffusers():
            return Path(_download_preferring_fp16(model, verbose))
    except (OSError, ValueError) as error:
        raise unavailable(model, error) from None


def _download_preferring_fp16(model, verbose):
    from diffusers import DiffusionPipeline

    try:
        return DiffusionPipeline.download(model, variant="fp16", use_safetensors=True)
    except ValueError as error:  # diffusers refuses a variant that the repository doesn't have
        if "variant" not in str(error):
            raise
    if verbose:
        print(f"{model} has no fp16 files: downloading its default ones.")
    return DiffusionPipeline.download(model, use_safetensors=True)


def fp16_variant(folder):
    """"fp16" where a component of the pipeline in `folder` has fp16 weight files, else None (its default files)."""
    return "fp16" if any(_is_fp16(path) for path in weight_files(Path(folder))) else None


def weight_files(folder):
    """The weight files from_pretrained reads in `folder`: each component's fp16 ones where it has them."""
    files = []
    for component in _components(folder):
        found = sorted((folder / component).glob("*.safetensors"))
        fp16 = [path for path in found if _is_fp16(path)]
        files += fp16 if fp16 else [path for path in found if len(path.suffixes) == 1]
    return files


def _components(folder):
    """The pipeline's component folders, as model_index.json names them (a cloned repository holds others too)."""
    index = json.loads((folder / "model_index.json").read_text())
    return [name for name in index if not name.startswith("_") and (folder / name).is_dir()]


def _is_fp16(path):
    # diffusers' naming: model.fp16.safetensors, or model.fp16-00001-of-00002.safetensors when sharded
    return len(path.suffixes) > 1 and path.suffixes[-2].startswith(".fp16")


@contextmanager
def quiet_diffusers():
    """Silence diffusers' warnings where the course says what happened in one line of its own.

    They are its advice to cast through from_pretrained, which models built in code can't follow, and its
    multi-line notice that the hub is out of reach.
    """
    from diffusers.utils import logging as diffusers_logging

    level = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()
    try:
        yield
    finally:
        diffusers_logging.set_verbosity(level)


def unavailable(model, error):
    """The one-sentence ModelUnavailable for `model`, which failed to load with `error`: what to check."""
    if Path(model).expanduser().is_dir():
        advice = "check that the folder holds the whole pipeline, each model's weights as .safetensors files"
    else:
        advice = "check the id and your connection or token"
    return ModelUnavailable(f"Could not load {model!r} ({first_line(error)[:200]}); {advice}, or {OFFLINE_CHOICES}.")


def first_line(error):
    """The first line of `error`'s message, or its type's name where it has none."""
    return str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
