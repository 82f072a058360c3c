"""Regional compilation's bookkeeping: which modules each choice of regions compiles, how many compiled versions
their shared code object needs, the fallback from CUDA graphs where compiled blocks run in sequence, and how any
compiled function was compiled."""

import torch

from .memory import compiler_counters, reset_compiler

# The UNet's modules that regional compilation may compile, by name of a choice. diffusers marks only the transformer
# block as repeated (`UNet2DConditionModel._repeated_blocks`); the others compile whole attention layers (their
# `proj_in`/`proj_out` included, which step 06 quantized at the 1280-wide level), the resnets, and the up- and
# down-samplers too.
REGIONS = {
    "blocks": ("BasicTransformerBlock",),
    "attention+resnets": ("Transformer2DModel", "ResnetBlock2D"),
    "attention+resnets+samplers": ("Transformer2DModel", "ResnetBlock2D", "Downsample2D", "Upsample2D"),
}
DEFAULT_REGIONS = "blocks"


def dynamo_context(compiled):
    """The context torch.compile wrapped `compiled` in: a compiled module's `dynamo_ctx`, or a compiled function's."""
    if hasattr(compiled, "dynamo_ctx"):
        return compiled.dynamo_ctx
    cells = getattr(compiled, "__closure__", None) or ()
    return next((c.cell_contents for c in cells if type(c.cell_contents).__name__ == "OptimizeContext"), None)


def compile_options(compiled):
    """How `compiled` was compiled: fullgraph, dynamic and the Inductor options its mode set; None if it wasn't."""
    context = dynamo_context(compiled)
    if context is None:
        return None
    backend = context.callback
    while backend is not None and not hasattr(backend, "config"):
        backend = getattr(backend, "_torchdynamo_orig_backend", None)
    return {
        "fullgraph": context.fullgraph,
        "dynamic": context._dynamic,
        "mode_options": dict(sorted((getattr(backend, "config", None) or {}).items())),
    }


def region_versions(unet):
    """{class name: how many distinct shapes its instances see at one image size}, for the classes that
    `unet._repeated_blocks` names: instances with the same weight shapes at the same level of the UNet (the same
    resolution) see the same input shapes."""
    levels = len(unet.config.block_out_channels)
    shapes = {}
    for name, module in unet.named_modules():
        if type(module).__name__ in unet._repeated_blocks:
            part, _, rest = name.partition(".")
            if part == "down_blocks":
                level = int(rest.split(".")[0])
            elif part == "up_blocks":
                level = levels - 1 - int(rest.split(".")[0])
            else:  # the middle block, at the innermost level
                level = levels - 1
            weights = tuple(tuple(p.shape) for p in module.parameters())
            shapes.setdefault(type(module).__name__, set()).add((level, weights))
    return {name: len(found) for name, found in shapes.items()}


def allow_a_version_per_shape(unet):
    """Raise `torch._dynamo.config.recompile_limit` where a region class sees more distinct shapes than it allows,
    with a printed reason: all instances of a class share one code object, on which Dynamo keeps one compiled version
    per distinct input shape and memory layout, and past the limit a `fullgraph=True` compile raises
    `FailOnRecompileLimitHit`."""
    name, shapes = max(region_versions(unet).items(), key=lambda item: item[1])
    needed, limit = 2 * shapes, torch._dynamo.config.recompile_limit
    if needed > limit:
        torch._dynamo.config.recompile_limit = needed
        print(f"torch._dynamo.config.recompile_limit raised from {limit} to {needed}: the {name} modules share one "
              f"code object and see {shapes} distinct shapes, each a compiled version of it, twice where an input "
              "comes in both memory layouts (channels-last and contiguous), which Dynamo's guards tell apart.")


# What CUDA-graph trees raise when a graph's output is read after a later replay wrote over it: what
# pytorch/pytorch#152887 reports for blocks compiled one by one and run in sequence (`z = f(f(x))`), as regions are.
CUDAGRAPH_OVERWRITE = "overwritten by a subsequent run"
NO_CUDAGRAPHS = "max-autotune-no-cudagraphs"
cudagraph_fallbacks = []  # the sentence said for each fallback of this process, for its records


def compiled_blocks(pipe):
    """The compiled functions of the regionally compiled blocks (none when the UNet isn't compiled so)."""
    unet = getattr(pipe.unet, "_orig_mod", pipe.unet)
    return [m._compiled_call_impl for m in unet.modules() if getattr(m, "_compiled_call_impl", None)]


def call_with_cudagraph_fallback(pipe, call):
    """`call()`; where regions compiled with CUDA graphs fail as in pytorch/pytorch#152887, compile them again
    with max-autotune-no-cudagraphs, say so in one sentence, and call again."""
    try:
        return call()
    except RuntimeError as error:
        blocks = compiled_blocks(pipe)
        options = compile_options(blocks[0]) if blocks else None
        if CUDAGRAPH_OVERWRITE not in str(error) or not options or not options["mode_options"].get("triton.cudagraphs"):
            raise
        cause = str(error).strip().splitlines()[0][:160]
        message = (f"The regions failed under CUDA graphs ({cause}; pytorch/pytorch#152887): they are compiled "
                   f"again with {NO_CUDAGRAPHS}, and the record says so.")
        print(message)
        cudagraph_fallbacks.append(message)
        reset_compiler()  # the failed CUDA-graph trees and their memory pools go with the compiled code
        pipe.unet.compile_repeated_blocks(mode=NO_CUDAGRAPHS, fullgraph=True, dynamic=options["dynamic"])
        return call()


def last_cudagraph_fallback():
    """The sentence said for this process's last fallback from CUDA graphs, or None."""
    return cudagraph_fallbacks[-1] if cudagraph_fallbacks else None


def recompile_limit_hits():
    """How often, in this process, Dynamo met a function at `torch._dynamo.config.recompile_limit`, from its own
    counters: with `fullgraph=True` it then raises `FailOnRecompileLimitHit`; without, it runs the function eagerly."""
    return sum(count for message, count in compiler_counters()["unimplemented"].items()
               if "recompile limit" in message.lower() or "recompile_limit" in message)
