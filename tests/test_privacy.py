"""The accounting side of the mechanism: calibration never overshoots, and is tight."""

import math

import dataclasses
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from dp_accounting import NeighboringRelation as NR
from dp_accounting import dp_event as E
from dp_accounting import pld, rdp

from dpmix_ray.config import load_train_config
from dpmix_ray import privacy as P
from dpmix_ray.errors import BudgetError
from dpmix_ray.privacy import (
    calibrate_noise,
    calibrate_noise_for_tuning,
    check_plan,
    epsilon_spent,
    max_steps,
    plan_run,
    private_run,
    relation_phrase,
    repeat_and_select_epsilon,
    run_guarantee,
)


ZERO_OUT = {"accountant": "rdp", "neighbouring": "zero_out"}


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
            sigma = calibrate_noise(epsilon=eps, delta=delta, sample_rate=q, steps=steps, **ZERO_OUT)
        except BudgetError:
            continue
        ours = epsilon_spent(noise_multiplier=sigma, sample_rate=q, steps=steps, delta=delta, **ZERO_OUT)
        theirs = independent_epsilon(sigma, q, steps, delta)
        assert ours <= eps, (q, steps, eps, ours)
        assert theirs <= eps * (1 + 1e-6), (q, steps, eps, theirs)
        assert ours >= 0.98 * eps, (q, steps, eps, ours)


@pytest.mark.parametrize("accountant", ["rdp", "prv"])
def test_calibration_per_accountant(accountant):
    sigma = calibrate_noise(epsilon=2.0, delta=1e-5, sample_rate=0.05, steps=400, accountant=accountant, neighbouring="zero_out")
    spent = epsilon_spent(noise_multiplier=sigma, sample_rate=0.05, steps=400, delta=1e-5, accountant=accountant, neighbouring="zero_out")
    assert 0.98 * 2.0 <= spent <= 2.0


def test_rdp_epsilon_is_opacus_rdp_accountant_exactly():
    """The per-(σ, q) cached one-step curve gives Opacus's RDPAccountant's ε to the bit, for every T."""
    from opacus.accountants import RDPAccountant

    rng = np.random.default_rng(1)
    for _ in range(20):
        sigma, q, delta = float(rng.uniform(0.5, 4)), float(10 ** rng.uniform(-3, -0.5)), float(10 ** rng.uniform(-7, -4))
        for steps in (1, int(rng.integers(2, 50)), int(rng.integers(50, 5000))):
            acc = RDPAccountant()
            acc.history = [(sigma, q, steps)]
            assert epsilon_spent(noise_multiplier=sigma, sample_rate=q, steps=steps, delta=delta, **ZERO_OUT) == acc.get_epsilon(delta)


def test_max_steps_is_the_largest_within_budget():
    for sigma, q, eps in [(1.5, 0.06, 2.0), (0.9, 0.01, 4.0), (3.0, 0.2, 1.0)]:
        t = max_steps(epsilon=eps, delta=1e-5, sample_rate=q, noise_multiplier=sigma, **ZERO_OUT)
        assert epsilon_spent(noise_multiplier=sigma, sample_rate=q, steps=t, delta=1e-5, **ZERO_OUT) <= eps
        assert epsilon_spent(noise_multiplier=sigma, sample_rate=q, steps=t + 1, delta=1e-5, **ZERO_OUT) > eps


def test_impossible_step_counts_are_refused():
    with pytest.raises(BudgetError, match="single step"):
        max_steps(epsilon=0.1, delta=1e-5, sample_rate=0.5, noise_multiplier=0.5, **ZERO_OUT)


@pytest.mark.slow  # ~50 s: Opacus doubles σ up to its cap, evaluating ε each time
def test_impossible_noise_calibrations_are_refused():
    with pytest.raises(BudgetError, match="cannot fit"):
        calibrate_noise(epsilon=1e-4, delta=1e-9, sample_rate=0.5, steps=1000, **ZERO_OUT)


def test_plan_derives_sigma_or_steps_and_never_exceeds():
    cfg = load_train_config(None, ["privacy.epsilon=1.5", "optim.epochs=3", "optim.batch_size=64"])
    plan = plan_run(cfg, 1000)
    assert plan.sample_rate == pytest.approx(0.064)
    assert plan.steps == math.ceil(3 / 0.064)
    assert 0.98 * 1.5 <= plan.epsilon_spent <= 1.5
    cfg2 = load_train_config(None, ["privacy.noise_multiplier=2.0", "optim.epochs=null", "optim.batch_size=64"])
    plan2 = plan_run(cfg2, 1000)
    assert plan2.noise_multiplier == 2.0 and plan2.epsilon_spent <= 2.0
    assert epsilon_spent(noise_multiplier=2.0, sample_rate=0.064, steps=plan2.steps + 1, delta=1e-5, **ZERO_OUT) > 2.0


