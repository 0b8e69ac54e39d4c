"""A sweep's outputs, rebuilt from the curator's ledger alone: ``release/`` and ``curator/``.

``release/`` holds the best row per (method, ε), each with the guarantee that covers it, its model
weights, and the table and plot of those rows: the selected search trial's own model, its own
validation and test accuracy. Under ``per_trial`` a row also carries the test accuracy of the
recipe's fresh-seed re-runs, labelled as such; under ``repeat_and_select`` those re-runs are not
covered by ε, so they appear in ``curator/`` only, as do the trial counts and every other trial.
``dpmix-ray report DIR`` and the end of every sweep call :func:`build_report`; nothing here needs Ray.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
import statistics
from pathlib import Path
from typing import Any

import pandas as pd

from dpmix_ray import methods
from dpmix_ray.config import SweepConfig
from dpmix_ray.sweep import claims, selection
from dpmix_ray.sweep import state as S
from dpmix_ray.sweep.plan import Group, build_groups

_TRIAL_COLUMNS = (
    "trial_id", "group", "method", "epsilon", "delta", "phase", "index", "seed", "proxy", "covers", "status", "reason", "score", "val_accuracy",
    "test_accuracy", "epsilon_spent", "trial_epsilon", "search_epsilon", "noise_multiplier", "sample_rate", "steps",
    "epochs", "accountant", "n_train", "private", "guarantee", "trial_seconds", "trial_cpu_seconds", "wall_seconds", "images_per_second", "retries", "resumed_from_step",
)
# What a released row holds: the selected trial's own results and data-independent plan figures. Never the
# trial counts, other trials, timings or batch statistics (under repeat_and_select those are what ε does not cover).
_RELEASED = (
    "method", "epsilon", "delta", "private", "covers", "guarantee", "n_train", "hyperparameters", "released_run", "val_accuracy",
    "test_accuracy", "noise_multiplier", "sample_rate", "steps", "epochs", "accountant", "trial_epsilon", "search_epsilon", "model",
)
_RERUNS = ("rerun_test_mean", "rerun_test_sd", "reruns")


def reruns_released(cfg: SweepConfig) -> bool:
    """per_trial: a re-run is one more run covered alone, like every trial. repeat_and_select: ε does not cover them."""
    return cfg.tuning_privacy == "per_trial"


def trials_frame(cfg: SweepConfig, records: list[dict[str, Any]]) -> pd.DataFrame:
    """Every trial: identity, status and reason, metrics, privacy figures, hyperparameters (``param.*``), config JSON."""
    groups = {g.key: g for g in build_groups(cfg)}
    rows = []
    for r in records:
        g = groups.get(r["group"])
        row = {c: r.get(c) for c in _TRIAL_COLUMNS}
        if g is not None:
            row["method"] = row["method"] or g.method
            row["epsilon"] = row["epsilon"] if row["epsilon"] is not None else g.epsilon
            row["covers"] = claims.trial_covers(cfg, g, r)
        row |= {f"param.{k}": v for k, v in (r.get("params") or {}).items()}
        row["params"] = json.dumps(r.get("params") or {}, sort_keys=True)
        row["config"] = json.dumps(r.get("config")) if r.get("config") is not None else None
        rows.append(row)
    frame = pd.DataFrame(rows, columns=list(_TRIAL_COLUMNS) + ["params", "config"] if not rows else None)
    for col in frame.columns:  # mixed-type choice params must not break Parquet
        if col.startswith("param.") and frame[col].map(type).nunique() > 1:
            frame[col] = frame[col].map(lambda v: None if v is None else json.dumps(v))
    return frame


def _row(cfg: SweepConfig, g: Group, records: list[dict[str, Any]], state: S.SweepState) -> dict[str, Any]:
    """Every figure of one (method, ε): the released ones (:data:`_RELEASED`) and the curator's.

    The recipe is the selected search trial's (:func:`selection.best`); the model and the numbers beside it are
    the released run's (:func:`selection.released`: that trial, or the recipe's first full-size final run when a
    proxy trial was selected)."""
    mine = [r for r in records if r["group"] == g.key]
    search = [r for r in mine if r["phase"] == "search"]
    best = selection.best(mine) or {}
    out = selection.released(mine) or {}
    tests = [r["test_accuracy"] for r in mine if r["phase"] == "final" and r["status"] == "completed" and r.get("test_accuracy") is not None]
    n_train = out.get("n_train") or state.n_train
    return {
        "group": g.key, "method": g.method, "epsilon": g.epsilon, "delta": cfg.delta if g.epsilon is not None else None,
        "private": claims.is_private(cfg, g), "covers": claims.label(cfg, g), "guarantee": claims.guarantee(cfg, g, n_train),
        "n_train": n_train, "hyperparameters": best.get("params"),
        "released_run": None if not out else ("selected search trial" if out["phase"] == "search" else f"final run {out['index']}"),
        **{k: out.get(k) for k in ("val_accuracy", "test_accuracy", "noise_multiplier", "sample_rate", "steps", "epochs",
                                   "accountant", "trial_epsilon", "search_epsilon")},
        "model": None,
        "rerun_test_mean": statistics.fmean(tests) if tests else None,
        "rerun_test_sd": statistics.stdev(tests) if len(tests) > 1 else None,
        "reruns": len(tests),
        "trials_planned": state.counts.get(g.key),
        **{f"trials_{s}": sum(1 for r in search if r["status"] == s) for s in ("completed", "stopped", "pruned", "failed")},
        "trials_proxy": sum(1 for r in search if r.get("proxy")),
        "best_trial": best.get("index"), "best_score": best.get("score"),
        "released_phase": out.get("phase"), "released_index": out.get("index"), "config": out.get("config"),
    }


def released(cfg: SweepConfig, row: dict[str, Any]) -> dict[str, Any]:
    """The part of a row that ``release/`` may hold."""
    return {k: row[k] for k in _RELEASED + (_RERUNS if reruns_released(cfg) else ())}


def _release_model(out: Path, row: dict[str, Any]) -> str | None:
    """Copy the released run's weights from curator/ to release/, with the guarantee inside the file."""
    import torch

    if row["released_phase"] is None:
        return None
    kept = S.path(out, S.model_name(row["group"], row["released_phase"], row["released_index"]))
    if not kept.is_file():
        return None
    weights = torch.load(kept, weights_only=True)["state_dict"]
    buf = io.BytesIO()
    torch.save({
        "state_dict": weights, "guarantee": row["guarantee"], "private": row["private"], "epsilon": row["epsilon"],
        "delta": row["delta"], "config": json.dumps(row["config"]),
    }, buf)
    name = S.released_model_name(row["group"])
    S.write_file(out, name, buf.getvalue())
    return name.removeprefix(f"{S.RELEASE}/")


