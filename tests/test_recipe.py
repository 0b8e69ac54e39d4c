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

TINY = ["data.name=digits", "optim.batch_size=64", "optim.epochs=1", "mix.aug_multiplicity=2", "mix.self_mix=1", "optim.lr=1.0",
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
