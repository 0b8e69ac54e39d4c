"""How much wall time does the sweep machinery add on top of the trials themselves?

ratio = sweep wall time / (Σ per-trial time / concurrency), measured side by side in one run on a
local Ray cluster that is already up (as a cluster would be), with this process's imports done (as
for any command). Per-trial time is what the trial
function itself spends (data, planning, training, evaluation); everything else (Tune scheduling,
actor start-up, checkpoints, the ledger, Optuna's sqlite, waiting for a study's search to end
before its finals, the closing report) shows up as ratio − 1. Goal: ≤ 1.10.

    .venv/bin/python bench/sweep_overhead.py [--trials 4] [--epochs 2] [--seeds 2]

Last line: one JSON object with ``ratio``.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import ray

from dpmix_ray.config import SweepConfig
from dpmix_ray.sweep.driver import run_sweep  # imported before the clock starts, like any CLI's start-up
from dpmix_ray.sweep.state import read_records


def _idle_slot_seconds(records: list[dict], slots: int) -> float:
    """Slot-seconds with no trial running, between the first trial's start and the last one's end."""
    events = sorted([(r["started_at"], 1) for r in records] + [(r["finished_at"], -1) for r in records])
    idle, running, last = 0.0, 0, events[0][0]
    for t, step in events:
        idle += max(0, slots - running) * (t - last)
        running, last = running + step, t
    return idle


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trials", type=int, default=6, help="trials per ε (2 ε)")
    ap.add_argument("--epochs", type=float, default=2.0)
    ap.add_argument("--seeds", type=int, default=2, help="final fresh-seed runs per ε")
    ap.add_argument("--cpus", type=int, default=2)
    args = ap.parse_args()

    cfg = SweepConfig.model_validate({
        "name": "overhead",
        "base": {
            "method": "dpmix_self", "data": {"name": "mnist5k"}, "model": {"name": "cnn_tiny"},
            "mix": {"aug_multiplicity": 4, "self_mix": 2}, "optim": {"batch_size": 256, "epochs": args.epochs}, "device": "cpu",
        },
        "epsilons": [2, 8], "delta": 1e-5,
        "space": {"optim.lr": {"loguniform": [0.5, 4.0]}},
        "search": {"sampler": "random", "trials_per_epsilon": args.trials, "seed": 0},
        "resources": {"cpu": 1}, "final": {"seeds": args.seeds},
    })
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    ray.init(num_cpus=args.cpus, include_dashboard=False, log_to_driver=False, configure_logging=False)
    concurrency = int(ray.cluster_resources()["CPU"] // cfg.resources.cpu)
    with tempfile.TemporaryDirectory() as tmp:
        start, start_at = time.perf_counter(), time.time()
        out = run_sweep(cfg, out=Path(tmp) / "out", progress=False)
        wall, end_at = time.perf_counter() - start, time.time()
        records = read_records(out)
    ray.shutdown()

    busy = sum(r["trial_seconds"] for r in records)
    first = min(r["started_at"] for r in records) - start_at
    tail = end_at - max(r["finished_at"] for r in records)
    idle = _idle_slot_seconds(records, concurrency)
    ideal = busy / concurrency
    ratio = wall / ideal
    print(f"trials: {len(records)} ({sum(r['status'] == 'completed' for r in records)} completed), concurrency {concurrency}")
    print(f"sweep wall {wall:.1f} s; Σ trial time {busy:.1f} s → ideal wall {ideal:.1f} s; overhead {wall - ideal:+.1f} s")
    print(f"of which: until the first trial starts {first:.1f} s (Tune setup, worker start-up); after the last ends {tail:.1f} s (report);")
    print(f"in between, {idle:.1f} slot-seconds idle (between trials, and a study's finals waiting for its search) = {idle / concurrency:.1f} s of wall")
    print(json.dumps({"ratio": round(ratio, 4), "wall_s": round(wall, 2), "sum_trial_s": round(busy, 2), "concurrency": concurrency,
                      "first_trial_start_s": round(first, 2), "after_last_trial_s": round(tail, 2),
                      "idle_slot_s": round(idle, 2), "trials": len(records), "goal": 1.10}))


if __name__ == "__main__":
    main()
