"""Cost of one private step against one non-private step over the same B·K images, side by side.

Variants, each one logical step of B examples whose group is K self-augmentations (G = K):
- ``nonprivate``: forward + backward of the mean loss (``summed_grads_nonprivate``), SGD update;
- ``vmap`` (the reference path): ``per_example_grads_vmap``, then the mechanism's ``LogicalStep`` (clip,
  sum, noise, ÷ B), SGD update;
- ``fast``: ``bookkeeping.per_example`` (ghost norms where cheaper), then ``LogicalStep``, SGD update.

Rows: cnn_tiny and cnn at 28×28×1 (B=64), wrn16_4 at 32×32×3 (B=8), K ∈ {1, 4, 16}.
Time: median over interleaved repetitions (every variant once per round) of the CPU time of the
process, with torch on one thread (default; a shared machine makes wall time noise, and one thread
makes CPU time the work done), or wall time with ``--threads`` > 1. ratio = variant / nonprivate.
Peak memory: the peak of live tensor bytes that torch allocates during one step, over those live
when the step starts (the profiler's allocation events, ``profile_memory=True``): the same
accounting for every variant, in this process. The goal: fast ≤ 1.25× in time and ≤ 1.5× in memory.

    .venv/bin/python bench/grad_step.py [--quick] [--models cnn_tiny,wrn16_4] [--ks 1,4,16] [--reps 5] [--processes 3]

With ``--processes N`` each row is measured in N fresh processes and reported as medians, with the
time ratio's range: on this machine ratios move by about ±0.05 from one process to the next.
Last line: one JSON object with ``rows``, ``worst_fast_ratio`` and ``worst_fast_mem_ratio``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch.profiler import profile

from dpmix_ray import bookkeeping as BK
from dpmix_ray import grads as G
from dpmix_ray import mechanism as M
from dpmix_ray.config import ModelConfig
from dpmix_ray.models import build_model

CLASSES = 10
VARIANTS = ("nonprivate", "vmap", "fast")
# model → (batch size B, channels, image size)
FULL = {"cnn_tiny": (64, 1, 28), "cnn": (64, 1, 28), "wrn16_4": (8, 3, 32)}
QUICK = {"cnn_tiny": (8, 1, 28), "wrn16_4": (2, 3, 8)}


def make_step(variant: str, model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> Callable[[], None]:
    """One logical step of ``variant``: gradients, (clip, noise,) SGD update, as the trainer does it."""
    params = G.trainable(model)
    opt = torch.optim.SGD(params.values(), lr=1e-4)
    gen = torch.Generator().manual_seed(0)
    b = x.shape[0]

    def step() -> None:
        if variant == "nonprivate":
            summed, _ = G.summed_grads_nonprivate(model, x, y)
            update = {k: s / b for k, s in summed.items()}
        else:
            logical = M.LogicalStep(params, clip_norm=1.0, noise_multiplier=1.0, expected_batch_size=b, generator=gen)
            logical.add(G.Materialised(*G.per_example_grads_vmap(model, x, y)) if variant == "vmap" else BK.per_example(model, x, y))
            update = logical.release()
        for k, p in params.items():
            p.grad = update[k]
        opt.step()

    return step


def peak_mb(fn: Callable[[], None]) -> float:
    """Peak of live tensor bytes allocated during ``fn`` beyond those live at its start, in MiB."""
    with profile(profile_memory=True) as prof:
        fn()
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events() if e.name() == "[memory]")
    live = peak = 0
    for _, nbytes in events:
        live += nbytes
        peak = max(peak, live)
    return peak / 2**20


def measure(name: str, b: int, channels: int, size: int, k: int, reps: int, clock: Callable[[], float]) -> list[dict]:
    torch.manual_seed(0)
    model = build_model(ModelConfig(name=name), in_channels=channels, num_classes=CLASSES, image_size=size).train()
    x = torch.rand(b, k, channels, size, size)
    y = F.one_hot(torch.randint(0, CLASSES, (b, k)), CLASSES).float()
    steps = {v: make_step(v, model, x, y) for v in VARIANTS}
    times: dict[str, list[float]] = {v: [] for v in VARIANTS}
    for step in steps.values():
        step()  # warm-up: oneDNN primitives, allocator
    for _ in range(reps):
        for v, step in steps.items():
            start = clock()
            step()
            times[v].append(clock() - start)
    seconds = {v: statistics.median(t) for v, t in times.items()}
    mems = {v: peak_mb(step) for v, step in steps.items()}
    return [
        {
            "model": name, "B": b, "K": k, "variant": v, "seconds": round(seconds[v], 5),
            "ratio": round(seconds[v] / seconds["nonprivate"], 3), "peak_mb": round(mems[v], 1),
            "mem_ratio": round(mems[v] / mems["nonprivate"], 3),
        }
        for v in VARIANTS
    ]


def in_processes(name: str, k: int, processes: int, argv: list[str]) -> list[dict]:
    """One row measured in ``processes`` fresh processes; per variant the medians, and the spread of
    the time ratio (it moves by about ±0.05 between processes on a quiet shared machine)."""
    runs = []
    for _ in range(processes):
        cmd = [sys.executable, __file__, "--models", name, "--ks", str(k), *argv]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
        runs.append(json.loads(out.strip().splitlines()[-1])["rows"])
    rows = []
    for per_variant in zip(*runs):
        ratios = [r["ratio"] for r in per_variant]
        rows.append(per_variant[0] | {
            "seconds": round(statistics.median(r["seconds"] for r in per_variant), 5),
            "ratio": round(statistics.median(ratios), 3), "ratio_range": [min(ratios), max(ratios)],
            "peak_mb": statistics.median(r["peak_mb"] for r in per_variant),
            "mem_ratio": statistics.median(r["mem_ratio"] for r in per_variant),
        })
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="smoke run: tiny batches and images, K ∈ {1, 2}, 1 round")
    ap.add_argument("--models", default=None, help="comma-separated subset of " + ",".join(FULL))
    ap.add_argument("--ks", default=None, help="comma-separated K values (default 1,4,16; quick 1,4)")
    ap.add_argument("--reps", type=int, default=None, help="timing rounds (default 5; quick 2)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--processes", type=int, default=1, help="measure each row in this many fresh processes; report medians and the ratio's range")
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    table = QUICK if args.quick else FULL
    models = args.models.split(",") if args.models else list(table)
    ks = [int(k) for k in args.ks.split(",")] if args.ks else ([1, 2] if args.quick else [1, 4, 16])
    reps = args.reps or (1 if args.quick else 5)
    clock = time.process_time if args.threads == 1 else time.perf_counter
    timing = "process CPU time, 1 thread" if args.threads == 1 else f"wall time, {args.threads} threads"
    child_argv = ["--reps", str(reps), "--threads", str(args.threads)] + (["--quick"] if args.quick else [])

    rows: list[dict] = []
    where = f"median of {reps}" + (f"; median over {args.processes} processes (range)" if args.processes > 1 else "")
    print(f"{'model':9} {'B':>3} {'K':>3} {'variant':10} {'seconds':>9} {'ratio':>6} {'peak MiB':>9} {'mem ratio':>9}   ({timing}, {where})")
    for name in models:
        b, channels, size = FULL[name] if name not in table else table[name]
        for k in ks:
            measured = in_processes(name, k, args.processes, child_argv) if args.processes > 1 else measure(name, b, channels, size, k, reps, clock)
            for r in measured:
                rows.append(r)
                spread = f"  ({r['ratio_range'][0]:.2f}–{r['ratio_range'][1]:.2f})" if "ratio_range" in r else ""
                print(f"{r['model']:9} {r['B']:>3} {r['K']:>3} {r['variant']:10} {r['seconds']:9.4f} {r['ratio']:6.2f} {r['peak_mb']:9.1f} {r['mem_ratio']:9.2f}{spread}", flush=True)
    fast = [r for r in rows if r["variant"] == "fast"]
    print(json.dumps({
        "rows": rows, "timing": timing, "reps": reps, "processes": args.processes,
        "worst_fast_ratio": max(r["ratio"] for r in fast), "worst_fast_mem_ratio": max(r["mem_ratio"] for r in fast),
    }))


if __name__ == "__main__":
    main()
