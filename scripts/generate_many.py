"""Make many images: a list of prompts spread over every process that `accelerate launch` or `torchrun` starts.

Each process builds its own pipeline on its own device (one process per GPU, `PartialState().device`), takes its
share of the prompts (`PartialState().split_between_processes`) and saves image i as `<out>/images/<i>.png` (or
`<i>-2.png` where an earlier job took the name: no image is written over), made with seed SEED + i, so it is the
same image whichever process makes it. The main process gathers every process's records (`gather_object`) into
`<out>/results.json`, one per image, and writes the job's images per second to `<out>/summary.json`: from the first
process's start, and from the moment every pipeline was loaded and warmed up, to the last process's finish (after
`wait_for_everyone`).

From the project's root, with `helpers` installed (`pip install -e .`). One machine, all its GPUs (8 here):
    accelerate launch --num_processes 8 scripts/generate_many.py --prompts prompts.txt --out many
Two machines with 8 GPUs each: the same command on both, --machine_rank 0 on the machine whose address is
--main_process_ip and 1 on the other; --num_processes counts the processes of all machines:
    accelerate launch --num_machines 2 --machine_rank 0 --num_processes 16 --main_process_ip 10.0.0.1 \
        --main_process_port 29500 scripts/generate_many.py --prompts prompts.txt --out many
The same with torchrun, whose --nproc_per_node counts one machine's processes:
    torchrun --nproc_per_node 8 scripts/generate_many.py --prompts prompts.txt --out many
    torchrun --nnodes 2 --node_rank 0 --nproc_per_node 8 --master_addr 10.0.0.1 --master_port 29500 \
        scripts/generate_many.py --prompts prompts.txt --out many
On a CPU, two processes talking over gloo on the loopback, with the tiny model (a minute or two):
    torchrun --standalone --nproc_per_node 2 scripts/generate_many.py --model tiny --height 64 --width 64 \
        --steps 2 --prompt "a red fox" --copies 8 --no-compile --out /tmp/many
or `accelerate launch --multi_gpu --num_processes 2 --main_process_port 29511 scripts/generate_many.py ...`
(`--multi_gpu` starts the processes on CPUs too; `accelerate launch --cpu --num_processes 2` starts one process
unless MPI is set up).

With several machines, the results file is complete wherever --out is (records travel to the main process), and
each image lies on the machine that made it (its record names the host) unless --out is a shared folder.

A process that fails (loading, compiling or generating) is named in one line, `rank R on HOST failed: Error: message`,
once the others have finished their share, and the job exits 1; the images it made before failing are kept.
For tests: with GENERATE_MANY_FAIL_ON=TEXT in the environment, a process raises when it reaches a prompt holding TEXT.
"""

import argparse
import json
import os
import socket
import sys
import time
from pathlib import Path

import psutil
import torch
from accelerate import PartialState
from accelerate.utils import gather_object

from helpers.ladder import build
from helpers.params import COMPILE_MODES, Params
from helpers.results import append_record, device_name, make_record, package_versions, write_atomically, write_new
from helpers.steps import get_step
from helpers.throughput import generate_batch

FAIL_ON = "GENERATE_MANY_FAIL_ON"


def parse_args(argv=None):
    defaults = Params()
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--prompts", metavar="FILE", help="a text file, one prompt per line (blank lines skipped)")
    source.add_argument("--prompt", default=defaults.prompt, help="one prompt (default: the course's)")
    parser.add_argument("--copies", type=int, default=1, help="repeat the prompt list this many times (default 1)")
    parser.add_argument("--model", default=defaults.model, help="auto, tiny, sdxl-random, a hub id or a local folder")
    parser.add_argument("--negative-prompt", default=defaults.negative_prompt)
    parser.add_argument("--steps", type=int, default=defaults.steps)
    parser.add_argument("--height", type=int, default=None, help="pixels (default: the model's native size)")
    parser.add_argument("--width", type=int, default=None)
    parser.add_argument("--guidance", type=float, default=defaults.guidance)
    parser.add_argument("--seed", type=int, default=defaults.seed, help="image i gets seed SEED + i (default 0)")
    parser.add_argument("--batch-size", type=int, default=1, help="prompts per pipeline call (default 1)")
    parser.add_argument("--through", default="07", help="the last step of the ladder to apply (default 07)")
    parser.add_argument("--no-compile", action="store_true", help="leave the step's compilation out")
    parser.add_argument("--compile-mode", default=defaults.compile_mode, choices=COMPILE_MODES)
    parser.add_argument("--warmup", type=int, default=1, help="untimed calls per process before timing (default 1)")
    parser.add_argument("--out", required=True, help="folder for images/, results.json and summary.json")
    return parser.parse_args(argv)


