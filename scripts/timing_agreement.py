"""Compare helpers.benchmark with torch.utils.benchmark on the same work: a matmul and a tiny-model image.
Also prints how long the tiny pipeline takes to build.

    python scripts/timing_agreement.py

The two timers take turns for several rounds (a shared machine drifts by more than 5% over a minute), and the
median of the per-round ratios is reported with its range. Each ratio compares means: `Timer.timeit(n)` times n calls
as one block and reports their mean (its `median` is that one value), so helpers' side is the mean of its samples.
Run it on an otherwise idle machine.
"""

import statistics
import time

import torch
import torch.utils.benchmark as torch_benchmark

from helpers import Params, benchmark, generate, load_pipeline


def compare(name, work, runs, rounds=7):
    timer = torch_benchmark.Timer("work()", globals={"work": work}, num_threads=torch.get_num_threads())
    timer.timeit(3)  # untimed, as benchmark's first call; every timeit also makes 2 untimed calls before its block
    ratios = []
    for _ in range(rounds):
        ours = statistics.fmean(benchmark(work, warmup=1, runs=runs, progress=False).samples_s)
        theirs = timer.timeit(runs).mean
        ratios.append(ours / theirs)
    print(f"{name:28} helpers/torch.utils.benchmark ratio of means, median {statistics.median(ratios):.3f} "
          f"(range {min(ratios):.3f} to {max(ratios):.3f}, {rounds} rounds of {runs} runs; last: "
          f"{ours * 1e3:.2f} ms vs {theirs * 1e3:.2f} ms)")


def main():
    x = torch.randn(1024, 1024)
    compare("matmul 1024^3 (CPU)", lambda: x @ x, runs=50)
    start = time.perf_counter()
    pipe = load_pipeline("tiny", verbose=False)
    print(f"tiny pipeline built in {time.perf_counter() - start:.2f} s")
    params = Params(model="tiny", steps=4)
    compare("tiny SDXL, 128 px, 4 steps", lambda: generate(pipe, params), runs=10)


if __name__ == "__main__":
    main()
