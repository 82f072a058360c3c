import json
import os
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import ROOT, load_script

import helpers
import helpers.__main__ as cli
from helpers.steps import select_steps

# These tests run the scripts' CPU forms, also on a machine with a GPU (where the scripts themselves are run as they
# are: scripts/gpu_check.sh runs the test suite there).
CPU_ONLY = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}


@pytest.mark.slow
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


@pytest.mark.notebooks  # slow: it runs a notebook and compiles
def test_gpu_check_runs_end_to_end_in_its_cpu_form(tmp_path):
    """The GPU check, without a GPU: the tiny model through every check that a CPU can run, in one table."""
    out = tmp_path / "gpu-check"
    env = {**CPU_ONLY, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    proc = subprocess.run(["bash", "scripts/gpu_check.sh", str(out)], capture_output=True, text=True, cwd=ROOT, env=env)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    checks = json.loads((out / "checks.json").read_text())
    assert sum(checks["plan"].values()) <= 170  # the CPU form's budget: within 3 minutes with the start-up
    rows = {row["check"]: row for row in checks["rows"]}
    assert [name for name in rows if name in checks["plan"]] == list(checks["plan"])
    assert all(row["status"] == "ok" for name, row in rows.items() if name in checks["plan"]), rows
    assert all(row["seconds"] <= checks["plan"][name] for name, row in rows.items() if name in checks["plan"])
    notebooks = rows["notebooks 01 headless"]["found"]
    assert list(notebooks) == ["01"] and notebooks["01"]["status"] == "ok" and notebooks["01"]["median_s"] > 0
    for gpu_only in ("regional blocks, max-autotune-no-cudagraphs", "load beside a busy GPU"):
        assert rows[gpu_only]["status"] == "n/a"
    for skipped in ("int8 matmul path", "regional blocks, max-autotune"):  # the tests below run them
        assert rows[skipped]["status"] == "skipped"
    assert rows["flags panel rebuild frees"]["found"]["previous_pipeline_freed"]
    assert len(list(out.iterdir())) <= 7  # the seven that gpu_check.sh names
    assert "check" in (out / "check.txt").read_text()


@pytest.mark.parametrize("cuda, extra, total", [(True, [], 330), (True, ["--within-s", "301"], 301),
                                                (False, [], 170), (False, ["--budget-s", "7"], 7)])
def test_the_gpu_checks_limits_add_up_to_its_budget(monkeypatch, cuda, extra, total):
    gpu_check = load_script("gpu_check")
    monkeypatch.setattr(gpu_check, "CUDA", cuda)
    limits = dict(gpu_check.plan(gpu_check.parse_args(["--out", "x", *extra])))
    assert sum(limits.values()) == total
    assert ("load beside a busy GPU" in limits) == ("regional blocks, max-autotune" in limits) == cuda
    assert ("int8 matmul path" in limits) == cuda


def test_a_child_that_ignores_sigterm_is_killed_within_its_limit(tmp_path):
    gpu_check = load_script("gpu_check")
    checks = gpu_check.Checks(None, tmp_path)
    start = time.monotonic()
    code, seconds = checks.limited(["bash", "-c", "trap '' TERM; echo started; sleep 60"], tmp_path / "log", 3)
    assert code is None and 1.5 < seconds < 2.5  # SIGTERM at the limit less the grace period (a third of 3 s)
    assert time.monotonic() - start < 3.5  # SIGKILL at the limit
    assert (tmp_path / "log").read_text() == "started\n"


@pytest.mark.slow
def test_each_check_past_its_limit_times_out_and_the_next_one_still_starts(tmp_path):
    """With a budget far too short, every check is stopped at its limit, and the run still ends in its table."""
    out = tmp_path / "out"
    start = time.monotonic()
    proc = subprocess.run([sys.executable, "scripts/gpu_check.py", "--out", str(out), "--budget-s", "7"],
                          capture_output=True, text=True, cwd=ROOT, env=CPU_ONLY)
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-3000:]
    checks = json.loads((out / "checks.json").read_text())
    assert sum(checks["plan"].values()) == 7
    rows = [row for row in checks["rows"] if row["check"] in checks["plan"]]  # not the rows a CPU leaves out
    assert [row["check"] for row in rows] == list(checks["plan"])
    for row in rows:
        assert row["status"] == "timed out" and row["found"].startswith("timed out after ")
        assert row["seconds"] <= checks["plan"][row["check"]] + 0.5
    assert time.monotonic() - start < 7 + 40  # the limits, and the script's own start (torch's import)