def _fmt(value: Any, digits: int = 4) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    if isinstance(value, float):
        return f"{value:.{digits}g}" if abs(value) >= 1e-3 or value == 0 else f"{value:.2e}"
    if isinstance(value, dict):
        return ", ".join(f"{k}={_fmt(v, 3)}" for k, v in value.items()) or "(base config)"
    return str(value)


def _mean_sd(mean: float | None, sd: float | None, n: int) -> str:
    if mean is None:
        return "–"
    return f"{mean:.4f}" + (f" ± {sd:.4f}" if sd is not None else "") + f" (n={n})"


def _release_table(cfg: SweepConfig, rows: list[dict[str, Any]]) -> pd.DataFrame:
    """The human table of released rows."""
    out = []
    for r in rows:
        row = {
            "method": r["method"], "ε": _fmt(r["epsilon"]), "δ": _fmt(r["delta"]), "ε covers": r["covers"],
            "hyperparameters": _fmt(r["hyperparameters"]), "val acc": _fmt(r["val_accuracy"]),
            "test acc (released model)": _fmt(r["test_accuracy"]),
        }
        if reruns_released(cfg):
            row["re-runs: test mean ± sd"] = _mean_sd(r["rerun_test_mean"], r["rerun_test_sd"], r["reruns"])
        row |= {"σ": _fmt(r["noise_multiplier"]), "steps": _fmt(r["steps"]), "ε (one run)": _fmt(r["trial_epsilon"])}
        if cfg.tuning_privacy == "repeat_and_select":
            row["ε (search)"] = _fmt(r["search_epsilon"])
        row["model"] = r["model"] or "–"
        out.append(row)
    return pd.DataFrame(out)


