"""Where the pipeline comes from, and on which device and in which dtype it runs.

`model` is one of:
- a hub id or a local folder in diffusers format, loaded with `StableDiffusionXLPipeline.from_pretrained`
  (safetensors only, the fp16 files where there are some: see `download`);
- "tiny": an SDXL-shaped pipeline built in code, for machines without a GPU or without the hub;
- "sdxl-random": full-size SDXL with random weights: real latency, images of noise;
- "auto": the real SDXL on a GPU, "tiny" on a machine without one.
"""

import functools
import json
import math
import re
from contextlib import contextmanager
from pathlib import Path

import torch

from .errors import ModelUnavailable
from .machine import nvidia_smi_gpu
from .memory import check_gpu_memory

SDXL_HUB_ID = "stabilityai/stable-diffusion-xl-base-1.0"
# SDXL's VAE fine-tuned to keep its activations within float16's range (see float16_vae).
FP16_SAFE_VAE = "madebyollin/sdxl-vae-fp16-fix"
OFFLINE_MODELS = ("tiny", "sdxl-random")
NATIVE_SIZE = {"tiny": 128}  # everything else is SDXL: 1024x1024
_HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+$")
OFFLINE_CHOICES = (
    "use model='tiny' (built in code, any machine), 'sdxl-random' (full-size SDXL with random weights, for "
    "timing on a GPU) or a local folder holding a diffusers SDXL pipeline"
)
# The UNet, the VAE and both text encoders of SDXL base, counted on the configs in offline.py.
SDXL_PARAMETERS = 3_468_837_867
PIPELINE_MODELS = ("unet", "vae", "text_encoder", "text_encoder_2")
# Peak activations of one 1024x1024 image (the VAE's decode), by bytes per element of the dtype: 3.2 GB in float32 and
# 2.25 GB in bfloat16, measured in eager mode on SDXL's shapes with plain attention, rounded up.
ACTIVATION_BYTES = {4: 3.5e9, 2: 2.5e9}
def default_device():
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def resolve_model(model, verbose=True):
    """The concrete model for `model`, with "auto" decided by whether torch can use a GPU."""
    if model != "auto":
        return model
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
            "(same speed-up, narrower range; for the VAE see helpers.models.float16_vae)"
        )
    if verbose:
        print(f"Low precision: {str(dtype).removeprefix('torch.')} ({why}).")
    return dtype


def float16_vae(model, dtype, device=None):
    """How the VAE decodes on GPUs without bfloat16 (a T4, a V100), where the course runs in float16.

    SDXL's VAE overflows in float16, so diffusers' SDXL pipeline casts a float16 VAE marked `force_upcast` to fp32
    before every decode and back to float16 after it: 84 M weights cast twice per image. Instead, on purpose:
    - "fp16-fix": the real SDXL gets madebyollin/sdxl-vae-fp16-fix, SDXL's VAE fine-tuned to stay within float16's
      range, and gets it at every step on such a GPU (the fp32 baseline too), so that the steps' images differ only
      by their optimizations;
    - "float16": tiny and sdxl-random decode in float16 without the cast: their weights are random and their images
      noise either way, and their VAE runs the kernels the real one runs;
    - "float32": any other folder or hub id keeps its VAE in fp32 for good, and its latents are cast to fp32 where
      the decoder starts (the pipeline casts them only when it upcasts), unless its config marks it fp16-safe;
    - None: nothing to change.
    """
    device = torch.device(device or default_device())
    float16_gpu = device.type == "cuda" and low_precision_dtype(device, verbose=False) == torch.float16
    if model == SDXL_HUB_ID and (dtype == torch.float16 or float16_gpu):
        return "fp16-fix"
    if dtype != torch.float16:
        return None
    return "float16" if model in OFFLINE_MODELS else "float32"


