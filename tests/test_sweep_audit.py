"""``final.audit``: its config checks, which config each private group's audit runs, the curator-only report columns
(fast), and a real tiny sweep that audits once per private group and never again on ``--resume`` (slow)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from test_report import _records, _release, _write_sweep
from test_sweep import TINY_BASE, local_ray, sweep  # noqa: F401 - local_ray is a fixture

from dpmix_ray.config import load_sweep_config
from dpmix_ray.errors import ConfigError
from dpmix_ray.report import build_report
from dpmix_ray.sweep import audits
from dpmix_ray.sweep import budget as B
from dpmix_ray.sweep import plan as P
from dpmix_ray.sweep import state as S

AUDIT_WORDS = ("audit", "ε_lb", "epsilon_lower_bound", "canar")


@pytest.mark.parametrize(("sets", "needle"), [
    (["final.audit_guesses=30", "final.audit_canaries=20"], "audit_guesses (30) exceeds audit_canaries (20)"),
    (["final.audit_guesses=1"], "final.audit_guesses"),
    (["final.audits=true"], "final.audits: unknown key"),
])
def test_audit_config_refusals_are_one_line(tmp_path: Path, sets: list[str], needle: str) -> None:
    path = tmp_path / "s.yaml"
    path.write_text("base: {data: {name: digits}}\n")
    with pytest.raises(ConfigError) as e:
        load_sweep_config(path, sets)
    assert needle in str(e.value) and "\n" not in str(e.value)
    final = load_sweep_config(path, ["final.audit=true", "final.audit_canaries=50", "final.audit_guesses=50"]).final
    assert (final.audit, final.canaries, final.guesses) == (True, 50, 50)


def test_canary_slots_join_n_and_delta_stays_below_one_over_n() -> None:
    audits.check(sweep(final__audit=True, final__audit_canaries=60, final__audit_guesses=20), n_train=300)
    audits.check(sweep(delta=3e-3, final__audit_canaries=300, final__audit_guesses=20), n_train=300)  # audit off: nothing to check
    assert sweep(final__audit=True).final.guesses is None  # null: tuned on a held-out half of the canaries
    for canaries, delta, needle in ((300, 2e-3, "N=600"), (200, 1e-2, "N=500")):
        with pytest.raises(ConfigError, match="final.audit_canaries") as e:
            audits.check(sweep(delta=delta, final__audit=True, final__audit_canaries=canaries, final__audit_guesses=20), n_train=300)
        assert needle in str(e.value)


def _search(group: str, index: int, score: float, **extra: Any) -> dict[str, Any]:
    return {"group": group, "phase": "search", "index": index, "status": "completed", "score": score,
            "params": {"optim.lr": 0.5 + index}, "proxy": False, **extra}


def test_each_private_group_audits_its_released_recipe_once_on_a_fresh_final_seed() -> None:
    cfg = sweep(baselines=["nonprivate"], final__audit=True)
    groups = P.build_groups(cfg)
    state = S.SweepState(name="t", config_hash="x", counts={g.key: 2 for g in groups}, storage_path="", n_train=300)
    records = [_search("dpmix_self@eps=2", 0, 0.5), _search("dpmix_self@eps=2", 1, 0.7),
               _search("dpmix_self@eps=8", 0, 0.9, proxy=True), {"group": "nonprivate", "phase": "search", "index": 0,
                                                                 "status": "completed", "score": 0.99, "params": {}}]
    todo = audits.to_audit(cfg, groups, records, state, done={})
    assert list(todo) == ["dpmix_self@eps=2"]  # ε=8 selected a proxy and has no full-size final yet; nonprivate: never
    audited = todo["dpmix_self@eps=2"]
    assert audited.optim.lr == 1.5 and audited.privacy.epsilon == 2 and audited.optim.batch_size == 32  # the selected recipe, full size
    assert audited.seed == P.trial_seed(cfg, "final", cfg.final.seeds)  # after the final seeds: used by no other run
    records.append({"group": "dpmix_self@eps=8", "phase": "final", "index": 0, "status": "completed", "params": {"optim.lr": 0.5}})
    assert list(audits.to_audit(cfg, groups, records, state, done={"dpmix_self@eps=2": {}})) == ["dpmix_self@eps=8"]


def test_repeat_and_select_audits_the_per_trial_epsilon_its_runs_spend() -> None:
    cfg = sweep(tuning_privacy="repeat_and_select", epsilons=[4], search__trials_per_epsilon=3, final__audit=True)
    groups = P.build_groups(cfg)
    plans = B.plan_groups(cfg, groups, n_train=300)
    state = S.SweepState(name="t", config_hash="x", counts={"dpmix_self@eps=4": 3}, storage_path="", n_train=300,
                         plans={k: p.as_dict() for k, p in plans.items()})
    audited = audits.to_audit(cfg, groups, [_search("dpmix_self@eps=4", 0, 0.5)], state, done={})["dpmix_self@eps=4"]
    assert audited.privacy.epsilon == plans["dpmix_self@eps=4"].trial_epsilon < 4


def _audit(group: str, lb: float) -> dict[str, Any]:
    return {"group": group, "group_epsilon": 4.0, "epsilon": 3.96, "epsilon_lower_bound": lb, "correct": 17, "guesses": 20,
            "canaries": 60, "max_provable_epsilon": 2.123}


def test_report_shows_audits_to_the_curator_only(tmp_path: Path) -> None:
    cfg = _write_sweep(tmp_path, _records(), final={"seeds": 2, "audit": True})
    S.add_audit(tmp_path, _audit("dpmix_self@eps=4", 0.123))
    S.add_audit(tmp_path, _audit("dpsgd@eps=4", 0.456))
    assert set(S.read_audits(tmp_path)) == {"dpmix_self@eps=4", "dpsgd@eps=4"}
    build_report(tmp_path)
    html = S.read_text(tmp_path, S.CURATOR_REPORT)
    for text in ("audit ε_lb", "0.123", "0.456", "audit correct/guesses", "17/20", "audit max provable ε_lb", "2.12",
                 S.AUDIT_FILE, "extra training runs outside the sweep&#x27;s guarantee"):
        assert text in html, text
    assert cfg.final.audit
    released = [p for p in S.path(tmp_path, S.RELEASE).rglob("*") if p.suffix in (".md", ".json", ".csv")]
    assert len(released) == 3
    for p in released:
        assert not any(w in p.read_text() for w in AUDIT_WORDS), p


def test_no_audit_no_audit_columns_or_note(tmp_path: Path) -> None:
    _write_sweep(tmp_path, _records())
    build_report(tmp_path)
    html = S.read_text(tmp_path, S.CURATOR_REPORT)
    assert "audit ε_lb" not in html and "Audits (final.audit)" not in html
    assert S.AUDIT_FILE in html  # the file guide names every file a sweep may write


@pytest.mark.slow
def test_sweep_audits_each_private_group_once_and_releases_nothing_of_it(tmp_path: Path, local_ray: str,  # noqa: F811
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    from dpmix_ray.sweep import run_sweep

    cfg = sweep(baselines=["nonprivate"], search__trials_per_epsilon=1, final__audit=True, final__audit_canaries=60,
                final__audit_guesses=20)
    out = run_sweep(cfg, out=tmp_path / "out", progress=False)
    lines = S.path(out, S.AUDIT_FILE).read_text().splitlines()
    found = S.read_audits(out)
    assert len(lines) == 2 and set(found) == {"dpmix_self@eps=2", "dpmix_self@eps=8"}
    records = S.read_records(out)
    for key, a in found.items():
        assert a["epsilon_lower_bound"] <= a["epsilon"] <= a["group_epsilon"], a
        assert (a["canaries"], a["guesses"], a["method"]) == (60, 20, "dpmix_self") and 0 <= a["correct"] <= 20
        final = next(r for r in records if r["group"] == key and r["phase"] == "final")
        assert a["seed"] != final["seed"] and a["config"]["optim"] == final["config"]["optim"]  # the recipe, a fresh seed
    assert "audit ε_lb" in S.read_text(out, S.CURATOR_REPORT)
    assert _release(out) == {"best_per_epsilon.csv", "best_per_epsilon.json", "best_per_epsilon.md", "accuracy_vs_epsilon.png",
                             "models/dpmix_self-eps2.pt", "models/dpmix_self-eps8.pt", "recipes/dpmix_self-eps2.yaml", "recipes/dpmix_self-eps8.yaml"}
    for p in S.path(out, S.RELEASE).glob("best_per_epsilon.*"):
        assert not any(w in p.read_text() for w in AUDIT_WORDS), p

    before = S.path(out, S.AUDIT_FILE).read_bytes()
    todo: list[dict[str, Any]] = []
    real = audits.to_audit
    monkeypatch.setattr(audits, "to_audit", lambda *a, **k: todo.append(real(*a, **k)) or todo[-1])
    run_sweep(cfg, out=out, resume=True, progress=False)
    assert todo == [{}] and S.path(out, S.AUDIT_FILE).read_bytes() == before  # asked, and nothing left to audit
