"""The Tune search algorithm of a sweep: per-group Optuna studies behind one Searcher, one ASHA per group.

* :class:`GroupedSearcher` keeps one ``OptunaSearch`` per group (each its own Optuna study in the
  one ``optuna.db``), hands out that group's drawn number of trials, and once a group's search is
  over issues its ``final.seeds`` fresh-seed re-runs of the best config (selected on validation
  accuracy only) while the other groups keep searching. Every trial it issues carries its privacy
  plan, made here in the driver (:func:`dpmix_ray.sweep.budget.trial_spec`), or the reason it is refused.
* :class:`GroupedScheduler` runs one ASHA per group: trials at ε=1 must never be stopped for being
  worse than trials at ε=8.
"""

from __future__ import annotations

import logging
import pickle
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import TrialState
from ray.tune.schedulers import AsyncHyperBandScheduler, FIFOScheduler, TrialScheduler
from ray.tune.search import Searcher
from ray.tune.search.optuna import OptunaSearch

from dpmix_ray.config import SweepConfig
from dpmix_ray.sweep.budget import TrialPlan, trial_spec
from dpmix_ray.sweep.plan import METRIC, Group, optuna_distributions

optuna.logging.set_verbosity(optuna.logging.WARNING)
log = logging.getLogger(__name__)


class _Study(OptunaSearch):
    """``OptunaSearch`` that also tells Optuna about outcomes Tune only sees as plain completions."""

    def finish(self, trial_id: str, *, value: float | None, state: TrialState) -> None:
        try:
            self._ot_study.tell(self._ot_trials[trial_id], value if state == TrialState.COMPLETE else None, state=state)
        except ValueError as e:  # already told before a kill, and re-reported after the resume
            log.info("optuna: %s", e)
        self._completed_trials.add(trial_id)

    def fail_orphans(self) -> None:
        """Mark Optuna trials left RUNNING by a kill before Tune's last snapshot as FAIL (Tune will never finish them)."""
        known = {t.number for t in self._ot_trials.values()}
        for t in self._ot_study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            if t.number not in known:
                self._ot_study.tell(t.number, state=TrialState.FAIL)


