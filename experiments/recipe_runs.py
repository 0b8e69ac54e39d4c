"""Run a list of trainer-core configs on MNIST-5k, two processes at a time, appending one JSON line per run.

Each run is ``dpmix_ray.trainer.train`` on ``load_train_config(None, overrides + [seed=…])``. Runs
already in the output file (same overrides and seed) are skipped, so a killed study resumes. The
studies (which configs) live in ``recipe_study.py``; this file only runs them.

    python experiments/recipe_runs.py OUT.jsonl CONFIGS.json [--workers 2]

CONFIGS.json: a list of ``{"overrides": [...], "seeds": [...]}``. ``--variants FILE.py`` registers that
file's ``VARIANTS`` (name → model constructor) as extra ``model.name`` choices, for model studies.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path


def run_key(overrides: list[str], seed: int) -> str:
    """The identity of one run: its sorted overrides and its seed."""
    return json.dumps([sorted(overrides), seed])


def _init_worker(variants: str | None) -> None:
    import torch

    os.nice(10)  # a shared machine: the experiments yield to interactive work
    torch.set_num_threads(1)
    if variants:
        import runpy

        from dpmix_ray import models

        models._SCRATCH.update(runpy.run_path(variants)["VARIANTS"])


def run_one(overrides: list[str], seed: int) -> dict:
    """One trainer-core run; the record keeps what the study summary needs, and the run's cost."""
    from dpmix_ray.config import load_train_config
    from dpmix_ray.trainer import train

    cfg = load_train_config(None, [*overrides, f"seed={seed}"])
    t0 = time.perf_counter()
    r = train(cfg, progress=False)
    keep = ("val_accuracy", "test_accuracy", "val_accuracy_live", "test_accuracy_live", "noise_multiplier", "steps",
            "epochs", "batch_size", "epsilon_spent", "sample_rate", "n_train")
    out = {"key": run_key(overrides, seed), "overrides": overrides, "seed": seed, **{k: r.get(k) for k in keep}}
    group = cfg.mix.group_size
    out["image_grads"] = r["steps"] * r["sample_rate"] * r["n_train"] * group
    out["seconds"] = time.perf_counter() - t0
    out["lr"] = r["config"]["optim"]["lr"]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("configs", type=Path)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--variants", type=str, default=None)
    args = ap.parse_args()
    done = set()
    if args.out.exists():
        done = {json.loads(line)["key"] for line in args.out.read_text().splitlines() if line.strip()}
    jobs = [(c["overrides"], s) for c in json.loads(args.configs.read_text()) for s in c["seeds"]]
    jobs = [j for j in jobs if run_key(*j) not in done]
    print(f"{len(jobs)} runs to do ({len(done)} done)", flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with ProcessPoolExecutor(args.workers, initializer=_init_worker, initargs=(args.variants,)) as pool, args.out.open("a") as f:
        futures = {pool.submit(run_one, o, s): (o, s) for o, s in jobs}
        for fut in as_completed(futures):
            o, s = futures[fut]
            try:
                rec = fut.result()
            except Exception as e:  # a diverged or refused run is a result too
                rec = {"key": run_key(o, s), "overrides": o, "seed": s, "error": f"{type(e).__name__}: {e}"[:300]}
            f.write(json.dumps(rec) + "\n")
            f.flush()
            shown = {k: rec.get(k) for k in ("val_accuracy", "test_accuracy", "val_accuracy_live", "seconds", "error") if rec.get(k) is not None}
            print(" ".join(o), f"seed={s}", json.dumps(shown), flush=True)


if __name__ == "__main__":
    main()
