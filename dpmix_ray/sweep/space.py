"""The search space in the coordinates that matter under DP, the known-good points a study starts from,
and the transfer of a recipe across ε (pure: no Ray, no training).

Two search coordinates are not config keys (:data:`dpmix_ray.config.DP_SPACE_KEYS`):

* ``dp.tau``: the noise's random walk per coordinate over a run, τ = lr·σC/B·√T. With every
  gradient clipped the step is lr·C (Mohapatra et al. 2022; Ponomareva et al. 2023), and the noise
  of a step is lr·σC/B; the recipe study found the best lr at τ ≈ 0.1 for every batch size, step
  count and ε tried while lr itself ranged 25× (:mod:`dpmix_ray.recipe`). So τ is searched and lr
  follows once the planner has σ for the trial's (ε, B, T): a good τ stays good across B, T and ε.
* ``dp.steps``: the number of logical steps T. With T fixed, ε depends on σ/q and training on σ/B
  (TAN, Sander et al. 2023), so (B, T) are the natural pair; epochs = T·B/N.

* ``dp.compute``: what a run costs per training example, epochs × G (G = K + m + n images through the
  per-example gradient): epochs follow from the point's G. Searched beside K and m, it makes them
  compete with the step count for the same compute, so where augmentation does not pay the search can
  spend it on steps instead (dpsgd, G = 1, gets G× the epochs of a K = G recipe at the same cost).

The transfer rule (:func:`transfer`): a recipe moves from ε to ε' keeping τ, B, T, K, m and C; the
planner recalibrates σ for ε', and lr (when searched as such) scales by σ(ε)/σ(ε') so that τ is
unchanged (:func:`dpmix_ray.recipe.transfer`; at large σ, σ ∝ 1/ε and this is Panda et al.'s linear
scaling of lr·T in ε). In τ coordinates the point itself does not move.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from dpmix_ray import recipe
from dpmix_ray.config import SweepConfig, TrainConfig
from dpmix_ray.privacy import Plan, steps_for_epochs

TAU, STEPS, COMPUTE = "dp.tau", "dp.steps", "dp.compute"
Space = Mapping[str, Mapping[str, list[Any]]]


def epochs_for_steps(steps: int, sample_rate: float) -> float:
    """The largest epoch count (≈ T·q) that the planner turns into exactly ``steps`` steps at rate q."""
    epochs = steps * sample_rate
    while steps_for_epochs(epochs, sample_rate) > steps:  # T·q/q may round up past T
        epochs = math.nextafter(epochs, 0.0)
    return epochs


def config_updates(params: Mapping[str, Any], base: TrainConfig, n_train: int) -> dict[str, Any]:
    """A point of the space as config updates, before planning: ``dp.steps`` becomes ``optim.epochs`` at the
    point's (or the base's) batch size, ``dp.compute`` epochs at the point's (or the base's) group size; ``dp.tau``
    needs σ, so :func:`lr_from_tau` sets lr after planning."""
    updates = {k: v for k, v in params.items() if k not in (TAU, STEPS, COMPUTE)}
    if COMPUTE in params:
        updates["optim.epochs"] = float(params[COMPUTE]) / group_size(updates, base)
    if STEPS in params:
        b = updates.get("optim.batch_size", base.optim.batch_size) or recipe.batch_size(n_train)
        updates["optim.epochs"] = epochs_for_steps(int(params[STEPS]), min(1.0, b / n_train))
    return updates


def group_size(updates: Mapping[str, Any], base: TrainConfig) -> int:
    """G = K + m + n of a point: its own mixing counts where it sets them, else the base config's."""
    return sum(int(updates.get(f"mix.{k}", getattr(base.mix, k))) for k in ("aug_multiplicity", "self_mix", "diff_mix"))


def lr_from_tau(tau: float, cfg: TrainConfig, plan: Plan) -> float:
    """The lr whose noise random walk over the planned run is τ (lr·C capped as the recipe caps it)."""
    return recipe.lr_for(tau, noise_multiplier=plan.noise_multiplier, batch_size=cfg.optim.batch_size, steps=plan.steps,
                         clip_norm=cfg.privacy.clip_norm)


def clip(point: Mapping[str, Any], space: Space) -> dict[str, Any]:
    """``point`` restricted to the space's keys and moved inside each distribution (nearest allowed value)."""
    out: dict[str, Any] = {}
    for key, value in point.items():
        if key not in space or value is None:
            continue
        kind, args = next(iter(space[key].items()))
        if kind == "choice":
            if value in args:
                out[key] = value
            elif isinstance(value, (int, float)) and (numbers := [a for a in args if isinstance(a, (int, float)) and not isinstance(a, bool)]):
                out[key] = min(numbers, key=lambda a: abs(math.log(a / value)) if a > 0 and value > 0 else abs(a - value))
            continue
        lo, hi = args
        v = min(max(float(value), float(lo)), float(hi))
        out[key] = int(round(v)) if kind == "int" else v
    return out


def _steps(params: Mapping[str, Any], n_train: int) -> int:
    b = int(params.get("optim.batch_size") or recipe.batch_size(n_train))
    return steps_for_epochs(float(params.get("optim.epochs") or recipe.epochs(n_train)), min(1.0, b / n_train))


def default_point(cfg: SweepConfig, base: TrainConfig, n_train: int) -> dict[str, Any]:
    """The embedded/derived default recipe in the space's coordinates (clipped into it): the base config with
    its null B, epochs (and lr, where lr is a coordinate) derived by :func:`dpmix_ray.recipe.resolve`, T, and
    τ = the recipe's 0.1."""
    flat = _flatten(recipe.resolve(base, n_train, lr="optim.lr" in cfg.space).model_dump(mode="json"))
    point = {k: v for k, v in flat.items() if v is not None} | {TAU: recipe.TAU}
    point[STEPS] = _steps(point, n_train)
    point[COMPUTE] = float(point.get("optim.epochs") or recipe.epochs(n_train)) * group_size(point, base)
    return clip(point, cfg.space)


def transfer(params: Mapping[str, Any], from_eps: float, to_eps: float, base: TrainConfig, n_train: int, space: Space, *,
             delta: float, accountant: str, neighbouring: str) -> dict[str, Any]:
    """A recipe found at ``from_eps`` moved to ``to_eps`` by the transfer rule (module docstring), clipped into ``space``.

    τ, B, T (or epochs), K, m, C are kept; lr, when it is a coordinate, is rescaled by σ(from)/σ(to) at the
    recipe's (B, T, C): the point's own values, else the ``base`` config's (:func:`dpmix_ray.recipe.transfer`).
    """
    if "optim.lr" not in params:
        return clip(params, space)
    given = {"optim.batch_size": base.optim.batch_size, "optim.epochs": base.optim.epochs, "privacy.clip_norm": base.privacy.clip_norm}
    recipe_at = {k: v for k, v in given.items() if v is not None} | config_updates(params, base, n_train)
    moved = recipe.transfer(recipe_at, from_eps, to_eps, n_train, delta=delta, accountant=accountant, neighbouring=neighbouring)
    return clip({**params, "optim.lr": moved["optim.lr"]}, space)


def _flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in tree.items():
        if isinstance(v, Mapping):
            out |= _flatten(v, f"{prefix}{k}.")
        else:
            out[f"{prefix}{k}"] = v
    return out
