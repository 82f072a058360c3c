"""Cold start: the compile-cache file (made, refused, used), the AOTInductor package, and appendix 08 in the series."""

import hashlib
import json
import os
import subprocess
import sys
import zipfile

import nbformat
import pytest
import torch
from conftest import NOTEBOOKS, ROOT, SERIES_SIZE
from PIL import Image

import helpers
import helpers.__main__ as cli
from helpers import coldstart, coldstart_charts, compile_cache
from helpers.steps import get_step, select_steps

SMALL = dict(model="tiny", height=64, width=64, steps=2, compile_mode="default")
# What `cache_file` was warmed for: the tiny model at the series' size in the course's compile mode. The series'
# notebook 07 compiles the same C++ kernels, so the session's compiler cache compiles them once.
WARMED = dict(model="tiny", height=SERIES_SIZE, width=SERIES_SIZE, steps=2, compile_mode="max-autotune")
WARMED_ARGS = ["--model", "tiny", "--height", str(SERIES_SIZE), "--width", str(SERIES_SIZE)]  # the same, for the CLI


def run_helpers(*args, env=None):
    return subprocess.run([sys.executable, "-m", "helpers", *args], capture_output=True, text=True, cwd=ROOT,
                          env={**os.environ, **(env or {})})


@pytest.fixture(scope="module")
def cache_file(tmp_path_factory):
    """`python -m helpers warm --only 07` (its regional compile, the cheapest step to warm) on the tiny model: the
    compile-cache file that the tests below read, refuse, damage and start a run warm from."""
    folder = tmp_path_factory.mktemp("compile-cache")
    path = folder / "room.zip"
    done = run_helpers("warm", *WARMED_ARGS, "--only", "07", "--out", str(path), "--no-progress",
                       env={"TORCHINDUCTOR_CACHE_DIR": str(folder / "own")})
    assert done.returncode == 0, done.stderr[-3000:]
    assert "07 regional compile: compiled in" in done.stdout and f"--compile-cache {path}" in done.stdout
    return path


def small(**changes):
    return helpers.Params(**{**SMALL, **changes})


def warmed(**changes):
    return helpers.Params(**{**WARMED, **changes})


def test_the_file_holds_a_manifest_the_artifacts_and_the_kernels(cache_file):
    manifest = compile_cache.read_manifest(cache_file)
    assert manifest["steps"] == ["07"] and manifest["compile_mode"] == "max-autotune" and manifest["model"] == "tiny"
    assert (manifest["height"], manifest["width"], manifest["unet_batch"]) == (SERIES_SIZE, SERIES_SIZE, 2)
    assert manifest["torch"] == torch.__version__ and manifest["device"] == helpers.machine.device_name()
    assert sum(manifest["artifacts"].values()) >= 1
    with zipfile.ZipFile(cache_file) as archive:
        names = archive.namelist()
    assert compile_cache.ARTIFACTS_NAME in names
    kernels = [name for name in names if name.startswith(compile_cache.KERNELS_PREFIX)]
    assert len(kernels) == manifest["cpp_kernels"]
    if not torch.cuda.is_available():  # on a CPU, Inductor compiled the blocks' C++ into shared libraries
        assert kernels and all(name.endswith(".so") for name in kernels)
    assert compile_cache.check_compile_cache(cache_file, warmed(), steps="07") == manifest


def rewritten(path, tmp_path, members=None, drop=(), **changes):
    """A copy of the file whose manifest says `changes` and lacks the fields `drop`: as if made elsewhere or damaged;
    `members` replace those of the same names, their checksums left as saved."""
    copy = tmp_path / path.name
    with zipfile.ZipFile(path) as source, zipfile.ZipFile(copy, "w") as target:
        for name in source.namelist():
            data = (members or {}).get(name) or source.read(name)
            if name == compile_cache.MANIFEST_NAME:
                manifest = {**json.loads(data), **changes}
                data = json.dumps({key: value for key, value in manifest.items() if key not in drop})
            target.writestr(name, data)
    return copy


