"""Privacy guards outside the mechanism, each checked through public results (the bugs a reviewer would
plant, bench/mutants.py): the search's ε against dp_accounting, the trial-count law against the one that is
accounted, no adaptivity under repeat_and_select, the step count of a secret-randomness resume, an audit's
guesses made from the model alone, and each example's group built from that example alone. No Ray."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from dp_accounting import dp_event as E
from dp_accounting import rdp
from dp_accounting.rdp.rdp_privacy_accountant import _gamma_truncated_negative_binomial

from dpmix_ray import audit as A
from dpmix_ray import trainer as T
from dpmix_ray.config import SweepConfig, load_train_config
from dpmix_ray.data import load_splits
from dpmix_ray.mix import SyntheticPool, assemble, draw
from dpmix_ray.privacy import calibrate_noise_for_tuning, repeat_and_select_epsilon
from dpmix_ray.sweep import budget as B
from dpmix_ray.sweep import plan as P
from dpmix_ray.sweep.outcome import Outcome

# --------------------------------------------------------------------------- accounting of the search


def reference_search_epsilon(sigma: float, q: float, steps: int, delta: float, mean: float, shape: float) -> float:
    """dp_accounting's RDP repeat-and-select of ``steps`` Poisson-subsampled Gaussian steps, written out here."""
    acc = rdp.RdpAccountant()
    trial = E.SelfComposedDpEvent(E.PoissonSampledDpEvent(q, E.GaussianDpEvent(sigma)), steps)
    acc.compose(E.RepeatAndSelectDpEvent(trial, mean, shape))
    return acc.get_epsilon(delta)


@pytest.mark.parametrize("shape", [math.inf, 1.0, 0.0])
@pytest.mark.parametrize(("sigma", "q", "steps", "delta", "mean"), [(1.5, 0.05, 300, 1e-5, 8.0), (3.0, 0.01, 2000, 1e-6, 4.0)])
def test_search_epsilon_is_the_repeat_and_select_of_every_step_at_the_sweeps_delta(sigma, q, steps, delta, mean, shape):
    ours = repeat_and_select_epsilon(noise_multiplier=sigma, sample_rate=q, steps=steps, delta=delta, mean_trials=mean, shape=shape)
    assert ours == pytest.approx(reference_search_epsilon(sigma, q, steps, delta, mean, shape), rel=1e-3)


def test_the_tuning_sigma_meets_epsilon_by_the_reference_accountant():
    sigma = calibrate_noise_for_tuning(epsilon=3.0, delta=1e-5, sample_rate=0.02, steps=500, mean_trials=6, shape=1.0)
    assert reference_search_epsilon(sigma, 0.02, 500, 1e-5, 6, 1.0) <= 3.0 * (1 + 1e-6)


def accounted_pmf(mean: float, shape: float, kmax: int) -> np.ndarray:
    """P(K = k), k = 0..kmax, of the trial count dp_accounting's RepeatAndSelectDpEvent(mean, shape) accounts for:
    Poisson(mean) for shape = ∞, else the negative binomial truncated to K ≥ 1 (Papernot & Steinke 2022)."""
    k = np.arange(kmax + 1)
    if math.isinf(shape):
        return np.exp(k * math.log(mean) - mean - np.array([math.lgamma(i + 1) for i in k]))
    gamma = _gamma_truncated_negative_binomial(shape, mean)
    with np.errstate(divide="ignore"):
        if shape == 0:  # logarithmic: ∝ (1−γ)^k / k
            w = np.where(k >= 1, (1 - gamma) ** k / np.maximum(k, 1), 0.0)
        else:  # ∝ C(k+η−1, k) (1−γ)^k
            logc = np.array([math.lgamma(i + shape) - math.lgamma(i + 1) - math.lgamma(shape) for i in k])
            w = np.where(k >= 1, np.exp(logc + k * math.log(1 - gamma)), 0.0)
    return w / w.sum()


@pytest.mark.parametrize("shape", [math.inf, 2.0, 1.0, 0.5, 0.0])
def test_trial_counts_are_drawn_from_the_accounted_distribution(shape):
    """Not only the mean: the whole law (a geometric count of the same mean is not a Poisson one)."""
    rng = np.random.default_rng(1)
    draws = np.array([P.draw_trial_count(6.0, shape, rng) for _ in range(6000)])
    kmax = 400
    assert draws.max() <= kmax
    empirical = np.bincount(draws, minlength=kmax + 1) / len(draws)
    tv = 0.5 * np.abs(empirical - accounted_pmf(6.0, shape, kmax)).sum()
    assert tv < 0.05, tv  # sampling noise alone: about 0.02 at 6000 draws


# --------------------------------------------------------------------------- no adaptivity under repeat_and_select

RS_BASE: dict[str, Any] = {
    "method": "dpmix_self", "data": {"name": "digits", "limit": 300}, "model": {"name": "cnn"},
    "mix": {"aug_multiplicity": 2, "self_mix": 1}, "optim": {"batch_size": 32, "epochs": 1, "lr": 1.0}, "device": "cpu",
}


def _done(spec: dict[str, Any], score: float) -> dict[str, Any]:
    """A trial's last report, as the searcher sees it."""
    return Outcome.of_record(B.identity(spec) | {"status": "completed", "score": score, "val_accuracy": score}).as_result()


