"""Each step of the ladder as a function, written exactly as its notebook writes it inline.

Notebook N shows its own change as code and gets the pipeline of the steps before it from `build`. A test
runs each notebook's pipeline cells and checks that they leave the pipeline in the same state as
`build(through=N)`, so the notebooks and these functions can't drift apart.
"""

import torch
from diffusers.models.attention_processor import AttnProcessor2_0

from .models import load_pipeline, low_precision_dtype
from .steps import STEP_IDS, StepUnavailable, get_step


def use_plain_attention(pipe):
    """Step 01: attention as explicit matmul + softmax + matmul (diffusers' `AttnProcessor`)."""
    pipe.unet.set_default_attn_processor()
    pipe.vae.set_default_attn_processor()


def use_sdpa(pipe):
    """Step 03: attention through `torch.nn.functional.scaled_dot_product_attention` (diffusers' default)."""
    pipe.unet.set_attn_processor(AttnProcessor2_0())
    pipe.vae.set_attn_processor(AttnProcessor2_0())


def set_inductor_flags():
    """Step 04: the inductor settings the SDXL tutorial tuned. They are global: they apply to every later compile."""
    config = torch._inductor.config
    config.conv_1x1_as_mm = True
    config.coordinate_descent_tuning = True
    config.epilogue_fusion = False
    config.coordinate_descent_check_all_directions = True


def _ready_to_compile(pipe):
    """Step 04's flags and channels_last layout, which both ways of compiling start with; False if compiled already."""
    if is_compiled(pipe):
        print("The pipeline is already compiled; build a fresh one to compile it differently.")
        return False
    set_inductor_flags()
    pipe.unet.to(memory_format=torch.channels_last)
    pipe.vae.to(memory_format=torch.channels_last)
    return True


def compile_pipeline(pipe, mode="max-autotune"):
    """Step 04: channels_last memory layout, then the UNet and the VAE decoder compiled whole."""
    if not _ready_to_compile(pipe):
        return
    pipe.unet = torch.compile(pipe.unet, mode=mode, fullgraph=True)
    pipe.vae.decode = torch.compile(pipe.vae.decode, mode=mode, fullgraph=True)


def fuse_qkv(pipe):
    """Step 05: one (in, 3*out) projection instead of three (in, out) ones in every self-attention."""
    if unfused_leftovers(pipe.unet):
        # Fusing again would rebuild the fused layers from the kept originals, undoing step 06's quantization.
        print("The projections are already fused.")
        return
    pipe.fuse_qkv_projections()


def unfused_leftovers(unet):
    """The q, k, v projections that step 05 replaced by fused ones: kept for unfusing, never called."""
    return {
        f"{name}.{projection}"
        for name, module in unet.named_modules()
        if getattr(module, "fused_projections", False)
        for projection in (("to_k", "to_v") if module.is_cross_attention else ("to_q", "to_k", "to_v"))
    }


def int8_filter(unet):
    """Step 06's choice of layers: linear layers of the widest level of the UNet, and none fed by text or time.

    Dynamic int8 quantizes each activation on the fly, which only pays off on large matmuls: in SDXL the
    1280-wide layers of the innermost level. The cross-attention keys and values see 77 text tokens and the
    time embeddings one row per image: too few rows to gain anything.
    """
    widest = unet.config.block_out_channels[-1]
    replaced_by_fusion = unfused_leftovers(unet)

    def worth_quantizing(module, fqn):
        return (
            isinstance(module, torch.nn.Linear)
            and type(module.weight) is torch.nn.Parameter  # not quantized already
            and min(module.in_features, module.out_features) >= widest
            and fqn not in replaced_by_fusion
            and not any(part in fqn for part in ("time_emb", "add_embedding", "attn2.to_k", "attn2.to_v"))
        )

    return worth_quantizing


def is_pointwise_conv(module, *args):
    """1x1 convolutions are matmuls in disguise: as linear layers, int8 quantization can reach them."""
    return isinstance(module, torch.nn.Conv2d) and module.kernel_size == (1, 1)


def require_torchao():
    """Raise StepUnavailable, in one sentence, where torchao can't be used with this torch."""
    try:
        from torchao.quantization import Int8DynamicActivationInt8WeightConfig, quantize_  # noqa: F401
    except Exception as error:  # ImportError, or an ABI mismatch surfacing as another error
        raise StepUnavailable(
            f"torchao is missing or doesn't match torch {torch.__version__} ({type(error).__name__}: "
            f"{str(error).splitlines()[0] if str(error) else ''}); install a matching version with "
            "`pip install torchao` to run step 06; the other steps don't need it."
        ) from None


def weights_gb(module):
    """Bytes of a module's parameters and buffers in GB, counting quantized tensors at their packed size."""
    from torchao.utils import get_model_size_in_bytes

    return get_model_size_in_bytes(module) / 1e9


