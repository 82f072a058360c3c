"""The playground and the flags panel, driven through their widgets on the tiny model (never compiled: slow on CPU)."""

import dataclasses
import html
import io
import re
import sys
import weakref

import pytest
import torch
from conftest import SERIES_SIZE
from PIL import Image

import helpers
from helpers.images import side_by_side
from helpers.params import Params
from helpers.recording import record_step
from helpers.widgets import OUT_OF_MEMORY_MESSAGE, flags_panel, playground

LATENCY = re.compile(r"\d+\.\d+ s median \(IQR \d+\.\d+ s, 1 runs\) on .+; first call \d+\.\d+ s")


@pytest.fixture(scope="module")
def pipe():
    return helpers.load_pipeline("tiny")


@pytest.fixture
def params(tmp_path):
    return Params(model="tiny", steps=2, height=64, width=64, runs=1, warmup=0, out_dir=str(tmp_path))


def shown_image(panel):
    data = bytes(panel.image.value)
    assert data.startswith(b"\x89PNG\r\n\x1a\n")
    return Image.open(io.BytesIO(data))


def test_generate_shows_the_image_and_its_latency(pipe, params):
    panel = playground(pipe, params, label="tiny", runs=1)
    panel.prompt.value = "a red fox in the snow"
    panel.width.value = 96
    panel.button.click()

    assert panel.message.value == ""
    assert LATENCY.search(panel.latency.value), panel.latency.value
    assert panel.last_image.size == (96, 64)
    assert shown_image(panel).size == side_by_side(panel.last_image, None, "tiny").size
    assert panel.baseline_note.value.startswith("No fp32 baseline")
    assert not panel.button.disabled


def test_the_baseline_shows_beside_the_image_when_the_parameters_match(pipe, params):
    image = helpers.widgets.generate(pipe, params)
    record_step("01", helpers.benchmark(lambda: image, warmup=0, runs=1, progress=False), params, torch.float32, image)
    panel = playground(pipe, params, label="tiny", runs=1)
    panel.button.click()

    assert panel.baseline_note.value.startswith("Left: notebook 01's fp32 image")
    assert "identical" in panel.baseline_note.value  # same pipeline, same seed
    assert shown_image(panel).size == side_by_side(panel.last_image, image, "tiny").size


def test_the_native_size_keeps_matching_a_baseline_recorded_without_a_size(pipe, params):
    native = Params(model="tiny", out_dir=params.out_dir)
    panel = playground(pipe, native)
    assert (panel.height.value, panel.width.value) == (128, 128)
    assert panel.requested_params().height is None
    panel.height.value = 64
    assert panel.requested_params().height == 64


@pytest.mark.parametrize("field, value", [("height", 100), ("prompt", "  "), ("steps", 0)])
def test_a_bad_input_shows_one_sentence_and_makes_no_image(pipe, params, field, value):
    panel = playground(pipe, params)
    panel.image.value = b"before"
    getattr(panel, field).value = value
    panel.button.click()

    with pytest.raises(ValueError) as error:
        dataclasses.replace(params, **{field: value})
    assert html.escape(str(error.value)) in panel.message.value
    assert "color:#b00020" in panel.message.value
    assert bytes(panel.image.value) == b"before"
    assert panel.last_image is None and panel.last_measurement is None


def test_out_of_memory_says_what_to_do(pipe, params, monkeypatch):
    def out_of_memory(*args, **kwargs):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory.")

    monkeypatch.setattr(helpers.widgets, "generate", out_of_memory)
    panel = playground(pipe, params)
    panel.button.click()

    assert OUT_OF_MEMORY_MESSAGE in panel.message.value
    assert panel.last_image is None
    assert not panel.button.disabled


def test_rebuild_adds_a_row_and_releases_the_previous_pipeline(params):
    panel = flags_panel(params)
    panel.dtype.value = False  # float32
    panel.sdpa.value = False
    assert panel.fused_qkv.disabled  # fused QKV runs through SDPA
    panel.button.click()

    assert panel.message.value == ""
    assert helpers.pipeline_state(panel.pipe)["attention"]["unet"] == ["AttnProcessor"]
    assert LATENCY.search(panel.latency.value), panel.latency.value
    assert shown_image(panel).size == side_by_side(panel.last_image, None, "#1").size
    previous = weakref.ref(panel.pipe)

    panel.dtype.value = True  # low precision
    panel.sdpa.value = True
    panel.fused_qkv.value = True
    panel.button.click()

    assert previous() is None
    state = helpers.pipeline_state(panel.pipe)
    assert state["dtypes"]["unet"] == str(helpers.low_precision_dtype(verbose=False))
    assert state["fused_qkv"] and not state["compiled"]
    low = str(helpers.low_precision_dtype(verbose=False)).removeprefix("torch.")
    assert [row["configuration"] for row in panel.rows] == ["float32, plain attention", f"{low}, SDPA, fused QKV"]
    assert panel.table.value.count("<tr>") == 3  # the header and one row per rebuild
    assert "float32, plain attention" in panel.table.value and "1.00x" in panel.table.value


