"""Which regions to compile in SDXL's UNet: each choice of `helpers.regions.REGIONS` against the full compile.

    python scripts/compare_regions.py --model tiny --height 64 --width 64 --steps 2 --compile-mode default --out DIR
    python scripts/compare_regions.py --merge A/regions.json B/regions.json --out DIR

Every arm is step 06's pipeline (bf16, SDPA, fused QKV, int8) compiled in a fresh process with an empty Inductor
cache, so every first call is a cold compile: the full compile of step 06 (the reference row), then each choice of
regions as step 07 compiles it (`--arms` names the arms to run, `full` and the choices; all of them by default).
Each arm prints its graphs compiled in the first call, its first call, its steady median with the IQR, the share of
the UNet's FLOPs it leaves eager (counted on SDXL, or on the tiny model, at this size) and its image against the
fp32 baseline's. DIR gets the baseline's record and image, regions.json (the arms and their table), regions.png
(first call against steady latency, one point per arm) and arms/, each arm's log, last image and Inductor cache
folder. Warm up well on a CPU (--warmup 3): the first calls after a compile are slow. Where all arms don't fit one
session (a GPU lent for minutes), run them in several, each with its own --out and `--arms`, and `--merge` their
regions.json files. `--alternate ROUNDS` then builds every arm in the one process and times one image of each in
turns, the order reversed every other round: on a noisy machine (a CPU VM), the ratio of each round's pair is
steadier than the ratio of medians measured minutes apart.
"""

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

import helpers
from helpers.coldstart import describe_start, time_start
from helpers.coldstart_charts import draw_regions, regions_table
from helpers.machine import device_name
from helpers.params import COMPILE_MODES, Params
from helpers.regions import REGIONS
from helpers.timing import synchronize

FULL = "full compile (06)"
ARMS = ("full", *REGIONS)  # what --arms takes: the full compile and each choice of regions


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, help="folder for regions.json and regions.png")
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--height", type=int, default=None)
    parser.add_argument("--width", type=int, default=None)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--compile-mode", default="max-autotune", choices=COMPILE_MODES)
    parser.add_argument("--arms", nargs="+", choices=ARMS, default=list(ARMS),
                        help="the arms to run: full (the reference) and choices of regions (default: all of them)")
    parser.add_argument("--alternate", type=int, default=0, metavar="ROUNDS",
                        help="then build every arm in this one process and time one image of each in turns, ROUNDS "
                             "times: a drift of the machine's speed falls on all arms alike (a CPU VM's noise)")
    parser.add_argument("--merge", nargs="+", metavar="REGIONS_JSON",
                        help="measure nothing: draw one table and chart in --out from the arms of these regions.json "
                             "files, made by earlier runs with the same parameters on the same device")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    out = Path(args.out)
    if args.merge:
        try:
            params, device, arms = merged(args.merge)
        except ValueError as error:
            print(error, file=sys.stderr)
            return 2
        out.mkdir(parents=True, exist_ok=True)
        write(out, dataclasses.replace(params, out_dir=str(out)), device, arms)
        return 0
    params = Params(model=args.model, height=args.height, width=args.width, steps=args.steps, warmup=args.warmup,
                    runs=args.runs, compile_mode=args.compile_mode, out_dir=str(out))
    out.mkdir(parents=True, exist_ok=True)
    baseline = record_baseline(params)
    helpers.free_memory()  # the baseline's pipeline is gone: the arms' processes get the GPU's memory
    arms = {}
    for arm, name, step, regions in planned(args.arms):
        # Each arm's log, last image and Inductor cache folder stay in DIR/arms/<arm>/, for a look after.
        result = time_start("cold", params, out / "arms" / arm, compile="regional" if regions else "full", step=step,
                            regions=regions)
        ssim = helpers.quality(Image.open(result["image"]), baseline)["ssim"]  # kept: the image may not be
        arms[name] = {**result, "params": params.to_dict(), "ssim": ssim}
        print(f"{name}: {describe_start(result)}", flush=True)
    alternated = alternate(params, args.arms, args.alternate) if args.alternate else None
    write(out, params, device_name(), arms, alternated)
    return 0


def planned(arms):
    """(arm, its name in the table, its step, its choice of regions or None) for each of `arms`, in ARMS's order: the
    full compile first, the reference of the others."""
    return [(arm, FULL, "06", None) if arm == "full" else (arm, arm, "07", arm) for arm in ARMS if arm in arms]


