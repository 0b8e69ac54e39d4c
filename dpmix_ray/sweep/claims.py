"""What a sweep's (ε, δ) covers, in words: every output's privacy text comes from here (pure).

The guarantee is about the training split of N examples. The validation and test splits are
held-out data: selection reads validation accuracy and the report reads test accuracy without
noise, so their use is not private. Reproducible runs (``privacy.reproducible: true``) derive the
mechanism's randomness from the public seed and the non-private reference adds no noise: both
are NOT PRIVATE, and every output says so.
"""

from __future__ import annotations

from typing import Any

from dpmix_ray.config import SweepConfig
from dpmix_ray.privacy import relation_phrase
from dpmix_ray.sweep.plan import Group, uses_tuning_calibration
from dpmix_ray.sweep.state import AUDIT_FILE

NOT_PRIVATE = "NOT PRIVATE"
PROXY = "PROXY"
HELD_OUT = "the validation and test splits are held-out data whose use is not private"


def reproducible(cfg: SweepConfig) -> bool:
    """Whether the sweep's mechanism draws come from the public seed (research and tests only)."""
    return cfg.base.privacy.reproducible


def is_private(cfg: SweepConfig, group: Group) -> bool:
    return group.epsilon is not None and not reproducible(cfg)


def guarantee(cfg: SweepConfig, group: Group, n_train: int | None) -> str:
    """One self-contained line for a released row: what its (ε, δ) covers, and what it does not."""
    if group.epsilon is None:
        return f"{NOT_PRIVATE}: non-private reference (no clipping, no noise); it exposes its training data"
    if reproducible(cfg):
        return (
            f"{NOT_PRIVATE}: privacy.reproducible is true, so the noise and the sampling are derived from the public "
            "seed and anyone holding the outputs can remove them; the stated ε holds for nothing"
        )
    data = f"the {n_train} training examples" if n_train is not None else "the training split"
    if not group.space:
        what = "one training run (nothing was tuned)"
    elif cfg.search.proxy is not None:
        what = (
            "one full-size training run only (the released model, a run of the selected recipe), NOT the selection over "
            "the search, nor its proxy trials (each a run at its own, much larger ε; curator only)"
        )
    elif uses_tuning_calibration(cfg, group):
        dist = "Poisson" if cfg.search.trials_shape is None else f"truncated negative binomial η={cfg.search.trials_shape:g}"
        what = (
            f"the whole random search (random number of trials, {dist}, mean {cfg.search.trials_per_epsilon}) and the "
            "released best model with its scores (repeat-and-select, Papernot & Steinke 2022)"
        )
    else:
        what = "one training run only, NOT the selection over the search"
    relation = relation_phrase(cfg.base, at=(group.epsilon, cfg.delta))
    return f"(ε, δ) covers {what}, for {data} ({relation}); {HELD_OUT}"


def label(cfg: SweepConfig, group: Group) -> str:
    """:func:`guarantee` in a few words, for table cells and legends."""
    if not is_private(cfg, group):
        return NOT_PRIVATE
    if not group.space:
        return "one run (nothing tuned)"
    return "whole search" if uses_tuning_calibration(cfg, group) else "one run, not the search"


def trial_covers(cfg: SweepConfig, group: Group, record: dict[str, Any]) -> str:
    """What one trial's own run is covered by, for tables of every trial: a proxy trial says it is outside."""
    if record.get("proxy") and is_private(cfg, group):
        spent = record.get("trial_epsilon")
        return f"{PROXY}: outside the sweep's guarantee (this run alone: ε={spent:.3g})" if spent is not None else PROXY
    return label(cfg, group)


def audit_note(cfg: SweepConfig) -> str | None:
    """For the curator's report only (``final.audit``): what the audit runs were, and that nothing covers them."""
    if not cfg.final.audit:
        return None
    return (
        "Audits (final.audit): once the sweep is complete, each private group's released recipe is trained once more on "
        "the private data, with canaries, to measure a lower bound ε_lb on its ε; these audit runs are extra training runs "
        f"outside the sweep's guarantee, and their results ({AUDIT_FILE}, the ε_lb columns) are for the curator only."
    )


