"""Honest wall-clock timing of a GPU (or CPU) workload.

CUDA kernels run asynchronously: a Python call returns while the GPU is still busy, so the device is
synchronised on both sides of every timed call. The first call, where torch.compile compiles and
caches warm up, is timed and reported on its own, never mixed into the steady-state numbers; so is its peak
GPU memory, which holds compilation's autotuning and CUDA-graph recording.
"""

import inspect
import statistics
import time
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from .sentences import measurement_sentence, noisy_sentence

# A spread (IQR) above this fraction of the median means something else used the machine while it was measured.
NOISY_IQR_FRACTION = 0.10


def synchronize(device=None):
    if torch.cuda.is_available():
        torch.cuda.synchronize(device)


def peak_memory_gb():
    """The most GPU memory tensors held since the last reset, in GB (None without a GPU)."""
    return torch.cuda.max_memory_allocated() / 1e9 if torch.cuda.is_available() else None


def reset_peak_memory():
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()


@dataclass
class Measurement:
    samples_s: list
    first_call_s: float
    warmup: int
    peak_memory_gb: float | None = None  # during the steady, timed calls
    first_call_peak_memory_gb: float | None = None  # during the first call: compilation included
    output: object = field(default=None, repr=False)

    @property
    def median_s(self):
        return statistics.median(self.samples_s)

    @property
    def iqr_s(self):
        """Interquartile range: the spread of the middle half of the samples (0 for fewer than two)."""
        if len(self.samples_s) < 2:
            return 0.0
        q1, _, q3 = statistics.quantiles(self.samples_s, n=4, method="inclusive")
        return q3 - q1

    @property
    def noisy(self):
        """True when the spread is so wide that the median alone would mislead."""
        return self.iqr_s > NOISY_IQR_FRACTION * self.median_s

    def to_dict(self):
        return {
            "median_s": self.median_s,
            "iqr_s": self.iqr_s,
            "min_s": min(self.samples_s),
            "max_s": max(self.samples_s),
            "samples_s": list(self.samples_s),
            "first_call_s": self.first_call_s,
            "warmup": self.warmup,
            "peak_memory_gb": self.peak_memory_gb,
            "first_call_peak_memory_gb": self.first_call_peak_memory_gb,
            "noisy": self.noisy,
        }

    def __str__(self):
        text = measurement_sentence(self.median_s, self.iqr_s, runs=len(self.samples_s), first_call_s=self.first_call_s)
        if self.peak_memory_gb is not None:
            first = self.first_call_peak_memory_gb
            text += f"; peak GPU memory {self.peak_memory_gb:.2f} GB steady, {first:.2f} GB in the first call"
        if self.noisy:
            text += "\n" + noisy_sentence(self.median_s, self.iqr_s)
        return text


def _check_arguments(fn, warmup, runs):
    """Refuse, in one sentence, what `benchmark` would time wrongly or fail on half-way."""
    if not callable(fn):
        raise TypeError(f"benchmark needs a function to call, got {fn!r}.")
    if inspect.isgeneratorfunction(fn) or inspect.iscoroutinefunction(fn) or inspect.isasyncgenfunction(fn):
        raise TypeError(
            f"benchmark needs a plain function: {getattr(fn, '__name__', fn)!r} is a generator or async function, "
            "whose call only creates an object and does none of the work; time a function that does the work."
        )
    for name, value, least in (("runs", runs, 1), ("warmup", warmup, 0)):
        if not isinstance(value, int) or isinstance(value, bool) or value < least:
            raise ValueError(f"{name} must be a whole number of {least} or more, got {value!r}.")


def benchmark(fn, warmup=1, runs=5, progress=True, description="timing"):
    """Call `fn` once (timed alone as `first_call_s`), `warmup` more times untimed, then `runs` timed times.

    Returns a Measurement; its `output` is what the last call of `fn` returned.
    """
    _check_arguments(fn, warmup, runs)
    reset_peak_memory()
    bar = tqdm(total=1 + warmup + runs, desc=description, disable=not progress, leave=False)

    synchronize()
    start = time.perf_counter()
    output = fn()
    synchronize()
    first_call_s = time.perf_counter() - start
    first_call_peak = peak_memory_gb()
    bar.update()

    for _ in range(warmup):
        output = None  # free the last output first, so the call can reuse its memory as an untimed loop would
        output = fn()
        bar.update()

    reset_peak_memory()
    samples_s = []
    for _ in range(runs):
        output = None
        synchronize()
        start = time.perf_counter()
        output = fn()
        synchronize()
        samples_s.append(time.perf_counter() - start)
        bar.update()
    bar.close()

    return Measurement(
        samples_s=samples_s, first_call_s=first_call_s, warmup=warmup, peak_memory_gb=peak_memory_gb(),
        first_call_peak_memory_gb=first_call_peak, output=output,
    )
