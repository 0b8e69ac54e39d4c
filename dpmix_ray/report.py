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
import yaml
from dp_accounting.dp_event import DpEvent

from dpmix_ray import methods
from dpmix_ray.config import SweepConfig, TrainConfig
from dpmix_ray.errors import ConfigError
from dpmix_ray.privacy import Plan, composed_epsilon, dpsgd_event, pin_plan, repeat_and_select_event
from dpmix_ray.sweep import claims, selection
from dpmix_ray.sweep import estimate as E
from dpmix_ray.sweep import state as S
from dpmix_ray.sweep.budget import TrialPlan
from dpmix_ray.sweep.plan import Group, build_groups, count_shape, uses_tuning_calibration

_TRIAL_COLUMNS = (
    "trial_id", "group", "method", "epsilon", "delta", "phase", "index", "seed", "proxy", "covers", "status", "reason", "score", "val_accuracy",
    "test_accuracy", "epsilon_spent", "trial_epsilon", "search_epsilon", "noise_multiplier", "sample_rate", "steps",
    "epochs", "accountant", "n_train", "private", "guarantee", "trial_seconds", "trial_cpu_seconds", "wall_seconds", "images_per_second", "retries", "resumed_from_step",
)
# What a released row holds: the selected trial's own results and data-independent plan figures. Never the
# trial counts, other trials, timings or batch statistics (under repeat_and_select those are what ε does not cover).
_RELEASED = (
    "method", "epsilon", "delta", "private", "covers", "guarantee", "n_train", "hyperparameters", "recipe", "released_run",
    "val_accuracy", "test_accuracy", "noise_multiplier", "sample_rate", "steps", "epochs", "accountant", "trial_epsilon",
    "search_epsilon", "row_epsilon", "release_epsilon", "release_guarantee", "model", "recipe_file", "best_at_epsilon",
)
# A released config never says which trial it was: under repeat_and_select a seed (base.seed + index) would reveal
# the winner's index J, and so that the trial count K > J.
_TRIAL_KEYS = ("seed",)
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


def _run_event(record: dict[str, Any]) -> DpEvent:
    return dpsgd_event(record["noise_multiplier"], record["sample_rate"], int(record["steps"]))


def release_events(cfg: SweepConfig, g: Group, records: list[dict[str, Any]], state: S.SweepState) -> list[DpEvent]:
    """What one row's release costs, as DpEvents on the training split.

    repeat_and_select: the group's whole random search (its stored plan; the released trial is its output).
    per_trial: every released run, each once: the released model's run and the re-runs whose test accuracies the
    row shows. Proxy trials are never released, so never here (and never covered). Not private: nothing to account.
    """
    if not claims.is_private(cfg, g):
        return []
    out = selection.released(records)
    if cfg.tuning_privacy == "repeat_and_select":
        plan = TrialPlan.from_dict(state.plans[g.key]) if g.key in state.plans else None
        if plan is None and out is None:
            return []
        run = dpsgd_event(plan.run.noise_multiplier, plan.run.sample_rate, plan.run.steps) if plan else _run_event(out)
        searched = plan.search_epsilon is not None if plan else uses_tuning_calibration(cfg, g)
        return [repeat_and_select_event(run, float(cfg.search.trials_per_epsilon), count_shape(cfg)) if searched else run]
    reruns = [r for r in records if r["phase"] == "final" and r["status"] == "completed" and r.get("test_accuracy") is not None]
    runs = {(r["phase"], r["index"]): r for r in [*([out] if out else []), *(reruns if reruns_released(cfg) else [])]}
    return [_run_event(r) for r in runs.values()]


def recipe_summary(config: dict[str, Any] | None, record: dict[str, Any]) -> dict[str, Any] | None:
    """The released run's full recipe in one flat mapping (lr, σ, C, B, T, epochs, K, m, n, EMA, schedule, model)."""
    if config is None:
        return None
    o, p, m = config["optim"], config["privacy"], config["mix"]
    return {
        "model": config["model"]["name"], "lr": o["lr"], "noise_multiplier": record.get("noise_multiplier"), "clip_norm": p["clip_norm"],
        "batch_size": o["batch_size"], "steps": record.get("steps"), "epochs": record.get("epochs"), "K": m["aug_multiplicity"],
        "m": m["self_mix"], "n": m["diff_mix"], "ema": o["ema"], "lr_schedule": o["lr_schedule"], "momentum": o["momentum"],
    }