def test_repeat_and_select_costs_more_than_one_trial_and_calibrates():
    single = epsilon_spent(noise_multiplier=2.0, sample_rate=0.05, steps=200, delta=1e-5, **ZERO_OUT)
    tuned = repeat_and_select_epsilon(noise_multiplier=2.0, sample_rate=0.05, steps=200, delta=1e-5, mean_trials=8, shape=1)
    assert tuned > single
    sigma = calibrate_noise_for_tuning(epsilon=2.0, delta=1e-5, sample_rate=0.05, steps=200, mean_trials=8, shape=1)
    spent = repeat_and_select_epsilon(noise_multiplier=sigma, sample_rate=0.05, steps=200, delta=1e-5, mean_trials=8, shape=1)
    assert 0.98 * 2.0 <= spent <= 2.0


PLANNED = ["privacy.epsilon=2", "optim.epochs=2", "optim.batch_size=64"]


def test_a_plan_is_checked_against_its_config_and_N():
    cfg = load_train_config(None, PLANNED)
    plan = plan_run(cfg, 1000)
    check_plan(plan, cfg, 1000)
    wrong = {
        "sample rate": plan_run(cfg, 2000),  # planned for another N
        "spends": dataclasses.replace(plan, noise_multiplier=plan.noise_multiplier / 2),
        "claims": dataclasses.replace(plan, epsilon_spent=plan.epsilon_spent / 2),
        "accountant": dataclasses.replace(plan, accountant="prv"),
        "epochs": dataclasses.replace(plan, steps=plan.steps + 1),
    }
    for what, bad in wrong.items():
        with pytest.raises(BudgetError, match=what):
            check_plan(bad, cfg, 1000)
    fixed_sigma = load_train_config(None, ["privacy.noise_multiplier=2.0", "optim.epochs=null", "optim.batch_size=64"])
    sigma_plan = plan_run(fixed_sigma, 1000)
    check_plan(sigma_plan, fixed_sigma, 1000)
    with pytest.raises(BudgetError, match="is not the config's 2"):
        check_plan(dataclasses.replace(sigma_plan, noise_multiplier=2.5, steps=sigma_plan.steps // 2), fixed_sigma, 1000)


def test_the_budget_check_survives_python_O():
    """``python -O`` strips asserts; the check that refuses an overspending plan is not one."""
    code = (
        "import dataclasses\n"
        "from dpmix_ray.config import load_train_config\n"
        "from dpmix_ray.errors import BudgetError\n"
        "from dpmix_ray.privacy import check_plan, plan_run\n"
        f"cfg = load_train_config(None, {PLANNED!r})\n"
        "plan = plan_run(cfg, 1000)\n"
        "try:\n"
        "    check_plan(dataclasses.replace(plan, noise_multiplier=plan.noise_multiplier / 2), cfg, 1000)\n"
        "except BudgetError:\n"
        "    print('refused', __debug__)\n"
    )
    root = Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, "-O", "-c", code], capture_output=True, text=True, cwd=root, env={"PYTHONPATH": str(root)}, check=True)
    assert out.stdout.strip() == "refused False", out.stderr[-2000:]


def test_the_guarantee_says_what_it_covers_or_that_there_is_none():
    private = load_train_config(None, [])
    line = run_guarantee(private, 1234)
    assert private_run(private) and "\n" not in line
    assert line.startswith("(ε=2, δ=1e-05)-DP") and "N=1234 examples of the training split" in line
    assert "validation and test splits are held-out data" in line and "not private" in line
    reproducible = load_train_config(None, ["privacy.reproducible=true"])
    assert not private_run(reproducible) and run_guarantee(reproducible, 1234).startswith("NOT PRIVATE: privacy.reproducible")
    nonprivate = load_train_config(None, ["method=nonprivate"])
    assert not private_run(nonprivate) and run_guarantee(nonprivate, 1234).startswith("NOT PRIVATE: method nonprivate")


# --------------------------------------------------------------------------- the neighbouring relation

REPLACE_ONE = ["privacy.neighbouring=replace_one", "privacy.accountant=pld"]


def _dp_accounting_epsilon(accountant, relation, sigma=1.2, q=0.07, steps=300, delta=1e-5):
    acc = accountant(neighboring_relation=relation)
    acc.compose(E.SelfComposedDpEvent(E.PoissonSampledDpEvent(q, E.GaussianDpEvent(sigma)), steps))
    return acc.get_epsilon(delta)


@pytest.mark.parametrize("accountant, ours_name", [(rdp.RdpAccountant, "rdp"), (pld.PLDAccountant, "pld")])
def test_zero_out_is_accounted_as_add_remove_for_the_poisson_gaussian(accountant, ours_name):
    """Why today's accounting holds for zero_out: dp_accounting gives REPLACE_SPECIAL the add/remove ε."""
    special = _dp_accounting_epsilon(accountant, NR.REPLACE_SPECIAL)
    assert special == pytest.approx(_dp_accounting_epsilon(accountant, NR.ADD_OR_REMOVE_ONE), rel=1e-9)
    ours = epsilon_spent(noise_multiplier=1.2, sample_rate=0.07, steps=300, delta=1e-5, accountant=ours_name, neighbouring="zero_out")
    assert ours == pytest.approx(special, rel=0.03)  # rdp: Opacus's, a second implementation of the same bound


