"""The sweep: planning and tuning-privacy math (fast), the grouped searcher, and end-to-end runs on a
local Ray cluster (slow): a 2-ε × 2-trial sweep with a diverging trial, a resume after a kill, and a
crashed worker retried from its checkpoint."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import optuna
import pytest

from dpmix_ray.config import SweepConfig, config_hash
from dpmix_ray.errors import BudgetError, ConfigError
from dpmix_ray.privacy import plan_run, repeat_and_select_epsilon
from dpmix_ray.sweep import budget as B
from dpmix_ray.sweep import plan as P
from dpmix_ray.sweep import selection
from dpmix_ray.sweep import state as S

TINY_BASE: dict[str, Any] = {
    "method": "dpmix_self",
    "data": {"name": "digits", "limit": 300},
    "model": {"name": "cnn"},
    "mix": {"aug_multiplicity": 2, "self_mix": 1},
    "optim": {"batch_size": 32, "epochs": 1, "lr": 1.0},
    "device": "cpu",
}


def sweep(**over: Any) -> SweepConfig:
    raw: dict[str, Any] = {
        "name": "t", "base": TINY_BASE, "epsilons": [2, 8], "delta": 1e-4,
        "space": {"optim.lr": {"loguniform": [0.5, 4.0]}},
        "search": {"sampler": "random", "trials_per_epsilon": 2, "seed": 0}, "final": {"seeds": 1},
    }
    for dotted, value in over.items():
        node = raw
        *parents, last = dotted.split("__")
        for p in parents:
            node = node.setdefault(p, {})
        node[last] = value
    return SweepConfig.model_validate(raw)


# --------------------------------------------------------------------------- planning (no Ray)


def test_groups_cover_main_method_and_baselines_per_epsilon() -> None:
    cfg = sweep(baselines=["dpsgd", "dpmix_self", "nonprivate"], space={"optim.lr": {"uniform": [0.5, 2]}, "mix.self_mix": {"int": [1, 3]}})
    groups = P.build_groups(cfg)
    assert [g.key for g in groups] == ["dpmix_self@eps=2", "dpmix_self@eps=8", "dpsgd@eps=2", "dpsgd@eps=8", "nonprivate"]
    dpsgd = groups[2]
    assert set(dpsgd.space) == {"optim.lr"}  # dpsgd fixes K=1, m=0: searching m is meaningless
    cfg_dpsgd = P.trial_config(cfg, dpsgd, {"optim.lr": 1.0}, seed=3)
    assert (cfg_dpsgd.method, cfg_dpsgd.mix.aug_multiplicity, cfg_dpsgd.mix.self_mix, cfg_dpsgd.seed) == ("dpsgd", 1, 0, 3)
    assert cfg_dpsgd.privacy.epsilon == 2 and cfg_dpsgd.privacy.delta == 1e-4
    assert groups[4].epsilon is None and P.trial_config(cfg, groups[4], {}, 0).method == "nonprivate"


@pytest.mark.parametrize(
    ("over", "needle"),
    [
        ({"space": {"privacy.epsilon": {"uniform": [1, 2]}}}, "space.privacy.epsilon"),
        ({"base": TINY_BASE | {"method": "nonprivate"}}, "base.method"),
        ({"tuning_privacy": "repeat_and_select", "search__sampler": "tpe"}, "search.sampler"),
        ({"tuning_privacy": "repeat_and_select", "search__scheduler": "asha"}, "search.scheduler"),
        ({"tuning_privacy": "repeat_and_select", "space": {"optim.batch_size": {"choice": [32, 64]}}}, "space.optim.batch_size"),
        ({"search__trials_shape": 1.0}, "search.trials_shape"),
        ({"baselines": ["dpmix_diff"]}, "baselines"),
        ({"epsilons": [2, 2]}, "epsilons"),
        ({"space": {"optim.lr": {"choice": [[1, 2]]}}}, "choice values"),
    ],
)
def test_sweep_level_refusals_are_one_line(over: dict[str, Any], needle: str) -> None:
    with pytest.raises(ConfigError) as e:
        P.check_sweep(sweep(**over))
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_space_translates_to_optuna_distributions() -> None:
    d = P.optuna_distributions({
        "optim.lr": {"loguniform": [0.1, 4]}, "privacy.clip_norm": {"uniform": [0.5, 2]},
        "mix.self_mix": {"int": [1, 4]}, "optim.lr_schedule": {"choice": ["constant", "cosine"]},
    })
    assert d["optim.lr"] == optuna.distributions.FloatDistribution(0.1, 4, log=True)
    assert d["privacy.clip_norm"] == optuna.distributions.FloatDistribution(0.5, 2)
    assert d["mix.self_mix"] == optuna.distributions.IntDistribution(1, 4)
    assert d["optim.lr_schedule"] == optuna.distributions.CategoricalDistribution(["constant", "cosine"])


def test_impossible_sampled_combination_is_a_config_error() -> None:
    cfg = sweep(space={"mix.aug_multiplicity": {"int": [1, 3]}})
    with pytest.raises(ConfigError, match="aug_multiplicity"):
        P.trial_config(cfg, P.build_groups(cfg)[0], {"mix.aug_multiplicity": 1}, 0)


@pytest.mark.parametrize("shape", [math.inf, 1.0, 0.5, 0.0])
def test_trial_count_distribution_has_the_accounted_mean(shape: float) -> None:
    rng = np.random.default_rng(0)
    draws = np.array([P.draw_trial_count(6.0, shape, rng) for _ in range(4000)])
    assert abs(draws.mean() - 6.0) < 0.35
    if not math.isinf(shape):
        assert draws.min() >= 1  # truncated: at least one trial


def test_counts_are_fixed_for_per_trial_and_random_for_repeat_and_select() -> None:
    cfg = sweep()
    assert P.trial_counts(cfg, P.build_groups(cfg), np.random.default_rng(0)) == {"dpmix_self@eps=2": 2, "dpmix_self@eps=8": 2}
    nothing = sweep(space={})
    assert set(P.trial_counts(nothing, P.build_groups(nothing), np.random.default_rng(0)).values()) == {1}
    rs = sweep(tuning_privacy="repeat_and_select", search__trials_per_epsilon=5)
    counts = [P.trial_counts(rs, P.build_groups(rs), np.random.default_rng(s))["dpmix_self@eps=2"] for s in range(50)]
    assert len(set(counts)) > 3


def test_repeat_and_select_plans_each_group_once_and_meets_its_epsilon() -> None:
    cfg = sweep(tuning_privacy="repeat_and_select", search__trials_per_epsilon=4, search__trials_shape=1.0, baselines=["nonprivate"])
    groups = P.build_groups(cfg)
    plans = B.plan_groups(cfg, groups, n_train=1000)
    assert set(plans) == {"dpmix_self@eps=2", "dpmix_self@eps=8", "nonprivate"}
    for g in groups[:2]:
        plan = plans[g.key]
        q, steps = 32 / 1000, math.ceil(1000 / 32)
        assert (plan.run.sample_rate, plan.run.steps, plan.n_train) == (q, steps, 1000)
        assert plan.search_epsilon <= g.epsilon and plan.trial_epsilon < g.epsilon  # each trial spends less so the search meets ε
        recomputed = repeat_and_select_epsilon(noise_multiplier=plan.run.noise_multiplier, sample_rate=q, steps=steps, delta=1e-4, mean_trials=4, shape=1.0)
        assert recomputed == pytest.approx(plan.search_epsilon)
        assert plan.run.epsilon_spent == plan.trial_epsilon
    assert plans["nonprivate"].trial_epsilon is None and plans["nonprivate"].run.noise_multiplier == 0
    assert B.plan_groups(sweep(), groups, n_train=1000) == {}  # per_trial: planned per suggested config


def test_plans_survive_the_sweep_state_round_trip(tmp_path: Path) -> None:
    cfg = sweep(tuning_privacy="repeat_and_select", baselines=["nonprivate"])
    plans = B.plan_groups(cfg, P.build_groups(cfg), n_train=1000)
    S.write_state(tmp_path, S.SweepState(name="t", config_hash="h", counts={}, storage_path="x", n_train=1000,
                                         plans={k: p.as_dict() for k, p in plans.items()}))
    stored = S.read_state(tmp_path).plans
    assert {k: B.TrialPlan.from_dict(v) for k, v in stored.items()} == plans  # nonprivate's ε=∞ included


def test_a_derived_lr_follows_the_sigma_the_trial_really_runs() -> None:
    from dpmix_ray import recipe

    rs = sweep(tuning_privacy="repeat_and_select", base=TINY_BASE | {"optim": TINY_BASE["optim"] | {"lr": None}})
    group = P.build_groups(rs)[0]
    group_plan = B.plan_groups(rs, [group], n_train=1000)[group.key]
    train, _ = B.resolve_trial(rs, group, {}, 0, group_plan)
    tuning = recipe.lr_for(recipe.TAU, noise_multiplier=group_plan.run.noise_multiplier, batch_size=train.optim.batch_size,
                           steps=group_plan.run.steps, clip_norm=train.privacy.clip_norm)
    assert train.optim.lr == pytest.approx(tuning)  # τ = 0.1 at the group's (larger) tuning σ, not a one-run σ
    one_run = plan_run(train, 1000).noise_multiplier
    assert one_run < group_plan.run.noise_multiplier and train.optim.lr < tuning * group_plan.run.noise_multiplier / one_run


def test_trial_specs_carry_the_driver_plan_or_the_refusal() -> None:
    rs = sweep(tuning_privacy="repeat_and_select", search__trials_per_epsilon=3)
    group = P.build_groups(rs)[0]
    group_plan = B.plan_groups(rs, [group], n_train=1000)[group.key]
    specs = [B.trial_spec(rs, group, phase="search", index=i, params={"optim.lr": lr}, group_plan=group_plan, synthetic=None)
             for i, lr in enumerate((0.5, 3.0))]
    assert [B.TrialPlan.from_dict(s["plan"]) for s in specs] == [group_plan, group_plan]  # one mechanism for the whole group
    assert specs[1]["train"]["optim"]["lr"] == 3.0 and specs[1]["refused"] is None
    assert specs[1]["seed"] == specs[1]["train"]["seed"] and specs[1]["seed"] != rs.base.seed + 1  # secret under repeat_and_select

    per_trial = sweep(space={"optim.batch_size": {"choice": [16, 64]}})
    g = P.build_groups(per_trial)[0]
    small, large = (B.trial_spec(per_trial, g, phase="search", index=0, params={"optim.batch_size": b}, group_plan=None, synthetic=None)
                    for b in (16, 64))
    n = B.training_size(per_trial.base.data)
    assert small["plan"]["n_train"] == n and small["plan"]["run"]["sample_rate"] == pytest.approx(16 / n)
    assert large["plan"]["run"]["sample_rate"] == pytest.approx(64 / n) and small["plan"]["trial_epsilon"] == 2

    bad = B.trial_spec(per_trial, g, phase="search", index=0, params={"mix.aug_multiplicity": 1}, group_plan=None, synthetic=None)
    assert bad["plan"] is None and "aug_multiplicity" in bad["refused"]
    too_big = B.trial_spec(per_trial, g, phase="search", index=0, params={"optim.batch_size": 10**6}, group_plan=None, synthetic=None)
    assert too_big["plan"] is None and "batch_size" in too_big["refused"]


def test_per_trial_planning_calibrates_once_per_privacy_relevant_config(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[int] = []
    monkeypatch.setattr(B, "_ONE_RUN_PLANS", {})
    monkeypatch.setattr(B, "plan_run", lambda cfg, n: calls.append(cfg.optim.batch_size) or plan_run(cfg, n))
    cfg = sweep(space={"optim.lr": {"loguniform": [0.5, 4.0]}, "optim.batch_size": {"choice": [16, 32]}})
    g = P.build_groups(cfg)[0]
    specs = [B.trial_spec(cfg, g, phase="search", index=i, params={"optim.lr": lr, "optim.batch_size": b}, group_plan=None, synthetic=None)
             for i, (lr, b) in enumerate([(1.0, 16), (2.0, 16), (3.0, 32), (1.0, 32)])]
    assert calls == [16, 32] and specs[0]["plan"] == specs[1]["plan"] != specs[2]["plan"]


def test_infeasible_repeat_and_select_budget_is_refused_before_ray_starts(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import ray

    from dpmix_ray.cli import main
    from dpmix_ray.sweep import run_sweep

    cfg = sweep(tuning_privacy="repeat_and_select", epsilons=[0.005], search__trials_per_epsilon=20)
    with pytest.raises(BudgetError) as e:
        run_sweep(cfg, out=tmp_path / "o", progress=False)
    assert "\n" not in str(e.value)
    yaml_path = tmp_path / "s.yaml"
    yaml_path.write_text(json.dumps(cfg.model_dump(mode="json")))  # JSON is YAML
    assert main(["sweep", str(yaml_path), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "error:" in err and "ε" in err
    assert not (tmp_path / "o").exists() and not ray.is_initialized()


def test_within_budget_check_survives_python_O() -> None:
    B.check_within_budget({"trial_epsilon": 2.0, "epsilon_spent": 1.99})
    with pytest.raises(BudgetError):
        B.check_within_budget({"trial_epsilon": 2.0, "epsilon_spent": 2.01})
    with pytest.raises(BudgetError):
        B.check_within_budget({"epsilon": 2.0, "search_epsilon": 2.5})
    code = "from dpmix_ray.sweep.budget import check_within_budget as c; c({'trial_epsilon': 2.0, 'epsilon_spent': 2.01})"
    done = subprocess.run([sys.executable, "-O", "-c", code], capture_output=True, text=True, env=os.environ | {"PYTHONPATH": str(Path(__file__).parents[1])})
    assert done.returncode != 0 and "BudgetError" in done.stderr


def test_trial_keeps_only_the_documented_result_keys() -> None:
    from dpmix_ray.sweep.trial import RESULT_KEYS, result_fields

    kept = result_fields({"val_accuracy": 0.9, "test_accuracy": 0.8, "noise_seed": 1234, "sampler_state": b"x"})
    assert set(kept) == set(RESULT_KEYS) and kept["test_accuracy"] == 0.8 and 1234 not in kept.values()


# --------------------------------------------------------------------------- out dir and ledger


def test_out_dir_identity_and_resume_checks(tmp_path: Path) -> None:
    cfg = sweep()
    assert S.check_out_dir(tmp_path, cfg, resume=False) is None
    with pytest.raises(ConfigError, match="no sweep to resume"):
        S.check_out_dir(tmp_path, cfg, resume=True)
    S.write_state(tmp_path, S.SweepState(name="t", config_hash=config_hash(cfg), counts={}, storage_path=str(tmp_path), n_train=300))
    with pytest.raises(ConfigError, match="--resume"):
        S.check_out_dir(tmp_path, cfg, resume=False)
    assert S.check_out_dir(tmp_path, cfg, resume=True) is not None
    with pytest.raises(ConfigError, match="config hash") as e:
        S.check_out_dir(tmp_path, sweep(epsilons=[1, 8]), resume=True)
    assert "\n" not in str(e.value)


def test_shared_storage_mirrors_this_layout() -> None:
    from dpmix_ray import storage

    assert (storage.TUNE_DIR, storage.STATE_FILE) == (S.TUNE_DIR, S.STATE_FILE)


def test_ledger_keeps_last_record_per_slot_and_selection_reads_the_score(tmp_path: Path) -> None:
    def rec(index: int, score: float | None, status: str = "completed", phase: str = "search", val: float | None = None,
            test: float | None = None) -> dict[str, Any]:
        return {"group": "g", "phase": phase, "index": index, "status": status, "score": score, "val_accuracy": val, "test_accuracy": test}

    for r in [rec(0, 0.5), rec(1, 0.9, "stopped"), rec(2, 0.7, val=0.6), rec(0, 0.7, val=0.99), rec(3, None, "pruned"),
              rec(0, 0.2, phase="final", test=0.99)]:
        S.append_record(tmp_path, r)
    with S.path(tmp_path, S.LEDGER_FILE).open("a") as f:
        f.write('{"group": "g", "phase": "sea')  # torn by a kill
    records = S.read_records(tmp_path)
    assert len(records) == 5
    best = selection.best(records)
    assert best is not None and best["index"] == 0 and best["score"] == 0.7  # tie → earlier; stopped, end-of-run val and test ignored
    assert S.sweep_complete(records, {"g": 4}, {"g": 1}) and not S.sweep_complete(records, {"g": 5}, {"g": 1})
    assert not S.sweep_complete(records, {"g": 4}, {"g": 2})


def test_selection_score_is_the_last_quarter_mean_of_validation() -> None:
    history = [(10, 0.5), (20, 0.6), (30, 0.7), (40, 0.9), (50, 0.8)]
    assert selection.score(history, 50) == pytest.approx(0.85)  # steps 40 and 50 are past 75 % of 50
    assert selection.score([(10, 0.5), (100, 0.8)], 100) == 0.8  # at least the final report
    assert selection.score([], 100) is None


def test_a_proxy_winner_is_released_through_its_first_full_size_final() -> None:
    search = [{"phase": "search", "index": i, "status": "completed", "score": s, "proxy": True} for i, s in enumerate((0.8, 0.9))]
    finals = [{"phase": "final", "index": i, "status": st, "score": 0.5} for i, st in ((1, "completed"), (0, "failed"), (2, "completed"))]
    assert selection.best(search + finals)["index"] == 1
    assert selection.released(search) is None  # a proxy is never released; no final yet
    assert selection.released(search + finals) == finals[0]  # the first completed final (index 1: index 0 failed)
    full = [r | {"proxy": False} for r in search]
    assert selection.released(full + finals) is full[1]  # a full-size winner is released itself


# --------------------------------------------------------------------------- grouped searcher (Ray imported, no cluster)


def finished(spec: dict[str, Any], score: float | None, status: str = "completed") -> dict[str, Any]:
    """The last report a trial issued as ``spec`` sends (its typed outcome), as Tune hands it to the searcher."""
    from ray.tune.utils import flatten_dict

    from dpmix_ray.sweep.outcome import Outcome

    record = B.identity(spec) | {"status": status, "val_accuracy": score, "score": score if status == "completed" else None}
    return flatten_dict(Outcome.of_record(record).as_result())  # Tune flattens what searchers see


def test_grouped_searcher_round_robin_finals_and_restore(tmp_path: Path) -> None:
    from dpmix_ray.sweep.search import GroupedSearcher

    cfg = sweep(final__seeds=2, search__transfer=False)
    groups = P.build_groups(cfg)
    db = tmp_path / "optuna.db"
    counts = {"dpmix_self@eps=2": 2, "dpmix_self@eps=8": 1}
    s = GroupedSearcher(cfg, groups, counts, db, plans={}, synthetic=None, n_train=240)
    a, b, c = s.suggest("a"), s.suggest("b"), s.suggest("c")
    assert [x["group"] for x in (a, b, c)] == ["dpmix_self@eps=2", "dpmix_self@eps=8", "dpmix_self@eps=2"]
    assert a["params"] == b["params"] == {"optim.lr": 1.0} != c["params"]  # warm start: the base recipe first, then sampled
    assert s.suggest("d") is None  # searches issued, none finished: no finals yet
    s.on_trial_result("a", {"val_accuracy": 0.3, "training_iteration": 1})
    s.on_trial_complete("a", finished(a, 0.4))
    s.on_trial_complete("c", finished(c, None, "pruned"))
    final = s.suggest("e")
    assert final["phase"] == "final" and final["params"] == a["params"] and final["seed"] != a["seed"]
    assert final["plan"]["trial_epsilon"] == 2 and final["train"]["seed"] == final["seed"]  # planned here, in the driver
    s.save(str(tmp_path / "ckpt.pkl"))

    # A kill after Optuna handed out a trial that Tune's last snapshot never saw:
    s.suggest("lost")  # the second eps=2 final (no study involved) ...
    orphan = optuna.load_study(study_name="dpmix_self@eps=8", storage=f"sqlite:///{db}").ask()  # ... and an orphan
    restored = GroupedSearcher(cfg, groups, counts, db, plans={}, synthetic=None, n_train=240)
    restored.restore(str(tmp_path / "ckpt.pkl"))
    states = {t.number: t.state for t in optuna.load_study(study_name="dpmix_self@eps=8", storage=f"sqlite:///{db}").trials}
    assert states[orphan.number] == optuna.trial.TrialState.FAIL
    again = restored.suggest("f")
    assert (again["phase"], again["index"]) == ("final", 1)  # the lost slot is issued again, same index
    restored.on_trial_complete("b", finished(b, None, "failed"))
    restored.on_trial_complete("e", finished(final, 0.5))
    restored.on_trial_complete("f", finished(again, 0.5))
    assert restored.suggest("g") == "FINISHED"  # eps=8 had no completed trial: no finals for it
    eps2 = {t.number: t.state for t in optuna.load_study(study_name="dpmix_self@eps=2", storage=f"sqlite:///{db}").trials}
    assert sorted(s.name for s in eps2.values()) == ["COMPLETE", "PRUNED"]


def test_repeat_and_select_searcher_launches_every_trial_with_the_stored_group_plan(tmp_path: Path) -> None:
    from dpmix_ray.sweep.search import GroupedSearcher

    cfg = sweep(tuning_privacy="repeat_and_select", epsilons=[2])
    groups = P.build_groups(cfg)
    stored = {k: B.TrialPlan.from_dict(p.as_dict()) for k, p in B.plan_groups(cfg, groups, n_train=240).items()}
    s = GroupedSearcher(cfg, groups, {"dpmix_self@eps=2": 3}, tmp_path / "optuna.db", plans=stored, synthetic=None, n_train=240)
    issued = [s.suggest(t) for t in "abc"]
    assert {json.dumps(c["plan"], sort_keys=True) for c in issued} == {json.dumps(stored["dpmix_self@eps=2"].as_dict(), sort_keys=True)}
    assert len({c["params"]["optim.lr"] for c in issued}) == 3


def test_bad_input_starts_nothing(tmp_path: Path) -> None:
    import ray

    from dpmix_ray.sweep import run_sweep

    with pytest.raises(ConfigError, match="resources") as e:
        run_sweep(sweep(resources={"cpu": 4096}), out=tmp_path / "o", progress=False)
    assert "\n" not in str(e.value)
    with pytest.raises(ConfigError, match="search.sampler"):
        run_sweep(sweep(tuning_privacy="repeat_and_select", search__sampler="tpe"), out=tmp_path / "o", progress=False)
    assert not (tmp_path / "o").exists() and not ray.is_initialized()


# --------------------------------------------------------------------------- end to end on a local Ray cluster


@pytest.fixture(scope="module")
def local_ray() -> Any:
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()


def _ledger_lines(out: Path) -> list[dict[str, Any]]:
    p = S.path(out, S.LEDGER_FILE)
    return [json.loads(line) for line in p.read_text().splitlines()] if p.is_file() else []


@pytest.mark.slow
def test_two_epsilon_sweep_end_to_end_with_failed_and_pruned_trials(tmp_path: Path, local_ray: str) -> None:
    from dpmix_ray.report import build_report
    from dpmix_ray.sweep import run_sweep

    # lr 1e30 diverges at once; K=1 with a self-mixup is impossible (pruned before any step). The seeded
    # random samplers draw, over the 2 × 2 trials (no seeds before them): pruned + completed at ε=2, completed + failed at ε=8.
    space = {"optim.lr": {"choice": [1.0, 1.0e30]}, "mix.aug_multiplicity": {"int": [1, 2]}}
    out = run_sweep(sweep(space=space, search__seed=5, search__warm_start=False, search__transfer=False), out=tmp_path / "out", progress=False)
    records = S.read_records(out)
    search = {(r["group"], r["index"]): r for r in records if r["phase"] == "search"}
    assert len(search) == 4
    statuses = sorted(r["status"] for r in search.values())
    assert statuses == ["completed", "completed", "failed", "pruned"]
    failed = [r for r in search.values() if r["status"] == "failed"]
    assert all("diverged" in r["reason"] for r in failed)
    pruned = [r for r in search.values() if r["status"] == "pruned"]
    assert all("aug_multiplicity" in r["reason"] and r["trial_seconds"] < 30 for r in pruned)
    for r in records:
        if r["status"] == "completed":
            assert r["epsilon_spent"] <= r["epsilon"]  # every trial reports ε_spent, within its ε
    for name in (f"{S.RELEASE_TABLE}.csv", f"{S.RELEASE_TABLE}.json", f"{S.RELEASE_TABLE}.md", S.RELEASE_PLOT, S.TRIALS_TABLE,
                 S.CURATOR_REPORT, S.OPTUNA_FILE, S.released_model_name("dpmix_self@eps=2"), S.released_model_name("dpmix_self@eps=8")):
        assert S.path(out, name).is_file(), name
    db = f"sqlite:///{S.path(out, S.OPTUNA_FILE)}"
    studies = optuna.get_all_study_summaries(db)
    assert sorted(s.study_name for s in studies) == ["dpmix_self@eps=2", "dpmix_self@eps=8"]
    states = sorted(t.state.name for s in studies for t in optuna.load_study(study_name=s.study_name, storage=db).trials)
    assert states == ["COMPLETE", "COMPLETE", "FAIL", "PRUNED"]
    assert all(len(S.list_files(out, S.model_dir(g))) == 1 for g in ("dpmix_self@eps=2", "dpmix_self@eps=8"))  # the best only
    S.remove(out, S.CURATOR_REPORT)
    build_report(out)  # `dpmix-ray report DIR` rebuilds from the ledger alone
    assert "ONE training run" in S.read_text(out, S.CURATOR_REPORT)


@pytest.mark.slow
def test_repeat_and_select_releases_the_selected_trials_own_model_and_numbers(tmp_path: Path, local_ray: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A real repeat_and_select sweep: every released number is the selected search trial's own, computed from the released
    model, and every trial ran the one plan made before Ray started; the final re-run stays with the curator."""
    import torch

    import dpmix_ray.sweep.driver as D
    from dpmix_ray.data import load_splits
    from dpmix_ray.models import build_model
    from dpmix_ray.sweep import run_sweep

    # K ≥ 2 so that there is a selection (the draw of K itself is tested without Ray, above).
    monkeypatch.setattr(D, "trial_counts", lambda cfg, groups, rng: {g.key: 3 for g in groups})
    cfg = sweep(tuning_privacy="repeat_and_select", epsilons=[4], space={"optim.lr": {"loguniform": [0.05, 2.0]}}, final__seeds=1)
    out = run_sweep(cfg, out=tmp_path / "out", progress=False)

    state = S.read_state(out)
    plan = B.TrialPlan.from_dict(state.plans["dpmix_self@eps=4"])
    assert plan.search_epsilon <= 4 and plan.trial_epsilon < 4 and plan.n_train == state.n_train
    records = S.read_records(out)
    assert [r["phase"] for r in records] == ["search"] * 3 + ["final"] and all(r["status"] == "completed" for r in records)
    for r in records:  # one mechanism, planned once in the driver, for every trial
        assert (r["noise_multiplier"], r["steps"], r["sample_rate"]) == (plan.run.noise_multiplier, plan.run.steps, plan.run.sample_rate)
        assert r["trial_epsilon"] == plan.trial_epsilon and r["search_epsilon"] == plan.search_epsilon
        assert r["test_accuracy"] is not None  # search trials evaluate test too ...
    best = selection.best(records)  # ... but selection reads validation figures only

    doc = json.loads(S.read_text(out, f"{S.RELEASE_TABLE}.json"))
    [row] = doc["rows"]
    assert (row["val_accuracy"], row["test_accuracy"], row["hyperparameters"]) == (best["val_accuracy"], best["test_accuracy"], best["params"])
    assert row["search_epsilon"] == plan.search_epsilon <= row["epsilon"] and "whole random search" in row["guarantee"]
    assert not {"rerun_test_mean", "reruns", "trials_planned", "best_trial"} & set(row)  # the re-run is not covered: curator only
    assert "re-runs: test mean" not in S.read_text(out, f"{S.RELEASE_TABLE}.md")

    released = torch.load(S.path(out, f"{S.RELEASE}/{row['model']}"), weights_only=True)
    assert released["guarantee"] == row["guarantee"] and released["private"]
    train_cfg = SweepConfig.model_validate(cfg.model_dump()).base
    splits = load_splits(train_cfg.data)
    model = build_model(train_cfg.model, in_channels=splits.channels, num_classes=splits.num_classes, image_size=splits.image_size)
    model.load_state_dict(released["state_dict"])
    model.eval()
    with torch.no_grad():
        assert [int((model(d.x).argmax(1) == d.y).sum()) / len(d) for d in (splits.val, splits.test)] == [row["val_accuracy"], row["test_accuracy"]]
    assert {p.name for p in out.iterdir()} == {S.RELEASE, S.CURATOR}
    assert set(released) == {"state_dict", "guarantee", "private", "epsilon", "delta", "release_epsilon", "release_guarantee", "config"}
    assert "seed" not in json.loads(released["config"])  # repeat_and_select: the winner's seed would reveal its index
    # Each finished trial's checkpoint: its ledger record and (search trials) its weights, nothing the trainer did not document.
    checkpoints = [torch.load(p, weights_only=False) for p in S.path(out, S.TUNE_DIR).rglob("state.pt")]
    assert len(checkpoints) == 4 and all(set(c) == {"record", "seconds"} for c in checkpoints)
    assert not [p for p in S.path(out, S.RELEASE).rglob("*") if p.suffix in (".jsonl", ".db", ".parquet", ".html")]

    def no_replanning(*_: Any) -> None:
        pytest.fail("re-planned on resume")

    monkeypatch.setattr(D, "plan_groups", no_replanning)
    monkeypatch.setattr(D, "training_size", no_replanning)
    run_sweep(cfg, out=out, resume=True, progress=False)  # the stored plans, never new ones
    assert S.read_state(out).plans == state.plans


