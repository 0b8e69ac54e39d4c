"""The recipe studies on MNIST-5k (3,500 / 500 / 1,000), and their summaries.

    python experiments/recipe_study.py run STUDY       # appends to experiments/results/recipe/STUDY.jsonl
    python experiments/recipe_study.py show STUDY      # mean ± sd of val / test per config, best val first
    python experiments/recipe_study.py table STUDY     # the same as a markdown table, one column per ε

Every run is the trainer core with ``BASE`` plus the study's overrides; C = 1 throughout, so lr is
lr·C. Selection reads validation accuracy only; test is reported beside it.
"""

from __future__ import annotations

import itertools
import json
import statistics
import sys
from pathlib import Path

HERE = Path(__file__).parent
OUT = HERE / "results" / "recipe"
BASE = ["data.name=mnist5k", "privacy.clip_norm=1.0", "privacy.delta=1e-5", "privacy.accountant=rdp", "optim.momentum=0.0",
        "device=cpu"]
EPSILONS = (1, 2, 4, 8)


def method(k: int, m: int) -> list[str]:
    """The method name a (K, m) group implies."""
    name = "dpsgd" if k == 1 else ("augmult" if m == 0 else "dpmix_self")
    return [f"method={name}", f"mix.aug_multiplicity={k}", f"mix.self_mix={m}"]


def grid(seeds: list[int], **axes: list[list[str]]) -> list[dict]:
    """Every combination of the axes' override lists, each run on ``seeds``."""
    return [{"overrides": BASE + [o for part in combo for o in part], "seeds": seeds} for combo in itertools.product(*axes.values())]


def eps(*values: float) -> list[list[str]]:
    return [[f"privacy.epsilon={e}"] for e in values]


def one(key: str, *values: object) -> list[list[str]]:
    return [[f"{key}={v}"] for v in values]


def sigma(epsilon: float, batch: int, epochs: float, n: int = 3_500) -> tuple[float, int]:
    """The planner's σ and step count for a run (what the trainer will compute)."""
    from dpmix_ray.privacy import calibrate_noise, steps_for_epochs

    steps = steps_for_epochs(epochs, batch / n)
    return calibrate_noise(epsilon=epsilon, delta=1e-5, sample_rate=batch / n, steps=steps, accountant="rdp", neighbouring="zero_out"), steps


def tau_grid(seeds: list[int], epsilons: tuple[float, ...], mixes: list[tuple[int, int]], batches: tuple[int, ...],
             epochs: tuple[float, ...], taus: tuple[float, ...], model: str = "cnn_tiny", ema_half_life: float = 0.1) -> list[dict]:
    """Runs whose lr puts the noise's random walk at τ = lr·σC/B·√T per coordinate (C = 1), with an EMA
    whose half-life is ``ema_half_life``·T steps."""
    out = []
    for e, (k, m), b, ep, tau in itertools.product(epsilons, mixes, batches, epochs, taus):
        s, steps = sigma(e, b, ep)
        lr = tau * b / (s * steps**0.5)
        decay = 0.5 ** (1 / max(1.0, ema_half_life * steps))
        out.append({"overrides": BASE + [f"model.name={model}", *method(k, m), f"privacy.epsilon={e}", f"optim.batch_size={b}",
                                         f"optim.epochs={ep}", f"optim.lr={lr:.4g}", f"optim.ema={decay:.4g}"],
                    "seeds": seeds, "tau": tau})
    return out


