"""Ray Tune + Optuna search for the best DP-Mix recipe per ε (see :mod:`dpmix_ray.sweep.driver`).

Importing this package does not import Ray: the pure modules (``plan``: what runs; ``budget``: the
privacy plans; ``claims``: what ε covers; ``state``: the release/ and curator/ layout and its I/O)
are used by the report and the tests without it.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from dpmix_ray.config import SweepConfig


def run_sweep(cfg: SweepConfig, *, out: Path, resume: bool = False, address: str | None = None, progress: bool = True) -> Path:
    """Run or resume ``cfg`` into ``out`` (see :func:`dpmix_ray.sweep.driver.run_sweep`)."""
    from dpmix_ray.sweep.driver import run_sweep as _run

    return _run(cfg, out=out, resume=resume, address=address, progress=progress)