def quantize_int8(pipe):
    """Step 06: torchao's dynamic int8 quantization (int8 weights, activations quantized per call)."""
    require_torchao()
    from torchao.quantization import Int8DynamicActivationInt8WeightConfig, quantize_, swap_conv2d_1x1_to_linear

    if quantized_layers(pipe.unet):
        print("The UNet is already quantized; quantizing again would change nothing.")
        return
    swap_conv2d_1x1_to_linear(pipe.unet, is_pointwise_conv)
    quantize_(pipe.unet, Int8DynamicActivationInt8WeightConfig(), filter_fn=int8_filter(pipe.unet))


def compile_regions(pipe, mode="max-autotune", dynamic=None):
    """Step 07: compile each repeated transformer block once and reuse the code, instead of the whole UNet."""
    if not _ready_to_compile(pipe):
        return
    pipe.unet.compile_repeated_blocks(mode=mode, fullgraph=True, dynamic=dynamic)
    pipe.vae.decode = torch.compile(pipe.vae.decode, mode=mode, fullgraph=True, dynamic=dynamic)


def build(model="auto", through="03", compile=True, compile_mode="max-autotune", device=None, verbose=True):
    """A pipeline with steps 01..`through` applied; `compile=False` leaves out compilation (steps 04 and 07).

    Notebooks 05 to 07 ask for the steps before theirs uncompiled, make their change, and compile last:
    compilation must see the final modules.
    """
    last = STEP_IDS.index(get_step(through).id)
    done = set(STEP_IDS[: last + 1])
    dtype = torch.float32 if done == {"01"} else low_precision_dtype(device, verbose=verbose)
    pipe = load_pipeline(model, dtype=dtype, device=device, verbose=verbose)
    if "03" not in done:
        use_plain_attention(pipe)
    if "05" in done:
        fuse_qkv(pipe)
    if "06" in done:
        quantize_int8(pipe)
    if compile and "07" in done:
        compile_regions(pipe, mode=compile_mode)
    elif compile and "04" in done:
        compile_pipeline(pipe, mode=compile_mode)
    return pipe


def quantized_layers(module):
    """Names of the layers whose weight torchao replaced by a quantized tensor."""
    return [
        name
        for name, layer in module.named_modules()
        if isinstance(getattr(layer, "weight", None), torch.Tensor)
        and type(layer.weight) not in (torch.Tensor, torch.nn.Parameter)
    ]


def is_compiled(pipe):
    return bool(describe(pipe)["compiled"])


def _compile_config(compiled):
    """The inductor options a torch.compile wrapper was made with (mode turned into its flags)."""
    backend = getattr(getattr(compiled, "dynamo_ctx", None), "callback", None)
    while backend is not None and not hasattr(backend, "config"):
        backend = getattr(backend, "_torchdynamo_orig_backend", None)
    return dict(sorted(getattr(backend, "config", {}).items())) if backend is not None else None


def describe(pipe):
    """What the ladder changes, as plain data: dtypes, attention, fusion, quantization, layout, compilation."""
    unet = getattr(pipe.unet, "_orig_mod", pipe.unet)
    models = {"unet": unet, "vae": pipe.vae, "text_encoder": pipe.text_encoder, "text_encoder_2": pipe.text_encoder_2}
    convs = [m for m in unet.modules() if isinstance(m, torch.nn.Conv2d) and m.weight.dim() == 4]
    compiled_blocks = [name for name, m in unet.named_modules() if getattr(m, "_compiled_call_impl", None) is not None]
    flags = torch._inductor.config
    return {
        "dtypes": {name: str(model.dtype) for name, model in models.items()},
        "attention": {
            name: sorted({type(p).__name__ for p in models[name].attn_processors.values()}) for name in ("unet", "vae")
        },
        "fused_qkv": sorted({type(m).__name__ for m in unet.modules() if getattr(m, "fused_projections", False)}),
        "quantized_layers": quantized_layers(unet),
        "pointwise_convs": sum(1 for m in convs if m.kernel_size == (1, 1)),
        "channels_last": bool(convs) and all(m.weight.is_contiguous(memory_format=torch.channels_last) for m in convs),
        "compiled": {
            key: value
            for key, value in {
                "unet": _compile_config(pipe.unet) if pipe.unet is not unet else None,
                "vae.decode": hasattr(pipe.vae.decode, "_torchdynamo_orig_callable") or None,
                "repeated_blocks": len(compiled_blocks) or None,
            }.items()
            if value is not None
        },
        "inductor_flags": {
            name: getattr(flags, name)
            for name in ("conv_1x1_as_mm", "coordinate_descent_tuning", "epilogue_fusion",
                         "coordinate_descent_check_all_directions")
        },
    }
