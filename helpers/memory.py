"""Giving GPU memory back: JupyterLab keeps every notebook's kernel, and what it holds, alive.

A compiled pipeline sits in reference cycles (`vae.decode` -> compiled function -> bound method -> vae; each
regionally compiled block's `_compiled_call_impl` -> the block), so `del pipe` alone frees nothing until Python's
cycle collector runs: `free_memory` runs it, then hands CUDA's cached blocks back to the driver.
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
    """Drop the pipelines that `panels` hold, free the memory, and say in one line what this process still holds.

    The notebook deletes its own `pipe` first; a panel then builds a fresh pipeline on its next click.
    Returns the number of pipelines still alive (0 when everything was freed).
    """
    for panel in panels:
        panel.release_pipeline()
    free_memory()
    alive = len(live_pipelines())
    held = ""
    if torch.cuda.is_available():
        held = f"; this kernel still holds {torch.cuda.memory_reserved() / 1e9:.2f} GB of GPU memory"
    left = "no pipeline left alive" if not alive else f"{alive} pipeline(s) still alive: delete what refers to them"
    print(f"Released: {left}{held}.")
    return alive
