"""The Tune trainable: one trial = one call of the shared trainer, reporting once per epoch.

Glue only. The trial builds its TrainConfig from the sweep config and the searcher's suggestion,
fixes its privacy (:func:`plan.apply_tuning_privacy`), trains, and reports. Outcomes:

* ``pruned``: the config is impossible or can't meet the budget; refused before any step.
* ``failed``: training raised (diverged, bad data, a bug); the sweep goes on. Only a *crashed*
  worker (actor or node lost) reaches Tune as an error and is retried from the last checkpoint.
* ``completed``: the final report carries the whole ledger record; the last checkpoint holds it too,
  so a trial that finished just before a kill is re-reported on resume, not re-trained.
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

from dpmix_ray.config import DataConfig, SweepConfig
from dpmix_ray.data import Splits, load_splits
from dpmix_ray.errors import BudgetError, ConfigError
from dpmix_ray.sweep.plan import METRIC, Group, apply_tuning_privacy, assert_within_budget, build_groups, trial_config
from dpmix_ray.trainer import EpochReport, train

STATE_FILE = "state.pt"


@lru_cache(maxsize=4)
def _splits(data_json: str) -> Splits:
    """Reused actors keep the loaded dataset between trials."""
    return load_splits(DataConfig.model_validate_json(data_json))


def _finite(value: Any) -> Any:
    return None if isinstance(value, float) and not math.isfinite(value) else value


def _report(metrics: dict[str, Any], state: dict[str, Any] | None = None) -> None:
    metrics = {k: _finite(v) for k, v in metrics.items()}
    if state is None:
        tune.report(metrics)
        return
    with tempfile.TemporaryDirectory() as d:
        torch.save(state, Path(d) / STATE_FILE)
        tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(d))


def _load_state() -> dict[str, Any] | None:
    ckpt = tune.get_checkpoint()
    if ckpt is None:
        return None
    with ckpt.as_directory() as d:
        return torch.load(Path(d) / STATE_FILE, weights_only=False)


def _outcome(record: dict[str, Any], status: str, reason: str | None = None) -> dict[str, Any]:
    """The trial's last report: the Tune metric plus the whole ledger record as one JSON column."""
    record |= {"status": status, "reason": reason, "finished_at": time.time()}
    return {METRIC: record.get("val_accuracy"), "trial_status": status, "record_json": json.dumps(record, default=str)}


def run_trial(config: dict[str, Any], *, sweep: dict[str, Any], synthetic: str | None = None) -> None:
    """Tune function trainable; ``config`` = {group, phase, index, seed, params} from the searcher."""
    started, started_at = time.perf_counter(), time.time()
    cfg = SweepConfig.model_validate(sweep)
    group: Group = next(g for g in build_groups(cfg) if g.key == config["group"])
    saved = _load_state()
    if saved is not None and "record" in saved:
        _report(_outcome(saved["record"], saved["record"]["status"], saved["record"]["reason"]), saved)
        return
    spent_before = saved["seconds"] if saved else 0.0
    record: dict[str, Any] = {
        "group": group.key, "method": group.method, "epsilon": group.epsilon, "delta": cfg.delta if group.epsilon else None,
        "phase": config["phase"], "index": config["index"], "seed": config["seed"], "params": config["params"],
        "started_at": started_at, "val_accuracy": None, "test_accuracy": None, "resumed_from_step": saved["train"]["step"] if saved else 0,
    }
    record["node_id"] = ray.get_runtime_context().get_node_id()  # where this (possibly retried) run trained

    def seconds() -> float:
        return spent_before + time.perf_counter() - started

    def stop(status: str, reason: str) -> None:
        record["trial_seconds"] = seconds()
        _report(_outcome(record, status, reason))

    params = dict(config["params"])
    if synthetic is not None and cfg.base.mix.synthetic == "synth":
        params["mix.synthetic"] = synthetic
    try:
        train_cfg = trial_config(cfg, group, params, config["seed"])
        splits = _splits(train_cfg.data.model_dump_json())
        train_cfg, privacy = apply_tuning_privacy(cfg, group, train_cfg, len(splits.train))
    except (ConfigError, BudgetError) as e:
        return stop("pruned", str(e))
    except Exception as e:  # noqa: BLE001 - e.g. missing data: deterministic, so recorded rather than retried
        return stop("failed", f"{type(e).__name__}: {e}")
    record |= {"trial_epsilon": privacy.trial_epsilon, "search_epsilon": privacy.search_epsilon}
    trained = saved is not None

    def on_epoch(rep: EpochReport) -> None:
        nonlocal trained
        trained = True
        metrics = {**rep.metrics, "epoch": rep.epoch, "step": rep.step}
        _report(metrics, {"train": rep.state(), "seconds": seconds()})

    try:
        result = train(train_cfg, on_epoch=on_epoch, resume_state=saved["train"] if saved else None, progress=False, splits=splits)
    except (ConfigError, BudgetError) as e:
        if not trained:  # the trainer's own planner refused it before the first step
            return stop("pruned", str(e))
        status, reason, result = "failed", str(e), {}
    except Exception as e:  # noqa: BLE001 - a trial's failure is data for the sweep, not a crash of it
        status, reason, result = "failed", f"{type(e).__name__}: {e}", {}
    else:
        status, reason = "completed", None
    keep = ("val_accuracy", "epsilon_spent", "noise_multiplier", "sample_rate", "steps", "epochs", "accountant",
            "wall_seconds", "images_per_second", "n_train", "config")
    record |= {k: result.get(k) for k in keep}
    if record["phase"] == "final":
        record["test_accuracy"] = result.get("test_accuracy")  # search trials never look at the test split
    record["trial_seconds"] = seconds()
    if status == "completed":
        try:
            assert_within_budget(record)
        except BudgetError as e:
            status, reason = "failed", str(e)
    outcome = _outcome(record, status, reason)
    _report(outcome, {"record": record, "seconds": record["trial_seconds"]})