SUBPROCESS = """
import sys
from dpmix_ray.config import SweepConfig
from dpmix_ray.sweep import run_sweep
cfg = SweepConfig.model_validate_json(sys.argv[1])
run_sweep(cfg, out=sys.argv[2], address=sys.argv[3], progress=False)
"""


@pytest.mark.slow
@pytest.mark.parametrize("search", ["plain", "proxies"])
def test_resume_after_kill_loses_nothing_and_runs_nothing_twice(tmp_path: Path, local_ray: str, search: str) -> None:
    """Killed mid-sweep and resumed: every slot runs once. With proxies (and the default seeds and transfer across ε, in τ
    coordinates), search trials stay labelled proxies at their own ε, finals run at full size, no Optuna point repeats."""
    from dpmix_ray.sweep import run_sweep

    over: dict[str, Any] = {} if search == "plain" else {
        "space": {"dp.tau": {"loguniform": [0.05, 0.2]}, "dp.steps": {"int": [10, 20]}},
        "search__proxy": {"batch_size": 16}, "search__sampler": "tpe",
    }
    cfg = sweep(base=TINY_BASE | {"optim": {"batch_size": 32, "epochs": 2, "lr": 1.0}}, **over)
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-c", SUBPROCESS, cfg.model_dump_json(), str(out), local_ray], start_new_session=True)
    deadline = time.time() + 300  # generous: a loaded 2-core machine starts Ray workers slowly
    while time.time() < deadline and not _ledger_lines(out):
        time.sleep(0.5)
    os.killpg(proc.pid, signal.SIGKILL)  # the driver dies mid-sweep: no clean shutdown at all
    proc.wait()
    done_before = {(r["group"], r["phase"], r["index"]): r["trial_id"] for r in _ledger_lines(out)}
    assert done_before and not S.sweep_complete(S.read_records(out), S.read_state(out).counts, dict.fromkeys(S.read_state(out).counts, 1))

    with pytest.raises(ConfigError, match="config hash"):
        run_sweep(sweep(epsilons=[1, 8]), out=out, resume=True, progress=False)
    run_sweep(cfg, out=out, resume=True, progress=False)

    lines = _ledger_lines(out)
    state = S.read_state(out)
    records = S.read_records(out)
    assert state.finished and state.resumes == 1 and S.sweep_complete(records, state.counts, dict.fromkeys(state.counts, 1))
    for slot, trial_id in done_before.items():  # finished before the kill: never trained again
        again = [r for r in lines if (r["group"], r["phase"], r["index"]) == slot]
        assert {r["trial_id"] for r in again} == {trial_id}
        assert all(r["trial_seconds"] == again[0]["trial_seconds"] for r in again)
    assert len(records) == sum(state.counts.values()) + sum(1 for c in state.counts.values() if c)  # + 1 final each
    db = f"sqlite:///{S.path(out, S.OPTUNA_FILE)}"
    studies = [optuna.load_study(study_name=s.study_name, storage=db) for s in optuna.get_all_study_summaries(db)]
    assert not [t for st in studies for t in st.trials if t.state.name == "RUNNING"]
    for st in studies:
        assert st.trials[0].system_attrs.get("fixed_params")  # each study's first point: the seeded default recipe
        ran = [json.dumps(t.params, sort_keys=True) for t in st.trials if t.state.name in ("COMPLETE", "PRUNED")]
        assert len(ran) == len(set(ran))  # no point trained twice
    if search == "proxies":
        for r in records:
            full = r["phase"] == "final"
            assert r["proxy"] is not full and r["config"]["optim"]["batch_size"] == (32 if full else 16)
            assert (r["trial_epsilon"] == r["epsilon"]) if full else (r["trial_epsilon"] > r["epsilon"] and r["epsilon_spent"] <= r["trial_epsilon"])
        assert all(t.user_attrs["proxy"] for st in studies for t in st.trials if t.state.name == "COMPLETE")


