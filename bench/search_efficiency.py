"""Search efficiency: best-so-far test accuracy of the released recipe against cumulative search compute, per ε.

Strategies, each one real sweep (``run_sweep``) on MNIST-5k, run one after another on one local Ray:

* ``tpe``: as before issue 10: independent TPE studies per ε from random points, full-size trials, lr
  coordinates (lr, B, epochs, K), no seeds, no transfer, no early stopping;
* ``random``: the same space and trials, random search;
* ``new``: the DP-aware search at full size: τ coordinates (τ, B, T, K), every study seeded with the
  default recipe, transfer across ε, early stopping as the sweep's default is set;
* ``new_proxy``: ``new`` with TAN proxy trials at batch 64 (their recipes evaluated at full size);
* ``new_proxy_asha``: ``new_proxy`` with ASHA early stopping (grace ``--grace``, else the sweep's default),
  side by side with ``new_proxy`` to measure what early stopping buys.

Compute is each trial's CPU seconds (its process's CPU time: robust to whatever else shares the
machine), summed over a strategy's search trials at that ε in the order they finished. The released
recipe at each point is the one selection picks from the trials finished so far
(:func:`dpmix_ray.sweep.selection.best`); its test accuracy is that of a full-size run of it: the
trial itself, or for a proxy a full-size run on the final seed (not counted as search compute: every
strategy re-runs its recipe on fresh seeds anyway). ``fixed recipe`` is the README's fixed default
(dpmix_self, B 256, 6 epochs, lr 2, K 8, m 4; docs/results/mnist5k_table.md, test mean of 3 seeds).

    nice -n 10 .venv/bin/python bench/search_efficiency.py [--quick] [--epsilons 1 2 4 8] [--trials 6]

Last line: one JSON object: per ε, the accuracy each strategy reaches at equal compute (the smallest
strategy total), the compute each needs to reach the fixed recipe and to come within 1 point of the best
either TPE or the new search finds (null where never), and that compute's ratio TPE / each proxy search.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import ray

from dpmix_ray.config import SweepConfig, TrainConfig
from dpmix_ray.sweep import budget, selection
from dpmix_ray.sweep.driver import run_sweep
from dpmix_ray.sweep.plan import build_groups
from dpmix_ray.sweep.state import read_records
from dpmix_ray.trainer import fit

FIXED_RECIPE_TEST = {1.0: 0.819, 2.0: 0.910, 4.0: 0.939, 8.0: 0.950}
BASE: dict[str, Any] = {
    "method": "dpmix_self", "data": {"name": "mnist5k"}, "model": {"name": "cnn_tiny"},
    "mix": {"aug_multiplicity": 2, "self_mix": 1}, "optim": {"batch_size": 256, "epochs": 6.0, "lr": 2.0}, "device": "cpu",
}
OLD_SPACE = {"optim.lr": {"loguniform": [0.25, 4.0]}, "optim.batch_size": {"choice": [128, 256, 512]},
             "optim.epochs": {"uniform": [2.0, 12.0]}, "mix.aug_multiplicity": {"int": [2, 3]}}
NEW_SPACE = {"dp.tau": {"loguniform": [0.04, 0.25]}, "optim.batch_size": {"choice": [128, 256, 512]},
             "dp.steps": {"int": [30, 120]}, "mix.aug_multiplicity": {"int": [2, 3]}}
QUICK_BASE = BASE | {"data": {"name": "digits", "limit": 600}, "optim": {"batch_size": 128, "epochs": 2.0, "lr": 1.0}}
QUICK_OLD = {"optim.lr": {"loguniform": [0.25, 4.0]}, "optim.epochs": {"uniform": [1.0, 3.0]}}
QUICK_NEW = {"dp.tau": {"loguniform": [0.04, 0.25]}, "dp.steps": {"int": [4, 12]}}
PROXY_BATCH = 64


def strategies(args: argparse.Namespace) -> dict[str, SweepConfig]:
    base, old, new = (QUICK_BASE, QUICK_OLD, QUICK_NEW) if args.quick else (BASE, OLD_SPACE, NEW_SPACE)
    common = {"base": base, "epsilons": args.epsilons, "delta": 1e-5, "final": {"seeds": 0},
              "resources": {"cpu": 1}}
    search = {"trials_per_epsilon": args.trials, "seed": args.seed} | ({"grace": args.grace} if args.grace is not None else {})
    plain = {"warm_start": False, "transfer": False, "scheduler": "fifo"}
    out = {
        "tpe": {"space": old, "search": search | plain | {"sampler": "tpe"}},
        "random": {"space": old, "search": search | plain | {"sampler": "random"}},
        "new": {"space": new, "search": search | {"sampler": "tpe", "scheduler": args.new_scheduler}},
        "new_proxy": {"space": new, "final": {"seeds": 1},
                      "search": search | {"sampler": "tpe", "scheduler": args.new_scheduler, "trials_per_epsilon": args.proxy_trials,
                                          "proxy": {"batch_size": args.proxy_batch}}},
        "new_proxy_asha": {"space": new, "final": {"seeds": 1},
                           "search": search | {"sampler": "tpe", "scheduler": "asha", "trials_per_epsilon": args.proxy_trials,
                                               "proxy": {"batch_size": args.proxy_batch}}},
    }
    return {k: SweepConfig.model_validate(common | {"name": k} | v) for k, v in out.items() if k in args.variants}


@ray.remote(num_cpus=1)
def _full_size_test(train_json: str, plan_json: str) -> float:
    """A recipe's full-size run (the final's config and plan): its test accuracy."""
    cfg = TrainConfig.model_validate_json(train_json)
    plan = budget.TrialPlan.from_dict(json.loads(plan_json))
    return fit(cfg, plan.run, progress=False).result["test_accuracy"]


def curves(cfg: SweepConfig, records: list[dict[str, Any]]) -> dict[float, list[dict[str, Any]]]:
    """Per ε: the search's points (cumulative CPU s, incumbent record) in the order its trials finished."""
    out: dict[float, list[dict[str, Any]]] = {}
    for g in build_groups(cfg):
        mine = sorted((r for r in records if r["group"] == g.key and r["phase"] == "search"), key=lambda r: r["finished_at"])
        finals = [r for r in records if r["group"] == g.key and r["phase"] == "final" and r["status"] == "completed"]
        spent, points = 0.0, []
        for i, r in enumerate(mine):
            spent += r.get("trial_cpu_seconds") or 0.0
            best = selection.best(mine[: i + 1])
            points.append({"cpu_s": spent, "wall_s": r["trial_seconds"], "best": best, "finals": finals})
        out[g.epsilon] = points
    return out


