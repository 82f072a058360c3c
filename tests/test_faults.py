"""What a hurried workshop attendee does to the course, and what comes of it: nothing lost, nothing wrong, and one
sentence per fault, never a traceback.

The tests run as root, whom file permissions don't stop, so a folder that can't be written, a read-only disk and a
full one are simulated: `failing_writes` makes every write under a folder raise the OSError the system would raise.
"""

import builtins
import errno
import inspect
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import nbformat
import numpy as np
import papermill
import pytest
from conftest import ROOT
from PIL import Image
from test_chart import workshop_records
from test_runner import stand_in_notebooks

import helpers.__main__ as cli
import helpers.runner as runner
from helpers import ModelUnavailable, Params, check_model, load_pipeline, quality, record_step
from helpers.files import OutputError
from helpers.kernels import RUN_FOLDER_PREFIX
from helpers.results import RESULTS_FILE, append_record, load_records
from helpers.timing import Measurement

WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
TINY_RUN = ["--model", "tiny", "--steps", "2", "--height", "64", "--width", "64", "--runs", "2", "--warmup", "0",
            "--no-progress"]
# Runs the command line with the course's notebooks replaced by the stand-ins in the folder argv[1] names.
STAND_IN_RUNNER = (
    "import sys; from pathlib import Path; import helpers.runner as runner; import helpers.__main__ as cli; "
    "runner.NOTEBOOKS_DIR = Path(sys.argv[1]); sys.exit(cli.main(sys.argv[2:]))"
)
# A stand-in notebook cell that says which kernel runs it, then works for longer than any test waits.
BUSY_CELL = "import os, pathlib, time\npathlib.Path('kernel.pid').write_text(str(os.getpid()))\ntime.sleep(300)"


def one_line(text):
    """The only line of `text`; fails where there are more, or a traceback."""
    assert "Traceback" not in text, text
    lines = text.strip().splitlines()
    assert len(lines) == 1, text
    return lines[0]


def files_of(folder):
    return {path.relative_to(folder): path.read_bytes() for path in folder.rglob("*") if path.is_file()}


def image_of(seed):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (64, 64, 3), dtype=np.uint8))


def tiny_params(out_dir, seed=0):
    return Params(model="tiny", steps=2, height=64, width=64, seed=seed, out_dir=str(out_dir))


MEASUREMENT = Measurement([0.1, 0.1], 0.2, 0)


@pytest.fixture
def failing_writes(monkeypatch):
    """fail(folder, code): from then on, making, opening for writing, renaming or linking anything under `folder`
    raises OSError `code` (EROFS: a read-only disk, EACCES: someone else's folder, ENOSPC: a full disk)."""

    def fail(folder, code):
        folder = Path(folder).resolve()

        def check(path):
            if isinstance(path, (str, os.PathLike)):
                path = Path(os.path.abspath(path))
                if path == folder or folder in path.parents:
                    raise OSError(code, os.strerror(code), str(path))

        def guarded_open(original, writes):
            def opened(path, *args, **kwargs):
                if writes(*args, **kwargs):
                    check(path)
                return original(path, *args, **kwargs)

            return opened

        def guarded(original):
            def call(*args, **kwargs):
                for path in args[:2]:
                    check(path)
                return original(*args, **kwargs)

            return call

        file_open = guarded_open(io.open, lambda mode="r", *args, **kwargs: any(c in mode for c in "wax+"))
        monkeypatch.setattr(os, "open", guarded_open(os.open, lambda flags, *args, **kwargs: flags & WRITE_FLAGS))
        monkeypatch.setattr(io, "open", file_open)
        monkeypatch.setattr(builtins, "open", file_open)
        for name in ("mkdir", "replace", "rename", "link"):
            monkeypatch.setattr(os, name, guarded(getattr(os, name)))

    return fail


@pytest.fixture
def started():
    """The processes a test starts; any still running when it ends, a failed one say, is ended."""
    processes = []
    yield processes
    for process in processes:
        if process.poll() is None:
            process.kill()
            process.communicate()


