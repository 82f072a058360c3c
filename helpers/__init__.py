"""Helpers for the SDXL speed course: models, timing, results, images and the chart.

Importing this package changes no global torch setting.
"""

from .ladder import (
    build,
    compile_pipeline,
    compile_regions,
    describe,
    fuse_qkv,
    int8_filter,
    is_pointwise_conv,
    quantize_int8,
    quantized_layers,
    set_inductor_flags,
    use_plain_attention,
    use_sdpa,
)
from .models import ModelUnavailable, check_model, load_pipeline, low_precision_dtype, native_size, resolve_model
from .params import Params
from .results import append_record, latest_records, load_records, make_record
from .steps import STEPS, get_step
from .timing import Measurement, benchmark
