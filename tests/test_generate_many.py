"""scripts/generate_many.py (prompts spread over processes): two CPU processes over gloo, the tiny model."""

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from conftest import ROOT, load_script

SCRIPT_ARGS = ["--model", "tiny", "--height", "64", "--width", "64", "--steps", "1", "--no-compile"]
PROMPTS = ["a red fox", "a blue whale", "an owl at night", "a green frog", "a yellow cab", "a paper boat", "a kite"]
HOST = socket.gethostname()
pytestmark = pytest.mark.several_processes  # most of them: two processes of the script at once


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(launcher, args, out, env=None, stdout=subprocess.PIPE, stderr=subprocess.PIPE):
    """scripts/generate_many.py in two CPU processes over gloo, by torchrun or accelerate launch: the running launcher
    (a Popen). `--log_dir /dev/null`: torchrun makes no torchelastic_* folder in /tmp."""
    bin_dir = Path(sys.executable).parent
    if launcher == "torchrun":
        command = [bin_dir / "torchrun", "--standalone", "--nproc_per_node", "2"]
    else:
        command = [bin_dir / "accelerate", "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
                   "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(free_port())]
    command = [*map(str, command), "--log_dir", os.devnull, "scripts/generate_many.py", *SCRIPT_ARGS, *args,
               "--out", str(out)]
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", **(env or {})}  # the CPU form, also on a GPU machine
    return subprocess.Popen(command, stdout=stdout, stderr=stderr, text=True, cwd=ROOT, env=env)


class Job:
    """A job launched in the background, its output going to two files beside its --out folder."""

    def __init__(self, launcher, prompts, out, args=(), env=None):
        self.out, self.logs = out, [out.parent / f"{out.name}.{stream}" for stream in ("stdout", "stderr")]
        prompts_file = out.parent / f"{out.name}-prompts.txt"
        prompts_file.write_text("\n".join(prompts) + "\n\n")
        with open(self.logs[0], "w") as stdout, open(self.logs[1], "w") as stderr:
            self.process = launch(launcher, ["--prompts", str(prompts_file), *args], out, env, stdout, stderr)

    def result(self):
        """The finished launcher's exit status and output (a CompletedProcess)."""
        self.process.wait(timeout=240)
        stdout, stderr = (log.read_text() for log in self.logs)
        return subprocess.CompletedProcess(self.process.args, self.process.returncode, stdout, stderr)


def output(proc):
    return proc.stdout[-3000:] + proc.stderr[-3000:]


def part_lines(out):
    return {path.name: [json.loads(line) for line in path.read_text().splitlines()]
            for path in sorted((out / "parts").glob("*.jsonl"))}


@pytest.fixture(scope="module")
def script():
    """The script as a module, to call its main() in this process."""
    return load_script("generate_many")


@pytest.mark.slow
def test_a_killed_process_costs_only_its_unfinished_images(tmp_path, script, capsys):
    out, args = tmp_path / "many", ["--prompt", "a red fox", "--copies", "10"]
    running = launch("torchrun", args, out)
    try:
        parts = [out / "parts" / f"rank-{rank}.jsonl" for rank in (0, 1)]
        while not all(part.is_file() and part.read_text().count("\n") >= 1 for part in parts):  # each rank made one
            assert running.poll() is None, running.communicate()
            time.sleep(0.05)
        rank_1 = [p for p in psutil.Process(running.pid).children(recursive=True) if p.environ().get("RANK") == "1"]
        rank_1[0].kill()  # SIGKILL: no handler runs; torchrun then stops rank 0
        running.communicate(timeout=120)
    finally:
        running.kill()
    assert running.returncode != 0 and not (out / "results.json").exists()
    kept = [r for records in part_lines(out).values() for r in records]
    assert {r["rank"] for r in kept} == {0, 1} and all((out / r["image"]).is_file() for r in kept)

    assert script.main(["--merge", "--out", str(out)]) == 0
    assert f"Added {len(kept)} record(s)" in capsys.readouterr().out
    merged = json.loads((out / "results.json").read_text())
    assert sorted(r["prompt_index"] for r in merged) == sorted(r["prompt_index"] for r in kept)

    # The same job again, in one process (the split over two is the job fixture's): it makes only what is missing.
    proc = subprocess.run([sys.executable, "scripts/generate_many.py", *SCRIPT_ARGS, *args, "--out", str(out)],
                          capture_output=True, text=True, cwd=ROOT, timeout=240,
                          env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    assert proc.returncode == 0, output(proc)
    assert f"Skipped {len(kept)} of 10 images" in proc.stdout
    assert f"{10 - len(kept)} of {10 - len(kept)} images made by 1 process(es)" in proc.stdout
    records = json.loads((out / "results.json").read_text())
    assert sorted(r["prompt_index"] for r in records) == list(range(10))


@pytest.fixture(scope="module")
def jobs(tmp_path_factory):
    """The three jobs of the tests below, started at once: six processes, which keep both cores busy also once the
    notebook series has ended (a job alone leaves one idle while its main process loads first). {name: Job}."""
    folder = tmp_path_factory.mktemp("jobs")
    fail = {"GENERATE_MANY_FAIL_ON": "BOOM"}
    started = {
        # seven prompts, two per call, with --timeout 5
        "done": Job("torchrun", PROMPTS, folder / "many", ["--batch-size", "2", "--timeout", "5"]),
        # rank 1 fails at its second prompt, after making one image
        "fails": Job("accelerate", PROMPTS[:4] + ["BOOM goes rank 1"] + PROMPTS[4:5], folder / "fails", env=fail),
        # rank 1's share starts with the failing prompt: its warm-up, the end of its loading, raises
        "fails to load": Job("torchrun", PROMPTS[:3] + ["BOOM at rank 1's warm-up"] + PROMPTS[3:5],
                             folder / "fails-to-load", env=fail),
    }
    yield started
    for job in started.values():
        if job.process.poll() is None:  # a test failed first
            job.process.kill()
            job.process.wait()


@pytest.fixture(scope="module")
def job(jobs):
    """Seven prompts, two per call, by torchrun, with --timeout 5: (the folder, the finished process)."""
    proc = jobs["done"].result()
    assert proc.returncode == 0, output(proc)
    return jobs["done"].out, proc


@pytest.mark.slow
def test_two_processes_make_every_prompt_exactly_once(job):
    out, proc = job
    records = json.loads((out / "results.json").read_text())
    assert sorted(r["prompt_index"] for r in records) == list(range(len(PROMPTS)))
    assert all(r["prompt"] == PROMPTS[r["prompt_index"]] and r["seed"] == r["prompt_index"] for r in records)
    ranks = {r["prompt_index"]: r["rank"] for r in records}
    assert ranks == {0: 0, 1: 0, 2: 0, 3: 0, 4: 1, 5: 1, 6: 1}  # split_between_processes: 4 and 3
    assert sorted(p.name for p in (out / "images").iterdir()) == [f"{i:05d}.png" for i in range(len(PROMPTS))]
    assert all((out / r["image"]).is_file() for r in records)
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["images"], summary["processes"], summary["failures"]) == (7, 2, [])
    assert summary["images_per_s"] > 0 and summary["images_per_s_generating"] > summary["images_per_s"]
    assert "7 of 7 images made by 2 process(es)" in proc.stdout


def test_the_timeout_reaches_the_process_group(job):
    # The main process reads it back from the process group's backend, not from --timeout.
    assert "7 images to make over 2 process(es); each waits up to 5:00:00 for the others" in job[1].stdout


def test_the_main_process_loads_and_warms_up_before_the_others(job):
    rank_0, rank_1 = json.loads((job[0] / "summary.json").read_text())["ranks"]
    assert rank_0["load_started"] < rank_0["loaded"] <= rank_1["load_started"] < rank_1["loaded"]


def test_each_process_keeps_its_records_as_it_makes_them(job):
    out = job[0]
    parts = part_lines(out)
    assert sorted(parts) == ["rank-0.jsonl", "rank-1.jsonl"]
    assert [r["prompt_index"] for r in parts["rank-0.jsonl"]] == [0, 1, 2, 3]
    assert [r["prompt_index"] for r in parts["rank-1.jsonl"]] == [4, 5, 6]
    assert sorted(r["image"] for r in json.loads((out / "results.json").read_text())) == sorted(
        r["image"] for records in parts.values() for r in records)


@pytest.mark.slow
def test_a_failing_process_is_named_and_the_job_fails(jobs):
    out, proc = jobs["fails"].out, jobs["fails"].result()
    assert proc.returncode != 0
    line = f"rank 1 on {HOST} failed: RuntimeError: a prompt holds 'BOOM'"
    assert line in proc.stderr, output(proc)
    # Rank 0 made its three, rank 1 the one before the failing prompt: nothing made is lost.
    records = json.loads((out / "results.json").read_text())
    assert sorted((r["prompt_index"], r["rank"]) for r in records) == [(0, 0), (1, 0), (2, 0), (3, 1)]
    summary = json.loads((out / "summary.json").read_text())
    assert len(summary["failures"]) == 1 and summary["failures"][0].startswith("rank 1 on ")


@pytest.mark.slow
def test_a_process_that_fails_to_load_is_named_and_none_generates(jobs):
    out, proc = jobs["fails to load"].out, jobs["fails to load"].result()
    assert proc.returncode != 0
    line = f"rank 1 on {HOST} failed: RuntimeError: a prompt holds 'BOOM'"
    assert proc.stderr.count(line) == 1, output(proc)
    assert "0 of 6 images made by 2 process(es)" in proc.stdout, output(proc)
    assert not (out / "images").exists() and not (out / "parts").exists()
    summary = json.loads((out / "summary.json").read_text())
    assert [rank["images"] for rank in summary["ranks"]] == [0, 0] and len(summary["failures"]) == 1


def refused(script, monkeypatch, capsys, argv):
    """main(argv)'s exit status and what it wrote to stderr; the job itself must not start."""
    monkeypatch.setattr(script, "run", lambda *args: pytest.fail("the job started"))
    status = script.main([*SCRIPT_ARGS, *argv])
    return status, capsys.readouterr().err


def test_a_prompts_file_without_prompts_is_refused_in_one_sentence(tmp_path, script, monkeypatch, capsys):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n")
    status, err = refused(script, monkeypatch, capsys, ["--prompts", str(empty), "--out", str(tmp_path)])
    assert status == 2 and err.count("\n") == 1 and "one prompt per line" in err
    assert not (tmp_path / "results.json").exists()


@pytest.mark.parametrize("case, says", [
    ("out is a file", "is a file: give a folder"),
    ("out is under a file", "a file stands where a folder is needed: choose another folder"),
    ("out is read-only", "choose a folder you can write"),
    ("prompts are not UTF-8", "is not UTF-8 text: save it as UTF-8"),
    ("prompts are missing", "is not a file: give --prompts a text file"),
    ("prompts are a folder", "is not a file: give --prompts a text file"),
])
def test_bad_input_is_refused_in_one_sentence_before_anything_loads(tmp_path, script, monkeypatch, capsys, case,
                                                                     says):
    prompts, out = tmp_path / "prompts.txt", tmp_path / "many"
    prompts.write_text("a red fox\n")
    if case == "out is a file":
        out.write_text("not a folder")
    elif case == "out is under a file":
        (tmp_path / "file").write_text("")
        out = tmp_path / "file" / "many"
    elif case == "out is read-only":
        out = Path("/sys/generate-many")  # sysfs: no one may make a folder there, root included
    elif case == "prompts are not UTF-8":
        prompts.write_bytes("un café\n".encode("latin-1"))
    elif case == "prompts are missing":
        prompts.unlink()
    elif case == "prompts are a folder":
        prompts.unlink()
        prompts.mkdir()
    status, err = refused(script, monkeypatch, capsys, ["--prompts", str(prompts), "--out", str(out)])
    assert status == 2 and err.count("\n") == 1 and says in err, err
    assert "Traceback" not in err and not list(tmp_path.glob("**/results.json"))