def test_repeat_and_select_search_is_random_search_by_default(tmp_path: Path) -> None:
    """Defaults left alone: no study starts from the base recipe, and no study receives another ε's best."""
    from dpmix_ray.sweep.search import GroupedSearcher

    cfg = SweepConfig.model_validate({
        "name": "rs", "base": RS_BASE, "epsilons": [2, 8], "delta": 1e-4, "tuning_privacy": "repeat_and_select",
        "space": {"optim.lr": {"loguniform": [0.5, 4.0]}}, "search": {"sampler": "random", "trials_per_epsilon": 3, "seed": 0},
        "final": {"seeds": 1},
    })
    P.check_sweep(cfg)
    groups = P.build_groups(cfg)
    plans = B.plan_groups(cfg, groups, n_train=240)
    s = GroupedSearcher(cfg, groups, {g.key: 3 for g in groups}, tmp_path / "optuna.db", plans=plans, synthetic=None, n_train=240)
    first = [s.suggest(t) for t in "ab"]
    assert {f["group"] for f in first} == {"dpmix_self@eps=2", "dpmix_self@eps=8"}
    assert all(f["params"] != {"optim.lr": 1.0} for f in first)  # sampled, not the base recipe enqueued first
    s.on_trial_complete("a", _done(first[0], 0.9))
    assert s.handed_over == []
    later = [s.suggest(t) for t in "cd"]
    assert all(x["params"]["optim.lr"] not in (f["params"]["optim.lr"] for f in first) for x in later)


# --------------------------------------------------------------------------- resume with secret randomness

TINY = ["data.name=digits", "optim.batch_size=64", "mix.aug_multiplicity=2", "mix.self_mix=1", "optim.lr=1.0"]


@pytest.fixture(scope="module")
def digits():
    return load_splits(load_train_config(None, TINY).data)


def test_a_secret_randomness_resume_runs_exactly_the_planned_steps(digits):
    """A default (secret) run resumed from its first epoch's checkpoint: the two parts together take the planned T
    steps, no more (ε would exceed its target) and no fewer."""
    cfg = load_train_config(None, TINY + ["optim.epochs=2", "privacy.epsilon=8"])
    first: list[tuple[int, dict[str, Any]]] = []  # (reported step, checkpoint taken in the callback, as a trial does)
    full = T.train(cfg, splits=digits, progress=False, on_epoch=lambda r: first.append((r.step, r.state())))
    steps = full["steps"]
    step, ckpt = first[0]
    assert ckpt["mechanism"] is None and ckpt["step"] == step < steps  # secret: no generator state; the step it stopped at
    later: list[tuple[int, dict[str, Any]]] = []
    resumed = T.train(cfg, splits=digits, progress=False, resume_state=ckpt, on_epoch=lambda r: later.append((r.step, r.state())))
    assert resumed["steps"] == steps
    assert [s for s, _ in later] == [s for s, _ in first[1:]]  # the remaining epochs, each once
    end = later[-1][1]
    assert end["step"] == steps
    assert end["scheduler"]["last_epoch"] == steps  # one scheduler step per logical step, across both parts


# --------------------------------------------------------------------------- the audit guesses from the model alone


def test_an_audit_of_a_private_run_cannot_guess_every_canary(digits):
    """At ε = 0.25 (δ = 1e-5) all of 20 guesses are right with probability ≤ 0.562^20 + 2mδ ≈ 1e-5 + 2e-3·α: a guess
    that reads the canaries' membership instead of the trained model gets them all."""
    cfg = load_train_config(None, TINY + ["method=dpsgd", "mix.aug_multiplicity=1", "mix.self_mix=0", "optim.epochs=1",
                                          "privacy.epsilon=0.25", "privacy.delta=1e-5"])
    res = A.run_audit(cfg, canaries=100, guesses=20, splits=digits, progress=False)
    assert res["guesses"] == 20 and res["correct"] < 20
    assert res["epsilon_lower_bound"] < res["max_provable_epsilon"]


# --------------------------------------------------------------------------- each group from its own example


def test_an_examples_group_does_not_change_when_another_example_does():
    """Replace example 2 of a batch: only group 2 changes (images and targets); the sensitivity of one clipped
    group gradient rests on this."""
    gen = torch.Generator().manual_seed(5)
    x, y = torch.rand(6, 1, 8, 8, generator=gen), torch.tensor([0, 1, 2, 0, 1, 2])
    pool = SyntheticPool.from_tensors(torch.rand(6, 1, 8, 8, generator=gen), torch.tensor([0, 1, 2, 0, 1, 2]), 3)
    key = torch.arange(6, dtype=torch.int64) * 7919 + 1
    d = draw(y, key, seed=0, step=0, image_hw=(8, 8), k=3, m=2, n=2, alpha=0.5, padding=2, flip=True, synthetic=pool)
    imgs, tgts = assemble(x, y, d, num_classes=3, padding=2, synthetic=pool)
    x2, y2 = x.clone(), y.clone()
    x2[2], y2[2] = torch.rand(1, 8, 8, generator=gen), 0
    imgs2, tgts2 = assemble(x2, y2, d, num_classes=3, padding=2, synthetic=pool)
    others = [i for i in range(6) if i != 2]
    assert torch.equal(imgs[others], imgs2[others]) and torch.equal(tgts[others], tgts2[others])
    assert not torch.equal(imgs[2], imgs2[2]) and not torch.equal(tgts[2], tgts2[2])