def test_replace_one_is_pld_replace_one_and_costs_about_twice_the_noise():
    replace = epsilon_spent(noise_multiplier=1.2, sample_rate=0.07, steps=300, delta=1e-5, accountant="pld", neighbouring="replace_one")
    assert replace == pytest.approx(_dp_accounting_epsilon(pld.PLDAccountant, NR.REPLACE_ONE), rel=1e-4)  # coarser grid
    zero = calibrate_noise(epsilon=2.0, delta=1e-5, sample_rate=0.07, steps=300, **ZERO_OUT)
    swap = calibrate_noise(epsilon=2.0, delta=1e-5, sample_rate=0.07, steps=300, accountant="pld", neighbouring="replace_one")
    assert 1.4 * zero < swap < 2.2 * zero
    assert 0.99 * 2.0 <= epsilon_spent(noise_multiplier=swap, sample_rate=0.07, steps=300, delta=1e-5, accountant="pld",
                                       neighbouring="replace_one") <= 2.0
    assert max_steps(epsilon=2.0, delta=1e-5, sample_rate=0.07, noise_multiplier=zero, accountant="pld", neighbouring="replace_one") < 300


def test_opacus_accountants_refuse_replace_one():
    with pytest.raises(ValueError, match="zero_out neighbours only"):
        epsilon_spent(noise_multiplier=1.0, sample_rate=0.1, steps=10, delta=1e-5, accountant="rdp", neighbouring="replace_one")


def test_plans_use_the_relation_and_are_refused_under_another():
    zero_cfg = load_train_config(None, PLANNED)
    swap_cfg = load_train_config(None, PLANNED + REPLACE_ONE)
    zero, swap = plan_run(zero_cfg, 1000), plan_run(swap_cfg, 1000)
    assert swap.neighbouring == "replace_one" and swap.noise_multiplier > 1.1 * zero.noise_multiplier
    check_plan(swap, swap_cfg, 1000)
    with pytest.raises(BudgetError, match="planned for zero_out neighbours"):
        check_plan(dataclasses.replace(zero, accountant="pld"), swap_cfg, 1000)
    with pytest.raises(BudgetError, match="spends"):  # the zero-out σ recomputed under replace-one overspends
        check_plan(dataclasses.replace(zero, accountant="pld", neighbouring="replace_one",
                                       epsilon_spent=swap.epsilon_spent), swap_cfg, 1000)


def test_every_guarantee_line_names_the_relation():
    assert "neighbouring datasets: zero-out one training example (N public)" in run_guarantee(load_train_config(None, []), 1234)
    swap = run_guarantee(load_train_config(None, REPLACE_ONE), 1234)
    assert "neighbouring datasets: replace one training example" in swap and "zero-out" not in swap


def test_a_limit_states_the_group_privacy_cost_under_zero_out():
    line = run_guarantee(load_train_config(None, ["privacy.epsilon=1", "data.limit=500"]), 500)
    assert "(2ε, (1+e^ε)δ) = (2, 3.72e-05) holds, by group privacy" in line
    assert relation_phrase(load_train_config(None, ["data.limit=500"])).endswith("(2ε, (1+e^ε)δ) holds, by group privacy")
    swap = run_guarantee(load_train_config(None, REPLACE_ONE + ["data.limit=500"]), 500)
    assert "a replacement, which the stated (ε, δ) covers" in swap and "2ε" not in swap


def test_sweep_claims_name_the_relation():
    from dpmix_ray.config import SweepConfig
    from dpmix_ray.sweep import claims
    from dpmix_ray.sweep.plan import build_groups

    for overrides, words in [({}, "zero-out one training example (N public)"),
                             ({"privacy": {"neighbouring": "replace_one", "accountant": "pld"}}, "replace one training example")]:
        cfg = SweepConfig.model_validate({"base": overrides, "epsilons": [1.0]})
        group = build_groups(cfg)[0]
        assert words in claims.guarantee(cfg, group, 3502) and words in claims.statement(cfg, 3502)


def test_release_composition_follows_the_stated_relation() -> None:
    """release/ under replace_one composes in PLD replace-one (three runs = one run of 3T steps), above zero-out's RDP."""
    runs = [P.dpsgd_event(1.0, 0.07, 200)] * 3
    replace = P.composed_epsilon(runs, 1e-5, "replace_one")
    once = P.epsilon_spent(noise_multiplier=1.0, sample_rate=0.07, steps=600, delta=1e-5, accountant="pld", neighbouring="replace_one")
    assert replace == pytest.approx(once, rel=1e-6)
    assert replace > P.composed_epsilon(runs, 1e-5, "zero_out") * 1.2


def test_dropped_rdp_orders_do_not_flood_the_log(caplog):
    """At small σ dp_accounting drops fractional orders (a valid, looser bound) and logs a line per order;
    a sweep's report composed dozens of them into its output."""
    caplog.set_level("WARNING")
    eps = repeat_and_select_epsilon(noise_multiplier=0.698242, sample_rate=0.073101, steps=30, delta=1e-5, mean_trials=6, shape=math.inf)
    assert math.isfinite(eps)
    assert not [r for r in caplog.records if "failed to converge" in r.getMessage()]
