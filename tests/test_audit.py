"""The one-run audit: its bound against scipy, its canaries and guesses, and two audited training runs
(a mechanism with its noise removed is caught; an intact one is not)."""

import json
import math
import subprocess
import sys

import numpy as np
import pytest
import torch
from scipy.stats import binom

from dpmix_ray import audit as A
from dpmix_ray.config import AUDIT_CANARIES, AUDIT_GUESSES, load_train_config
from dpmix_ray.data import load_splits


def scipy_p_value(eps, delta, m, r, v):
    """The paper's p-value written directly from binomial tails (scipy), as an independent check."""
    p = 1 / (1 + math.exp(-eps))
    beta = binom.sf(v - 1, r, p)
    if delta == 0 or v == 0:
        return min(1.0, beta)
    alpha = max((binom.sf(v - i - 1, r, p) - beta) / i for i in range(1, v + 1))
    return min(1.0, beta + 2 * m * delta * alpha)


@pytest.mark.parametrize("delta", [0.0, 1e-5, 1e-3])
@pytest.mark.parametrize("eps, r, v", [(0.0, 10, 7), (1.0, 100, 81), (2.5, 200, 190), (0.3, 1000, 560), (4.0, 50, 50), (1.0, 20, 0)])
def test_p_value_matches_scipy_binomial_tails(eps, r, v, delta):
    got = A.p_value(epsilon=eps, delta=delta, canaries=1000, guesses=r, correct=v)
    assert got == pytest.approx(scipy_p_value(eps, delta, 1000, r, v), rel=1e-9, abs=1e-12)


@pytest.mark.parametrize("delta", [0.0, 1e-5])
@pytest.mark.parametrize("r, v", [(100, 81), (200, 172), (1000, 700), (100, 100)])
def test_lower_bound_is_the_95_percent_rejection_boundary(r, v, delta):
    eps = A.epsilon_lower_bound(delta=delta, canaries=1000, guesses=r, correct=v)
    assert eps > 0
    assert scipy_p_value(eps, delta, 1000, r, v) <= 0.05 < scipy_p_value(eps + 1e-4, delta, 1000, r, v)


def test_chance_level_guessing_proves_nothing():
    assert A.epsilon_lower_bound(delta=1e-5, canaries=1000, guesses=200, correct=100) == 0.0
    assert A.epsilon_lower_bound(delta=1e-5, canaries=1000, guesses=200, correct=0) == 0.0


@pytest.mark.parametrize("k, expected", [(100, 3.49), (1000, 5.81)])
def test_max_provable_epsilon_is_the_all_correct_bound(k, expected):
    closed_form = math.log(0.05 ** (1 / k) / (1 - 0.05 ** (1 / k)))  # P[all k right] = p^k = 0.05
    got = A.max_provable_epsilon(delta=0.0, canaries=k, guesses=k)
    assert got == pytest.approx(closed_form, abs=1e-5) and got == pytest.approx(expected, abs=0.01)
    assert A.max_provable_epsilon(delta=1e-5, canaries=k, guesses=k) <= got  # δ only lowers the ceiling


def test_guesses_take_both_tails_and_are_counted_against_the_truth():
    scores = np.array([5.0, -3.0, 0.1, 9.0, -7.0, 0.0])
    g = A.guess(scores, top=2, bottom=1)
    assert g.tolist() == [1, 0, 0, 1, -1, 0]
    included = np.array([True, True, False, False, False, True])
    assert A.count_correct(g, included) == 2  # 5.0 in (right), 9.0 in (wrong), -7.0 out (right)
    with pytest.raises(ValueError):
        A.guess(scores, top=4, bottom=3)


@pytest.fixture(scope="module")
def digits():
    return load_splits(load_train_config(None, ["data.name=digits"]).data)


