"""Appendix 09 (throughput per batch size), on a CPU; scripts/generate_many.py is tested in test_generate_many.py."""

import json

import nbformat
import numpy as np
import pytest
import torch
from conftest import NOTEBOOKS, notebook_cells
from matplotlib.figure import Figure
from PIL import Image

import helpers
from helpers import throughput
from helpers.params import cell_names

NOTEBOOK = "09_throughput.ipynb"
SMALL = {"MODEL": "tiny", "STEPS": 2, "HEIGHT": 64, "WIDTH": 64, "WARMUP": 1, "RUNS": 2, "OUT_DIR": ".",
         "COMPILE_MODE": "default", "BATCH_SIZES": [1, 2, 4], "COMPILE": False}


@pytest.fixture(scope="module")
def executed(tmp_path_factory):
    """Notebook 09 executed headless on the tiny model, uncompiled (a regional compile takes minutes on 2 cores)."""
    import papermill

    out = tmp_path_factory.mktemp("throughput")
    papermill.execute_notebook(NOTEBOOKS / NOTEBOOK, out / NOTEBOOK, parameters=SMALL, cwd=out, progress_bar=False,
                               kernel_name="python3")
    return out, nbformat.read(out / NOTEBOOK, as_version=4)


def printed(nb):
    outputs = [o for cell in nb.cells for o in cell.get("outputs", [])]
    return "".join(o.get("text") or o.get("data", {}).get("text/plain", "") for o in outputs)


@pytest.mark.notebooks
def test_notebook_records_every_batch_size_and_draws_the_chart(executed):
    out, nb = executed
    records = json.loads((out / throughput.THROUGHPUT_DIR / "results.json").read_text())
    assert [r["batch_size"] for r in records] == [1, 2, 4]
    for record in records:
        assert record["images_per_s"] > 0 and record["s_per_image"] * record["images_per_s"] == pytest.approx(1)
        assert record["median_s"] > 0 and len(record["samples_s"]) == 2 and record["first_call_s"] > 0
        assert (record["model"], record["height"], record["width"]) == ("tiny", 64, 64)
        assert record["device"] and record["versions"]["torch"] and record["graphs_compiled"] == 0
    chart = out / throughput.THROUGHPUT_DIR / throughput.THROUGHPUT_CHART_FILE
    assert chart.stat().st_size > 10_000 and Image.open(chart).size[0] > 600
    text = printed(nb)
    assert not [o for c in nb.cells for o in c.get("outputs", []) if o.output_type == "error"]
    assert "batch 4: " in text and "largest pixel difference" in text and "COMPILE = False" in text


def test_notebook_parameters_cell_is_the_courses_plus_batch_sizes():
    (cell,) = notebook_cells(NOTEBOOK, "parameters")
    written = {}
    exec(cell, {}, written)
    assert written == {**cell_names(), "BATCH_SIZES": [1, 2, 4], "COMPILE": True}
    nb = nbformat.read(NOTEBOOKS / NOTEBOOK, as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert "parameters" in code[0].metadata.get("tags", []) and not any(c.outputs or c.execution_count for c in code)


@pytest.fixture(scope="module")
def tiny():
    params = helpers.Params(model="tiny", steps=2, height=64, width=64, warmup=0, runs=2)
    return helpers.build("tiny", through="07", compile=False, verbose=False), params


def test_notebooks_batch_call_is_generate_batch(tiny):
    pipe, params = tiny
    (cell,) = notebook_cells(NOTEBOOK, "batch-call")
    namespace = {"pipe": pipe, "params": params, "helpers": helpers, "torch": torch}
    exec(cell, namespace)
    inline = namespace["make_batch"](2)
    helper = throughput.generate_batch(pipe, params, [params.prompt] * 2)
    assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(inline, helper))
    assert not np.array_equal(np.asarray(inline[0]), np.asarray(inline[1]))  # a seed per image


@pytest.mark.slow
def test_measure_batch_counts_the_graphs_each_batch_size_compiles(tiny):
    pipe, params = tiny
    original = pipe.vae.decode
    # Dynamo alone (no Inductor) counts graphs as a compile does, in a second instead of minutes.
    pipe.vae.decode = torch.compile(original, backend="eager", dynamic=False)
    try:
        first, second, again = (throughput.measure_batch(pipe, params, size, progress=False) for size in (1, 2, 1))
    finally:
        pipe.vae.decode = original
    assert first["graphs_compiled"] >= 1 and second["graphs_compiled"] >= 1 and again["graphs_compiled"] == 0
    assert all(r["graphs_compiled_later"] == 0 for r in (first, second, again))
    assert first["compiled"]["vae.decode"]["dynamic"] is False
    assert second["images_per_s"] == pytest.approx(2 / second["median_s"])