def _make_study(cfg: SweepConfig, group: Group, index: int, count: int, storage: optuna.storages.BaseStorage) -> _Study:
    seed = cfg.search.seed + index
    if cfg.search.sampler == "random":
        sampler: optuna.samplers.BaseSampler = optuna.samplers.RandomSampler(seed=seed)
    else:
        # Startup trials are random; with a handful of trials per ε, TPE should still get to model some.
        sampler = optuna.samplers.TPESampler(seed=seed, n_startup_trials=min(10, max(2, count // 2)), constant_liar=True)
    study = _Study(
        space=optuna_distributions(group.space), metric=METRIC, mode="max", sampler=sampler,
        study_name=group.key, storage=storage,
    )
    study.fail_orphans()
    return study


class GroupedSearcher(Searcher):
    """Round-robins suggestions over per-group Optuna studies; then the best config's final re-runs."""

    def __init__(
        self, cfg: SweepConfig, groups: list[Group], counts: dict[str, int], db: Path, *,
        plans: dict[str, TrialPlan], synthetic: str | None,
    ):
        super().__init__(metric=METRIC, mode="max")
        storage = optuna.storages.RDBStorage(f"sqlite:///{db}")
        self._cfg = cfg
        self._groups = {g.key: g for g in groups}
        self._plans = plans  # per group under repeat_and_select (fixed before Ray started); empty under per_trial
        self._synthetic = synthetic
        self._keys = [g.key for g in groups]
        self._counts = dict(counts)
        self._studies: dict[str, _Study | None] = {
            g.key: _make_study(cfg, g, i, counts[g.key], storage) if g.space else None for i, g in enumerate(groups)
        }
        self._issued = {k: 0 for k in self._keys}
        self._finals = {k: 0 for k in self._keys}
        self._open: dict[str, set[str]] = {k: set() for k in self._keys}
        self._trials: dict[str, dict[str, Any]] = {}  # trial_id -> the config it was issued
        self._best: dict[str, dict[str, Any]] = {}  # group -> value, index, params of its best completed search trial
        self._next = 0

    def _search_over(self, key: str) -> bool:
        return self._issued[key] >= self._counts[key] and not self._open[key]

    def _finals_wanted(self, key: str) -> int:
        return self._cfg.final.seeds if key in self._best else 0

    def _issue(self, trial_id: str, key: str, phase: str, index: int, params: dict[str, Any]) -> dict[str, Any]:
        config = trial_spec(
            self._cfg, self._groups[key], phase=phase, index=index, params=params, group_plan=self._plans.get(key), synthetic=self._synthetic
        )
        self._trials[trial_id] = config
        return config

    def suggest(self, trial_id: str) -> dict[str, Any] | str | None:
        for key in self._keys:  # finals first: they complete a row of the table
            if self._search_over(key) and self._finals[key] < self._finals_wanted(key):
                self._finals[key] += 1
                return self._issue(trial_id, key, "final", self._finals[key] - 1, dict(self._best[key]["params"]))
        for shift in range(len(self._keys)):
            key = self._keys[(self._next + shift) % len(self._keys)]
            if self._issued[key] < self._counts[key]:
                self._next = (self._next + shift + 1) % len(self._keys)
                study = self._studies[key]
                params = study.suggest(trial_id) if study is not None else {}
                self._issued[key] += 1
                self._open[key].add(trial_id)
                return self._issue(trial_id, key, "search", self._issued[key] - 1, params)
        if all(self._search_over(k) and self._finals[k] >= self._finals_wanted(k) for k in self._keys):
            return Searcher.FINISHED
        return None  # waiting for a group's search to end before its finals

    def on_trial_result(self, trial_id: str, result: dict[str, Any]) -> None:
        issued = self._trials[trial_id]
        study = self._studies[issued["group"]]
        if issued["phase"] == "search" and study is not None and "trial_status" not in result and result.get(METRIC) is not None:
            try:
                study.on_trial_result(trial_id, result)
            except optuna.exceptions.UpdateFinishedTrialError:  # told before a kill, re-trained after the resume
                pass

    def on_trial_complete(self, trial_id: str, result: dict[str, Any] | None = None, error: bool = False) -> None:
        issued = self._trials[trial_id]
        key = issued["group"]
        if issued["phase"] != "search":
            return
        self._open[key].discard(trial_id)
        status = (result or {}).get("trial_status")
        value = (result or {}).get(METRIC)
        best = self._best.get(key)
        if status == "completed" and value is not None and (best is None or (value, -issued["index"]) > (best["value"], -best["index"])):
            self._best[key] = {"value": value, "index": issued["index"], "params": issued["params"]}  # same rule as the report
        study = self._studies[key]
        if study is None:
            return
        if error or status == "failed":
            state = TrialState.FAIL
        elif status == "completed" and value is not None:
            state = TrialState.COMPLETE
        else:  # refused by the planner, or stopped early by ASHA
            state = TrialState.PRUNED
        study.finish(trial_id, value=value, state=state)

    def save(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "wb") as f:
            pickle.dump(self.__dict__, f)

    def restore(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "rb") as f:
            self.__dict__.update(pickle.load(f))
        for study in self._studies.values():
            if study is not None:
                study.fail_orphans()


class GroupedScheduler(FIFOScheduler):
    """One ASHA per group over epoch reports; finals, refusals and final reports pass through."""

    def __init__(self, max_t: int):
        super().__init__()
        self._metric = METRIC
        self._max_t = max_t
        self._asha: dict[str, AsyncHyperBandScheduler] = {}

    def set_search_properties(self, metric: str | None, mode: str | None, **spec: Any) -> bool:
        return True

    def _for(self, trial: Any) -> AsyncHyperBandScheduler | None:
        if trial.config.get("phase") != "search":
            return None
        key = trial.config["group"]
        if key not in self._asha:
            self._asha[key] = AsyncHyperBandScheduler(
                metric=METRIC, mode="max", max_t=self._max_t, grace_period=1, reduction_factor=3, stop_last_trials=False
            )
        return self._asha[key]

    @staticmethod
    def _epoch_result(result: dict[str, Any]) -> bool:
        return "trial_status" not in result and result.get(METRIC) is not None

    def on_trial_add(self, tune_controller: Any, trial: Any) -> None:
        if (asha := self._for(trial)) is not None:
            asha.on_trial_add(tune_controller, trial)

    def on_trial_result(self, tune_controller: Any, trial: Any, result: dict[str, Any]) -> str:
        asha = self._for(trial)
        if asha is None or not self._epoch_result(result):
            return TrialScheduler.CONTINUE
        return asha.on_trial_result(tune_controller, trial, result)

    def on_trial_complete(self, tune_controller: Any, trial: Any, result: dict[str, Any]) -> None:
        if (asha := self._for(trial)) is not None:
            if self._epoch_result(result):
                asha.on_trial_complete(tune_controller, trial, result)
            else:
                asha.on_trial_remove(tune_controller, trial)

    def on_trial_remove(self, tune_controller: Any, trial: Any) -> None:
        if (asha := self._for(trial)) is not None:
            asha.on_trial_remove(tune_controller, trial)

    def debug_string(self) -> str:
        return f"ASHA per group ({len(self._asha)} groups)"