@pytest.mark.parametrize("made_for, params, named", [
    ({}, warmed(compile_mode="default"), ["compile_mode 'max-autotune'", "compile_mode 'default'"]),
    ({}, warmed(height=128), [f"height {SERIES_SIZE}", "height 128"]),
    ({}, warmed(guidance=1.0), ["unet_batch 2", "unet_batch 1"]),
    ({"device": "NVIDIA H100 80GB HBM3"}, warmed(), ["device 'NVIDIA H100 80GB HBM3'"]),
    ({"torch": "2.7.0+cu126", "triton": "3.3.0"}, warmed(), ["torch '2.7.0+cu126'", "triton '3.3.0'"]),
], ids=["mode", "size", "guidance", "gpu", "versions"])
def test_a_file_made_for_something_else_is_refused_in_one_sentence(cache_file, tmp_path, made_for, params, named):
    path = rewritten(cache_file, tmp_path, **made_for)
    with pytest.raises(helpers.CompileCacheMismatch) as refused:
        compile_cache.check_compile_cache(path, params)
    message = str(refused.value)
    assert "\n" not in message and message.endswith(".") and "python -m helpers warm" in message
    for text in named:
        assert text in message


def test_a_file_for_other_steps_or_another_model_is_refused(cache_file, tmp_path):
    with pytest.raises(helpers.CompileCacheMismatch, match="holds the compiled steps 07, not 04"):
        compile_cache.check_compile_cache(cache_file, warmed(), steps="04")
    pipe = helpers.build("tiny", through="03", verbose=False)
    other = rewritten(cache_file, tmp_path, architecture="0123456789ab")
    with pytest.raises(helpers.CompileCacheMismatch, match="architecture '0123456789ab'"):
        compile_cache.check_compile_cache(other, warmed(), pipe=pipe)


def test_a_refused_file_loads_nothing(cache_file, monkeypatch, capsys):
    pipe = helpers.build("tiny", through="03", verbose=False)
    monkeypatch.setattr(torch.compiler, "load_cache_artifacts", lambda blob: pytest.fail("loaded a refused file"))
    with pytest.raises(helpers.CompileCacheMismatch):
        helpers.use_compile_cache(pipe, warmed(compile_mode="default", compile_cache=str(cache_file)), step="07")
    assert "loaded" not in capsys.readouterr().out


def test_what_is_not_a_compile_cache_file_is_refused(cache_file, tmp_path):
    with pytest.raises(FileNotFoundError, match="No compile-cache file at .*python -m helpers warm"):
        compile_cache.read_manifest(tmp_path / "missing.zip")
    (tmp_path / "notes.zip").write_text("not a zip")
    with pytest.raises(helpers.CompileCacheMismatch, match="is not a compile-cache file"):
        compile_cache.read_manifest(tmp_path / "notes.zip")
    older = rewritten(cache_file, tmp_path, format=0)
    with pytest.raises(helpers.CompileCacheMismatch, match="another version of this course"):
        compile_cache.read_manifest(older)
    escaping = tmp_path / "escaping.zip"
    with zipfile.ZipFile(cache_file) as source, zipfile.ZipFile(escaping, "w") as target:
        for name in source.namelist():
            target.writestr(name, source.read(name))
        target.writestr(compile_cache.KERNELS_PREFIX + "../../outside.so", b"")
    with pytest.raises(helpers.CompileCacheMismatch, match="outside the cache folder"):
        compile_cache.load_compile_cache(escaping)
    with pytest.raises(ValueError, match="compile_cache must be the path of a file"):
        helpers.Params(compile_cache=3)


@pytest.mark.parametrize("changes, drop, named", [
    ({"steps": [4, 5]}, (), ["steps of another type"]),
    ({}, ("cpp_kernels",), ["cpp_kernels missing"]),
    ({"height": "64", "unet_batch": True, "artifacts": ["fx_graph"]}, ("made", "sha256"),
     ["height of another type", "unet_batch of another type", "artifacts of another type", "made missing",
      "sha256 missing"]),
], ids=["steps-as-numbers", "no-kernel-count", "several"])
def test_a_damaged_manifest_is_refused_in_one_sentence(cache_file, tmp_path, changes, drop, named):
    path = rewritten(cache_file, tmp_path, drop=drop, **changes)
    with pytest.raises(helpers.CompileCacheMismatch) as refused:
        compile_cache.check_compile_cache(path, warmed(), steps="07")
    message = str(refused.value)
    assert message.startswith("room.zip has a damaged manifest (") and "\n" not in message
    assert message.endswith("make it again with `python -m helpers warm --out FILE`.")
    for text in named:
        assert text in message