STUDIES: dict[str, list[dict]] = {
    # What EMA decay, on a quickstart-sized run (K=4, m=1, B=256, 6 epochs, lr 2): ~80 steps.
    "ema": grid([0, 1], e=eps(1, 4), model=[["model.name=cnn_tiny"]], mix=[method(4, 1)],
                b=one("optim.batch_size", 256), ep=one("optim.epochs", 6), lr=one("optim.lr", 2.0),
                ema=one("optim.ema", 0.9, 0.95, 0.98, 0.99, 0.995)),
    # How to spend ~100k image-gradients per run (3,500 examples × epochs × group size): K/m vs epochs,
    # batch size and lr (C = 1), with an EMA (half-life 14 steps) reported beside the live iterate.
    "alloc": [
        *grid([0], e=eps(1, 4), model=[["model.name=cnn_tiny"]], mix=[method(1, 0)], b=one("optim.batch_size", 256, 512, 1024),
              ep=one("optim.epochs", 12, 24, 48), lr=one("optim.lr", 2.0, 4.0), ema=one("optim.ema", 0.95)),
        *grid([0], e=eps(1, 4), model=[["model.name=cnn_tiny"]], mix=[method(2, 1)], b=one("optim.batch_size", 256, 512, 1024),
              ep=one("optim.epochs", 6, 12), lr=one("optim.lr", 2.0, 4.0), ema=one("optim.ema", 0.95)),
        *grid([0], e=eps(1, 4), model=[["model.name=cnn_tiny"]], mix=[method(4, 1)], b=one("optim.batch_size", 256, 512, 1024),
              ep=one("optim.epochs", 6), lr=one("optim.lr", 2.0, 4.0), ema=one("optim.ema", 0.95)),
    ],
    # The noise's random walk τ = lr·σC/B·√T as the lr axis (the alloc study collapsed to chance at
    # τ ≳ 0.4): DP-SGD (K = 1) over batch size and epochs at ε = 1 and 4.
    "tau": tau_grid([0], (1, 4), [(1, 0)], (256, 512, 1024, 2048), (6, 12, 24, 48), (0.05, 0.1, 0.2)),
    # Group size against epochs at ~85k–175k image-gradients per run, at τ = 0.1 (the tau study's
    # optimum at ε = 1 and 4) and 0.14; EMA half-life T/20. (Cut from three τ and two batch sizes
    # when the shared machine ran ~5× slower than quiet; the first runs of the larger grid are kept.)
    "group": [
        *tau_grid([0], (1, 4), [(1, 0)], (512,), (24, 48), (0.1, 0.14), ema_half_life=0.05),
        *tau_grid([0], (1, 4), [(2, 1)], (512,), (8, 16), (0.1, 0.14), ema_half_life=0.05),
        *tau_grid([0], (1, 4), [(4, 1)], (512,), (6, 10), (0.1, 0.14), ema_half_life=0.05),
    ],
    # The model zoo under the same DP-SGD run (K = 1, B = 512, 24 epochs, T = 165), each at its best
    # τ: cnn_tiny, the new cnn, the new cnn at half width, and the old cnn (experiments/cnn_variants.py).
    "models": [
        c for name in ("cnn", "cnn_narrow", "cnn_v0")
        for c in tau_grid([0], (1, 4), [(1, 0)], (512,), (24,), (0.05, 0.1, 0.2), model=name, ema_half_life=0.05)
    ],
    # Second round: the strided design without weight standardisation, cnn_tiny at twice the width,
    # and the new cnn at a smaller τ (its best in round one was the smallest tried).
    "models2": [
        c for name in ("cnn_plain_gn", "cnn_tiny_wide")
        for c in tau_grid([0], (1, 4), [(1, 0)], (512,), (24,), (0.05, 0.1, 0.2), model=name, ema_half_life=0.05)
    ] + tau_grid([0], (1, 4), [(1, 0)], (512,), (24,), (0.025,), model="cnn", ema_half_life=0.05),
    # Head to head on one split and fresh seeds at τ = 0.1: cnn_tiny, its 2×-wide version, the new cnn.
    "models3": [
        c for name in ("cnn_tiny", "cnn_tiny_wide", "cnn")
        for c in tau_grid([1, 2], (4, 8), [(1, 0)], (512,), (24,), (0.1,), model=name, ema_half_life=0.05)
    ],
    # lr schedule: warm-up fraction and cosine decay on the derived recipe (dpmix_self K = 2, m = 1),
    # paired: privacy.reproducible makes the noise a function of the seed, so variants share it.
    "schedule": grid([0, 1], e=eps(1, 4), model=[["model.name=cnn_tiny", "privacy.reproducible=true"]], mix=[method(2, 1)],
                     s=[["optim.lr_schedule=constant", "optim.warmup=0.0"], ["optim.lr_schedule=constant", "optim.warmup=0.1"],
                        ["optim.lr_schedule=constant", "optim.warmup=0.25"], ["optim.lr_schedule=cosine", "optim.warmup=0.0"],
                        ["optim.lr_schedule=cosine", "optim.warmup=0.1"]]),
    # The non-private reference: plain SGD (no momentum, no clipping), K = 1, B = 256, 12 epochs.
    "nonprivate": grid([0], model=[["model.name=cnn_tiny", "method=nonprivate", "mix.aug_multiplicity=1", "mix.self_mix=0"]],
                       b=one("optim.batch_size", 256), ep=one("optim.epochs", 12, 24), lr=one("optim.lr", 0.1, 0.3, 1.0)),
    # The derived default (batch size, epochs and lr null: recipe.resolve, τ = 0.1) on fresh seeds, for
    # dpmix_self (K = 2, m = 1) and plain DP-SGD, with an EMA (half-life ~8 of the 165 steps).
    "final": grid([1, 2, 3], e=eps(*EPSILONS), model=[["model.name=cnn_tiny"]], mix=[method(2, 1), method(1, 0)],
                  ema=one("optim.ema", 0.92)),
    # More compute on the same 165 steps (the tau study: at fixed T, larger B was better, as TAN
    # predicts): DP-SGD at B = 1,024 for 48 epochs, and dpmix_self K = 2, m = 1 at B = 512 for 24.
    "final2": grid([1, 2, 3], e=eps(*EPSILONS), model=[["model.name=cnn_tiny", "optim.ema=0.92"]],
                   r=[method(1, 0) + ["optim.batch_size=1024", "optim.epochs=48"],
                      method(2, 1) + ["optim.batch_size=512", "optim.epochs=24"]]),
    # Transfer: τ = 0.1 was chosen at ε = 1 and 4; is it still the best τ at ε = 2 and 8?
    "transfer": tau_grid([0], (2, 8), [(2, 1)], (256,), (12,), (0.07, 0.1, 0.14), ema_half_life=0.05),
}


