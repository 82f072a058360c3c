"""Each step of the ladder as a function, written exactly as its notebook writes it inline.

Notebook N shows its own change as code and gets the pipeline of the steps before it from `build`. A test
runs each notebook's pipeline cells and checks that they leave the pipeline in the same state as
`build(through=N)`, so the notebooks and these functions can't drift apart.
"""

import dataclasses

import torch
from diffusers.models.attention_processor import AttnProcessor2_0

from .models import load_pipeline, low_precision_dtype
from .params import DEFAULT_COMPILE_MODE
from .regions import DEFAULT_REGIONS, REGIONS, allow_a_version_per_shape, compile_options, compiled_blocks
from .steps import StepUnavailable, get_step


def use_plain_attention(pipe):
    """Step 01: attention as explicit matmul + softmax + matmul (diffusers' `AttnProcessor`)."""
    pipe.unet.set_default_attn_processor()
    pipe.vae.set_default_attn_processor()


def use_sdpa(pipe):
    """Step 03: attention through `torch.nn.functional.scaled_dot_product_attention` (diffusers' default)."""
    pipe.unet.set_attn_processor(AttnProcessor2_0())
    pipe.vae.set_attn_processor(AttnProcessor2_0())


# Step 04's Inductor settings, tuned for SDXL by the tutorial. Step 06 adds none (see quantize_int8).
INDUCTOR_FLAGS = {
    "conv_1x1_as_mm": True,
    "coordinate_descent_tuning": True,
    "epilogue_fusion": False,
    "coordinate_descent_check_all_directions": True,
}


def set_inductor_flags():
    """Step 04: the inductor settings the SDXL tutorial tuned. They are global: they apply to every later compile."""
    for name, value in INDUCTOR_FLAGS.items():
        setattr(torch._inductor.config, name, value)


def _ready_to_compile(pipe):
    """Step 04's flags and channels_last layout, which both ways of compiling start with; False if compiled already."""
    if is_compiled(pipe):
        print("The pipeline is already compiled; build a fresh one to compile it differently.")
        return False
    set_inductor_flags()
    pipe.unet.to(memory_format=torch.channels_last)
    pipe.vae.to(memory_format=torch.channels_last)
    return True


def compile_pipeline(pipe, mode=DEFAULT_COMPILE_MODE):
    """Step 04: channels_last memory layout, then the UNet and the VAE decoder compiled whole."""
    if not _ready_to_compile(pipe):
        return
    pipe.unet = torch.compile(pipe.unet, mode=mode, fullgraph=True)
    pipe.vae.decode = torch.compile(pipe.vae.decode, mode=mode, fullgraph=True)


def fuse_qkv(pipe):
    """Step 05: one (in, 3*out) projection instead of three (in, out) ones in every self-attention."""
    if is_fused(pipe):
        # Fusing again would rebuild the fused layers from the originals, undoing step 06's quantization.
        print("The projections are already fused.")
        return
    pipe.fuse_qkv_projections()
    drop_unfused_projections(pipe)


def is_fused(pipe):
    return any(getattr(m, "fused_projections", False) for m in (*pipe.unet.modules(), *pipe.vae.modules()))


def unfused_leftovers(model):
    """The q, k, v projections that step 05 replaced by fused ones: kept by diffusers for unfusing, never called."""
    return {
        f"{name}.{projection}"
        for name, module in model.named_modules()
        if getattr(module, "fused_projections", False)
        for projection in (("to_k", "to_v") if module.is_cross_attention else ("to_q", "to_k", "to_v"))
        if getattr(module, projection, None) is not None
    }