def test_the_reference_run_plans_its_slices_and_runs_nothing(tmp_path):
    env = {**os.environ, "OUT": str(tmp_path / "out")}
    plan = subprocess.run(["bash", "scripts/gpu_reference.sh", "--plan"], capture_output=True, text=True, cwd=ROOT,
                          env=env)
    assert plan.returncode == 0, plan.stderr
    rows = [line.split() for line in plan.stdout.splitlines()[1:6]]
    assert [row[:3] for row in rows] == [["1", "eager", "01-03"], ["2", "compile", "03,04"],
                                         ["3", "fused-qkv", "03,05"], ["4", "int8", "03,06"],
                                         ["5", "regional", "03,07"]]
    assert rows[4][-1] == "--no-extras"  # 07's extra sections skipped
    assert float(rows[0][3]) <= 8 and float(rows[4][3]) <= 8
    for _, _, only, *_, extra in rows:  # the runner takes each slice's arguments; each slice compiles at most once
        args = cli.parse_args(["run", "--out", "x", "--only", only, *([] if extra == "-" else [extra])])
        steps = select_steps(args.only)
        assert "03" in [step.id for step in steps] and sum(step.settings.compile != "off" for step in steps) <= 1
        assert args.no_extras == (extra == "--no-extras")
    arms = [line.split() for line in plan.stdout.splitlines()[6:10]]  # compare_regions.py, one arm each
    assert [(row[1], row[2], row[-1]) for row in arms] == [
        ("regions-full", "regions", "full"), ("regions-blocks", "regions", "blocks"),
        ("regions-resnets", "regions", "attention+resnets"),
        ("regions-samplers", "regions", "attention+resnets+samplers")]
    assert load_script("compare_regions").parse_args(["--out", "x", "--arms", *[row[-1] for row in arms]]).arms == [
        "full", "blocks", "attention+resnets", "attention+resnets+samplers"]
    for slice_ in ("10", "everything"):
        refused = subprocess.run(["bash", "scripts/gpu_reference.sh", "--slice", slice_], capture_output=True,
                                 text=True, cwd=ROOT, env=env)
        assert refused.returncode == 2 and f"(not '{slice_}')" in refused.stderr
    assert not (tmp_path / "out").exists()


OVERWRITTEN = ("Error: accessing tensor output of CUDAGraphs that has been overwritten by a subsequent run. "
               "Stack trace: ...")


@pytest.mark.parametrize("fell_back", [False, True])
def test_the_first_regional_check_answers_whether_pytorch_152887_hits(monkeypatch, fell_back):
    """Only a GPU shows the error: stand-ins raise it, or say that helpers fell back without CUDA graphs."""
    import helpers
    from helpers import regions

    gpu_check = load_script("gpu_check")
    args = gpu_check.parse_args(["--out", "x", "--model", "tiny", "--size", "64", "--steps", "1"])
    monkeypatch.setattr(helpers, "compile_regions", lambda pipe, mode: setattr(pipe.vae, "decode", pipe.vae.decode))
    monkeypatch.setattr(regions, "cudagraph_fallbacks", ["an earlier pipeline's fallback"])
    if not fell_back:
        monkeypatch.setattr(helpers, "benchmark", lambda *a, **k: (_ for _ in ()).throw(RuntimeError(OVERWRITTEN)))
        with pytest.raises(RuntimeError, match=r"^pytorch/pytorch#152887 hits SDXL with torch \S+: Error: accessing"):
            gpu_check.regional(args, "max-autotune")
        return

    def falls_back(*args, **kwargs):
        regions.cudagraph_fallbacks.append("The regions failed under CUDA graphs (...): compiled again.")
        return SimpleNamespace(first_call_s=9.0, median_s=0.5, iqr_s=0.01, peak_memory_gb=8.0,
                               first_call_peak_memory_gb=9.0)

    monkeypatch.setattr(gpu_check, "CUDA", True)  # the GPU's branch, with the stand-in's numbers
    monkeypatch.setattr(helpers, "benchmark", falls_back)
    monkeypatch.setattr(helpers, "attention_kernels", lambda pipe, params: {"flash attention": 70})
    found = gpu_check.regional(args, "max-autotune")
    assert found["pytorch#152887"] == "hits: The regions failed under CUDA graphs (...): compiled again."


