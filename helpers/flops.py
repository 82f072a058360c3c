"""How much arithmetic one image costs, counted rather than estimated, and how close a time comes to the peak.

`image_flops` runs each model of the pipeline once under `torch.utils.flop_counter.FlopCounterMode` on the meta
device: meta tensors have shapes but no data, so full-size SDXL is counted without memory or a GPU.
The counter counts matrix multiplications, convolutions and attention at 2 FLOPs per multiply-add; norms,
activations and softmax are left out (they are limited by memory bandwidth, not arithmetic).
On meta, SDPA runs its math path (two bmm); the counter's rules for the flash, memory-efficient and cuDNN
kernels that a GPU runs give exactly the same count.

SDXL at 1024x1024, 30 steps with classifier-free guidance: UNet 13.52 TFLOP per call (batch 2) x 30 = 405.7,
VAE decode 10.47, text encoders 0.11, total 416.3 TFLOP. FACTS.md's "about 416 TFLOP" is the UNet and the VAE
(416.1); the text encoders add 0.03 %.
"""

from functools import lru_cache

import torch
from torch.utils.flop_counter import FlopCounterMode

from . import offline
from .models import SDXL_HUB_ID, resolve_model

META = torch.device("meta")
# bf16 8192^3 matmul measured on this project's H100 (FACTS.md); the datasheet's dense bf16 figure is 989.
H100_BF16_MATMUL_TFLOPS = 798.0
# Measured bf16 matmul peaks by GPU name; the H200 is the same chip with faster memory (about 790 seen here).
MATMUL_PEAK_TFLOPS = {"H100": H100_BF16_MATMUL_TFLOPS, "H200": 790.0}


def measured_peak_tflops(device_name):
    """The measured bf16 matmul peak of the GPU named `device_name`, or None where none was measured."""
    return next((peak for key, peak in MATMUL_PEAK_TFLOPS.items() if key in device_name), None)


def image_flops(model="sdxl-random", height=1024, width=1024, steps=30, guidance=5.0):
    """FLOPs of one image: text encoders once, the UNet once per step, the VAE decoder once.

    With guidance > 1 (classifier-free guidance) each UNet call runs a batch of 2: the prompt and the
    negative one. The negative prompt is left empty, as `helpers.images.generate` does, so SDXL uses zeros for
    it and the text encoders run on the prompt alone. Returns counts in FLOPs, and `total`.
    """
    model = _architecture(model)
    unet_batch = 2 if guidance > 1 else 1
    counts = {
        "text_encoders": _text_encoder_flops(model),
        "unet_per_call": _unet_flops(model, height, width, unet_batch),
        "unet_batch": unet_batch,
        "unet_calls": steps,
        "vae_decode": _vae_decode_flops(model, height, width),
    }
    counts["unet"] = counts["unet_per_call"] * steps
    counts["total"] = counts["text_encoders"] + counts["unet"] + counts["vae_decode"]
    return counts


def efficiency(median_s, flops_total, peak_tflops=H100_BF16_MATMUL_TFLOPS):
    """Achieved TFLOP/s for `flops_total` done in `median_s`, its fraction of `peak_tflops`, and the time floor
    (the last two None where `peak_tflops` is None: no peak measured for that device)."""
    tflops_per_s = flops_total / median_s / 1e12
    return {
        "tflops_per_s": tflops_per_s,
        "peak_fraction": tflops_per_s / peak_tflops if peak_tflops else None,
        "floor_s": flops_total / (peak_tflops * 1e12) if peak_tflops else None,
    }


def _architecture(model):
    """The offline model with `model`'s architecture: the real SDXL counts as "sdxl-random", its random twin."""
    model = resolve_model(model, verbose=False)
    if model == SDXL_HUB_ID:
        return "sdxl-random"
    if model not in ("tiny", "sdxl-random"):
        raise ValueError(f"FLOPs are counted for 'tiny', 'sdxl-random' and {SDXL_HUB_ID!r}, not {model!r}.")
    return model


@lru_cache(maxsize=2)
def _meta_pipeline(model):
    """The pipeline on the meta device. (On the CPU, SDPA runs a kernel the counter has no rule for: it counts 0.)"""
    if model == "sdxl-random":
        return offline.sdxl_random_pipeline("meta")
    pipe = offline.tiny_pipeline()
    for part in (pipe.unet, pipe.vae, pipe.text_encoder, pipe.text_encoder_2):
        part.to("meta")
    return pipe


def _count(fn):
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        fn()
    return counter.get_total_flops()


@lru_cache(maxsize=4)
def _text_encoder_flops(model):
    pipe = _meta_pipeline(model)
    return _count(lambda: pipe.encode_prompt("a photo", device=META, do_classifier_free_guidance=False))


@lru_cache(maxsize=16)
def _unet_flops(model, height, width, batch):
    pipe = _meta_pipeline(model)
    latent_size = (height // pipe.vae_scale_factor, width // pipe.vae_scale_factor)
    with torch.device(META):
        latents = torch.zeros(batch, pipe.unet.config.in_channels, *latent_size)
        text = torch.zeros(batch, pipe.tokenizer.model_max_length, pipe.unet.config.cross_attention_dim)
        conditions = {
            "text_embeds": torch.zeros(batch, pipe.text_encoder_2.config.projection_dim),  # pooled text
            "time_ids": torch.zeros(batch, 6),  # original size, crop corner, target size
        }
        timestep = torch.tensor(999.0)
    return _count(lambda: pipe.unet(latents, timestep, encoder_hidden_states=text, added_cond_kwargs=conditions))


@lru_cache(maxsize=16)
def _vae_decode_flops(model, height, width):
    pipe = _meta_pipeline(model)
    latent_size = (height // pipe.vae_scale_factor, width // pipe.vae_scale_factor)
    latents = torch.zeros(1, pipe.vae.config.latent_channels, *latent_size, device=META)
    return _count(lambda: pipe.vae.decode(latents))
