"""Recipe ingredients and rules, as small pure functions: the lr schedule, the EMA of the parameters.

None of this touches the privacy mechanism. The lr schedule only scales the noisy update, and the EMA
averages the noisy iterates: both are post-processing of what the mechanism released.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch


def lr_factor(step: int, *, total: int, warmup: float, schedule: str) -> float:
    """The lr multiplier at ``step`` (0-based) of ``total``: a linear warm-up over the first
    ``warmup``·total steps (from 1/W up to 1), then constant or a cosine down to 0 over the rest.

    Warm-up keeps the first, largest steps from the random init from throwing the model far off
    while the clipped direction is still poor (De et al. 2022 warm up their DP-SGD runs)."""
    w = math.ceil(warmup * total)
    if step < w:
        return (step + 1) / w
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * (step - w) / max(1, total - w)))
    return 1.0


def ema_weight(decay: float, averaged: int) -> float:
    """The weight of the new iterate when ``averaged`` iterates are already in the average.

    A debiased EMA (Adam's bias correction): the average of θ_1..θ_t with weights ∝ decay^(t−i),
    normalised by 1 − decay^t, so the first iterate is not overweighted and the decay means the same
    horizon (half-life ln 2/(1 − decay) steps) from the first step of a short DP run on. The plain
    recursion from θ_1 would keep decay^T of it: 0.99¹⁰⁰ = 37 % of the average after 100 steps;
    TensorFlow's warm-up min(decay, (1+t)/(10+t)) instead overrides any decay ≥ 0.9 for the first
    80 steps, so the decay would not matter in a 100-step run."""
    return (1.0 - decay) / (1.0 - decay ** (averaged + 1))


def ema_multi_avg_fn(decay: float) -> Callable[[Sequence[torch.Tensor], Sequence[torch.Tensor], torch.Tensor], None]:
    """``torch.optim.swa_utils.AveragedModel``'s ``multi_avg_fn`` for the debiased EMA of :func:`ema_weight`
    (torch's own ``get_ema_multi_avg_fn`` is the plain recursion)."""

    @torch.no_grad()
    def update(averaged: Sequence[torch.Tensor], current: Sequence[torch.Tensor], num_averaged: torch.Tensor) -> None:
        torch._foreach_lerp_(list(averaged), list(current), ema_weight(decay, int(num_averaged)))

    return update
