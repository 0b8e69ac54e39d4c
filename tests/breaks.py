"""Test-only instruments for the mechanism: break it on purpose, or watch what a run releases.

In-process monkeypatching only (no production flag). The mutant tests (``bench/mutants.py`` edits
sources instead) and the audit tests share :func:`break_mechanism`: an audit must see a broken
mechanism leak.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from dpmix_ray import mechanism as M


def _halve_noise(original: Callable[..., M.Grads]) -> Callable[..., M.Grads]:
    return lambda summed, std, generator: original(summed, std / 2, generator)


BREAKS: dict[str, Callable[[pytest.MonkeyPatch], None]] = {
    # the Gaussian noise is never added
    "skip_noise": lambda mp: mp.setattr(M, "add_noise", lambda summed, std, generator: {k: s.clone() for k, s in summed.items()}),
    # noise of std σC/2
    "halve_noise": lambda mp: mp.setattr(M, "add_noise", _halve_noise(M.add_noise)),
    # every per-example gradient enters unclipped
    "no_clip": lambda mp: mp.setattr(M, "clip_factors", lambda norms, clip_norm: torch.ones_like(norms)),
    # masks and noise derived from the public seed 0 even in default (private) runs
    "public_randomness": lambda mp: mp.setattr(M.Randomness, "secret_on", classmethod(lambda cls, device: cls.from_seed(0, device))),
}


def break_mechanism(monkeypatch: pytest.MonkeyPatch, name: str) -> None:
    """Break the mechanism the way ``name`` says (a key of :data:`BREAKS`) until the test ends."""
    if name not in BREAKS:
        raise KeyError(f"unknown break {name!r}; known: {', '.join(BREAKS)}")
    BREAKS[name](monkeypatch)


class Released:
    """What each optimizer step of a run received as its update (the mechanism's output), flattened,
    and the number of examples the per-example producer saw in that step."""

    def __init__(self) -> None:
        self.updates: list[torch.Tensor] = []
        self.batch_sizes: list[int] = []
        self._seen = 0

    def see(self, examples: int) -> None:
        self._seen += examples

    def step(self, update: torch.Tensor) -> None:
        self.updates.append(update)
        self.batch_sizes.append(self._seen)
        self._seen = 0


def record_updates(monkeypatch: pytest.MonkeyPatch, coordinates: int | None = None) -> Released:
    """Swap torch's SGD for one that records each step's gradient (its first ``coordinates`` entries)."""
    released = Released()

    class RecordingSGD(torch.optim.SGD):
        def step(self, closure=None):  # type: ignore[no-untyped-def]
            flat = torch.cat([p.grad.flatten() for group in self.param_groups for p in group["params"]])
            released.step(flat[:coordinates].detach().clone())
            return super().step(closure)

    monkeypatch.setattr(torch.optim, "SGD", RecordingSGD)
    return released