def read_prompts(args):
    """The job's prompts, in order; raises ValueError in one sentence where there are none."""
    if args.prompts is None:
        prompts = [args.prompt]
    else:
        path = Path(args.prompts)
        if not path.is_file():
            raise ValueError(f"{path} is not a file: give --prompts a text file with one prompt per line.")
        prompts = [line.strip() for line in path.read_text().splitlines() if line.strip()]
        if not prompts:
            raise ValueError(f"{path} holds no prompt: write one prompt per line.")
    if args.copies < 1 or args.batch_size < 1 or args.warmup < 0:
        raise ValueError("--copies and --batch-size must be 1 or more, and --warmup 0 or more.")
    return prompts * args.copies


def make_params(args, prompts):
    return Params(
        model=args.model, prompt=prompts[0], negative_prompt=args.negative_prompt, steps=args.steps,
        height=args.height, width=args.width, guidance=args.guidance, seed=args.seed, warmup=args.warmup, runs=1,
        out_dir=args.out, compile_mode=args.compile_mode,
    )


def batches(share, size):
    """`share`'s (index, prompt) pairs in calls of `size`; the last is padded with its last pair, marked None.

    A shorter last call would make a compiled pipeline compile again for the new batch size.
    """
    for start in range(0, len(share), size):
        batch = list(share[start:start + size])
        yield batch + [(None, batch[-1][1])] * (size - len(batch))


def fail_for_tests(batch):
    text = os.environ.get(FAIL_ON)
    if text and any(text in prompt for _, prompt in batch):
        raise RuntimeError(f"a prompt holds {text!r}, and {FAIL_ON} says to fail there (a test)")


class Worker:
    """One process's part of the job: its pipeline, its share of the prompts, what it made and how it failed."""

    def __init__(self, state, args, params):
        self.state, self.args, self.params = state, args, params
        self.pipe, self.records, self.error, self.generate_s = None, [], None, 0.0
        self.host = socket.gethostname()

    def guarded(self, work):
        """Run `work` unless this process failed already; keep its error to name once every process is done."""
        if self.error is not None:
            return
        try:
            work()
        except Exception as error:  # any failure: named in the summary, while the other processes go on
            self.error = f"{type(error).__name__}: {str(error).strip().splitlines()[0] if str(error).strip() else ''}"

    def load(self, share):
        self.pipe = build(self.params.model, through=self.args.through, compile=not self.args.no_compile,
                          compile_mode=self.params.compile_mode, device=self.state.device,
                          verbose=self.state.is_main_process)
        for _ in range(self.params.warmup if share else 0):
            generate_batch(self.pipe, self.params, [prompt for _, prompt in next(batches(share, self.args.batch_size))])

    def generate(self, share, width):
        for batch in batches(share, self.args.batch_size):
            fail_for_tests(batch)
            start = time.perf_counter()
            seeds = [self.params.seed + (index or 0) for index, _ in batch]  # padding's index is None
            images = generate_batch(self.pipe, self.params, [prompt for _, prompt in batch], seeds=seeds)
            seconds = time.perf_counter() - start
            self.generate_s += seconds
            kept = [(index, prompt, image) for (index, prompt), image in zip(batch, images) if index is not None]
            for index, prompt, image in kept:
                call = {"batch_size": len(batch), "call_s": seconds, "s_per_image": seconds / len(kept)}
                self.records.append(self.save(index, prompt, image, width, call))

    def save(self, index, prompt, image, width, call):
        """Save image `index` as images/<index>.png (<index>-2.png where an earlier run took it); returns its record."""
        name = f"{index:0{width}d}"
        path = write_new(Path(self.args.out) / "images", name, ".png", lambda f: image.save(f, format="PNG"))
        relative = f"images/{path.name}"
        where = {"rank": self.state.process_index, "host": self.host, "process_device": str(self.state.device),
                 "device": device_name(self.state.device)}
        return make_record(
            self.args.through, None, self.params, dtype=self.pipe.unet.dtype, image_file=relative,
            extra={"prompt_index": index, "prompt": prompt, "seed": self.params.seed + index, **where, **call},
        )

    def outcome(self, share):
        return {"rank": self.state.process_index, "host": self.host, "device": str(self.state.device),
                "started": psutil.Process().create_time(),
                "prompts": len(share), "images": len(self.records), "generate_s": self.generate_s,
                "error": self.error, "records": self.records}