@pytest.mark.slow
def test_crashed_worker_is_retried_from_its_checkpoint(tmp_path: Path, local_ray: str) -> None:
    import threading

    from dpmix_ray.sweep import run_sweep

    cfg = sweep(epsilons=[4], space={}, final__seeds=0, base=TINY_BASE | {"optim": {"batch_size": 16, "epochs": 4, "lr": 1.0}})
    out = tmp_path / "out"
    runner = threading.Thread(target=run_sweep, args=(cfg,), kwargs={"out": out, "progress": False})
    runner.start()
    pid = None
    deadline = time.time() + 300  # generous: a loaded 2-core machine starts Ray workers slowly
    while pid is None and time.time() < deadline:
        for result in S.path(out, S.TUNE_DIR).glob("*/*/result.json"):
            lines = result.read_text().splitlines()
            if lines:
                pid = json.loads(lines[0])["pid"]
        time.sleep(0.2)
    assert pid is not None
    os.kill(pid, signal.SIGKILL)  # the trial's worker process dies after its first epoch
    runner.join(timeout=180)
    [record] = S.read_records(out)
    assert record["status"] == "completed" and record["retries"] == 1 and record["resumed_from_step"] > 0


def test_grouped_scheduler_compares_trials_within_one_epsilon_only() -> None:
    from types import SimpleNamespace

    from ray.tune.schedulers import TrialScheduler
    from ray.tune.utils import flatten_dict

    from dpmix_ray.sweep.outcome import Outcome, Status
    from dpmix_ray.sweep.search import GroupedScheduler

    sched = GroupedScheduler(grace=0.25)

    def trial(tid: str, group: str, phase: str = "search") -> Any:
        return SimpleNamespace(trial_id=tid, config={"group": group, "phase": phase})

    def epoch(t: Any, progress: float, val: float) -> str:
        return sched.on_trial_result(None, t, {"progress": progress, "val_accuracy": val})

    good8, bad8, lone1 = trial("a", "m@eps=8"), trial("b", "m@eps=8"), trial("c", "m@eps=1")
    final = trial("d", "m@eps=8", "final")
    for t in (good8, bad8, lone1, final):
        sched.on_trial_add(None, t)
    assert epoch(good8, 10, 0.95) == TrialScheduler.CONTINUE  # before the grace period (25 % of its steps)
    assert epoch(good8, 30, 0.9) == TrialScheduler.CONTINUE
    assert epoch(bad8, 20, 0.1) == TrialScheduler.CONTINUE  # not yet at the first rung
    assert epoch(bad8, 40, 0.1) == TrialScheduler.STOP  # worse than its own ε's rung
    assert epoch(lone1, 30, 0.05) == TrialScheduler.CONTINUE  # far worse, but alone at ε=1
    assert epoch(final, 30, 0.0) == TrialScheduler.CONTINUE  # final re-runs are never stopped
    last = trial("f", "m@eps=8")
    sched.on_trial_add(None, last)
    assert epoch(last, 100, 0.1) == TrialScheduler.CONTINUE  # worse, but at its last step: its outcome is kept
    refused = flatten_dict(Outcome(Status.PRUNED).as_result())
    assert sched.on_trial_result(None, trial("e", "m@eps=1"), refused) == TrialScheduler.CONTINUE
    sched.on_trial_complete(None, lone1, flatten_dict(Outcome(Status.FAILED).as_result()))