def test_a_step_is_scored_against_its_own_baseline_when_runs_share_a_folder(tmp_path):
    first = record_step("01", MEASUREMENT, tiny_params(tmp_path, seed=0), dtype="float32", image=image_of(0))
    record_step("01", MEASUREMENT, tiny_params(tmp_path, seed=1), dtype="float32", image=image_of(1))  # another run
    second = record_step("02", MEASUREMENT, tiny_params(tmp_path, seed=0), dtype="bfloat16", image=image_of(0))
    assert second["quality"]["ssim"] == 1.0 and second["quality"]["psnr_db"] is None  # the same image as its baseline
    assert second["baseline_image"] == first["image"]
    images = [record["image"] for record in load_records(tmp_path)]
    assert len(set(images)) == 3
    assert np.array_equal(np.asarray(Image.open(tmp_path / first["image"])), np.asarray(image_of(0)))


def stand_in_image(step, seed, height, width):
    """What a stand-in for notebook 01 or 02 draws: noise that the seed decides for 01; for 02 the same with a small
    change (as lower precision makes), larger for seed 1 than for seed 0, so that each seed's 02 scores its own."""
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, (height, width, 3)).astype(np.int16)
    if step == "02":
        pixels += rng.integers(-2 - seed, 3 + seed, pixels.shape)
    return Image.fromarray(pixels.clip(0, 255).astype(np.uint8))


def recording_stand_in(step, dtype):
    """A stand-in notebook's cell: it reads the injected parameters and records its step as the course's notebooks
    do (`record_step`: the image saved, scored against the baseline that 01 recorded), with no pipeline built. It
    counts no FLOPs: that imports diffusers and builds the model on the meta device (the cell took 10 CPU-seconds in a
    fresh process with the count, 5 without), for a figure this test does not read."""
    return "\n".join([
        "import numpy as np",
        "from PIL import Image",
        "import helpers",
        "import helpers.recording",
        "helpers.recording.compute_efficiency = lambda params, median_s: {}",
        "from helpers.timing import Measurement",
        inspect.getsource(stand_in_image),
        "params = helpers.Params.from_cell(globals())",
        "height, width = helpers.image_size(params)",
        f"image = stand_in_image({step!r}, params.seed, height, width)",
        "measurement = Measurement([0.25, 0.25], 0.5, params.warmup)",
        f"helpers.record_step({step!r}, measurement, params, dtype={dtype!r}, image=image)",
    ])


def start_run(started, notebooks, out, seed, only="01,02"):
    """`python -m helpers run` with the notebooks in the folder `notebooks`, in a process of its own."""
    started.append(subprocess.Popen(
        [sys.executable, "-c", STAND_IN_RUNNER, str(notebooks), "run", "--out", str(out), "--seed", str(seed),
         "--only", only, *TINY_RUN],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    ))
    return started[-1]


def finish(process):
    output, _ = process.communicate(timeout=600)
    assert process.returncode == 0, output[-3000:]


def check_records_point_at_their_own_files(out):
    records = load_records(out)
    assert len({r["image"] for r in records}) == len({r["notebook"] for r in records}) == len(records)
    images = {r["image"]: r for r in records if r["step"] == "01"}
    for record in records:
        executed = nbformat.read(out / record["notebook"], as_version=4)
        injected = next(c.source for c in executed.cells if "injected-parameters" in c.metadata.get("tags", []))
        assert f"SEED = {record['params']['seed']}" in injected
        if record["step"] == "02":
            assert images[record["baseline_image"]]["params"]["seed"] == record["params"]["seed"]


