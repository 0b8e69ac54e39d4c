"""A sweep's outputs, rebuilt from its ledger alone: tables, plot, Parquet, one offline HTML page.

``dpmix-ray report DIR`` and the end of every sweep call :func:`build_report`; nothing here needs
Ray or the trained models. Every output says which privacy guarantee its ε carries.
"""

from __future__ import annotations

import base64
import html
import json
import math
import statistics
from pathlib import Path
from typing import Any

import pandas as pd

from dpmix_ray.config import SweepConfig
from dpmix_ray.sweep.plan import Group, build_groups, guarantee, guarantee_label
from dpmix_ray.sweep.state import CONFIG_FILE, LEDGER_FILE, OPTUNA_FILE, best_search_record, read_config, read_records, read_state

BEST_STEM = "best_per_epsilon"
PLOT_FILE = "accuracy_vs_epsilon.png"
TRIALS_FILE = "trials.parquet"
HTML_FILE = "report.html"
_TRIAL_COLUMNS = (
    "trial_id", "group", "method", "epsilon", "delta", "phase", "index", "seed", "status", "reason", "val_accuracy",
    "test_accuracy", "epsilon_spent", "trial_epsilon", "search_epsilon", "noise_multiplier", "sample_rate", "steps",
    "epochs", "accountant", "n_train", "trial_seconds", "wall_seconds", "images_per_second", "retries", "resumed_from_step",
)


def privacy_statement(cfg: SweepConfig) -> str:
    """The honest one-paragraph answer to "what does ε cover here?" (Papernot & Steinke 2022)."""
    if cfg.tuning_privacy == "per_trial":
        return (
            "Privacy (tuning_privacy: per_trial): each ε covers ONE training run. The search trained several "
            "configurations per ε and kept the best on validation accuracy; that selection is NOT covered, so the "
            "released best model is not (ε, δ)-DP end to end. Use tuning_privacy: repeat_and_select for a guarantee "
            "that includes the search."
        )
    return (
        "Privacy (tuning_privacy: repeat_and_select): each ε covers the whole random search and the released best "
        "model: random search with a random number of trials, every trial calibrated with dp_accounting's RDP "
        "repeat-and-select event. 'trial ε' is what one trial spent; 'search ε' is the bound for the search. Not "
        "covered: the per-trial logs (trials.parquet, trials.jsonl, optuna.db) are the curator's private records, and "
        "each final re-run is one more (trial ε, δ) run of the chosen recipe."
    )


def _group_of(cfg: SweepConfig) -> dict[str, Group]:
    return {g.key: g for g in build_groups(cfg)}


def trials_frame(cfg: SweepConfig, records: list[dict[str, Any]]) -> pd.DataFrame:
    """Every trial: identity, status and reason, metrics, privacy figures, hyperparameters (``param.*``), config JSON."""
    groups = _group_of(cfg)
    rows = []
    for r in records:
        g = groups.get(r["group"])
        row = {c: r.get(c) for c in _TRIAL_COLUMNS}
        if g is not None:
            row["method"] = row["method"] or g.method
            row["epsilon"] = row["epsilon"] if row["epsilon"] is not None else g.epsilon
        row |= {f"param.{k}": v for k, v in (r.get("params") or {}).items()}
        row["params"] = json.dumps(r.get("params") or {}, sort_keys=True)
        row["config"] = json.dumps(r.get("config")) if r.get("config") is not None else None
        rows.append(row)
    frame = pd.DataFrame(rows, columns=list(_TRIAL_COLUMNS) + ["params", "config"] if not rows else None)
    for col in frame.columns:  # mixed-type choice params must not break Parquet
        if col.startswith("param.") and frame[col].map(type).nunique() > 1:
            frame[col] = frame[col].map(lambda v: None if v is None else json.dumps(v))
    return frame