@pytest.mark.parametrize("sizes", [[], [0], [2.0], ["4"], [True], [1000], 4, None])
def test_batch_sizes_that_cannot_work_are_one_sentence(tiny, sizes):
    with pytest.raises(ValueError, match=r"^BATCH_SIZES must be a list of whole numbers from 1 to 256, .*\.$"):
        throughput.check_batch_sizes(sizes)
    if isinstance(sizes, list) and len(sizes) == 1:
        pipe, params = tiny
        with pytest.raises(ValueError, match="^BATCH_SIZES must be"):
            throughput.measure_batch(pipe, params, sizes[0])
    assert throughput.check_batch_sizes((4, 1, 2, 1)) == [1, 2, 4]


def test_batch_sizes_are_checked_before_the_pipeline_loads():
    nb = nbformat.read(NOTEBOOKS / NOTEBOOK, as_version=4)
    code = [c.source for c in nb.cells if c.cell_type == "code"]
    checked = next(i for i, c in enumerate(code) if "throughput.check_batch_sizes(BATCH_SIZES)" in c)
    built = next(i for i, c in enumerate(code) if "helpers.build(" in c)
    assert checked < built and "Params.from_cell" in code[checked]


def test_a_batch_that_runs_out_of_memory_is_recorded_and_the_next_one_runs(tiny, monkeypatch, capsys, tmp_path):
    # A stand-in for a GPU's limit: batch 4 raises what torch raises when an allocation fails.
    pipe, params = tiny
    make = throughput.generate_batch

    def generate(pipe, params, prompts, seeds=None):
        if len(prompts) == 4:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
        return make(pipe, params, prompts, seeds)

    monkeypatch.setattr(throughput, "generate_batch", generate)
    records = [throughput.measure_batch(pipe, params, size, progress=False) for size in (2, 4, 1)]
    assert [r["status"] for r in records] == ["ok", "out_of_memory", "ok"]  # the records' schema (STATUSES)
    assert records[1]["median_s"] is None and records[1]["batch_size"] == 4
    assert "batch 4: out of memory; the next batch size still runs" in capsys.readouterr().out
    assert "4 out of memory" in throughput.table(records)
    assert [r["batch_size"] for r in throughput.measured(records)] == [2, 1]
    out = throughput.save_records(tmp_path, records).parent  # read back as the runner reads them: all three sizes
    assert throughput.summary_of(out, records[0]["notebook"]).startswith("batch sizes 1, 2, 4: at most")
    throughput.draw_latency_throughput(records)  # draws the two that ran


def test_a_batch_whose_decode_would_not_fit_is_decoded_in_slices(tiny, monkeypatch, capsys):
    # A stand-in for a 24 GB card with 3 GB free: SDXL's decode of 4 images at 1024x1024 needs about 10 GB.
    pipe, _ = tiny
    params = helpers.Params(model="sdxl-random", height=1024, width=1024)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda: (3 * 10**9, 24 * 10**9))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda: 0)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda: 0)
    monkeypatch.setattr(pipe.vae, "use_slicing", False)
    assert not throughput.decode_in_slices_if_needed(pipe, params, 1)
    assert throughput.decode_in_slices_if_needed(pipe, params, 4) and pipe.vae.use_slicing
    assert "batch 4: the VAE decodes one image at a time" in capsys.readouterr().out


def test_the_recompile_limit_is_raised_to_what_the_batch_sizes_need(tiny, capsys):
    pipe, _ = tiny
    # torch's own patch, which puts the limit back: monkeypatch would delete the config entry on undo
    with torch._dynamo.config.patch(recompile_limit=8):
        assert throughput.block_widths(pipe) == [32, 64]
        assert throughput.allow_recompiles(pipe, [1, 2, 4]) == 8 and not capsys.readouterr().out  # 2 widths x 3
        assert throughput.allow_recompiles(pipe, [2, 4, 8, 16]) == 10  # and the batch of 1 of the comparison
        assert "raised from 8 to 10" in capsys.readouterr().out
    assert torch._dynamo.config.recompile_limit == 8


def test_chart_is_a_plain_figure_saved_atomically(tmp_path):
    records = [{"batch_size": b, "median_s": 0.1 * b ** 0.5, "iqr_s": 0.01, "images_per_s": b / (0.1 * b ** 0.5),
                "peak_memory_gb": None, "device": "CPU", "model": "tiny", "width": 64, "height": 64,
                "params": {"steps": 2}, "status": "ok"} for b in (4, 1, 2)]
    path = tmp_path / throughput.THROUGHPUT_CHART_FILE
    fig = throughput.draw_latency_throughput(records, path)
    assert isinstance(fig, Figure) and fig.canvas.manager is None  # not registered with pyplot
    labels = [t.get_text() for t in fig.axes[0].texts]
    assert labels == ["batch 1", "batch 2", "batch 4"]
    assert Image.open(path).size[0] > 600 and not list(tmp_path.glob("*.tmp"))
    with pytest.raises(ValueError, match="measure at least one batch size"):
        throughput.draw_latency_throughput([])
