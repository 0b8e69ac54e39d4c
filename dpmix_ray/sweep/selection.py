"""Which trial a group selects, and which one it releases: written once, read by the searcher, the
driver's ledger callback and the report (pure).

Selection reads validation figures only, never test accuracy. It ranks completed search trials by
their *score*: the mean validation accuracy of the epoch reports in the last quarter of the run (the
final report at least). One end-of-run accuracy on a few hundred validation images is noisy, and
the iterate of a DP run still random-walks at its end, so consecutive epochs differ by a point or
more: the last quarter's mean picks recipes that are good rather than lucky (with ``optim.ema`` the
reports are already the averaged model's). The winner's recipe is then re-run on fresh seeds.
"""

from __future__ import annotations

import statistics
from collections.abc import Mapping, Sequence
from typing import Any

SCORE_WINDOW = 0.25  # the last quarter of the steps

Record = Mapping[str, Any]


def score(history: Sequence[tuple[int, float]], steps: int) -> float | None:
    """Mean validation accuracy over the ``(step, val)`` reports in the last quarter of ``steps``; None without reports."""
    if not history:
        return None
    tail = [val for step, val in history if step > (1.0 - SCORE_WINDOW) * steps]
    return statistics.fmean(tail or [history[-1][1]])


def best(records: Sequence[Record]) -> Record | None:
    """The selected search trial: highest score among completed search trials (ties: the earliest slot)."""
    done = [r for r in records if r["phase"] == "search" and r["status"] == "completed" and r.get("score") is not None]
    return max(done, key=lambda r: (r["score"], -int(r["index"])), default=None)


def released(records: Sequence[Record]) -> Record | None:
    """The run whose model and numbers a group releases.

    The selected search trial when it ran at full size (its (ε, δ) is the sweep's); when a proxy trial
    won (:mod:`dpmix_ray.sweep.proxy`: not covered, never released), the first completed fresh-seed
    final run of its recipe, at full size. None until such a run exists.
    """
    chosen = best(records)
    if chosen is None or not chosen.get("proxy"):
        return chosen
    finals = [r for r in records if r["phase"] == "final" and r["status"] == "completed"]
    return min(finals, key=lambda r: int(r["index"]), default=None)