@pytest.mark.parametrize("step", helpers.STEPS, ids=lambda s: s.id)
def test_the_panel_ticked_like_a_step_asks_for_that_steps_row(params, step):
    panel = flags_panel(params)
    row = step.settings
    panel.dtype.value, panel.sdpa.value, panel.fused_qkv.value = row.low_precision, row.sdpa, row.fused_qkv
    panel.int8.value, panel.compile.value = row.int8, row.compile
    assert panel.settings() == row


def test_fused_qkv_without_sdpa_is_one_sentence(params):
    with pytest.raises(ValueError, match="fused QKV runs through SDPA"):
        helpers.steps.Settings(low_precision=True, sdpa=False, fused_qkv=True, int8=False, compile="off")


def test_int8_is_disabled_with_a_reason_without_torchao(params, monkeypatch):
    monkeypatch.setitem(sys.modules, "torchao.quantization", None)  # makes the import fail
    panel = flags_panel(params)
    assert panel.int8.disabled
    assert panel.int8_note.value.startswith("torchao is missing") and "pip install torchao" in panel.int8_note.value


def test_compile_mode_is_offered_only_when_compiling_and_regions_only_when_regional(params):
    panel = flags_panel(params)
    assert panel.compile_mode.disabled and panel.regions.disabled
    assert list(panel.regions.options) == list(helpers.REGIONS) and panel.regions.value == helpers.DEFAULT_REGIONS
    panel.compile.value = "regional"
    assert not panel.compile_mode.disabled and not panel.regions.disabled
    panel.compile.value = "full"
    assert not panel.compile_mode.disabled and panel.regions.disabled


def test_the_panels_choice_of_regions_is_what_it_builds_and_names(params, monkeypatch):
    asked = {}

    def build_pipeline(model, settings, **options):
        asked.update(options, settings=settings)
        raise ValueError("not built here")  # the panel shows the sentence; what compile_regions builds is tested apart

    monkeypatch.setattr(helpers.widgets, "build_pipeline", build_pipeline)
    panel = flags_panel(params)
    panel.compile.value, panel.compile_mode.value = "regional", "default"
    panel.regions.value = "attention+resnets"
    panel.button.click()
    assert asked["regions"] == "attention+resnets" and asked["settings"].compile == "regional"
    assert "not built here" in panel.message.value
    assert panel.configuration(panel.settings()).endswith("(default, regions attention+resnets)")


def test_release_frees_the_pipeline_and_the_next_click_builds_the_step_again(params, capsys):
    pipe = helpers.build("tiny", through="03", verbose=False)
    panel = playground(pipe, params, step="03", runs=1)
    assert panel.label == "03 SDPA"
    released = weakref.ref(pipe)
    del pipe
    helpers.release(panel)
    assert released() is None
    assert capsys.readouterr().out.startswith("Released: ")

    panel.button.click()
    assert panel.message.value == "" and LATENCY.search(panel.latency.value)
    rebuilt = helpers.build("tiny", through="03", verbose=False)
    assert helpers.pipeline_state(panel.pipe) == helpers.pipeline_state(rebuilt)


def test_release_looks_past_dead_weak_proxies(capsys):
    # The collector lists objects of every kind; a dead weakref.proxy raises on `isinstance` (one is alive after
    # notebook 01 loads a model from a folder, where `release` used to stop with a ReferenceError).
    class Target:
        pass

    target = Target()
    dead = [weakref.proxy(target)]
    del target
    before = len(helpers.live_pipelines())
    assert helpers.release() == before and len(dead) == 1
    assert capsys.readouterr().out.startswith("Released: ")


def test_a_released_panel_without_a_step_says_what_to_do(pipe, params):
    panel = playground(pipe, params)
    panel.release_pipeline()
    panel.button.click()
    assert "run the notebook&#x27;s cells again" in panel.message.value and panel.last_image is None


# Regional only: a whole-UNet compile takes minutes on a CPU. The notebook series frees whole-compiled pipelines
# (notebooks 04 to 06) and checks their release lines (tests/test_notebooks.py). At the series' size in the course's
# compile mode: its C++ kernels are those that the series' notebook 04 compiles.
@pytest.mark.slow
@pytest.mark.parametrize("compile_kind", ["regional"])
def test_a_compiled_pipeline_is_gone_once_the_next_one_is_built(params, compile_kind):
    from diffusers.models.attention import BasicTransformerBlock
    from torch._dynamo.eval_frame import _debug_get_cache_entry_list

    panel = flags_panel(dataclasses.replace(params, height=SERIES_SIZE, width=SERIES_SIZE))
    panel.compile.value = compile_kind
    panel.button.click()
    assert panel.message.value == "" and helpers.pipeline_state(panel.pipe)["compiled"]
    previous = weakref.ref(panel.pipe)

    panel.compile.value = "off"
    panel.button.click()
    assert panel.message.value == ""
    assert previous() is None  # compiled code and its reference cycles went with it
    # and so did the graphs compiled for its blocks, which Dynamo keeps on the code that every block shares
    assert _debug_get_cache_entry_list(BasicTransformerBlock.forward.__code__) == []