def summarise(records: list[dict]) -> list[dict]:
    """Per config (overrides without the seed): mean and sd of val / test (EMA and live), runs, seconds."""
    groups: dict[str, list[dict]] = {}
    for r in records:
        if "error" not in r:
            groups.setdefault(json.dumps(sorted(set(r["overrides"]) - set(BASE))), []).append(r)
    rows = []
    for key, rs in groups.items():
        row = {"config": json.loads(key), "n": len(rs), "seconds": statistics.mean(r["seconds"] for r in rs),
               "steps": rs[0]["steps"], "sigma": rs[0]["noise_multiplier"]}
        for metric in ("val_accuracy", "test_accuracy", "val_accuracy_live", "test_accuracy_live"):
            vals = [r[metric] for r in rs if r.get(metric) is not None]
            if vals:
                row[metric] = statistics.mean(vals)
                row[metric + "_sd"] = statistics.stdev(vals) if len(vals) > 1 else 0.0
        rows.append(row)
    return sorted(rows, key=lambda r: -r["val_accuracy"])


def show(study: str) -> None:
    records = [json.loads(line) for line in (OUT / f"{study}.jsonl").read_text().splitlines() if line.strip()]
    errors = [r for r in records if "error" in r]
    for row in summarise(records):
        live = f"  live {100 * row['val_accuracy_live']:.1f} / {100 * row['test_accuracy_live']:.1f}" if "val_accuracy_live" in row else ""
        print(f"val {100 * row['val_accuracy']:5.1f} ± {100 * row['val_accuracy_sd']:3.1f}  test {100 * row['test_accuracy']:5.1f} ± "
              f"{100 * row['test_accuracy_sd']:3.1f}{live}  n={row['n']} T={row['steps']} σ={row['sigma']:.2f} "
              f"{row['seconds']:.0f}s  {' '.join(row['config'])}")
    for r in errors:
        print("ERROR", " ".join(r["overrides"]), r["error"])


def table(study: str) -> None:
    """A markdown table of a seeded study: one row per recipe, one column per ε, val / test mean ± sd."""
    records = [json.loads(line) for line in (OUT / f"{study}.jsonl").read_text().splitlines() if line.strip()]
    cells: dict[str, dict[str, str]] = {}
    for row in summarise(records):
        e = next(c.split("=")[1] for c in row["config"] if c.startswith("privacy.epsilon="))
        name = " ".join(c for c in row["config"] if not c.startswith(("privacy.epsilon=", "model.name=", "optim.lr=", "optim.ema=")))
        cells.setdefault(name, {})[e] = (
            f"{100 * row['val_accuracy']:.1f} ± {100 * row['val_accuracy_sd']:.1f} / "
            f"{100 * row['test_accuracy']:.1f} ± {100 * row['test_accuracy_sd']:.1f} (n={row['n']})"
        )
    eps_cols = sorted({e for c in cells.values() for e in c}, key=float)
    print("| recipe | " + " | ".join(f"ε={e} val / test (%)" for e in eps_cols) + " |")
    print("|---" * (len(eps_cols) + 1) + "|")
    for name, c in cells.items():
        print(f"| {name} | " + " | ".join(c.get(e, "–") for e in eps_cols) + " |")


def run(study: str) -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    configs = OUT / f"{study}.configs.json"
    configs.write_text(json.dumps(STUDIES[study], indent=1))
    sys.argv = ["recipe_runs.py", str(OUT / f"{study}.jsonl"), str(configs), "--variants", str(HERE / "cnn_variants.py")]
    sys.path.insert(0, str(HERE))
    from recipe_runs import main

    main()


if __name__ == "__main__":
    {"run": run, "show": show, "table": table}[sys.argv[1]](sys.argv[2])
