"""The accounting side of the mechanism: calibration never overshoots, and is tight."""

import math

import numpy as np
import pytest
import torch
from dp_accounting import dp_event as E
from dp_accounting import rdp

from dpmix_ray.config import load_train_config
from dpmix_ray.errors import BudgetError
from dpmix_ray.privacy import (
    calibrate_noise,
    calibrate_noise_for_tuning,
    epsilon_spent,
    max_steps,
    plan_run,
    repeat_and_select_epsilon,
)
from dpmix_ray.mechanism import poisson_sample


def independent_epsilon(sigma: float, q: float, steps: int, delta: float) -> float:
    """ε from Google's dp_accounting RDP accountant: a second implementation, not Opacus."""
    acc = rdp.RdpAccountant()
    acc.compose(E.SelfComposedDpEvent(E.PoissonSampledDpEvent(q, E.GaussianDpEvent(sigma)), steps))
    return acc.get_epsilon(delta)


def test_calibration_never_overshoots_and_is_tight_against_dp_accounting():
    rng = np.random.default_rng(0)
    for _ in range(25):
        q = float(10 ** rng.uniform(-3, -0.5))
        steps = int(10 ** rng.uniform(1, 3.5))
        eps = float(10 ** rng.uniform(-0.5, 1.0))
        delta = float(10 ** rng.uniform(-7, -4))
        try:
            sigma = calibrate_noise(epsilon=eps, delta=delta, sample_rate=q, steps=steps)
        except BudgetError:
            continue
        ours = epsilon_spent(noise_multiplier=sigma, sample_rate=q, steps=steps, delta=delta)
        theirs = independent_epsilon(sigma, q, steps, delta)
        assert ours <= eps, (q, steps, eps, ours)
        assert theirs <= eps * (1 + 1e-6), (q, steps, eps, theirs)
        assert ours >= 0.98 * eps, (q, steps, eps, ours)


@pytest.mark.parametrize("accountant", ["rdp", "prv"])
def test_calibration_per_accountant(accountant):
    sigma = calibrate_noise(epsilon=2.0, delta=1e-5, sample_rate=0.05, steps=400, accountant=accountant)
    spent = epsilon_spent(noise_multiplier=sigma, sample_rate=0.05, steps=400, delta=1e-5, accountant=accountant)
    assert 0.98 * 2.0 <= spent <= 2.0


def test_max_steps_is_the_largest_within_budget():
    for sigma, q, eps in [(1.5, 0.06, 2.0), (0.9, 0.01, 4.0), (3.0, 0.2, 1.0)]:
        t = max_steps(epsilon=eps, delta=1e-5, sample_rate=q, noise_multiplier=sigma)
        assert epsilon_spent(noise_multiplier=sigma, sample_rate=q, steps=t, delta=1e-5) <= eps
        assert epsilon_spent(noise_multiplier=sigma, sample_rate=q, steps=t + 1, delta=1e-5) > eps


def test_impossible_budgets_are_refused():
    with pytest.raises(BudgetError):
        calibrate_noise(epsilon=1e-4, delta=1e-9, sample_rate=0.5, steps=100_000)
    with pytest.raises(BudgetError, match="single step"):
        max_steps(epsilon=0.1, delta=1e-5, sample_rate=0.5, noise_multiplier=0.5)


def test_plan_derives_sigma_or_steps_and_never_exceeds():
    cfg = load_train_config(None, ["privacy.epsilon=1.5", "optim.epochs=3", "optim.batch_size=64"])
    plan = plan_run(cfg, 1000)
    assert plan.sample_rate == pytest.approx(0.064)
    assert plan.steps == math.ceil(3 / 0.064)
    assert 0.98 * 1.5 <= plan.epsilon_spent <= 1.5
    cfg2 = load_train_config(None, ["privacy.noise_multiplier=2.0", "optim.epochs=null", "optim.batch_size=64"])
    plan2 = plan_run(cfg2, 1000)
    assert plan2.noise_multiplier == 2.0 and plan2.epsilon_spent <= 2.0
    assert epsilon_spent(noise_multiplier=2.0, sample_rate=0.064, steps=plan2.steps + 1, delta=1e-5) > 2.0


def test_poisson_sampling_rate_and_independence():
    n, q, draws = 2000, 0.03, 400
    gen = torch.Generator().manual_seed(0)
    sizes, counts = [], torch.zeros(n)
    for _ in range(draws):
        idx = poisson_sample(n, q, gen)
        assert idx.unique().numel() == idx.numel()
        sizes.append(len(idx))
        counts[idx] += 1
    sizes = np.array(sizes)
    # Batch size ~ Binomial(n, q): mean within 4 standard errors, variance near n q (1 - q).
    se = math.sqrt(n * q * (1 - q) / draws)
    assert abs(sizes.mean() - n * q) < 4 * se
    assert 0.7 < sizes.var() / (n * q * (1 - q)) < 1.3
    # Per-example inclusion frequency ~ q for every example (no example favoured).
    assert abs(counts.mean().item() / draws - q) < 0.002
    assert counts.max().item() / draws < q + 6 * math.sqrt(q * (1 - q) / draws)
    assert len(poisson_sample(10, 1e-6, gen)) == 0  # empty batches happen and are fine


def test_repeat_and_select_costs_more_than_one_trial_and_calibrates():
    single = epsilon_spent(noise_multiplier=2.0, sample_rate=0.05, steps=200, delta=1e-5)
    tuned = repeat_and_select_epsilon(noise_multiplier=2.0, sample_rate=0.05, steps=200, delta=1e-5, mean_trials=8, shape=1)
    assert tuned > single
    sigma = calibrate_noise_for_tuning(epsilon=2.0, delta=1e-5, sample_rate=0.05, steps=200, mean_trials=8, shape=1)
    spent = repeat_and_select_epsilon(noise_multiplier=sigma, sample_rate=0.05, steps=200, delta=1e-5, mean_trials=8, shape=1)
    assert 0.98 * 2.0 <= spent <= 2.0
