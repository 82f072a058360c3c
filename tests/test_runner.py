"""The runner's behaviour when a notebook fails, runs out of memory or can't run, with stand-in notebooks."""

import json
import os
import subprocess
import sys
import time

import nbformat
import pytest
from conftest import ROOT
from nbformat.v4 import new_code_cell, new_notebook

import helpers.__main__ as cli
import helpers.kernels as kernels
import helpers.runner as runner
from helpers.params import Params, cell_names
from helpers.results import record_problem
from helpers.steps import select_steps

# Every parameter, as the course's notebooks have them: papermill warns about each one a notebook lacks.
PARAMETERS = new_code_cell(
    "\n".join(f"{name} = {value!r}" for name, value in cell_names(Params(model="tiny", out_dir=".")).items()),
    metadata={"tags": ["parameters"]},
)
OUT_OF_MEMORY = 'raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 9 GiB")'
# What torch raises on a CPU when an allocation does not fit in memory.
CPU_OUT_OF_MEMORY = (
    'raise RuntimeError("[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can\'t allocate memory: '
    'you tried to allocate 274877906944 bytes. Error code 12 (Cannot allocate memory)")'
)
# What torch.compile raises when the GPU runs out of memory while Inductor compiles or autotunes.
OUT_OF_MEMORY_IN_INDUCTOR = """
class InductorError(RuntimeError):
    pass
raise InductorError("OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB")
"""
RECORD_A_STEP = """
import helpers
from helpers.timing import Measurement
params = helpers.Params(model=MODEL, out_dir=OUT_DIR)
helpers.append_record(OUT_DIR, helpers.make_record("03", Measurement([0.5, 0.6], 1.0, 0), params, dtype="bfloat16"))
"""


def stand_in_notebooks(folder, cells_by_name):
    for name, cells in cells_by_name.items():
        nb = new_notebook(cells=[PARAMETERS, *[new_code_cell(source) for source in cells]])
        nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
        nbformat.write(nb, folder / name)


@pytest.mark.slow
def test_out_of_memory_and_unavailable_steps_are_recorded_and_the_run_goes_on(tmp_path, monkeypatch, capsys):
    notebooks = tmp_path / "notebooks"
    notebooks.mkdir()
    stand_in_notebooks(notebooks, {
        "01_baseline.ipynb": ["import torch", OUT_OF_MEMORY],
        "02_bfloat16.ipynb": ["import helpers", 'raise helpers.StepUnavailable("torchao is missing.")'],
        "03_sdpa.ipynb": [RECORD_A_STEP],
        "04_torch_compile.ipynb": [OUT_OF_MEMORY_IN_INDUCTOR],
        "05_fused_qkv.ipynb": [CPU_OUT_OF_MEMORY],
        "06_int8_dynamic.ipynb": ["raise MemoryError()"],
    })
    monkeypatch.setattr(runner, "NOTEBOOKS_DIR", notebooks)
    out = tmp_path / "out"
    assert cli.main(["run", "--model", "tiny", "--out", str(out), "--only", "01-06", "--no-progress"]) == 0
    records = json.loads((out / "results.json").read_text())
    statuses = [(r["step"], r["status"]) for r in records]
    assert statuses == [("01", "out_of_memory"), ("02", "skipped"), ("03", "ok"), ("04", "out_of_memory"),
                        ("05", "out_of_memory"), ("06", "out_of_memory")]
    assert "smaller --height/--width" in records[0]["note"] and records[0]["median_s"] is None
    assert "GPU" in records[0]["note"] and "GPU" in records[3]["note"]
    for cpu in records[4:]:  # out of CPU memory: the same record and advice, less the GPU
        assert "smaller --height/--width" in cpu["note"] and "close other programs" in cpu["note"]
    assert "torchao is missing" in records[1]["note"]
    assert [r["notebook"] for r in records] == [f"notebooks/{s.notebook}" for s in select_steps("01-06")]
    assert (out / "latency_per_step.png").stat().st_size > 10_000
    assert "going on with the next notebook" in capsys.readouterr().out