@pytest.mark.slow
def test_the_regional_check_runs_on_the_cpu_with_its_compile_left_out(monkeypatch):
    """What the CPU form leaves out, without the compile that makes it slow: the pipeline, the measurement, the
    attention probe, the record of the blocks and the clean-up."""
    import helpers

    gpu_check = load_script("gpu_check")
    args = gpu_check.parse_args(["--out", "x", "--model", "tiny", "--size", "64", "--steps", "1"])
    monkeypatch.setattr(helpers, "compile_regions", lambda pipe, mode: setattr(pipe.vae, "decode", pipe.vae.decode))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the CPU form's children run: on a shared machine many times faster
    alive_before = {id(pipe) for pipe in helpers.live_pipelines()}  # earlier tests' fixtures may hold some
    try:
        found = gpu_check.regional(args, "max-autotune")
    finally:
        torch.set_num_threads(threads)
    assert found["median_s"] > 0 and found["first_call_s"] > 0
    assert found["attention"] == {"flash attention for CPU": found["attention"]["flash attention for CPU"]}
    assert found["blocks"] is None and "pytorch#152887" not in found  # nothing compiled; a GPU's question
    assert [pipe for pipe in helpers.live_pipelines() if id(pipe) not in alive_before] == []


@pytest.mark.slow
def test_the_int8_check_finds_the_int8_matmul_on_the_cpu():
    gpu_check = load_script("gpu_check")
    found = gpu_check.int8_path(gpu_check.parse_args(["--out", "x"]))
    assert found["eager"]["int_mm"] == ["aten::_int_mm"] and found["eager"]["relative_error"] < 0.05
    assert found["compiled"].startswith("n/a on a CPU")


def test_region_arms_run_in_separate_sessions_merge_into_one_table_and_chart(tmp_path, capsys):
    """Arms measured in separate runs (a GPU lent for minutes at a time) make one table and chart, the full compile
    first; runs with other parameters are refused in one sentence. The arms here are records as a run writes them."""
    compare_regions = load_script("compare_regions")
    params = helpers.Params(model="tiny", height=64, width=64, steps=2, compile_mode="default")
    arm = {"way": "cold", "compile_mode": "default", "graphs": 2, "iqr_s": 0.002, "recompile_limit_hits": 0,
           "device": "CPU", "ssim": 0.999}
    runs = {
        "blocks": {"blocks": {**arm, "compile": "regional", "regions": "blocks", "graphs": 3, "first_call_s": 50.0,
                              "median_s": 0.066}},
        "full": {compare_regions.FULL: {**arm, "compile": "full", "regions": None, "first_call_s": 100.0,
                                        "median_s": 0.06}},
    }
    files = []
    for name, arms in runs.items():
        run = dict(params.to_dict(), out_dir=str(tmp_path / name))
        files.append(tmp_path / f"{name}.json")
        files[-1].write_text(json.dumps({"params": run, "device": "CPU", "arms": {
            key: {**value, "params": run} for key, value in arms.items()}}))
    assert compare_regions.main(["--merge", *map(str, files), "--out", str(tmp_path / "merged")]) == 0
    merged = json.loads((tmp_path / "merged" / "regions.json").read_text())
    assert list(merged["arms"]) == [compare_regions.FULL, "blocks"]
    assert "blocks: first call 0.50x the full compile's, steady +10.0%" in merged["table"]
    assert (tmp_path / "merged" / "regions.png").stat().st_size > 10_000
    other = json.loads(files[0].read_text())
    other["params"]["height"] = 96
    files[0].write_text(json.dumps(other))
    capsys.readouterr()
    assert compare_regions.main(["--merge", *map(str, files), "--out", str(tmp_path / "refused")]) == 2
    assert capsys.readouterr().err.strip().endswith("merge only runs of the same command on the same device.")
    assert not (tmp_path / "refused").exists()


def test_arms_timed_in_turns_share_the_machines_drift(monkeypatch):
    """compare_regions.py --alternate: one call of each arm per round, the order reversed every other round, and the
    ratio to the reference arm taken round by round, so that a machine slowing down mid-run cancels out."""
    compare_regions = load_script("compare_regions")
    ran, clock = [], [0.0]
    monkeypatch.setattr(compare_regions.time, "perf_counter", lambda: clock[0])

    def arm(name, seconds):
        def call():
            ran.append(name)
            clock[0] += seconds * (1 + (len(ran) - 1) // 2)  # every round slower than the one before
        return call

    result = compare_regions.in_turns({"full": arm("full", 1.0), "blocks": arm("blocks", 1.1)}, rounds=4)
    assert ran == ["full", "blocks", "blocks", "full", "full", "blocks", "blocks", "full"]
    assert result["arms"]["full"]["ratio"] == 1 and result["arms"]["blocks"]["ratio"] == pytest.approx(1.1)
    assert result["arms"]["blocks"]["median_s"] > 2 * 1.1  # the drift is in the times, not in their ratios
    assert result["lines"]["blocks"].endswith("against full round by round (IQR of the ratios "
                                              f"{100 * result['arms']['blocks']['ratio_iqr']:.1f} points)")