@pytest.mark.slow
def test_synthetic_set_is_generated_once_and_never_on_resume(tmp_path: Path, local_ray: str, monkeypatch: pytest.MonkeyPatch) -> None:
    import dpmix_ray.sweep.driver as D
    from dpmix_ray.sweep import run_sweep

    synth = {"model": "tiny-random", "images_per_class": 2, "image_size": 8, "channels": 1, "steps": 2, "batch_size": 4,
             "workers": 1, "out": str(tmp_path / "synth")}
    base = TINY_BASE | {"method": "dpmix_diff", "mix": {"aug_multiplicity": 2, "self_mix": 1, "diff_mix": 1, "synthetic": "synth"}, "synth": synth}
    cfg = sweep(base=base, epsilons=[4], search__trials_per_epsilon=1, final__seeds=0)
    out = run_sweep(cfg, out=tmp_path / "out", progress=False)
    state = S.read_state(out)
    assert state.synthetic == str(tmp_path / "synth")
    [record] = S.read_records(out)
    assert record["status"] == "completed" and record["config"]["mix"]["synthetic"] == state.synthetic

    monkeypatch.setattr(D, "_generate_synthetic", lambda _cfg: pytest.fail("regenerated on resume"))
    run_sweep(cfg, out=out, resume=True, progress=False)
    assert S.read_state(out).resumes == 1