def test_damaged_contents_are_refused_and_artifacts_that_dont_load_too_without_a_traceback(
        cache_file, tmp_path, monkeypatch, capfd):
    garbage = b"not torch's compile artifacts"
    with zipfile.ZipFile(cache_file) as archive:
        kernel = next(name for name in archive.namelist() if name.startswith(compile_cache.KERNELS_PREFIX))
    for member in (compile_cache.ARTIFACTS_NAME, kernel):  # the bytes differ from those saved: refused up front
        with pytest.raises(helpers.CompileCacheMismatch, match=f"room.zip is damaged \\({member} not as saved\\)"):
            compile_cache.check_compile_cache(rewritten(cache_file, tmp_path, members={member: garbage}), warmed())
    # Checksums that agree with broken artifacts, as where torch saved what it can't read back: refused on loading.
    (tmp_path / "forged").mkdir()
    sums = {**compile_cache.read_manifest(cache_file).get("sha256", {}),
            compile_cache.ARTIFACTS_NAME: hashlib.sha256(garbage).hexdigest()}
    forged = rewritten(cache_file, tmp_path / "forged", members={compile_cache.ARTIFACTS_NAME: garbage}, sha256=sums)
    compile_cache.check_compile_cache(forged, warmed(), steps="07")
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    capfd.readouterr()
    with pytest.raises(helpers.CompileCacheMismatch, match="room.zip's compile artifacts did not load .*helpers warm"):
        compile_cache.load_compile_cache(forged)
    err = capfd.readouterr().err
    assert "Traceback" not in err and "un-pickle" not in err, err
    assert not list((tmp_path / "inductor").rglob("*.so"))  # none of its kernels written either


def test_the_check_before_a_run_needs_each_compiled_step_of_the_run(cache_file):
    manifest = compile_cache.check_compile_cache(cache_file, warmed(), steps=["01", "02", "03", "07", "08"])
    assert manifest["steps"] == ["07"]
    with pytest.raises(helpers.CompileCacheMismatch) as refused:
        compile_cache.check_compile_cache(cache_file, warmed(), steps=["03", "04", "05", "06", "07"])
    assert str(refused.value) == ("room.zip holds the compiled steps 07, not 04, 05, 06: warm it with "
                                  "`python -m helpers warm --out FILE --only 04,05,06` (or 04-07 for all of them).")


def test_a_cold_start_inherits_no_triton_cache_folder(tmp_path, monkeypatch):
    """Inductor writes TRITON_CACHE_DIR into os.environ once a process makes a Triton kernel: a "cold" child that
    inherited it would find the notebook's kernels. A stand-in child (no pipeline) writes back its environment."""
    stand_in = tmp_path / "python"
    stand_in.write_text(f"#!{sys.executable}\nimport json, os, sys\n"
                        "json.dump({'env': dict(os.environ)}, open(sys.argv[-1], 'w'))\n")
    stand_in.chmod(0o755)
    monkeypatch.setattr(sys, "executable", str(stand_in))
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path / "notebook" / "triton" / "0"))
    result = coldstart.time_start("cold", small(), tmp_path / "work")
    assert "TRITON_CACHE_DIR" not in result["env"]
    assert result["env"]["TORCHINDUCTOR_CACHE_DIR"] == result["cache_dir"]


def test_a_start_with_an_unknown_way_or_choice_of_regions_is_refused_before_any_process(tmp_path):
    with pytest.raises(ValueError, match="regions must be one of blocks, attention"):
        coldstart.time_start("cold", small(), tmp_path / "work", compile="regional", regions="resnets")
    with pytest.raises(ValueError, match="way must be one of cold, disk, file, package, got 'warm'"):
        coldstart.time_start("warm", small(), tmp_path / "work")
    assert not (tmp_path / "work").exists()