def summarize(outcomes, prompts, job_s, generate_s, params):
    images = sum(o["images"] for o in outcomes)
    return {
        "prompts": len(prompts), "images": images, "processes": len(outcomes),
        "job_s": job_s, "images_per_s": images / job_s,
        "generate_s": generate_s, "images_per_s_generating": images / generate_s if generate_s else None,
        "ranks": [{k: v for k, v in o.items() if k != "records"} for o in outcomes],
        "failures": [f"rank {o['rank']} on {o['host']} failed: {o['error']}" for o in outcomes if o["error"]],
        "device": device_name(), "versions": package_versions(), "params": params.to_dict(),
    }


def report(summary):
    print(f"{summary['images']} of {summary['prompts']} images made by {summary['processes']} process(es) in "
          f"{summary['job_s']:.1f} s: {summary['images_per_s']:.2f} images/s, loading and warm-up included")
    if summary["images_per_s_generating"] is not None:
        print(f"   generating alone: {summary['generate_s']:.1f} s, {summary['images_per_s_generating']:.2f} images/s")
    for rank in summary["ranks"]:
        rate = f", {rank['images'] / rank['generate_s']:.2f} images/s" if rank["generate_s"] else ""
        print(f"   rank {rank['rank']} on {rank['host']} ({rank['device']}): {rank['images']} of {rank['prompts']} "
              f"images in {rank['generate_s']:.1f} s{rate}")
    for failure in summary["failures"]:
        print(failure, file=sys.stderr)


def run(args, prompts, params):
    """This process's part of the job; on the main process, the job's summary too. Returns the exit status."""
    # Without a GPU, gloo on the CPUs: PartialState needs cpu=True to start it under torchrun or accelerate launch.
    state = PartialState(cpu=not torch.cuda.is_available())
    worker = Worker(state, args, params)
    with state.split_between_processes(list(enumerate(prompts))) as share:
        share = list(share)
    worker.guarded(lambda: worker.load(share))
    state.wait_for_everyone()
    ready = time.perf_counter()
    worker.guarded(lambda: worker.generate(share, width=max(5, len(str(len(prompts) - 1)))))
    state.wait_for_everyone()
    finished, finished_clock = time.perf_counter(), time.time()
    outcomes = gather_object([worker.outcome(share)])
    if state.is_main_process:
        for record in (record for outcome in outcomes for record in outcome["records"]):
            append_record(args.out, record)
        # From the first process's start (as the system clock of its machine saw it) to the last one's finish.
        job_s = finished_clock - min(o["started"] for o in outcomes)
        summary = summarize(outcomes, prompts, job_s, finished - ready, params)
        write_atomically(Path(args.out) / "summary.json", lambda f: f.write(json.dumps(summary, indent=1).encode()))
        report(summary)
    failed = worker.error is not None or (state.is_main_process and any(o["error"] for o in outcomes))
    state.destroy_process_group()
    return 1 if failed else 0


def main(argv=None):
    args = parse_args(argv)
    try:
        prompts = read_prompts(args)
        params = make_params(args, prompts)
        get_step(args.through)
    except ValueError as error:
        if os.environ.get("RANK", "0") == "0":  # every process checks; one says it
            print(f"error: {error}", file=sys.stderr)
        return 2
    return run(args, prompts, params)


if __name__ == "__main__":
    sys.exit(main())
