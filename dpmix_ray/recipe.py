"""Recipe ingredients and rules, as small pure functions: the lr schedule, the EMA of the parameters,
the defaults derived from the data size N and ε, and the transfer of a recipe across ε.

None of this touches the privacy mechanism. The lr schedule only scales the noisy update, and the EMA
averages the noisy iterates: both are post-processing of what the mechanism released. The derived
defaults choose (B, epochs, lr) before the planner calibrates σ, exactly as if the user had typed them.

The lr rule. With every gradient clipped, an SGD step moves each coordinate by lr·(clipped mean +
N(0, (σC/B)²)); over T steps the noise alone random-walks each coordinate by τ = lr·σC/B·√T. On
MNIST-5k (experiments/recipe_summary.md) the best lr sat at τ ≈ 0.1 for every batch size (256–2,048),
epoch count (6–48) and ε (1 and 4) tried, while the best lr itself ranged over 0.13–3.4; De et al.
2022's CIFAR-10 recipes (σ = 3, B = 4,096, lr = 4, C = 1, 875–2,468 steps) sit at τ = 0.09–0.15. So lr
is derived from τ, capped at an lr·C of 4 (larger single steps diverged on short runs).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from dpmix_ray.config import TrainConfig, with_updates
from dpmix_ray.privacy import calibrate_noise, max_steps, steps_for_epochs

TAU = 0.1  # the noise's random walk per coordinate over a run, τ = lr·σC/B·√T
MAX_STEP = 4.0  # the largest lr·C
REF_N = 3_500  # MNIST-5k's training split, where the constants were measured
REF_BATCH = 256  # B at REF_N; B ∝ √N gives 1,024 at 50,000–60,000 images (Tramèr & Boneh: 512–2,048)
REF_EPOCHS = 12.0  # epochs at REF_N; epochs ∝ √N gives ~45 at 50,000 (Tramèr & Boneh: ~40 at 60,000)
NONPRIVATE_LR = 1.0  # plain SGD, no momentum, unclipped: best of 0.1 / 0.3 / 1 on MNIST-5k (97.4 % val at 12 epochs)


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


# --------------------------------------------------------------------------- derived defaults


def batch_size(n_train: int) -> int:
    """B ∝ √N, rounded to a power of two, in [16, 4,096] and at most N/4: 256 at 3,500, 1,024 at 50,000.

    Larger N affords larger batches at the same sampling rate's privacy cost, and σ/B (the noise per
    step) falls with B (TAN, Sander et al. 2023); √N keeps the step count T = epochs·N/B growing with N."""
    b = 2 ** round(math.log2(REF_BATCH * math.sqrt(n_train / REF_N)))
    return int(max(1, min(4096, max(16, b), n_train // 4)))


def epochs(n_train: int) -> float:
    """Epochs ∝ √N: 12 at 3,500, ~45 at 50,000 (the literature's ~40 on 60,000 at ε ≈ 3).

    With B ∝ √N this makes T ∝ N steps (~165 at 3,500, ~2,000 at 50,000; De et al. 875–2,468 on 50,000).
    At τ fixed, accuracy on MNIST-5k was flat in epochs from 12 to 48 at ε = 1 and 4."""
    return round(REF_EPOCHS * math.sqrt(n_train / REF_N), 1)


def lr_for(tau: float, *, noise_multiplier: float, batch_size: int, steps: int, clip_norm: float) -> float:
    """The lr whose noise random walk over ``steps`` is ``tau`` per coordinate: τ·B/(σC√T), with lr·C ≤ 4."""
    return min(tau * batch_size / (noise_multiplier * clip_norm * math.sqrt(steps)), MAX_STEP / clip_norm)


def resolve(cfg: TrainConfig, n_train: int, *, lr: bool = True) -> TrainConfig:
    """``cfg`` with its null ``optim.batch_size``, ``optim.epochs`` and ``optim.lr`` derived for N = ``n_train``.

    ``optim.epochs`` stays null when ``privacy.noise_multiplier`` is given: then the planner derives
    the step count from σ, as before. A private lr comes from the run's own (σ, B, T) at τ = 0.1; a
    non-private one is a constant. ``lr=False`` leaves a null lr alone, for a caller that sets it
    from a plan it already has (a sweep's trial). A config with all three given is returned unchanged."""
    o, p = cfg.optim, cfg.privacy
    updates: dict[str, Any] = {}
    b = o.batch_size if o.batch_size is not None else batch_size(n_train)
    if o.batch_size is None:
        updates["optim.batch_size"] = b
    sigma_given = cfg.is_private and p.noise_multiplier is not None
    if o.epochs is None and not sigma_given:
        updates["optim.epochs"] = epochs(n_train)
    if o.lr is None and lr:
        if not cfg.is_private:
            updates["optim.lr"] = NONPRIVATE_LR
        else:
            q = min(1.0, b / n_train)
            if sigma_given:
                sigma = p.noise_multiplier
                steps = max_steps(epsilon=p.epsilon, delta=p.delta, sample_rate=q, noise_multiplier=sigma, accountant=p.accountant,
                                  neighbouring=p.neighbouring)
            else:
                steps = steps_for_epochs(updates.get("optim.epochs", o.epochs), q)
                sigma = calibrate_noise(epsilon=p.epsilon, delta=p.delta, sample_rate=q, steps=steps, accountant=p.accountant,
                                        neighbouring=p.neighbouring)
            updates["optim.lr"] = round(lr_for(TAU, noise_multiplier=sigma, batch_size=b, steps=steps, clip_norm=p.clip_norm), 4)
    return with_updates(cfg, updates) if updates else cfg


# --------------------------------------------------------------------------- transfer across ε


def transfer(
    params: Mapping[str, Any], from_eps: float, to_eps: float, n_train: int, *, delta: float, accountant: str, neighbouring: str
) -> dict[str, Any]:
    """Move a recipe (dotted config keys → values) found at ``from_eps`` to ``to_eps``.

    What carries over is τ, not lr: B, epochs (so the step count), K, m and C stay; the planner
    will calibrate σ for the new ε, and lr is rescaled by σ_from/σ_to so that τ = lr·σC/B·√T is
    unchanged (capped at lr·C = 4). On MNIST-5k the best τ was 0.1 at ε = 1 and at ε = 4 for every
    (B, epochs). Where σ is large, σ ∝ 1/ε and this is Panda et al. 2022's linear scaling of
    r = lr·T in ε at fixed T; at large ε σ falls more slowly and so does lr's growth. Keys that are
    absent stay absent (derived at the new ε). A recipe that fixes σ has no step count to keep.
    """
    if "privacy.noise_multiplier" in params:
        raise ValueError("transfer keeps the step count and recalibrates σ: give optim.epochs, not privacy.noise_multiplier")
    out = dict(params)
    if "optim.lr" not in params:
        return out
    b = int(params.get("optim.batch_size") or batch_size(n_train))
    q = min(1.0, b / n_train)
    steps = steps_for_epochs(float(params.get("optim.epochs") or epochs(n_train)), q)
    clip = float(params.get("privacy.clip_norm", 1.0))

    def sigma(eps: float) -> float:
        return calibrate_noise(epsilon=eps, delta=delta, sample_rate=q, steps=steps, accountant=accountant, neighbouring=neighbouring)

    out["optim.lr"] = min(float(params["optim.lr"]) * sigma(from_eps) / sigma(to_eps), MAX_STEP / clip)
    return out
