"""search.budget: the arithmetic that fits a sweep to a compute budget (pure), and its config refusals."""

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
