"""What a sweep runs: groups, search spaces, trial counts, seeds, trial configs (privacy plans: :mod:`.budget`).

Pure functions (no Ray). A *group* is one Optuna study: one method at one ε (or the non-private
reference). Every trial config is the sweep's base config plus the group's fixed updates, the
sampled hyperparameters and a seed, validated by :func:`dpmix_ray.config.with_updates`.
"""

from __future__ import annotations

import math
import secrets
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import optuna
# The exact mean → γ map dp_accounting's accountant applies to RepeatAndSelectDpEvent: the counts drawn
# here must follow the distribution that is accounted for.
from dp_accounting.rdp.rdp_privacy_accountant import _gamma_truncated_negative_binomial

from dpmix_ray import methods
from dpmix_ray.config import SweepConfig, TrainConfig, with_updates
from dpmix_ray.errors import ConfigError

# Final re-runs of the chosen recipe use seeds far from the search trials' seeds.
FINAL_SEED_OFFSET = 100_000

# Set per experiment by the sweep itself, never searched.
_NOT_SEARCHABLE = ("method", "seed", "privacy.epsilon", "privacy.delta", "privacy.accountant", "privacy.reproducible")
# Under repeat_and_select every trial must run the same privacy mechanism (same q, T, σ): the
# repeat-and-select bound composes one RDP curve, not the worst of many.
_MECHANISM_KEYS = ("optim.batch_size", "optim.epochs", "dp.steps", "privacy.noise_multiplier", "data.", "synth.")


@dataclass(frozen=True)
class Group:
    """One study: ``method`` at ``epsilon`` (None for the non-private reference)."""

    key: str
    method: str
    epsilon: float | None
    space: dict[str, dict[str, list[Any]]] = field(default_factory=dict)

    @property
    def fixed(self) -> dict[str, Any]:
        """The counts the group's method pins (applied over the base config, which may set others)."""
        return dict(methods.get(self.method).fixed)


def group_key(method: str, epsilon: float | None) -> str:
    return method if epsilon is None else f"{method}@eps={epsilon:g}"


def _space_for(cfg: SweepConfig, method: str) -> dict[str, dict[str, list[Any]]]:
    """What a method's studies search: nothing for the non-private reference (one run, the ceiling), else the
    sweep's space less the keys the method never reads."""
    if not methods.get(method).private:
        return {}
    return {k: v for k, v in cfg.space.items() if not methods.ignores(method, k)}


def build_groups(cfg: SweepConfig) -> list[Group]:
    """The main method then each baseline, one group per ε (one group, one run, for ``nonprivate``)."""
    names = [cfg.base.method] + [m for m in cfg.baselines if m != cfg.base.method]
    groups: list[Group] = []
    for method in dict.fromkeys(names):
        eps_list: list[float | None] = list(cfg.epsilons) if methods.get(method).private else [None]
        groups += [Group(group_key(method, e), method, e, _space_for(cfg, method)) for e in eps_list]
    return groups


def check_sweep(cfg: SweepConfig) -> None:
    """Refusals that need the whole sweep (the schema checks each field alone). Raises ConfigError."""
    if not methods.get(cfg.base.method).private:
        raise ConfigError("base.method: a sweep tunes a private method per ε; list nonprivate under baselines")
    for key in cfg.space:
        if key in _NOT_SEARCHABLE:
            raise ConfigError(f"space.{key}: set by the sweep itself (epsilons, delta, baselines, seeds); it cannot be searched")
        dist = cfg.space[key]
        if "choice" in dist and not all(v is None or isinstance(v, (bool, int, float, str)) for v in dist["choice"]):
            raise ConfigError(f"space.{key}: choice values must be numbers, strings, booleans or null")
    if len(set(cfg.epsilons)) != len(cfg.epsilons):
        raise ConfigError("epsilons: each ε may appear once")
    for group in build_groups(cfg):
        try:
            with_updates(cfg.base, {**group.fixed, "method": group.method, "privacy.delta": cfg.delta})
        except ConfigError as e:
            raise ConfigError(f"baselines: {group.method} cannot run from this base config ({e})") from None
    if cfg.tuning_privacy == "repeat_and_select":
        if cfg.search.sampler != "random":
            raise ConfigError(
                "search.sampler: repeat_and_select needs random (the Papernot–Steinke bound holds for random "
                "search with a random number of trials; TPE adapts to earlier trials)"
            )
        if cfg.search.scheduler == "asha":
            raise ConfigError("search.scheduler: repeat_and_select needs fifo (early stopping makes trials depend on each other)")
        adaptive = {"search.warm_start": cfg.search.warm_start, "search.transfer": cfg.search.transfer}
        for key, on in adaptive.items():
            if on:
                raise ConfigError(f"{key}: repeat_and_select needs random search only (seeding a study with chosen recipes adapts it)")
        if cfg.search.proxy is not None:
            raise ConfigError("search.proxy: repeat_and_select needs every trial to run the one private mechanism (proxy trials are not private)")
        if cfg.base.privacy.noise_multiplier is not None:
            raise ConfigError("base.privacy.noise_multiplier: repeat_and_select fixes the step count and calibrates σ; give epochs, not σ")
        for key in cfg.space:
            if key.startswith(_MECHANISM_KEYS):
                raise ConfigError(
                    f"space.{key}: repeat_and_select needs every trial to run the same privacy mechanism "
                    "(same sampling rate, steps and σ); search it only with tuning_privacy: per_trial"
                )
    elif cfg.search.trials_shape is not None:
        raise ConfigError("search.trials_shape: only used by tuning_privacy: repeat_and_select")
    if cfg.base.privacy.noise_multiplier is not None and (cfg.search.proxy is not None or "dp.steps" in cfg.space):
        raise ConfigError("base.privacy.noise_multiplier: search.proxy and dp.steps fix the step count and calibrate σ; give epochs, not σ")
    if cfg.search.proxy is not None and cfg.final.seeds < 1:
        raise ConfigError("search.proxy: needs final.seeds >= 1 (proxy trials are never released: the chosen recipe's full-size runs are)")