def public_config(cfg: SweepConfig, config: dict[str, Any] | None) -> dict[str, Any] | None:
    """The released run's resolved config as release/ may hold it: under repeat_and_select without its trial seed."""
    if config is None or cfg.tuning_privacy != "repeat_and_select":
        return config
    return {k: v for k, v in config.items() if k not in _TRIAL_KEYS}


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
    events = release_events(cfg, g, mine, state)
    return {
        "group": g.key, "method": g.method, "epsilon": g.epsilon, "delta": cfg.delta if g.epsilon is not None else None,
        "private": claims.is_private(cfg, g), "covers": claims.label(cfg, g), "guarantee": claims.guarantee(cfg, g, n_train),
        "n_train": n_train, "hyperparameters": best.get("params"), "recipe": recipe_summary(out.get("config"), out),
        "released_run": None if not out else ("selected search trial" if out["phase"] == "search" else f"final run {out['index']}"),
        **{k: out.get(k) for k in ("val_accuracy", "test_accuracy", "noise_multiplier", "sample_rate", "steps", "epochs",
                                   "accountant", "trial_epsilon", "search_epsilon")},
        "events": events, "row_epsilon": composed_epsilon(events, cfg.delta, cfg.base.privacy.neighbouring) if events else None,
        "release_epsilon": None, "release_guarantee": None, "model": None, "recipe_file": None, "best_at_epsilon": False,
        "rerun_test_mean": statistics.fmean(tests) if tests else None,
        "rerun_test_sd": statistics.stdev(tests) if len(tests) > 1 else None,
        "reruns": len(tests),
        "trials_planned": state.counts.get(g.key),
        **{f"trials_{s}": sum(1 for r in search if r["status"] == s) for s in ("completed", "stopped", "pruned", "failed")},
        "trials_proxy": sum(1 for r in search if r.get("proxy")),
        "best_trial": best.get("index"), "best_score": best.get("score"),
        "released_phase": out.get("phase"), "released_index": out.get("index"), "config": out.get("config"),
    }


def mark_best_methods(rows: list[dict[str, Any]]) -> None:
    """Per ε, the private row with the highest released validation accuracy is the best method there (``best_at_epsilon``).

    It reads only numbers release/ publishes, so choosing it is post-processing of the release: it costs no ε."""
    for eps in dict.fromkeys(r["epsilon"] for r in rows):
        scored = [r for r in rows if r["epsilon"] == eps and r["val_accuracy"] is not None]
        if scored:
            max(scored, key=lambda r: r["val_accuracy"])["best_at_epsilon"] = True


def released(cfg: SweepConfig, row: dict[str, Any]) -> dict[str, Any]:
    """The part of a row that ``release/`` may hold."""
    return {k: row[k] for k in _RELEASED + (_RERUNS if reruns_released(cfg) else ())}


def _model_bytes(weights: dict[str, Any], row: dict[str, Any], config: dict[str, Any] | None) -> bytes:
    """A released model file: the weights with the guarantees that cover them inside."""
    import torch

    buf = io.BytesIO()
    torch.save({
        "state_dict": weights, "guarantee": row["guarantee"], "private": row["private"], "epsilon": row["epsilon"],
        "delta": row["delta"], "release_epsilon": row["release_epsilon"], "release_guarantee": row["release_guarantee"],
        "config": json.dumps(config),
    }, buf)
    return buf.getvalue()


def _release_model(cfg: SweepConfig, out: Path, row: dict[str, Any]) -> bytes | None:
    """The released run's weights from curator/, as release/'s model file (None: no released run, or no weights kept)."""
    import torch

    if row["released_phase"] is None:
        return None
    kept = S.path(out, S.model_name(row["group"], row["released_phase"], row["released_index"]))
    if not kept.is_file():
        return None
    return _model_bytes(torch.load(kept, weights_only=True)["state_dict"], row, public_config(cfg, row["config"]))


def recipe_text(config: dict[str, Any], header: list[str]) -> str:
    """A train config file: ``header`` as comments, then the config."""
    return "".join(f"# {line}\n" for line in header) + yaml.safe_dump(config, sort_keys=False, allow_unicode=True)


