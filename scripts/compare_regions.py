"""Which regions to compile in SDXL's UNet: each choice of `helpers.regions.REGIONS` against the full compile.

    python scripts/compare_regions.py --model tiny --height 64 --width 64 --steps 2 --compile-mode default --out DIR

Every arm is step 06's pipeline (bf16, SDPA, fused QKV, int8) compiled in a fresh process with an empty Inductor
cache, so every first call is a cold compile: the full compile of step 06 (the reference row), then each choice of
regions as step 07 compiles it (`--regions` names the choices to run; all of them by default). Each arm prints its
graphs compiled in the first call, its first call, its steady median with the IQR, the share of the UNet's FLOPs it
leaves eager (counted on SDXL, or on the tiny model, at this size) and its image against the fp32 baseline's. DIR
gets the baseline's record and image, regions.json (the arms and their table), regions.png (first call against
steady latency, one point per arm) and arms/, each arm's log, last image and Inductor cache folder. Warm up well on
a CPU (--warmup 3): the first calls after a compile are slow.
"""

import argparse
import json
import sys
from pathlib import Path

import torch

import helpers
from helpers.coldstart import describe_start, time_start
from helpers.coldstart_charts import draw_regions, regions_table
from helpers.machine import device_name
from helpers.params import COMPILE_MODES, Params
from helpers.regions import REGIONS

FULL = "full compile (06)"


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
    parser.add_argument("--regions", nargs="+", choices=list(REGIONS), default=list(REGIONS),
                        help="the choices of regions to compare with the full compile (default: all of them)")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    out = Path(args.out)
    params = Params(model=args.model, height=args.height, width=args.width, steps=args.steps, warmup=args.warmup,
                    runs=args.runs, compile_mode=args.compile_mode, out_dir=str(out))
    out.mkdir(parents=True, exist_ok=True)
    # The baseline the arms' images are scored against, as notebook 01 records it.
    baseline = helpers.build(params.model, through="01", verbose=False)
    once = helpers.benchmark(lambda: helpers.generate(baseline, params), warmup=0, runs=1, progress=False)
    helpers.record_step("01", once, params, dtype=torch.float32, image=once.output)
    arms = {}
    for name, step, regions in [(FULL, "06", None), *((choice, "07", choice) for choice in args.regions)]:
        # Each arm's log, last image and Inductor cache folder stay in DIR/arms/<arm>/, for a look after.
        result = time_start("cold", params, out / "arms" / name.split()[0], compile="regional" if regions else "full",
                            step=step, regions=regions)
        arms[name] = {**result, "params": params.to_dict()}
        print(f"{name}: {describe_start(result)}", flush=True)
    table = regions_table(arms, params)
    draw_regions(arms, out / "regions.png")
    print(table)
    (out / "regions.json").write_text(json.dumps({"params": params.to_dict(), "device": device_name(),
                                                  "arms": arms, "table": table}, indent=1))
    print(f"{out / 'regions.json'}, {out / 'regions.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
