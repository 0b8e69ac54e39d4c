"""The Tune trainable: one trial = one call of the shared trainer with the plan the driver made, reporting once per epoch.

Glue only. The searcher hands each trial its resolved TrainConfig and privacy plan, or the reason
it was refused (:func:`dpmix_ray.sweep.budget.trial_spec`); the trial trains and reports. Outcomes:

* ``pruned``: refused before any step (an impossible config, or a plan ``train`` does not accept).
* ``failed``: training raised (diverged, bad data, a bug); the sweep goes on. Only a *crashed*
  worker (actor or node lost) reaches Tune as an error and is retried from the last checkpoint.
* ``completed``: the final report carries the whole ledger record; the last checkpoint holds it too,
  and for a search trial the trained model's weights (the driver keeps the best per group for
  release), so a trial that finished just before a kill is re-reported on resume, not re-trained.

Every trial evaluates the test split too; selection reads validation accuracy only. Only the keys
of the trainer's documented result (:data:`RESULT_KEYS`) reach the ledger.
"""

from __future__ import annotations

import json
import math
import tempfile
import time
from functools import lru_cache
from pathlib import Path
from typing import Any

import ray
import torch
from ray import tune

from dpmix_ray.config import DataConfig, TrainConfig
from dpmix_ray.data import Splits, load_splits
from dpmix_ray.errors import BudgetError, ConfigError
from dpmix_ray.sweep.budget import TrialPlan, check_within_budget
from dpmix_ray.sweep.plan import METRIC
from dpmix_ray.trainer import EpochReport, fit

STATE_FILE = "state.pt"
MODEL_FILE = "model.pt"
# What a trial keeps of the trainer's result: its documented keys, nothing else.
RESULT_KEYS = (
    "val_accuracy", "test_accuracy", "epsilon_spent", "noise_multiplier", "sample_rate", "steps", "epochs", "accountant",
    "n_train", "wall_seconds", "images_per_second", "private", "guarantee", "config",
)


@lru_cache(maxsize=4)
def _splits(data_json: str) -> Splits:
    """Reused actors keep the loaded dataset between trials."""
    return load_splits(DataConfig.model_validate_json(data_json))


def _finite(value: Any) -> Any:
    return None if isinstance(value, float) and not math.isfinite(value) else value


def _report(metrics: dict[str, Any], files: dict[str, Any] | None = None) -> None:
    """Report to Tune; ``files`` (name → object) become the checkpoint."""
    metrics = {k: _finite(v) for k, v in metrics.items()}
    if files is None:
        tune.report(metrics)
        return
    with tempfile.TemporaryDirectory() as d:
        for name, obj in files.items():
            torch.save(obj, Path(d) / name)
        tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(d))


def _load_checkpoint() -> dict[str, Any] | None:
    ckpt = tune.get_checkpoint()
    if ckpt is None:
        return None
    with ckpt.as_directory() as d:
        return {p.name: torch.load(p, weights_only=False) for p in Path(d).iterdir() if p.suffix == ".pt"}


def _outcome(record: dict[str, Any], status: str, reason: str | None = None) -> dict[str, Any]:
    """The trial's last report: the Tune metric plus the whole ledger record as one JSON column."""
    record |= {"status": status, "reason": reason, "finished_at": time.time()}
    return {METRIC: record.get("val_accuracy"), "trial_status": status, "record_json": json.dumps(record, default=str)}


def result_fields(result: dict[str, Any]) -> dict[str, Any]:
    """The ledger's share of a train result: the documented keys only (never mechanism state)."""
    return {k: result.get(k) for k in RESULT_KEYS}


def run_trial(config: dict[str, Any]) -> None:
    """Tune function trainable; ``config`` is a :func:`~dpmix_ray.sweep.budget.trial_spec`."""
    started, started_at = time.perf_counter(), time.time()
    saved = _load_checkpoint()
    if saved is not None and "record" in saved[STATE_FILE]:
        record = saved[STATE_FILE]["record"]
        _report(_outcome(record, record["status"], record["reason"]), saved)
        return
    state = saved[STATE_FILE] if saved else None
    spent_before = state["seconds"] if state else 0.0
    plan = TrialPlan.from_dict(config["plan"]) if config["plan"] is not None else None
    record: dict[str, Any] = {
        **{k: config[k] for k in ("group", "method", "epsilon", "delta", "phase", "index", "seed", "params")},
        "trial_epsilon": plan.trial_epsilon if plan else None, "search_epsilon": plan.search_epsilon if plan else None,
        "started_at": started_at, "val_accuracy": None, "test_accuracy": None, "resumed_from_step": state["train"]["step"] if state else 0,
    }
    record["node_id"] = ray.get_runtime_context().get_node_id()  # where this (possibly retried) run trained

    def seconds() -> float:
        return spent_before + time.perf_counter() - started

    def stop(status: str, reason: str) -> None:
        record["trial_seconds"] = seconds()
        _report(_outcome(record, status, reason))

    if plan is None:
        return stop("pruned", config["refused"])
    train_cfg = TrainConfig.model_validate(config["train"])
    try:
        splits = _splits(train_cfg.data.model_dump_json())
    except Exception as e:  # noqa: BLE001 - e.g. missing data: deterministic, so recorded rather than retried
        return stop("failed", f"{type(e).__name__}: {e}")
    trained = state is not None

    def on_epoch(rep: EpochReport) -> None:
        nonlocal trained
        trained = True
        _report({**rep.metrics, "epoch": rep.epoch, "step": rep.step}, {STATE_FILE: {"train": rep.state(), "seconds": seconds()}})

    model: dict[str, torch.Tensor] | None = None
    try:
        fitted = fit(train_cfg, plan.run, on_epoch=on_epoch, resume_state=state["train"] if state else None, progress=False, splits=splits)
    except (ConfigError, BudgetError) as e:
        if not trained:  # the trainer refused the plan before the first step
            return stop("pruned", str(e))
        status, reason, result = "failed", str(e), {}
    except Exception as e:  # noqa: BLE001 - a trial's failure is data for the sweep, not a crash of it
        status, reason, result = "failed", f"{type(e).__name__}: {e}", {}
    else:
        status, reason, result = "completed", None, fitted.result
        if config["phase"] == "search":  # a candidate for release: the driver keeps each group's best
            model = {k: v.detach().cpu() for k, v in fitted.model.state_dict().items()}
    record |= result_fields(result)
    record["trial_seconds"] = seconds()
    if status == "completed":
        try:
            check_within_budget(record)
        except BudgetError as e:
            status, reason, model = "failed", str(e), None
    files: dict[str, Any] = {STATE_FILE: {"record": record, "seconds": record["trial_seconds"]}}
    if model is not None:
        files[MODEL_FILE] = {"state_dict": model}
    _report(_outcome(record, status, reason), files)
