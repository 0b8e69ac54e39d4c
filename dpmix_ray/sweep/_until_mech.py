"""TEMPORARY stand-in for the trainer's contracted ``fit(cfg, plan, ...)`` (CONTRACT.md) until mech merges.

Delete this file when ``dpmix_ray.trainer.fit`` exists on main. It runs today's ``train(cfg)`` with
the config pinned so that the trainer's own planner reproduces ``plan`` exactly (refusing otherwise),
and returns the final weights from the last epoch report.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch

from dpmix_ray.config import TrainConfig, with_updates
from dpmix_ray.errors import BudgetError
from dpmix_ray.privacy import Plan, plan_run
from dpmix_ray.trainer import EpochReport, train


@dataclass
class _Weights:
    weights: dict[str, torch.Tensor]

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.weights


@dataclass
class Fitted:
    result: dict[str, Any]
    model: _Weights


def fit(cfg: TrainConfig, plan: Plan, *, on_epoch: Callable[[EpochReport], None] | None = None, **kwargs: Any) -> Fitted:
    if cfg.is_private:
        cfg = with_updates(cfg, {
            "privacy.noise_multiplier": plan.noise_multiplier, "optim.epochs": None, "privacy.epsilon": plan.epsilon_spent * (1 + 1e-9),
        })
    n = len(kwargs["splits"].train)
    if plan_run(cfg, n) != plan:
        raise BudgetError(f"plan {plan} does not fit this config on N={n}")
    last: list[EpochReport] = []

    def hook(rep: EpochReport) -> None:
        last[:] = [rep]
        if on_epoch is not None:
            on_epoch(rep)

    result = train(cfg, on_epoch=hook, **kwargs)
    return Fitted(result, _Weights(last[0].state()["model"]))
