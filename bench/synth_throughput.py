"""Synthetic-image throughput: the Ray Data path (`generate`) against a bare loop over the same pipeline.

Both sides start cold and are timed end to end: the bare loop is a fresh Python process that imports,
loads the model, runs the same ``ShardGenerator`` over every shard and writes each with
``pyarrow.parquet.write_table``; the Ray path is ``generate()`` on an already running local Ray
cluster (actor start-up, model load per actor, ``map_batches``, ``write_parquet``, manifest). The bare
loop uses as many torch threads as one Ray worker on this machine, so

    ratio_per_worker = (Ray images/s ÷ workers) ÷ bare-loop images/s

is the share of a worker's bare throughput that survives the Ray Data glue. Measured for 1 and 2
workers side by side in one run; the last line is one JSON object.

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
    """The reference: one process, no Ray, the same model calls and Parquet encoding."""
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
    for shard in range(plan.num_shards):
        pq.write_table(gen(plan.table(shard)).drop_columns(["shard"]), out / shard_name(shard))


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
    parser.add_argument("--bare", help=argparse.SUPPRESS)  # internal: run the bare loop into this dir
    parser.add_argument("--threads", type=int, default=1, help=argparse.SUPPRESS)
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
    threads = max(1, int(_cpu_share(cpus, cpus, 1)))  # what one Ray CPU worker gets here
    spec = resolve_model(args.model)  # build / train a built-in once, outside every timing
    args.guidance = guidance_of(SynthConfig(guidance=args.guidance), spec)
    total = args.classes * args.images_per_class
    result: dict[str, object] = {"model": args.model, "images": total, "steps": args.steps, "cpus": cpus, "threads_per_worker": threads}
    # Other processes on the machine take cores from the 2-worker run first: report the load.
    result["load_avg_before"] = round(os.getloadavg()[0], 2)
    with tempfile.TemporaryDirectory() as tmp:
        bare_dir = Path(tmp) / "bare"
        bare_dir.mkdir()
        cmd = [sys.executable, __file__, "--bare", str(bare_dir), "--threads", str(threads)]
        for key in ("model", "classes", "images_per_class", "image_size", "steps", "guidance", "batch_size", "seed"):
            cmd += [f"--{key.replace('_', '-')}", str(getattr(args, key))]
        t0 = time.perf_counter()
        subprocess.run(cmd, check=True)
        bare = total / (time.perf_counter() - t0)
        print(f"bare loop: {bare:.2f} images/s", file=sys.stderr)

        ray.init(num_cpus=cpus, include_dashboard=False, logging_level="WARNING", log_to_driver=False)
        wait_for_cpus()
        ips: dict[str, float] = {}
        for w in args.workers:
            cfg = SynthConfig(
                model=args.model, classes=[str(i) for i in range(args.classes)], images_per_class=args.images_per_class,
                image_size=args.image_size, channels=1, steps=args.steps, guidance=args.guidance, seed=args.seed,
                workers=w, batch_size=args.batch_size, out=str(Path(tmp) / f"ray-{w}"),
            )
            t0 = time.perf_counter()
            out = generate(cfg, progress=False)
            ips[str(w)] = total / (time.perf_counter() - t0)
            print(f"ray data, {w} worker(s): {ips[str(w)]:.2f} images/s", file=sys.stderr)
            same = all((out / f.name).read_bytes() == f.read_bytes() for f in bare_dir.iterdir())
            result[f"bytes_equal_bare_{w}"] = same
        ray.shutdown()
    ratios = {w: v / int(w) / bare for w, v in ips.items()}
    result |= {
        "load_avg_after": round(os.getloadavg()[0], 2),
        "bare_images_per_second": round(bare, 3),
        "images_per_second": {w: round(v, 3) for w, v in ips.items()},
        "ratio_per_worker_by_workers": {w: round(r, 3) for w, r in ratios.items()},
        "ratio_per_worker": round(min(ratios.values()), 3),
    }
    if "1" in ips and "2" in ips:
        result["speedup_2_vs_1"] = round(ips["2"] / ips["1"], 3)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
