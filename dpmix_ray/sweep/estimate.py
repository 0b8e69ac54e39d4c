"""What a sweep will cost before it starts (``dpmix-ray sweep --dry-run``, and the line a sweep prints first).

Each group's trials are estimated at its default point (the warm start: :func:`space.default_point`,
the recipe ``recipe.resolve`` derives), as the driver would issue them (:func:`budget.trial_spec`:
proxies for search trials, full size for finals), with one throughput probe (:func:`dpmix_ray.cost.probe`,
random inputs) per distinct (method, batch size, group size), run on the threads a trial holds
(``resources.cpu``). The probes share one allowance of :data:`cost.PROBE_SECONDS`. No Ray, nothing written.
"""

from __future__ import annotations

import math
import os
from typing import Any

import torch

from dpmix_ray import cost, methods
from dpmix_ray.config import SweepConfig, TrainConfig
from dpmix_ray.sweep import space
from dpmix_ray.sweep.budget import TrialPlan, plan_groups, trial_spec
from dpmix_ray.sweep.plan import Group, build_groups, check_sweep, final_seeds, trial_config

# A sweep's wall over Σ trial time / concurrency: 1.13 on the quickstart, 1.19–1.22 in bench/sweep_overhead.py (2 cores).
SWEEP_OVERHEAD = 1.13
# What a trial spends beyond its images (model build, Tune's report and checkpoint each epoch): 2.2 s a trial on the
# quickstart (73 trials: 720 s measured against 562 s from the probe's images/s alone, 2 cores).
TRIAL_SETUP_SECONDS = 2.0
MIN_PROBE_SECONDS = 2.0


def local_slots(cfg: SweepConfig) -> int:
    """Trials at a time on this machine (the CPUs, and GPUs when trials hold some)."""
    cpus = (os.cpu_count() or 1) // cfg.resources.cpu
    gpus = torch.cuda.device_count() // cfg.resources.gpu if cfg.resources.gpu > 0 else math.inf
    return max(1, int(min(cpus, gpus)))


def resource_hours(trial_seconds: float, cfg: SweepConfig) -> dict[str, float]:
    """Σ trial wall × the CPUs / GPUs each trial holds, in hours: what ``search.budget`` counts."""
    return {"cpu_hours": trial_seconds * cfg.resources.cpu / 3600, "gpu_hours": trial_seconds * cfg.resources.gpu / 3600}


def _specs(cfg: SweepConfig, group: Group, n_train: int, group_plan: TrialPlan | None) -> dict[str, dict[str, Any]]:
    """The search trial and the final run the driver would issue at the group's default point."""
    point = space.default_point(cfg, trial_config(cfg, group, {}, cfg.base.seed), n_train) if group.space else {}
    return {phase: trial_spec(cfg, group, phase=phase, index=0, params=point, group_plan=group_plan, synthetic=None)
            for phase in ("search", "final")}


def _probe_key(train: TrainConfig) -> str:
    return train.model_dump_json(include={"method": True, "model": True, "device": True, "mix": {"aug_multiplicity", "self_mix", "diff_mix"},
                                          "optim": {"batch_size", "physical_batch_size", "memory_cap_mb"}})


