"""The DP-aware search, without a cluster: τ and step coordinates, TAN proxy scaling, the known-good seeds of
every study (the default first, then the neighbouring ε's best moved by the transfer rule), and the refusals
under repeat_and_select."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import optuna
import pytest

from dpmix_ray import recipe
from dpmix_ray.config import SweepConfig, TrainConfig
from dpmix_ray.errors import ConfigError
from dpmix_ray.privacy import Plan, calibrate_noise, check_plan, epsilon_spent, steps_for_epochs
from dpmix_ray.sweep import budget as B
from dpmix_ray.sweep import plan as P
from dpmix_ray.sweep import proxy, space
from dpmix_ray.sweep.outcome import Outcome

N = 1000
BASE: dict[str, Any] = {
    "method": "dpmix_self", "data": {"name": "digits", "limit": N}, "model": {"name": "cnn_tiny"},
    "mix": {"aug_multiplicity": 2, "self_mix": 1}, "optim": {"batch_size": 256, "epochs": 8, "lr": 1.0}, "device": "cpu",
}
TAU_SPACE = {"dp.tau": {"loguniform": [0.03, 0.3]}, "optim.batch_size": {"choice": [128, 256, 512]}, "dp.steps": {"int": [10, 60]},
             "mix.aug_multiplicity": {"int": [2, 4]}}


def sweep(**over: Any) -> SweepConfig:
    raw: dict[str, Any] = {"name": "s", "base": BASE, "epsilons": [1, 2, 4, 8], "delta": 1e-4, "space": TAU_SPACE,
                           "search": {"sampler": "tpe", "trials_per_epsilon": 4, "seed": 0}, "final": {"seeds": 3}}
    return SweepConfig.model_validate(raw | over)


def sigma(eps: float, batch: int, steps: int) -> float:
    return calibrate_noise(epsilon=eps, delta=1e-4, sample_rate=batch / N, steps=steps, accountant="rdp", neighbouring="zero_out")


# --------------------------------------------------------------------------- coordinates


def test_steps_coordinate_gives_exactly_that_many_steps() -> None:
    for steps in (1, 7, 33, 165, 1000):
        for q in (256 / 3500, 64 / 3500, 0.3, 1 / 3):
            assert steps_for_epochs(space.epochs_for_steps(steps, q), q) == steps


def test_tau_sets_lr_from_the_planned_sigma(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(B, "training_size", lambda data: N)
    cfg = sweep()
    group = P.build_groups(cfg)[1]  # ε = 2
    train, plan = B.resolve_trial(cfg, group, {"dp.tau": 0.1, "optim.batch_size": 512, "dp.steps": 40, "mix.aug_multiplicity": 3}, 0, None)
    assert plan.run.steps == 40 and train.optim.batch_size == 512 and train.mix.aug_multiplicity == 3
    s = sigma(2, 512, 40)
    assert plan.run.noise_multiplier == pytest.approx(s)
    assert train.optim.lr == pytest.approx(0.1 * 512 / (s * 1.0 * math.sqrt(40)))  # τ = lr·σC/B·√T


def test_compute_coordinate_trades_group_size_for_steps(monkeypatch: pytest.MonkeyPatch) -> None:
    """dp.compute = epochs × G: at one compute, a point with K = 4 runs half the epochs of K = 2, and dpsgd (G = 1)
    three times those of the base's dpmix_self (K = 2, m = 1); so the per-example-gradient images are the same."""
    monkeypatch.setattr(B, "training_size", lambda data: N)
    cfg = sweep(space={"dp.compute": {"uniform": [6, 48]}, "mix.aug_multiplicity": {"int": [1, 4]}, "dp.tau": {"uniform": [0.05, 0.2]}},
                baselines=["dpsgd"])
    mix, dpsgd = P.build_groups(cfg)[1], P.build_groups(cfg)[5]  # dpmix_self and dpsgd at ε = 2
    assert (mix.method, dpsgd.method) == ("dpmix_self", "dpsgd") and mix.epsilon == dpsgd.epsilon == 2
    runs = {}
    for name, group, point in (("K2", mix, {"mix.aug_multiplicity": 2}), ("K4", mix, {"mix.aug_multiplicity": 4}), ("dpsgd", dpsgd, {})):
        train, plan = B.resolve_trial(cfg, group, {"dp.compute": 24.0, "dp.tau": 0.1, **point}, 0, None)
        runs[name] = (train.optim.epochs, train.mix.group_size, plan.run.steps)
        assert train.optim.epochs * train.mix.group_size == pytest.approx(24.0)
    assert runs["K2"][1:] == (3, runs["K2"][2]) and runs["K4"][1] == 5 and runs["dpsgd"][1] == 1
    assert runs["dpsgd"][2] == pytest.approx(3 * runs["K2"][2], abs=3) and runs["K4"][2] == pytest.approx(0.6 * runs["K2"][2], abs=2)  # T rounds up
    assert space.default_point(cfg, P.trial_config(cfg, mix, {}, 0), N)["dp.compute"] == pytest.approx(8 * 3)  # base: 8 epochs × G 3