@pytest.mark.slow
@pytest.mark.several_processes
def test_runs_sharing_a_folder_at_once_or_one_after_the_other_score_as_each_would_alone(tmp_path, started,
                                                                                        monkeypatch):
    """Seeds 0 and 1 run 01 and 02 at once in one folder; then seed 0 runs 01 there again, and seed 1 runs 02 again:
    its baseline is still its own 01, not the latest. The runs execute stand-ins for 01 and 02 that record as the
    course's notebooks do, images that the injected parameters decide: what each seed's 02 scores alone is its image's
    quality against its own 01 image."""
    out, notebooks = tmp_path / "shared", tmp_path / "stand-ins"
    notebooks.mkdir()
    stand_in_notebooks(notebooks, {"01_baseline.ipynb": [recording_stand_in("01", "float32")],
                                   "02_bfloat16.ipynb": [recording_stand_in("02", "bfloat16")]})
    for process in [start_run(started, notebooks, out, 0), start_run(started, notebooks, out, 1)]:
        finish(process)
    monkeypatch.setattr(runner, "NOTEBOOKS_DIR", notebooks)
    for seed, only in ((0, "01"), (1, "02")):  # in this process: one interpreter start each spared
        assert cli.main(["run", "--out", str(out), "--seed", str(seed), "--only", only, *TINY_RUN]) == 0
    on_its_own = {seed: quality(stand_in_image("02", seed, 64, 64), stand_in_image("01", seed, 64, 64))
                  for seed in (0, 1)}
    assert on_its_own[0]["psnr_db"] > on_its_own[1]["psnr_db"] + 1  # each seed's 02 has a score of its own
    records = load_records(out)  # oldest first: seed 1's second 02 ran after seed 0's second 01
    assert sorted((r["step"], r["params"]["seed"]) for r in records[:4]) == [("01", 0), ("01", 1), ("02", 0), ("02", 1)]
    assert [(r["step"], r["params"]["seed"]) for r in records[4:]] == [("01", 0), ("02", 1)]
    for record in (r for r in records if r["step"] == "02"):
        expected = on_its_own[record["params"]["seed"]]
        assert record["quality"]["ssim"] == pytest.approx(expected["ssim"], abs=1e-6), record["params"]["seed"]
        assert record["quality"]["psnr_db"] == pytest.approx(expected["psnr_db"], abs=1e-4)
        assert record["quality"]["ssim"] > 0.9  # against another seed's 01, noise against noise, it would be near 0
    check_records_point_at_their_own_files(out)
    for record in records:  # the image its own notebook drew, at the injected seed and size
        drawn = stand_in_image(record["step"], record["params"]["seed"], 64, 64)
        assert np.array_equal(np.asarray(Image.open(out / record["image"])), np.asarray(drawn)), record


def test_an_output_folder_that_holds_the_course_notebooks_is_refused(tmp_path, monkeypatch, capsys):
    course = tmp_path.resolve() / "course"
    (course / "notebooks").mkdir(parents=True)
    stand_in_notebooks(course / "notebooks", {"01_baseline.ipynb": ["x = 1"]})
    monkeypatch.setattr(runner, "NOTEBOOKS_DIR", course / "notebooks")
    monkeypatch.chdir(course)
    before = files_of(course)
    for out in (".", str(course), "notebooks", str(course / "notebooks" / "run")):
        assert cli.main(["run", "--model", "tiny", "--out", out, "--only", "01", "--no-progress"]) == 2, out
        assert "among the course's own" in one_line(capsys.readouterr().err)
    assert files_of(course) == before


def test_the_course_folder_itself_is_refused_as_output(monkeypatch, capsys):
    monkeypatch.setattr(papermill, "execute_notebook", lambda *args, **kwargs: pytest.fail("a notebook ran"))
    assert cli.main(["run", "--model", "tiny", "--out", str(ROOT), "--only", "01", "--no-progress"]) == 2
    assert str(ROOT / "notebooks") in one_line(capsys.readouterr().err)


def test_an_output_path_that_is_a_file_is_one_sentence(tmp_path, capsys):
    mine = tmp_path / "notes.txt"
    mine.write_text("mine")
    assert cli.main(["run", "--model", "tiny", "--out", str(mine), "--only", "01"]) == 2
    assert "is a file" in one_line(capsys.readouterr().err)
    assert cli.main(["run", "--model", "tiny", "--out", str(mine / "run"), "--only", "01"]) == 1
    assert "Not a directory" in one_line(capsys.readouterr().err)
    assert mine.read_text() == "mine"