def estimate_sweep(cfg: SweepConfig, shape: cost.DataShape, *, seconds: float = cost.PROBE_SECONDS) -> dict[str, Any]:
    """Per group: trials, each trial's recipe and seconds; the sweep's trial seconds, resource hours and wall time.

    Raises what the sweep itself would refuse before Ray starts (ConfigError, BudgetError)."""
    check_sweep(cfg)
    groups = build_groups(cfg)
    plans = plan_groups(cfg, groups, shape.n_train)
    specs = {g.key: _specs(cfg, g, shape.n_train, plans.get(g.key)) for g in groups}
    runs = {(k, phase): TrainConfig.model_validate(s["train"]) for k, by in specs.items() for phase, s in by.items() if s["train"]}
    keys = sorted({_probe_key(t) for t in runs.values()})
    threads = torch.get_num_threads()
    torch.set_num_threads(max(1, int(cfg.resources.cpu)))
    try:
        each = max(MIN_PROBE_SECONDS, seconds / max(1, len(keys)))
        measured = {}
        for t in runs.values():
            if _probe_key(t) not in measured:
                measured[_probe_key(t)] = cost.probe(t, shape, seconds=each)
    finally:
        torch.set_num_threads(threads)
    rows, total = [], 0.0
    for g in groups:
        row: dict[str, Any] = {"group": g.key, "searches": bool(g.space), "search_trials": cfg.search.trials_per_epsilon if g.space else 1,
                               "final_runs": final_seeds(cfg, g), "audits": int(cfg.final.audit and methods.get(g.method).private)}
        for phase in ("search", "final"):
            spec = specs[g.key][phase]
            if spec["train"] is None:
                row[phase] = {"refused": spec["refused"]}
                continue
            t, plan = runs[(g.key, phase)], TrialPlan.from_dict(spec["plan"])
            summary = cost.recipe_summary(t, plan.run, shape)
            secs = cost.estimate_seconds(train_images=summary["images"], eval_images=summary["eval_images"],
                                         throughput=measured[_probe_key(t)], setup_seconds=TRIAL_SETUP_SECONDS)
            row[phase] = summary | {"proxy": spec["proxy"], "seconds": secs}
        per = {p: row[p].get("seconds", 0.0) for p in ("search", "final")}
        row["seconds"] = row["search_trials"] * per["search"] + (row["final_runs"] + row["audits"]) * per["final"]
        total += row["seconds"]
        rows.append(row)
    slots = local_slots(cfg)
    return {"groups": rows, "trial_seconds": total, **resource_hours(total, cfg), "slots": slots,
            "estimated_wall_seconds": total / slots * SWEEP_OVERHEAD + shape.load_seconds,
            "probes": [m.as_dict() for m in measured.values()]}


def trial_wall_seconds(e: dict[str, Any], group: str, phase: str) -> float:
    """One trial's share of the sweep's estimated wall time (its estimated seconds over the slots, with the overhead)."""
    row = next((r for r in e["groups"] if r["group"] == group), None)
    seconds = (row or {}).get("search" if phase == "search" else "final", {}).get("seconds", 0.0)
    return seconds / e["slots"] * SWEEP_OVERHEAD


def describe_sweep(e: dict[str, Any]) -> list[str]:
    """The human form of :func:`estimate_sweep`'s record."""
    lines = []
    for r in e["groups"]:
        parts = []
        for phase, n in (("search", r["search_trials"]), ("final", r["final_runs"] + r["audits"])):
            t = r[phase]
            if n == 0 or (phase == "final" and r["final_runs"] == 0 and r["audits"] == 0):
                continue
            if "refused" in t:
                parts.append(f"{phase} refused: {t['refused']}")
                continue
            proxy = " proxy" if t["proxy"] else ""
            parts.append(f"{n} {phase}{proxy} × {cost.duration(t['seconds'])} (B {t['batch_size']}, T {t['steps']}, G {t['group_size']}, "
                         f"σ {t['noise_multiplier']:.3g}, lr {t['lr']:.3g}, {t['images']:,.0f} images)")
        lines.append(f"{r['group']:>22}: " + "; ".join(parts))
    lines.append(f"sweep: {cost.duration(e['trial_seconds'])} of trials ({e['cpu_hours']:.2f} CPU h, {e['gpu_hours']:.2f} GPU h), "
                 f"≈ {cost.duration(e['estimated_wall_seconds'])} wall at {e['slots']} trial(s) at a time")
    return lines


# --------------------------------------------------------------------------- compute budget (search.budget)


def budget_trial_seconds(cfg: SweepConfig) -> float | None:
    """``search.budget`` as summed trial wall seconds (hours × 3600 ÷ the CPUs or GPUs a trial holds); None without one."""
    b = cfg.search.budget
    if b is None:
        return None
    return b.cpu_hours * 3600 / cfg.resources.cpu if b.cpu_hours is not None else b.gpu_hours * 3600 / cfg.resources.gpu


