"""The whole series, executed headless on the tiny model, loaded from a folder, by the README's main command (see
conftest.series)."""

import re

import nbformat
import numpy as np
import pytest
from conftest import FAKE_HF_TOKEN, NOTEBOOKS
from PIL import Image

from helpers import STEPS, get_step, low_precision_dtype
from helpers.machine import device_name

pytestmark = pytest.mark.notebooks


def test_every_step_has_a_measured_record(series, tiny_folder):
    out, records, _ = series
    assert [r["step"] for r in records] == [s.id for s in STEPS]
    for record in records:
        assert record["status"] == "ok", record
        assert record["median_s"] > 0 and len(record["samples_s"]) == 3 and record["first_call_s"] > 0
        assert record["device"] == device_name() and record["versions"]["torch"]
        size = (record["height"], record["width"], record["params"]["steps"])
        assert record["model"] == str(tiny_folder) and size == (96, 96, 2)
        assert (out / record["image"]).exists()
        assert record["tflops_per_s"] > 0
        compiled = get_step(record["step"]).settings.compile != "off"
        assert ("autotunes_matmuls" in record.get("matmul_autotuning", {})) is compiled
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
    # 04 compiles 03's pipeline and 07 compiles 06's: bf16 compiled against bf16 eager. Measured on the tiny model at
    # 96 px: mean difference 0.005, 99% of pixel values within 0.024 (a single value differed by 0.063).
    for compiled, eager in (("04", "03"), ("07", "06")):
        difference = np.abs(pixels[compiled] - pixels[eager])
        assert difference.mean() < 0.02 and np.quantile(difference, 0.99) < 0.06, (compiled, eager)


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


def printed(nb):
    """What the notebook's code cells printed (stream and plain-text outputs), cell by cell."""
    cells = []
    for cell in nb.cells:
        texts = [o.get("text") or o.get("data", {}).get("text/plain", "") for o in cell.get("outputs", [])]
        cells.append((cell.source, "".join(texts)))
    return cells


def expect_printed(nb, pattern, name):
    """Assert that a cell of `nb` printed a line matching `pattern`; a failure shows each cell's code and output."""
    cells = printed(nb)
    if any(re.search(pattern, text) for _, text in cells):
        return
    shown = "\n".join(f"--- cell\n{source}\n--- printed\n{text}" for source, text in cells if source.strip())
    pytest.fail(f"{name} printed no line matching {pattern!r}; what its cells printed:\n{shown[-4000:]}")


EXPECTED_LINES = {
    "01": [r"fp32 matmuls: (none|ieee|tf32) \| fp32 convolutions \(cuDNN\): (none|ieee|tf32)", r"with synchronize",
           r"Released: no pipeline left alive"],
    "02": [r"low precision: torch\.(bfloat16|float16)", r"Released: no pipeline left alive"],
    "03": [r"calls in a one-step image", r"Released: no pipeline left alive"],
    "04": [r"compile \(first call\)", r"max-autotune autotunes matmuls here: (True|False)",
           r"graphs: 2, graph breaks: 1", r"break: \S", r"fullgraph=True raises Unsupported: ",
           r"fixed: graphs: 1, graph breaks: 0", r"3 calls, 2 shapes: 2 graphs compiled",
           r"(the pipeline: \d+ synchronizing calls|On a CPU: each operation runs to completion)",
           r"No compile cache \(COMPILE_CACHE = None\)", r"first call: cold \(0 compiled graphs from a cache",
           r"Released: no pipeline left alive"],
    "05": [r"attention layers of the UNet now have fused projections", r"M parameters of unused unfused projections",
           r"Released: no pipeline left alive"],
    "06": [r"\d+ of \d+ linear layers quantized to int8", r"shortcut convolutions: 0\.\d+% of the UNet's FLOPs",
           r"Released: no pipeline left alive"],
    "07": [r"regional compile \(07\)", r"full compile \(06\)", r"7\d% of the UNet's FLOPs run inside the compiled",
           r"static shapes, \d+x\d+: [1-9]\d* graph",
           r"dynamic shapes, 64x64: \d+ graph\(s\) recompiled", r"Released: no pipeline left alive"],
}


def test_executed_notebooks_have_no_errors_and_no_library_warnings(series):
    out, _, _ = series
    for step_id, nb in executed(out).items():
        errors = [o for c in nb.cells for o in c.get("outputs", []) if o.output_type == "error"]
        assert not errors, f"{step_id}: {errors[0]['ename']}: {errors[0]['evalue']}" if errors else ""
        warned = [o.text for c in nb.cells for o in c.get("outputs", [])
                  if o.get("name") == "stderr" and "Warning: " in o.text]
        assert not warned, f"{step_id}: {warned[0][:500]}"


@pytest.mark.parametrize("step", STEPS, ids=lambda s: s.notebook)
def test_each_executed_notebook_shows_what_it_promises(series, step):
    out, _, _ = series
    nb = executed(out)[step.id]
    for pattern in EXPECTED_LINES[step.id]:
        expect_printed(nb, pattern, step.notebook)


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
        assert not [c for c in code if c.outputs or c.execution_count], f"{path.name}: python -m helpers clean"
        assert "parameters" in code[0].metadata.get("tags", []), path.name
    assert sorted(p.name for p in NOTEBOOKS.glob("0[1-7]_*.ipynb")) == [s.notebook for s in STEPS]


def test_clean_strips_what_a_run_leaves_and_nothing_else(tmp_path, capsys):
    import helpers.__main__ as cli

    stored = NOTEBOOKS / "01_baseline.ipynb"
    run = nbformat.read(stored, as_version=4)
    for number, cell in enumerate(c for c in run.cells if c.cell_type == "code"):
        cell.execution_count = number + 1
        cell.outputs = [nbformat.v4.new_output("stream", text="printed\n")]
        cell.metadata["execution"] = {"iopub.status.idle": "2026-12-06T10:00:00Z"}
    run.metadata["papermill"] = {"parameters": {"STEPS": 2}}
    path = tmp_path / stored.name
    nbformat.write(run, path)
    assert cli.main(["clean", str(path)]) == 0 and "Cleaned 01_baseline.ipynb." in capsys.readouterr().out
    assert path.read_text() == stored.read_text()  # byte for byte what git holds
    assert cli.main(["clean", str(path)]) == 0 and "already clean" in capsys.readouterr().out
    assert cli.main(["clean", str(tmp_path / "missing.ipynb")]) == 2


def test_console_shows_each_notebook_its_result_and_no_library_noise(series):
    from helpers.quiet import silenced_texts

    _, _, log = series
    for step in STEPS:
        assert f"== {step.id} {step.title} ({step.notebook})" in log
    assert len(re.findall(r"^   \d+\.\d+ s median \(IQR \d+\.\d+ s\) on .+; first call", log, re.MULTILINE)) == 7
    for text in silenced_texts() + ["without encryption"]:
        assert text not in log, text
