"""Make many images: a list of prompts spread over every process that `accelerate launch` or `torchrun` starts.

Each process builds its own pipeline on its own device (one process per GPU, `PartialState().device`), takes its
share of the prompts (`PartialState().split_between_processes`) and saves image i as `<out>/images/<i>.png`, i with
at least five digits (or `<i>-2.png` where an earlier job took the name: no image is written over), made with seed
SEED + i, so it is the same image whichever process makes it. The first process of each machine loads first
(`local_main_process_first`): the others then find the model it downloaded and the kernels it compiled in that
machine's caches. Every process writes the record of each image as soon as it is saved, a line of its own file
`<out>/parts/rank-<R>.jsonl` (`rank-<R>-2.jsonl` and on for a later job), so a job one of whose processes dies (the
launcher then stops the others) loses only the images not made yet. At the end the main process gathers every
process's records (`gather_object`) into `<out>/results.json`, with those of the part files it lacks, and writes the
job's images per second to `<out>/summary.json`: from the first process's start, and from the moment every pipeline
was loaded and warmed up, to the last process's finish (after `wait_for_everyone`).

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

A job run again with the same --out skips the images that have a record there already (the same prompt at the same
index, with the same --model, --height, --width, --steps, --guidance, --negative-prompt, --seed and --through), and
says how many. After a job that was stopped, `python scripts/generate_many.py --merge --out OUT` adds the records of
its part files to results.json without making any image.

The process group waits --timeout hours (default 3) for a process at each point where all meet (while the first
process of each machine loads, while the others load, at the end) instead of torch's default (10 minutes with NCCL, 30
with gloo); the main process prints the timeout the group holds. A process that fails to load (or at its warm-up) is
named in one line, `rank R on HOST failed: Error: message`, every process stops before generating, and the job exits
1. A process that fails while
generating is named once the others have finished their share, and the job exits 1; the images it made are kept.
For tests: with GENERATE_MANY_FAIL_ON=TEXT in the environment, a process raises when it reaches a prompt holding TEXT,
at its warm-up too.
"""

import argparse
import datetime
import json
import os
import socket
import sys
import time
from pathlib import Path

import psutil
import torch
from accelerate import PartialState
from accelerate.utils import broadcast_object_list, gather_object

from helpers.files import OutputError, new_file, write_atomically, write_new
from helpers.ladder import build
from helpers.machine import device_name, package_versions
from helpers.params import COMPILE_MODES, Params
from helpers.results import RESULTS_FILE, append_record, make_record, read_records_file
from helpers.runner import check_out_dir
from helpers.steps import get_step
from helpers.throughput import generate_batch

FAIL_ON = "GENERATE_MANY_FAIL_ON"
PARTS = "parts"
# The params that, with the step, the prompt and its index, make an image the same image in another job.
SAME_IMAGE = ("model", "negative_prompt", "steps", "height", "width", "guidance", "seed")


def parse_args(argv=None):
    defaults = Params()
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--prompts", metavar="FILE", help="a UTF-8 text file, one prompt a line (blank lines skipped)")
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
    parser.add_argument("--timeout", type=float, default=3.0, metavar="HOURS",
                        help="how long a process waits for the others where all meet (default 3)")
    parser.add_argument("--out", required=True, help="folder for images/, parts/, results.json and summary.json")
    parser.add_argument("--merge", action="store_true",
                        help="make nothing: add the records of <out>/parts that results.json lacks (after a stop)")
    return parser.parse_args(argv)


def read_prompts(args):
    """The job's prompts, in order; raises ValueError in one sentence where there are none."""
    if args.prompts is None:
        prompts = [args.prompt]
    else:
        path = Path(args.prompts)
        if not path.is_file():
            raise ValueError(f"{path} is not a file: give --prompts a text file with one prompt per line.")
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            raise ValueError(f"{path} is not UTF-8 text: save it as UTF-8 and run again.") from None
        except OSError as error:
            raise ValueError(f"Can't read {path} ({error.strerror}): give --prompts a file you can read.") from None
        prompts = [line.strip() for line in text.splitlines() if line.strip()]
        if not prompts:
            raise ValueError(f"{path} holds no prompt: write one prompt per line.")
    if args.copies < 1 or args.batch_size < 1 or args.warmup < 0 or not args.timeout > 0:
        raise ValueError("--copies and --batch-size must be 1 or more, --warmup 0 or more, and --timeout above 0.")
    return prompts * args.copies


def make_params(args, prompts):
    return Params(
        model=args.model, prompt=prompts[0], negative_prompt=args.negative_prompt, steps=args.steps,
        height=args.height, width=args.width, guidance=args.guidance, seed=args.seed, warmup=args.warmup, runs=1,
        out_dir=args.out, compile_mode=args.compile_mode,
    )