def trials_for_budget(budget_seconds: float, *, search_seconds: float, fixed_seconds: float) -> int:
    """The most search trials per ε that fit: ⌊(budget − fixed) / (one trial per searched group)⌋, at least 1.

    ``search_seconds``: one search trial of every group that searches, summed; ``fixed_seconds``: what runs
    whatever the count (finals, audits, groups with nothing to search). Raises ConfigError when even one does not fit."""
    from dpmix_ray.errors import ConfigError

    room = budget_seconds - fixed_seconds
    if search_seconds <= 0:
        return 1
    if room < search_seconds:
        raise ConfigError(f"search.budget: one search trial per ε and the final runs need ≈ {cost.duration(search_seconds + fixed_seconds)} "
                          f"of trials, more than the budget's {cost.duration(budget_seconds)}")
    return int(room // search_seconds)


def would_overrun(budget_seconds: float, *, spent: float, committed: float) -> bool:
    """Whether handing out more work overruns the budget: seconds already spent by trials plus the estimates of
    what is running and promised (the next trial, and every final still to run)."""
    return spent + committed > budget_seconds


def plan_budget(cfg: SweepConfig, e: dict[str, Any]) -> dict[str, Any] | None:
    """From :func:`estimate_sweep`'s record: the trials per ε that fit ``search.budget``, with what the
    searcher needs to keep within it (per-group trial estimates). None without a budget."""
    budget = budget_trial_seconds(cfg)
    if budget is None:
        return None
    search = {r["group"]: r["search"].get("seconds", 0.0) for r in e["groups"]}
    final = {r["group"]: r["final"].get("seconds", 0.0) for r in e["groups"]}
    searched = [r for r in e["groups"] if r["searches"]]
    fixed = sum((r["final_runs"] + r["audits"]) * final[r["group"]] for r in e["groups"])
    fixed += sum(search[r["group"]] for r in e["groups"] if r not in searched)
    n = trials_for_budget(budget, search_seconds=sum(search[r["group"]] for r in searched), fixed_seconds=fixed)
    planned = fixed + n * sum(search[r["group"]] for r in searched)
    return {"budget_seconds": budget, "trials_per_epsilon": n, "estimated_seconds": planned, "search": search, "final": final,
            **{f"estimated_{k}": v for k, v in resource_hours(planned, cfg).items()}}


def with_trials(cfg: SweepConfig, trials_per_epsilon: int) -> SweepConfig:
    """``cfg`` with the budget's trial count (the mean of the random count under repeat_and_select)."""
    return cfg.model_copy(update={"search": cfg.search.model_copy(update={"trials_per_epsilon": trials_per_epsilon})})


def estimate_summary(e: dict[str, Any]) -> dict[str, float]:
    """What the sweep state keeps of :func:`estimate_sweep`'s record, so the report can set it beside what was spent."""
    return {k: e[k] for k in ("trial_seconds", "cpu_hours", "gpu_hours", "estimated_wall_seconds")}


def spent(cfg: SweepConfig, records: list[dict[str, Any]], audits: dict[str, dict[str, Any]]) -> dict[str, float]:
    """What the sweep has spent, counted as ``search.budget`` counts: Σ trial wall seconds (every trial and final.audit
    run, across resumes) and those seconds × the CPUs / GPUs each held, in hours."""
    seconds = sum(float(r.get("trial_seconds") or 0.0) for r in records) + sum(float(a.get("trial_seconds") or 0.0) for a in audits.values())
    return {"trial_seconds": seconds, **resource_hours(seconds, cfg)}


def compute_rows(cfg: SweepConfig, planned: dict[str, Any] | None, estimated: dict[str, Any] | None,
                 used: dict[str, float]) -> list[dict[str, str]]:
    """The curator's compute table: the budget (if any), the estimate made before the run, and what was spent."""
    unit = "gpu_hours" if cfg.resources.gpu > 0 else "cpu_hours"
    label = unit.replace("_hours", "").upper() + " h"

    def row(what: str, seconds: float | None, hours: float | None, ratio: str = "–") -> dict[str, str]:
        return {"": what, "trial time": "–" if seconds is None else cost.duration(seconds),
                label: "–" if hours is None else f"{hours:.3f}", "spent ÷ this": ratio}

    rows = []
    if planned is not None:
        budget_hours = resource_hours(planned["budget_seconds"], cfg)[unit]
        rows.append(row("search.budget", planned["budget_seconds"], budget_hours, f"{used['trial_seconds'] / planned['budget_seconds']:.2f}"))
        rows.append(row(f"planned for it ({planned['trials_per_epsilon']} search trials per ε)", planned["estimated_seconds"],
                        planned[f"estimated_{unit}"], f"{used['trial_seconds'] / planned['estimated_seconds']:.2f}"))
    if estimated is not None:
        rows.append(row("estimated before the run (throughput probe)", estimated["trial_seconds"], estimated[unit],
                        f"{used['trial_seconds'] / estimated['trial_seconds']:.2f}" if estimated["trial_seconds"] > 0 else "–"))
    rows.append(row("spent (trials, finals, audits)", used["trial_seconds"], used[unit]))
    return rows
