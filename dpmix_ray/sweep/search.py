"""The Tune search algorithm of a sweep: per-group Optuna studies behind one Searcher, one ASHA per group.

* :class:`GroupedSearcher` keeps one ``OptunaSearch`` per group (each its own Optuna study in the
  one ``optuna.db``), hands out that group's drawn number of trials, and once a group's search is
  over issues its fresh-seed final runs of the selected recipe (:mod:`dpmix_ray.sweep.selection`)
  while the other groups keep searching. Every trial it issues carries its privacy plan, made here
  in the driver (:func:`dpmix_ray.sweep.budget.trial_spec`), or the reason it is refused.
* Known-good recipes go first: every study is seeded with the embedded/derived default before any
  sampled point (``search.warm_start``), and whenever a group's best recipe improves it is handed to
  the same method's studies at the neighbouring ε, moved by the transfer rule
  (:func:`dpmix_ray.sweep.space.transfer`; ``search.transfer``). Both are Optuna enqueued trials:
  ``OptunaSearch`` asks its study, which pops them before sampling; they live in ``optuna.db``, so a
  resume neither loses nor repeats them. Neither runs under repeat_and_select (random search only).
* :class:`GroupedScheduler` runs one ASHA per group on the trials' progress through their steps:
  trials at ε=1 must never be stopped for being worse than trials at ε=8.
"""

from __future__ import annotations

import json
import logging
import pickle
import secrets
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import TrialState
from ray.tune.schedulers import AsyncHyperBandScheduler, FIFOScheduler, TrialScheduler
from ray.tune.search import Searcher
from ray.tune.search.optuna import OptunaSearch

from dpmix_ray.config import SweepConfig
from dpmix_ray.sweep import plan as P
from dpmix_ray.sweep import selection, space
from dpmix_ray.sweep.budget import TrialPlan, trial_spec
from dpmix_ray.sweep.estimate import would_overrun
from dpmix_ray.sweep.outcome import METRIC, PROGRESS, Outcome, Status, is_epoch_report

optuna.logging.set_verbosity(optuna.logging.WARNING)
log = logging.getLogger(__name__)


class _Study(OptunaSearch):
    """``OptunaSearch`` that also tells Optuna about outcomes Tune only sees as plain completions, and takes seeds."""

    def enqueue(self, point: dict[str, Any]) -> None:
        """A known-good point, asked before any sampled one (skipped if the study already holds it)."""
        self._ot_study.enqueue_trial(point, skip_if_exists=True)

    def label(self, trial_id: str, spec: dict[str, Any]) -> None:
        """What optuna-dashboard shows beside a trial's parameters: whether it is a proxy, and the ε its run spends."""
        trial = self._ot_trials[trial_id]
        trial.set_user_attr("proxy", spec["proxy"])
        trial.set_user_attr("trial_epsilon", (spec["plan"] or {}).get("trial_epsilon"))
        if spec["refused"]:
            trial.set_user_attr("refused", spec["refused"])

    def finish(self, trial_id: str, *, value: float | None, state: TrialState) -> None:
        try:
            self._ot_study.tell(self._ot_trials[trial_id], value if state == TrialState.COMPLETE else None, state=state)
        except ValueError as e:  # already told before a kill, and re-reported after the resume
            log.info("optuna: %s", e)
        self._completed_trials.add(trial_id)

    def fail_orphans(self) -> None:
        """Mark Optuna trials left RUNNING by a kill before Tune's last snapshot as FAIL (Tune will never finish them);
        an orphan that was an enqueued seed is enqueued again, so the seed is not lost."""
        known = {t.number for t in self._ot_trials.values()}
        for t in self._ot_study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            if t.number not in known:
                self._ot_study.tell(t.number, state=TrialState.FAIL)
                if "fixed_params" in t.system_attrs:
                    self._ot_study.enqueue_trial(t.system_attrs["fixed_params"])