def _recipe(cfg: SweepConfig, g: Group, row: dict[str, Any]) -> str | None:
    """A private row's released run's config with σ and T pinned (:func:`dpmix_ray.privacy.pin_plan`) and no seed: ``dpmix-ray
    train`` on it runs the row's mechanism. None without a released run."""
    config = row["config"]
    if config is None:
        return None
    run = Plan(row["noise_multiplier"], row["sample_rate"], int(row["steps"]), row["epochs"], row["trial_epsilon"], row["accountant"],
               config["privacy"]["neighbouring"])
    pinned = pin_plan(TrainConfig.model_validate(config), run, row["n_train"]).model_dump(mode="json")
    body = {k: v for k, v in pinned.items() if k not in _TRIAL_KEYS}
    spent = pinned["privacy"]["epsilon"]
    return recipe_text(body, claims.recipe_header(cfg, g, spent, row["release_guarantee"]))


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
    """The human table of released rows: results and guarantees (the recipes are :func:`_recipe_table`)."""
    out = []
    for r in rows:
        row = {
            "method": r["method"], "best at ε": "★" if r["best_at_epsilon"] else "", "ε": _fmt(r["epsilon"]), "δ": _fmt(r["delta"]),
            "ε covers": r["covers"],
            "val acc": _fmt(r["val_accuracy"]), "test acc (released model)": _fmt(r["test_accuracy"]),
        }
        if reruns_released(cfg):
            row["re-runs: test mean ± sd"] = _mean_sd(r["rerun_test_mean"], r["rerun_test_sd"], r["reruns"])
        row["ε (one run)"] = _fmt(r["trial_epsilon"])
        if cfg.tuning_privacy == "repeat_and_select":
            row["ε (search)"] = _fmt(r["search_epsilon"])
        row["ε (this row)"] = _fmt(r["row_epsilon"], 3)
        row["model"] = r["model"] or "–"
        out.append(row)
    return pd.DataFrame(out)


_RECIPE_COLUMNS = {"model": "model", "lr": "lr", "noise_multiplier": "σ", "clip_norm": "C", "batch_size": "B", "steps": "steps",
                   "epochs": "epochs", "K": "K", "m": "m", "n": "n", "ema": "EMA", "lr_schedule": "schedule"}


def _recipe_table(rows: list[dict[str, Any]]) -> pd.DataFrame:
    """Each released row's full recipe, one column per setting, and the file that runs it."""
    return pd.DataFrame([
        {"method": r["method"], "ε": _fmt(r["epsilon"]), **{name: _fmt((r["recipe"] or {}).get(k)) for k, name in _RECIPE_COLUMNS.items()},
         "recipe file": r["recipe_file"] or "–"} for r in rows
    ])


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
        "trials (completed/drawn)": f"{r['trials_completed']}/{_fmt(r['trials_planned'])}",
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


def _png(fig: Any, *, layout: bool = True) -> bytes:
    if layout:
        fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    _pyplot().close(fig)
    return buf.getvalue()


def _plot(cfg: SweepConfig, rows: list[dict[str, Any]], n_train: int, composed: str) -> bytes:
    """Released rows only: each released model's test accuracy against ε (and, per_trial, the re-runs' mean ± sd);
    ``composed``: what publishing them together costs, under the title."""
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
    fig.text(0.5, 0.005, composed, ha="center", va="bottom", fontsize=6, wrap=True)
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7)
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    return _png(fig, layout=False)


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


