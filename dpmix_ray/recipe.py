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


def ema_decay(decay: float, updates: int) -> float:
    """The decay used at the ``updates``-th averaging step: min(decay, (1 + t)/(10 + t)).

    The warm-up (as in TensorFlow's ``ExponentialMovingAverage(num_updates=…)``) keeps a short DP run
    from averaging in its random init: with a constant 0.99, 0.99¹⁰⁰ = 37 % of the average after 100
    steps would still be the first iterate."""
    return min(decay, (1.0 + updates) / (10.0 + updates))


def ema_multi_avg_fn(decay: float) -> Callable[[Sequence[torch.Tensor], Sequence[torch.Tensor], torch.Tensor], None]:
    """``torch.optim.swa_utils.AveragedModel``'s ``multi_avg_fn`` for an EMA with :func:`ema_decay`'s warm-up
    (torch's own ``get_ema_multi_avg_fn`` has a constant decay)."""

    @torch.no_grad()
    def update(averaged: Sequence[torch.Tensor], current: Sequence[torch.Tensor], num_averaged: torch.Tensor) -> None:
        torch._foreach_lerp_(list(averaged), list(current), 1.0 - ema_decay(decay, int(num_averaged)))

    return update
