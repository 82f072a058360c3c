"""How much arithmetic one image costs, counted rather than estimated, and how close a time comes to the peak.

`image_flops` runs each model of the pipeline once under `torch.utils.flop_counter.FlopCounterMode` on the meta
device: meta tensors have shapes but no data, so full-size SDXL is counted without memory or a GPU.
The counter counts matrix multiplications, convolutions and attention at 2 FLOPs per multiply-add; norms,
activations and softmax are left out (they are limited by memory bandwidth, not arithmetic).
On meta, SDPA runs its math path (two bmm); the counter's rules for the flash, memory-efficient and cuDNN
kernels that a GPU runs give exactly the same count.

`python -c "from helpers.flops import image_flops; print(image_flops())"` counts SDXL at 1024x1024, 30 steps
with classifier-free guidance: UNet 13.52 TFLOP per call (batch 2) x 30 = 405.7, VAE decode 10.47, text
encoders 0.11, total 416.3 TFLOP; the text encoders are 0.03 % of it.
`python -c "from helpers.flops import repeated_block_share; print(repeated_block_share())"` splits one UNet call
at 1024x1024: 74.9 % of its FLOPs run inside the 70 BasicTransformerBlocks that regional compilation compiles,
0.27 % in the three 1x1 `conv_shortcut` convolutions of the widest level (2560 or 1920 channels in, 1280 out).
"""

import json
import re
import statistics
from functools import lru_cache
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from .sources import SDXL_HUB_ID, resolve_model

META = torch.device("meta")

# Dense (no sparsity) tensor-core peaks in TFLOP/s from the vendor's datasheets, by a pattern of
# `torch.cuda.get_device_name()`; the first match wins, so NVL and PCIe come before the bare name.
DATASHEET_PEAKS = (
    (r"\bH100 NVL\b", 835, "bf16"),
    (r"\bH100 PCIe\b", 756, "bf16"),
    (r"\bH100\b", 989, "bf16"),  # SXM, e.g. "NVIDIA H100 80GB HBM3"
    (r"\bH200 NVL\b", 835, "bf16"),
    (r"\bH200\b", 989, "bf16"),
    (r"\bA100\b", 312, "bf16"),  # SXM4 and PCIe alike
    (r"\bL4\b", 121, "bf16"),
    (r"\bT4\b", 65, "fp16"),  # Turing has no bf16
)


def peak_tflops(device_name):
    """(TFLOP/s, source) of the GPU named `device_name` from DATASHEET_PEAKS, or None for a device not in it."""
    for pattern, tflops, dtype in DATASHEET_PEAKS:
        if re.search(pattern, device_name or ""):
            return tflops, f"datasheet dense {dtype}"
    return None


def measure_matmul_peak(device="cuda", n=8192, batches=5, calls=10):
    """TFLOP/s of a bf16 n x n x n matmul on `device`, timed with CUDA events: the median of `batches`."""
    a, b = (torch.randn(n, n, device=device, dtype=torch.bfloat16) for _ in range(2))
    out = torch.empty_like(a)
    for _ in range(3):  # warm-up: cuBLAS picks its kernel, the clocks ramp up
        torch.mm(a, b, out=out)
    rates = []
    for _ in range(batches):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(calls):
            torch.mm(a, b, out=out)
        end.record()
        end.synchronize()
        seconds = start.elapsed_time(end) / 1e3 / calls
        rates.append(2 * n**3 / seconds / 1e12)
    return statistics.median(rates)


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
        "unet_per_call": _unet_module_flops(model, height, width, unet_batch)["Global"],
        "unet_batch": unet_batch,
        "unet_calls": steps,
        "vae_decode": _vae_decode_flops(model, height, width),
    }
    counts["unet"] = counts["unet_per_call"] * steps
    counts["total"] = counts["text_encoders"] + counts["unet"] + counts["vae_decode"]
    return counts


def repeated_block_share(model="sdxl-random", height=1024, width=1024):
    """FLOPs of one UNet call (batch 1), and the shares of them in two places.

    `inside`: the share inside the repeated blocks (`unet._repeated_blocks`, the BasicTransformerBlocks), all
    that regional compilation compiles. `widest_conv_shortcut_share`: the share of the resnets' 1x1
    `conv_shortcut` convolutions whose input and output are both at least the widest level's width: convolutions
    outside the blocks as wide as the layers step 06 quantizes, which it leaves as they are (torchao's filter takes
    `nn.Linear` layers only; step 04's `conv_1x1_as_mm` already runs them as matmuls).
    """
    model = _architecture(model)
    unet = _meta_pipeline(model).unet
    counts = _unet_module_flops(model, height, width, 1)
    widest = unet.config.block_out_channels[-1]
    blocks = _flops_of(unet, counts, lambda name, module: type(module).__name__ in unet._repeated_blocks)
    shortcuts = _flops_of(
        unet, counts,
        lambda name, module: name.endswith("conv_shortcut") and min(module.in_channels, module.out_channels) >= widest,
    )
    total = counts["Global"]
    return {
        "unet": total,
        "repeated_blocks": blocks,
        "inside": blocks / total,
        "widest_conv_shortcuts": shortcuts,
        "widest_conv_shortcut_share": shortcuts / total,
    }


