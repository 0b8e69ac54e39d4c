"""The one-run audits: both bounds against scipy and jax_privacy, the white-box canary slots, guesses, and
audited training runs (a broken mechanism is caught; an intact one is not)."""

import json
import math
import subprocess
import sys

import numpy as np
import pytest
import torch
from scipy.stats import binom

from dpmix_ray import audit as A
from dpmix_ray import mechanism as M
from dpmix_ray.config import AUDIT_CANARIES, load_train_config
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


# jax_privacy 2.0.0's CanaryScoreAuditor.epsilon_one_run / epsilon_one_run_fdp at significance 0.05, from
# tests/data/jax_privacy_one_run_reference.py run in a throwaway venv (its docstring has the commands).
JAX_PRIVACY = [  # (m, k, v, delta, epsilon_one_run, epsilon_one_run_fdp)
    (100, 50, 45, 1e-05, 1.3927909762894453, 2.7930206042037895),
    (200, 100, 90, 1e-05, 1.6298922318258207, 3.1435193771563656),
    (500, 100, 95, 1e-05, 2.168821538933098, 3.6538107395749715),
    (1000, 100, 100, 1e-05, 3.465376229385333, 5.5490279999429415),
    (1000, 200, 170, 1e-05, 1.3974589415435028, 2.2406908643498515),
    (1000, 500, 350, 1e-05, 0.6827257501590491, 1.1937441434159344),
    (1000, 1000, 700, 1e-06, 0.7319840376905102, 1.560996687318271),
    (2000, 300, 280, 1e-05, 2.2444811649314778, 3.460275313924999),
    (5000, 1000, 800, 1e-05, 1.2525826226597, 1.8517203448910506),
    (5000, 2500, 1600, 1e-06, 0.5060576644238077, 0.926258937418992),
    (400, 40, 40, 0.001, 0.9426694295324839, 2.908029746130023),
    (300, 150, 120, 0.0001, 1.0325645802520271, 1.656302463231616),
]


@pytest.mark.parametrize("m, k, v, delta, steinke, fdp", JAX_PRIVACY)
def test_both_estimators_match_jax_privacy(m, k, v, delta, steinke, fdp):
    counts = dict(delta=delta, canaries=m, guesses=k, correct=v)
    assert A.epsilon_lower_bound(**counts) == pytest.approx(steinke, abs=1e-5)
    assert A.epsilon_lower_bound_fdp_gdp(**counts) == pytest.approx(fdp, abs=1e-5)


@pytest.mark.parametrize("sigma", [0.7, 1.5, 4.0])
def test_the_pld_tradeoff_of_one_gaussian_step_is_its_gdp_curve_from_below(sigma):
    f, _ = A.subsampled_gaussian_tradeoff(sigma, 1.0, 1)
    g = A.gaussian_tradeoff(1 / sigma)
    for alpha in [1e-4, 1e-2, 0.1, 0.3, 0.5, 0.9]:
        assert g(alpha) - 0.02 <= f(alpha) <= g(alpha) + 1e-9  # pessimistic PLD and a grid: never above


def test_fdp_bound_against_the_runs_own_curve_is_sound_for_its_sigma():
    """At the σ a run is planned at, ε_lb < the run's PLD ε even for the best outcome a k-guess audit can see."""
    q, steps, delta = 0.07, 165, 1e-5
    _, pld = A.subsampled_gaussian_tradeoff(2.3, q, steps)
    eps = pld.get_epsilon_for_delta(delta)
    lb = A.epsilon_lower_bound_fdp(sample_rate=q, steps=steps, delta=delta, canaries=1000, guesses=60, correct=55)
    assert 0 < lb
    more = A.epsilon_lower_bound_fdp(sample_rate=q, steps=steps, delta=delta, canaries=1000, guesses=60, correct=60)
    assert more >= lb  # more correct guesses, a larger bound
    f, _ = A.subsampled_gaussian_tradeoff(2.3, q, steps)
    assert A.fdp_rejects(f, canaries=1000, guesses=60, correct=60) == (more >= eps)


