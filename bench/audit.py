"""The white-box one-run audit on the embedded default: power, soundness, tightness and cost, one markdown table.

Rows (in this order, each one training run with m white-box canary slots, guesses tuned on a held-out half,
ε_lb = the larger of Steinke et al.'s and the f-DP (run's PLD) bound at 97.5 % each):
- power: the default recipe with clipping and noise removed at a claimed ε = 1 (a test-only broken
  mechanism, tests/breaks.py; NOT PRIVATE), and a non-private run (method nonprivate, derived defaults,
  K = 1, no self-mixup); targets ε_lb > 1 and ε_lb ≥ 3;
- soundness: the default recipe at ε ∈ {1, 2, 4, 8}, ``--seeds`` seeds each (ε_lb ≤ ε every time);
- tightness: ε_lb/ε at ε = 2 and 8 with m = 1,000 (seed 0 of the soundness rows) and m = 5,000, beside the
  idealised figures (0.34 at ε = 2, m = 1,000; 0.62 at m = 5,000).
Each row is printed as a JSON line on stderr as it ends; the table and a summary line at the end.

    nice -n 10 python bench/audit.py              # the README's table (--seeds 3)
    python bench/audit.py --seeds 1 --quick       # power rows and ε ∈ {2, 8} only
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import pytest

from dpmix_ray.audit import run_audit
from dpmix_ray.config import AUDIT_CANARIES, load_train_config
from dpmix_ray.data import load_splits

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from breaks import break_mechanism  # noqa: E402  (test-only instrument: the broken row is NOT PRIVATE)

IDEALISED = {(2.0, 1000): 0.34, (2.0, 5000): 0.62}
BROKEN = "NOT PRIVATE: test-only broken mechanism (no clipping, σ = 0) at a claimed ε = 1"


def rows_to_run(seeds: int, quick: bool) -> list[dict]:
    eps = [2.0, 8.0] if quick else [1.0, 2.0, 4.0, 8.0]
    rows = [
        {"run": "broken: no clip, σ = 0 (claims ε = 1)", "sets": ["privacy.epsilon=1"], "broken": True, "m": AUDIT_CANARIES},
        {"run": "nonprivate, derived defaults, K=1, m=0", "sets": ["method=nonprivate", "mix.aug_multiplicity=1", "mix.self_mix=0"],
         "m": AUDIT_CANARIES},
    ]
    rows += [{"run": "dpmix_self (default)", "sets": [f"privacy.epsilon={e:g}", "seed=0"], "m": AUDIT_CANARIES} for e in eps]
    rows += [{"run": "dpmix_self (default)", "sets": [f"privacy.epsilon={e:g}", "seed=0"], "m": 5000} for e in (2.0, 8.0)]
    rows += [{"run": "dpmix_self (default)", "sets": [f"privacy.epsilon={e:g}", f"seed={s}"], "m": AUDIT_CANARIES}
             for s in range(1, seeds) for e in eps]
    return rows


def one(row: dict, splits) -> dict:
    cfg = load_train_config(None, row["sets"])
    t0 = time.perf_counter()
    with pytest.MonkeyPatch.context() as mp:
        if row.get("broken"):
            break_mechanism(mp, "skip_noise")
            break_mechanism(mp, "no_clip")
        res = run_audit(cfg, canaries=row["m"], splits=splits, progress=False)
    if row.get("broken"):
        res |= {"private": False, "guarantee": BROKEN}
    return {"run": row["run"], "seed": cfg.seed, **res, "wall_seconds": time.perf_counter() - t0}


def markdown(rows: list[dict]) -> str:
    lines = ["| run | seed | m | ε (spent) | ε_lb (95 %) | estimator | Steinke / f-DP (97.5 %) | correct / guesses | ε_lb/ε | idealised | val acc | wall s |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        spent = "∞ (not private)" if r["epsilon"] is None else f"{r['epsilon']:.3f}"
        if not r["private"] and r["epsilon"] is not None:
            spent += " NOT PRIVATE"
        ratio = f"{r['epsilon_lower_bound'] / r['epsilon']:.2f}" if r["epsilon"] else "—"
        ideal = IDEALISED.get((r["epsilon_target"], r["canaries"]), "—")
        est = r["estimates"]
        lines.append(f"| {r['run']} | {r['seed']} | {r['canaries']} | {spent} | {r['epsilon_lower_bound']:.2f} | {r['estimator']} | "
                     f"{est['steinke']:.2f} / {est['fdp']:.2f} | {r['correct']} / {r['guesses']} | {ratio} | {ideal} | "
                     f"{r['val_accuracy']:.3f} | {r['wall_seconds']:.0f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--quick", action="store_true", help="ε ∈ {2, 8} only")
    args = p.parse_args(argv)
    splits = load_splits(load_train_config(None, []).data)
    start, out = time.perf_counter(), []
    for row in rows_to_run(args.seeds, args.quick):
        r = one(row, splits)
        out.append(r)
        print(json.dumps({k: v for k, v in r.items() if k not in ("audit_method",)}, default=str), file=sys.stderr, flush=True)
    private = [r for r in out if r["private"]]
    summary = {
        "bench": "audit",
        "broken_rings": all(r["epsilon_lower_bound"] > 1 for r in out if r["guarantee"] == BROKEN),
        "nonprivate_power": all(r["epsilon_lower_bound"] >= 3 for r in out if r["epsilon"] is None),
        "private_within_epsilon": all(r["epsilon_lower_bound"] <= r["epsilon"] for r in private),
        "private_runs": len(private),
        "wall_seconds": time.perf_counter() - start,
    }
    print(markdown(out))
    print(json.dumps(summary), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
