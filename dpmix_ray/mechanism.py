"""The DP-SGD mechanism, and nothing else: sampling, clipping, noise, scaling, and their randomness.

One logical step releases (Σ_{i∈B} c_i·g_i + N(0, σ²C²·I)) / (q·N), where B is a Poisson sample of
rate q from the N training examples, g_i is example i's gradient (of its group-mean loss) and c_i its
clip factor. Each example enters through one vector of norm ≤ C, so this is the Poisson-subsampled
Gaussian mechanism with sensitivity C that ``privacy.py`` accounts for (add/remove one example).

How the per-example norms and the clipped sum are computed (the vmap or microbatch reference, or the
book-keeping accelerator) is behind :class:`PerExample`; nothing here depends on those heuristics.
Randomness: by default the Poisson masks and the noise come from generators seeded with 64 bits
from ``secrets`` and held in memory only (:class:`Randomness`). They are ``torch.Generator`` streams
(Mersenne Twister on CPU, Philox on CUDA), not a CSPRNG: an observer sees only noisy sums, never
raw draws. Like Opacus, the float32 Gaussian sampler is not hardened against floating-point attacks.
"""

from __future__ import annotations

import hashlib
import secrets
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

Grads = dict[str, torch.Tensor]

# κ = CLIP_MARGIN_ULPS · eps(dtype): 3.9e-3 in float32, 7.3e-12 in float64. float32 per-example norms
# (the accelerator's analytic ones, or those of float32 per-example gradients) were measured up to
# 5e-5 relative below the float64 microbatch reference here (cnn, cnn_tiny, wrn16_4 at 16 and 32 px,
# inputs ×1 to ×100), and 1.9e-4 is recorded for WRN-16-4 in docs/performance.md: κ is 20× the worst
# seen. No a-priori bound exists (the error of a float32 network grows with its conditioning); the
# price is a clipped norm of C/(1 + κ), 0.4 % below C.
CLIP_MARGIN_ULPS = 2**15


class PerExample(Protocol):
    """One physical chunk's per-example gradients, however they are computed.

    ``norms[i]`` = ‖g_i‖ (to within a relative κ, see :func:`clip_factors`); ``losses[i]`` = example i's
    group-mean loss; ``weighted_sum(c)`` = Σ_i c_i·g_i, called once.
    """

    norms: torch.Tensor
    losses: torch.Tensor

    def weighted_sum(self, factors: torch.Tensor) -> Grads: ...


def clip_factors(norms: torch.Tensor, clip_norm: float) -> torch.Tensor:
    """c_i = min(1, C / (‖g_i‖·(1 + κ) + tiny)), κ relative to the norms' dtype.

    Guarantee: c_i·‖g_i‖ ≤ C whenever the computed norm is at most a relative κ below the true one
    (float rounding of the norm and of the gradient); an absolute margin would not cover large norms.
    """
    f = torch.finfo(norms.dtype)
    return (clip_norm / (norms * (1 + CLIP_MARGIN_ULPS * f.eps) + f.tiny)).clamp(max=1.0)


def clipped_sum(source: PerExample, clip_norm: float) -> Grads:
    """Σ_i c_i·g_i: each example contributes one vector of norm ≤ C (sensitivity C under add/remove)."""
    return source.weighted_sum(clip_factors(source.norms, clip_norm))


def add_noise(summed: Grads, std: float, generator: torch.Generator) -> Grads:
    """summed + N(0, std²·I), drawn in place of a fresh tensor (one allocation per parameter).

    Guarantee: with ``std = σ·C`` on a sum of sensitivity C, the Gaussian mechanism of multiplier σ.
    """
    return {k: torch.empty_like(s).normal_(0.0, std, generator=generator).add_(s) for k, s in summed.items()}


