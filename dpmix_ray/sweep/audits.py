"""``final.audit``: after the sweep, one white-box audited training run per private group (:func:`dpmix_ray.audit.run_audit`),
its lower bound ε_lb written to ``curator/audit.jsonl``.

An audit run is one more training run on the private data, with canaries in: it is outside the
sweep's guarantee, so its results stay with the curator and nothing of it is ever written under
``release/``. It audits what the group releases: the recipe of the released run
(:func:`selection.released`, never a proxy), at full size as the group's next fresh-seed final run
would be, at the ε one run of the group spends (under repeat_and_select the smaller per-trial ε,
so σ is the released run's). Each group is audited once: a resumed sweep audits only the groups not
yet in the file. Ray is glue here: the audits run as Ray tasks with a trial's resources.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from dpmix_ray.config import SweepConfig, TrainConfig, with_updates
from dpmix_ray.errors import ConfigError
from dpmix_ray.sweep import selection
from dpmix_ray.sweep import state as S
from dpmix_ray.sweep.budget import TrialPlan, trial_spec
from dpmix_ray.sweep.plan import Group, final_seeds


def check(cfg: SweepConfig, n_train: int) -> None:
    """Before Ray starts: the white-box canary slots join N (N = N_real + m), and δ must stay < 1/N with them."""
    if not cfg.final.audit:
        return
    m = cfg.final.canaries
    if cfg.delta >= 1.0 / (n_train + m):
        raise ConfigError(f"final.audit_canaries: with {m} canary slots, δ={cfg.delta:g} is not < 1/N for N={n_train + m}")


def audit_config(cfg: SweepConfig, group: Group, records: list[dict[str, Any]], state: S.SweepState) -> TrainConfig | None:
    """The train config an audit of ``group`` runs: its released recipe on the next fresh final seed; None while it releases nothing.

    The privacy target is the ε one of the group's runs is planned at (``trial_epsilon``), so the audited mechanism is the
    released run's; ``run_audit`` plans it on the canary-augmented training split.
    """
    chosen = selection.released([r for r in records if r["group"] == group.key])
    if chosen is None:
        return None
    plan = state.plans.get(group.key)
    spec = trial_spec(cfg, group, phase="final", index=final_seeds(cfg, group), params=dict(chosen["params"]),
                      group_plan=TrialPlan.from_dict(plan) if plan else None, synthetic=state.synthetic)
    if spec["refused"]:
        raise ConfigError(f"final.audit: {group.key}'s released recipe cannot run again: {spec['refused']}")
    return with_updates(TrainConfig.model_validate(spec["train"]), {"privacy.epsilon": spec["plan"]["trial_epsilon"]})


def to_audit(cfg: SweepConfig, groups: list[Group], records: list[dict[str, Any]], state: S.SweepState,
             done: dict[str, Any]) -> dict[str, TrainConfig]:
    """The private groups with a released run and no audit yet, and the config each audit runs."""
    todo = {g.key: audit_config(cfg, g, records, state) for g in groups if g.epsilon is not None and g.key not in done}
    return {k: c for k, c in todo.items() if c is not None}


def audit_line(group: Group, train: TrainConfig, result: dict[str, Any]) -> dict[str, Any]:
    """One line of ``curator/audit.jsonl``: the group, the audited config, and ``run_audit``'s result (its ``epsilon``
    is the audited run's ε spent; ``group_epsilon`` the sweep's ε for the group)."""
    return {"group": group.key, "group_epsilon": group.epsilon, "seed": train.seed, "config": train.model_dump(mode="json"),
            "audited_at": time.time(), **result}


def _run_audit(train_json: str, canaries: int, guesses: int | None) -> dict[str, Any]:
    """The Ray task: one audited run (imports the trainer on the worker only)."""
    from dpmix_ray.audit import run_audit

    start = time.perf_counter()
    result = run_audit(TrainConfig.model_validate_json(train_json), canaries=canaries, guesses=guesses, progress=False)
    return result | {"trial_seconds": time.perf_counter() - start}  # counted against search.budget like a trial's


def _say(line: dict[str, Any]) -> str:
    return (f"{line['group']:>22} audit    ε_lb {line['epsilon_lower_bound']:.3f} ({line['setting']}, {line['estimator']}) for a run "
            f"of ε {line['epsilon']:.3g} ({line['correct']}/{line['guesses']} guesses right)")


def run_audits(cfg: SweepConfig, out: Path, state: S.SweepState, groups: list[Group], *, mirror: Any = None, progress: bool = True) -> None:
    """Audit every private group not yet in ``curator/audit.jsonl`` (Ray must be up); each line is written as its audit ends.

    At most ``search.max_concurrent`` audits run at once (unbounded: as many as the cluster fits). A failing audit raises
    (the others are cancelled); the groups written so far stay done.
    """
    import ray

    todo = to_audit(cfg, groups, S.read_records(out), state, S.read_audits(out))
    if not todo:
        return
    if progress:
        print(f"final.audit: {len(todo)} more training run(s) on the private data, one per released recipe, with "
              f"{cfg.final.canaries} canaries; outside the sweep's guarantee, results for the curator only ({S.AUDIT_FILE})")
    by_key = {g.key: g for g in groups}
    task = ray.remote(num_cpus=cfg.resources.cpu, num_gpus=cfg.resources.gpu)(_run_audit)
    queue, running = list(todo), {}
    try:
        while queue or running:
            while queue and len(running) < (cfg.search.max_concurrent or len(todo)):
                key = queue.pop(0)
                running[task.remote(todo[key].model_dump_json(), cfg.final.canaries, cfg.final.guesses)] = key
            [ref], _ = ray.wait(list(running), num_returns=1)
            key = running.pop(ref)
            line = audit_line(by_key[key], todo[key], ray.get(ref))
            S.add_audit(out, line)
            if mirror is not None:
                mirror.push(only=(S.AUDIT_FILE,))
            if progress:
                print(_say(line))
    finally:
        for ref in running:
            ray.cancel(ref, force=True)
