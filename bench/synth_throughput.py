"""Synthetic-image throughput: the Ray Data path (`generate`) against a bare loop over the same pipeline.

Both sides start cold and are timed end to end: the bare loop is a fresh Python process that imports,
loads the model, runs the same ``ShardGenerator`` over every shard and writes each with
``pyarrow.parquet.write_table``; the Ray path is ``generate()`` on an already running local Ray
cluster (actor start-up, model load per actor, ``map_batches``, ``write_parquet``, manifest). The bare
loop uses as many torch threads as one Ray worker on this machine, so

    ratio_per_worker = (Ray images/s ÷ workers) ÷ bare-loop images/s

is the share of a worker's bare throughput that survives the Ray Data glue. On a machine that other
processes also use, w workers may not get w free cores; so the bench also runs w bare processes side
by side (each on every w-th shard) and reports

    ratio_vs_bare_processes = Ray images/s ÷ images/s of w bare processes in parallel,

the Ray overhead under the same contention. 1 and 2 workers, interleaved with their bare runs, in one
run; the last line is one JSON object.

    RAY_AUTH_MODE=disabled python bench/synth_throughput.py            # ~2-3 min on 2 cores
    python bench/synth_throughput.py --model digits-ddpm --images-per-class 100
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pyarrow.parquet as pq


def bare_loop(args: argparse.Namespace) -> None:
    """The reference: one process, no Ray, the same model calls and Parquet encoding (shards part::parts)."""
    from dpmix_ray.synth.pipelines import resolve_model
    from dpmix_ray.synth.sets import Plan, ShardGenerator, shard_name

    spec = resolve_model(args.model, progress=False)
    classes = [str(i) for i in range(args.classes)]
    plan = Plan(tuple(classes), args.images_per_class, args.batch_size, seed=args.seed)
    gen = ShardGenerator(
        spec, classes=classes, prompt="a photo of a {label}", steps=args.steps, guidance=args.guidance,
        image_size=args.image_size, channels=1, device="cpu", threads=args.threads, plan=plan,
    )
    out = Path(args.bare)
    for shard in range(args.part, plan.num_shards, args.parts):
        pq.write_table(gen(plan.table(shard)).drop_columns(["shard"]), out / shard_name(shard))


def run_bare(args: argparse.Namespace, out: Path, parts: int, threads: int) -> float:
    """Wall seconds of ``parts`` bare-loop processes started together, cold, on disjoint shards."""
    cmd = [sys.executable, __file__, "--bare", str(out), "--threads", str(threads), "--parts", str(parts)]
    for key in ("model", "classes", "images_per_class", "image_size", "steps", "guidance", "batch_size", "seed"):
        cmd += [f"--{key.replace('_', '-')}", str(getattr(args, key))]
    out.mkdir()
    t0 = time.perf_counter()
    procs = [subprocess.Popen([*cmd, "--part", str(i)]) for i in range(parts)]
    if any(p.wait() != 0 for p in procs):
        raise SystemExit("bare loop failed")
    return time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny-random")
    parser.add_argument("--classes", type=int, default=4)
    parser.add_argument("--images-per-class", type=int, default=96)
    parser.add_argument("--image-size", type=int, default=28)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--guidance", type=float, help="default: the model's own")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    # internal: run one bare-loop process
    parser.add_argument("--bare", help=argparse.SUPPRESS)
    parser.add_argument("--threads", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--part", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--parts", type=int, default=1, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.bare:
        bare_loop(args)
        return

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    import ray

    from dpmix_ray.config import SynthConfig
    from dpmix_ray.synth import generate
    from dpmix_ray.synth.pipelines import resolve_model
    from dpmix_ray.synth.sets import _cpu_share, guidance_of, wait_for_cpus

    cpus = os.cpu_count() or 1
    spec = resolve_model(args.model)  # build / train a built-in once, outside every timing
    args.guidance = guidance_of(SynthConfig(guidance=args.guidance), spec)
    total = args.classes * args.images_per_class
    # Other processes on the machine take cores from the 2-worker runs first: report the load.
    result: dict[str, object] = {"model": args.model, "images": total, "steps": args.steps, "cpus": cpus, "load_avg_before": round(os.getloadavg()[0], 2)}
    ray.init(num_cpus=cpus, include_dashboard=False, logging_level="WARNING", log_to_driver=False)
    wait_for_cpus()
    bare: dict[str, float] = {}
    ips: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for w in args.workers:
            threads = max(1, int(_cpu_share(cpus, cpus, w)))  # what one Ray CPU worker gets here
            bare_dir = Path(tmp) / f"bare-{w}"
            bare[str(w)] = total / run_bare(args, bare_dir, w, threads)
            cfg = SynthConfig(
                model=args.model, classes=[str(i) for i in range(args.classes)], images_per_class=args.images_per_class,
                image_size=args.image_size, channels=1, steps=args.steps, guidance=args.guidance, seed=args.seed,
                workers=w, batch_size=args.batch_size, out=str(Path(tmp) / f"ray-{w}"),
            )
            t0 = time.perf_counter()
            out = generate(cfg, progress=False)
            ips[str(w)] = total / (time.perf_counter() - t0)
            result[f"bytes_equal_bare_{w}"] = all((out / f.name).read_bytes() == f.read_bytes() for f in bare_dir.iterdir())
            print(f"{w} worker(s): bare {bare[str(w)]:.2f} images/s, ray data {ips[str(w)]:.2f} images/s", file=sys.stderr)
    ray.shutdown()
    ratios = {w: v / int(w) / bare["1"] for w, v in ips.items()} if "1" in bare else {}
    result |= {
        "load_avg_after": round(os.getloadavg()[0], 2),
        "bare_images_per_second": {w: round(v, 3) for w, v in bare.items()},
        "images_per_second": {w: round(v, 3) for w, v in ips.items()},
        "ratio_vs_bare_processes": {w: round(ips[w] / bare[w], 3) for w in ips},
        "ratio_per_worker_by_workers": {w: round(r, 3) for w, r in ratios.items()},
        "ratio_per_worker": round(min(ratios.values()), 3) if ratios else None,
    }
    if "1" in ips and "2" in ips:
        result["speedup_2_vs_1"] = round(ips["2"] / ips["1"], 3)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