class LogicalStep:
    """One logical step: clipped sums of its physical chunks accumulate; noise is added once; ÷ q·N.

    Guarantee: :meth:`release` returns (Σ_{i∈B} c_i·g_i + N(0, σ²C²·I)) / (q·N) whatever the chunking,
    and can be called once. Dividing by the *expected* batch size q·N (public), not the realised |B|
    (a function of the secret sample), keeps the output post-processing of the noisy sum.
    """

    def __init__(self, params: Mapping[str, torch.Tensor], *, clip_norm: float, noise_multiplier: float, expected_batch_size: float, generator: torch.Generator) -> None:
        self._params = params
        self._sum: Grads | None = None  # the first chunk's clipped sum becomes the accumulator
        self._clip_norm, self._std, self._scale = clip_norm, noise_multiplier * clip_norm, expected_batch_size
        self._generator: torch.Generator | None = generator

    def add(self, source: PerExample) -> None:
        """Clip one chunk's examples and accumulate them (no noise yet)."""
        part = clipped_sum(source, self._clip_norm)
        if self._sum is None:
            self._sum = part
        else:
            for k, g in part.items():
                self._sum[k].add_(g)

    def release(self) -> Grads:
        """The step's noisy mean (an empty batch releases noise alone); the step is spent afterwards."""
        if self._generator is None:
            raise RuntimeError("LogicalStep.release: a step's noise is drawn once; this step was already released")
        summed = self._sum if self._sum is not None else {k: torch.zeros_like(p) for k, p in self._params.items()}
        noisy = add_noise(summed, self._std, self._generator)
        self._generator, self._sum = None, None
        return {k: v.div_(self._scale) for k, v in noisy.items()}


def poisson_sample(n: int, sample_rate: float, generator: torch.Generator) -> torch.Tensor:
    """Indices (on the generator's device) of a Poisson sample: each of n examples joins with prob. q.

    The batch size is random (possibly 0), as the subsampled-Gaussian accounting assumes. Uniforms
    are float64: float32's 2^-24 grid would raise a small q's realised rate (by 0.02 % at q = 1e-4).
    """
    u = torch.rand(n, generator=generator, device=generator.device, dtype=torch.float64)
    return torch.nonzero(u < sample_rate, as_tuple=False).flatten()


def derive_seed(seed: int, purpose: str) -> int:
    """A 64-bit seed for one ``purpose`` from a public seed (so streams of seed s and s + 1 never coincide)."""
    return int.from_bytes(hashlib.sha256(f"dpmix-ray/{purpose}/{seed}".encode()).digest()[:8], "little")


def _generator(device: torch.device, seed: int) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(seed)


@dataclass(frozen=True, eq=False)
class Randomness:
    """The mechanism's two random sources on the training device: Poisson masks and Gaussian noise.

    :meth:`secret`: each generator seeded with 64 bits from ``secrets``; no seed is kept, :meth:`state`
    is None and the object refuses to be pickled or copied, so no checkpoint or result can hold it.
    :meth:`from_seed`: derived from a public seed, reproducible and resumable, and NOT private.
    """

    sampler: torch.Generator = field(repr=False)
    noise: torch.Generator = field(repr=False)
    secret: bool

    @classmethod
    def secret_on(cls, device: torch.device) -> "Randomness":
        return cls(_generator(device, secrets.randbits(64)), _generator(device, secrets.randbits(64)), secret=True)

    @classmethod
    def from_seed(cls, seed: int, device: torch.device) -> "Randomness":
        return cls(_generator(device, derive_seed(seed, "poisson")), _generator(device, derive_seed(seed, "noise")), secret=False)

    def state(self) -> dict[str, torch.Tensor] | None:
        """The generators' states for a checkpoint; None when secret (a resumed run draws afresh)."""
        return None if self.secret else {"sampler": self.sampler.get_state(), "noise": self.noise.get_state()}

    def load_state(self, state: dict[str, torch.Tensor] | None) -> None:
        if self.secret != (state is None):
            raise ValueError("resume state: a run with secret randomness and a reproducible one cannot resume each other")
        if state is not None:
            self.sampler.set_state(state["sampler"])
            self.noise.set_state(state["noise"])

    def __reduce_ex__(self, protocol: Any) -> Any:
        if self.secret:
            raise TypeError("secret mechanism randomness is never pickled, copied or saved")
        return super().__reduce_ex__(protocol)
