import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT

# These tests run the scripts' CPU forms, also on a machine with a GPU (where the scripts themselves are run as they
# are: scripts/gpu_check.sh runs the test suite there).
CPU_ONLY = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}


def test_profile_final_step_on_the_tiny_model(tmp_path):
    out, cache = tmp_path / "profile", tmp_path / "inductor"
    proc = subprocess.run(
        [sys.executable, "scripts/profile_final_step.py", "--model", "tiny", "--through", "03", "--height", "64",
         "--width", "64", "--steps", "2", "--warmup", "0", "--inductor-cache", str(cache), "--out", str(out)],
        capture_output=True, text=True, cwd=ROOT, env=CPU_ONLY,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    attention = summary["attention"]
    assert attention["processors"] == {"unet": ["AttnProcessor2_0"], "vae": ["AttnProcessor2_0"]}
    assert list(attention["backends"]) == ["flash attention for CPU"]
    assert attention["backends"]["flash attention for CPU"] > 0
    assert summary["inductor_cache"] == {
        "dir": str(cache.resolve()), "state": "nothing compiled", "graphs_from_cache": 0, "graphs_compiled": 0,
    }
    assert summary["flops"]["peak_fraction"] is None  # no matmul peak is known for a CPU
    assert "aten::" in (out / "top_kernels.txt").read_text()
    assert (out / "trace.json.gz").stat().st_size > 0


@pytest.mark.notebooks  # slow: it runs notebooks and compiles
def test_gpu_check_runs_end_to_end_in_its_cpu_form(tmp_path):
    """The GPU check, without a GPU: the tiny model through every check that a CPU can run, in one table."""
    out = tmp_path / "gpu-check"
    env = {**CPU_ONLY, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    command = ["bash", "scripts/gpu_check.sh", str(out), "--no-pytest", "--notebooks", "01-03", "--budget-s", "1500"]
    proc = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, env=env)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    rows = {row["check"]: row for row in json.loads((out / "checks.json").read_text())["rows"]}
    assert all(row["status"] == "ok" for row in rows.values()), rows
    notebooks = rows["seven notebooks headless"]["found"]
    assert sorted(notebooks) == ["01", "02", "03"]  # on a GPU all seven; here the eager ones, to save CI time
    assert all(step["status"] == "ok" and step["median_s"] > 0 for step in notebooks.values())
    for mode in ("max-autotune", "max-autotune-no-cudagraphs"):
        assert rows[f"regional compile, {mode}"]["found"]["attention"]  # a backend was seen
    assert rows["flags panel rebuild frees"]["found"]["previous_pipeline_freed"]
    assert len(list(out.iterdir())) <= 8
    assert "check" in (out / "check.txt").read_text()
