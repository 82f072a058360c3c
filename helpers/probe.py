"""Look inside a pipeline call: which attention kernels ran.

Two kinds of profiler events name an attention backend. The aten op SDPA dispatches to shows wherever the
dispatcher runs: eager code, and compiled code outside CUDA graphs. The GPU kernel shows in every GPU profile,
including replays of a CUDA graph (torch.compile's "reduce-overhead" and "max-autotune" modes), which dispatch no
aten op at all. `attention_backends` reads both.

Kernel names are matched as the profiler shows them, demangled. The fused backends run one forward kernel per
call. Inductor names its Triton kernels triton_<kind>_fused_<the aten ops they come from>_<n>, kind "tem" for a
template (an autotuned matmul), "per" or "red" for a reduction, "poi" for pointwise; so the kernels it makes
around an SDPA op (triton_poi_fused__scaled_dot_product_flash_attention_...) carry the op's name without being
attention, and the patterns below leave them out.
"""

import dataclasses
import re
from collections import Counter
from unittest import mock

import torch
from torch.profiler import ProfilerActivity, profile

from .images import generate

FLASH = "FlashAttention-2"
EFFICIENT = "memory-efficient attention (xFormers-style)"
CUDNN = "cuDNN attention"
INDUCTOR_BMM = "plain attention compiled by Inductor: Triton bmm kernels"
INDUCTOR_SOFTMAX = "plain attention compiled by Inductor: Triton softmax kernels"

SDPA_OPS = {
    "aten::_scaled_dot_product_flash_attention": FLASH,
    "aten::_scaled_dot_product_cudnn_attention": CUDNN,
    "aten::_scaled_dot_product_efficient_attention": EFFICIENT,
    "aten::_scaled_dot_product_flash_attention_for_cpu": "flash attention for CPU",
    "aten::_scaled_dot_product_attention_math": "math (unfused reference)",
}

ATTENTION_KERNELS = [
    # pytorch_flash::flash_fwd_kernel<...>, or flash_fwd_splitkv_kernel<...> (its combine kernel is no second call)
    (re.compile(r"\bflash_fwd_(splitkv_)?kernel\b"), FLASH),
    # fmha_cutlassF_bf16_aligned_64x64_rf_sm80(PyTorchMemEffAttention::AttentionKernel<...>::Params); B: backward
    (re.compile(r"\bfmha_cutlassF_"), EFFICIENT),
    # cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma_f16_knob_7_64x128x128_...; bprop: backward
    (re.compile(r"\bcudnn_generated_\w*sdpa\w*fprop"), CUDNN),
    # triton_tem_fused_bmm_3, triton_tem_fused_baddbmm_1: not triton_tem_fused_mm_2 or _addmm_ (the linear layers)
    (re.compile(r"^triton_tem_fused_\w*bmm"), INDUCTOR_BMM),
    # triton_per_fused__softmax_0, triton_red_fused__softmax__to_copy_2
    (re.compile(r"^triton_(per|red)_fused_\w*_softmax"), INDUCTOR_SOFTMAX),
]


def attention_backends(events):
    """{backend description: calls} from profiler events or from (name, count) pairs.

    `events` is what `prof.key_averages()` or `prof.events()` returns, or a list of (name, count). One attention
    call can show up several times: as its aten op on the CPU and its kernel on the GPU, and a Triton kernel also
    as the CPU-side range Inductor records around its launch. Each backend gets the largest of these counts, not
    their sum. For Inductor's Triton kernels the count is of kernel launches (two bmm per attention call).
    """
    calls = Counter()  # (backend, is an op, device) -> calls
    for name, count, device in _named_counts(events):
        backend = SDPA_OPS.get(name) or _kernel_backend(name)
        if backend:
            calls[backend, name in SDPA_OPS, device] += count
    backends = {}
    for (backend, _, _), count in calls.items():
        backends[backend] = max(backends.get(backend, 0), count)
    return backends


def _named_counts(events):
    """(name, count, device type) for profiler events; (name, count, None) for (name, count) pairs."""
    for event in events:
        if isinstance(event, tuple):
            yield *event, None
        else:
            yield event.key, event.count, event.device_type


def _kernel_backend(name):
    return next((backend for pattern, backend in ATTENTION_KERNELS if pattern.search(name)), None)


def attention_kernels(pipe, params):
    """{backend description: calls} for the attention of the UNet and the VAE in one single-step image.

    A first, unprofiled call encodes the prompt; the profiled one reuses its text embeddings, so the text
    encoders' own attention (SDPA in transformers) stays out of the count.
    """
    one_step = dataclasses.replace(params, steps=1)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    with _prompt_encoded_once(pipe):
        generate(pipe, one_step)
        with profile(activities=activities) as prof:
            generate(pipe, one_step)
    return attention_backends(prof.key_averages())


def _prompt_encoded_once(pipe):
    """While active, `pipe.encode_prompt` runs the text encoders once and returns that first output ever after."""
    encode, outputs = pipe.encode_prompt, []

    def encode_once(*args, **kwargs):
        if not outputs:
            outputs.append(encode(*args, **kwargs))
        return outputs[0]

    return mock.patch.object(pipe, "encode_prompt", encode_once)
