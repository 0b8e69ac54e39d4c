"""What a sweep runs: groups, search spaces, trial counts, seeds, trial configs (privacy plans: :mod:`.budget`).

Pure functions (no Ray). A *group* is one Optuna study: one method at one ε (or the non-private
reference). Every trial config is the sweep's base config plus the group's fixed updates, the
sampled hyperparameters and a seed, validated by :func:`dpmix_ray.config.with_updates`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import optuna
# The exact mean → γ map dp_accounting's accountant applies to RepeatAndSelectDpEvent: the counts drawn
# here must follow the distribution that is accounted for.
from dp_accounting.rdp.rdp_privacy_accountant import _gamma_truncated_negative_binomial

from dpmix_ray.config import SweepConfig, TrainConfig, with_updates
from dpmix_ray.errors import ConfigError

METRIC = "val_accuracy"
# Final re-runs of the chosen recipe use seeds far from the search trials' seeds.
FINAL_SEED_OFFSET = 100_000

# Counts and mixing knobs a method fixes; searching them for that method is meaningless or invalid.
_METHOD_FIXED: dict[str, dict[str, Any]] = {
    "nonprivate": {},
    "dpsgd": {"mix.aug_multiplicity": 1, "mix.self_mix": 0, "mix.diff_mix": 0},
    "augmult": {"mix.self_mix": 0, "mix.diff_mix": 0},
    "dpmix_self": {"mix.diff_mix": 0},
    "dpmix_diff": {},
}
_METHOD_IGNORES: dict[str, tuple[str, ...]] = {
    "nonprivate": ("privacy.",),
    "dpsgd": ("mix.aug_multiplicity", "mix.self_mix", "mix.diff_mix", "mix.alpha", "mix.synthetic", "mix.diff_pairing"),
    "augmult": ("mix.self_mix", "mix.diff_mix", "mix.alpha", "mix.synthetic", "mix.diff_pairing"),
    "dpmix_self": ("mix.diff_mix", "mix.synthetic", "mix.diff_pairing"),
    "dpmix_diff": (),
}
# Set per experiment by the sweep itself, never searched.
_NOT_SEARCHABLE = ("method", "seed", "privacy.epsilon", "privacy.delta", "privacy.accountant", "privacy.reproducible")
# Under repeat_and_select every trial must run the same privacy mechanism (same q, T, σ): the
# repeat-and-select bound composes one RDP curve, not the worst of many.
_MECHANISM_KEYS = ("optim.batch_size", "optim.epochs", "privacy.noise_multiplier", "data.", "synth.")


@dataclass(frozen=True)
class Group:
    """One study: ``method`` at ``epsilon`` (None for the non-private reference)."""

    key: str
    method: str
    epsilon: float | None
    space: dict[str, dict[str, list[Any]]] = field(default_factory=dict)

    @property
    def fixed(self) -> dict[str, Any]:
        return _METHOD_FIXED[self.method]


def group_key(method: str, epsilon: float | None) -> str:
    return method if epsilon is None else f"{method}@eps={epsilon:g}"


def _space_for(cfg: SweepConfig, method: str) -> dict[str, dict[str, list[Any]]]:
    return {k: v for k, v in cfg.space.items() if not any(k.startswith(p) for p in _METHOD_IGNORES[method])}


def build_groups(cfg: SweepConfig) -> list[Group]:
    """The main method then each baseline, one group per ε (one group for ``nonprivate``)."""
    methods = [cfg.base.method] + [m for m in cfg.baselines if m != cfg.base.method]
    groups: list[Group] = []
    for method in dict.fromkeys(methods):
        eps_list: list[float | None] = [None] if method == "nonprivate" else list(cfg.epsilons)
        groups += [Group(group_key(method, e), method, e, _space_for(cfg, method)) for e in eps_list]
    return groups


def check_sweep(cfg: SweepConfig) -> None:
    """Refusals that need the whole sweep (the schema checks each field alone). Raises ConfigError."""
    if cfg.base.method == "nonprivate":
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
        if cfg.search.scheduler is not None:
            raise ConfigError("search.scheduler: repeat_and_select needs null (early stopping makes trials depend on each other)")
        if cfg.base.optim.epochs is None:
            raise ConfigError("base.optim.epochs: repeat_and_select fixes the step count and calibrates σ; give epochs, not σ")
        for key in cfg.space:
            if key.startswith(_MECHANISM_KEYS):
                raise ConfigError(
                    f"space.{key}: repeat_and_select needs every trial to run the same privacy mechanism "
                    "(same sampling rate, steps and σ); search it only with tuning_privacy: per_trial"
                )
    elif cfg.search.trials_shape is not None:
        raise ConfigError("search.trials_shape: only used by tuning_privacy: repeat_and_select")


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
        elif cfg.tuning_privacy == "repeat_and_select" and g.method != "nonprivate":
            counts[g.key] = draw_trial_count(cfg.search.trials_per_epsilon, count_shape(cfg), rng)
        else:
            counts[g.key] = cfg.search.trials_per_epsilon
    return counts


def trial_seed(cfg: SweepConfig, phase: str, index: int) -> int:
    """Distinct public seeds per trial (initialisation, augmentation; the mechanism's draws are secret): finals get fresh ones."""
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
