"""What must happen as `helpers` is imported, before anything imports diffusers: library warnings that a user of
the course can do nothing about silenced one by one, and the Inductor cache setting checked.

Each entry names the logger that emits the warning and a piece of its text; a filter on that logger drops exactly
those records, so every other warning of the same library still shows. Importing this module installs the
filters; `helpers` imports it before anything imports diffusers.
"""

import logging
import os
import re
import tempfile
import warnings

SILENCED = (
    # SDXL's pipeline imports CLIP's image processor, which it never uses; transformers wants torchvision for it.
    ("transformers.utils.import_utils", "requires torchvision (not installed); falling back"),
    # diffusers looks for torchao tensor classes that newer torchao versions moved; the course loads no torchao file.
    ("diffusers.quantizers.torchao.torchao_quantizer", "Unable to import `torchao` Tensor objects"),
    # torchao registers its enums with torch's pytree the way older torch versions needed.
    ("torch.utils._pytree", "is an Enum subclass and is now natively supported"),
)


class DropMatching(logging.Filter):
    def __init__(self, text):
        super().__init__()
        self.text = text

    def filter(self, record):
        return self.text not in record.getMessage()


class DropMatchingOnCpuTorch(DropMatching):
    """Drops the records that hold `text` only where torch is a build without CUDA. This module imports no torch at
    its own import (the runner's own process needs none); the loggers it filters belong to libraries that import torch
    first."""

    @staticmethod
    def applies():
        import torch

        return torch.version.cuda is None

    def filter(self, record):
        return super().filter(record) or not self.applies()


# torchao's CUDA extensions can't load into a CPU-only torch, and nothing on a CPU calls them. With a CUDA torch the
# same message means a torchao built for another torch, which the user must hear.
SILENCED_ON_CPU_TORCH = (("torchao", "Failed to load"),)


# Python warnings, by the start of their text and their category.
SILENCED_WARNINGS = (
    # Dynamo's note that diffusers' upsampling calls an lru_cache-wrapped function (diffusers' code, traced
    # correctly; nothing for the user to change).
    ("Dynamo detected a call to a `functools.lru_cache`-wrapped function", UserWarning),
    # torch.export's own pytree code, unpickling a spec the deprecated way (notebook 08's AOTInductor package).
    ("`isinstance(treespec, LeafSpec)` is deprecated", FutureWarning),
    # AOTAutograd's cache key of a graph holding torchao's int8 weights (notebooks 06 and 07): torch hashes the tensor
    # subclass by its own default (`_default_stable_hash_for_caching`: shape, metadata and inner tensors) and asks
    # torchao to define the method; a hint for torchao, not the user.
    ("Int8Tensor does not implement _stable_hash_for_caching", UserWarning),
    # diffusers' `load_config` passes `local_dir_use_symlinks`, which huggingface_hub deprecated and ignores, to
    # `hf_hub_download` for a model loaded from the hub on its own (the fp16-safe VAE: `AutoencoderKL.from_pretrained`).
    ("The `local_dir_use_symlinks` argument is deprecated and ignored", UserWarning),
)


def silenced_texts():
    """The texts of the log records that this process drops."""
    cpu_only = [text for _, text in SILENCED_ON_CPU_TORCH] if DropMatchingOnCpuTorch.applies() else []
    return [text for _, text in SILENCED] + cpu_only


def silence_known_warnings():
    for text, category in SILENCED_WARNINGS:
        warnings.filterwarnings("ignore", message=re.escape(text), category=category)
    for kind, silenced in ((DropMatching, SILENCED), (DropMatchingOnCpuTorch, SILENCED_ON_CPU_TORCH)):
        for logger_name, text in silenced:
            logger = logging.getLogger(logger_name)
            if not any(type(f) is kind and f.text == text for f in logger.filters):
                logger.addFilter(kind(text))



def check_inductor_cache_setting():
    """Fall back to Inductor's default cache, with one line, where TORCHINDUCTOR_CACHE_DIR can't be written: torch
    makes that folder as diffusers is imported, and would fail there with a traceback. This module is imported
    before diffusers is."""
    folder = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    if not folder:
        return
    try:
        os.makedirs(folder, exist_ok=True)
        tempfile.TemporaryFile(dir=folder).close()
    except OSError as error:
        del os.environ["TORCHINDUCTOR_CACHE_DIR"]
        print(f"Warning: TORCHINDUCTOR_CACHE_DIR={folder} can't be written ({error.strerror or error}), so Inductor "
              "uses its default cache folder: set TORCHINDUCTOR_CACHE_DIR to a folder you can write, or unset it.")


silence_known_warnings()
check_inductor_cache_setting()