def _compute_plot(cfg: SweepConfig, records: list[dict[str, Any]]) -> bytes:
    """Curator only: every trial's selection score against what it cost (its wall seconds × the CPUs or GPUs it held),
    so a recipe that buys its accuracy with K× the compute shows beside one that spends it on steps."""
    unit = "GPU" if cfg.resources.gpu > 0 else "CPU"
    fig, ax = _pyplot().subplots(figsize=(6.4, 4.2), dpi=110)
    done = [r for r in records if r.get("score") is not None and r.get("trial_seconds")]
    colours = {m: f"C{i}" for i, m in enumerate(dict.fromkeys(r["method"] for r in done))}
    for method, colour in colours.items():
        for phase, marker in (("search", "o"), ("final", "s")):
            mine = [r for r in done if r["method"] == method and r["phase"] == phase]
            for proxy in (False, True):
                pts = [r for r in mine if bool(r.get("proxy")) == proxy]
                if pts:
                    ax.scatter([E.resource_hours(r["trial_seconds"], cfg)[f"{unit.lower()}_hours"] for r in pts], [r["score"] for r in pts], s=22, marker=marker,
                               facecolors="none" if proxy else colour, edgecolors=colour, alpha=0.8,
                               label=f"{method} {phase}{' (proxy)' if proxy else ''}")
    title = "every trial: selection score vs compute"
    ax.set_title(f"{claims.NOT_PRIVATE}: {title}" if claims.reproducible(cfg) else title, fontsize=9)
    ax.set_xlabel(f"{unit} hours (trial wall × {unit}s held)", fontsize=8)
    ax.set_ylabel("selection score (validation)", fontsize=8)
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7)
    return _png(fig)


def _file_guide() -> str:
    return "".join(f"<li><code>{html.escape(name)}</code>: {html.escape(what)}</li>" for name, what in S.FILES.items())


def _html(cfg: SweepConfig, statement: str, composed: str, tables: dict[str, pd.DataFrame], trials: pd.DataFrame, plot: bytes,
          progress: bytes, spend: bytes, out: Path, notes: list[str]) -> str:
    img, curve, spent = (base64.b64encode(b).decode() for b in (plot, progress, spend))
    shown = [c for c in ("group", "phase", "index", "covers", "status", "reason", "score", "val_accuracy", "test_accuracy", "epsilon_spent",
                         "trial_epsilon", "search_epsilon", "noise_multiplier", "steps", "trial_seconds", "params") if c in trials]
    style = (
        "body{font-family:system-ui,sans-serif;margin:2em;max-width:80em}"
        "table{border-collapse:collapse;font-size:.85em;display:block;max-width:100%;overflow-x:auto}"
        "td,th{border:1px solid #ccc;padding:.25em .5em;text-align:left}th{background:#f3f3f3}img{max-width:100%}"
        ".privacy{background:#fff6d6;border-left:4px solid #e0a800;padding:.6em 1em}"
        ".curator{background:#fde8e8;border-left:4px solid #c0392b;padding:.6em 1em}pre{background:#f7f7f7;padding:1em;overflow-x:auto}"
    )
    db = S.path(out, S.OPTUNA_FILE)
    sections = "".join(f"<h2>{html.escape(title)}</h2>" + frame.to_html(index=False, escape=True, na_rep="–") for title, frame in tables.items())
    return (
        f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(cfg.name)}</title><style>{style}</style></head><body>"
        f"<h1>Sweep {html.escape(cfg.name)}: curator's report</h1>"
        "<p class='curator'>This page is for the curator only: it shows every trial and the trial counts, which the "
        f"guarantee does not cover. Publish only <code>{S.RELEASE}/</code>, or one recipe (<code>dpmix-ray export</code>).</p>"
        f"<p class='privacy'>{html.escape(statement)}</p><p class='privacy'>{html.escape(composed)}</p>"
        + "".join(f"<p>{html.escape(n)}</p>" for n in notes)
        + f"<h2>Which file is which</h2><ul>{_file_guide()}</ul>"
        + sections
        + f"<p><img alt='test accuracy vs epsilon' src='data:image/png;base64,{img}'></p>"
        + "<h2>Curator only: the search, best score so far</h2>"
        + f"<p><img alt='best selection score so far vs search seconds' src='data:image/png;base64,{curve}'></p>"
        + "<h2>Curator only: what each trial's compute bought</h2>"
        + f"<p><img alt='selection score vs compute, every trial' src='data:image/png;base64,{spent}'></p>"
        + "<h2>Curator only: all trials</h2>"
        + trials[shown].to_html(index=False, escape=True, na_rep="–", float_format=lambda v: f"{v:.4g}")
        + f"<h2>Sweep config</h2><pre>{html.escape(S.read_text(out, S.CONFIG_FILE))}</pre>"
        + f"<p>Optuna studies: <code>optuna-dashboard sqlite:///{html.escape(str(db))}</code>.</p></body></html>"
    )


