"""The Tune trainable: one trial = one call of the shared trainer with the plan the driver made, reporting once per epoch.

Glue only. The searcher hands each trial its resolved TrainConfig and privacy plan, or the reason
it was refused (:func:`dpmix_ray.sweep.budget.trial_spec`); the trial trains and reports. Its last
report is an :class:`~dpmix_ray.sweep.outcome.Outcome`:

* ``pruned``: refused before any step (an impossible config, or a plan ``train`` does not accept).
* ``failed``: training raised (diverged, bad data, a bug); the sweep goes on. Only a *crashed*
  worker (actor or node lost) reaches Tune as an error and is retried from the last checkpoint.
* ``completed``: the record carries the selection score (:mod:`dpmix_ray.sweep.selection`) from the
  epoch reports; the last checkpoint holds the record too, and for a trial that may be released
  (full size, not a proxy) the trained model's weights, so a trial that finished just before a
  kill is re-reported on resume, not re-trained.

Every trial evaluates the test split too; selection reads validation figures only. Only the keys
of the trainer's documented result (:data:`RESULT_KEYS`) reach the ledger.
"""

from __future__ import annotations

import logging
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
from dpmix_ray.sweep import selection
from dpmix_ray.sweep.budget import TrialPlan, check_within_budget, identity
from dpmix_ray.sweep.outcome import Outcome, Status, epoch_report
from dpmix_ray.trainer import EpochReport, fit

log = logging.getLogger(__name__)
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
    """The trial's last checkpoint, or None to start afresh: there is none, or the one Tune restored holds no state.

    The latter happens when the driver is killed after Tune deleted a superseded checkpoint (num_to_keep=1) and
    before its next experiment snapshot: the snapshot names a checkpoint that is gone. Nothing of the lost partial
    run was released (its checkpoints are the curator's), so the trial runs again from step 0 under its plan."""
    ckpt = tune.get_checkpoint()
    if ckpt is None:
        return None
    with ckpt.as_directory() as d:
        files = {p.name: torch.load(p, weights_only=False) for p in Path(d).iterdir() if p.suffix == ".pt"} if Path(d).is_dir() else {}
    if STATE_FILE not in files:
        log.warning("trial checkpoint %s holds no %s (lost in a kill before Tune's snapshot): the trial starts again", ckpt.path, STATE_FILE)
        return None
    return files


def _outcome(record: dict[str, Any], status: Status, reason: str | None = None) -> dict[str, Any]:
    """The trial's last report: its typed outcome, with the whole ledger record."""
    record |= {"status": status.value, "reason": reason, "finished_at": time.time()}
    return Outcome.of_record(record).as_result()


def result_fields(result: dict[str, Any]) -> dict[str, Any]:
    """The ledger's share of a train result: the documented keys only (never mechanism state)."""
    return {k: result.get(k) for k in RESULT_KEYS}


def run_trial(config: dict[str, Any]) -> None:
    """Tune function trainable; ``config`` is a :func:`~dpmix_ray.sweep.budget.trial_spec`."""
    started, started_at, cpu_started = time.perf_counter(), time.time(), time.process_time()
    saved = _load_checkpoint()
    if saved is not None and "record" in saved[STATE_FILE]:
        record = saved[STATE_FILE]["record"]
        _report(_outcome(record, Status(record["status"]), record["reason"]), saved)
        return
    state = saved[STATE_FILE] if saved else None
    spent_before, cpu_before = (state["seconds"], state["cpu_seconds"]) if state else (0.0, 0.0)
    history: list[tuple[int, float]] = list(state["history"]) if state else []  # (step, val) of each epoch report
    plan = TrialPlan.from_dict(config["plan"]) if config["plan"] is not None else None
    record: dict[str, Any] = {
        **identity(config),
        "trial_epsilon": plan.trial_epsilon if plan else None, "search_epsilon": plan.search_epsilon if plan else None,
        "started_at": started_at, "val_accuracy": None, "test_accuracy": None, "score": None,
        "resumed_from_step": state["train"]["step"] if state else 0,
    }
    record["node_id"] = ray.get_runtime_context().get_node_id()  # where this (possibly retried) run trained

    def seconds() -> float:
        return spent_before + time.perf_counter() - started

    def cpu_seconds() -> float:
        """CPU time of this trial's process (all its threads): its compute, whatever else shares the machine."""
        return cpu_before + time.process_time() - cpu_started

    def stop(status: Status, reason: str) -> None:
        record.update(trial_seconds=seconds(), trial_cpu_seconds=cpu_seconds())
        _report(_outcome(record, status, reason))

    if plan is None:
        return stop(Status.PRUNED, config["refused"])
    train_cfg = TrainConfig.model_validate(config["train"])
    try:
        splits = _splits(train_cfg.data.model_dump_json())
    except Exception as e:  # noqa: BLE001 - e.g. missing data: deterministic, so recorded rather than retried
        return stop(Status.FAILED, f"{type(e).__name__}: {e}")
    trained = state is not None

    def on_epoch(rep: EpochReport) -> None:
        nonlocal trained
        trained = True
        history.append((rep.step, rep.metrics["val_accuracy"]))
        metrics = epoch_report(val_accuracy=rep.metrics["val_accuracy"], epsilon_spent=rep.metrics.get("epsilon_spent"),
                               epoch=rep.epoch, step=rep.step, steps=plan.run.steps, seconds=seconds(), cpu_seconds=cpu_seconds())
        _report(metrics, {STATE_FILE: {"train": rep.state(), "seconds": seconds(), "cpu_seconds": cpu_seconds(), "history": list(history)}})

    model: dict[str, torch.Tensor] | None = None
    try:
        fitted = fit(train_cfg, plan.run, on_epoch=on_epoch, resume_state=state["train"] if state else None, progress=False, splits=splits)
    except (ConfigError, BudgetError) as e:
        if not trained:  # the trainer refused the plan before the first step
            return stop(Status.PRUNED, str(e))
        status, reason, result = Status.FAILED, str(e), {}
    except Exception as e:  # noqa: BLE001 - a trial's failure is data for the sweep, not a crash of it
        status, reason, result = Status.FAILED, f"{type(e).__name__}: {e}", {}
    else:
        status, reason, result = Status.COMPLETED, None, fitted.result
        if not config["proxy"]:  # a candidate for release (selection.released): the driver keeps each group's
            model = {k: v.detach().cpu() for k, v in fitted.model.state_dict().items()}
    record |= result_fields(result)
    record["score"] = selection.score(history, plan.run.steps) if status is Status.COMPLETED else None
    record |= {"trial_seconds": seconds(), "trial_cpu_seconds": cpu_seconds()}
    if status is Status.COMPLETED:
        try:
            check_within_budget(record)
        except BudgetError as e:
            status, reason, model = Status.FAILED, str(e), None
    files: dict[str, Any] = {STATE_FILE: {"record": record, "seconds": record["trial_seconds"]}}
    if model is not None:
        files[MODEL_FILE] = {"state_dict": model}
    _report(_outcome(record, status, reason), files)
