import json
import multiprocessing
import subprocess
import sys

import pytest
from conftest import ROOT

from helpers.files import OutputError, new_file
from helpers.machine import device_name
from helpers.params import Params
from helpers.results import RESULTS_FILE, append_record, latest_records, load_records, make_record
from helpers.sources import native_size, resolve_model
from helpers.timing import Measurement


def measured(step, out_dir, median=1.0, **params):
    measurement = Measurement(samples_s=[median * 0.9, median, median * 1.1], first_call_s=median * 3, warmup=1)
    return make_record(step, measurement, Params(model="tiny", out_dir=str(out_dir), **params), dtype="bfloat16")


def test_record_carries_numbers_device_versions_and_what_ran(tmp_path):
    record = measured("04", tmp_path, median=2.0)
    assert record["median_s"] == 2.0 and record["samples_s"] == [1.8, 2.0, 2.2] and record["first_call_s"] == 6.0
    assert record["iqr_s"] == pytest.approx(0.2)
    assert record["device"] == device_name() and record["versions"]["torch"] and record["versions"]["diffusers"]
    assert set(record["precision"].values()) <= {"ieee", "tf32", "none"}
    # The model and size that actually ran, not only the parameters as given.
    assert (record["model"], record["height"], record["width"]) == ("tiny", 128, 128)
    auto = make_record("01", None, Params(model="auto", width=96), dtype="float32", status="skipped")
    chosen = resolve_model("auto", verbose=False)  # tiny here, the real SDXL on a GPU
    assert (auto["model"], auto["height"], auto["width"]) == (chosen, native_size(chosen), 96)


def test_a_record_of_a_status_the_reader_would_skip_is_refused_when_made():
    with pytest.raises(ValueError, match="status must be one of ok, out_of_memory, .* got 'out of memory'"):
        make_record("07", None, Params(model="tiny"), dtype="bfloat16", status="out of memory")


def test_append_keeps_every_record(tmp_path):
    for step in ("01", "02", "01"):
        append_record(tmp_path, measured(step, tmp_path))
    records = load_records(tmp_path)
    assert [r["step"] for r in records] == ["01", "02", "01"]
    assert [r["step"] for r in latest_records(records)] == ["01", "02"]
    assert latest_records(records)[0] is records[2]


def test_images_and_notebooks_never_take_a_name_another_run_took(tmp_path):
    made = [new_file(tmp_path, "01_baseline", ".ipynb") for _ in range(3)]
    assert [path.name for path in made] == ["01_baseline.ipynb", "01_baseline-2.ipynb", "01_baseline-3.ipynb"]


def _write_many(out_dir, worker):
    for i in range(15):
        append_record(out_dir, {"step": "01", "worker": worker, "i": i, "device": "x", "model": "tiny"})


def test_two_runs_writing_one_folder_lose_nothing(tmp_path):
    processes = [multiprocessing.Process(target=_write_many, args=(tmp_path, w)) for w in range(3)]
    for p in processes:
        p.start()
    for p in processes:
        p.join()
    records = json.loads((tmp_path / RESULTS_FILE).read_text())
    assert sorted((r["worker"], r["i"]) for r in records) == [(w, i) for w in range(3) for i in range(15)]


def test_a_cut_off_results_file_is_copied_aside_before_it_is_rewritten(tmp_path, capsys):
    whole = json.dumps([measured("01", tmp_path)], indent=1)
    cut = whole[:-2] + ',\n {"step": "02", "median_s": 1.'  # a second record cut off mid-write by a crash
    (tmp_path / RESULTS_FILE).write_text(cut)
    assert [r["step"] for r in load_records(tmp_path)] == ["01"]  # reading leaves the file alone
    assert (tmp_path / RESULTS_FILE).read_text() == cut
    append_record(tmp_path, measured("03", tmp_path))
    (aside,) = tmp_path.glob(RESULTS_FILE + ".corrupt-*")
    assert aside.read_text() == cut
    assert [r["step"] for r in load_records(tmp_path)] == ["01", "03"]
    said = capsys.readouterr().out
    assert "cut off or damaged after 1 complete record(s): using those, and leaving the file as it is" in said
    assert f"cut off or damaged after 1 complete record(s); kept it as {aside.name}" in said


def test_a_results_file_that_is_not_a_list_is_kept_too(tmp_path, capsys):
    (tmp_path / RESULTS_FILE).write_text('{"records": "mine"}')
    assert load_records(tmp_path) == []
    append_record(tmp_path, measured("01", tmp_path))
    (aside,) = tmp_path.glob(RESULTS_FILE + ".corrupt-*")
    assert aside.read_text() == '{"records": "mine"}'
    assert "is not a JSON list of records" in capsys.readouterr().out


def test_appending_keeps_records_the_chart_would_skip(tmp_path, capsys):
    append_record(tmp_path, {"step": "08", "note": "a workshop's own"})
    append_record(tmp_path, measured("01", tmp_path))
    assert [r["step"] for r in json.loads((tmp_path / RESULTS_FILE).read_text())] == ["08", "01"]
    assert [r["step"] for r in load_records(tmp_path)] == ["01"]
    assert "Skipped record 1 (step 08)" in capsys.readouterr().out


def test_failed_write_leaves_the_old_file_whole(tmp_path, monkeypatch):
    append_record(tmp_path, measured("01", tmp_path))
    before = (tmp_path / RESULTS_FILE).read_text()
    monkeypatch.setattr(json, "dumps", lambda *a, **k: (_ for _ in ()).throw(OSError(28, "No space left on device")))
    with pytest.raises(OutputError, match="No space left on device"):
        append_record(tmp_path, measured("02", tmp_path))
    assert (tmp_path / RESULTS_FILE).read_text() == before
    assert not list(tmp_path.glob("*.tmp"))


def test_results_stay_readable_by_others(tmp_path):
    import os
    import stat

    old = os.umask(0o022)
    try:
        append_record(tmp_path, measured("01", tmp_path))
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / RESULTS_FILE).stat().st_mode) == 0o644


@pytest.mark.slow
def test_a_record_is_made_after_the_new_tf32_api_set_the_flags():
    # In a process of its own: once the new API has set a flag, torch raises when the old one reads it.
    code = (
        "import torch; from helpers.params import Params; from helpers.results import make_record\n"
        "torch.backends.cuda.matmul.fp32_precision = 'tf32'; torch.backends.cudnn.conv.fp32_precision = 'ieee'\n"
        "print(make_record('01', None, Params(model='tiny'), dtype='float32', status='skipped')['precision'])"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == str({"matmul_fp32_precision": "tf32", "cudnn_conv_fp32_precision": "ieee"})