def _release_files(cfg: SweepConfig, out: Path, pairs: list[tuple[Group, dict[str, Any]]], statement: str, composed: str,
                   notes: list[str], state: S.SweepState) -> dict[str, bytes | str]:
    """Every file of ``release/`` (out-relative name → contents), from the private rows; fills in their model and recipe names."""
    files: dict[str, bytes | str] = {}
    for g, row in pairs:
        if (model := _release_model(cfg, out, row)) is not None:
            files[S.released_model_name(g.key)] = model
            row["model"] = S.released_model_name(g.key).removeprefix(f"{S.RELEASE}/")
        if (recipe := _recipe(cfg, g, row)) is not None:
            files[S.recipe_name(g.key)] = recipe
            row["recipe_file"] = S.recipe_name(g.key).removeprefix(f"{S.RELEASE}/")
    public = [released(cfg, r) for _, r in pairs]
    files[f"{S.RELEASE_TABLE}.csv"] = pd.DataFrame(
        [r | {k: json.dumps(r[k], sort_keys=True) for k in ("hyperparameters", "recipe")} for r in public]).to_csv(index=False)
    files[f"{S.RELEASE_TABLE}.json"] = json.dumps(S.clean({
        "sweep": cfg.name, "private": not claims.reproducible(cfg), "tuning_privacy": cfg.tuning_privacy, "privacy": statement,
        "composed_epsilon": None if claims.reproducible(cfg) else pairs[0][1]["release_epsilon"] if pairs else None,
        "delta": cfg.delta, "composed_guarantee": composed, "finished": state.finished,
        "rows": public,
    }), indent=1, ensure_ascii=False)
    md = [f"# {cfg.name}: released recipe per ε", "", statement, "", f"**{composed}**", "", *[n + "\n" for n in notes],
          _markdown(_release_table(cfg, public)), "", "## Recipes", "", _markdown(_recipe_table(public)), "",
          f"Model weights: `{S.RELEASE_MODELS}/` (each file holds its guarantees). Recipes: `{S.RELEASE_RECIPES}/`, each a complete "
          "train config (`dpmix-ray train FILE`: a new run on the data, so a new release). Everything in "
          f"`{S.CURATOR}/` is for the curator only.", ""]
    files[f"{S.RELEASE_TABLE}.md"] = "\n".join(md)
    files[S.RELEASE_PLOT] = _plot(cfg, public, state.n_train, composed)
    return files


def _publish(cfg: SweepConfig, out: Path, state: S.SweepState, files: dict[str, bytes | str]) -> str | None:
    """Write release/, or say why not. repeat_and_select releases once, when the sweep is finished: an unfinished
    sweep's selection, or a second version after a resumed sweep re-ran a slot, would be more releases of the search."""
    once = cfg.tuning_privacy == "repeat_and_select"
    if once and not state.finished:
        return (f"{S.RELEASE}/ not written: under repeat_and_select it is written once, when the sweep is finished "
                "(continue it with dpmix-ray sweep … --resume).")
    if not S.publish_release(out, files, replace=not once):
        return (f"{S.RELEASE}/ kept as first written: under repeat_and_select the search is released once; a second "
                "version would be a second release of it.")
    return None