def test_the_package_starts_steady_time_is_labelled_not_comparable(tmp_path):
    params = small(out_dir=str(tmp_path))
    measured = {"compile_mode": "max-autotune", "device": "GPU", "import_s": 1.0, "load_s": 2.0, "prepare_s": 3.0,
                "first_call_s": 4.0, "to_first_image_s": 10.0, "median_s": 0.5, "iqr_s": 0.01,
                "fx_graph_cache": {"hits": 0, "misses": 0}}
    package = coldstart.record_start(params, {**measured, "way": "package", "compile": "aot"})
    disk = coldstart.record_start(params, {**measured, "way": "disk", "compile": "full"})
    assert package["steady_caveat"] == "not comparable: no CUDA graphs, eager VAE" and disk["steady_caveat"] is None
    assert "0.500 s per image (IQR 0.010 s, not comparable: no CUDA graphs, eager VAE)" in coldstart.describe_start(
        package)
    assert "not comparable" not in coldstart.describe_start(disk)
    figure = coldstart_charts.draw_starts([disk, package])
    texts = [text.get_text() for text in figure.axes[0].texts]
    assert "not comparable" in texts[1] and "not comparable" not in texts[0]


def test_the_regions_chart_marks_the_full_compile_and_names_the_size():
    record = {"device": "CPU", "params": small().to_dict(), "first_call_s": 100.0, "median_s": 0.2, "iqr_s": 0.01,
              "compile": "full"}
    arms = {"full compile": record, "blocks": {**record, "compile": "regional", "first_call_s": 40.0, "median_s": 0.25}}
    axis = coldstart_charts.draw_regions(arms).axes[0]
    assert axis.get_title() == "Regions against the full compile on CPU, tiny at 64x64"
    assert [text.get_text() for text in axis.get_legend().get_texts()] == ["full compile", "blocks"]
    assert [bars.lines[0].get_marker() for bars in axis.containers] == ["s", "o"]  # the full compile: a square


def test_the_appendix_states_its_gpu_time_and_what_the_estimate_rests_on():
    sentence = coldstart.gpu_estimate(["default", "max-autotune"], "max-autotune", ["blocks"])
    # Cold starts of default and max-autotune, the package's max-autotune compile, a regional one, 3 warm starts.
    assert "9.5-34 minutes, for 2 cold starts (default, max-autotune)" in sentence
    assert "1 regional cold start (blocks) and 3 warm starts" in sentence
    assert "3-10 minutes per cold max-autotune compile" in sentence and "not measurements" in sentence
    # The notebook's defaults: four modes (two of them max-autotune) and three choices of regions, 4 + 5.5 more.
    sentence = coldstart.gpu_estimate(["default", "reduce-overhead", "max-autotune-no-cudagraphs", "max-autotune"],
                                      "max-autotune", ["blocks", "attention+resnets", "attention+resnets+samplers"])
    assert "15.5-56 minutes, for 4 cold starts" in sentence and "3 regional cold starts (blocks, " in sentence
    cells = [cell for cell in nbformat.read(NOTEBOOKS / "08_cold_start.ipynb", as_version=4).cells
             if cell.cell_type == "code"]
    # after the parameters:
    assert "print(coldstart.gpu_estimate(modes, params.compile_mode, REGION_CHOICES))" in cells[1].source


