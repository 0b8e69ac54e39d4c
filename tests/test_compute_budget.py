"""search.budget: the arithmetic that fits a sweep to a compute budget (pure), and its config refusals."""

import json

import pytest

from dpmix_ray.config import SweepConfig
from dpmix_ray.errors import ConfigError
from dpmix_ray.sweep import estimate as E
from test_cli import assert_one_line_error, run


def sweep(**search) -> SweepConfig:
    return SweepConfig.model_validate({"space": {"dp.tau": {"loguniform": [0.05, 0.2]}}, "resources": {"cpu": 2},
                                       "search": search, "baselines": ["nonprivate"]})


def test_budget_in_trial_seconds():
    assert E.budget_trial_seconds(sweep()) is None
    assert E.budget_trial_seconds(sweep(budget={"cpu_hours": 2})) == pytest.approx(3600)  # 2 CPU h ÷ 2 CPUs a trial
    gpu = SweepConfig.model_validate({"search": {"budget": {"gpu_hours": 8}}, "resources": {"cpu": 4, "gpu": 0.5}})
    assert E.budget_trial_seconds(gpu) == pytest.approx(8 * 3600 / 0.5)


def test_trials_for_budget():
    # 4 searched groups at 10 s a trial = 40 s a round; finals take 100 s whatever the count
    assert E.trials_for_budget(500, search_seconds=40, fixed_seconds=100) == 10
    assert E.trials_for_budget(539, search_seconds=40, fixed_seconds=100) == 10
    assert E.trials_for_budget(540, search_seconds=40, fixed_seconds=100) == 11
    with pytest.raises(ConfigError, match="search.budget"):
        E.trials_for_budget(120, search_seconds=40, fixed_seconds=100)


def test_would_overrun():
    assert not E.would_overrun(100, spent=50, committed=50)
    assert E.would_overrun(100, spent=50, committed=50.1)


def test_plan_budget_uses_080_to_110_of_it():
    e = {"groups": [
        {"group": "a@1", "searches": True, "search_trials": 24, "final_runs": 3, "audits": 0, "search": {"seconds": 10.0}, "final": {"seconds": 40.0}},
        {"group": "a@2", "searches": True, "search_trials": 24, "final_runs": 3, "audits": 0, "search": {"seconds": 10.0}, "final": {"seconds": 40.0}},
        {"group": "nonprivate", "searches": False, "search_trials": 1, "final_runs": 0, "audits": 0, "search": {"seconds": 30.0}, "final": {"seconds": 30.0}},
    ]}
    cfg = sweep(budget={"cpu_hours": 0.5})  # 900 trial seconds at 2 CPUs a trial
    plan = E.plan_budget(cfg, e)
    assert plan["trials_per_epsilon"] == (900 - 240 - 30) // 20
    assert 0.8 <= plan["estimated_seconds"] / plan["budget_seconds"] <= 1.1
    assert plan["estimated_cpu_hours"] == pytest.approx(plan["estimated_seconds"] * 2 / 3600)
    assert E.with_trials(cfg, 7).search.trials_per_epsilon == 7 and cfg.search.trials_per_epsilon == 24


@pytest.mark.parametrize("budget, pattern", [
    ("{tpu_hours: 2}", "search.budget.tpu_hours: unknown key"),
    ("{cpu_hours: 2, gpu_hours: 1}", "exactly one of cpu_hours or gpu_hours"),
    ("{gpu_hours: 2}", "trials hold no GPU"),
    ("{cpu_hours: -1}", "cpu_hours"),
])
def test_bad_budget_is_one_line_exit_2(tmp_path, budget, pattern):
    (tmp_path / "s.yaml").write_text(f"search: {{budget: {budget}}}\n")
    before = set(tmp_path.iterdir())
    assert_one_line_error(run("sweep", str(tmp_path / "s.yaml"), "--dry-run", cwd=tmp_path), pattern)
    assert set(tmp_path.iterdir()) == before


def _run_sequentially(tmp_path, monkeypatch, *, speed: float, planned: int) -> tuple[list[dict], float, dict]:
    """Drive the searcher as one trial slot would, each trial taking ``speed`` × the probe's estimate; returns the
    issued specs, the seconds spent and the compute plan."""
    from ray.tune.utils import flatten_dict

    from dpmix_ray.sweep import budget as B
    from dpmix_ray.sweep import plan as P
    from dpmix_ray.sweep.outcome import Outcome
    from dpmix_ray.sweep.search import GroupedSearcher

    monkeypatch.setattr(B, "training_size", lambda data: 1000)
    cfg = SweepConfig.model_validate({
        "base": {"data": {"name": "digits", "limit": 1000}, "model": {"name": "cnn_tiny"}, "mix": {"aug_multiplicity": 2, "self_mix": 1},
                 "optim": {"batch_size": 256, "epochs": 4, "lr": 1.0}, "device": "cpu"},
        "epsilons": [2, 8], "delta": 1e-4, "space": {"optim.lr": {"loguniform": [0.5, 2.0]}}, "final": {"seeds": 2},
        "search": {"sampler": "random", "trials_per_epsilon": planned, "seed": 0}})
    groups = P.build_groups(cfg)
    probe = {"search": {g.key: 10.0 for g in groups}, "final": {g.key: 30.0 for g in groups}}
    budget = planned * 2 * 10.0 + 2 * 2 * 30.0  # the plan's count fits it exactly at the probe's speed
    compute = {"budget_seconds": budget, "trials_per_epsilon": planned, **probe}
    s = GroupedSearcher(cfg, groups, {g.key: planned for g in groups}, tmp_path / "o.db", plans={}, synthetic=None, n_train=1000,
                        compute=compute, stops=tmp_path / "stops.json")
    specs, spent = [], 0.0
    for i in range(200):
        spec = s.suggest(f"t{i}")
        if not isinstance(spec, dict):
            break
        took = speed * probe[spec["phase"]][spec["group"]]
        spent += took
        record = B.identity(spec) | {"status": "completed", "score": 0.5, "val_accuracy": 0.5, "trial_seconds": took}
        s.on_trial_complete(f"t{i}", flatten_dict(Outcome.of_record(record).as_result()))
        specs.append(spec)
    return specs, spent, compute


@pytest.mark.parametrize("speed", [0.5, 1.0, 1.3])
def test_searcher_fills_but_never_overruns_the_budget(tmp_path, monkeypatch, speed):
    """Trials faster than the probe said: more search trials than planned; slower: fewer. Either way the sweep spends
    0.8–1.0 of the budget (one slot, so no trial is in flight when the next is handed out) and every final runs."""
    specs, spent, compute = _run_sequentially(tmp_path, monkeypatch, speed=speed, planned=4)
    search = [s for s in specs if s["phase"] == "search"]
    assert sum(s["phase"] == "final" for s in specs) == 4  # 2 seeds × 2 ε, never given up for search trials
    assert 0.8 <= spent / compute["budget_seconds"] <= 1.0, spent
    if speed < 1:
        assert len(search) > 8
    elif speed > 1:
        assert len(search) < 8
    else:
        assert len(search) == 8
    stops = json.loads((tmp_path / "stops.json").read_text()) if speed != 1.0 else None
    if stops is not None:  # what the driver reads back as the sweep's trial counts
        assert sum(stops.values()) == len(search)
