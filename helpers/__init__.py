"""Helpers for the SDXL speed course: models, the ladder of steps, timing, results, images and the chart.

Importing this package changes no global torch setting. It silences the few library warnings that a user can do
nothing about, each by its text (`helpers/quiet.py` lists them).
"""

from . import quiet  # first: its filters must be in place before diffusers is imported
from .chart import chart_from_dir, draw_chart
from .coldstart import CompileCacheMismatch, first_call_state, time_start, use_compile_cache
from .errors import GpuMemoryBusy, ModelUnavailable
from .flops import image_flops, repeated_block_share
from .images import generate, grid, image_size, quality, side_by_side
from .ladder import (
    build,
    compile_pipeline,
    compile_regions,
    drop_unfused_projections,
    fuse_qkv,
    int8_filter,
    is_compiled,
    is_fused,
    matmul_autotuning,
    pipeline_state,
    quantize_int8,
    quantized_layers,
    require_torchao,
    set_inductor_flags,
    unfused_leftovers,
    use_plain_attention,
    use_sdpa,
    weights_gb,
)
from .memory import free_memory, gpu_memory_held_by_others, live_pipelines, release
from .models import (
    check_model,
    download,
    load_pipeline,
    low_precision_dtype,
    native_size,
    resolve_model,
)
from .params import Params
from .probe import attention_kernels
from .recording import baseline_image, comparable_record, record_step
from .results import append_record, latest_records, load_records, make_record
from .steps import STEPS, StepUnavailable, get_step
from .timing import Measurement, benchmark
from .widgets import flags_panel, playground