def load_pipeline(model="auto", dtype=torch.float32, device=None, verbose=True):
    """A StableDiffusionXLPipeline in `dtype` on `device`, from the hub, a folder, or built in code.

    On a GPU it first checks that other processes leave the pipeline room (else GpuMemoryBusy); in float16, or on a
    GPU without bfloat16, its VAE is set up as `float16_vae` says.
    """
    from . import offline

    model = check_model(resolve_model(model, verbose=verbose))
    device = torch.device(device or default_device())
    if device.type == "cuda":
        check_gpu_memory(pipeline_bytes(model, dtype), device, verbose=verbose)
    vae_plan = float16_vae(model, dtype, device)
    if model == "tiny":
        pipe = offline.tiny_pipeline()
    elif model == "sdxl-random":
        if verbose:
            print("sdxl-random: full-size SDXL with random weights; its latency is real, its images are noise.")
        pipe = offline.sdxl_random_pipeline(device=device, dtype=dtype)
    else:
        pipe = _from_pretrained(model, dtype, fp16_safe_vae(dtype) if vae_plan == "fp16-fix" else None, verbose)
    # The tiny model is built in fp32 and cast, so that every dtype starts from the same weights; sdxl-random is built
    # in `dtype` already (the cast changes nothing), where a float32 copy would need 13.9 GB.
    with _quiet_diffusers():
        pipe = pipe.to(device=device, dtype=dtype)
        _apply_vae_plan(pipe, vae_plan, verbose)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _apply_vae_plan(pipe, plan, verbose):
    """Carry out `float16_vae`'s plan on a loaded pipeline, saying in one line what was done."""
    if plan is None:
        return
    if plan == "float32" and pipe.vae.config.force_upcast:
        pipe.vae.to(torch.float32)
        _cast_latents_to_vae(pipe.vae)
        done = "kept in fp32 for good (the latents cast as they enter it), instead of cast to fp32 and back per image"
    else:
        pipe.vae.register_to_config(force_upcast=False)
        done = {
            "fp16-fix": f"{FP16_SAFE_VAE}, which decodes in float16 without overflowing (every step gets it here)",
            "float16": "float16 without a cast to fp32 per image (random weights: the images are noise either way)",
            "float32": "float16, as its config marks it safe to decode in float16",
        }[plan]
    if verbose:
        print(f"VAE: {done}.")


def _cast_latents_to_vae(vae):
    """Cast the decoder's input to the VAE's dtype: the pipeline hands it latents in the UNet's dtype."""
    first = vae.post_quant_conv if vae.post_quant_conv is not None else vae.decoder.conv_in
    first.register_forward_pre_hook(lambda conv, args: (args[0].to(conv.weight.dtype), *args[1:]))


def fp16_safe_vae(dtype):
    """madebyollin/sdxl-vae-fp16-fix in `dtype`, marked so that the pipeline never upcasts it."""
    from diffusers import AutoencoderKL

    try:
        vae = AutoencoderKL.from_pretrained(FP16_SAFE_VAE, dtype=dtype, use_safetensors=True)
    except (OSError, ValueError) as error:
        raise ModelUnavailable(
            f"Could not load {FP16_SAFE_VAE!r}, the VAE that decodes SDXL in float16 on GPUs without bfloat16 "
            f"({_first_line(error)}); check your connection, or {OFFLINE_CHOICES}."
        ) from None
    vae.register_to_config(force_upcast=False)
    return vae


def pipeline_bytes(model, dtype):
    """About the GPU memory `model` needs in `dtype`: its weights plus the activations of one image at its size."""
    size = torch.empty((), dtype=dtype).element_size()
    activations = ACTIVATION_BYTES[4 if size >= 4 else 2] * (native_size(model) / 1024) ** 2
    return parameter_count(model) * size + activations


def parameter_count(model):
    """The parameters of `model`'s pipeline without loading it: SDXL's for a hub id, counted in a folder's files."""
    from safetensors import safe_open

    if model == "tiny":
        return _tiny_parameters()
    folder = Path(model).expanduser()
    if not folder.is_dir():
        return SDXL_PARAMETERS
    count = 0
    for path in _weight_files(folder):
        with safe_open(path, framework="pt") as weights:
            count += sum(math.prod(weights.get_slice(name).get_shape()) for name in weights.keys())
    return count


@functools.cache
def _tiny_parameters():
    from . import offline

    tiny = offline.tiny_pipeline()
    return sum(p.numel() for name in PIPELINE_MODELS for p in getattr(tiny, name).parameters())


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
        with _quiet_diffusers():
            return Path(_download_preferring_fp16(model, verbose))
    except (OSError, ValueError) as error:
        raise _unavailable(model, error) from None


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
    return "fp16" if any(_is_fp16(path) for path in _weight_files(Path(folder))) else None


def _weight_files(folder):
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
def _quiet_diffusers():
    """Silence diffusers' warnings where this module says what happened in one line of its own.

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


def _from_pretrained(model, dtype, vae=None, verbose=True):
    from diffusers import StableDiffusionXLPipeline

    folder = download(model, verbose=verbose)
    components = {"vae": vae} if vae is not None else {}  # vae=None would load the pipeline without a VAE
    try:
        return StableDiffusionXLPipeline.from_pretrained(
            str(folder), dtype=dtype, use_safetensors=True, variant=fp16_variant(folder), **components
        )
    except (OSError, ValueError) as error:
        raise _unavailable(model, error) from None


def _unavailable(model, error):
    if Path(model).expanduser().is_dir():
        advice = "check that the folder holds the whole pipeline, each model's weights as .safetensors files"
    else:
        advice = "check the id and your connection or token"
    return ModelUnavailable(f"Could not load {model!r} ({_first_line(error)[:200]}); {advice}, or {OFFLINE_CHOICES}.")


def _first_line(error):
    return str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