def drop_unfused_projections(pipe):
    """Free the projections that fusion replaced (in SDXL's UNet 648 M parameters, 1.3 GB in bfloat16).

    diffusers keeps them so that `unfuse_qkv_projections()` can restore them; the fused attention never calls them.
    After this the pipeline can't be unfused: build a new one instead. Returns the number of parameters freed.
    """
    freed = 0
    for model in (pipe.unet, pipe.vae):
        for name in unfused_leftovers(model):
            parent_name, projection = name.rsplit(".", 1)
            parent = model.get_submodule(parent_name)
            freed += sum(p.numel() for p in getattr(parent, projection).parameters())
            setattr(parent, projection, None)
    return freed


def int8_filter(unet):
    """Step 06's choice of layers: linear layers of the widest level of the UNet, and none fed by text or time.

    Dynamic int8 quantizes each activation on the fly, which only pays off on large matmuls: in SDXL the
    1280-wide layers of the innermost level. The cross-attention keys and values see 77 text tokens and the
    time embeddings one row per image: too few rows to gain anything. The resnets' 1x1 shortcut convolutions stay
    as they are (Inductor already runs them as matmuls): they are a fraction of a percent of the UNet's work.
    """
    widest = unet.config.block_out_channels[-1]

    def worth_quantizing(module, fqn):
        return (
            isinstance(module, torch.nn.Linear)
            and type(module.weight) is torch.nn.Parameter  # not quantized already
            and min(module.in_features, module.out_features) >= widest
            and not any(part in fqn for part in ("time_emb", "add_embedding", "attn2.to_k", "attn2.to_v"))
        )

    return worth_quantizing


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


def torchao_problem():
    """None where step 06's int8 can run, else the one sentence that says why not (what the flags panel shows)."""
    try:
        require_torchao()
    except StepUnavailable as error:
        return str(error)
    return None


def weights_gb(module):
    """Bytes of a module's parameters and buffers in GB, counting quantized tensors at their packed size."""
    from torchao.utils import get_model_size_in_bytes

    return get_model_size_in_bytes(module) / 1e9


def quantize_int8(pipe):
    """Step 06: torchao's dynamic int8 quantization (int8 weights, activations quantized per call).

    `set_inductor_config=False`: torchao's own setter (`recommended_inductor_config_setter`) would set five Inductor
    flags: the two that step 04 sets already, two that are on by default, and `force_fuse_int_mm_with_mul`, which
    torch 2.11 and 2.13 read nowhere (its one reader, `check_shape_cuda_and_fused_int_mm_mul_enabled`, is never
    called).
    torchao 0.17 and older also switched every fp32 matmul of the process to TF32 there.
    """
    require_torchao()
    from torchao.quantization import Int8DynamicActivationInt8WeightConfig, quantize_

    if quantized_layers(pipe.unet):
        print("The UNet is already quantized; quantizing again would change nothing.")
        return
    quantize_(pipe.unet, Int8DynamicActivationInt8WeightConfig(set_inductor_config=False),
              filter_fn=int8_filter(pipe.unet))


def compile_regions(pipe, mode=DEFAULT_COMPILE_MODE, dynamic=False, regions=DEFAULT_REGIONS):
    """Step 07: compile each repeated region once per shape and reuse the code, not the whole UNet.

    `regions` names a choice of `REGIONS`: diffusers' transformer blocks by default. `dynamic=False` keeps the shapes
    static: SDXL's blocks run at two widths (640 and 1280 channels), and with torch's default (`dynamic=None`) the
    second width would make Dynamo recompile with symbolic sizes. `dynamic=True` compiles symbolic sizes from the
    start; duck shaping is turned off then, as diffusers advises, so that equal sizes (a square image) are not assumed
    equal for every later image.
    """
    if regions not in REGIONS:
        raise ValueError(f"regions must be one of {', '.join(REGIONS)}, got {regions!r}.")
    if not _ready_to_compile(pipe):
        return
    if dynamic:
        torch.fx.experimental._config.use_duck_shape = False
    pipe.unet._repeated_blocks = list(REGIONS[regions])  # what compile_repeated_blocks compiles
    allow_a_version_per_shape(pipe.unet)
    pipe.unet.compile_repeated_blocks(mode=mode, fullgraph=True, dynamic=dynamic)
    pipe.vae.decode = torch.compile(pipe.vae.decode, mode=mode, fullgraph=True, dynamic=dynamic)


