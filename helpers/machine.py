"""Facts about this machine that every record and compile-cache manifest carries: the device, its driver, the
versions of the course's libraries, and what "fp32" means for its matmuls and convolutions; and, for a compiled
step's record, whether max-autotune autotunes matmuls on this device."""

import platform
import shutil
import subprocess
from importlib import metadata

import torch

VERSIONED_PACKAGES = ("torch", "diffusers", "torchao", "transformers")


def package_versions():
    versions = {}
    for name in VERSIONED_PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    versions["python"] = platform.python_version()
    versions["cuda"] = torch.version.cuda
    return versions


def precision_settings():
    """What "fp32" means for this process's matmuls and cuDNN convolutions: "tf32" (TF32 tensor cores, faster and less
    exact), "ieee" (full fp32) or "none" (no TF32). Read through torch's `fp32_precision` settings, which answer
    whichever API set them; the older `allow_tf32` getters can raise once the new API has set a value they can't
    express."""
    return {
        "matmul_fp32_precision": torch.backends.cuda.matmul.fp32_precision,
        "cudnn_conv_fp32_precision": torch.backends.cudnn.conv.fp32_precision,
    }


def device_name(device=None):
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    threads = torch.get_num_threads()
    return f"CPU {platform.machine()} ({threads} thread{'' if threads == 1 else 's'})"


def driver_version():
    if not torch.cuda.is_available():
        return None
    versions = nvidia_smi("--query-gpu=driver_version", "--format=csv,noheader")
    return versions[0] if versions else None


def nvidia_smi_gpu():
    """The name of the first GPU nvidia-smi lists, or None: no nvidia-smi, no GPU, or nvidia-smi failed."""
    names = nvidia_smi("--query-gpu=name", "--format=csv,noheader")
    return names[0] if names else None


def nvidia_smi(*args):
    """nvidia-smi's output lines for `args`; none where it is missing, fails or hangs."""
    if shutil.which("nvidia-smi") is None:
        return []
    try:
        result = subprocess.run(["nvidia-smi", *args], capture_output=True, text=True, timeout=10, check=True)
    except (OSError, subprocess.SubprocessError):
        return []
    return [line.strip() for line in result.stdout.splitlines() if line.strip()]


def matmul_autotuning(device):
    """Whether max-autotune benchmarks matmul and convolution kernels on `device`, and why.

    Inductor autotunes them only on GPUs with at least 68 streaming multiprocessors (its `is_big_gpu`): an A100 or
    H100 does, an L4 (58) or T4 (40) doesn't, and there max-autotune keeps only its other parts (CUDA graphs,
    pointwise tuning). On a CPU, its matmul templates need `torch._inductor.config.freezing`, which the course
    leaves off.
    """
    device = torch.device(device)
    if device.type != "cuda":
        return {"autotunes_matmuls": False, "why": "a CPU: Inductor's matmul templates need freezing, left off here"}
    from torch._inductor.utils import is_big_gpu

    sms = torch.cuda.get_device_properties(device).multi_processor_count
    big = is_big_gpu(device)
    why = f"{sms} streaming multiprocessors; Inductor autotunes matmuls from 68 up"
    return {"autotunes_matmuls": big, "sms": sms, "why": why}
