"""The one-run audit's ε lower bound for non-private runs and for dpsgd, augmult and dpmix_self at
ε ∈ {1, 2, 4, 8} on the embedded default: one markdown table, then one JSON line.

A non-private run must show ε_lb ≥ 1 (the audit has power); a private run must never show ε_lb
above its ε. Every run is one training run with the audit's default canaries and guesses.

    nice -n 10 python bench/audit.py    # the table in the README: 14 runs of the default (37 min measured, loaded 2 cores)
    python bench/audit.py --quick       # smoke run: sklearn digits, ε ∈ {1, 8}; too few canaries and steps for
                                        # the non-private power check to hold (~5 min)
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from dpmix_ray.audit import run_audit
from dpmix_ray.config import AUDIT_CANARIES, AUDIT_GUESSES
from dpmix_ray.config import load_train_config
from dpmix_ray.data import load_splits

# Each method's counts, as the sweep fixes them; the rest is the embedded default.
PRIVATE = {
    "dpsgd": ["method=dpsgd", "mix.aug_multiplicity=1", "mix.self_mix=0"],
    "augmult": ["method=augmult", "mix.self_mix=0"],
    "dpmix_self": ["method=dpmix_self"],
}
# The default's lr = 2 is a DP-SGD step (clipped, noisy); a non-private run diverges at it.
NONPRIVATE_OPTIM = ["method=nonprivate", "optim.lr=0.1", "optim.momentum=0.9"]
NONPRIVATE = {
    # The power check: plain SGD that fits its training set, mislabelled canaries included.
    "nonprivate, K=1, 20 epochs": [*NONPRIVATE_OPTIM, "mix.aug_multiplicity=1", "mix.self_mix=0", "optim.epochs=20"],
    # The default recipe without privacy: 6 epochs of K=8 augmentations and 4 self-mixups.
    "nonprivate, default recipe": NONPRIVATE_OPTIM,
}


def rows_to_run(quick: bool) -> list[tuple[str, list[str]]]:
    eps = [1.0, 8.0] if quick else [1.0, 2.0, 4.0, 8.0]
    rows = list(NONPRIVATE.items())
    rows += [(name, [*sets, f"privacy.epsilon={e:g}"]) for name, sets in PRIVATE.items() for e in eps]
    return rows


def markdown(rows: list[dict]) -> str:
    lines = [
        "| run | ε (target) | ε spent | ε_lb (95 %) | correct / guesses | max provable | val acc | wall s |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        eps = "∞" if r["epsilon"] is None else f"{r['epsilon_target']:g}"
        spent = "—" if r["epsilon"] is None else f"{r['epsilon']:.3f}"
        lines.append(
            f"| {r['run']} | {eps} | {spent} | {r['epsilon_lower_bound']:.2f} | {r['correct']} / {r['guesses']} | "
            f"{r['max_provable_epsilon']:.2f} | {r['val_accuracy']:.3f} | {r['wall_seconds']:.0f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="sklearn digits, 200 canaries, 100 guesses, ε ∈ {1, 8}")
    args = p.parse_args(argv)
    base = ["data.name=digits"] if args.quick else []
    canaries, guesses = (200, 100) if args.quick else (AUDIT_CANARIES, AUDIT_GUESSES)
    splits = load_splits(load_train_config(None, base).data)
    start, out = time.perf_counter(), []
    for name, sets in rows_to_run(args.quick):
        t0 = time.perf_counter()
        res = run_audit(load_train_config(None, base + sets), canaries=canaries, guesses=guesses, splits=splits, progress=False)
        out.append({"run": name, **res, "wall_seconds": time.perf_counter() - t0})
        print(f"{name} ε={res['epsilon_target']}: ε_lb {res['epsilon_lower_bound']:.2f} ({res['correct']}/{guesses})", file=sys.stderr, flush=True)
    private = [r for r in out if r["epsilon"] is not None]
    summary = {
        "bench": "audit",
        "quick": args.quick,
        "canaries": canaries,
        "guesses": guesses,
        "max_provable_epsilon": out[0]["max_provable_epsilon"],
        "nonprivate_power": max(r["epsilon_lower_bound"] for r in out if r["epsilon"] is None) >= 1.0,
        "private_within_epsilon": all(r["epsilon_lower_bound"] <= r["epsilon"] for r in private),
        "rows": [{k: r[k] for k in ("run", "epsilon_target", "epsilon", "epsilon_lower_bound", "correct", "guesses", "val_accuracy",
                                    "wall_seconds")} for r in out],
        "wall_seconds": time.perf_counter() - start,
    }
    print(markdown(out))
    print(json.dumps(summary), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
