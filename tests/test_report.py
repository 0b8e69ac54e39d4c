"""The report is rebuilt from the curator's ledger alone: synthetic trial records in, every release/ and curator/ file checked."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import torch

from dpmix_ray.config import SweepConfig, TrainConfig, config_hash, with_updates
from dpmix_ray.report import build_report, summary_table
from dpmix_ray.sweep import claims
from dpmix_ray.sweep import state as S

BASE = {"method": "dpmix_self", "data": {"name": "digits"}, "model": {"name": "cnn"}, "mix": {"aug_multiplicity": 2, "self_mix": 1}, "device": "cpu"}
N_TRAIN = 1258
RELEASE_FILES = {"best_per_epsilon.csv", "best_per_epsilon.json", "best_per_epsilon.md", "accuracy_vs_epsilon.png"}


def _write_sweep(out: Path, records: list[dict[str, Any]], finished: bool = True, **over: Any) -> SweepConfig:
    cfg = SweepConfig.model_validate({
        "name": "rep", "base": BASE, "epsilons": [1, 4], "delta": 1e-5, "baselines": ["dpsgd", "nonprivate"],
        "space": {"optim.lr": {"loguniform": [0.1, 4]}, "optim.lr_schedule": {"choice": ["constant", 2]}},
        "search": {"trials_per_epsilon": 3}, "final": {"seeds": 2}, **over,
    })
    counts = {f"{m}@eps={e:g}": 3 for m in ("dpmix_self", "dpsgd") for e in (1, 4)} | {"nonprivate": 3}
    S.write_config(out, cfg)
    S.write_state(out, S.SweepState(name="rep", config_hash=config_hash(cfg), counts=counts, storage_path=str(out), n_train=N_TRAIN, finished=finished))
    for r in records:
        S.append_record(out, r)
        if r["status"] == "completed" and not r.get("proxy"):  # as the driver's callback keeps candidates (all, here)
            _write_model(out, r)
    return cfg


def _write_model(out: Path, record: dict[str, Any]) -> None:
    path = S.path(out, S.model_name(record["group"], record["phase"], record["index"]))
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": {"w": torch.tensor([record["val_accuracy"]])}}, path)


def _config(method: str, eps: str, index: int) -> dict[str, Any]:
    """A trial's resolved config, as the trainer records it."""
    fixed = {"dpsgd": {"mix.aug_multiplicity": 1, "mix.self_mix": 0}, "nonprivate": {"mix.aug_multiplicity": 1, "mix.self_mix": 0}}
    updates = {"method": method, "seed": index, "optim.batch_size": 64, "optim.epochs": 2.0, "optim.lr": 0.5 + index,
               **({"privacy.epsilon": float(eps)} if eps else {}), **fixed.get(method, {})}
    return with_updates(TrainConfig.model_validate(BASE), updates).model_dump(mode="json")


def _rec(group: str, phase: str, index: int, status: str, val: float | None, **extra: Any) -> dict[str, Any]:
    method, _, eps = group.partition("@eps=")
    return {
        "trial_id": f"{group}-{phase}{index}", "group": group, "method": method, "epsilon": float(eps) if eps else None,
        "delta": 1e-5 if eps else None, "phase": phase, "index": index, "status": status, "reason": extra.pop("reason", None),
        "val_accuracy": val, "score": extra.pop("score", val if status == "completed" else None),
        "params": extra.pop("params", {"optim.lr": 0.5 + index, "optim.lr_schedule": "constant"}),
        "epsilon_spent": float(eps) * 0.99 if eps and status == "completed" else None, "trial_epsilon": float(eps) if eps else None,
        "noise_multiplier": 1.1, "steps": 40, "sample_rate": 64 / N_TRAIN, "epochs": 40 * 64 / N_TRAIN, "accountant": "rdp",
        "n_train": N_TRAIN, "config": _config(method, eps, index), "trial_seconds": 9.5,
        "images_per_second": 321.0, **extra,
    }