def evaluate(cfg: SweepConfig, all_curves: dict[float, list[dict[str, Any]]]) -> None:
    """Each point's released-recipe test accuracy: the incumbent's own (full size), or a full-size run of a proxy's recipe."""
    groups = {g.epsilon: g for g in build_groups(cfg)}
    pending: dict[tuple[float, str], Any] = {}
    for eps, points in all_curves.items():
        for p in points:
            best = p["best"]
            if best is None or not best.get("proxy"):
                continue
            key = (eps, json.dumps(best["params"], sort_keys=True))
            same = [f for f in p["finals"] if f["params"] == best["params"]]
            if same:
                pending.setdefault(key, same[0]["test_accuracy"])
            elif key not in pending:
                spec = budget.trial_spec(cfg, groups[eps], phase="final", index=0, params=best["params"], group_plan=None, synthetic=None)
                pending[key] = _full_size_test.remote(json.dumps(spec["train"]), json.dumps(spec["plan"]))
    done = {k: (ray.get(v) if isinstance(v, ray.ObjectRef) else v) for k, v in pending.items()}
    for eps, points in all_curves.items():
        for p in points:
            best = p["best"]
            if best is None:
                p["test"] = None
            elif best.get("proxy"):
                p["test"] = done[(eps, json.dumps(best["params"], sort_keys=True))]
            else:
                p["test"] = best["test_accuracy"]


def at(points: list[dict[str, Any]], compute: float) -> float | None:
    """The released recipe's test accuracy once ``compute`` CPU seconds of search have finished."""
    seen = [p["test"] for p in points if p["cpu_s"] <= compute + 1e-9 and p["test"] is not None]
    return seen[-1] if seen else None