@pytest.mark.parametrize("code, advice", [(errno.EACCES, "choose a folder you can write"),
                                          (errno.EROFS, "choose a folder you can write"),
                                          (errno.ENOSPC, "free some space")])
def test_an_output_folder_that_cant_be_written_is_one_sentence(tmp_path, failing_writes, capsys, code, advice):
    out = tmp_path / "out"
    out.mkdir()
    failing_writes(out, code)
    assert cli.main(["run", "--model", "tiny", "--out", str(out), "--only", "01", "--no-progress"]) == 1
    line = one_line(capsys.readouterr().err)
    assert str(out) in line and os.strerror(code) in line and advice in line


def test_a_full_disk_leaves_no_empty_notebook_and_every_result_as_it_was(tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"
    append_record(out, workshop_records()[0])
    before = (out / RESULTS_FILE).read_bytes()

    def full_disk(handler, text, path):
        open(path, "w").close()  # as on a full disk: the file is emptied, then writing fails
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(papermill.iorw.LocalHandler, "write", full_disk)
    assert cli.main(["run", "--model", "tiny", "--out", str(out), "--only", "01", "--no-progress"]) == 1
    line = one_line(capsys.readouterr().err)
    assert "01_baseline.ipynb (No space left on device): free some space" in line
    assert not list((out / "notebooks").iterdir())
    assert (out / RESULTS_FILE).read_bytes() == before


def test_a_full_disk_while_a_step_is_saved_leaves_nothing_half_written(tmp_path, monkeypatch):
    record_step("01", MEASUREMENT, tiny_params(tmp_path), dtype="float32", image=image_of(0))
    before = (tmp_path / RESULTS_FILE).read_bytes()

    def full_disk(fd):  # where a full disk often shows: the data written so far can't be stored
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", full_disk)
    with pytest.raises(OutputError) as error:
        record_step("02", MEASUREMENT, tiny_params(tmp_path), dtype="bfloat16", image=image_of(0))
    assert "No space left on device" in one_line(str(error.value)) and "free some space" in str(error.value)
    assert sorted(path.name for path in (tmp_path / "images").iterdir()) == ["01.png"]
    assert (tmp_path / RESULTS_FILE).read_bytes() == before
    assert not list(tmp_path.rglob("*.tmp"))


def test_a_results_folder_that_can_only_be_read_is_still_charted(tmp_path, failing_writes, monkeypatch, capsys):
    results = tmp_path / "results-ana"
    for record in workshop_records():
        append_record(results, record)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    before = files_of(results)
    failing_writes(results, errno.EROFS)
    assert cli.main(["chart", str(results)]) == 0
    said = capsys.readouterr().out
    assert f"{results} can only be read, so the chart went to the current folder." in said
    assert (elsewhere / "results-ana-latency_per_step.png").stat().st_size > 10_000
    assert files_of(results) == before


def test_an_inductor_cache_that_cant_be_written_is_one_line_not_a_traceback(tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(blocker / "cache")}
    imported = subprocess.run([sys.executable, "-c", "import helpers; print('imported')"], cwd=ROOT, env=env,
                              capture_output=True, text=True)
    assert imported.returncode == 0 and "Traceback" not in imported.stderr, imported.stderr
    warning, done = imported.stdout.strip().splitlines()
    assert str(blocker / "cache") in warning and "set TORCHINDUCTOR_CACHE_DIR to a folder you can write" in warning
    assert done == "imported"
    out = tmp_path / "out"
    assert cli.main(["run", "--model", "tiny", "--out", str(out), "--inductor-cache", str(blocker / "cache")]) == 1
    assert f"Can't write {blocker / 'cache'} (Not a directory)" in one_line(capsys.readouterr().err)


def hand_merged_faults():
    """(a record as a hand-merge might leave it, the words its skip line must hold)."""
    base = workshop_records()[1]
    faults = []
    for name in ("device", "model", "step", "params", "width"):
        faults.append(({k: v for k, v in base.items() if k != name}, f"{name} is null" if name != "step" else
                       "step null is not one of the course's steps"))
    faults += [
        ({**base, "median_s": 0}, "median_s is 0, not a positive number"),
        ({**base, "median_s": "2.91"}, 'median_s is "2.91", not a positive number'),
        ({**base, "first_call_s": 0}, "first_call_s is 0, not a positive number"),
        ({**base, "params": None}, "params is null, not a JSON object"),
        ({**base, "step": "08"}, 'step "08" is not one of the course\'s steps'),
        ({**base, "quality": {"ssim": "high"}}, "quality is"),
        (42, "it is 42, not a JSON object"),
    ]
    return faults


def test_hand_merged_records_are_checked_one_by_one_and_the_rest_is_charted(tmp_path, capsys):
    good, faults = workshop_records(), hand_merged_faults()
    (tmp_path / RESULTS_FILE).write_text(json.dumps(good[:2] + [record for record, _ in faults] + good[2:]))
    assert cli.main(["chart", str(tmp_path)]) == 0
    lines = capsys.readouterr().out.splitlines()
    skipped = [line for line in lines if line.startswith("Skipped record")]
    assert len(skipped) == len(faults), lines
    for number, (line, (_, words)) in enumerate(zip(skipped, faults), start=3):
        assert line.startswith(f"Skipped record {number}") and str(tmp_path / RESULTS_FILE) in line, line
        assert words in line, line
    assert (tmp_path / "latency_per_step.png").stat().st_size > 10_000
    assert [r["step"] for r in load_records(tmp_path, quiet=True)] == [r["step"] for r in good]


def test_a_results_file_cut_off_mid_write_is_kept_and_its_complete_records_charted(tmp_path, capsys):
    text = json.dumps(workshop_records(), indent=1)
    cut = text[: text.index('"step": "05"') + 5]  # in the middle of the fifth record
    (tmp_path / RESULTS_FILE).write_text(cut)
    assert cli.main(["chart", str(tmp_path)]) == 0
    said = capsys.readouterr().out
    assert "is cut off or damaged after 4 complete record(s): using those, and leaving the file as it is" in said
    assert (tmp_path / RESULTS_FILE).read_text() == cut
    assert sorted(path.name for path in tmp_path.iterdir()) == ["latency_per_step.png", RESULTS_FILE]


def start_stand_in_run(started, tmp_path, run_folder, first_cell):
    notebooks = tmp_path / "stand-ins"
    notebooks.mkdir()
    stand_in_notebooks(notebooks, {"01_baseline.ipynb": [first_cell], "02_bfloat16.ipynb": ["x = 2"]})
    out = tmp_path / "out"
    started.append(subprocess.Popen(
        [sys.executable, "-c", STAND_IN_RUNNER, str(notebooks), "run", "--model", "tiny", "--out", str(out),
         "--only", "01,02", "--no-progress"],
        cwd=ROOT, env={**os.environ, "TMPDIR": str(run_folder)}, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True, start_new_session=True,  # a group of its own, as a terminal gives a command
    ))
    return started[-1], out


BUSY_RUNS = ("SIGINT", "SIGTERM", "kill")


@pytest.fixture(scope="module")
def busy_runs(tmp_path_factory):
    """{name: (runner process, its --out folder, its TMPDIR)} for BUSY_RUNS: one run each, whose stand-in notebook
    01 works for longer than any test waits, for the tests that stop one by Ctrl-C, SIGTERM or SIGKILL. They start
    together, so that their interpreters, most of what these tests wait for, start on both cores at once; each has
    folders of its own, short ones for TMPDIR (socket paths must stay short)."""
    processes, runs = [], {}
    try:
        for name in BUSY_RUNS:
            run_folder = Path(tempfile.mkdtemp(prefix="sf-"))
            runs[name] = (*start_stand_in_run(processes, tmp_path_factory.mktemp(name), run_folder, BUSY_CELL),
                          run_folder)
        yield runs
    finally:
        for process, out, run_folder in runs.values():
            if process.poll() is None:  # a test failed before it stopped its run, or did not run
                process.kill()
                process.communicate()
            said = (out / "kernel.pid").read_text().strip() if (out / "kernel.pid").exists() else ""
            if said and is_alive(int(said)):  # orphaned, it would end by itself within seconds
                os.kill(int(said), signal.SIGKILL)
            shutil.rmtree(run_folder, ignore_errors=True)


def kernel_started(out, process, seconds=180):
    """The pid of the kernel running the busy stand-in, once it has started."""
    deadline = time.monotonic() + seconds
    while not (out / "kernel.pid").exists():
        assert process.poll() is None and time.monotonic() < deadline, process.communicate()
        time.sleep(0.2)
    time.sleep(0.5)  # the pid is written before the file is closed
    return int((out / "kernel.pid").read_text())


def is_alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.mark.slow
@pytest.mark.parametrize("signal_name, how, code", [("SIGINT", "Ctrl-C", 130), ("SIGTERM", "SIGTERM", 143)])
def test_an_interrupted_run_says_one_line_and_leaves_nothing(busy_runs, signal_name, how, code):
    process, out, run_folder = busy_runs[signal_name]
    kernel = kernel_started(out, process)
    if signal_name == "SIGINT":
        os.killpg(process.pid, signal.SIGINT)  # what Ctrl-C in a terminal does: the whole foreground group gets it
    else:
        process.terminate()
    printed, complaint = process.communicate(timeout=120)
    assert process.returncode == code, complaint
    line = one_line(complaint)
    assert line.startswith(f"Stopped 01_baseline.ipynb ({how}): what this run recorded stays in {out / RESULTS_FILE}")
    assert line.endswith("notebooks/01_baseline.ipynb shows how far it got.")
    assert "Traceback" not in printed
    assert nbformat.read(out / "notebooks" / "01_baseline.ipynb", as_version=4).cells
    assert not list(run_folder.iterdir())  # no Inductor cache, no kernel connection file or socket
    assert not is_alive(kernel)


@pytest.mark.slow
def test_what_a_killed_run_leaves_the_next_run_removes(busy_runs, tmp_path, monkeypatch):
    process, out, run_folder = busy_runs["kill"]
    kernel = kernel_started(out, process)
    process.kill()
    process.communicate()
    try:
        left = [path.name for path in run_folder.iterdir()]
    finally:
        if is_alive(kernel):  # orphaned, it would end by itself within seconds
            os.kill(kernel, signal.SIGKILL)
    assert len(left) == 1 and left[0].startswith(RUN_FOLDER_PREFIX)
    quick = tmp_path / "quick"
    quick.mkdir()
    # The quickest run there is: a notebook whose kernel imports nothing, an appendix, which draws no chart.
    stand_in_notebooks(quick, {"08_cold_start.ipynb": ["x = 1"]})
    monkeypatch.setattr(runner, "NOTEBOOKS_DIR", quick)
    monkeypatch.setattr(tempfile, "tempdir", str(run_folder))
    assert cli.main(["run", "--model", "tiny", "--out", str(out), "--only", "08", "--no-progress"]) == 0
    assert (out / "notebooks" / "08_cold_start.ipynb").exists()  # it ran its notebook
    assert not list(run_folder.iterdir())


def test_a_folder_without_safetensors_weights_is_not_blamed_on_the_connection(tmp_path):
    pipe = load_pipeline("tiny", verbose=False)
    pickled, partial = tmp_path / "pickled", tmp_path / "partial"
    pipe.save_pretrained(pickled, safe_serialization=False)  # the UNet and VAE as .bin files only
    with pytest.raises(ModelUnavailable) as error:
        check_model(str(pickled))
    assert "no .safetensors weights in unet, vae" in one_line(str(error.value))
    pipe.save_pretrained(partial)
    shutil.rmtree(partial / "unet")
    with pytest.raises(ModelUnavailable) as error:
        load_pipeline(str(partial), verbose=False)
    message = one_line(str(error.value))
    assert "connection" not in message and "holds the whole pipeline" in message
