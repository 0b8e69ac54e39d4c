"""Cheap proxy trials (TAN, Sander et al. ICML 2023), as one pure rule.

With the step count T fixed, DP-SGD's training behaviour depends on the noise per step σ/B, not on σ
and B apart. So a search trial may run at a small batch B' with σ' = σ·B'/B, the same T, the same
lr, K and m: B/B' times cheaper, ranking recipes as the full-size run would. Such a run is NOT the
sweep's private run: σ' is small and its own ε (computed here, and reported) is far above the sweep's.
A proxy trial is therefore never released and never selected into ``release/`` itself: the chosen
recipe is re-run at full size (the final runs), and only those carry the sweep's (ε, δ).
"""

from __future__ import annotations

import math
from dataclasses import replace

from dpmix_ray.config import TrainConfig, with_updates
from dpmix_ray.errors import BudgetError
from dpmix_ray.privacy import Plan, epsilon_spent
from dpmix_ray.sweep.space import epochs_for_steps


def applies(batch_size: int, proxy_batch: int) -> bool:
    """A proxy only where it is smaller than the trial's batch (else the trial runs at full size, covered)."""
    return proxy_batch < batch_size


def scale(plan: Plan, *, batch_size: int, proxy_batch: int, n_train: int, delta: float) -> Plan:
    """The proxy of a full-size plan: q' = B'/N, σ' = σ·B'/B (σ/B kept), the same T; ε' = what that run spends.

    Raises BudgetError when ε' is not finite (σ' too small for the accountant): the proxy cannot be labelled.
    """
    q = min(1.0, proxy_batch / n_train)
    sigma = plan.noise_multiplier * proxy_batch / batch_size
    spent = epsilon_spent(noise_multiplier=sigma, sample_rate=q, steps=plan.steps, delta=delta, accountant=plan.accountant,
                          neighbouring=plan.neighbouring)
    if not math.isfinite(spent):
        raise BudgetError(f"proxy batch {proxy_batch}: σ'={sigma:.3g} has no finite ε; use a larger search.proxy.batch_size")
    return replace(plan, noise_multiplier=sigma, sample_rate=q, epochs=plan.steps * q, epsilon_spent=spent)


def config(cfg: TrainConfig, proxy_plan: Plan, proxy_batch: int) -> TrainConfig:
    """The proxy's own config: batch B', the epochs that make the same T steps at B', and ε set to what the
    proxy spends (so the trainer's plan check holds and every output of the run states its real ε)."""
    return with_updates(cfg, {
        "optim.batch_size": proxy_batch,
        "optim.epochs": epochs_for_steps(proxy_plan.steps, proxy_plan.sample_rate),
        "privacy.epsilon": proxy_plan.epsilon_spent,
    })