def test_bonferroni_max_takes_each_estimator_at_97_5_percent():
    counts = dict(delta=1e-5, sample_rate=0.07, steps=165, canaries=500, guesses=100, correct=95)
    eps, name, values = A.combined_lower_bound(estimator="max", **counts)
    assert eps == max(values.values()) and name in values
    assert values["steinke"] == A.epsilon_lower_bound(delta=1e-5, canaries=500, guesses=100, correct=95, confidence=0.975)
    alone, _, _ = A.combined_lower_bound(estimator="steinke", **counts)
    assert alone == A.epsilon_lower_bound(delta=1e-5, canaries=500, guesses=100, correct=95) >= values["steinke"]


def _params():
    return {"w": torch.zeros(30, 2, dtype=torch.float64), "b": torch.zeros(5, dtype=torch.float64)}


@pytest.mark.parametrize("directions", ["dirac", "random"])
def test_a_canary_slot_adds_one_clipped_vector_when_included_and_zero_when_not(directions):
    included = np.array([True, False] * 10)
    slots = A.CanarySlots(20, clip_norm=1.5, seed=3, directions=directions, included=included)
    chunk = slots.sample(_params(), 1.0)  # q = 1: every slot is in this step
    assert chunk is not None and len(chunk.norms) == 20
    assert torch.equal(chunk.norms > 0, torch.from_numpy(included))
    assert float(chunk.norms.max()) == pytest.approx(A.CANARY_NORM * 1.5)  # far above C before clipping
    factors = M.clip_factors(chunk.norms, 1.5)
    for i in range(20):
        one = torch.zeros(20, dtype=torch.float64)
        one[i] = factors[i]
        flat = torch.cat([g.flatten() for g in chunk.weighted_sum(one).values()])
        if included[i]:
            assert float(flat.norm()) <= 1.5 and float(flat.norm()) == pytest.approx(1.5, rel=1e-9)
            assert torch.allclose(flat / flat.norm(), slots.direction(i))
        else:
            assert float(flat.abs().max()) == 0.0


def test_scores_read_the_released_updates_only():
    slots = A.CanarySlots(10, clip_norm=1.0, seed=0, included=np.ones(10, bool))
    slots.sample(_params(), 0.5)
    u1, u2 = {"w": torch.randn(30, 2), "b": torch.randn(5)}, {"w": torch.randn(30, 2), "b": torch.randn(5)}
    slots.released(u1)
    slots.released(u2)
    total = torch.cat([(u1[k] + u2[k]).flatten().double() for k in ("w", "b")])
    expected = [float(slots.direction(i) @ total) for i in range(10)]
    assert slots.scores() == pytest.approx(expected, abs=1e-6)


def test_guesses_are_tuned_on_the_held_out_half_only():
    rng = np.random.default_rng(0)
    included = rng.random(400) < 0.5
    scores = included * 3.0 + rng.normal(size=400)
    held, scored = A.split_halves(400, seed=1)
    assert len(set(held) | set(scored)) == 400 and not set(held) & set(scored)
    a = A.bound_from_scores(scores, included, guesses=None, seed=1, estimator="steinke", delta=1e-5, sample_rate=0.1, steps=10)
    shuffled = scores.copy()
    shuffled[scored] = rng.permutation(shuffled[scored])  # the scored half changes, the tuned k cannot
    b = A.bound_from_scores(shuffled, included, guesses=None, seed=1, estimator="steinke", delta=1e-5, sample_rate=0.1, steps=10)
    assert a["guesses"] == b["guesses"] and a["canaries_scored"] == 200 and a["guesses_tuned"]
    assert a["correct"] > b["correct"]


TINY = ["data.name=digits", "method=dpsgd", "mix.aug_multiplicity=1", "mix.self_mix=0", "optim.batch_size=128", "optim.epochs=1"]