def image_key(step, params, index, prompt):
    """What makes image `index` of a job the same image in another job."""
    return (step, index, prompt, *(params.get(name) for name in SAME_IMAGE))


def part_records(out):
    """The records every process of this and earlier jobs kept in `<out>/parts`, one per line.

    A line cut short by a process that died while writing it does not parse and is left out: its image is made again.
    """
    records = []
    for path in sorted((Path(out) / PARTS).glob("rank-*.jsonl")):
        for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
            try:
                records.append(json.loads(line))
            except ValueError:
                pass
    return records


def kept_records(out):
    """The records of `<out>/results.json` and of its part files (dicts only: a hand-edited file may hold others)."""
    return [r for r in [*read_records_file(Path(out) / RESULTS_FILE)[0], *part_records(out)] if isinstance(r, dict)]


def plan(args, prompts, params):
    """The (index, prompt) pairs still to make: those without a record in --out; and how many have one."""
    step, settings = get_step(args.through).id, params.to_dict()
    made = {image_key(r.get("step"), r["params"], r.get("prompt_index"), r.get("prompt"))
            for r in kept_records(args.out) if "prompt_index" in r and isinstance(r.get("params"), dict)}
    todo = [(i, prompt) for i, prompt in enumerate(prompts) if image_key(step, settings, i, prompt) not in made]
    return todo, len(prompts) - len(todo)


def merge(out, gathered=()):
    """Add to `<out>/results.json` each record of the part files and of `gathered` that it lacks; returns how many.

    A record is its image: the same host and image file."""
    saved, _ = read_records_file(Path(out) / RESULTS_FILE)
    held = {(r.get("host"), r.get("image")) for r in saved if isinstance(r, dict)}
    new = {}
    for record in [*part_records(out), *gathered]:
        if (record.get("host"), record.get("image")) not in held:
            new.setdefault((record.get("host"), record.get("image")), record)
    for record in new.values():
        append_record(out, record)
    return len(new)


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


def wait_limit(device):
    """The timeout the process group holds (how long a collective waits); None without one, or where torch hides it."""
    if not torch.distributed.is_initialized():
        return None
    options = getattr(torch.distributed.group.WORLD._get_backend(device), "options", None)
    return getattr(options, "_timeout", None)


class Worker:
    """One process's part of the job: its pipeline, its share of the prompts, what it made and how it failed."""

    def __init__(self, state, args, params):
        self.state, self.args, self.params = state, args, params
        self.pipe, self.records, self.error, self.generate_s, self.part = None, [], None, 0.0, None
        self.host, self.load_times = socket.gethostname(), (None, None)

    def guarded(self, work):
        """Run `work` unless this process failed already; keep its error to name once every process is done."""
        if self.error is not None:
            return
        try:
            work()
        except Exception as error:  # any failure: named in the summary
            self.error = f"{type(error).__name__}: {str(error).strip().splitlines()[0] if str(error).strip() else ''}"

    def load(self, share):
        """Build the pipeline and warm it up (the first compile), unless this process has nothing to make."""
        if not share:
            return
        started = time.time()
        self.pipe = build(self.params.model, through=self.args.through, compile=not self.args.no_compile,
                          compile_mode=self.params.compile_mode, device=self.state.device,
                          verbose=self.state.is_main_process)
        for _ in range(self.params.warmup):
            batch = next(batches(share, self.args.batch_size))
            fail_for_tests(batch)
            generate_batch(self.pipe, self.params, [prompt for _, prompt in batch])
        self.load_times = (started, time.time())

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
        """Save image `index` as images/<index>.png (<index>-2.png where an earlier job took it), then its record as
        a line of this process's part file, flushed; returns the record."""
        name = f"{index:0{width}d}"
        path = write_new(Path(self.args.out) / "images", name, ".png", lambda f: image.save(f, format="PNG"))
        where = {"rank": self.state.process_index, "host": self.host, "process_device": str(self.state.device),
                 "device": device_name(self.state.device)}
        record = make_record(
            self.args.through, None, self.params, dtype=self.pipe.unet.dtype, image_file=f"images/{path.name}",
            extra={"prompt_index": index, "prompt": prompt, "seed": self.params.seed + index, **where, **call},
        )
        if self.part is None:  # a new file for each job: none goes on after a line that a killed job cut short
            part = new_file(Path(self.args.out) / PARTS, f"rank-{self.state.process_index}", ".jsonl")
            self.part = open(part, "a", encoding="utf-8")
        self.part.write(json.dumps(record) + "\n")
        self.part.flush()
        return record

    def outcome(self, share):
        return {"rank": self.state.process_index, "host": self.host, "device": str(self.state.device),
                "started": psutil.Process().create_time(), "load_started": self.load_times[0],
                "loaded": self.load_times[1], "prompts": len(share), "images": len(self.records),
                "generate_s": self.generate_s, "error": self.error, "records": self.records}


