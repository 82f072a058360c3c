"""Full-size SDXL built offline has the published architecture: its parameter counts and its FLOPs are pinned.

Everything runs on the meta device (shapes, no data), so the 3.5 B-parameter pipeline costs no memory.
"""

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from helpers.flops import H100_BF16_MATMUL_TFLOPS, efficiency, image_flops
from helpers.offline import sdxl_random_pipeline

# The published SDXL base architecture (FACTS.md; the text encoders with the full 49,408-token vocabulary).
SDXL_PARAMETERS = {
    "unet": 2_567_463_684,
    "vae": 83_653_863,
    "text_encoder": 123_060_480,
    "text_encoder_2": 694_659_840,
}
# FACTS.md: one 1024x1024 image, 30 steps with guidance, UNet + VAE decode.
FACTS_IMAGE_FLOPS = 416e12
# What FlopCounterMode counted here (torch 2.13, diffusers 0.42): any change to the architecture moves them.
UNET_PER_CALL_FLOPS = 13_522_472_796_160  # batch 2, 1024x1024
VAE_DECODE_FLOPS = 10_470_392_594_432


@pytest.fixture(scope="module")
def sdxl_1024():
    return image_flops("sdxl-random", height=1024, width=1024, steps=30, guidance=5.0)


def test_parameter_counts_match_sdxl_base():
    pipe = sdxl_random_pipeline("meta")
    counts = {name: sum(p.numel() for p in getattr(pipe, name).parameters()) for name in SDXL_PARAMETERS}
    assert counts == SDXL_PARAMETERS
    assert pipe.unet.device.type == "meta"


def test_image_flops_match_facts(sdxl_1024):
    assert sdxl_1024["total"] == pytest.approx(FACTS_IMAGE_FLOPS, rel=0.10)
    assert sdxl_1024["unet_per_call"] == pytest.approx(UNET_PER_CALL_FLOPS, rel=1e-3)
    assert sdxl_1024["vae_decode"] == pytest.approx(VAE_DECODE_FLOPS, rel=1e-3)
    assert sdxl_1024["unet_batch"] == 2 and sdxl_1024["unet_calls"] == 30
    assert sdxl_1024["total"] == sdxl_1024["text_encoders"] + 30 * sdxl_1024["unet_per_call"] + sdxl_1024["vae_decode"]
    # The text encoders run once per image: a rounding error next to 30 UNet calls.
    assert 0 < sdxl_1024["text_encoders"] < 0.001 * sdxl_1024["total"]


def test_flops_scale_with_steps_and_size(sdxl_1024):
    half = image_flops("sdxl-random", steps=15)
    assert half["unet"] == sdxl_1024["unet"] / 2
    assert half["vae_decode"] == sdxl_1024["vae_decode"]

    small = image_flops("sdxl-random", height=512, width=512)
    # A quarter of the pixels: convolutions and linear layers cost a quarter, attention (quadratic) a sixteenth.
    for part in ("unet", "vae_decode"):
        assert sdxl_1024[part] / 16 < small[part] < sdxl_1024[part] / 4
    assert small["text_encoders"] == sdxl_1024["text_encoders"]


def test_guidance_doubles_the_unet_batch():
    # The tiny model has SDXL's wiring, and counts in milliseconds.
    guided, unguided = (image_flops("tiny", height=128, width=128, guidance=g) for g in (5.0, 1.0))
    assert (guided["unet_batch"], unguided["unet_batch"]) == (2, 1)
    assert guided["unet_per_call"] == 2 * unguided["unet_per_call"]
    assert guided["text_encoders"] == unguided["text_encoders"]


def test_gpu_attention_kernels_count_like_the_math_path_on_meta():
    query = torch.empty(2, 10, 1024, 64, device="meta", dtype=torch.bfloat16)
    expected = 2 * (2 * 2 * 10 * 1024 * 1024 * 64)  # Q @ K^T and P @ V, 2 FLOPs per multiply-add
    kernels = {
        "math (meta)": lambda: torch.nn.functional.scaled_dot_product_attention(query, query, query),
        "flash": lambda: torch.ops.aten._scaled_dot_product_flash_attention(query, query, query),
        "efficient": lambda: torch.ops.aten._scaled_dot_product_efficient_attention(query, query, query, None, False),
    }
    for name, kernel in kernels.items():
        with FlopCounterMode(display=False) as counter:
            kernel()
        assert counter.get_total_flops() == expected, name


def test_tiny_model_flops():
    counts = image_flops("tiny", height=128, width=128, steps=4)
    assert all(counts[part] > 0 for part in ("text_encoders", "unet_per_call", "vae_decode"))
    assert counts["total"] < 1e-4 * FACTS_IMAGE_FLOPS


def test_efficiency():
    result = efficiency(median_s=2.0, flops_total=416e12)
    assert result["tflops_per_s"] == pytest.approx(208.0)
    assert result["peak_fraction"] == pytest.approx(208.0 / H100_BF16_MATMUL_TFLOPS)
    assert result["floor_s"] == pytest.approx(416 / H100_BF16_MATMUL_TFLOPS)
    assert efficiency(1.0, 500e12, peak_tflops=1000)["peak_fraction"] == pytest.approx(0.5)


def test_unknown_model_is_refused():
    with pytest.raises(ValueError, match="FLOPs are counted for"):
        image_flops("some/other-model")


def test_efficiency_without_a_measured_peak_gives_only_the_rate():
    result = efficiency(2.0, 416e12, peak_tflops=None)
    assert result["tflops_per_s"] == pytest.approx(208)
    assert result["peak_fraction"] is None and result["floor_s"] is None
