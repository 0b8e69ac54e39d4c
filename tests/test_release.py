"""What release/ publishes is covered by what it claims: composition, one release under repeat_and_select, runnable recipes."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from dp_accounting import dp_event, rdp
from test_report import N_TRAIN, _rec, _records, _release, _write_sweep

from dpmix_ray.config import load_train_config
from dpmix_ray.privacy import Plan, plan_run
from dpmix_ray.report import build_report, summary_table
from dpmix_ray.sweep import plan as P
from dpmix_ray.sweep import state as S
from dpmix_ray.sweep.budget import TrialPlan

RS = {"baselines": ["dpsgd", "nonprivate"], "tuning_privacy": "repeat_and_select", "search": {"sampler": "random", "trials_per_epsilon": 3},
      "space": {"optim.lr": {"loguniform": [0.1, 4]}}}
# Trial identity, timing and counts: none may appear in release/ under repeat_and_select (they reveal K ≥ J + 1).
_TRIAL_KEYS = {"seed", "index", "trial_id", "trial_seconds", "trial_cpu_seconds", "wall_seconds", "started_at", "finished_at",
               "images_per_second", "trials_planned", "best_trial", "released_index", "released_phase", "retries", "counts"}


def _rs_sweep(out: Path, finished: bool = True) -> None:
    """A finished repeat_and_select sweep with its stored group plans (σ=1.1, q=64/N, T=40; the search ε as the row's ε)."""
    records = [r | {"search_epsilon": r["epsilon"]} for r in _records()]
    _write_sweep(out, records, finished=finished, **RS)
    state = S.read_state(out)
    run = Plan(1.1, 64 / N_TRAIN, 40, 40 * 64 / N_TRAIN, 1.0, "rdp", "zero_out")
    state.plans = {g: TrialPlan(run, N_TRAIN, 1.0, float(g.split("=")[1])).as_dict() for g in state.counts if "@eps=" in g}
    S.write_state(out, state)


def _keys(value: Any) -> set[str]:
    if isinstance(value, dict):
        return set(value) | {k for v in value.values() for k in _keys(v)}
    if isinstance(value, list):
        return {k for v in value for k in _keys(v)}
    return set()


def _release_docs(out: Path) -> list[tuple[str, Any]]:
    """Every structured thing in release/: JSON, CSV cells that hold JSON, recipes, and each model file's metadata."""
    import pandas as pd

    docs: list[tuple[str, Any]] = []
    for p in S.path(out, S.RELEASE).rglob("*"):
        if p.suffix == ".json":
            docs.append((p.name, json.loads(p.read_text())))
        elif p.suffix == ".yaml":
            docs.append((p.name, yaml.safe_load(p.read_text())))
        elif p.suffix == ".csv":
            frame = pd.read_csv(p)
            docs.append((p.name, {c: None for c in frame.columns}))
            docs += [(p.name, json.loads(v)) for c in ("recipe", "hyperparameters") if c in frame for v in frame[c].dropna()]
        elif p.suffix == ".pt":
            meta = torch.load(p, weights_only=True)
            docs.append((p.name, {k: v for k, v in meta.items() if k not in ("state_dict", "config")} | {"config": json.loads(meta["config"])}))
    return docs


def test_release_states_the_composition_of_every_released_search(tmp_path: Path) -> None:
    _rs_sweep(tmp_path)
    build_report(tmp_path)
    doc = json.loads(S.read_text(tmp_path, f"{S.RELEASE_TABLE}.json"))
    acc = rdp.RdpAccountant()  # independent: dp_accounting's own orders and events, not privacy.py's
    run = dp_event.SelfComposedDpEvent(dp_event.PoissonSampledDpEvent(64 / N_TRAIN, dp_event.GaussianDpEvent(1.1)), 40)
    for _ in range(4):  # dpmix_self and dpsgd at ε = 1 and 4: four released searches
        acc.compose(dp_event.RepeatAndSelectDpEvent(run, 3.0, math.inf))
    expected = acc.get_epsilon(1e-5)
    assert doc["composed_epsilon"] == pytest.approx(expected, rel=0.02)
    assert doc["composed_epsilon"] > max(r["row_epsilon"] for r in doc["rows"]) and doc["composed_epsilon"] > 4
    assert all(r["release_epsilon"] == doc["composed_epsilon"] for r in doc["rows"])
    text = f"ε={doc['composed_epsilon']:.3g}"
    assert text in doc["composed_guarantee"] and "every released search" in doc["composed_guarantee"]
    assert text in S.read_text(tmp_path, f"{S.RELEASE_TABLE}.csv") and text in S.read_text(tmp_path, f"{S.RELEASE_TABLE}.md")
    assert text in summary_table(tmp_path) and text in S.read_text(tmp_path, S.CURATOR_REPORT)
    model = torch.load(S.path(tmp_path, S.released_model_name("dpsgd@eps=4")), weights_only=True)
    assert model["release_epsilon"] == doc["composed_epsilon"] and text in model["release_guarantee"]
    assert all(text in p.read_text() for p in S.path(tmp_path, S.RELEASE_RECIPES).iterdir())
    assert not any("nonprivate" in name for name in _release(tmp_path)) and {r["method"] for r in doc["rows"]} == {"dpmix_self", "dpsgd"}


def test_per_trial_composition_counts_the_released_reruns_and_says_runs_only(tmp_path: Path) -> None:
    _write_sweep(tmp_path, _records())
    build_report(tmp_path)
    doc = json.loads(S.read_text(tmp_path, f"{S.RELEASE_TABLE}.json"))
    acc = rdp.RdpAccountant()
    run = dp_event.SelfComposedDpEvent(dp_event.PoissonSampledDpEvent(64 / N_TRAIN, dp_event.GaussianDpEvent(1.1)), 40)
    acc.compose(run, 4 * 3)  # four rows: the released search trial and its two released re-runs each
    assert doc["composed_epsilon"] == pytest.approx(acc.get_epsilon(1e-5), rel=0.02)
    assert "runs only, NOT the selection" in doc["composed_guarantee"]
    assert all(r["row_epsilon"] < doc["composed_epsilon"] for r in doc["rows"])


def test_repeat_and_select_releases_no_trial_identity_timing_or_count(tmp_path: Path) -> None:
    _rs_sweep(tmp_path)
    build_report(tmp_path)
    docs = _release_docs(tmp_path)
    for name, doc in docs:
        assert not _keys(doc) & _TRIAL_KEYS, name
    assert {name for name, _ in docs} >= {"best_per_epsilon.json", "best_per_epsilon.csv", "dpsgd-eps4.pt", "dpsgd-eps4.yaml"}


def test_an_unfinished_repeat_and_select_sweep_releases_nothing(tmp_path: Path) -> None:
    _rs_sweep(tmp_path, finished=False)
    build_report(tmp_path)
    assert not S.path(tmp_path, S.RELEASE).exists() and not list(tmp_path.glob(".release-*"))
    assert "release/ not written" in S.read_text(tmp_path, S.CURATOR_REPORT) and "release/ not written" in summary_table(tmp_path)


def test_a_second_repeat_and_select_release_is_refused(tmp_path: Path) -> None:
    _rs_sweep(tmp_path)
    build_report(tmp_path)
    first = {p: p.read_bytes() for p in S.path(tmp_path, S.RELEASE).rglob("*") if p.is_file()}
    better = _rec("dpmix_self@eps=1", "search", 2, "completed", 0.95, test_accuracy=0.94, search_epsilon=1.0)  # a resume re-ran a slot
    S.append_record(tmp_path, better)
    build_report(tmp_path)
    assert {p: p.read_bytes() for p in S.path(tmp_path, S.RELEASE).rglob("*") if p.is_file()} == first
    assert "kept as first written" in S.read_text(tmp_path, S.CURATOR_REPORT)


def test_a_released_recipe_plans_the_rows_mechanism(tmp_path: Path) -> None:
    _write_sweep(tmp_path, _records())
    build_report(tmp_path)
    doc = json.loads(S.read_text(tmp_path, f"{S.RELEASE_TABLE}.json"))
    row = doc["rows"][1]
    recipe = S.path(tmp_path, f"{S.RELEASE}/{row['recipe_file']}")
    assert "new release" in recipe.read_text().lower()
    cfg = load_train_config(recipe)
    plan = plan_run(cfg, N_TRAIN)
    assert (plan.noise_multiplier, plan.sample_rate, plan.steps) == (row["noise_multiplier"], row["sample_rate"], row["steps"])
    assert plan.epsilon_spent == cfg.privacy.epsilon <= row["epsilon"] and "seed" not in yaml.safe_load(recipe.read_text())
    assert load_train_config(recipe, ["data.name=mnist5k"]).data.name == "mnist5k"
    assert set(row["recipe"]) >= {"lr", "noise_multiplier", "clip_norm", "batch_size", "steps", "epochs", "K", "m", "n", "ema",
                                  "lr_schedule", "model"}
    assert row["recipe"]["lr"] == cfg.optim.lr and row["recipe"]["K"] == cfg.mix.aug_multiplicity


def test_the_report_has_no_none_cells_and_no_overwide_table(tmp_path: Path) -> None:
    _rs_sweep(tmp_path)
    build_report(tmp_path)
    page, md = S.read_text(tmp_path, S.CURATOR_REPORT), S.read_text(tmp_path, f"{S.RELEASE_TABLE}.md")
    assert ">None<" not in page and "None" not in md and "overflow-x:auto" in page.split("table{")[1].split("}")[0]
    widest = max(line.count(" | ") for line in md.splitlines() if line.startswith("|"))
    assert widest <= 14


def test_export_writes_one_recipe_whose_guarantee_is_its_own(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from dpmix_ray.cli import main

    _rs_sweep(tmp_path)
    build_report(tmp_path)
    doc = json.loads(S.read_text(tmp_path, f"{S.RELEASE_TABLE}.json"))
    to = tmp_path / "bundle"
    assert main(["export", str(tmp_path), "--method", "dpmix_self", "--epsilon", "4", "--to", str(to)]) == 0
    assert sorted(p.name for p in to.iterdir()) == ["accuracy_vs_epsilon.png", "model.pt", "recipe.yaml", "row.json"]
    row = json.loads((to / "row.json").read_text())
    assert row["method"] == "dpmix_self" and row["epsilon"] == 4 and row["release_epsilon"] == pytest.approx(row["row_epsilon"])
    assert row["release_epsilon"] < doc["composed_epsilon"] and row["release_epsilon"] <= 4 * (1 + 1e-9)
    assert "this one recipe" in row["release_guarantee"] and "composes" in row["release_guarantee"]
    model = torch.load(to / "model.pt", weights_only=True)
    assert model["release_guarantee"] == row["release_guarantee"] and model["state_dict"]["w"].item() == pytest.approx(0.9)
    assert "this one recipe" in (to / "recipe.yaml").read_text() and load_train_config(to / "recipe.yaml").privacy.noise_multiplier == 1.1
    assert main(["export", str(tmp_path), "--method", "nonprivate", "--epsilon", "1", "--to", str(tmp_path / "b2")]) == 2
    assert main(["export", str(tmp_path), "--method", "dpsgd", "--epsilon", "4", "--to", str(to)]) == 2  # not empty


def test_repeat_and_select_seeds_are_secret() -> None:
    from dpmix_ray.config import SweepConfig
    from test_report import BASE

    cfg = SweepConfig.model_validate({"base": BASE, **RS})
    assert len({P.trial_seed(cfg, "search", 0) for _ in range(4)}) > 1
    per_trial = SweepConfig.model_validate({"base": BASE})
    assert P.trial_seed(per_trial, "search", 3) == BASE.get("seed", 0) + 3
