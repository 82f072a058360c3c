"""Which regions to compile in SDXL's UNet: each choice of `helpers.regions.REGIONS` against the full compile.

    python scripts/compare_regions.py --model tiny --height 64 --width 64 --steps 2 --compile-mode default --out DIR

Every arm is step 06's pipeline (bf16, SDPA, fused QKV, int8) compiled in a fresh process with an empty Inductor
cache, so every first call is a cold compile: the full compile of step 06 (the reference row), then each choice of
regions as step 07 compiles it. Each arm prints its graphs compiled in the first call, its first call, its steady
median with the IQR, the share of the UNet's FLOPs it leaves eager (counted on SDXL, or on the tiny model, at this
size) and its image against the fp32 baseline's. DIR gets regions.json and regions.png (first call against steady
latency, one point per arm).
"""

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from PIL import Image

import helpers
from helpers.flops import eager_share
from helpers.machine import device_name
from helpers.params import COMPILE_MODES, Params
from helpers.regions import REGIONS

ROOT = Path(__file__).resolve().parent.parent
FULL = "full compile (06)"

# What one arm runs in its own process: argv[1] is the arm, argv[2] the parameters as JSON.
ARM = """
import json, sys
import torch
from torch._dynamo.utils import counters
import helpers
from helpers.regions import recompile_limit_hits

arm, params = sys.argv[1], helpers.Params(**json.loads(sys.argv[2]))
pipe = helpers.build(params.model, through="06", compile=False, verbose=False)
if arm == "full":
    helpers.compile_pipeline(pipe, mode=params.compile_mode)
else:
    helpers.compile_regions(pipe, mode=params.compile_mode, regions=arm)
graphs = []
def call():
    before = counters["stats"]["unique_graphs"]
    image = helpers.generate(pipe, params)
    graphs.append(counters["stats"]["unique_graphs"] - before)
    return image
measurement = helpers.benchmark(call, warmup=params.warmup, runs=params.runs, progress=False)
measurement.output.save(sys.argv[3])
print(json.dumps({"graphs": graphs[0], "graphs_later": sum(graphs[1:]), "first_call_s": measurement.first_call_s,
                  "median_s": measurement.median_s, "iqr_s": measurement.iqr_s,
                  "recompile_limit_hits": recompile_limit_hits()}))
"""


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
    return parser.parse_args(argv)


def run_arm(arm, params, workdir):
    """One arm in a fresh process with an empty Inductor cache; its numbers, and its image's path."""
    image = workdir / f"{arm}.png"
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": tempfile.mkdtemp(prefix="inductor-", dir=workdir)}
    env.pop("TRITON_CACHE_DIR", None)
    done = subprocess.run([sys.executable, "-c", ARM, arm, json.dumps(params.to_dict()), str(image)], cwd=ROOT,
                          env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"arm {arm} failed: {done.stderr.strip().splitlines()[-1]}")
    return json.loads(done.stdout.strip().splitlines()[-1]), image


def draw(rows, path):
    """First call against steady latency, one point per arm; the full compile marked."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4.5), layout="constrained")
    ax = fig.add_subplot()
    for row in rows:
        full = row["arm"] == FULL
        ax.errorbar(row["first_call_s"], row["median_s"], yerr=row["iqr_s"] / 2, marker="s" if full else "o",
                    color="black" if full else None, capsize=3, label=row["arm"])
    ax.set_xlabel("first call: a cold compile (s)")
    ax.set_ylabel("steady median per image (s), bars: IQR")
    ax.set_xlim(left=0)
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(f"{rows[0]['device']}: regions against the full compile", fontsize=10)
    fig.savefig(path, dpi=120)


def main(argv=None):
    args = parse_args(argv)
    params = Params(model=args.model, height=args.height, width=args.width, steps=args.steps, warmup=args.warmup,
                    runs=args.runs, compile_mode=args.compile_mode)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    height, width = helpers.image_size(params)
    baseline = helpers.generate(helpers.build(params.model, through="01", verbose=False), params)
    rows = []
    with tempfile.TemporaryDirectory(prefix="regions-") as folder:
        for arm in ("full", *REGIONS):
            found, image = run_arm(arm, params, Path(folder))
            share = 0.0 if arm == "full" else eager_share(params.model, height, width, regions=arm)
            quality = helpers.quality(Image.open(image), baseline)
            rows.append({"arm": FULL if arm == "full" else arm, **found, "eager_flop_share": share,
                         "ssim": quality["ssim"], "device": device_name()})
            print(f"{rows[-1]['arm']:<28} {found['graphs']:>3} graphs, first call {found['first_call_s']:7.1f} s, "
                  f"median {found['median_s']:.3f} s (IQR {found['iqr_s']:.3f}), eager FLOPs {100 * share:5.2f}%, "
                  f"SSIM {quality['ssim']:.3f}, recompile-limit hits {found['recompile_limit_hits']}", flush=True)
    full = rows[0]
    for row in rows[1:]:
        print(f"{row['arm']}: first call {row['first_call_s'] / full['first_call_s']:.2f}x the full compile's, "
              f"steady {100 * (row['median_s'] / full['median_s'] - 1):+.1f}%")
    (out / "regions.json").write_text(json.dumps({"params": dataclasses.asdict(params), "arms": rows}, indent=1))
    draw(rows, out / "regions.png")
    print(f"{out / 'regions.json'}, {out / 'regions.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
