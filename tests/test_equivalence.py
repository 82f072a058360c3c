"""Each optimization against the configuration before it, on the tiny model's output (pixels in [0, 1]).

Tolerances come from measurement (tiny model, 64x64, 4 steps, seed 0): plain vs SDPA attention 1.5e-6,
fused vs unfused 0, bfloat16 vs fp32 0.023, int8 vs none 0.022 to 0.023. Each bound leaves a 2-3x margin.
"""

import numpy as np
import pytest
import torch

import helpers
from helpers import Params

PARAMS = Params(model="tiny", steps=4, height=64, width=64)


def image(pipe):
    return pipe(
        prompt=PARAMS.prompt, num_inference_steps=PARAMS.steps, height=PARAMS.height, width=PARAMS.width,
        guidance_scale=PARAMS.guidance, generator=torch.Generator("cpu").manual_seed(PARAMS.seed), output_type="np",
    ).images[0]


def max_difference(a, b):
    return float(np.abs(a - b).max())


@pytest.fixture
def fp32():
    return helpers.load_pipeline("tiny", dtype=torch.float32, verbose=False)


def test_sdpa_matches_plain_attention(fp32):
    sdpa = image(fp32)
    helpers.use_plain_attention(fp32)
    assert max_difference(image(fp32), sdpa) < 1e-5


def test_fused_projections_compute_the_same_numbers(fp32):
    unfused = image(fp32)
    fp32.fuse_qkv_projections()
    assert helpers.pipeline_state(fp32)["fused_qkv"]
    assert max_difference(image(fp32), unfused) == 0


def test_bfloat16_stays_close_to_fp32(fp32):
    reference = image(fp32)
    difference = max_difference(image(helpers.load_pipeline("tiny", dtype=torch.bfloat16, verbose=False)), reference)
    assert 0 < difference < 0.06


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int8_stays_close_to_unquantized(dtype):
    pipe = helpers.load_pipeline("tiny", dtype=dtype, verbose=False)
    pipe.fuse_qkv_projections()
    reference = image(pipe)
    helpers.quantize_int8(pipe)
    assert helpers.quantized_layers(pipe.unet)
    assert 0 < max_difference(image(pipe), reference) < 0.06
