"""The README's first results table: nonprivate / dpsgd / augmult / dpmix_self on MNIST-5k, per ε, over seeds.

Every run is the trainer core (``dpmix_ray.trainer.train``) with the recipe below; a plain Opacus
DP-SGD run (``PrivacyEngine.make_private_with_epsilon``, Poisson sampling, same model, batch,
epochs, lr and clip) is the outside reference. Selection never looks at test: the recipes are
fixed up front and the table reports val and test accuracy, mean ± sd over seeds.

    python experiments/results_table.py --out results/baselines          # ~45 min on 2 CPU cores
    python experiments/results_table.py --out results/baselines --methods dpmix_diff   # adds rows; done ones are kept
    python experiments/results_table.py --epsilons 2 --seeds 0 --quick   # a minute, smoke test
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

# The recipe, stated once. Mix counts per method; everything else shared.
BASE = [
    "data.name=mnist5k", "model.name=cnn_tiny", "optim.batch_size=256", "optim.epochs=6", "optim.lr=2.0",
    "optim.momentum=0.0", "privacy.clip_norm=1.0", "privacy.delta=1e-5", "privacy.accountant=rdp",
]
METHODS = {
    "nonprivate": ["method=nonprivate", "mix.aug_multiplicity=1", "mix.self_mix=0", "optim.lr=0.1", "optim.momentum=0.9", "optim.epochs=20"],
    "dpsgd": ["method=dpsgd", "mix.aug_multiplicity=1", "mix.self_mix=0"],
    "augmult": ["method=augmult", "mix.aug_multiplicity=8", "mix.self_mix=0"],
    "dpmix_self": ["method=dpmix_self", "mix.aug_multiplicity=8", "mix.self_mix=4"],
    # Same group size (12) as dpmix_self: two of its self-mixups become mixups with public synthetic
    # digits (experiments/synth_digits28.yaml; generated once, then read from the cache).
    "dpmix_diff": ["method=dpmix_diff", "mix.aug_multiplicity=8", "mix.self_mix=2", "mix.diff_mix=2", "mix.synthetic=synth",
                   "synth.model=digits-ddpm", "synth.images_per_class=200", "synth.image_size=28", "synth.channels=1",
                   "synth.workers=1", "synth.seed=0"],
}


def run_one(job: tuple[str, float, int, list[str]]) -> dict:
    import torch

    torch.set_num_threads(1)
    from dpmix_ray.config import load_train_config
    from dpmix_ray.trainer import train

    method, eps, seed, extra = job
    if method == "opacus_dpsgd":
        return run_opacus(eps, seed, extra)
    budget = [f"privacy.epsilon={eps}"] if method != "nonprivate" else []
    cfg = load_train_config(None, BASE + METHODS[method] + extra + budget + [f"seed={seed}"])
    r = train(cfg, progress=False)
    return {"method": method, "epsilon": eps, "seed": seed, "val": r["val_accuracy"], "test": r["test_accuracy"],
            "epsilon_spent": r["epsilon_spent"], "sigma": r["noise_multiplier"], "steps": r["steps"], "seconds": r["wall_seconds"]}


def run_opacus(eps: float, seed: int, extra: list[str]) -> dict:
    """Plain Opacus DP-SGD: its own PrivacyEngine, DPDataLoader (Poisson) and clipping; our data split and model."""
    import torch
    from opacus import PrivacyEngine
    from torch.utils.data import DataLoader, TensorDataset

    from dpmix_ray.config import load_train_config
    from dpmix_ray.data import load_splits
    from dpmix_ray.models import build_model
    from dpmix_ray.trainer import evaluate

    cfg = load_train_config(None, BASE + METHODS["dpsgd"] + extra + [f"privacy.epsilon={eps}", f"seed={seed}"])
    torch.manual_seed(seed)
    t0 = time.perf_counter()
    splits = load_splits(cfg.data)
    model = build_model(cfg.model, in_channels=splits.channels, num_classes=splits.num_classes, image_size=splits.image_size)
    opt = torch.optim.SGD(model.parameters(), lr=cfg.optim.lr, momentum=cfg.optim.momentum)
    loader = DataLoader(TensorDataset(splits.train.x, splits.train.y), batch_size=cfg.optim.batch_size)
    engine = PrivacyEngine(accountant="rdp")
    model, opt, loader = engine.make_private_with_epsilon(
        module=model, optimizer=opt, data_loader=loader, target_epsilon=eps, target_delta=cfg.privacy.delta,
        epochs=int(cfg.optim.epochs), max_grad_norm=cfg.privacy.clip_norm, poisson_sampling=True,
    )
    for _ in range(int(cfg.optim.epochs)):
        for xb, yb in loader:
            if len(xb) == 0:
                continue
            opt.zero_grad(set_to_none=True)
            torch.nn.functional.cross_entropy(model(xb), yb).backward()
            opt.step()
    return {"method": "opacus_dpsgd", "epsilon": eps, "seed": seed, "val": evaluate(model, splits.val, torch.device("cpu")),
            "test": evaluate(model, splits.test, torch.device("cpu")), "epsilon_spent": engine.get_epsilon(cfg.privacy.delta),
            "sigma": opt.noise_multiplier, "steps": None, "seconds": time.perf_counter() - t0}


def table(rows: list[dict], epsilons: list[float], methods: list[str]) -> str:
    def cell(sel: list[dict], key: str) -> str:
        vals = [r[key] for r in sel]
        sd = statistics.stdev(vals) if len(vals) > 1 else 0.0
        return f"{100 * statistics.mean(vals):.1f} ± {100 * sd:.1f}"

    head = "| method | " + " | ".join(f"ε={e:g} val / test (%)" for e in epsilons) + " |"
    lines = [head, "|" + " --- |" * (len(epsilons) + 1)]
    for m in methods:
        cells = []
        for e in epsilons:
            sel = [r for r in rows if r["method"] == m and (m == "nonprivate" or r["epsilon"] == e)]
            cells.append(f"{cell(sel, 'val')} / {cell(sel, 'test')}" if sel else "–")
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epsilons", type=float, nargs="+", default=[1.0, 2.0, 4.0, 8.0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--methods", nargs="+", default=[*METHODS, "opacus_dpsgd"])
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--quick", action="store_true", help="2 epochs: a smoke test of the script, not a result")
    ap.add_argument("--out", type=Path, default=Path("results/baselines"))
    args = ap.parse_args()
    extra = ["optim.epochs=2"] if args.quick else []
    jobs = [(m, e, s, extra) for m in args.methods for e in (args.epsilons if m != "nonprivate" else [None]) for s in args.seeds]
    args.out.mkdir(parents=True, exist_ok=True)
    done_file = args.out / "rows.json"
    rows = json.loads(done_file.read_text()) if done_file.exists() else []
    done = {(r["method"], r["epsilon"], r["seed"]) for r in rows}
    jobs = [j for j in jobs if (j[0], j[1], j[2]) not in done]
    with ProcessPoolExecutor(args.workers) as pool:
        for row in pool.map(run_one, jobs):
            print(json.dumps(row), flush=True)
            rows.append(row)
            if row["method"] != "nonprivate":
                assert row["epsilon_spent"] <= row["epsilon"] + 1e-9, row
            done_file.write_text(json.dumps(rows, indent=1))  # after every run: a killed table resumes
    methods = [m for m in [*METHODS, "opacus_dpsgd"] if any(r["method"] == m for r in rows)]
    md = table(rows, args.epsilons, methods)
    recipe = "Recipe: " + ", ".join(BASE) + "; per method: " + "; ".join(f"{m}: {', '.join(v)}" for m, v in METHODS.items())
    (args.out / "table.md").write_text(md + "\n\n" + recipe + "\n")
    print(md)


if __name__ == "__main__":
    main()
