"""The errors a user meets before anything runs (the model can't be had, or the GPU has no room for it), and how an
out-of-memory error is told apart from others. Each message is one sentence that says what to do."""


class ModelUnavailable(RuntimeError):
    """The model can't be found or loaded; the message is one sentence that says what to do."""


class GpuMemoryBusy(ModelUnavailable):
    """Other processes hold so much of the GPU that the pipeline won't fit beside them."""


OUT_OF_MEMORY_ERRORS = ("OutOfMemoryError", "OutOfMemory", "MemoryError")
# How a RuntimeError (or Inductor's wrapping of one) says that an allocation failed, on a GPU or in CPU memory.
OUT_OF_MEMORY_WORDS = ("out of memory", "can't allocate memory", "cannot allocate memory")
OOM_ADVICE = (
    "out of GPU memory: use a smaller --height/--width, free other GPU work, or use a GPU with more memory "
    "(SDXL's fp32 weights alone are 14 GB)"
)
CPU_OOM_ADVICE = (
    "out of memory: use a smaller --height/--width, close other programs, or use a machine with more memory "
    "(SDXL's fp32 weights alone are 14 GB)"
)


def is_out_of_memory(error_name, message):
    """True for an out-of-memory error, on a GPU or in CPU memory, also when Inductor wraps one raised while it
    compiled or autotuned."""
    if error_name in OUT_OF_MEMORY_ERRORS:
        return True
    return error_name in ("RuntimeError", "InductorError") and any(w in message.lower() for w in OUT_OF_MEMORY_WORDS)


def out_of_memory_advice(error_name, message):
    """What to do about an out-of-memory error, on a GPU or in CPU memory, in words the runner prints."""
    on_gpu = error_name == "OutOfMemoryError" or "cuda" in message.lower()
    return OOM_ADVICE if on_gpu else CPU_OOM_ADVICE
