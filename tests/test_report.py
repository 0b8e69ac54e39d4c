"""The report is rebuilt from a ledger alone: synthetic trial records in, every output file checked."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pandas as pd
import pytest

from dpmix_ray.config import SweepConfig, config_hash
from dpmix_ray.report import build_report, summary_table
from dpmix_ray.sweep import state as S

BASE = {"method": "dpmix_self", "data": {"name": "digits"}, "model": {"name": "cnn"}, "mix": {"aug_multiplicity": 2, "self_mix": 1}, "device": "cpu"}


def _write_sweep(out: Path, records: list[dict[str, Any]], finished: bool = True, **over: Any) -> SweepConfig:
    cfg = SweepConfig.model_validate({
        "name": "rep", "base": BASE, "epsilons": [1, 4], "delta": 1e-5, "baselines": ["dpsgd", "nonprivate"],
        "space": {"optim.lr": {"loguniform": [0.1, 4]}, "optim.lr_schedule": {"choice": ["constant", 2]}},
        "search": {"trials_per_epsilon": 3}, "final": {"seeds": 2}, **over,
    })
    counts = {f"{m}@eps={e:g}": 3 for m in ("dpmix_self", "dpsgd") for e in (1, 4)} | {"nonprivate": 3}
    S.write_config(out, cfg)
    S.write_state(out, S.SweepState(name="rep", config_hash=config_hash(cfg), counts=counts, storage_path=str(out), finished=finished))
    for r in records:
        S.append_record(out, r)
    return cfg


def _rec(group: str, phase: str, index: int, status: str, val: float | None, **extra: Any) -> dict[str, Any]:
    method, _, eps = group.partition("@eps=")
    return {
        "trial_id": f"{group}-{phase}{index}", "group": group, "method": method, "epsilon": float(eps) if eps else None,
        "delta": 1e-5 if eps else None, "phase": phase, "index": index, "status": status, "reason": extra.pop("reason", None),
        "val_accuracy": val, "params": extra.pop("params", {"optim.lr": 0.5 + index, "optim.lr_schedule": "constant"}),
        "epsilon_spent": float(eps) * 0.99 if eps and status == "completed" else None, "trial_epsilon": float(eps) if eps else None,
        "noise_multiplier": 1.1, "steps": 40, "config": {"seed": index}, **extra,
    }


def _records() -> list[dict[str, Any]]:
    out = []
    for group, vals in {"dpmix_self@eps=1": (0.6, 0.7, None), "dpmix_self@eps=4": (0.8, 0.85, 0.9), "dpsgd@eps=1": (0.5, None, None),
                        "dpsgd@eps=4": (0.7, 0.72, 0.71), "nonprivate": (0.97, 0.98, 0.96)}.items():
        for i, v in enumerate(vals):
            status = "completed" if v is not None else ("pruned" if i == 1 else "failed")
            reason = None if v is not None else ("cannot fit ε" if status == "pruned" else "DivergedError: loss is nan")
            out.append(_rec(group, "search", i, status, v, reason=reason, params={"optim.lr": 0.5 + i, "optim.lr_schedule": 2 if i == 2 else "constant"}))
        for k, t in enumerate((0.01, 0.03)):
            best = max(v for v in vals if v is not None)
            out.append(_rec(group, "final", k, "completed", best, test_accuracy=best - t))
    out.append(_rec("dpsgd@eps=4", "search", 2, "stopped", 0.99, reason="stopped early by ASHA"))  # supersedes the slot; never selected
    return out


def test_report_files_from_trial_rows(tmp_path: Path) -> None:
    _write_sweep(tmp_path, _records())
    build_report(tmp_path)

    best = pd.read_csv(tmp_path / "best_per_epsilon.csv")
    assert list(best["method"]) == ["dpmix_self", "dpmix_self", "dpsgd", "dpsgd", "nonprivate"]
    row = best.iloc[1]
    assert row["epsilon"] == 4 and row["val_accuracy"] == 0.9 and row["best_trial"] == 2
    assert row["test_accuracy_mean"] == pytest.approx(0.88) and row["test_accuracy_sd"] == pytest.approx(0.0141421, rel=1e-4)
    assert json.loads(row["hyperparameters"]) == {"optim.lr": 2.5, "optim.lr_schedule": 2}
    assert "single training run" in row["guarantee"] and row["delta"] == 1e-5
    assert best.iloc[3]["val_accuracy"] == 0.72  # the ASHA-stopped 0.99 is not a finished trial
    assert (best.iloc[0]["trials_completed"], best.iloc[0]["trials_failed"]) == (2, 1)

    doc = json.loads((tmp_path / "best_per_epsilon.json").read_text())
    assert doc["tuning_privacy"] == "per_trial" and "NOT covered" in doc["privacy"] and len(doc["rows"]) == 5

    trials = pd.read_parquet(tmp_path / "trials.parquet")
    assert len(trials) == 25 and {"status", "reason", "param.optim.lr", "config", "val_accuracy", "epsilon_spent"} <= set(trials.columns)
    assert trials.loc[trials.status == "failed", "reason"].str.contains("Diverged").all()

    md = summary_table(tmp_path)
    assert "ONE training run" in md and "0.8800 ± 0.0141" in md and md.count("\n|") >= 6

    page = (tmp_path / "report.html").read_text()
    assert re.search(r"src='data:image/png;base64,[A-Za-z0-9+/=]{100,}'", page)
    assert not re.search(r"(src|href)=['\"]https?:", page)  # opens offline
    assert (tmp_path / "accuracy_vs_epsilon.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_repeat_and_select_and_partial_sweeps_say_so(tmp_path: Path) -> None:
    records = [r | {"search_epsilon": r["epsilon"]} for r in _records() if r["method"] == "dpmix_self"]
    _write_sweep(tmp_path, records, finished=False, baselines=[], tuning_privacy="repeat_and_select",
                 search={"sampler": "random", "trials_per_epsilon": 3}, space={"optim.lr": {"loguniform": [0.1, 4]}})
    build_report(tmp_path)
    md = summary_table(tmp_path)
    assert "whole search" in md and "not finished" in md
    rows = json.loads((tmp_path / "best_per_epsilon.json").read_text())["rows"]
    assert rows[1]["search_epsilon"] == 4 and rows[1]["trial_epsilon"] == 4


def test_empty_ledger_still_reports(tmp_path: Path) -> None:
    _write_sweep(tmp_path, [], finished=False)
    build_report(tmp_path)
    assert pd.read_parquet(tmp_path / "trials.parquet").empty
    assert "not finished" in (tmp_path / "report.html").read_text()
