"""Recipe ingredients (lr warm-up and schedule, EMA of the parameters) and the rules in dpmix_ray/recipe.py."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel

from dpmix_ray import recipe as R
from dpmix_ray import trainer as T
from dpmix_ray.config import load_train_config
from dpmix_ray.data import load_splits

ZERO_OUT = {"delta": 1e-5, "accountant": "rdp", "neighbouring": "zero_out"}

TINY = ["data.name=digits", "optim.batch_size=64", "optim.epochs=1", "mix.aug_multiplicity=2", "mix.self_mix=1", "optim.lr=1.0",
        "privacy.reproducible=true",  # seeded mechanism: runs with and without EMA see the same noise
        "privacy.epsilon=8"]


@pytest.fixture(scope="module")
def digits():
    return load_splits(load_train_config(None, TINY).data)


def test_lr_factor_warms_up_linearly_then_holds_or_decays():
    f = [R.lr_factor(t, total=100, warmup=0.1, schedule="constant") for t in range(100)]
    assert f[:10] == pytest.approx([(t + 1) / 10 for t in range(10)]) and f[9:] == [1.0] * 91
    c = [R.lr_factor(t, total=100, warmup=0.1, schedule="cosine") for t in range(100)]
    assert c[:10] == f[:10] and c[10] == 1.0 and c[-1] == pytest.approx(0.0, abs=1e-3)
    assert all(a >= b for a, b in zip(c[10:], c[11:])), "cosine decays monotonically after the warm-up"
    assert [R.lr_factor(t, total=5, warmup=0.0, schedule="constant") for t in range(5)] == [1.0] * 5


def test_ema_weight_is_the_debiased_average():
    """After t iterates the average is Σ d^(t−i) θ_i / Σ d^(t−i): check the recursion against the sum."""
    d, thetas = 0.9, [3.0, -1.0, 4.0, 1.5, -5.0]
    avg = thetas[0]
    for n, theta in enumerate(thetas[1:], start=1):
        avg += R.ema_weight(d, n) * (theta - avg)
    t = len(thetas)
    weights = [d ** (t - 1 - i) for i in range(t)]
    assert avg == pytest.approx(sum(w * x for w, x in zip(weights, thetas)) / sum(weights))
    assert R.ema_weight(d, 10_000) == pytest.approx(1 - d)


def test_averaged_model_with_ema_fn_is_the_debiased_ema():
    torch.manual_seed(0)
    net = nn.Linear(3, 2).double()
    ema = AveragedModel(net, multi_avg_fn=R.ema_multi_avg_fn(0.8))
    history = []
    for _ in range(30):
        with torch.no_grad():
            for p in net.parameters():
                p.add_(torch.randn_like(p))
        ema.update_parameters(net)
        history.append([p.detach().clone() for p in net.parameters()])
    weights = [0.8 ** (len(history) - 1 - i) for i in range(len(history))]
    for j, averaged in enumerate(ema.module.parameters()):
        ref = sum(w * h[j] for w, h in zip(weights, history)) / sum(weights)
        torch.testing.assert_close(averaged, ref, rtol=1e-12, atol=1e-12)
    assert not torch.allclose(ref, history[-1][-1]), "the average lags the live weights"


def test_ema_is_post_processing_and_is_what_the_run_reports(digits):
    """Same seed with and without EMA: the live trajectory (and so the mechanism) is identical, and
    the reported accuracies are the average's, with the live ones beside them."""
    plain = T.train(load_train_config(None, TINY), splits=digits, progress=False)
    with_ema = T.train(load_train_config(None, TINY + ["optim.ema=0.9"]), splits=digits, progress=False)
    assert with_ema["val_accuracy_live"] == plain["val_accuracy"] and with_ema["test_accuracy_live"] == plain["test_accuracy"]
    assert with_ema["noise_multiplier"] == plain["noise_multiplier"] and with_ema["steps"] == plain["steps"]
    assert (with_ema["val_accuracy"], with_ema["test_accuracy"]) != (plain["val_accuracy"], plain["test_accuracy"])
    assert "val_accuracy_live" not in plain


def test_resume_with_ema_and_warmup_is_exact(digits):
    cfg = load_train_config(None, TINY + ["optim.epochs=2", "optim.ema=0.9", "optim.warmup=0.2", "optim.lr_schedule=cosine"])
    states = []
    full = T.train(cfg, splits=digits, progress=False, on_epoch=lambda r: states.append(r.state()))
    resumed = T.train(cfg, splits=digits, progress=False, resume_state=copy.deepcopy(states[0]))
    for key in ("val_accuracy", "test_accuracy", "val_accuracy_live", "test_accuracy_live"):
        assert resumed[key] == full[key], key


# --------------------------------------------------------------------------- derived defaults


def _tau(cfg, n: int) -> float:
    """τ = lr·σC/B·√T of a resolved config, from the planner's own σ and T."""
    from dpmix_ray.privacy import plan_run

    plan = plan_run(cfg, n)
    return cfg.optim.lr * plan.noise_multiplier * cfg.privacy.clip_norm / cfg.optim.batch_size * plan.steps**0.5


@pytest.mark.parametrize("n, batch, epochs", [(3_500, 256, 12.0), (50_000, 1024, 45.4)])
def test_defaults_scale_with_n(n, batch, epochs):
    cfg = R.resolve(load_train_config(None, ["privacy.epsilon=3"]), n)
    assert (cfg.optim.batch_size, cfg.optim.epochs) == (batch, epochs)
    assert _tau(cfg, n) == pytest.approx(R.TAU, rel=1e-3)
    assert 0 < cfg.optim.lr * cfg.privacy.clip_norm <= R.MAX_STEP