def first_reaching(points: list[dict[str, Any]], level: float) -> float | None:
    return next((p["cpu_s"] for p in points if p["test"] is not None and p["test"] >= level - 1e-9), None)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="smoke test: digits, tiny runs, 2 trials")
    ap.add_argument("--epsilons", type=float, nargs="+", default=[1.0, 2.0, 4.0, 8.0])
    ap.add_argument("--trials", type=int, default=6, help="full-size trials per ε (tpe, random, new)")
    ap.add_argument("--proxy-trials", type=int, default=10, help="proxy trials per ε (new_proxy)")
    ap.add_argument("--proxy-batch", type=int, default=PROXY_BATCH)
    ap.add_argument("--new-scheduler", choices=["asha", "fifo"], default=None, help="override the sweep default for new/new_proxy")
    ap.add_argument("--grace", type=float, default=None, help="override ASHA's grace period (fraction of a trial's steps)")
    ap.add_argument("--variants", nargs="+", default=["tpe", "random", "new", "new_proxy", "new_proxy_asha"])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--cpus", type=int, default=2)
    ap.add_argument("--keep", type=Path, default=None, help="keep each strategy's sweep output under this dir")
    args = ap.parse_args()
    if args.quick:
        args.epsilons, args.trials, args.proxy_trials, args.proxy_batch = args.epsilons[:2], 2, 3, 32

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    ray.init(num_cpus=args.cpus, include_dashboard=False, log_to_driver=False, configure_logging=False)
    started, load = time.perf_counter(), os.getloadavg()
    results: dict[str, dict[float, list[dict[str, Any]]]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        root = args.keep or Path(tmp)
        for name, cfg in strategies(args).items():
            t0 = time.perf_counter()
            out = run_sweep(cfg, out=root / name, progress=False)
            results[name] = curves(cfg, read_records(out))
            evaluate(cfg, results[name])
            print(f"{name}: {time.perf_counter() - t0:.0f} s wall", flush=True)
    ray.shutdown()

    summary: dict[str, Any] = {}
    for eps in args.epsilons:
        per = {name: c[eps] for name, c in results.items()}
        totals = {name: pts[-1]["cpu_s"] if pts else 0.0 for name, pts in per.items()}
        equal = min(totals.values())
        finals = {name: (pts[-1]["test"] if pts else None) for name, pts in per.items()}
        reference = [v for k, v in finals.items() if k in ("tpe", "new_proxy", "new_proxy_asha") and v is not None]
        target = max(reference) - 0.01 if reference else None
        within = {name: first_reaching(pts, target) if target is not None else None for name, pts in per.items()}
        fixed = FIXED_RECIPE_TEST.get(eps)
        row = {
            "equal_compute_cpu_s": round(equal, 1),
            "accuracy_at_equal_compute": {name: at(pts, equal) for name, pts in per.items()},
            "final_accuracy": finals, "total_cpu_s": {k: round(v, 1) for k, v in totals.items()},
            "fixed_recipe": fixed,
            "cpu_s_to_fixed_recipe": {name: first_reaching(pts, fixed) if fixed is not None else None for name, pts in per.items()},
            "within_1pt_of": target,
            "cpu_s_to_within_1pt": within,
            **{f"tpe_over_{n}_to_within_1pt": (round(within["tpe"] / within[n], 2) if within.get("tpe") and within.get(n) else None)
               for n in ("new_proxy", "new_proxy_asha")},
        }
        summary[f"{eps:g}"] = row
        print(f"ε={eps:g}: " + "  ".join(
            f"{n}: {row['accuracy_at_equal_compute'][n]} @ {equal:.0f} s (final {finals[n]}, {totals[n]:.0f} s; to fixed "
            f"{row['cpu_s_to_fixed_recipe'][n]}; to within 1pt {within[n]})" for n in per))
    print(json.dumps({"epsilons": summary, "compute": "search trials' CPU seconds", "wall_s": round(time.perf_counter() - started, 1),
                      "load_at_start": [round(x, 2) for x in load], "quick": args.quick}))


if __name__ == "__main__":
    main()
