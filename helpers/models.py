"""Loading the pipeline: on which device and in which dtype it runs, its VAE in float16, and whether it fits.

What a model's name means and where its files are is `sources.py`'s part.
"""

import functools
import math
from pathlib import Path

import torch

from .errors import ModelUnavailable
from .memory import check_gpu_memory
from .sources import (
    OFFLINE_CHOICES,
    OFFLINE_MODELS,
    PIPELINE_MODELS,
    SDXL_HUB_ID,
    check_model,
    download,
    first_line,
    fp16_variant,
    native_size,
    quiet_diffusers,
    resolve_model,
    unavailable,
    weight_files,
)

# SDXL's VAE fine-tuned to keep its activations within float16's range (see float16_vae).
FP16_SAFE_VAE = "madebyollin/sdxl-vae-fp16-fix"
# The UNet, the VAE and both text encoders of SDXL base, counted on the configs in offline.py.
SDXL_PARAMETERS = 3_468_837_867
# Peak activations of one 1024x1024 image (the VAE's decode), by bytes per element of the dtype: 3.2 GB in float32 and
# 2.25 GB in bfloat16, measured in eager mode on SDXL's shapes with plain attention, rounded up.
ACTIVATION_BYTES = {4: 3.5e9, 2: 2.5e9}


def default_device():
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


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
    with quiet_diffusers():
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
            f"({first_line(error)}); check your connection, or {OFFLINE_CHOICES}."
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
    for path in weight_files(folder):
        with safe_open(path, framework="pt") as weights:
            count += sum(math.prod(weights.get_slice(name).get_shape()) for name in weights.keys())
    return count


@functools.cache
def _tiny_parameters():
    from . import offline

    tiny = offline.tiny_pipeline()
    return sum(p.numel() for name in PIPELINE_MODELS for p in getattr(tiny, name).parameters())


def _from_pretrained(model, dtype, vae=None, verbose=True):
    from diffusers import StableDiffusionXLPipeline

    folder = download(model, verbose=verbose)
    components = {"vae": vae} if vae is not None else {}  # vae=None would load the pipeline without a VAE
    try:
        return StableDiffusionXLPipeline.from_pretrained(
            str(folder), dtype=dtype, use_safetensors=True, variant=fp16_variant(folder), **components
        )
    except (OSError, ValueError) as error:
        raise unavailable(model, error) from None