@pytest.mark.slow
def test_ray_client_mode_runs_the_sweep_on_the_head_and_copies_outputs_back(tmp_path: Path, local_ray: str) -> None:
    """``--address ray://…`` minus the Ray Client transport (grpc is not installed here): the sweep runs in
    a task pinned to the head node and its outputs come back as bytes (here head and client share a disk)."""
    from dpmix_ray.sweep.driver import run_on_head

    cfg = sweep(epsilons=[8], space={}, final__seeds=0)
    out = run_on_head(cfg, out=tmp_path / "local", resume=False, address=local_ray, progress=False)
    assert out == tmp_path / "local"
    assert [r["status"] for r in S.read_records(out)] == ["completed"]
    assert S.path(out, S.CURATOR_REPORT).is_file() and S.path(out, f"{S.RELEASE_TABLE}.json").is_file()
    with pytest.raises(ConfigError, match="already holds"):  # the head's copy is the sweep's identity
        run_on_head(cfg, out=tmp_path / "local", resume=False, address=local_ray, progress=False)


@pytest.mark.slow
def test_a_sweep_under_search_budget_spends_080_to_110_of_it(tmp_path: Path, local_ray: str) -> None:
    """search.budget end to end: the throughput probe plans the trial count, the searcher hands out trials while
    they fit (calibrated by those that ended), and the sweep's summed trial seconds land within 0.8–1.1× the budget."""
    from dpmix_ray.sweep import estimate as E
    from dpmix_ray.sweep import run_sweep

    cfg = sweep(search__budget={"cpu_hours": 0.025}, search__trials_per_epsilon=2)  # 90 trial seconds at 1 CPU a trial
    out = run_sweep(cfg, out=tmp_path / "out", progress=False)
    state, records = S.read_state(out), S.read_records(out)
    assert state.finished and state.compute is not None and state.compute["budget_seconds"] == pytest.approx(90.0)
    used = E.spent(cfg, records, S.read_audits(out))
    assert 0.8 <= used["trial_seconds"] / 90.0 <= 1.1, (used, [(r["phase"], r["trial_seconds"]) for r in records])
    assert sum(r["phase"] == "final" and r["status"] == "completed" for r in records) == 2  # every final ran within it
    assert sum(r["phase"] == "search" for r in records) == sum(state.counts.values())
    assert "Curator only: compute" in S.read_text(out, S.CURATOR_REPORT)


def test_a_restored_checkpoint_without_state_starts_the_trial_afresh(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A kill between Tune deleting a superseded checkpoint and its next snapshot restores a checkpoint with no state:
    the trial starts again (weights and all) instead of failing; a checkpoint with state resumes from it."""
    from ray import tune

    from dpmix_ray.sweep import trial as T

    empty = tmp_path / "empty"
    empty.mkdir()
    monkeypatch.setattr(T.tune, "get_checkpoint", lambda: tune.Checkpoint.from_directory(str(empty)))
    assert T._load_checkpoint() is None
    monkeypatch.setattr(T.tune, "get_checkpoint", lambda: tune.Checkpoint.from_directory(str(tmp_path / "gone")))
    assert T._load_checkpoint() is None
    full = tmp_path / "full"
    full.mkdir()
    import torch

    torch.save({"seconds": 1.0}, full / T.STATE_FILE)
    monkeypatch.setattr(T.tune, "get_checkpoint", lambda: tune.Checkpoint.from_directory(str(full)))
    assert T._load_checkpoint() == {T.STATE_FILE: {"seconds": 1.0}}