def _audit_cells(audit: dict[str, Any] | None) -> dict[str, str]:
    """A row's audit (``final.audit``, curator only): ε_lb, the guesses behind it, and the most those guesses could prove."""
    a = audit or {}
    return {
        "audit ε_lb": _fmt(a.get("epsilon_lower_bound"), 3),
        "audit correct/guesses": f"{a['correct']}/{a['guesses']}" if a else "–",
        "audit max provable ε_lb": _fmt(a.get("max_provable_epsilon"), 3),
    }


def _curator_table(rows: list[dict[str, Any]], audits: dict[str, dict[str, Any]]) -> pd.DataFrame:
    """What only the curator sees per row: trial counts, the selected trial, the recipe's re-runs, its audit if any."""
    return pd.DataFrame([{
        "method": r["method"], "ε": _fmt(r["epsilon"]),
        "trials (completed/drawn)": f"{r['trials_completed']}/{r['trials_planned']}",
        "stopped / pruned / failed": f"{r['trials_stopped']} / {r['trials_pruned']} / {r['trials_failed']}",
        "proxy trials (not covered)": r["trials_proxy"],
        "selected trial (score)": f"{_fmt(r['best_trial'])} ({_fmt(r['best_score'])})",
        "released run": r["released_run"] or "–",
        "re-runs: test mean ± sd": _mean_sd(r["rerun_test_mean"], r["rerun_test_sd"], r["reruns"]),
        **(_audit_cells(audits.get(r["group"])) if audits else {}),
    } for r in rows])


def _markdown(frame: pd.DataFrame) -> str:
    cols = list(frame.columns)
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(str(v).replace("|", "\\|") for v in row) + " |" for row in frame.itertuples(index=False)]
    return "\n".join(lines)


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _png(fig: Any) -> bytes:
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    _pyplot().close(fig)
    return buf.getvalue()


def _plot(cfg: SweepConfig, rows: list[dict[str, Any]], n_train: int) -> bytes:
    """Released rows only: each released model's test accuracy against ε (and, per_trial, the re-runs' mean ± sd)."""
    fig, ax = _pyplot().subplots(figsize=(6.4, 4.6), dpi=120)
    for method in dict.fromkeys(r["method"] for r in rows):
        mine = [r for r in rows if r["method"] == method and r["test_accuracy"] is not None]
        if not methods.get(method).private:
            if mine:
                ax.axhline(mine[0]["test_accuracy"], color="grey", linestyle="--", label=f"nonprivate ({claims.NOT_PRIVATE})")
            continue
        if not mine:
            continue
        line = ax.plot([r["epsilon"] for r in mine], [r["test_accuracy"] for r in mine], marker="o", label=f"{method}: released model ({mine[0]['covers']})")
        reruns = [r for r in mine if r.get("rerun_test_mean") is not None]
        if reruns:
            ax.errorbar(
                [r["epsilon"] for r in reruns], [r["rerun_test_mean"] for r in reruns], yerr=[r["rerun_test_sd"] or 0.0 for r in reruns],
                fmt="_", markersize=8, capsize=3, color=line[0].get_color(), alpha=0.5, label=f"{method}: re-runs, mean ± sd",
            )
    ax.set_xscale("log", base=2)
    ax.set_xticks(cfg.epsilons, [f"{e:g}" for e in cfg.epsilons])
    ax.set_xlabel(f"ε (δ={cfg.delta:g}) for the {n_train} training examples; val/test are held out, not private", fontsize=8)
    ax.set_ylabel("test accuracy")
    title = f"{cfg.name}: released model per ε"
    ax.set_title(f"{claims.NOT_PRIVATE} (privacy.reproducible): {title}" if claims.reproducible(cfg) else title, fontsize=10)
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7)
    return _png(fig)


