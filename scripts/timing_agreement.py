"""Compare helpers.benchmark with torch.utils.benchmark on the same work: a tiny-model image and a matmul.
Also prints how long the tiny pipeline takes to build.

    python scripts/timing_agreement.py

Prints both medians and their ratio for each workload; run it on an otherwise idle machine.
"""

import time

import torch
import torch.utils.benchmark as torch_benchmark

from helpers import Params, benchmark, generate, load_pipeline


def compare(name, work, runs):
    ours = benchmark(work, warmup=3, runs=runs, progress=False).median_s
    timer = torch_benchmark.Timer("work()", globals={"work": work}, num_threads=torch.get_num_threads())
    theirs = timer.blocked_autorange(min_run_time=5).median
    print(f"{name:28} helpers {ours * 1e3:9.2f} ms   torch.utils.benchmark {theirs * 1e3:9.2f} ms   "
          f"ratio {ours / theirs:.3f}")


def main():
    x = torch.randn(1024, 1024)
    compare("matmul 1024^3 (CPU)", lambda: x @ x, runs=100)
    start = time.perf_counter()
    pipe = load_pipeline("tiny", verbose=False)
    print(f"tiny pipeline built in {time.perf_counter() - start:.2f} s")
    params = Params(model="tiny", steps=4)
    compare("tiny SDXL, 128 px, 4 steps", lambda: generate(pipe, params), runs=30)


if __name__ == "__main__":
    main()