def statement(cfg: SweepConfig, n_train: int | None) -> str:
    """The paragraph every output opens with: what ε covers here (Papernot & Steinke 2022), what it does not."""
    data = f"the training split ({n_train} examples)" if n_train is not None else "the training split"
    data = f"{data}, {relation_phrase(cfg.base)}"
    head = (
        f"{NOT_PRIVATE}: privacy.reproducible is true, so every run's noise and sampling follow from the public seed; "
        "no ε below holds. " if reproducible(cfg) else ""
    )
    if cfg.tuning_privacy == "per_trial":
        body = (
            f"Privacy (tuning_privacy: per_trial): each ε protects {data} in ONE training run. The search trained "
            "several configurations per ε and kept the best on validation accuracy; that selection is NOT covered, so "
            "the released model is not (ε, δ)-DP end to end. The re-runs of the chosen recipe on fresh seeds are "
            "further runs, each covered alone. Use tuning_privacy: repeat_and_select for a guarantee that includes "
            "the search."
        )
    else:
        body = (
            f"Privacy (tuning_privacy: repeat_and_select): each ε protects {data} across the whole random search and "
            "covers what release/ holds: the selected search trial's own model, its hyperparameters and its "
            "validation and test accuracy. Random search with a random number of trials, every trial run with the σ "
            "calibrated by dp_accounting's RDP repeat-and-select event. Not covered, and only for the curator: "
            "curator/ (every other trial, the drawn trial counts, the optuna.db) and the final re-runs of the chosen "
            "recipe on fresh seeds, each one more run on the private data."
        )
    proxies = (
        f" The search ran as proxy trials (TAN: batch {cfg.search.proxy.batch_size} with σ scaled to keep σ/B and the step "
        "count): they are NOT covered by the sweep's ε (each reports its own, much larger ε), stay in curator/, and are "
        "never released; the released models are full-size runs of the selected recipes." if cfg.search.proxy is not None else ""
    )
    return f"{head}{body}{proxies} Not private either way: {HELD_OUT}."


# --------------------------------------------------------------------------- what publishing costs together

def composed(cfg: SweepConfig, epsilon: float, n_train: int | None) -> str:
    """What publishing all of release/ together costs: every released row draws on the same training split, so the
    rows compose (dp_accounting RDP); under per_trial that composition covers the runs only, never the selection."""
    if reproducible(cfg):
        return f"{NOT_PRIVATE}: privacy.reproducible is true; no composed ε holds for release/"
    data = f"the {n_train} training examples" if n_train is not None else "the training split"
    if cfg.tuning_privacy == "repeat_and_select":
        what = "the composition of every released search (each row's whole random search, repeat-and-select)"
    else:
        what = (
            "the composition of every released run (each row's released model and the re-runs whose test accuracies it "
            "shows): runs only, NOT the selection over the searches"
        )
    proxies = "; proxy trials are never covered" if cfg.search.proxy is not None else ""
    return (
        f"Publishing all of release/ together: (ε={epsilon:.3g}, δ={cfg.delta:g}), {what}, for {data}, RDP accountant"
        f"{proxies}. Each row's own ε covers that row alone; publish one recipe (dpmix-ray export) to spend one row's ε."
    )


def bundle(cfg: SweepConfig, group: Group, epsilon: float, n_train: int | None) -> str:
    """An exported single-recipe bundle's guarantee: that row's releases alone, and what publishing more costs."""
    if not is_private(cfg, group):
        return guarantee(cfg, group, n_train)
    return (
        f"(ε={epsilon:.3g}, δ={cfg.delta:g}) for this one recipe's released results alone ({guarantee(cfg, group, n_train)}). "
        "Publishing anything else computed on the same training split (another bundle, release/, a retraining) composes "
        "with it: the total ε is larger."
    )


def recipe_header(cfg: SweepConfig, group: Group, trial_epsilon: float, covering: str) -> list[str]:
    """The comment lines of a released recipe file: what it runs, what its run costs, and that retraining is a new release."""
    private = is_private(cfg, group)
    return [
        f"{group.method} at ε={group.epsilon:g} (δ={cfg.delta:g}): the released row's full recipe, σ and T pinned.",
        f"`dpmix-ray train THIS.yaml` runs the same mechanism (σ, q, T) on the same data: one run, ε={trial_epsilon:.4g}."
        if private else f"{NOT_PRIVATE}: privacy.reproducible is true.",
        "On other data (--set data.name=…) the same σ runs the most steps its own q allows within that ε.",
        "Retraining on the same data is a NEW release: its ε composes with every release already made from that data.",
        covering,
    ]