# --------------------------------------------------------------------------- proxies (TAN)


def test_proxy_keeps_sigma_over_batch_and_the_step_count_and_states_its_own_epsilon() -> None:
    s = sigma(2, 512, 40)
    full = Plan(s, 512 / N, 40, 40 * 512 / N, epsilon_spent(noise_multiplier=s, sample_rate=512 / N, steps=40, delta=1e-4, accountant="rdp", neighbouring="zero_out"), "rdp", "zero_out")
    small = proxy.scale(full, batch_size=512, proxy_batch=64, n_train=N, delta=1e-4)
    assert small.steps == full.steps and small.sample_rate == 64 / N
    assert small.noise_multiplier / 64 == pytest.approx(full.noise_multiplier / 512)  # σ/B kept
    assert small.epsilon_spent == epsilon_spent(noise_multiplier=small.noise_multiplier, sample_rate=64 / N, steps=small.steps, delta=1e-4, accountant="rdp", neighbouring="zero_out")
    assert small.epsilon_spent > 2 * full.epsilon_spent  # far outside the sweep's ε: it is reported, never released
    assert not proxy.applies(64, 64) and proxy.applies(128, 64)


def test_search_trials_run_as_labelled_proxies_and_finals_at_full_size(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(B, "training_size", lambda data: N)
    cfg = sweep(search={"sampler": "tpe", "trials_per_epsilon": 4, "proxy": {"batch_size": 64}})
    group = P.build_groups(cfg)[1]
    point = {"dp.tau": 0.1, "optim.batch_size": 512, "dp.steps": 40, "mix.aug_multiplicity": 2}
    search = B.trial_spec(cfg, group, phase="search", index=0, params=point, group_plan=None, synthetic=None)
    final = B.trial_spec(cfg, group, phase="final", index=0, params=point, group_plan=None, synthetic=None)
    assert search["proxy"] is True and final["proxy"] is False
    s_plan, f_plan = (B.TrialPlan.from_dict(x["plan"]) for x in (search, final))
    assert s_plan.run.steps == f_plan.run.steps == 40
    assert s_plan.run.noise_multiplier / 64 == pytest.approx(f_plan.run.noise_multiplier / 512)
    assert search["train"]["optim"]["lr"] == final["train"]["optim"]["lr"]  # same lr, K, m: TAN
    assert search["train"]["optim"]["batch_size"] == 64 and final["train"]["optim"]["batch_size"] == 512
    assert f_plan.trial_epsilon == 2 and s_plan.trial_epsilon == s_plan.run.epsilon_spent > 2  # its own ε, in its plan and record
    for spec, plan in ((search, s_plan), (final, f_plan)):  # the trainer accepts both plans for their configs
        check_plan(plan.run, TrainConfig.model_validate(spec["train"]), N)
    small = B.trial_spec(cfg, group, phase="search", index=1, params=point | {"optim.batch_size": 64}, group_plan=None, synthetic=None)
    assert small["proxy"] is False  # already at the proxy's size: a real, covered run


# --------------------------------------------------------------------------- seeds and transfer


def test_default_point_is_the_base_recipe_in_search_coordinates() -> None:
    cfg = sweep()
    point = space.default_point(cfg, P.trial_config(cfg, P.build_groups(cfg)[0], {}, 0), N)
    assert point == {"dp.tau": recipe.TAU, "optim.batch_size": 256, "dp.steps": 32, "mix.aug_multiplicity": 2}  # 8 epochs at q=0.256
    lr_space = sweep(space={"optim.lr": {"loguniform": [2.0, 8.0]}, "optim.batch_size": {"choice": [100, 1000]}})
    clipped = space.default_point(lr_space, lr_space.base, N)
    assert clipped == {"optim.lr": 2.0, "optim.batch_size": 100}  # moved inside the space: nearest allowed values


def test_transfer_rule_keeps_tau_batch_steps_and_rescales_lr_by_sigma() -> None:
    found = {"dp.tau": 0.12, "optim.batch_size": 512, "dp.steps": 40, "mix.aug_multiplicity": 3}
    assert space.transfer(found, 1, 2, sweep().base, N, TAU_SPACE, delta=1e-4, accountant="rdp", neighbouring="zero_out") == found  # τ coordinates do not move
    lr_space = {"optim.lr": {"loguniform": [0.01, 4.0]}, "optim.batch_size": {"choice": [512]}, "dp.steps": {"int": [10, 60]}}
    at1 = {"optim.lr": 0.3, "optim.batch_size": 512, "dp.steps": 40}
    at2 = space.transfer(at1, 1, 2, sweep().base, N, lr_space, delta=1e-4, accountant="rdp", neighbouring="zero_out")
    assert at2["optim.lr"] == pytest.approx(0.3 * sigma(1, 512, 40) / sigma(2, 512, 40))  # τ = lr·σC/B·√T unchanged
    assert {k: v for k, v in at2.items() if k != "optim.lr"} == {"optim.batch_size": 512, "dp.steps": 40}


def test_transfer_reads_what_the_point_leaves_out_from_the_base_config() -> None:
    base = sweep(base=BASE | {"privacy": {"clip_norm": 0.5}}).base  # B 256, 8 epochs (32 steps), C 0.5
    at2 = space.transfer({"optim.lr": 0.3}, 1, 2, base, N, {"optim.lr": {"loguniform": [0.01, 8.0]}}, delta=1e-4, accountant="rdp", neighbouring="zero_out")
    assert at2["optim.lr"] == pytest.approx(0.3 * sigma(1, 256, 32) / sigma(2, 256, 32))
    capped = space.transfer({"optim.lr": 7.0}, 1, 8, base, N, {"optim.lr": {"loguniform": [0.01, 80.0]}}, delta=1e-4, accountant="rdp", neighbouring="zero_out")
    assert capped["optim.lr"] == pytest.approx(recipe.MAX_STEP / 0.5)  # lr·C ≤ 4 with the base's C


def _finished(spec: dict[str, Any], score: float) -> dict[str, Any]:
    from ray.tune.utils import flatten_dict

    return flatten_dict(Outcome.of_record(B.identity(spec) | {"status": "completed", "score": score, "val_accuracy": score}).as_result())


def test_a_study_receives_its_neighbours_best_moved_by_the_transfer_rule(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from dpmix_ray.sweep.search import GroupedSearcher

    monkeypatch.setattr(B, "training_size", lambda data: N)
    lr_space = {"optim.lr": {"loguniform": [0.01, 4.0]}, "optim.batch_size": {"choice": [128, 256, 512]}, "dp.steps": {"int": [10, 60]}}
    cfg = sweep(space=lr_space, epsilons=[1, 2, 8], search={"sampler": "random", "trials_per_epsilon": 3, "seed": 1})
    groups = P.build_groups(cfg)
    s = GroupedSearcher(cfg, groups, {g.key: 3 for g in groups}, tmp_path / "optuna.db", plans={}, synthetic=None, n_train=N)
    first = [s.suggest(f"t{i}") for i in range(3)]  # one per ε, round robin: each study's seed, the base recipe
    default = {"optim.lr": 1.0, "optim.batch_size": 256, "dp.steps": 32}
    assert [(c["group"], c["params"]) for c in first] == [(g.key, default) for g in groups]
    second = s.suggest("u0")  # ε=1, sampled: nothing to transfer yet
    assert second["group"] == "dpmix_self@eps=1" and second["params"] != default and s.handed_over == []

    s.on_trial_complete("u0", _finished(second, 0.9))  # ε=1's best so far: handed to ε=2 (its only neighbour)
    moved = space.transfer(second["params"], 1, 2, cfg.base, N, lr_space, delta=1e-4, accountant="rdp", neighbouring="zero_out")
    assert [(h["to"], h["from"]) for h in s.handed_over] == [("dpmix_self@eps=2", "dpmix_self@eps=1")]
    nxt = s.suggest("u1")
    assert nxt["group"] == "dpmix_self@eps=2" and nxt["params"] == pytest.approx(moved)
    assert nxt["params"]["optim.lr"] == pytest.approx(second["params"]["optim.lr"] * sigma(1, second["params"]["optim.batch_size"],
                                                      second["params"]["dp.steps"]) / sigma(2, second["params"]["optim.batch_size"],
                                                                                             second["params"]["dp.steps"]), rel=1e-6)
    s.on_trial_complete("t2", _finished(first[2], 0.5))  # ε=8's neighbour is ε=2 (not 1): its best moves down
    assert (s.handed_over[-1]["to"], s.handed_over[-1]["from"]) == ("dpmix_self@eps=2", "dpmix_self@eps=8")
    [waiting] = optuna.load_study(study_name="dpmix_self@eps=2", storage=f"sqlite:///{tmp_path / 'optuna.db'}").get_trials(
        states=(optuna.trial.TrialState.WAITING,))
    assert waiting.system_attrs["fixed_params"]["optim.lr"] == pytest.approx(1.0 * sigma(8, 256, 32) / sigma(2, 256, 32), rel=1e-6)

    in_tau = sweep(epsilons=[1, 2], search={"sampler": "random", "trials_per_epsilon": 3, "seed": 1})  # τ coordinates
    t = GroupedSearcher(in_tau, P.build_groups(in_tau), {"dpmix_self@eps=1": 3, "dpmix_self@eps=2": 3}, tmp_path / "tau.db",
                        plans={}, synthetic=None, n_train=N)
    seeds = [t.suggest("a"), t.suggest("b"), t.suggest("c")]
    t.on_trial_complete("c", _finished(seeds[2], 0.9))  # ε=1's sampled point wins: ε=2 gets the same τ, B, T, K
    assert t.suggest("d")["params"] == pytest.approx(seeds[2]["params"])


def test_no_seeds_and_no_transfer_when_switched_off(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from dpmix_ray.sweep.search import GroupedSearcher

    monkeypatch.setattr(B, "training_size", lambda data: N)
    cfg = sweep(epsilons=[1, 2], search={"sampler": "random", "trials_per_epsilon": 2, "warm_start": False, "transfer": False})
    groups = P.build_groups(cfg)
    s = GroupedSearcher(cfg, groups, {g.key: 2 for g in groups}, tmp_path / "optuna.db", plans={}, synthetic=None, n_train=N)
    a = s.suggest("a")
    assert a["params"]["dp.tau"] != recipe.TAU
    s.on_trial_complete("a", _finished(a, 0.9))
    assert s.handed_over == []


@pytest.mark.parametrize(("search", "needle"), [
    ({"warm_start": True}, "search.warm_start"),
    ({"transfer": True}, "search.transfer"),
    ({"proxy": {"batch_size": 64}}, "search.proxy"),
    ({"scheduler": "asha"}, "search.scheduler"),
])
def test_repeat_and_select_refuses_adaptive_seeding_and_proxies_in_one_line(search: dict[str, Any], needle: str) -> None:
    cfg = sweep(tuning_privacy="repeat_and_select", space={"dp.tau": {"loguniform": [0.03, 0.3]}},
                search={"sampler": "random", "trials_per_epsilon": 4} | search)
    with pytest.raises(ConfigError) as e:
        P.check_sweep(cfg)
    assert needle in str(e.value) and "\n" not in str(e.value)
    P.check_sweep(sweep(tuning_privacy="repeat_and_select", space={"dp.tau": {"loguniform": [0.03, 0.3]}},
                        search={"sampler": "random", "trials_per_epsilon": 4}))  # τ is not a mechanism key; defaults are off
    assert not P.warm_start(cfg.model_copy(update={"search": cfg.search.model_copy(update={"warm_start": None})}))


def test_a_given_sigma_is_refused_with_proxies_or_a_searched_step_count() -> None:
    with_sigma = BASE | {"optim": BASE["optim"] | {"epochs": None}, "privacy": {"noise_multiplier": 1.0}}
    for over in ({"search": {"proxy": {"batch_size": 64}}}, {"space": TAU_SPACE}):
        with pytest.raises(ConfigError, match="give epochs, not σ"):
            P.check_sweep(sweep(base=with_sigma, **over) if "space" in over else sweep(base=with_sigma, space={}, **over))
    P.check_sweep(sweep(base=with_sigma, space={"dp.tau": {"loguniform": [0.03, 0.3]}}))


@pytest.mark.parametrize(("space_", "needle"), [
    ({"dp.tau": {"uniform": [0.1, 0.2]}, "optim.lr": {"uniform": [1, 2]}}, "optim.lr and dp.tau"),
    ({"dp.steps": {"int": [10, 20]}, "optim.epochs": {"uniform": [1, 2]}}, "optim.epochs and dp.steps"),
    ({"dp.bogus": {"uniform": [1, 2]}}, "unknown config path 'dp.bogus'"),
    ({"dp.compute": {"uniform": [10, 20]}, "dp.steps": {"int": [10, 20]}}, "dp.steps and dp.compute"),
    ({"dp.compute": {"uniform": [10, 20]}, "optim.epochs": {"uniform": [1, 2]}}, "optim.epochs and dp.compute"),
])
def test_dp_coordinates_are_checked_by_the_schema(space_: dict[str, Any], needle: str) -> None:
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match=needle.replace(".", r"\.")):
        sweep(space=space_)
