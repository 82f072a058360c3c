"""Where the pipeline comes from, and on which device and in which dtype it runs.

`model` is one of:
- a hub id or a local folder in diffusers format, loaded with `StableDiffusionXLPipeline.from_pretrained`
  (safetensors only);
- "tiny": an SDXL-shaped pipeline built in code, for machines without a GPU or without the hub;
- "sdxl-random": full-size SDXL with random weights: real latency, images of noise;
- "auto": the real SDXL on a GPU, "tiny" on a CPU.
"""

import json
import re
from contextlib import contextmanager
from pathlib import Path

import torch
from diffusers import StableDiffusionXLPipeline
from diffusers.utils import logging as diffusers_logging

from . import offline

SDXL_HUB_ID = "stabilityai/stable-diffusion-xl-base-1.0"
OFFLINE_MODELS = ("tiny", "sdxl-random")
NATIVE_SIZE = {"tiny": 128}  # everything else is SDXL: 1024x1024
_HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+$")
OFFLINE_CHOICES = (
    "use model='tiny' (built in code, any machine), 'sdxl-random' (full-size SDXL with random weights, for "
    "timing on a GPU) or a local folder holding a diffusers SDXL pipeline"
)


class ModelUnavailable(RuntimeError):
    """The model can't be found or loaded; the message is one sentence that says what to do."""


def default_device():
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def resolve_model(model, verbose=True):
    """The concrete model for `model`, with "auto" decided by whether there is a GPU."""
    if model != "auto":
        return model
    if torch.cuda.is_available():
        chosen, why = SDXL_HUB_ID, f"a GPU is present ({torch.cuda.get_device_name()})"
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
    if folder.is_dir():
        index = folder / "model_index.json"
        try:
            class_name = json.loads(index.read_text()).get("_class_name")
        except (OSError, ValueError):
            class_name = None
        if class_name != "StableDiffusionXLPipeline":
            raise ModelUnavailable(
                f"{folder.name!r} is not a diffusers SDXL folder (its model_index.json must name "
                f"StableDiffusionXLPipeline); {OFFLINE_CHOICES}."
            )
        return model
    if not _HUB_ID.match(model):
        raise ModelUnavailable(f"Unknown model {model!r}: give a hub id like {SDXL_HUB_ID!r}, or {OFFLINE_CHOICES}.")
    return model


def native_size(model):
    return NATIVE_SIZE.get(resolve_model(model, verbose=False), 1024)


def low_precision_dtype(device=None, verbose=True):
    """bfloat16 where the hardware does it natively, else float16 (e.g. a T4), with the choice printed."""
    device = torch.device(device or default_device())
    if device.type != "cuda":
        dtype, why = torch.bfloat16, "the CPU supports it"
    elif torch.cuda.is_bf16_supported(including_emulation=False):
        dtype, why = torch.bfloat16, f"{torch.cuda.get_device_name(device)} supports it natively"
    else:
        dtype, why = torch.float16, (
            f"{torch.cuda.get_device_name(device)} has no native bfloat16, so float16 "
            "(same speed-up, narrower range; the VAE is upcast to fp32 by the pipeline)"
        )
    if verbose:
        print(f"Low precision: {str(dtype).removeprefix('torch.')} ({why}).")
    return dtype


def load_pipeline(model="auto", dtype=torch.float32, device=None, verbose=True):
    """A StableDiffusionXLPipeline in `dtype` on `device`, from the hub, a folder, or built in code."""
    model = check_model(resolve_model(model, verbose=verbose))
    device = torch.device(device or default_device())
    if model == "tiny":
        pipe = offline.tiny_pipeline()
    elif model == "sdxl-random":
        if verbose:
            print("sdxl-random: full-size SDXL with random weights; its latency is real, its images are noise.")
        pipe = offline.sdxl_random_pipeline(device=device)
    else:
        pipe = _from_pretrained(model, dtype)
    # Offline models are built in fp32 and cast, so every dtype starts from the same weights.
    with _quiet_diffusers():
        pipe = pipe.to(device=device, dtype=dtype)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@contextmanager
def _quiet_diffusers():
    """Silence diffusers' advice to cast through from_pretrained, which models built in code can't follow."""
    level = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()
    try:
        yield
    finally:
        diffusers_logging.set_verbosity(level)


def _from_pretrained(model, dtype):
    try:
        return StableDiffusionXLPipeline.from_pretrained(model, dtype=dtype, use_safetensors=True)
    except (OSError, ValueError) as error:
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ModelUnavailable(
            f"Could not load {model!r} ({first_line[:200]}); check the id and your connection or token, or "
            f"{OFFLINE_CHOICES}."
        ) from None
