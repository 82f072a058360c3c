"""Look inside a pipeline call: which attention kernels ran."""

import dataclasses

from torch.profiler import ProfilerActivity, profile

from .images import generate

SDPA_OPS = {
    "aten::_scaled_dot_product_flash_attention": "FlashAttention-2",
    "aten::_scaled_dot_product_cudnn_attention": "cuDNN attention",
    "aten::_scaled_dot_product_efficient_attention": "memory-efficient attention (xFormers-style)",
    "aten::_scaled_dot_product_flash_attention_for_cpu": "flash attention for CPU",
    "aten::_scaled_dot_product_attention_math": "math (unfused reference)",
}


def attention_kernels(pipe, params):
    """{backend description: calls} for the SDPA backends used by one single-step image."""
    one_step = dataclasses.replace(params, steps=1)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        generate(pipe, one_step)
    counts = {}
    for event in prof.key_averages():
        if event.key in SDPA_OPS:
            counts[SDPA_OPS[event.key]] = event.count
    return counts
