"""How a trial ended, as one typed value: what the trainable's last report carries and every reader parses.

A trial reports to Tune once per epoch (:func:`epoch_report`: validation accuracy, ε spent so far,
progress through its steps) and once at its end (:class:`Outcome`: its status and its ledger
record, under one key). The searcher, the scheduler and the driver's ledger callback tell the two
apart with :meth:`Outcome.of`, never by probing for magic keys. Pure: no Ray.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

METRIC = "val_accuracy"  # what each epoch reports and ASHA compares within a group
PROGRESS = "progress"  # percent of the trial's planned steps done: ASHA's clock, comparable across batch sizes and step counts
_KEY = "outcome"


class Status(StrEnum):
    COMPLETED = "completed"  # trained to its last step; its score may be selected
    STOPPED = "stopped"  # stopped early by the scheduler (ASHA)
    PRUNED = "pruned"  # refused before any step: impossible config, or a plan that cannot meet its budget
    FAILED = "failed"  # training raised (diverged, bad data), or the worker crashed past its retries


def epoch_report(*, val_accuracy: float, epsilon_spent: float | None, epoch: int, step: int, steps: int) -> dict[str, Any]:
    """One epoch's report: what ASHA and Optuna's intermediate values read."""
    return {METRIC: val_accuracy, "epsilon_spent": epsilon_spent, "epoch": epoch, "step": step, PROGRESS: 100.0 * step / steps}


def is_epoch_report(result: Mapping[str, Any]) -> bool:
    return _KEY not in result and result.get(METRIC) is not None


@dataclass(frozen=True)
class Outcome:
    """A finished trial: its status and its ledger record (which holds the status too, as the ledger stores it)."""

    status: Status
    record: Mapping[str, Any]

    @classmethod
    def of_record(cls, record: Mapping[str, Any]) -> Outcome:
        return cls(Status(record["status"]), record)

    @classmethod
    def of(cls, result: Mapping[str, Any] | None) -> Outcome | None:
        """The outcome in a Tune result, or None for an epoch report (or no result)."""
        record = (result or {}).get(_KEY)
        return cls.of_record(record) if record is not None else None

    @property
    def score(self) -> float | None:
        """The selection score of a completed trial (:mod:`dpmix_ray.sweep.selection`); None otherwise."""
        return self.record.get("score") if self.status is Status.COMPLETED else None

    def as_result(self) -> dict[str, Any]:
        """The trainable's last report."""
        return {METRIC: self.record.get(METRIC), _KEY: dict(self.record)}
