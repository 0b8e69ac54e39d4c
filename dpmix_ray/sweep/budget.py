"""Privacy plans of a sweep's trials, fixed in the driver before a trial is launched (pure, no Ray).

* ``repeat_and_select``: every trial of a group runs the same mechanism, so the group is planned
  once, before Ray starts (:func:`plan_groups`): σ is calibrated so that releasing the best of the
  random search meets the group's ε. An infeasible budget is a BudgetError there, not K pruned trials.
* ``per_trial``: each suggested config is planned as one run at the group's ε (:func:`plan_trial`),
  since the batch size or the steps may be searched.

A plan is stored with the sweep (group plans in the sweep state, per-trial plans in the trial's
Tune config and ledger record) and handed to ``train(cfg, plan)``, which checks it against the
config and N; nothing re-plans on resume. A proxy search trial (:mod:`dpmix_ray.sweep.proxy`) is
planned at full size first and then scaled, with its own (large) ε as its plan's target.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from functools import lru_cache
from typing import Any

from dpmix_ray import recipe
from dpmix_ray.config import DataConfig, SweepConfig, TrainConfig, check_against_dataset, with_updates
from dpmix_ray.errors import BudgetError, DPMixError
from dpmix_ray.privacy import Plan, calibrate_noise_for_tuning, epsilon_spent, plan_run, repeat_and_select_epsilon
from dpmix_ray.sweep import proxy, space
from dpmix_ray.sweep.plan import Group, count_shape, trial_config, trial_seed, uses_tuning_calibration

# A trial's ε_spent may exceed its target by float noise only.
BUDGET_SLACK = 1e-9
_ONE_RUN_PLANS: dict[tuple[str, int], Plan] = {}


@dataclass(frozen=True)
class TrialPlan:
    """One trial's privacy plan: ``run`` is what ``train`` executes on ``n_train`` examples.

    ``trial_epsilon``: the ε target one run is planned against (None: non-private).
    ``search_epsilon``: under repeat_and_select, the ε of releasing the best of the whole random search.
    """

    run: Plan
    n_train: int
    trial_epsilon: float | None
    search_epsilon: float | None = None

    def as_dict(self) -> dict[str, Any]:
        run = self.run.as_dict()
        run["epsilon_spent"] = run["epsilon_spent"] if math.isfinite(run["epsilon_spent"]) else None  # JSON has no ∞
        return {"run": run, "n_train": self.n_train, "trial_epsilon": self.trial_epsilon, "search_epsilon": self.search_epsilon}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrialPlan:
        run = dict(d["run"])
        run["epsilon_spent"] = math.inf if run["epsilon_spent"] is None else run["epsilon_spent"]
        return cls(Plan(**run), int(d["n_train"]), d["trial_epsilon"], d["search_epsilon"])


@lru_cache(maxsize=8)
def _training_size(data_json: str) -> int:
    from dpmix_ray.data import load_splits  # the data stack only when a plan needs N

    return len(load_splits(DataConfig.model_validate_json(data_json)).train)


def training_size(data: DataConfig) -> int:
    """N, the number of training examples the guarantee is about (loaded once per data config)."""
    return _training_size(data.model_dump_json())


def plan_group(cfg: SweepConfig, group: Group, n_train: int) -> TrialPlan:
    """The one plan every trial of ``group`` runs under repeat_and_select. Raises BudgetError / ConfigError.

    With a search: σ is the smallest for which releasing the best of the random search (trial count
    drawn as configured; dp_accounting's RDP RepeatAndSelectDpEvent) meets the group's ε, at the
    (q, T) of the base config's batch size and epochs; each trial then spends the smaller per-trial ε.
    Without a search (nothing tuned), a plain one-run plan.
    """
    train_cfg = recipe.resolve(trial_config(cfg, group, {}, cfg.base.seed), n_train)
    check_against_dataset(train_cfg, n_train)
    one_run = _one_run(train_cfg, n_train)
    if not uses_tuning_calibration(cfg, group):
        return one_run
    eps, delta, accountant = train_cfg.privacy.epsilon, train_cfg.privacy.delta, train_cfg.privacy.accountant
    q, steps = one_run.run.sample_rate, one_run.run.steps  # the base config's batch size and epochs
    mean, shape = float(cfg.search.trials_per_epsilon), count_shape(cfg)
    sigma = calibrate_noise_for_tuning(epsilon=eps, delta=delta, sample_rate=q, steps=steps, mean_trials=mean, shape=shape)
    search = repeat_and_select_epsilon(noise_multiplier=sigma, sample_rate=q, steps=steps, delta=delta, mean_trials=mean, shape=shape)
    if not search <= eps:
        raise BudgetError(f"a random search of mean {mean:g} trials spends ε={search:.4g} > {eps:g}; refusing it")
    per_trial = epsilon_spent(noise_multiplier=sigma, sample_rate=q, steps=steps, delta=delta, accountant=accountant,
                              neighbouring=train_cfg.privacy.neighbouring)
    run = replace(one_run.run, noise_multiplier=sigma, epsilon_spent=per_trial)
    return TrialPlan(run, n_train, trial_epsilon=per_trial, search_epsilon=search)


def _one_run(train_cfg: TrainConfig, n_train: int) -> TrialPlan:
    """A plan that spends the config's own ε on one run (BudgetError if it can't).

    Memoised on what ``plan_run`` reads (method, batch size, epochs, the privacy section, N): suggestions
    that differ only in lr, mixing or seed share one calibration (≈ 0.7 s each on MNIST-5k, in the
    driver's event loop). ``train`` re-checks every plan against its config either way.
    """
    key = (train_cfg.model_dump_json(include={"method": True, "optim": {"batch_size", "epochs"}, "privacy": True}), n_train)
    if key not in _ONE_RUN_PLANS:
        _ONE_RUN_PLANS[key] = plan_run(train_cfg, n_train)
    return TrialPlan(_ONE_RUN_PLANS[key], n_train, train_cfg.privacy.epsilon if train_cfg.is_private else None)


def plan_groups(cfg: SweepConfig, groups: list[Group], n_train: int) -> dict[str, TrialPlan]:
    """Under repeat_and_select, every group's plan (before Ray starts); under per_trial, none (planned per trial)."""
    if cfg.tuning_privacy != "repeat_and_select":
        return {}
    plans = {}
    for g in groups:
        try:
            plans[g.key] = plan_group(cfg, g, n_train)
        except BudgetError as e:
            raise BudgetError(f"{g.key}: {e}") from None
    return plans


def plan_trial(train_cfg: TrainConfig, group_plan: TrialPlan | None) -> TrialPlan:
    """The plan of one suggested trial config. Raises ConfigError / BudgetError (the trial is then refused).

    With a group plan (repeat_and_select) the trial runs exactly that mechanism (the sweep refuses
    searching anything that changes it, and ``train`` checks the plan against the config and N);
    otherwise the config is planned as one run at its own ε.
    """
    n = group_plan.n_train if group_plan is not None else training_size(train_cfg.data)
    check_against_dataset(train_cfg, n)
    return group_plan if group_plan is not None else _one_run(train_cfg, n)


def check_within_budget(record: dict[str, Any]) -> None:
    """Raise BudgetError if a completed trial spent more than its plan allows (must never happen; survives -O)."""
    target, spent = record.get("trial_epsilon"), record.get("epsilon_spent")
    if target is not None and spent is not None and not spent <= target * (1 + BUDGET_SLACK):
        raise BudgetError(f"trial {record.get('trial_id')} ({record.get('group')}) spent ε={spent:.6g} > target {target:.6g}")
    search, eps = record.get("search_epsilon"), record.get("epsilon")
    if search is not None and eps is not None and not search <= eps * (1 + BUDGET_SLACK):
        raise BudgetError(f"trial {record.get('trial_id')} ({record.get('group')}): search ε={search:.6g} > sweep ε={eps:g}")


# What a ledger record says about the trial it records, copied from its spec.
_IDENTITY = ("group", "method", "epsilon", "delta", "phase", "index", "seed", "params", "proxy")


def identity(spec: dict[str, Any]) -> dict[str, Any]:
    """The identifying part of a trial's ledger record, from its :func:`trial_spec` (the trial's Tune config)."""
    return {k: spec[k] for k in _IDENTITY}


def resolve_trial(cfg: SweepConfig, group: Group, params: dict[str, Any], seed: int, group_plan: TrialPlan | None,
                  *, synthetic: str | None = None) -> tuple[TrainConfig, TrialPlan]:
    """A point of the search space as the full-size trial it stands for: its validated config and plan.

    ``dp.steps`` becomes epochs at the point's batch size; null batch size and epochs are derived from N
    (:func:`dpmix_ray.recipe.resolve`); the planner fixes σ (or T). Then a private lr comes from τ
    (``dp.tau``, or the recipe's τ where lr is null) and the σ the trial really runs: under
    repeat_and_select the group's tuning σ, not a one-run σ. Raises ConfigError / BudgetError for a
    point that cannot run.
    """
    n = group_plan.n_train if group_plan is not None else training_size(cfg.base.data)
    updates = space.config_updates(params, trial_config(cfg, group, {}, seed), n)  # the group's own K, m (dp.compute)
    if synthetic is not None and cfg.base.mix.synthetic == "synth":
        updates["mix.synthetic"] = synthetic
    train_cfg = trial_config(cfg, group, updates, seed)
    tau = params.get(space.TAU, recipe.TAU if train_cfg.optim.lr is None else None) if train_cfg.is_private else None
    train_cfg = recipe.resolve(train_cfg, n, lr=tau is None)
    plan = plan_trial(train_cfg, group_plan)
    if tau is not None:
        train_cfg = with_updates(train_cfg, {"optim.lr": space.lr_from_tau(float(tau), train_cfg, plan.run)})
    return train_cfg, plan


def _as_proxy(cfg: SweepConfig, train_cfg: TrainConfig, plan: TrialPlan) -> tuple[TrainConfig, TrialPlan] | None:
    """The proxy of a full-size search trial (:mod:`dpmix_ray.sweep.proxy`), or None where none applies."""
    small = cfg.search.proxy.batch_size if cfg.search.proxy is not None else None
    if small is None or not train_cfg.is_private or not proxy.applies(train_cfg.optim.batch_size, small):
        return None
    run = proxy.scale(plan.run, batch_size=train_cfg.optim.batch_size, proxy_batch=small, n_train=plan.n_train, delta=train_cfg.privacy.delta)
    return proxy.config(train_cfg, run, small), TrialPlan(run, plan.n_train, trial_epsilon=run.epsilon_spent)


def trial_spec(
    cfg: SweepConfig, group: Group, *, phase: str, index: int, params: dict[str, Any], group_plan: TrialPlan | None, synthetic: str | None
) -> dict[str, Any]:
    """What the driver launches: the trial's resolved config and its plan, or why it is refused (before any step).

    A search trial runs as its proxy when ``search.proxy`` applies (``proxy: true``); a final run always at
    full size. The Tune config of one trial (JSON-able, so Tune's experiment state keeps it across a resume).
    """
    seed = trial_seed(cfg, phase, index)
    spec: dict[str, Any] = {
        "group": group.key, "method": group.method, "epsilon": group.epsilon, "delta": cfg.delta if group.epsilon is not None else None,
        "phase": phase, "index": index, "seed": seed, "params": params, "proxy": False, "train": None, "plan": None, "refused": None,
    }
    try:
        train_cfg, plan = resolve_trial(cfg, group, params, seed, group_plan, synthetic=synthetic)
        small = _as_proxy(cfg, train_cfg, plan) if phase == "search" else None
    except DPMixError as e:
        return spec | {"refused": str(e)}
    if small is not None:
        train_cfg, plan = small
    return spec | {"train": train_cfg.model_dump(mode="json"), "plan": plan.as_dict(), "proxy": small is not None}