def test_white_box_slots_join_n_whatever_the_draw(digits):
    res = A.run_audit(load_train_config(None, TINY), canaries=50, guesses=10, splits=digits, progress=False, estimator="steinke")
    assert res["n_train"] == len(digits.train) + 50 and res["setting"] == "white-box"
    assert res["sample_rate"] == pytest.approx(128 / (len(digits.train) + 50))


def test_cli_audit_of_a_reproducible_run_says_not_private(capsys):
    from dpmix_ray.cli import main

    sets = ["--set", *TINY, "privacy.reproducible=true"]
    assert main(["audit", *sets, "--canaries", "40", "--guesses", "10", "--estimator", "steinke"]) == 0
    out, err = capsys.readouterr()
    res = json.loads(out.strip().splitlines()[-1])
    assert res["verdict"].startswith("NOT PRIVATE") and not res["private"]
    assert "NOT PRIVATE" in err and "white-box" in err and "estimator steinke" in err


# A run where every canary slot is in the update unclipped and unnoised: the audit must ring above the claimed ε = 1.
AUDITED = ["data.name=digits", "method=dpsgd", "mix.aug_multiplicity=1", "mix.self_mix=0", "privacy.epsilon=1",
           "optim.batch_size=128", "optim.epochs=4"]


@pytest.mark.slow
def test_audit_rings_for_a_mechanism_without_clipping_or_noise(digits, monkeypatch):
    from breaks import break_mechanism  # tests/breaks.py (mech): the shared test-only breakage

    break_mechanism(monkeypatch, "skip_noise")
    break_mechanism(monkeypatch, "no_clip")
    res = A.run_audit(load_train_config(None, AUDITED), canaries=400, splits=digits, progress=False)
    assert res["epsilon"] <= 1
    assert res["epsilon_lower_bound"] > 1, res


@pytest.mark.slow
def test_audit_of_an_intact_private_run_stays_below_its_epsilon(digits):
    res = A.run_audit(load_train_config(None, AUDITED), canaries=400, splits=digits, progress=False)
    assert res["epsilon_lower_bound"] <= res["epsilon"] <= 1, res


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
    for key in ["epsilon", "delta", "epsilon_lower_bound", "estimator", "estimates", "setting", "canaries", "guesses", "correct",
                "confidence", "max_provable_epsilon", "audit_method", "method", "n_train", "steps", "sample_rate", "noise_multiplier"]:
        assert key in res
    assert res["canaries"] == 100 and res["guesses"] == 40 and 0 <= res["correct"] <= 40 and res["method"] == "dpsgd"
    assert res["epsilon_lower_bound"] <= res["epsilon"] <= 2 and res["confidence"] == 0.95


def test_cli_help_states_the_audit_defaults():
    from dpmix_ray.cli import build_parser

    sub = next(a for a in build_parser()._actions if a.dest == "command").choices["audit"]
    helps = {a.dest: a.help for a in sub._actions}
    assert f"(default {AUDIT_CANARIES})" in helps["canaries"] and "tuned on a held-out half" in helps["guesses"]
    assert "white-box" in helps["black_box"]


def test_cli_audit_refuses_more_guesses_than_canaries(capsys):
    from dpmix_ray.cli import main

    assert main(["audit", "--set", "data.name=digits", "--canaries", "50", "--guesses", "60"]) == 2
    out, err = capsys.readouterr()
    assert out == "" and len(err.strip().splitlines()) == 1 and "--guesses" in err


def test_white_box_membership_is_secret_and_fresh_per_audit():
    """Two canary slot sets on the same public seed draw different memberships (secret bits, not ``seed``)."""
    a, b = A.CanarySlots(200, clip_norm=1.0, seed=7), A.CanarySlots(200, clip_norm=1.0, seed=7)
    assert 0.35 < a.included.mean() < 0.65
    assert not np.array_equal(a.included, b.included)