@pytest.mark.parametrize("rewrite, height, only, refusal", [
    ({}, "128", "07", f"room.zip was made for height {SERIES_SIZE}, but here it is height 128"),
    ({"steps": [7]}, str(SERIES_SIZE), "07", "room.zip has a damaged manifest (steps of another type)"),
    ({"members": {"artifacts.bin": b"damaged"}}, str(SERIES_SIZE), "07",
     "room.zip is damaged (artifacts.bin not as saved)"),
    ({}, str(SERIES_SIZE), "06", "room.zip holds the compiled steps 07, not 06"),
], ids=["mismatched", "damaged-manifest", "damaged-artifacts", "other-steps"])
def test_the_runner_refuses_a_file_before_any_notebook_in_one_line(cache_file, tmp_path, capsys, rewrite, height,
                                                                    only, refusal):
    path = rewritten(cache_file, tmp_path, **rewrite)
    status = cli.main(["run", "--model", "tiny", "--height", height, "--width", str(SERIES_SIZE), "--only", only,
                       "--compile-cache", str(path), "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert status == 2 and "Traceback" not in err and err.count("\n") == 1, err[-3000:]
    assert err.startswith(f"error: {refusal}")
    assert not (tmp_path / "run" / "notebooks").exists()


def test_warm_refuses_steps_that_compile_nothing(tmp_path, capsys):
    assert cli.main(["warm", "--model", "tiny", "--only", "01-03", "--out", str(tmp_path / "c.zip")]) == 2
    assert "names no compiled step: choose among 04-07" in capsys.readouterr().err
    assert cli.main(["warm", "--model", "tiny", "--out", str(tmp_path)]) == 2
    assert "is a folder: name the file to write" in capsys.readouterr().err


def test_the_runner_runs_the_appendix_when_named():
    assert [s.id for s in select_steps(None)] == ["01", "02", "03", "04", "05", "06", "07"]
    assert [s.notebook for s in select_steps("08")] == ["08_cold_start.ipynb"]
    assert [s.id for s in select_steps("06-08")] == ["06", "07", "08"]
    assert [s.id for s in select_steps("cold_start")] == ["08"]
    with pytest.raises(ValueError, match="Unknown step"):
        get_step("08")  # the ladder's steps only: the appendix adds no bar to the chart


@pytest.mark.notebooks
def test_a_run_with_the_file_that_warm_made_starts_warm_from_it(cache_file, tmp_path):
    """The runner's notebook 07 (without its optional sections, which compile other shapes) with --compile-cache
    `cache_file`, made by `python -m helpers warm`, in a fresh Inductor cache folder: the record says the first call
    was warm, from the file."""
    done = run_helpers("run", *WARMED_ARGS, "--steps", "2", "--warmup", "0", "--runs", "1", "--only", "07",
                       "--no-extras", "--no-progress", "--compile-cache", str(cache_file),
                       "--out", str(tmp_path / "run"), env={"TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "attendee")})
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Compile cache: room.zip, steps 07, made on" in done.stdout
    (record,) = json.loads((tmp_path / "run" / "results.json").read_text())
    assert record["compile_cache"]["first_call"] == "warm" and record["compile_cache"]["warm_from"] == "room.zip"
    assert record["compile_cache"]["fx_graph_cache"]["misses"] == 0
    assert record["compile_cache"]["fx_graph_cache"]["hits"] >= 1
    assert record["params"]["compile_cache"] == str(cache_file)
    (executed,) = (tmp_path / "run" / "notebooks").glob("07_*.ipynb")
    printed = "".join(o.get("text", "") for c in nbformat.read(executed, as_version=4).cells if c.cell_type == "code"
                      for o in c.get("outputs", []))
    assert "Compile cache: loaded" in printed and "from room.zip" in printed


@pytest.mark.notebooks
def test_08s_unet_package_holds_no_weights_and_makes_the_eager_image(series, tiny_folder, tmp_path):
    """The UNet package that appendix 08 built in the series (exported and compiled ahead of time without its
    weights), run by a new pipeline in its UNet's place with that UNet's own weights: the eager pipeline's image."""
    out, _, _ = series
    package = out / coldstart.COLD_START_DIR / "unet.pt2"
    params = helpers.Params(model=str(tiny_folder), height=96, width=96, steps=2, out_dir=str(tmp_path))
    pipe = helpers.build(params.model, through="03", compile=False, verbose=False)
    pipe.set_progress_bar_config(disable=True)
    eager = helpers.generate(pipe, params)
    # A weight's bytes, as the package would hold them (raw, in its shared library): found in none of its files.
    weight = max((t for t in pipe.unet.state_dict().values() if t.ndim == 2), key=torch.Tensor.nelement)
    snippet = weight.detach().flatten()[:64].contiguous().view(torch.uint8).numpy().tobytes()
    with zipfile.ZipFile(package) as archive:
        assert not [name for name in archive.namelist() if snippet in archive.read(name)]
    pipe.unet.to(memory_format=torch.channels_last)  # as the package was exported, and as 08's package start does
    coldstart.load_unet_package(pipe, package)
    packaged = helpers.generate(pipe, params)
    scores = helpers.quality(packaged, eager)
    assert scores["ssim"] > 0.95 and scores["max_abs_diff"] < 0.2, scores  # bfloat16, another order of the sums


@pytest.mark.notebooks
def test_the_cold_start_appendix_measures_every_start(series):
    out, _, log = series
    records = json.loads((out / coldstart.COLD_START_DIR / "results.json").read_text())
    cold = [r for r in records if r["way"] == "cold" and r["compile"] == "full"]
    assert [r["compile_mode"] for r in cold] == ["max-autotune"]  # the series sets COMPILE_MODES to the course's
    for record in cold:
        assert record["first_call"] == "cold" and record["fx_graph_cache"]["hits"] == 0
        assert record["to_first_image_s"] > record["first_call_s"] > record["median_s"] > 0
    by_way = {r["way"]: r for r in records if r["compile"] != "regional" and r["compile_mode"] == "max-autotune"}
    assert by_way["disk"]["first_call"] == "warm" and by_way["disk"]["warm_from"] == "Inductor's cache folder"
    assert by_way["file"]["first_call"] == "warm" and by_way["file"]["warm_from"] == "compile-cache.zip"
    assert by_way["package"]["first_call"] == "not compiled" and by_way["package"]["compile"] == "aot"
    assert by_way["package"]["steady_caveat"] == coldstart.PACKAGE_STEADY_CAVEAT and not by_way["file"]["steady_caveat"]
    # Part 3: each choice of regions started cold, compiling what it names and nothing more after its first call.
    regional = {r["regions"]: r for r in records if r["compile"] == "regional"}
    assert list(regional) == ["blocks"]  # the series' REGION_CHOICES
    for record in regional.values():
        assert record["first_call"] == "cold" and record["step"] == "04"
        assert record["graphs"] > 0 and record["graphs_later"] == 0 and record["recompile_limit_hits"] == 0
    for record in records:
        assert record["device"] and record["versions"]["torch"] and record["notebook"].startswith("notebooks/08")
    folder = out / coldstart.COLD_START_DIR
    for chart in ("compile_modes.png", "starts.png", "regions.png"):
        assert Image.open(folder / chart).size[0] > 600
    assert compile_cache.read_manifest(folder / "compile-cache.zip")["steps"] == ["04"]
    assert "== 08 cold start (08_cold_start.ipynb)" in log and "time to the first image (max-autotune): cold" in log
    # The mega-cache's two calls, run inline: nothing to save in a kernel that compiled nothing; the file's entries
    # loaded, as many of each kind as its manifest counts.
    (executed,) = (out / "notebooks").glob("08_cold_start*.ipynb")
    printed = "".join(o.get("text", "") for c in nbformat.read(executed, as_version=4).cells if c.cell_type == "code"
                      for o in c.get("outputs", []))
    assert "save_cache_artifacts() in this kernel, which has compiled nothing: None" in printed
    assert "notebooks 06 (full) and 07 (regional), int8 included: first call" in printed  # found their records
    manifest = compile_cache.read_manifest(folder / "compile-cache.zip")
    assert f"load_cache_artifacts() put into this kernel's caches: {manifest['artifacts']}" in printed


def test_the_appendix_parameters_cell_is_the_courses_plus_the_modes():
    from conftest import notebook_cells

    from helpers.params import COMPILE_MODES, cell_names

    (cell,) = notebook_cells("08_cold_start.ipynb", "parameters")
    written = {}
    exec(cell, {}, written)
    modes, choices = written.pop("COMPILE_MODES"), written.pop("REGION_CHOICES")
    assert written == cell_names() and sorted(modes) == sorted(COMPILE_MODES) and choices == list(helpers.REGIONS)


def test_the_runners_line_for_08_leaves_out_a_hand_edited_start_record(tmp_path, capsys):
    """Start records are read as every record is, by `results.load_records`: one it can't use is left out."""
    cold = {"way": "cold", "compile": "full", "compile_mode": "default", "params": {"compile_mode": "default"},
            "to_first_image_s": 61.2, "notebook": "08.ipynb"}
    package = {**cold, "way": "package", "compile": "aot", "to_first_image_s": 9.5}
    records = [cold, {**cold, "way": "disk", "to_first_image_s": "fast"}, "a note", package]
    (tmp_path / coldstart.COLD_START_DIR).mkdir()
    (tmp_path / coldstart.COLD_START_DIR / "results.json").write_text(json.dumps(records))
    assert coldstart.load_start_records(tmp_path) == [cold, package]
    line = coldstart.summary_of(tmp_path, "08.ipynb")
    assert line == "time to the first image (default): cold 61.2 s, AOTInductor package 9.5 s"
    assert capsys.readouterr().out == ""  # the runner's line is quiet about them
    coldstart.load_start_records(tmp_path, quiet=False)
    printed = capsys.readouterr().out.splitlines()
    assert printed[0].startswith("Skipped record 2 of ") and "to_first_image_s is \"fast\"" in printed[0]
    assert printed[1].startswith("Skipped record 3 of ") and "not a JSON object" in printed[1]