def best_so_far(records: list[dict[str, Any]]) -> list[tuple[float, float]]:
    """One group's search as (cumulative trial seconds, best score so far), in the order its trials finished."""
    done = sorted((r for r in records if r["phase"] == "search" and r.get("trial_seconds") is not None),
                  key=lambda r: r.get("finished_at") or 0.0)
    curve, spent, best = [], 0.0, None
    for r in done:
        spent += r["trial_seconds"]
        if r["status"] == "completed" and r.get("score") is not None and (best is None or r["score"] > best):
            best = r["score"]
        if best is not None:
            curve.append((spent, best))
    return curve


def _progress_plot(cfg: SweepConfig, records: list[dict[str, Any]]) -> bytes:
    """Curator only: each private group's best selection score so far against the search's cumulative trial seconds."""
    searched = [g for g in build_groups(cfg) if g.space]
    names = list(dict.fromkeys(g.method for g in searched)) or [cfg.base.method]
    fig, axes = _pyplot().subplots(1, len(names), figsize=(4.2 * len(names), 3.6), dpi=110, squeeze=False)
    for ax, method in zip(axes[0], names):
        for g in (g for g in searched if g.method == method):
            curve = best_so_far([r for r in records if r["group"] == g.key])
            if curve:
                ax.step([c[0] for c in curve], [c[1] for c in curve], where="post", marker=".", label=f"ε={g.epsilon:g}")
        title = f"{method}: best score so far"
        ax.set_title(f"{claims.NOT_PRIVATE}: {title}" if claims.reproducible(cfg) else title, fontsize=9)
        ax.set_xlabel("cumulative search trial seconds", fontsize=8)
        ax.set_ylabel("selection score (validation)", fontsize=8)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    return _png(fig)


def _file_guide() -> str:
    return "".join(f"<li><code>{html.escape(name)}</code>: {html.escape(what)}</li>" for name, what in S.FILES.items())


def _html(cfg: SweepConfig, statement: str, release: pd.DataFrame, curator: pd.DataFrame, trials: pd.DataFrame, plot: bytes,
          progress: bytes, out: Path, notes: list[str]) -> str:
    img, curve = base64.b64encode(plot).decode(), base64.b64encode(progress).decode()
    shown = [c for c in ("group", "phase", "index", "covers", "status", "reason", "score", "val_accuracy", "test_accuracy", "epsilon_spent",
                         "trial_epsilon", "search_epsilon", "noise_multiplier", "steps", "trial_seconds", "params") if c in trials]
    style = (
        "body{font-family:system-ui,sans-serif;margin:2em;max-width:80em}table{border-collapse:collapse;font-size:.85em}"
        "td,th{border:1px solid #ccc;padding:.25em .5em;text-align:left}th{background:#f3f3f3}"
        ".privacy{background:#fff6d6;border-left:4px solid #e0a800;padding:.6em 1em}"
        ".curator{background:#fde8e8;border-left:4px solid #c0392b;padding:.6em 1em}pre{background:#f7f7f7;padding:1em;overflow-x:auto}"
    )
    db = S.path(out, S.OPTUNA_FILE)
    return (
        f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(cfg.name)}</title><style>{style}</style></head><body>"
        f"<h1>Sweep {html.escape(cfg.name)}: curator's report</h1>"
        "<p class='curator'>This page is for the curator only: it shows every trial and the trial counts, which the "
        f"guarantee does not cover. Publish only <code>{S.RELEASE}/</code>.</p>"
        f"<p class='privacy'>{html.escape(statement)}</p>"
        + "".join(f"<p>{html.escape(n)}</p>" for n in notes)
        + f"<h2>Which file is which</h2><ul>{_file_guide()}</ul>"
        + f"<h2>Released: best recipe per ε (<code>{S.RELEASE_TABLE}.*</code>)</h2>"
        + release.to_html(index=False, escape=True, na_rep="–")
        + f"<p><img alt='released test accuracy vs epsilon' src='data:image/png;base64,{img}'></p>"
        + "<h2>Curator only: counts, selected trial, re-runs</h2>"
        + curator.to_html(index=False, escape=True, na_rep="–")
        + "<h2>Curator only: the search, best score so far</h2>"
        + f"<p><img alt='best selection score so far vs search seconds' src='data:image/png;base64,{curve}'></p>"
        + "<h2>Curator only: all trials</h2>"
        + trials[shown].to_html(index=False, escape=True, na_rep="–", float_format=lambda v: f"{v:.4g}")
        + f"<h2>Sweep config</h2><pre>{html.escape(S.read_text(out, S.CONFIG_FILE))}</pre>"
        + f"<p>Optuna studies: <code>optuna-dashboard sqlite:///{html.escape(str(db))}</code>.</p></body></html>"
    )