def test_defaults_grow_with_n_and_respect_small_sets():
    sizes = [500, 3_500, 20_000, 50_000, 1_000_000]
    batches, epochs = [R.batch_size(n) for n in sizes], [R.epochs(n) for n in sizes]
    assert batches == sorted(batches) and epochs == sorted(epochs) and batches[-1] == 4096
    assert R.batch_size(100) == 25, "at most N/4: Poisson sampling at q ≤ 1/4"


def test_lr_is_coupled_to_clip_norm_and_grows_with_epsilon():
    at = {e: R.resolve(load_train_config(None, [f"privacy.epsilon={e}"]), 3_500).optim.lr for e in (1, 2, 4, 8)}
    assert at[1] < at[2] < at[4] < at[8]
    big_c = R.resolve(load_train_config(None, ["privacy.epsilon=2", "privacy.clip_norm=4"]), 3_500)
    assert big_c.optim.lr * 4 == pytest.approx(at[2], rel=1e-3), "lr·C is what the rule fixes"


def test_given_values_are_kept_and_sigma_keeps_its_meaning():
    given = load_train_config(None, ["optim.batch_size=64", "optim.epochs=3", "optim.lr=0.7"])
    assert R.resolve(given, 3_500) is given
    sigma = R.resolve(load_train_config(None, ["privacy.noise_multiplier=2.0", "optim.batch_size=128"]), 3_500)
    assert sigma.optim.epochs is None and sigma.optim.batch_size == 128, "σ given: the planner derives the steps"
    assert _tau(sigma, 3_500) == pytest.approx(R.TAU, rel=1e-3)
    nonprivate = R.resolve(load_train_config(None, ["method=nonprivate"]), 3_500)
    assert nonprivate.optim.lr == R.NONPRIVATE_LR and nonprivate.optim.epochs == 12.0


def test_config_leaves_derived_keys_null_but_still_refuses_sigma_with_epochs():
    from dpmix_ray.errors import ConfigError

    cfg = load_train_config(None)
    assert (cfg.optim.batch_size, cfg.optim.epochs, cfg.optim.lr) == (None, None, None)
    with pytest.raises(ConfigError, match="both set"):
        load_train_config(None, ["privacy.noise_multiplier=1.0", "optim.epochs=3"])


def test_trainer_runs_and_records_the_derived_recipe(digits):
    cfg = load_train_config(None, ["data.name=digits", "mix.aug_multiplicity=2", "mix.self_mix=1", "privacy.epsilon=8"])
    res = T.train(cfg, splits=digits, progress=False)
    n = len(digits.train)
    assert res["batch_size"] == R.batch_size(n) and res["config"]["optim"]["epochs"] == R.epochs(n)
    assert res["config"]["optim"]["lr"] == R.resolve(cfg, n).optim.lr and res["val_accuracy"] > 0.5


# --------------------------------------------------------------------------- transfer across ε


def test_transfer_keeps_tau_batch_and_steps():
    found = {"optim.lr": 0.5, "optim.batch_size": 512, "optim.epochs": 24, "mix.aug_multiplicity": 2}
    moved = R.transfer(found, 1, 4, 3_500, **ZERO_OUT)
    assert {k: v for k, v in moved.items() if k != "optim.lr"} == {k: v for k, v in found.items() if k != "optim.lr"}
    base = ["optim.batch_size=512", "optim.epochs=24"]
    tau_from = _tau(load_train_config(None, [*base, "optim.lr=0.5", "privacy.epsilon=1"]), 3_500)
    tau_to = _tau(load_train_config(None, [*base, f"optim.lr={moved['optim.lr']}", "privacy.epsilon=4"]), 3_500)
    assert tau_to == pytest.approx(tau_from, rel=1e-3)
    assert 2.5 < moved["optim.lr"] / 0.5 < 4, "σ ∝ ~1/ε at small ε: lr grows almost linearly (Panda et al.)"
    assert R.transfer(moved, 4, 1, 3_500, **ZERO_OUT)["optim.lr"] == pytest.approx(0.5)


def test_transfer_caps_the_step_leaves_derived_keys_and_refuses_sigma():
    assert R.transfer({"optim.lr": 3.0, "optim.batch_size": 512, "optim.epochs": 24}, 1, 8, 3_500, **ZERO_OUT)["optim.lr"] == R.MAX_STEP
    assert R.transfer({"mix.aug_multiplicity": 4}, 1, 8, 3_500, **ZERO_OUT) == {"mix.aug_multiplicity": 4}
    with pytest.raises(ValueError, match="noise_multiplier"):
        R.transfer({"optim.lr": 1.0, "privacy.noise_multiplier": 2.0}, 1, 2, 3_500, **ZERO_OUT)


def test_a_plan_made_on_the_resolved_config_fits_the_unresolved_one(digits):
    """What a sweep driver that plans trials itself relies on: plan resolve(cfg, N), hand fit the raw cfg."""
    from dpmix_ray.privacy import plan_run

    cfg = load_train_config(None, ["data.name=digits", "mix.aug_multiplicity=2", "mix.self_mix=1", "privacy.epsilon=8",
                                   "optim.epochs=0.5"])
    n = len(digits.train)
    fitted = T.fit(cfg, plan_run(R.resolve(cfg, n), n), splits=digits, progress=False)
    assert fitted.result["batch_size"] == R.batch_size(n) and fitted.result["steps"] >= 1
