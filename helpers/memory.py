"""Giving GPU memory back: JupyterLab keeps every notebook's kernel, and what it holds, alive.

A compiled pipeline sits in reference cycles (`vae.decode` -> compiled function -> bound method -> vae; each
regionally compiled block's `_compiled_call_impl` -> the block), so `del pipe` alone frees nothing until Python's
cycle collector runs: `free_memory` runs it, then hands CUDA's cached blocks back to the driver.
That is not all: Dynamo caches compiled code on the Python code object it compiled, and every block of a class shares
one (`BasicTransformerBlock.forward`), so the code compiled for a dead pipeline stays cached, with the CUDA-graph
trees of `max-autotune` and their private memory pools, which `torch.cuda.empty_cache()` can't free. Those cache
entries also count toward `torch._dynamo.config.recompile_limit`. `release` therefore also resets the compiler
(`torch.compiler.reset()`), as must anything that builds a new compiled pipeline in the same process.
"""

import gc

import torch
from diffusers import DiffusionPipeline


def free_memory():
    """Give back what dropped objects held: Python's garbage first, then the blocks CUDA keeps cached."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def live_pipelines():
    """The diffusers pipelines still alive in this process (after a collection) that hold memory: not those on the
    meta device, such as the one `helpers.flops` keeps for counting FLOPs, which are shapes without data."""
    gc.collect()
    # `type`, not `isinstance`: isinstance reads `__class__`, which raises on a dead `weakref.proxy` (notebook 01
    # holds one after loading a model from a folder); `type` reads nothing from the object.
    pipelines = [obj for obj in gc.get_objects() if issubclass(type(obj), DiffusionPipeline)]
    return [pipe for pipe in pipelines if pipe.device.type != "meta"]


def release(*panels):
    """Drop the pipelines that `panels` hold and all compiled code, free the memory, and say in one line what this
    process still holds.

    The notebook deletes its own `pipe` first; a panel then builds a fresh pipeline on its next click.
    Returns the number of pipelines still alive (0 when everything was freed).
    """
    for panel in panels:
        panel.release_pipeline()
    torch.compiler.reset()  # every compiled function of this process, and the CUDA-graph memory pools they hold
    free_memory()
    alive = len(live_pipelines())
    held = ""
    if torch.cuda.is_available():
        held = f"; this kernel still holds {torch.cuda.memory_reserved() / 1e9:.2f} GB of GPU memory"
    left = "no pipeline left alive" if not alive else f"{alive} pipeline(s) still alive: delete what refers to them"
    print(f"Released: {left}{held}.")
    return alive