def _records() -> list[dict[str, Any]]:
    """Search trials evaluate test too; trial 1 at ε=4 has the best test but not the best val: it must not be released."""
    out = []
    for group, vals in {"dpmix_self@eps=1": (0.6, 0.7, None), "dpmix_self@eps=4": (0.8, 0.85, 0.9), "dpsgd@eps=1": (0.5, None, None),
                        "dpsgd@eps=4": (0.7, 0.72, 0.71), "nonprivate": (0.97, 0.98, 0.96)}.items():
        for i, v in enumerate(vals):
            status = "completed" if v is not None else ("pruned" if i == 1 else "failed")
            reason = None if v is not None else ("cannot fit ε" if status == "pruned" else "DivergedError: loss is nan")
            test = None if v is None else (0.99 if i == 1 else v - 0.05)
            out.append(_rec(group, "search", i, status, v, reason=reason, test_accuracy=test,
                            params={"optim.lr": 0.5 + i, "optim.lr_schedule": 2 if i == 2 else "constant"}))
        for k, t in enumerate((0.01, 0.03)):
            best = max(v for v in vals if v is not None)
            out.append(_rec(group, "final", k, "completed", best, test_accuracy=best - t))
    out.append(_rec("dpsgd@eps=4", "search", 2, "stopped", 0.99, reason="stopped early by ASHA"))  # supersedes the slot; never selected
    return out


def _release(out: Path) -> set[str]:
    return {p.relative_to(S.path(out, S.RELEASE)).as_posix() for p in S.path(out, S.RELEASE).rglob("*") if p.is_file()}


def test_release_holds_the_selected_trials_own_results_and_models(tmp_path: Path) -> None:
    _write_sweep(tmp_path, _records())
    build_report(tmp_path)

    private = ("dpmix_self-eps1", "dpmix_self-eps4", "dpsgd-eps1", "dpsgd-eps4")
    assert _release(tmp_path) == RELEASE_FILES | {f"models/{m}.pt" for m in private} | {f"recipes/{m}.yaml" for m in private}
    best = pd.read_csv(S.path(tmp_path, f"{S.RELEASE_TABLE}.csv"))
    assert list(best["method"]) == ["dpmix_self", "dpmix_self", "dpsgd", "dpsgd"]  # the non-private reference: curator only
    row = best.iloc[1]
    assert row["epsilon"] == 4 and row["val_accuracy"] == 0.9  # selected on validation ...
    assert row["test_accuracy"] == pytest.approx(0.85)  # ... and its own test accuracy, not trial 1's 0.99 nor the re-runs'
    assert row["rerun_test_mean"] == pytest.approx(0.88) and row["reruns"] == 2  # per_trial: re-runs released, labelled
    assert json.loads(row["hyperparameters"]) == {"optim.lr": 2.5, "optim.lr_schedule": 2}
    assert f"{N_TRAIN} training examples" in row["guarantee"] and "held-out" in row["guarantee"] and "NOT the selection" in row["guarantee"]
    assert best.iloc[3]["val_accuracy"] == 0.72  # the ASHA-stopped 0.99 is not a finished trial
    assert not {"trials_planned", "trials_completed", "best_trial", "group", "images_per_second", "trial_seconds"} & set(best.columns)

    model = torch.load(S.path(tmp_path, S.released_model_name("dpmix_self@eps=4")), weights_only=True)
    assert model["state_dict"]["w"].item() == pytest.approx(0.9) and model["guarantee"] == row["guarantee"] and model["private"]

    doc = json.loads(S.read_text(tmp_path, f"{S.RELEASE_TABLE}.json"))
    assert doc["tuning_privacy"] == "per_trial" and doc["private"] and "NOT covered" in doc["privacy"] and len(doc["rows"]) == 4
    assert f"{N_TRAIN} examples" in doc["privacy"] and claims.HELD_OUT in doc["privacy"]
    assert doc["rows"][1]["model"] == "models/dpmix_self-eps4.pt"

    md = summary_table(tmp_path)
    assert "ONE training run" in md and "0.8800 ± 0.0141 (n=2)" in md and md.count("\n|") >= 10 and "curator" in md

    trials = pd.read_parquet(S.path(tmp_path, S.TRIALS_TABLE))
    assert len(trials) == 25 and {"status", "reason", "param.optim.lr", "config", "val_accuracy", "test_accuracy", "epsilon_spent"} <= set(trials.columns)
    assert trials.loc[trials.status == "failed", "reason"].str.contains("Diverged").all()

    page = S.read_text(tmp_path, S.CURATOR_REPORT)
    assert all(html_name in page for html_name in ("release/best_per_epsilon", "curator/trials.jsonl", "curator/optuna.db", "curator/tune/"))
    assert "curator only" in page and "2/3" in page  # the drawn counts: curator's page only
    assert re.search(r"src='data:image/png;base64,[A-Za-z0-9+/=]{100,}'", page)
    assert not re.search(r"(src|href)=['\"]https?:", page)  # opens offline
    assert S.path(tmp_path, S.RELEASE_PLOT).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_changed_selection_replaces_its_released_model(tmp_path: Path) -> None:
    _write_sweep(tmp_path, _records())
    build_report(tmp_path)
    better = _rec("dpmix_self@eps=1", "search", 2, "completed", 0.75, test_accuracy=0.74)  # the slot that had failed, re-run
    S.append_record(tmp_path, better)
    _write_model(tmp_path, better)
    S.append_record(tmp_path, _rec("dpsgd@eps=1", "search", 0, "failed", None, reason="crashed"))  # dpsgd@eps=1 has no best now
    build_report(tmp_path)
    model = torch.load(S.path(tmp_path, S.released_model_name("dpmix_self@eps=1")), weights_only=True)
    assert model["state_dict"]["w"].item() == pytest.approx(0.75)
    assert "models/dpsgd-eps1.pt" not in _release(tmp_path)