def warm_start(cfg: SweepConfig) -> bool:
    """Whether each study starts from the embedded/derived default (adaptive: never under repeat_and_select)."""
    return cfg.search.warm_start if cfg.search.warm_start is not None else cfg.tuning_privacy == "per_trial"


def transfer(cfg: SweepConfig) -> bool:
    """Whether a study receives its neighbouring ε's best recipe (adaptive: never under repeat_and_select)."""
    return cfg.search.transfer if cfg.search.transfer is not None else cfg.tuning_privacy == "per_trial"


def early_stopping(cfg: SweepConfig) -> bool:
    """Whether ASHA stops poor search trials (never under repeat_and_select: trials would depend on each other)."""
    return cfg.search.scheduler == "asha"


def neighbours(groups: list[Group], group: Group) -> list[Group]:
    """The same method's groups at the ε just below and just above ``group``'s: where its best recipe is handed."""
    same = sorted((g for g in groups if g.method == group.method and g.epsilon is not None), key=lambda g: g.epsilon)
    i = next((i for i, g in enumerate(same) if g.key == group.key), None)
    return [] if i is None else [same[j] for j in (i - 1, i + 1) if 0 <= j < len(same)]


def final_seeds(cfg: SweepConfig, group: Group) -> int:
    """Fresh-seed re-runs of a group's chosen recipe: none for the non-private reference (one run)."""
    return cfg.final.seeds if methods.get(group.method).private else 0


def optuna_distributions(space: dict[str, dict[str, list[Any]]]) -> dict[str, optuna.distributions.BaseDistribution]:
    """The sweep YAML's ``{loguniform|uniform|int|choice: [...]}`` as Optuna distributions."""
    out: dict[str, optuna.distributions.BaseDistribution] = {}
    for key, dist in space.items():
        kind, args = next(iter(dist.items()))
        if kind == "choice":
            out[key] = optuna.distributions.CategoricalDistribution(list(args))
        elif kind == "int":
            out[key] = optuna.distributions.IntDistribution(int(args[0]), int(args[1]))
        else:
            out[key] = optuna.distributions.FloatDistribution(float(args[0]), float(args[1]), log=kind == "loguniform")
    return out


def count_shape(cfg: SweepConfig) -> float:
    """dp_accounting's shape of the trial-count distribution (∞ = Poisson)."""
    return math.inf if cfg.search.trials_shape is None else float(cfg.search.trials_shape)


def draw_trial_count(mean: float, shape: float, rng: np.random.Generator) -> int:
    """One draw of the random number of trials K (Papernot & Steinke 2022, as dp_accounting parameterises it).

    shape = ∞: Poisson(mean), K may be 0. Otherwise truncated negative binomial on K ≥ 1 with
    P(K=k) ∝ C(k+η−1, k)(1−γ)^k, γ solved from the mean (η = 0: logarithmic, η = 1: geometric).
    """
    if math.isinf(shape):
        return int(rng.poisson(mean))
    gamma = _gamma_truncated_negative_binomial(shape, mean)
    if gamma >= 1.0:
        return 1
    if shape == 0:
        return int(rng.logseries(1.0 - gamma))
    while True:
        k = int(rng.negative_binomial(shape, gamma))
        if k >= 1:
            return k


def trial_counts(cfg: SweepConfig, groups: list[Group], rng: np.random.Generator) -> dict[str, int]:
    """Search trials per group. A group with nothing to search runs its base config once (no tuning, no tuning cost)."""
    counts: dict[str, int] = {}
    for g in groups:
        if not g.space:
            counts[g.key] = 1
        elif cfg.tuning_privacy == "repeat_and_select" and methods.get(g.method).private:
            counts[g.key] = draw_trial_count(cfg.search.trials_per_epsilon, count_shape(cfg), rng)
        else:
            counts[g.key] = cfg.search.trials_per_epsilon
    return counts


def secret_seeds(cfg: SweepConfig) -> bool:
    """Under repeat_and_select a public seed per slot (base.seed + index) would make the released winner's index J,
    hence K > J, recomputable from its outputs: seeds and the sampler's seed come from the OS instead."""
    return cfg.tuning_privacy == "repeat_and_select"


def trial_seed(cfg: SweepConfig, phase: str, index: int) -> int:
    """Distinct seeds per trial (initialisation, augmentation; the mechanism's draws are secret): finals get fresh ones.

    Public (base.seed + index) under per_trial; secret under repeat_and_select (:func:`secret_seeds`). Either way the
    seed is stored in the trial's Tune config, so a resumed trial keeps it."""
    if secret_seeds(cfg):
        return secrets.randbits(31)
    return cfg.base.seed + index + (FINAL_SEED_OFFSET if phase == "final" else 0)


def trial_config(cfg: SweepConfig, group: Group, params: dict[str, Any], seed: int) -> TrainConfig:
    """The validated TrainConfig of one trial. Raises ConfigError for an impossible combination."""
    updates: dict[str, Any] = {**group.fixed, "method": group.method, "seed": seed, **params}
    if group.epsilon is not None:
        updates |= {"privacy.epsilon": group.epsilon, "privacy.delta": cfg.delta}
    return with_updates(cfg.base, updates)


def uses_tuning_calibration(cfg: SweepConfig, group: Group) -> bool:
    """Whether ε covers this group's whole random search: its trials' σ is calibrated for repeat-and-select."""
    return cfg.tuning_privacy == "repeat_and_select" and group.epsilon is not None and bool(group.space)