def best_rows(cfg: SweepConfig, records: list[dict[str, Any]], counts: dict[str, int]) -> list[dict[str, Any]]:
    """One row per (method, ε): the best trial by validation accuracy and its fresh-seed test accuracy."""
    rows = []
    for g in build_groups(cfg):
        mine = [r for r in records if r["group"] == g.key]
        search = [r for r in mine if r["phase"] == "search"]
        best = best_search_record(search)
        tests = [r["test_accuracy"] for r in mine if r["phase"] == "final" and r["status"] == "completed" and r.get("test_accuracy") is not None]
        by_status = {s: sum(1 for r in search if r["status"] == s) for s in ("completed", "stopped", "pruned", "failed")}
        rows.append({
            "method": g.method,
            "epsilon": g.epsilon,
            "delta": cfg.delta if g.epsilon is not None else None,
            "guarantee": guarantee(cfg, g),
            "covers": guarantee_label(cfg, g),
            "trials_planned": counts.get(g.key),
            **{f"trials_{s}": n for s, n in by_status.items()},
            "best_trial": best["index"] if best else None,
            "hyperparameters": best["params"] if best else None,
            "val_accuracy": best["val_accuracy"] if best else None,
            "test_accuracy_mean": statistics.fmean(tests) if tests else None,
            "test_accuracy_sd": statistics.stdev(tests) if len(tests) > 1 else None,
            "final_seeds": len(tests),
            "noise_multiplier": best.get("noise_multiplier") if best else None,
            "steps": best.get("steps") if best else None,
            "epsilon_spent": best.get("epsilon_spent") if best else None,
            "trial_epsilon": best.get("trial_epsilon") if best else None,
            "search_epsilon": best.get("search_epsilon") if best else None,
        })
    return rows


def _fmt(value: Any, digits: int = 4) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    if isinstance(value, float):
        return f"{value:.{digits}g}" if abs(value) >= 1e-3 or value == 0 else f"{value:.2e}"
    if isinstance(value, dict):
        return ", ".join(f"{k}={_fmt(v, 3)}" for k, v in value.items()) or "(base config)"
    return str(value)


def _display(rows: list[dict[str, Any]]) -> pd.DataFrame:
    """The human table: accuracy as mean ± sd, counts as done/planned."""
    out = []
    for r in rows:
        test = "–" if r["test_accuracy_mean"] is None else f"{r['test_accuracy_mean']:.4f}"
        if r["test_accuracy_sd"] is not None:
            test += f" ± {r['test_accuracy_sd']:.4f}"
        out.append({
            "method": r["method"],
            "ε": _fmt(r["epsilon"]),
            "δ": _fmt(r["delta"]),
            "ε covers": r["covers"],
            "trials (completed/planned)": f"{r['trials_completed']}/{r['trials_planned']}",
            "best hyperparameters": _fmt(r["hyperparameters"]),
            "val acc": _fmt(r["val_accuracy"]),
            f"test acc (n={max((x['final_seeds'] for x in rows), default=0)})": test,
            "σ": _fmt(r["noise_multiplier"]),
            "steps": _fmt(r["steps"]),
            "ε_spent (1 trial)": _fmt(r["epsilon_spent"]),
            "search ε": _fmt(r["search_epsilon"]),
        })
    return pd.DataFrame(out)


def _markdown(frame: pd.DataFrame) -> str:
    cols = list(frame.columns)
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(str(v).replace("|", "\\|") for v in row) + " |" for row in frame.itertuples(index=False)]
    return "\n".join(lines)


