"""Helpers for the SDXL speed course: models, the ladder of steps, timing, results, images and the chart.

Importing this package changes no global torch setting. It silences the few library warnings that a user can do
nothing about, each by its text (`helpers/quiet.py` lists them). The names below are imported from their modules
when first used, so a command that needs no pipeline (`python -m helpers run`'s own process, say) never imports
diffusers.
"""

import importlib

from . import quiet  # noqa: F401  (first, and at once: its filters must be in place before diffusers is imported)

_EXPORTS = {
    # regions
    'REGIONS': 'regions',
    'DEFAULT_REGIONS': 'regions',
    # chart
    'chart_from_dir': 'chart',
    'draw_chart': 'chart',
    # coldstart, compile_cache
    'CompileCacheMismatch': 'compile_cache',
    'first_call_state': 'compile_cache',
    'time_start': 'coldstart',
    'use_compile_cache': 'compile_cache',
    # errors
    'GpuMemoryBusy': 'errors',
    'ModelUnavailable': 'errors',
    # flops
    'image_flops': 'flops',
    'repeated_block_share': 'flops',
    # images
    'generate': 'images',
    'grid': 'images',
    'image_size': 'images',
    'quality': 'images',
    'side_by_side': 'images',
    # ladder
    'build': 'ladder',
    'compile_pipeline': 'ladder',
    'compile_regions': 'ladder',
    'drop_unfused_projections': 'ladder',
    'fuse_qkv': 'ladder',
    'int8_filter': 'ladder',
    'is_compiled': 'ladder',
    'is_fused': 'ladder',
    'matmul_autotuning': 'machine',
    'pipeline_state': 'ladder',
    'quantize_int8': 'ladder',
    'quantized_layers': 'ladder',
    'require_torchao': 'ladder',
    'set_inductor_flags': 'ladder',
    'unfused_leftovers': 'ladder',
    'use_plain_attention': 'ladder',
    'use_sdpa': 'ladder',
    'weights_gb': 'ladder',
    # memory
    'free_memory': 'memory',
    'gpu_memory_held_by_others': 'memory',
    'live_pipelines': 'memory',
    'release': 'memory',
    # models
    'load_pipeline': 'models',
    'low_precision_dtype': 'models',
    # sources
    'check_model': 'sources',
    'download': 'sources',
    'native_size': 'sources',
    'resolve_model': 'sources',
    # params
    'Params': 'params',
    # probe
    'attention_kernels': 'probe',
    # recording
    'baseline_image': 'recording',
    'comparable_record': 'recording',
    'record_step': 'recording',
    # results
    'append_record': 'results',
    'latest_records': 'results',
    'load_records': 'results',
    'make_record': 'results',
    # steps
    'STEPS': 'steps',
    'StepUnavailable': 'steps',
    'get_step': 'steps',
    # timing
    'Measurement': 'timing',
    'benchmark': 'timing',
    # widgets
    'flags_panel': 'widgets',
    'playground': 'widgets',
}


def __getattr__(name):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    else:
        try:
            value = importlib.import_module(f".{name}", __name__)  # a module of the package: helpers.ladder
        except ModuleNotFoundError:
            raise AttributeError(f"module 'helpers' has no attribute {name!r}") from None
    globals()[name] = value
    return value


def __dir__():
    return sorted([*globals(), *_EXPORTS])


__all__ = list(_EXPORTS)