def build_report(out_dir: Path) -> None:
    """Rebuild ``release/`` (table, plot, models) and the curator's ``trials.parquet`` and ``report.html``."""
    out = Path(out_dir)
    cfg, state, records = S.read_config(out), S.read_state(out), S.read_records(out)
    rows = [_row(cfg, g, records, state) for g in build_groups(cfg)]
    for row in rows:
        row["model"] = _release_model(out, row)
    kept = {f"{S.RELEASE}/{r['model']}" for r in rows if r["model"] is not None}
    for name in S.list_files(out, S.RELEASE_MODELS):  # a row whose selection changed, or that has none now
        if name not in kept:
            S.remove(out, name)

    statement = claims.statement(cfg, state.n_train)
    notes = [] if state.finished else ["Sweep not finished: these are partial results (continue it with dpmix-ray sweep … --resume)."]
    public = [released(cfg, r) for r in rows]
    S.write_file(out, f"{S.RELEASE_TABLE}.csv", pd.DataFrame(
        [r | {"hyperparameters": json.dumps(r["hyperparameters"], sort_keys=True)} for r in public]).to_csv(index=False))
    S.write_file(out, f"{S.RELEASE_TABLE}.json", json.dumps(S.clean({
        "sweep": cfg.name, "private": not claims.reproducible(cfg), "tuning_privacy": cfg.tuning_privacy, "privacy": statement,
        "finished": state.finished, "rows": public,
    }), indent=1, ensure_ascii=False))
    release = _release_table(cfg, public)
    md = [f"# {cfg.name}: released recipe per ε", "", statement, "", *[n + "\n" for n in notes], _markdown(release), "",
          f"Model weights: `{S.RELEASE_MODELS}/` (each file holds its guarantee). Everything in `{S.CURATOR}/` is for the curator only.", ""]
    S.write_file(out, f"{S.RELEASE_TABLE}.md", "\n".join(md))
    plot = _plot(cfg, public, state.n_train)
    S.write_file(out, S.RELEASE_PLOT, plot)

    trials = trials_frame(cfg, records)
    S.write_file(out, S.TRIALS_TABLE, trials.to_parquet(index=False))
    audit_note = claims.audit_note(cfg)
    S.write_file(out, S.CURATOR_REPORT, _html(cfg, statement, release, _curator_table(rows, S.read_audits(out)), trials, plot,
                                                  _progress_plot(cfg, records), out, notes + ([audit_note] if audit_note else [])))


def summary_table(out_dir: Path) -> str:
    """The closing summary printed after a sweep: the released table with its privacy statement."""
    out = Path(out_dir)
    return S.read_text(out, f"{S.RELEASE_TABLE}.md") + f"\nCurator's report (every trial; do not publish): {S.path(out, S.CURATOR_REPORT)}\n"
