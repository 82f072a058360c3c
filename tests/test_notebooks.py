"""The whole series, executed headless on the tiny model by the README's main command (see conftest.series)."""

import json
import re

import nbformat
import numpy as np
import pytest
from conftest import FAKE_HF_TOKEN, NOTEBOOKS
from PIL import Image

from helpers import STEPS, low_precision_dtype
from helpers.results import device_name

pytestmark = pytest.mark.notebooks


def test_every_step_has_a_measured_record(series):
    out, records, _ = series
    assert [r["step"] for r in records] == [s.id for s in STEPS]
    for record in records:
        assert record["status"] == "ok", record
        assert record["median_s"] > 0 and len(record["samples_s"]) == 3 and record["first_call_s"] > 0
        assert record["device"] == device_name() and record["versions"]["torch"]
        assert (record["model"], record["height"], record["width"], record["params"]["steps"]) == ("tiny", 96, 96, 2)
        assert (out / record["image"]).exists()
        assert record["tflops_per_s"] > 0
    low = str(low_precision_dtype(verbose=False)).removeprefix("torch.")
    assert [r["dtype"] for r in records] == ["float32"] + [low] * 6


def test_quality_is_scored_against_the_baseline(series):
    _, records, _ = series
    assert records[0]["quality"] is None
    for record in records[1:]:
        assert 0.5 < record["quality"]["ssim"] <= 1 and record["quality"]["max_abs_diff"] < 0.1


def test_compiled_images_stay_close_to_eager(series):
    out, _, _ = series
    pixels = {s.id: np.asarray(Image.open(out / "images" / f"{s.id}.png"), dtype=float) / 255 for s in STEPS}
    # 04 compiles 03's pipeline: bf16 compiled vs bf16 eager, measured 0.02 on the tiny model.
    assert np.abs(pixels["04"] - pixels["03"]).max() < 0.06
    assert np.abs(pixels["07"] - pixels["06"]).max() < 0.06


def test_int8_step_reports_its_layers_and_memory(series):
    _, records, _ = series
    int8 = records[5]
    assert int8["quantized_layers"] > 0
    assert int8["unet_weights_gb"]["after"] < int8["unet_weights_gb"]["before"]
    assert int8["eager_short_s"]["int8"] > 0


def test_chart_is_drawn(series):
    out, _, log = series
    chart = out / "latency_per_step.png"
    assert chart.stat().st_size > 20_000 and Image.open(chart).size[0] > 800
    assert "Chart:" in log


def executed(out):
    return {s.id: nbformat.read(out / "notebooks" / s.notebook, as_version=4) for s in STEPS}


def outputs_text(nb):
    return json.dumps([cell.get("outputs", []) for cell in nb.cells])


def test_executed_notebooks_have_no_errors_and_show_what_they_promise(series):
    out, _, _ = series
    notebooks = executed(out)
    for nb in notebooks.values():
        assert not [o for c in nb.cells for o in c.get("outputs", []) if o.output_type == "error"]
    assert "with synchronize" in outputs_text(notebooks["01"])
    assert "calls in a one-step image" in outputs_text(notebooks["03"])
    assert "compile (first call)" in outputs_text(notebooks["04"])
    assert "attention layers of the UNet now have fused projections" in outputs_text(notebooks["05"])
    assert re.search(r"\d+ of \d+ linear layers quantized to int8", outputs_text(notebooks["06"]))
    seven = outputs_text(notebooks["07"])
    assert "regional compile (07)" in seven and "full compile (06)" in seven
    assert re.search(r"dynamic shapes, 64x64: \d+ graph\(s\) recompiled", seven)


def test_every_notebook_gives_its_pipelines_back(series):
    out, _, _ = series
    for step_id, nb in executed(out).items():
        text = outputs_text(nb)
        assert "Released: no pipeline left alive" in text, f"{step_id}: {text[-600:]}"


def test_nothing_secret_or_absolute_is_written(series):
    out, _, log = series
    texts = [p.read_text(errors="ignore") for p in out.rglob("*") if p.suffix in (".ipynb", ".json")]
    assert texts
    for text in texts + [log]:
        assert FAKE_HF_TOKEN not in text
    for text in texts:
        assert "/root/" not in text and "/home/" not in text and str(out) not in text


def test_notebooks_in_git_have_no_outputs_and_a_parameters_cell():
    for path in sorted(NOTEBOOKS.glob("*.ipynb")):
        nb = nbformat.read(path, as_version=4)
        code = [c for c in nb.cells if c.cell_type == "code"]
        assert not [c for c in code if c.outputs or c.execution_count], f"{path.name} has outputs: clear them"
        assert "parameters" in code[0].metadata.get("tags", []), path.name
    assert sorted(p.name for p in NOTEBOOKS.glob("*.ipynb")) == [s.notebook for s in STEPS]