def summarize(outcomes, prompts, skipped, job_s, generate_s, params):
    images = sum(o["images"] for o in outcomes)
    return {
        "prompts": len(prompts), "skipped": skipped, "images": images, "processes": len(outcomes),
        "job_s": job_s, "images_per_s": images / job_s,
        "generate_s": generate_s, "images_per_s_generating": images / generate_s if generate_s else None,
        "ranks": [{k: v for k, v in o.items() if k != "records"} for o in outcomes],
        "failures": [f"rank {o['rank']} on {o['host']} failed: {o['error']}" for o in outcomes if o["error"]],
        "device": device_name(), "versions": package_versions(), "params": params.to_dict(),
    }


def report(summary):
    print(f"{summary['images']} of {summary['prompts'] - summary['skipped']} images made by {summary['processes']} "
          f"process(es) in {summary['job_s']:.1f} s: {summary['images_per_s']:.2f} images/s, loading and warm-up "
          "included")
    if summary["images_per_s_generating"] is not None:
        print(f"   generating alone: {summary['generate_s']:.1f} s, {summary['images_per_s_generating']:.2f} images/s")
    for rank in summary["ranks"]:
        rate = f", {rank['images'] / rank['generate_s']:.2f} images/s" if rank["generate_s"] else ""
        load = f"loaded in {rank['loaded'] - rank['load_started']:.1f} s, " if rank["loaded"] else ""
        print(f"   rank {rank['rank']} on {rank['host']} ({rank['device']}): {load}{rank['images']} of "
              f"{rank['prompts']} images in {rank['generate_s']:.1f} s{rate}")
    for failure in summary["failures"]:
        print(failure, file=sys.stderr)


def run(args, prompts, params):
    """This process's part of the job; on the main process, the job's summary too. Returns the exit status."""
    # Without a GPU, gloo on the CPUs: PartialState needs cpu=True to start it under torchrun or accelerate launch.
    # Its other keywords go to torch.distributed.init_process_group: here the timeout of every collective.
    state = PartialState(cpu=not torch.cuda.is_available(), timeout=datetime.timedelta(hours=args.timeout))
    worker = Worker(state, args, params)
    todo, skipped = broadcast_object_list(list(plan(args, prompts, params)) if state.is_main_process else [None, None])
    if state.is_main_process:
        if skipped:
            print(f"Skipped {skipped} of {len(prompts)} images: {args.out} holds their records from an earlier job.")
        limit = wait_limit(state.device)
        print(f"{len(todo)} images to make over {state.num_processes} process(es)"
              + (f"; each waits up to {limit} for the others (--timeout)" if limit else ""))
    with state.split_between_processes(todo) as share:
        share = list(share)
    with state.local_main_process_first():  # the others load from the model and kernels it left in the caches
        worker.guarded(lambda: worker.load(share))
    loaded = not any(gather_object([worker.error]))  # one failed to load: none generates, and it is named at once
    ready = time.perf_counter()
    if loaded:
        worker.guarded(lambda: worker.generate(share, width=max(5, len(str(len(prompts) - 1)))))
    state.wait_for_everyone()
    finished, finished_clock = time.perf_counter(), time.time()
    outcomes = gather_object([worker.outcome(share)])
    if state.is_main_process:
        merge(args.out, [record for outcome in outcomes for record in outcome["records"]])
        # From the first process's start (as the system clock of its machine saw it) to the last one's finish.
        job_s = finished_clock - min(o["started"] for o in outcomes)
        summary = summarize(outcomes, prompts, skipped, job_s, finished - ready, params)
        write_atomically(Path(args.out) / "summary.json", lambda f: f.write(json.dumps(summary, indent=1).encode()))
        report(summary)
    failed = worker.error is not None or (state.is_main_process and any(o["error"] for o in outcomes))
    state.destroy_process_group()
    return 1 if failed else 0


def main(argv=None):
    args = parse_args(argv)
    try:
        if args.merge:
            added = merge(args.out)
            print(f"Added {added} record(s) of {Path(args.out) / PARTS} to {Path(args.out) / RESULTS_FILE}.")
            return 0
        prompts = read_prompts(args)
        params = make_params(args, prompts)
        get_step(args.through)
        check_out_dir(args.out)
    except (ValueError, OutputError) as error:
        if os.environ.get("LOCAL_RANK", "0") == "0":  # every process checks; one per machine says it
            print(f"error: {error}", file=sys.stderr)
        return 2
    return run(args, prompts, params)


if __name__ == "__main__":
    sys.exit(main())
