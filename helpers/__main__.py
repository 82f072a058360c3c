"""Command line: `python -m helpers run ...` runs the whole series; `python -m helpers chart DIR` redraws the chart."""

import argparse
import sys

from .models import ModelUnavailable
from .params import COMPILE_MODES, DEFAULT_PROMPT, Params
from .runner import RunFailed, run_series, select_steps


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="python -m helpers", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    run = commands.add_parser("run", help="execute the notebooks in order and draw the chart")
    run.add_argument("--model", default="auto", help="auto, tiny, sdxl-random, a hub id or a local folder")
    run.add_argument("--out", required=True, help="folder for executed notebooks, images, results.json, chart")
    run.add_argument("--steps", type=int, default=30, help="denoising steps per image (default 30)")
    run.add_argument("--height", type=int, default=None, help="default: the model's native size")
    run.add_argument("--width", type=int, default=None, help="default: the model's native size")
    run.add_argument("--prompt", default=DEFAULT_PROMPT)
    run.add_argument("--negative-prompt", default="")
    run.add_argument("--guidance", type=float, default=5.0)
    run.add_argument("--seed", type=int, default=0)
    run.add_argument("--warmup", type=int, default=1, help="untimed calls after the first (default 1)")
    run.add_argument("--runs", type=int, default=5, help="timed calls per step (default 5)")
    run.add_argument("--compile-mode", default="max-autotune", choices=COMPILE_MODES)
    run.add_argument("--only", default=None, help="steps to run, e.g. 01,03 or 04-07 (default: all)")
    run.add_argument("--no-progress", action="store_true", help="no progress bars")
    run.add_argument(
        "--inductor-cache", default=None, metavar="DIR",
        help="share one Inductor cache folder between the notebooks: faster, but compile times are no longer cold",
    )

    chart = commands.add_parser("chart", help="redraw DIR/latency_per_step.png from DIR/results.json")
    chart.add_argument("out", help="a folder written by `run`")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        if args.command == "chart":
            from .chart import chart_from_dir

            print(f"Chart: {chart_from_dir(args.out)}")
            return 0
        params = Params(
            model=args.model, prompt=args.prompt, negative_prompt=args.negative_prompt, steps=args.steps,
            height=args.height, width=args.width, guidance=args.guidance, seed=args.seed,
            warmup=args.warmup, runs=args.runs, out_dir=args.out, compile_mode=args.compile_mode,
        )
        select_steps(args.only)
        run_series(params, args.out, only=args.only, progress=not args.no_progress, inductor_cache=args.inductor_cache)
    except (ValueError, ModelUnavailable, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except RunFailed as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