def test_repeat_and_select_release_leaves_reruns_and_counts_to_the_curator(tmp_path: Path) -> None:
    records = [r | {"search_epsilon": r["epsilon"]} for r in _records() if r["method"] == "dpmix_self"]
    _write_sweep(tmp_path, records, baselines=[], tuning_privacy="repeat_and_select",
                 search={"sampler": "random", "trials_per_epsilon": 3}, space={"optim.lr": {"loguniform": [0.1, 4]}})
    build_report(tmp_path)
    md = summary_table(tmp_path)
    assert "whole search" in md and "re-runs: test mean" not in S.read_text(tmp_path, f"{S.RELEASE_TABLE}.md")
    doc = json.loads(S.read_text(tmp_path, f"{S.RELEASE_TABLE}.json"))
    row = doc["rows"][1]
    assert row["search_epsilon"] == 4 and row["test_accuracy"] == pytest.approx(0.85) and "whole random search" in row["guarantee"]
    assert not {"rerun_test_mean", "reruns", "trials_planned", "best_trial"} & set(row)
    assert "re-runs" in doc["privacy"] and "Not covered" in doc["privacy"]
    csv = pd.read_csv(S.path(tmp_path, f"{S.RELEASE_TABLE}.csv"))
    assert "rerun_test_mean" not in csv.columns
    page = S.read_text(tmp_path, S.CURATOR_REPORT)
    assert "0.8800 ± 0.0141 (n=2)" in page  # the re-runs: an evaluation of the recipe, for the curator


