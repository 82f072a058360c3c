"""scripts/generate_many.py (prompts spread over processes): two CPU processes over gloo, the tiny model."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

from conftest import ROOT

SCRIPT_ARGS = ["--model", "tiny", "--height", "64", "--width", "64", "--steps", "2", "--no-compile"]
PROMPTS = ["a red fox", "a blue whale", "an owl at night", "a green frog", "a yellow cab", "a paper boat", "a kite"]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(launcher, args, out, env=None):
    """scripts/generate_many.py in two CPU processes over gloo, by torchrun or accelerate launch."""
    bin_dir = Path(sys.executable).parent
    if launcher == "torchrun":
        command = [bin_dir / "torchrun", "--standalone", "--nproc_per_node", "2"]
    else:
        command = [bin_dir / "accelerate", "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
                   "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(free_port())]
    return subprocess.run(
        [*map(str, command), "scripts/generate_many.py", *SCRIPT_ARGS, *args, "--out", str(out)],
        capture_output=True, text=True, cwd=ROOT, timeout=240,
        env={**os.environ, "CUDA_VISIBLE_DEVICES": "", **(env or {})},  # the CPU form, also on a GPU machine
    )


def test_two_processes_make_every_prompt_exactly_once(tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n\n")
    out = tmp_path / "many"
    proc = launch("torchrun", ["--prompts", str(prompts), "--batch-size", "2"], out)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
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


def test_a_failing_process_is_named_and_the_job_fails(tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS[:4] + ["BOOM goes rank 1"] + PROMPTS[4:5]) + "\n")
    out = tmp_path / "many"
    proc = launch("accelerate", ["--prompts", str(prompts)], out, env={"GENERATE_MANY_FAIL_ON": "BOOM"})
    assert proc.returncode != 0
    line = f"rank 1 on {socket.gethostname()} failed: RuntimeError: a prompt holds 'BOOM'"
    assert line in proc.stderr, proc.stdout[-3000:] + proc.stderr[-3000:]
    # Rank 0 made its three, rank 1 the one before the failing prompt: nothing made is lost.
    records = json.loads((out / "results.json").read_text())
    assert sorted((r["prompt_index"], r["rank"]) for r in records) == [(0, 0), (1, 0), (2, 0), (3, 1)]
    summary = json.loads((out / "summary.json").read_text())
    assert len(summary["failures"]) == 1 and summary["failures"][0].startswith("rank 1 on ")


def test_a_prompts_file_without_prompts_is_refused_in_one_sentence(tmp_path):
    (tmp_path / "empty.txt").write_text("\n  \n")
    proc = subprocess.run(
        [sys.executable, "scripts/generate_many.py", "--prompts", str(tmp_path / "empty.txt"), "--out", str(tmp_path)],
        capture_output=True, text=True, cwd=ROOT,
    )
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "one prompt per line" in proc.stderr
    assert not (tmp_path / "results.json").exists()

