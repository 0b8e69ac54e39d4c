"""Is `dpmix-ray plan`'s wall-time estimate right? Generate a 60,000-image npz (28×28, 10 classes), plan a
run of ≥ 200 steps on it, train that run, and compare, in one process, side by side.

    nice -n 5 .venv/bin/python bench/plan_check.py [--images 60000] [--steps 200] [--set mix.aug_multiplicity=8 …]

The images are class-dependent blobs plus noise (learnable, not MNIST). The npz is written to a
temporary directory and removed. Last line: one JSON object with the estimate, the measured
wall_seconds and their ratio (the goal: within ±30 %).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np

from dpmix_ray.config import load_train_config
from dpmix_ray.cost import data_shape, describe_run, estimate_run
from dpmix_ray.trainer import train


def make_npz(path: Path, images: int, size: int = 28, classes: int = 10, seed: int = 0) -> None:
    """``images`` uint8 images: a class's fixed random template, shifted by a pixel or two, plus noise."""
    rng = np.random.default_rng(seed)
    templates = rng.random((classes, size, size)) > 0.7
    y = rng.integers(0, classes, images)
    shifts = rng.integers(-2, 3, (images, 2))
    x = np.empty((images, size, size), dtype=np.uint8)
    for i in range(images):
        t = np.roll(templates[y[i]], tuple(shifts[i]), axis=(0, 1))
        x[i] = np.clip(t * 180 + rng.normal(40, 30, (size, size)), 0, 255)
    np.savez(path, x=x, y=y)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=60_000)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--set", nargs="+", default=[], help="overrides of the run (default: mix K=2, m=1; the rest derived)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        npz = Path(d) / "images.npz"
        make_npz(npz, args.images)
        cfg = load_train_config(None, [f"data.name=npz:{npz}", "mix.aug_multiplicity=2", "mix.self_mix=1", *args.set])
        shape = data_shape(cfg.data)
        q = min(1.0, (cfg.optim.batch_size or __import__("dpmix_ray.recipe").recipe.batch_size(shape.n_train)) / shape.n_train)
        cfg = load_train_config(None, [f"data.name=npz:{npz}", "mix.aug_multiplicity=2", "mix.self_mix=1", *args.set,
                                       f"optim.epochs={args.steps * q}"])
        est = estimate_run(cfg, shape)
        print("\n".join(describe_run(est)), flush=True)
        start = time.perf_counter()
        result = train(cfg, progress=False)
        measured = time.perf_counter() - start
    ratio = est["estimated_seconds"] / measured
    print(f"estimated {est['estimated_seconds']:.0f} s, measured {measured:.0f} s ({result['steps']} steps): ratio {ratio:.2f}")
    print(json.dumps({"n_train": shape.n_train, "steps": result["steps"], "batch_size": result["batch_size"], "group_size": est["group_size"],
                      "estimated_seconds": est["estimated_seconds"], "measured_seconds": measured, "ratio": ratio,
                      "probe": est["probe"], "val_accuracy": result["val_accuracy"]}))


if __name__ == "__main__":
    main()