def _plot(cfg: SweepConfig, rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=120)
    methods = list(dict.fromkeys(r["method"] for r in rows))
    for method in methods:
        mine = [r for r in rows if r["method"] == method]
        if method == "nonprivate":
            r = mine[0]
            y = r["test_accuracy_mean"] if r["test_accuracy_mean"] is not None else r["val_accuracy"]
            if y is not None:
                ax.axhline(y, color="grey", linestyle="--", label="nonprivate" + (" (val)" if r["test_accuracy_mean"] is None else ""))
            continue
        tested = [r for r in mine if r["test_accuracy_mean"] is not None]
        if tested:
            ax.errorbar(
                [r["epsilon"] for r in tested], [r["test_accuracy_mean"] for r in tested],
                yerr=[r["test_accuracy_sd"] or 0.0 for r in tested], marker="o", capsize=3, label=f"{method} (test, mean ± sd)",
            )
        else:
            val = [r for r in mine if r["val_accuracy"] is not None]
            ax.plot([r["epsilon"] for r in val], [r["val_accuracy"] for r in val], marker="o", linestyle=":", label=f"{method} (best val)")
    ax.set_xscale("log", base=2)
    ax.set_xticks(cfg.epsilons, [f"{e:g}" for e in cfg.epsilons])
    ax.set_xlabel("ε" + (" (whole search)" if cfg.tuning_privacy == "repeat_and_select" else " (per trial; selection not covered)"))
    ax.set_ylabel("accuracy")
    ax.set_title(f"{cfg.name}: best recipe per ε (δ={cfg.delta:g})")
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _html(cfg: SweepConfig, display: pd.DataFrame, trials: pd.DataFrame, plot: Path, out: Path, notes: list[str]) -> str:
    img = base64.b64encode(plot.read_bytes()).decode()
    shown = [c for c in ("group", "phase", "index", "status", "reason", "val_accuracy", "test_accuracy", "epsilon_spent",
                         "trial_epsilon", "search_epsilon", "noise_multiplier", "steps", "trial_seconds", "params") if c in trials]
    style = (
        "body{font-family:system-ui,sans-serif;margin:2em;max-width:80em}table{border-collapse:collapse;font-size:.85em}"
        "td,th{border:1px solid #ccc;padding:.25em .5em;text-align:left}th{background:#f3f3f3}"
        ".privacy{background:#fff6d6;border-left:4px solid #e0a800;padding:.6em 1em}pre{background:#f7f7f7;padding:1em;overflow-x:auto}"
    )
    return (
        f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(cfg.name)}</title><style>{style}</style></head><body>"
        f"<h1>Sweep {html.escape(cfg.name)}</h1>"
        f"<p class='privacy'>{html.escape(privacy_statement(cfg))}</p>"
        + "".join(f"<p>{html.escape(n)}</p>" for n in notes)
        + "<h2>Best recipe per ε</h2>"
        + display.to_html(index=False, escape=True, na_rep="–")
        + f"<p><img alt='accuracy vs epsilon' src='data:image/png;base64,{img}'></p>"
        + "<h2>All trials</h2>"
        + trials[shown].to_html(index=False, escape=True, na_rep="–", float_format=lambda v: f"{v:.4g}")
        + f"<h2>Sweep config</h2><pre>{html.escape((out / CONFIG_FILE).read_text())}</pre>"
        + f"<p>Optuna studies: <code>{OPTUNA_FILE}</code> (<code>optuna-dashboard sqlite:///{html.escape(str(out / OPTUNA_FILE))}</code>); "
        f"ledger: <code>{LEDGER_FILE}</code>.</p></body></html>"
    )


def build_report(out_dir: Path) -> None:
    """Write best_per_epsilon.{csv,json,md}, trials.parquet, accuracy_vs_epsilon.png and report.html into ``out_dir``."""
    out = Path(out_dir)
    cfg, state, records = read_config(out), read_state(out), read_records(out)
    rows = best_rows(cfg, records, state.counts)
    notes = [] if state.finished else ["Sweep not finished: these are partial results (continue it with dpmix-ray sweep … --resume)."]
    trials = trials_frame(cfg, records)
    trials.to_parquet(out / TRIALS_FILE, index=False)

    pd.DataFrame([r | {"hyperparameters": json.dumps(r["hyperparameters"], sort_keys=True)} for r in rows]).to_csv(out / f"{BEST_STEM}.csv", index=False)
    (out / f"{BEST_STEM}.json").write_text(json.dumps({
        "sweep": cfg.name, "tuning_privacy": cfg.tuning_privacy, "privacy": privacy_statement(cfg), "finished": state.finished,
        "rows": rows,
    }, indent=1))
    display = _display(rows)
    md = [f"# {cfg.name}: best recipe per ε", "", privacy_statement(cfg), "", *[n + "\n" for n in notes], _markdown(display), ""]
    (out / f"{BEST_STEM}.md").write_text("\n".join(md))
    _plot(cfg, rows, out / PLOT_FILE)
    (out / HTML_FILE).write_text(_html(cfg, display, trials, out / PLOT_FILE, out, notes))


def summary_table(out_dir: Path) -> str:
    """The closing summary printed after a sweep: the markdown table and the privacy statement."""
    return (Path(out_dir) / f"{BEST_STEM}.md").read_text()
