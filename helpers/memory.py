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

import collections
import gc
import os
import sys
from typing import NamedTuple

import torch

from .errors import GpuMemoryBusy
from .machine import nvidia_smi

# This process's CUDA context, which torch's memory counters leave out.
CUDA_CONTEXT_BYTES = 0.5e9
# Less than this held by others (a desktop, a monitoring agent) is not worth a line.
NOTICE_BYTES = 1e9


class GpuMemory(NamedTuple):
    others: int  # bytes held by other processes
    total: int  # bytes of the GPU
    pids: list  # the other processes' ids, where nvidia-smi names them


def free_memory():
    """Give back what dropped objects held: Python's garbage first, then the blocks CUDA keeps cached."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def live_pipelines():
    """The diffusers pipelines still alive in this process (after a collection) that hold memory: not those on the
    meta device, such as the one `helpers.flops` keeps for counting FLOPs, which are shapes without data."""
    from diffusers import DiffusionPipeline

    gc.collect()
    # `type`, not `isinstance`: isinstance reads `__class__`, which raises on a dead `weakref.proxy` (notebook 01
    # holds one after loading a model from a folder); `type` reads nothing from the object.
    pipelines = [obj for obj in gc.get_objects() if issubclass(type(obj), DiffusionPipeline)]
    return [pipe for pipe in pipelines if pipe.device.type != "meta"]


def compiler_counters():
    """Dynamo's and Inductor's event counters of this process (`torch._dynamo.utils.counters`). Where nothing has
    imported Dynamo, nothing has compiled: empty counters, without importing Dynamo for them (2.7 CPU-seconds more
    than torch alone on a 2-core CPU: `time python -c "import torch._dynamo"` against `import torch`)."""
    if "torch._dynamo" not in sys.modules:
        return collections.defaultdict(collections.Counter)
    from torch._dynamo.utils import counters

    return counters


def reset_compiler():
    """`torch.compiler.reset()`, tried once more where it met a race of torch's own: it resets each backend while
    iterating over them, and the reset of an Inductor backend compiled with CUDA graphs can import Inductor modules
    that register another backend as they load (`torch.compiler.disable` at import), so the iteration fails with
    "dictionary changed size during iteration". The second try finds those modules imported. Seen with torch 2.13
    where nothing had run Inductor before: `pytest tests/test_regional.py` on its own."""
    try:
        torch.compiler.reset()
    except RuntimeError as error:
        if "dictionary changed size during iteration" not in str(error):
            raise
        torch.compiler.reset()


def release(*panels):
    """Drop the pipelines that `panels` hold and all compiled code, free the memory, and say in one line what this
    process still holds.

    The notebook deletes its own `pipe` first; a panel then builds a fresh pipeline on its next click.
    Returns the number of pipelines still alive (0 when everything was freed).
    """
    for panel in panels:
        panel.release_pipeline()
    reset_compiler()  # every compiled function of this process, and the CUDA-graph memory pools they hold
    free_memory()
    alive = len(live_pipelines())
    held = ""
    if torch.cuda.is_available():
        held = f"; this kernel still holds {torch.cuda.memory_reserved() / 1e9:.2f} GB of GPU memory"
    left = "no pipeline left alive" if not alive else f"{alive} pipeline(s) still alive: delete what refers to them"
    print(f"Released: {left}{held}.")
    return alive


def gpu_memory_held_by_others(device=None):
    """GpuMemory: the bytes other processes hold on this GPU, its total, and their pids where nvidia-smi names them.

    The bytes are the GPU's used memory less what this process reserved and its CUDA context; nvidia-smi names the
    other processes only where it lists this one too (inside a container it often lists none).
    """
    device = torch.device(device or "cuda")
    free, total = torch.cuda.mem_get_info(device)
    held = total - free - torch.cuda.memory_reserved(device) - CUDA_CONTEXT_BYTES
    listed = _gpu_processes(device)
    pids = sorted(listed - {os.getpid()}) if os.getpid() in listed else []
    return GpuMemory(int(max(0, held)), total, pids)


def _gpu_processes(device):
    """The pids of the processes nvidia-smi lists on `device`; none where it can't tell."""
    uuid = str(torch.cuda.get_device_properties(device).uuid).lower()
    pids = set()
    for line in nvidia_smi("--query-compute-apps=pid,gpu_uuid", "--format=csv,noheader"):
        pid, _, gpu = line.partition(",")
        if gpu.strip().lower().removeprefix("gpu-") == uuid and pid.strip().isdigit():
            pids.add(int(pid))
    return pids


def check_gpu_memory(need, device, verbose=True):
    """Raise GpuMemoryBusy where other processes hold so much of the GPU that a pipeline of `need` bytes won't fit
    beside them."""
    held = gpu_memory_held_by_others(device)
    if held.others < NOTICE_BYTES:
        return
    room = held.total - CUDA_CONTEXT_BYTES
    if need > room:  # larger than the whole GPU: no one else's doing, and running out of memory will say so
        return
    holders = "Another process holds" if len(held.pids) == 1 else "Other processes hold"
    numbers = f"{_gb(held.others)} of this GPU's {_gb(held.total)} ({_who(held.pids)})"
    if held.others + need > room:
        raise GpuMemoryBusy(
            f"{holders} {numbers}, and this pipeline needs about {_gb(need)}: shut that notebook down with "
            "Kernel > Shut Down Kernel (or end that process), then run this cell again."
        )
    if verbose:
        print(f"GPU memory: {holders.lower()} {numbers}; this pipeline needs about {_gb(need)}, which fits beside.")


def _who(pids):
    if not pids:
        return "probably another notebook's kernel"
    if len(pids) == 1:
        return f"pid {pids[0]}: probably another notebook's kernel"
    return f"pids {', '.join(map(str, pids))}: probably other notebooks' kernels"


def _gb(size):
    return f"{size / 1e9:.1f} GB"