def alternate(params, arms, rounds):
    """Each arm's pipeline built and compiled in this process, warmed up, then timed one image at a time in turns."""
    from helpers.ladder import build_pipeline
    from helpers.steps import get_step

    calls = {}
    for _, name, step, regions in planned(arms):
        pipe = build_pipeline(params.model, get_step(step).settings, compile_mode=params.compile_mode,
                              verbose=False, regions=regions)  # regions: step 06's full compile has none
        pipe.set_progress_bar_config(disable=True)
        for _ in range(1 + params.warmup):  # the compile, then the slow first calls after it
            helpers.generate(pipe, params)
        calls[name] = lambda pipe=pipe: helpers.generate(pipe, params)
    result = in_turns(calls, rounds)
    for name, line in result["lines"].items():
        print(f"{name}, in turns: {line}")
    return result


def in_turns(calls, rounds):
    """Time each of `calls` ({name: fn}) once per round, the order reversed every other round, so that a drift of
    the machine's speed falls on all of them alike; each name's samples, median and IQR, and the ratio of each
    round's time to the first call's of the same round (the full compile's, where it runs), median and IQR."""
    samples = {name: [] for name in calls}
    order = list(calls)
    for number in range(rounds):
        for name in order if number % 2 == 0 else order[::-1]:
            synchronize()
            start = time.perf_counter()
            calls[name]()
            synchronize()
            samples[name].append(time.perf_counter() - start)
    reference = samples[order[0]]
    result = {"rounds": rounds, "reference": order[0], "arms": {}, "lines": {}}
    for name, times in samples.items():
        ratios = [t / r for t, r in zip(times, reference)]
        q1, median, q3 = np.percentile(times, [25, 50, 75])
        r1, ratio, r3 = np.percentile(ratios, [25, 50, 75])
        result["arms"][name] = {"samples_s": times, "median_s": median, "iqr_s": q3 - q1, "ratio": ratio,
                                "ratio_iqr": r3 - r1}
        against = "" if name == order[0] else (f", {100 * (ratio - 1):+.1f}% against {order[0]} round by round "
                                                  f"(IQR of the ratios {100 * (r3 - r1):.1f} points)")
        result["lines"][name] = f"{median:.3f} s (IQR {q3 - q1:.3f} s, {rounds} rounds){against}"
    return result


def record_baseline(params):
    """The image the arms' images are scored against, recorded as notebook 01 records it."""
    eager = helpers.build(params.model, through="01", verbose=False)
    once = helpers.benchmark(lambda: helpers.generate(eager, params), warmup=0, runs=1, progress=False)
    helpers.record_step("01", once, params, dtype=torch.float32, image=once.output)
    return once.output


def write(out, params, device, arms, alternated=None):
    """The table printed, regions.png and regions.json in `out`."""
    table = regions_table(arms, params)
    draw_regions(arms, out / "regions.png")
    print(table)
    (out / "regions.json").write_text(json.dumps({"params": params.to_dict(), "device": device, "arms": arms,
                                                  "table": table, "in_turns": alternated}, indent=1))
    print(f"{out / 'regions.json'}, {out / 'regions.png'}")


def merged(paths):
    """(params, device, arms) of several regions.json files, the full compile first; a later file's arm replaces an
    earlier one of the same name. One sentence (ValueError) where they differ in parameters or device."""
    def measured_by(data):  # what must match: the parameters but the output folder (each run has its own), the device
        return {key: value for key, value in data["params"].items() if key != "out_dir"}, data["device"]

    files = [json.loads(Path(path).read_text()) for path in paths]
    first = files[0]
    for path, data in zip(paths, files):
        if measured_by(data) != measured_by(first):
            raise ValueError(f"{path} was measured with other parameters or on another device than {paths[0]}: "
                             "merge only runs of the same command on the same device.")
    arms = {name: arm for data in files for name, arm in data["arms"].items()}
    order = [name for _, name, _, _ in planned(ARMS)]
    return (Params(**first["params"]), first["device"],
            dict(sorted(arms.items(), key=lambda item: order.index(item[0]) if item[0] in order else len(order))))


if __name__ == "__main__":
    sys.exit(main())
