"""How a trial ended, as one typed value: what the trainable's last report carries and every reader parses.

A trial reports to Tune once per epoch (:func:`epoch_report`: validation accuracy, ε spent so far,
progress through its steps) and once at its end (:class:`Outcome`: its status, its selection score
and its ledger record). The searcher, the scheduler and the driver's ledger callback tell the two
apart with :meth:`Outcome.of`, never by probing for magic keys. Pure: no Ray.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

METRIC = "val_accuracy"  # what each epoch reports and ASHA compares within a group
PROGRESS = "progress"  # percent of the trial's planned steps done: ASHA's clock, comparable across batch sizes and step counts
# The last report's keys. Tune hands searchers and schedulers *flattened* results ("a/b" for nested keys), so the
# status and the score are scalars; the record (nested) is read from the trial's unflattened last result.
_STATUS, _SCORE, _RECORD = "outcome", "score", "record"


class Status(StrEnum):
    COMPLETED = "completed"  # trained to its last step; its score may be selected
    STOPPED = "stopped"  # stopped early by the scheduler (ASHA)
    PRUNED = "pruned"  # refused before any step: impossible config, or a plan that cannot meet its budget
    FAILED = "failed"  # training raised (diverged, bad data), or the worker crashed past its retries


def epoch_report(*, val_accuracy: float, epsilon_spent: float | None, epoch: int, step: int, steps: int, seconds: float,
                 cpu_seconds: float) -> dict[str, Any]:
    """One epoch's report: what ASHA and Optuna's intermediate values read, and the trial's time so far (a trial
    stopped early is recorded from its last report)."""
    return {METRIC: val_accuracy, "epsilon_spent": epsilon_spent, "epoch": epoch, "step": step, PROGRESS: 100.0 * step / steps,
            "trial_seconds": seconds, "trial_cpu_seconds": cpu_seconds}


def is_epoch_report(result: Mapping[str, Any]) -> bool:
    return _STATUS not in result and result.get(METRIC) is not None


@dataclass(frozen=True)
class Outcome:
    """A finished trial: its status, its selection score (completed trials only), and its ledger record.

    ``record`` is None where Tune only shows a flattened result (searchers, schedulers); the driver's
    callback reads the trial's own last result, which keeps it.
    """

    status: Status
    score: float | None = None
    record: Mapping[str, Any] | None = None

    @classmethod
    def of_record(cls, record: Mapping[str, Any]) -> Outcome:
        status = Status(record["status"])
        return cls(status, record.get("score") if status is Status.COMPLETED else None, record)

    @classmethod
    def of(cls, result: Mapping[str, Any] | None) -> Outcome | None:
        """The outcome in a Tune result (flattened or not), or None for an epoch report (or no result)."""
        if not result or _STATUS not in result:
            return None
        record = result.get(_RECORD)
        return cls(Status(result[_STATUS]), result.get(_SCORE), record if isinstance(record, Mapping) else None)

    def as_result(self) -> dict[str, Any]:
        """The trainable's last report."""
        record = dict(self.record or {})
        return {METRIC: record.get(METRIC), _STATUS: self.status.value, _SCORE: self.score, _RECORD: record}