def efficiency(median_s, flops_total, peak_tflops):
    """Achieved TFLOP/s for `flops_total` done in `median_s`, its fraction of `peak_tflops`, and the time floor
    (the last two None where `peak_tflops` is None: no peak known for that device)."""
    tflops_per_s = flops_total / median_s / 1e12
    return {
        "tflops_per_s": tflops_per_s,
        "peak_fraction": tflops_per_s / peak_tflops if peak_tflops else None,
        "floor_s": flops_total / (peak_tflops * 1e12) if peak_tflops else None,
    }


def eager_share(model="sdxl-random", height=1024, width=1024, regions="blocks"):
    """The share of one UNet call's FLOPs outside the modules that `regions` (a choice of `regions.REGIONS`)
    compiles: what a regional compile with that choice leaves to run eagerly."""
    from .regions import REGIONS

    model = _architecture(model)
    unet = _meta_pipeline(model).unet
    counts = _unet_module_flops(model, height, width, 1)
    inside = _flops_of(unet, counts, lambda name, module: type(module).__name__ in REGIONS[regions])
    return 1 - inside / counts["Global"]


def _architecture(model):
    """The offline model with `model`'s architecture: the real SDXL counts as "sdxl-random", its random twin, and
    a local folder as whichever of the two its models' configs match."""
    model = resolve_model(model, verbose=False)
    if model == SDXL_HUB_ID:
        return "sdxl-random"
    if model in ("tiny", "sdxl-random"):
        return model
    folder = Path(model).expanduser()
    for name, configs in architectures().items():
        if folder.is_dir() and all(_config_matches(folder / part, config) for part, config in configs.items()):
            return name
    raise ValueError(
        f"FLOPs are counted for 'tiny', 'sdxl-random', {SDXL_HUB_ID!r} and folders of their architecture, not "
        f"{model!r}."
    )


def architectures():
    """{offline model: {part: the config its folder's config.json must match}}."""
    from . import offline  # imports diffusers: only where a count is made, not with `record_step`'s import

    return {
        "sdxl-random": {"unet": offline.SDXL_UNET, "vae": offline.SDXL_VAE, "text_encoder": offline.SDXL_TEXT_ENCODER,
                        "text_encoder_2": offline.SDXL_TEXT_ENCODER_2},
        "tiny": {"unet": offline.TINY_UNET, "vae": offline.TINY_VAE, "text_encoder": offline.TINY_TEXT_ENCODER,
                 "text_encoder_2": offline.TINY_TEXT_ENCODER_2},
    }


def _config_matches(folder, config):
    """Whether the model saved in `folder` has every size of `config` (lists and tuples alike)."""
    try:
        saved = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        return False

    def plain(value):
        return list(value) if isinstance(value, (list, tuple)) else value

    return all(plain(saved.get(key)) == plain(value) for key, value in config.items())


@lru_cache(maxsize=2)
def _meta_pipeline(model):
    """The pipeline on the meta device. (On the CPU, SDPA runs a kernel the counter has no rule for: it counts 0.)"""
    from . import offline

    if model == "sdxl-random":
        return offline.sdxl_random_pipeline("meta")
    pipe = offline.tiny_pipeline()
    for part in (pipe.unet, pipe.vae, pipe.text_encoder, pipe.text_encoder_2):
        part.to("meta")
    return pipe


def _count_by_module(fn):
    """FLOPs of `fn()` by module path ("Global" for all of them)."""
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        fn()
    return {name: sum(by_op.values()) for name, by_op in counter.get_flop_counts().items()}


def _count(fn):
    return _count_by_module(fn).get("Global", 0)


def _flops_of(model, counts, select):
    """FLOPs of the submodules of `model` that `select(name, module)` picks, none of them inside another."""
    # FlopCounterMode names a module by its path under the class name of the module that was called.
    prefix = type(model).__name__
    return sum(counts.get(f"{prefix}.{name}", 0) for name, module in model.named_modules() if select(name, module))


@lru_cache(maxsize=4)
def _text_encoder_flops(model):
    pipe = _meta_pipeline(model)
    return _count(lambda: pipe.encode_prompt("a photo", device=META, do_classifier_free_guidance=False))


@lru_cache(maxsize=16)
def _unet_module_flops(model, height, width, batch):
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
    return _count_by_module(
        lambda: pipe.unet(latents, timestep, encoder_hidden_states=text, added_cond_kwargs=conditions)
    )


@lru_cache(maxsize=16)
def _vae_decode_flops(model, height, width):
    pipe = _meta_pipeline(model)
    latent_size = (height // pipe.vae_scale_factor, width // pipe.vae_scale_factor)
    latents = torch.zeros(1, pipe.vae.config.latent_channels, *latent_size, device=META)
    return _count(lambda: pipe.vae.decode(latents))