def test_reproducible_sweep_says_not_private_in_every_output(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import matplotlib.axes

    titles: list[str] = []
    set_title = matplotlib.axes.Axes.set_title
    monkeypatch.setattr(matplotlib.axes.Axes, "set_title", lambda ax, label, *a, **k: (titles.append(label), set_title(ax, label, *a, **k))[1])
    _write_sweep(tmp_path, _records(), base=BASE | {"privacy": {"reproducible": True}})
    build_report(tmp_path)

    doc = json.loads(S.read_text(tmp_path, f"{S.RELEASE_TABLE}.json"))
    assert doc["private"] is False and doc["privacy"].startswith("NOT PRIVATE")
    assert all(r["guarantee"].startswith("NOT PRIVATE") and r["private"] is False and r["covers"] == "NOT PRIVATE" for r in doc["rows"])
    assert pd.read_csv(S.path(tmp_path, f"{S.RELEASE_TABLE}.csv"))["guarantee"].str.startswith("NOT PRIVATE").all()
    assert S.read_text(tmp_path, f"{S.RELEASE_TABLE}.md").startswith("# rep: released recipe per ε\n\nNOT PRIVATE")
    assert "NOT PRIVATE" in S.read_text(tmp_path, S.CURATOR_REPORT)
    assert titles and all(t.startswith("NOT PRIVATE") for t in titles)  # the released plot and the curator's search curves
    model = torch.load(S.path(tmp_path, S.released_model_name("dpmix_self@eps=4")), weights_only=True)
    assert model["private"] is False and model["guarantee"].startswith("NOT PRIVATE")


def test_empty_ledger_still_reports(tmp_path: Path) -> None:
    _write_sweep(tmp_path, [], finished=False)
    build_report(tmp_path)
    assert pd.read_parquet(S.path(tmp_path, S.TRIALS_TABLE)).empty
    assert "not finished" in S.read_text(tmp_path, S.CURATOR_REPORT) and _release(tmp_path) == RELEASE_FILES


def test_report_command_rebuilds_both_halves(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from dpmix_ray.cli import main

    _write_sweep(tmp_path, _records())
    assert main(["report", str(tmp_path)]) == 0
    assert str(S.path(tmp_path, S.CURATOR_REPORT)) in capsys.readouterr().out and len(_release(tmp_path)) == 12
    assert main(["report", str(tmp_path / "nothing")]) == 2

    unfinished = tmp_path / "unfinished"  # repeat_and_select mid-sweep: release/ is not written, and the command says so
    unfinished.mkdir()
    _write_sweep(unfinished, [r | {"search_epsilon": r["epsilon"]} for r in _records() if r["method"] == "dpmix_self"], finished=False,
                 baselines=[], tuning_privacy="repeat_and_select", search={"sampler": "random", "trials_per_epsilon": 3},
                 space={"optim.lr": {"loguniform": [0.1, 4]}})
    assert main(["report", str(unfinished)]) == 0
    said = capsys.readouterr().out
    assert "nothing released yet" in said and "released:" not in said and not S.path(unfinished, S.RELEASE).exists()


def test_proxy_trials_are_labelled_everywhere_and_never_released(tmp_path: Path) -> None:
    """A proxy search (TAN): the winner is a proxy, so the release is its recipe's first full-size final run."""
    proxy = {"search": {"trials_per_epsilon": 3, "proxy": {"batch_size": 64}}, "baselines": [], "final": {"seeds": 2}}
    records = []
    for eps in (1, 4):
        g = f"dpmix_self@eps={eps}"
        records += [_rec(g, "search", i, "completed", v, proxy=True, trial_epsilon=40.0 * eps, test_accuracy=0.5)
                    for i, v in enumerate((0.7, 0.8))]
        records += [_rec(g, "final", k, "completed", 0.75 + k / 100, test_accuracy=0.9 + k / 100, params={"optim.lr": 1.5}) for k in range(2)]
    _write_sweep(tmp_path, records, **proxy)
    build_report(tmp_path)

    doc = json.loads(S.read_text(tmp_path, f"{S.RELEASE_TABLE}.json"))
    row = doc["rows"][1]
    assert row["released_run"] == "final run 0" and row["test_accuracy"] == pytest.approx(0.9) and row["val_accuracy"] == pytest.approx(0.75)
    assert row["trial_epsilon"] == 4 and row["hyperparameters"] == {"optim.lr": 1.5, "optim.lr_schedule": "constant"}  # the proxy's recipe
    assert "proxy trials" in row["guarantee"] and "proxy trials" in doc["privacy"] and "NOT covered" in doc["privacy"]
    model = torch.load(S.path(tmp_path, S.released_model_name("dpmix_self@eps=4")), weights_only=True)
    assert model["state_dict"]["w"].item() == pytest.approx(0.75)  # the final run's weights (its val stands in for them here)
    trials = pd.read_parquet(S.path(tmp_path, S.TRIALS_TABLE))
    search = trials[trials.phase == "search"]
    assert search.proxy.all() and search.covers.str.startswith("PROXY: outside the sweep's guarantee (this run alone: ε=").all()
    assert not trials[trials.phase == "final"].proxy.fillna(False).any()
    page = S.read_text(tmp_path, S.CURATOR_REPORT)
    assert "PROXY: outside" in page and "best score so far" in page and "proxy trials (not covered)" in page


def test_curator_report_sets_spent_compute_beside_the_estimate_and_the_budget(tmp_path: Path) -> None:
    """Spent = Σ trial seconds (every record, and final.audit runs) × the CPUs a trial holds; the budget's plan and the
    estimate made before the run are set beside it, and none of it reaches release/."""
    from dpmix_ray.sweep import estimate as E

    records = _records()
    cfg = _write_sweep(tmp_path, records, resources={"cpu": 2, "gpu": 0}, search={"trials_per_epsilon": 3, "budget": {"cpu_hours": 0.05}})
    S.add_audit(tmp_path, {"group": "dpmix_self@eps=1", "trial_seconds": 20.0, "epsilon_lower_bound": 0.1, "correct": 3, "guesses": 4,
                           "setting": "white-box", "estimator": "fdp", "epsilon": 0.99})
    used = E.spent(cfg, S.read_records(tmp_path), S.read_audits(tmp_path))
    assert used["trial_seconds"] == pytest.approx(9.5 * len(S.read_records(tmp_path)) + 20.0)  # one record per slot (its seconds span resumes)
    assert used["cpu_hours"] == pytest.approx(used["trial_seconds"] * 2 / 3600)
    state = S.read_state(tmp_path)
    state.compute = {"budget_seconds": 90.0, "trials_per_epsilon": 3, "estimated_seconds": 80.0, "estimated_cpu_hours": 80 * 2 / 3600,
                     "estimated_gpu_hours": 0.0, "search": {}, "final": {}}
    S.write_state(tmp_path, state)
    build_report(tmp_path)
    page = S.read_text(tmp_path, S.CURATOR_REPORT)
    section = page.split("Curator only: compute")[1].split("</table>")[0]
    assert f"{used['trial_seconds'] / 90.0:.2f}" in section and f"{used['cpu_hours']:.3f}" in section  # spent ÷ budget, CPU h
    assert "search.budget" in section and "planned for it (3 search trials per ε)" in section
    assert "selection score vs compute" in page
    assert not any("compute" in S.read_text(tmp_path, f"{S.RELEASE}/{f}") for f in ("best_per_epsilon.md", "best_per_epsilon.json"))

    rows = E.compute_rows(cfg, None, {"trial_seconds": 200.0, "cpu_hours": 0.11, "gpu_hours": 0.0, "estimated_wall_seconds": 110.0},
                          {"trial_seconds": 100.0, "cpu_hours": 0.055, "gpu_hours": 0.0})
    assert [r["spent ÷ this"] for r in rows] == ["0.50", "–"]


def test_best_method_per_epsilon_is_marked_from_released_validation_accuracy(tmp_path: Path) -> None:
    """Across the candidate methods, each ε's best is the released row with the highest validation accuracy (never test,
    and never a number release/ does not hold), one per ε, in the JSON and the table."""
    records = _records()
    for r in records:  # make test accuracy disagree with validation: dpsgd's test is the highest at every ε
        if r["method"] == "dpsgd":
            r["test_accuracy"] = 0.995
    _write_sweep(tmp_path, records)
    build_report(tmp_path)
    rows = json.loads(S.read_text(tmp_path, f"{S.RELEASE_TABLE}.json"))["rows"]
    for eps in (1.0, 4.0):
        mine = [r for r in rows if r["epsilon"] == eps]
        [best] = [r for r in mine if r["best_at_epsilon"]]
        assert best["val_accuracy"] == max(r["val_accuracy"] for r in mine) and best["method"] == "dpmix_self"
    assert S.read_text(tmp_path, f"{S.RELEASE_TABLE}.md").count("★") == 2


def test_the_nonprivate_reference_is_labelled_not_private_wherever_it_appears(tmp_path: Path) -> None:
    """Its trials in the curator's table say NOT PRIVATE, and it releases nothing."""
    _write_sweep(tmp_path, _records())
    build_report(tmp_path)
    trials = pd.read_parquet(S.path(tmp_path, S.TRIALS_TABLE))
    reference = trials[trials["group"] == "nonprivate"]
    assert len(reference) and set(reference["covers"]) == {claims.NOT_PRIVATE}
    assert not any("nonprivate" in name for name in _release(tmp_path))