def build_report(out_dir: Path) -> None:
    """Rebuild the curator's ``trials.parquet`` and ``report.html``, and ``release/`` (table, plot, models, recipes) where
    allowed (:func:`_publish`). release/ holds private results only: the non-private reference is the curator's."""
    out = Path(out_dir)
    cfg, state, records = S.read_config(out), S.read_state(out), S.read_records(out)
    groups = build_groups(cfg)
    rows = [_row(cfg, g, records, state) for g in groups]
    pairs = [(g, r) for g, r in zip(groups, rows) if methods.get(g.method).private]
    release_eps = composed_epsilon([e for _, r in pairs for e in r["events"]], cfg.delta, cfg.base.privacy.neighbouring)
    composed = claims.composed(cfg, release_eps, state.n_train)
    for _, row in pairs:
        row |= {"release_epsilon": None if claims.reproducible(cfg) else release_eps, "release_guarantee": composed}
    mark_best_methods([r for _, r in pairs])

    statement = claims.statement(cfg, state.n_train)
    notes = [] if state.finished else ["Sweep not finished: these are partial results (continue it with dpmix-ray sweep … --resume)."]
    files = _release_files(cfg, out, pairs, statement, composed, notes, state)
    published = _publish(cfg, out, state, files)

    trials, audits = trials_frame(cfg, records), S.read_audits(out)
    S.write_file(out, S.TRIALS_TABLE, trials.to_parquet(index=False))
    public = [released(cfg, r) for _, r in pairs]
    tables = {
        f"Released: best recipe per ε ({S.RELEASE_TABLE}.*)": _release_table(cfg, public),
        "Released: the recipes": _recipe_table(public),
        "Curator only: the non-private reference": _release_table(cfg, [r for g, r in zip(groups, rows) if not methods.get(g.method).private]),
        "Curator only: counts, selected trial, re-runs": _curator_table(rows, audits),
        "Curator only: compute": pd.DataFrame(E.compute_rows(cfg, state.compute, state.estimate, E.spent(cfg, records, audits))),
    }
    audit_note = claims.audit_note(cfg)
    extra = [n for n in (published, audit_note) if n]
    S.write_file(out, S.CURATOR_REPORT, _html(cfg, statement, composed, tables, trials, _plot(cfg, rows, state.n_train, composed),
                                              _progress_plot(cfg, records), _compute_plot(cfg, records), out, notes + extra))


def summary_table(out_dir: Path) -> str:
    """The closing summary printed after a sweep: the released table with its privacy statement and composed ε."""
    out = Path(out_dir)
    md = S.path(out, f"{S.RELEASE_TABLE}.md")
    head = md.read_text() if md.is_file() else (
        f"{S.RELEASE}/ not written: under repeat_and_select it is written once, when the sweep is finished.\n")
    return head + f"\nCurator's report (every trial; do not publish): {S.path(out, S.CURATOR_REPORT)}\n"


def export_bundle(out_dir: Path, method: str, epsilon: float, to: Path) -> list[str]:
    """One released row as a bundle in ``to``: its model, row, recipe and plot point, whose guarantee is that row's
    alone (``row_epsilon``), not release/'s composition. Read from release/ only. Returns the files written."""
    import torch

    out, to = Path(out_dir), Path(to)
    if not S.path(out, f"{S.RELEASE_TABLE}.json").is_file():
        raise ConfigError(f"{out}: no {S.RELEASE}/ to export from (a repeat_and_select sweep releases once it is finished)")
    if to.exists() and any(to.iterdir()):
        raise ConfigError(f"--to {to}: not empty; a bundle goes to a new directory")
    cfg = S.read_config(out)
    doc = json.loads(S.read_text(out, f"{S.RELEASE_TABLE}.json"))
    row = next((r for r in doc["rows"] if r["method"] == method and r["epsilon"] == epsilon), None)
    if row is None or row["model"] is None or row["recipe_file"] is None:
        have = ", ".join(f"{r['method']} ε={r['epsilon']:g}" for r in doc["rows"] if r["model"]) or "none"
        raise ConfigError(f"--method {method} --epsilon {epsilon:g}: no released model and recipe (released: {have})")
    group = next(g for g in build_groups(cfg) if g.method == method and g.epsilon == epsilon)
    text = claims.bundle(cfg, group, row["row_epsilon"] or 0.0, row["n_train"])
    row |= {"release_epsilon": None if claims.reproducible(cfg) else row["row_epsilon"], "release_guarantee": text}
    model = torch.load(S.path(out, f"{S.RELEASE}/{row['model']}"), weights_only=True)
    recipe = yaml.safe_load(S.read_text(out, f"{S.RELEASE}/{row['recipe_file']}"))
    files: dict[str, bytes | str] = {
        "model.pt": _model_bytes(model["state_dict"], row, json.loads(model["config"])),
        "row.json": json.dumps(row, indent=1, ensure_ascii=False),
        "recipe.yaml": recipe_text(recipe, claims.recipe_header(cfg, group, recipe["privacy"]["epsilon"], text)),
        "accuracy_vs_epsilon.png": _plot(cfg, [row], row["n_train"], text),
    }
    to.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        (to / name).write_bytes(data.encode() if isinstance(data, str) else data)
    return sorted(files)