def test_a_failing_notebook_stops_the_run_naming_notebook_and_cell(tmp_path, monkeypatch, capsys):
    notebooks = tmp_path / "notebooks"
    notebooks.mkdir()
    stand_in_notebooks(notebooks, {
        "01_baseline.ipynb": ["x = 1", 'raise ValueError("the VAE exploded")'],
        "02_bfloat16.ipynb": [RECORD_A_STEP],
    })
    monkeypatch.setattr(runner, "NOTEBOOKS_DIR", notebooks)
    out = tmp_path / "out"
    assert cli.main(["run", "--model", "tiny", "--out", str(out), "--only", "01,02", "--no-progress"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: 01_baseline.ipynb failed in cell [4]: ValueError: the VAE exploded")
    assert "\n" not in err
    assert (out / "notebooks" / "01_baseline.ipynb").exists()  # kept, with the traceback inside, for reading
    assert not (out / "notebooks" / "02_bfloat16.ipynb").exists()


@pytest.mark.parametrize("only, expected", [("01,03", ["01", "03"]), ("4-7", ["04", "05", "06", "07"]),
                                            ("sdpa,baseline", ["01", "03"]), (None, [f"0{i}" for i in range(1, 8)]),
                                            ("09", ["09"]), ("01-09", [f"0{i}" for i in range(1, 10)])])
def test_step_selection_keeps_course_order(only, expected):
    assert [s.id for s in select_steps(only)] == expected


def test_a_kernel_that_dies_stops_the_run_in_one_sentence(tmp_path, monkeypatch, capsys):
    """As when the system ends the kernel for taking too much memory."""
    notebooks = tmp_path / "notebooks"
    notebooks.mkdir()
    stand_in_notebooks(notebooks, {"01_baseline.ipynb": ["import os, signal\nos.kill(os.getpid(), signal.SIGKILL)"]})
    monkeypatch.setattr(runner, "NOTEBOOKS_DIR", notebooks)
    assert cli.main(["run", "--model", "tiny", "--out", str(tmp_path / "out"), "--only", "01", "--no-progress"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: The kernel running 01_baseline.ipynb died; most often the machine ran out of memory")
    assert "\n" not in err


def test_once_stopped_the_dying_kernels_noise_is_dropped_and_nothing_else():
    """After Ctrl-C, papermill and asyncio may report the kernel the runner shut down under a waiting cell: that
    noise goes, before a stop and every other message always shows."""
    import logging

    seen = []

    class Keep(logging.Handler):
        def emit(self, record):
            seen.append(record.getMessage())

    handler = Keep()
    for name in ("papermill", "asyncio"):
        logging.getLogger(name).addHandler(handler)
    try:
        logging.getLogger("papermill").error("Kernel died while waiting for execute reply.")
        kernels.stopped_by_user.set()
        logging.getLogger("papermill").error("Kernel died while waiting for execute reply.")
        logging.getLogger("asyncio").error("Task exception was never retrieved")
        logging.getLogger("papermill").error("Executing cell 3")
    finally:
        kernels.stopped_by_user.clear()
        for name in ("papermill", "asyncio"):
            logging.getLogger(name).removeHandler(handler)
    assert seen == ["Kernel died while waiting for execute reply.", "Executing cell 3"]


@pytest.mark.slow
def test_a_notebook_cut_off_by_sigterm_leaves_a_record_that_says_where(tmp_path):
    """As when `timeout` ends a run that took too long: the step that was running is recorded as stopped, with the
    cell it was in and the seconds it ran, not left out."""
    notebooks = tmp_path / "notebooks"
    notebooks.mkdir()
    busy = "import pathlib, time\npathlib.Path('busy').touch()\ntime.sleep(300)"
    stand_in_notebooks(notebooks, {"01_baseline.ipynb": ["x = 1", busy]})
    out = tmp_path / "out"
    stand_in_runner = ("import sys; from pathlib import Path; import helpers.runner as runner; "
                       "import helpers.__main__ as cli; runner.NOTEBOOKS_DIR = Path(sys.argv[1]); "
                       "sys.exit(cli.main(sys.argv[2:]))")
    process = subprocess.Popen(
        [sys.executable, "-c", stand_in_runner, str(notebooks), "run", "--model", "tiny", "--out", str(out),
         "--only", "01", "--no-progress"],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        deadline = time.monotonic() + 180
        while not (out / "busy").exists():
            assert process.poll() is None and time.monotonic() < deadline, process.communicate()
            time.sleep(0.2)
        time.sleep(1)
        process.terminate()
        _, complaint = process.communicate(timeout=120)
    finally:
        process.kill()
    assert process.returncode == 143, complaint
    [record] = json.loads((out / "results.json").read_text())
    assert (record["step"], record["status"], record["median_s"]) == ("01", "stopped", None)
    assert record["notebook"] == "notebooks/01_baseline.ipynb"
    stopped = record["stopped"]
    assert stopped["by"] == "SIGTERM" and stopped["cell"] == 4 and 1 < stopped["seconds"] < 180
    assert stopped["cell_source"] == "import pathlib, time"
    assert record["note"].startswith("stopped by SIGTERM after ") and "in cell [4]" in record["note"]
    assert record_problem(record) is None  # a status the chart knows: it draws a "stopped" gap


def test_no_extras_leaves_out_07s_optional_sections_and_says_so():
    notebook = runner.without_extras(runner.NOTEBOOKS_DIR / "07_regional_compile.ipynb")
    sources = [cell.source for cell in notebook.cells]
    assert not any("extra" in cell.metadata.get("tags", []) for cell in notebook.cells)
    assert not any("dynamic=True" in source and "compile_regions" in source for source in sources)  # the dynamic arm
    assert not any("compile_count_and_time(pipe, smaller)" in source for source in sources)  # the second size
    assert any("compile_repeated_blocks" in source for source in sources)  # the step itself stays, and the end
    assert any("helpers.release(panel)" in source for source in sources)
    assert any("cells of optional sections were left out (`--no-extras`)" in source for source in sources)
    assert cli.parse_args(["run", "--out", "x", "--no-extras"]).no_extras is True
    assert cli.parse_args(["run", "--out", "x"]).no_extras is False


def test_set_gives_a_notebook_its_own_parameter_and_refuses_what_none_has(tmp_path, capsys):
    steps = select_steps("08-09")
    assert runner.check_settings({"BATCH_SIZES": [1, 8]}, steps) == {"BATCH_SIZES": [1, 8]}
    assert runner.notebook_parameters(steps[1])["BATCH_SIZES"] == [1, 2, 4]
    for settings, said in (({"BATCH_SIZES": [1]}, "none of the selected notebooks has a parameter BATCH_SIZES"),
                           ({"STEPS": 2}, "STEPS is a course parameter; use --steps"),
                           ({"COMPILE_MODES": "default"}, "give a list like")):
        out = tmp_path / "refused"
        only = "01" if "BATCH_SIZES" in settings else "08"
        argv = ["run", "--model", "tiny", "--out", str(out), "--only", only, "--no-progress"]
        argv += [f"--set={name}={value!r}" for name, value in settings.items()]
        assert cli.main(argv) != 0
        err = capsys.readouterr().err.strip()
        assert said in err and "\n" not in err, err
        assert not out.exists()  # refused before anything was made
    with pytest.raises(SystemExit):
        cli.parse_args(["run", "--out", "x", "--set", "BATCH_SIZES"])


@pytest.mark.slow
def test_a_refused_run_makes_no_output_folder_and_leaves_the_temporary_folder_as_it_was(tmp_path):
    temporary = tmp_path / "tmp"
    temporary.mkdir()
    out, missing = tmp_path / "out", tmp_path / "no-such-room.zip"
    done = subprocess.run(
        [sys.executable, "-m", "helpers", "run", "--model", "tiny", "--only", "04", "--compile-cache", str(missing),
         "--out", str(out), "--no-progress"],
        capture_output=True, text=True, cwd=ROOT, env={**os.environ, "TMPDIR": str(temporary)},
    )
    assert done.returncode != 0 and str(missing.name) in done.stderr and done.stderr.count("\n") == 1, done.stderr
    assert not out.exists()
    assert list(temporary.iterdir()) == []  # no empty torchinductor_<user> left behind