def test_canaries_are_mislabelled_training_images_appended_with_probability_half(digits):
    audited, can = A.make_canaries(digits, 400, label_seed=0)
    n = len(digits.train)
    assert len(can) == 400 and torch.equal(can.x, digits.train.x[-400:])
    assert bool((can.y != digits.train.y[-400:]).all())  # every canary label is wrong
    assert 0.38 < can.included.mean() < 0.62  # ½ each (400 draws: ±6 sd)
    assert len(audited.train) == n - 400 + int(can.included.sum())  # N counts the included canaries
    assert torch.equal(audited.train.x[: n - 400], digits.train.x[: n - 400])
    assert torch.equal(audited.train.y[n - 400 :], can.y[torch.from_numpy(can.included)])
    assert audited.val is digits.val and audited.test is digits.test
    _, again = A.make_canaries(digits, 400, label_seed=0)
    assert torch.equal(again.y, can.y)  # the canaries are public...
    assert not np.array_equal(again.included, can.included)  # ...which ones joined is secret, fresh per audit


# A run that memorises mislabelled canaries when nothing hides them: plain DP-SGD on digits, several
# epochs at a large step. At ε = 0.5 the intact mechanism must hide them, the noiseless one cannot.
AUDITED = ["data.name=digits", "method=dpsgd", "mix.aug_multiplicity=1", "mix.self_mix=0", "privacy.epsilon=0.5",
           "optim.batch_size=128", "optim.lr=2", "optim.momentum=0.9", "optim.epochs=20"]


@pytest.mark.slow
def test_audit_catches_a_mechanism_without_noise(digits, monkeypatch):
    from breaks import break_mechanism  # tests/breaks.py (mech): the shared test-only breakage

    break_mechanism(monkeypatch, "skip_noise")
    res = A.run_audit(load_train_config(None, AUDITED), canaries=200, guesses=100, splits=digits, progress=False)
    assert res["epsilon"] <= 0.5
    assert res["epsilon_lower_bound"] > 0.5, res


@pytest.mark.slow
def test_audit_of_an_intact_private_run_stays_below_its_epsilon(digits):
    res = A.run_audit(load_train_config(None, AUDITED), canaries=200, guesses=100, splits=digits, progress=False)
    assert res["epsilon_lower_bound"] <= res["epsilon"] <= 0.5, res


@pytest.mark.slow
def test_cli_audit_ends_with_one_json_line(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("data: {name: digits}\nmethod: dpsgd\nmix: {aug_multiplicity: 1, self_mix: 0}\noptim: {batch_size: 128, epochs: 1}\n")
    proc = subprocess.run([sys.executable, "-m", "dpmix_ray.cli", "audit", str(cfg), "--set", "privacy.epsilon=2",
                           "--canaries", "100", "--guesses", "40", "--json"], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 1
    res = json.loads(lines[0])
    for key in ["epsilon", "delta", "epsilon_lower_bound", "canaries", "guesses", "correct", "confidence", "max_provable_epsilon",
                "audit_method", "method", "n_train", "steps", "sample_rate", "noise_multiplier"]:
        assert key in res
    assert res["canaries"] == 100 and res["guesses"] == 40 and 0 <= res["correct"] <= 40 and res["method"] == "dpsgd"
    assert res["epsilon_lower_bound"] <= res["epsilon"] <= 2 and res["confidence"] == 0.95


def test_cli_help_states_the_audit_defaults():
    from dpmix_ray.cli import build_parser

    sub = next(a for a in build_parser()._actions if a.dest == "command").choices["audit"]
    helps = {a.dest: a.help for a in sub._actions}
    assert f"(default {AUDIT_CANARIES})" in helps["canaries"] and f"(default {AUDIT_GUESSES})" in helps["guesses"]


def test_cli_audit_refuses_more_guesses_than_canaries(capsys):
    from dpmix_ray.cli import main

    assert main(["audit", "--set", "data.name=digits", "--canaries", "50", "--guesses", "60"]) == 2
    out, err = capsys.readouterr()
    assert out == "" and len(err.strip().splitlines()) == 1 and "--guesses" in err
