from types import SimpleNamespace

import pytest
from diffusers.models.attention_processor import Attention
from torch.autograd import DeviceType

import helpers
from helpers.probe import CUDNN, EFFICIENT, FLASH, INDUCTOR_BMM, INDUCTOR_SOFTMAX, attention_backends

FLASH_TRAITS = (
    "Flash_fwd_kernel_traits<64, 128, 128, 4, false, false, cutlass::bfloat16_t, "
    "Flash_kernel_traits<64, 128, 128, 4, cutlass::bfloat16_t> >"
)
SPLIT_TRAITS = FLASH_TRAITS.replace("128, 128, 4", "64, 256, 4")
MEM_EFF = "PyTorchMemEffAttention::AttentionKernel<cutlass::bfloat16_t, cutlass::arch::Sm80, true"

# Kernel names as the profiler shows them (demangled), and the backend each one names; None: not attention's own.
KERNELS = [
    (f"void pytorch_flash::flash_fwd_kernel<{FLASH_TRAITS}, false, false, false, false, true, true, false, false>"
     "(pytorch_flash::Flash_fwd_params)", FLASH),
    (f"void pytorch_flash::flash_fwd_splitkv_kernel<{SPLIT_TRAITS}, false, false, false, true, true, false>"
     "(pytorch_flash::Flash_fwd_params)", FLASH),
    (f"void pytorch_flash::flash_fwd_splitkv_combine_kernel<{SPLIT_TRAITS}, 8, 1, true>"
     "(pytorch_flash::Flash_fwd_params)", None),
    (f"void flash::flash_fwd_kernel<{FLASH_TRAITS}, false, false, false, false, true, true, false, false>"
     "(flash::Flash_fwd_params)", FLASH),
    (f"fmha_cutlassF_bf16_aligned_64x64_rf_sm80({MEM_EFF}, 64, 64, 64, true, true>::Params)", EFFICIENT),
    (f"fmha_cutlassF_bf16_aligned_32x128_gmem_sm80({MEM_EFF}, 32, 128, 65536, true, true>::Params)", EFFICIENT),
    ("fmha_cutlassB_bf16_aligned_128x128_k128_sm80(PyTorchMemEffAttention::AttentionBackwardKernel<"
     "cutlass::arch::Sm80, cutlass::bfloat16_t, true, false, true, 128, 128, 128, false>::Params)", None),
    ("cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma_f16_knob_7_64x128x128_4x1x1_kernel0_0", CUDNN),
    ("cudnn_generated_fort_native_sdpa_sm80_flash_fprop_wmma_f16_knob_3_64x64x128_4x1x1_kernel0_0", CUDNN),
    ("cudnn_generated_fort_native_sdpa_sm100_flash_fprop_f16", CUDNN),
    ("cudnn_generated_fort_native_sdpa_sm90_flash_bprop_wgmma_f16_knob_26_64x64x128_1x1x1_kernel0_0", None),
    ("triton_tem_fused_bmm_3", INDUCTOR_BMM),
    ("triton_tem_fused_baddbmm_1", INDUCTOR_BMM),
    ("triton_per_fused__softmax_0", INDUCTOR_SOFTMAX),
    ("triton_red_fused__softmax__to_copy_2", INDUCTOR_SOFTMAX),
    ("triton_per_fused__safe_softmax_5", INDUCTOR_SOFTMAX),
    # Inductor names kernels after the aten ops they come from: these two only prepare an SDPA call's inputs.
    ("triton_poi_fused__scaled_dot_product_flash_attention_add_mul_permute_stack_sub_unbind_view_0", None),
    ("triton_red_fused__scaled_dot_product_cudnn_attention__to_copy_mean_mul_permute_pow_rsqrt_1", None),
    # Copies, other matmuls, cuBLAS and eager softmax kernels: not attention's alone.
    ("triton_poi_fused_bmm_transpose_4", None),
    ("triton_tem_fused_addmm_7", None),
    ("triton_tem_fused_mm_2", None),
    ("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x64_warpgroupsize1x1x1_execute_segment_k_off_kernel__5x_"
     "cublas", None),
    ("nvjet_tst_192x128_64x4_1x2_h_bz_coopA_NTT", None),
    ("void (anonymous namespace)::softmax_warp_forward<c10::BFloat16, c10::BFloat16, float, 8, false, false>"
     "(c10::BFloat16*, c10::BFloat16 const*, int, int, int, bool const*, int, bool)", None),
]