def build_pipeline(model, settings, compile_mode=DEFAULT_COMPILE_MODE, device=None, verbose=True,
                   regions=DEFAULT_REGIONS):
    """The one builder: a pipeline with exactly `settings` (a Settings row), each in the ladder's order; a regional
    compile compiles the `regions` choice of `REGIONS`.

    Compilation comes last: it must see the final modules.
    """
    dtype = low_precision_dtype(device, verbose=verbose) if settings.low_precision else torch.float32
    pipe = load_pipeline(model, dtype=dtype, device=device, verbose=verbose)
    if settings.sdpa:
        use_sdpa(pipe)
    else:
        use_plain_attention(pipe)
    if settings.fused_qkv:
        fuse_qkv(pipe)
    if settings.int8:
        quantize_int8(pipe)
    if settings.compile == "full":
        compile_pipeline(pipe, mode=compile_mode)
    elif settings.compile == "regional":
        compile_regions(pipe, mode=compile_mode, regions=regions)
    return pipe


def build(model="auto", through="03", compile=True, compile_mode=DEFAULT_COMPILE_MODE, device=None, verbose=True):
    """The pipeline of step `through`; `compile=False` leaves out its compilation.

    Notebooks 05 to 07 ask for the step before theirs uncompiled, make their change, and compile last.
    """
    settings = get_step(through).settings
    if not compile:
        settings = dataclasses.replace(settings, compile="off")
    return build_pipeline(model, settings, compile_mode=compile_mode, device=device, verbose=verbose)


def quantized_layers(module):
    """Names of the layers whose weight torchao replaced by a quantized tensor."""
    return [
        name
        for name, layer in module.named_modules()
        if isinstance(getattr(layer, "weight", None), torch.Tensor)
        and type(layer.weight) not in (torch.Tensor, torch.nn.Parameter)
    ]


def is_compiled(pipe):
    return bool(pipeline_state(pipe)["compiled"])


def pipeline_state(pipe):
    """What the ladder changes, as plain data: dtypes, attention, fusion, quantization, layout, compilation."""
    unet = getattr(pipe.unet, "_orig_mod", pipe.unet)
    models = {"unet": unet, "vae": pipe.vae, "text_encoder": pipe.text_encoder, "text_encoder_2": pipe.text_encoder_2}
    convs = [m for m in unet.modules() if isinstance(m, torch.nn.Conv2d) and m.weight.dim() == 4]
    blocks = compiled_blocks(pipe)
    flags = torch._inductor.config
    return {
        "dtypes": {name: str(model.dtype) for name, model in models.items()},
        "attention": {
            name: sorted({type(p).__name__ for p in models[name].attn_processors.values()}) for name in ("unet", "vae")
        },
        "fused_qkv": sorted({type(m).__name__ for m in unet.modules() if getattr(m, "fused_projections", False)}),
        "quantized_layers": quantized_layers(unet),
        "unfused_leftovers": sorted(unfused_leftovers(unet) | unfused_leftovers(pipe.vae)),
        "channels_last": bool(convs) and all(m.weight.is_contiguous(memory_format=torch.channels_last) for m in convs),
        "compiled": {
            key: value
            for key, value in {
                "unet": compile_options(pipe.unet) if pipe.unet is not unet else None,
                "vae.decode": compile_options(pipe.vae.decode),
                "repeated_blocks": {"count": len(blocks), **compile_options(blocks[0])} if blocks else None,
            }.items()
            if value is not None
        },
        "inductor_flags": {name: getattr(flags, name) for name in INDUCTOR_FLAGS},
        "matmul_fp32_precision": torch.backends.cuda.matmul.fp32_precision,  # readable whichever API set it
    }