def _make_study(cfg: SweepConfig, group: P.Group, index: int, count: int, storage: optuna.storages.BaseStorage) -> _Study:
    seed = secrets.randbits(31) if P.secret_seeds(cfg) else cfg.search.seed + index  # the sampler's state is pickled with the searcher
    if cfg.search.sampler == "random":
        sampler: optuna.samplers.BaseSampler = optuna.samplers.RandomSampler(seed=seed)
    else:
        # Startup trials are random; with a handful of trials per ε, TPE should still get to model some.
        sampler = optuna.samplers.TPESampler(seed=seed, n_startup_trials=min(10, max(2, count // 2)), constant_liar=True)
    study = _Study(
        space=P.optuna_distributions(group.space), metric=METRIC, mode="max", sampler=sampler,
        study_name=group.key, storage=storage,
    )
    study.fail_orphans()
    return study


class GroupedSearcher(Searcher):
    """Round-robins suggestions over per-group Optuna studies (seeded, with transfer across ε); then the finals."""

    def __init__(
        self, cfg: SweepConfig, groups: list[P.Group], counts: dict[str, int], db: Path, *,
        plans: dict[str, TrialPlan], synthetic: str | None, n_train: int, compute: dict[str, Any] | None = None,
        stops: Path | None = None,
    ):
        super().__init__(metric=METRIC, mode="max")
        storage = optuna.storages.RDBStorage(f"sqlite:///{db}")
        self._cfg = cfg
        self._n_train = n_train
        self._group_list = list(groups)
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
        self._records: dict[str, list[dict[str, Any]]] = {k: [] for k in self._keys}  # finished search trials, per group
        self.handed_over: list[dict[str, Any]] = []  # transfers made: to, from, the source trial, the point
        # search.budget under per_trial: search trials are handed out while they fit it, beyond the planned count when
        # trials run faster than the probe said, and never one that would overrun it (repeat_and_select: the budget only
        # set the mean count, never changed). Trial seconds so far, from the trials' reports.
        self._compute = compute if cfg.tuning_privacy == "per_trial" else None
        self._stops = stops
        self._seconds: dict[str, float] = {}
        self._ended: set[str] = set()  # trials (search and final) that have ended
        self._completed: set[str] = set()  # those that completed: the probe's estimates are scaled by what they took
        self._next = 0
        if P.warm_start(cfg):
            for g in groups:
                if (study := self._studies[g.key]) is not None:
                    study.enqueue(space.default_point(cfg, P.trial_config(cfg, g, {}, cfg.base.seed), n_train))

    def _search_over(self, key: str) -> bool:
        return self._issued[key] >= self._counts[key] and not self._open[key]

    def _best(self, key: str) -> dict[str, Any] | None:
        return selection.best(self._records[key])

    def _finals_wanted(self, key: str) -> int:
        return P.final_seeds(self._cfg, self._groups[key]) if self._best(key) is not None else 0

    def _issue(self, trial_id: str, key: str, phase: str, index: int, params: dict[str, Any]) -> dict[str, Any]:
        config = trial_spec(
            self._cfg, self._groups[key], phase=phase, index=index, params=params, group_plan=self._plans.get(key), synthetic=self._synthetic
        )
        self._trials[trial_id] = config
        return config

    def suggest(self, trial_id: str) -> dict[str, Any] | str | None:
        for key in self._keys:  # search.budget: a planned trial that would overrun it is not handed out
            if self._issued[key] < self._counts[key] and self._would_overrun(key):
                self._counts[key] = self._issued[key]
                self._write_stops()
        for key in self._keys:  # finals first: they complete a row of the table (once the budget has no room for more search)
            if self._search_over(key) and self._finals[key] < self._finals_wanted(key) and not self._room_for_more(key):
                self._finals[key] += 1
                return self._issue(trial_id, key, "final", self._finals[key] - 1, dict(self._best(key)["params"]))
        for shift in range(len(self._keys)):
            key = self._keys[(self._next + shift) % len(self._keys)]
            if self._issued[key] < self._counts[key]:
                return self._search_trial(trial_id, key, shift)
        for shift in range(len(self._keys)):  # every planned trial is out: more while the budget has room for them
            key = self._keys[(self._next + shift) % len(self._keys)]
            if self._room_for_more(key):
                self._counts[key] += 1
                self._write_stops()
                return self._search_trial(trial_id, key, shift)
        if all(self._search_over(k) and self._finals[k] >= self._finals_wanted(k) for k in self._keys):
            return Searcher.FINISHED
        return None  # waiting for a group's search to end before its finals

    def _room_for_more(self, key: str) -> bool:
        """Under search.budget (per_trial): one search trial beyond ``key``'s count fits, and its finals have not begun."""
        return (self._compute is not None and self._studies[key] is not None and self._issued[key] >= self._counts[key] > 0
                and self._finals[key] == 0 and not self._would_overrun(key))

    def _search_trial(self, trial_id: str, key: str, shift: int) -> dict[str, Any]:
        self._next = (self._next + shift + 1) % len(self._keys)
        study = self._studies[key]
        params = study.suggest(trial_id) if study is not None else {}
        self._issued[key] += 1
        self._open[key].add(trial_id)
        spec = self._issue(trial_id, key, "search", self._issued[key] - 1, params)
        if study is not None:
            study.label(trial_id, spec)
        return spec

    def _probe_seconds(self, phase: str, key: str) -> float:
        return self._compute["search" if phase == "search" else "final"].get(key, 0.0)

    def _scale(self) -> float:
        """What the completed trials took over the probe's estimates of them (1 before any completed)."""
        took = sum(self._seconds[t] for t in self._completed)
        said = sum(self._probe_seconds(self._trials[t]["phase"], self._trials[t]["group"]) for t in self._completed)
        return took / said if took > 0 and said > 0 else 1.0

    def _would_overrun(self, key: str) -> bool:
        """Whether one more search trial of ``key``, with what runs and every final still to come, overruns the budget."""
        if self._compute is None:
            return False
        scale = self._scale()  # one trial's seconds: the probe's estimate × scale
        running = sum(max(0.0, self._probe_seconds(c["phase"], c["group"]) * scale - self._seconds.get(t, 0.0))
                      for t, c in self._trials.items() if t not in self._ended)
        finals = sum(max(0, P.final_seeds(self._cfg, self._groups[k]) - self._finals[k]) * self._probe_seconds("final", k) for k in self._keys)
        return would_overrun(self._compute["budget_seconds"], spent=sum(self._seconds.values()),
                             committed=running + (finals + self._probe_seconds("search", key)) * scale)

    def _write_stops(self) -> None:
        if self._stops is not None:
            self._stops.write_text(json.dumps(self._counts))

    def on_trial_result(self, trial_id: str, result: dict[str, Any]) -> None:
        if result.get("trial_seconds") is not None:
            self._seconds[trial_id] = float(result["trial_seconds"])
        issued = self._trials[trial_id]
        study = self._studies[issued["group"]]
        if issued["phase"] == "search" and study is not None and is_epoch_report(result):
            try:
                study.on_trial_result(trial_id, result)
            except optuna.exceptions.UpdateFinishedTrialError:  # told before a kill, re-trained after the resume
                pass

    def on_trial_complete(self, trial_id: str, result: dict[str, Any] | None = None, error: bool = False) -> None:
        ended = Outcome.of(result)
        seconds = (result or {}).get("record/trial_seconds", (ended.record or {}).get("trial_seconds") if ended else None)
        if seconds is not None:
            self._seconds[trial_id] = float(seconds)
            if ended is not None and ended.status is Status.COMPLETED:
                self._completed.add(trial_id)
        self._ended.add(trial_id)
        issued = self._trials[trial_id]
        key = issued["group"]
        if issued["phase"] != "search":
            return
        self._open[key].discard(trial_id)
        outcome = None if error else Outcome.of(result)
        before = self._best(key)
        if outcome is not None:
            self._records[key].append({k: issued[k] for k in ("phase", "index", "params", "proxy")}
                                      | {"status": outcome.status.value, "score": outcome.score})
        if (study := self._studies[key]) is not None:
            if outcome is not None and outcome.score is not None:
                study.finish(trial_id, value=outcome.score, state=TrialState.COMPLETE)
            elif error or (outcome is not None and outcome.status is Status.FAILED):
                study.finish(trial_id, value=None, state=TrialState.FAIL)
            else:  # refused by the planner, or stopped early by ASHA (its last report is an epoch's)
                study.finish(trial_id, value=None, state=TrialState.PRUNED)
        if self._best(key) is not before and P.transfer(self._cfg):
            self._hand_over(key)

    def _hand_over(self, key: str) -> None:
        """The group's new best recipe, moved by the transfer rule, to each neighbouring ε that still has trials to run."""
        best, source = self._best(key), self._groups[key]
        for target in P.neighbours(self._group_list, source):
            study = self._studies[target.key]
            if study is None or self._issued[target.key] >= self._counts[target.key]:
                continue
            point = space.transfer(best["params"], source.epsilon, target.epsilon, self._cfg.base, self._n_train, target.space,
                                   delta=self._cfg.delta, accountant=self._cfg.base.privacy.accountant,
                                   neighbouring=self._cfg.base.privacy.neighbouring)
            study.enqueue(point)
            self.handed_over.append({"to": target.key, "from": key, "index": best["index"], "point": point})

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
    """One ASHA per group over the search trials' progress (percent of their steps); finals and outcomes pass through."""

    def __init__(self, grace: float):
        super().__init__()
        self._metric = METRIC
        self._grace = grace
        self._asha: dict[str, AsyncHyperBandScheduler] = {}

    def set_search_properties(self, metric: str | None, mode: str | None, **spec: Any) -> bool:
        return True

    def _for(self, trial: Any) -> AsyncHyperBandScheduler | None:
        if trial.config.get("phase") != "search":
            return None
        key = trial.config["group"]
        if key not in self._asha:
            self._asha[key] = AsyncHyperBandScheduler(
                time_attr=PROGRESS, metric=METRIC, mode="max", max_t=100.0, grace_period=100.0 * self._grace, reduction_factor=3,
                stop_last_trials=False,
            )
        return self._asha[key]

    def on_trial_add(self, tune_controller: Any, trial: Any) -> None:
        if (asha := self._for(trial)) is not None:
            asha.on_trial_add(tune_controller, trial)

    def on_trial_result(self, tune_controller: Any, trial: Any, result: dict[str, Any]) -> str:
        asha = self._for(trial)
        if asha is None or not is_epoch_report(result):
            return TrialScheduler.CONTINUE
        decision = asha.on_trial_result(tune_controller, trial, result)  # the rung records the value either way
        # A trial at its last step has spent its compute: stopping it would only throw its outcome away.
        return TrialScheduler.CONTINUE if result.get(PROGRESS, 0.0) >= 100.0 else decision

    def on_trial_complete(self, tune_controller: Any, trial: Any, result: dict[str, Any]) -> None:
        if (asha := self._for(trial)) is not None:
            if is_epoch_report(result):
                asha.on_trial_complete(tune_controller, trial, result)
            else:
                asha.on_trial_remove(tune_controller, trial)

    def on_trial_remove(self, tune_controller: Any, trial: Any) -> None:
        if (asha := self._for(trial)) is not None:
            asha.on_trial_remove(tune_controller, trial)

    def debug_string(self) -> str:
        return f"ASHA per group ({len(self._asha)} groups)"