OPS = [
    ("aten::_scaled_dot_product_flash_attention", FLASH),
    ("aten::_scaled_dot_product_efficient_attention", EFFICIENT),
    ("aten::_scaled_dot_product_cudnn_attention", CUDNN),
    ("aten::_scaled_dot_product_flash_attention_for_cpu", "flash attention for CPU"),
    ("aten::_scaled_dot_product_attention_math", "math (unfused reference)"),
    ("aten::scaled_dot_product_attention", None),  # the dispatcher's entry point: its callee names the backend
    ("aten::_flash_attention_forward", None),  # called by the first op above: counting it too would count twice
    ("aten::bmm", None),
    ("aten::_softmax", None),
]


@pytest.mark.parametrize(("name", "backend"), KERNELS + OPS)
def test_each_name_names_its_backend(name, backend):
    assert attention_backends([(name, 7)]) == ({backend: 7} if backend else {})


def event(name, count, device):
    """What `prof.key_averages()` yields, as far as `attention_backends` reads it."""
    return SimpleNamespace(key=name, count=count, device_type=device)


FLASH_OP, FLASH_KERNEL = OPS[0][0], KERNELS[0][0]
EFFICIENT_KERNEL = KERNELS[5][0]


def test_eager_gpu_counts_each_call_once_though_op_and_kernel_both_show():
    events = [event(FLASH_OP, 140, DeviceType.CPU), event(FLASH_KERNEL, 140, DeviceType.CUDA)]
    assert attention_backends(events) == {FLASH: 140}


def test_cuda_graph_replays_show_kernels_alone():
    events = [event("cudaGraphLaunch", 1, DeviceType.CPU), event(FLASH_KERNEL, 140, DeviceType.CUDA)]
    assert attention_backends(events) == {FLASH: 140}


def test_kernels_of_different_shapes_add_up():
    other_shape = FLASH_KERNEL.replace("<64, 128, 128, 4,", "<64, 128, 64, 4,")
    events = [event(FLASH_KERNEL, 100, DeviceType.CUDA), event(other_shape, 40, DeviceType.CUDA)]
    assert attention_backends(events) == {FLASH: 140}


def test_triton_launch_ranges_on_the_cpu_do_not_double_the_kernels():
    bmm = "triton_tem_fused_bmm_3"
    events = [event(bmm, 280, DeviceType.CPU), event(bmm, 280, DeviceType.CUDA)]
    assert attention_backends(events) == {INDUCTOR_BMM: 280}


def test_the_unet_and_the_vae_may_get_different_backends():
    pairs = [(FLASH_KERNEL, 140), (EFFICIENT_KERNEL, 1), ("aten::add", 500)]
    assert attention_backends(pairs) == {FLASH: 140, EFFICIENT: 1}


@pytest.fixture(scope="module")
def tiny():
    return helpers.load_pipeline("tiny", device="cpu", verbose=False)  # on the CPU also where there is a GPU


def test_cpu_run_finds_the_cpu_flash_kernel_in_the_unet_and_vae_only(tiny):
    params = helpers.Params(model="tiny", steps=1, height=64, width=64)
    modules = [m for part in (tiny.unet, tiny.vae.decoder) for m in part.modules() if isinstance(m, Attention)]
    assert helpers.attention_kernels(tiny, params) == {"flash attention for CPU": len(modules)}
    assert "encode_prompt" not in vars(tiny)  # the probe gave the pipeline back as it found it


def test_cpu_run_finds_nothing_with_plain_attention(tiny):
    helpers.use_plain_attention(tiny)
    try:
        assert helpers.attention_kernels(tiny, helpers.Params(model="tiny", steps=1, height=64, width=64)) == {}
    finally:
        helpers.use_sdpa(tiny)
