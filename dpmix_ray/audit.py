"""One-run empirical privacy audits: white-box gradient canaries (the default) and black-box input canaries.

White-box (Steinke, Nasr & Jagielski 2023, §white-box; Mahloujifar, Melis & Chaudhuri, ICML 2025): m
canary slots join N (N = N_real + m whatever is drawn: the zero-out relation), each holding a fixed
gradient direction of norm ``CANARY_NORM``·C (far above C, so a missing clip shows) with probability ½
from a secret draw, else a zero gradient. Every slot is Poisson-sampled into each logical step like any
example and enters through the same ``mechanism.LogicalStep.add`` (one more PerExample source). The
auditor sees every released update and scores each canary by Σ_t ⟨direction, update_t⟩; the scores
never use the canaries' Poisson masks. Black-box (``white_box=False``): mislabelled training images,
scored by minus their loss on the final model.

Guesses: a public random half of the canaries tunes the number of guesses (top half "in", bottom half
"out", the rest abstain); the other half alone is scored. Estimators: Steinke et al.'s binomial bound and
the f-DP bound against the run's own trade-off curve (its PLD, dp_accounting); with ``estimator="max"``
each is taken at 97.5 % and the larger reported, so ε_lb stays a 95 % bound (Bonferroni). An f-DP
bound against a Gaussian (GDP) null is reported beside them, labelled, and kept out of ε_lb.

The bound's functions are pure; what they prove is in their docstrings. An audit measures the whole
pipeline from below only: a small ε_lb does not show that the run is private.
"""

from __future__ import annotations

import math
import secrets
from dataclasses import dataclass, replace
from collections.abc import Mapping
from typing import Any, Callable

import numpy as np
import torch
from dp_accounting import get_sigma_gaussian
from dp_accounting.pld import privacy_loss_distribution as PLD
from scipy.stats import norm as _normal
from torch import nn

from dpmix_ray.config import AUDIT_CANARIES, TrainConfig
from dpmix_ray.data import ImageSet, Splits, load_splits
from dpmix_ray.errors import ConfigError
from dpmix_ray import mechanism as M
from dpmix_ray.mix import draw, self_augment
from dpmix_ray.trainer import augmentation, fit

CONFIDENCE = 0.95
METHOD = "one-run black-box (Steinke, Nasr & Jagielski 2023), mislabelled canaries, score = -mean loss over augmentations"
WHITE_BOX_METHOD = "one-run white-box gradient canaries (zero-out slots, N = N_real + m), score = sum over steps of <direction, released update>"
CANARY_NORM = 100.0  # a canary's gradient norm before clipping, in units of C
ESTIMATORS = ("max", "steinke", "fdp")


# --------------------------------------------------------------------------- the bound (pure)


def _binom_pmf(n: int, p: float) -> np.ndarray:
    """P[Binomial(n, p) = j] for j = 0..n, from log-gamma (independent of scipy, which the tests use)."""
    j = np.arange(n + 1)
    if p <= 0.0 or p >= 1.0:
        return (j == (0 if p <= 0.0 else n)).astype(float)
    log_choose = np.array([math.lgamma(n + 1) - math.lgamma(i + 1) - math.lgamma(n - i + 1) for i in j])
    return np.exp(log_choose + j * math.log(p) + (n - j) * math.log1p(-p))


def p_value(*, epsilon: float, delta: float, canaries: int, guesses: int, correct: int) -> float:
    """An upper bound, valid for every (ε, δ)-DP training run, on P[≥ ``correct`` of ``guesses`` right].

    Steinke et al. (Thm. 3.1 and their p-value algorithm): with m canaries each included
    independently with probability ½ and r guesses made from the trained model alone,
    P[W ≥ v] ≤ β + 2mδ·α, where β = P[Binomial(r, e^ε/(1+e^ε)) ≥ v] and
    α = max_{1≤i≤v} P[v−i ≤ Binomial(r, ·) < v] / i. A value ≤ 1 − confidence rejects
    "the run is (ε, δ)-DP" at that confidence.
    """
    if not 0 <= correct <= guesses <= canaries:
        raise ValueError(f"need 0 <= correct <= guesses <= canaries (got {correct}, {guesses}, {canaries})")
    pmf = _binom_pmf(guesses, 1.0 / (1.0 + math.exp(-epsilon)))
    beta = float(pmf[correct:].sum())
    if delta == 0 or correct == 0:
        return min(1.0, beta)
    below = np.cumsum(pmf[correct - 1 :: -1])  # below[i-1] = P[v−i ≤ Bin < v]
    alpha = float(np.max(below / np.arange(1, correct + 1)))
    return min(1.0, beta + 2 * canaries * delta * alpha)


def epsilon_lower_bound(*, delta: float, canaries: int, guesses: int, correct: int, confidence: float = CONFIDENCE) -> float:
    """The largest ε for which (ε, δ)-DP is rejected at ``confidence``; 0 when even ε = 0 is not.

    Guarantee: if the training run were (ε, δ)-DP for any ε ≤ the returned value (bisected to 1e-6,
    from below), an outcome this good or better would have had probability ≤ 1 − confidence. It
    is a lower bound on the run's true ε at this δ, never an upper bound.
    """
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must lie in (0, 1) (got {confidence})")
    alpha = 1.0 - confidence

    def rejected(eps: float) -> bool:
        return p_value(epsilon=eps, delta=delta, canaries=canaries, guesses=guesses, correct=correct) <= alpha

    if not rejected(0.0):
        return 0.0
    lo, hi = 0.0, 1.0
    while rejected(hi):  # p_value increases with ε and tends to 1 when correct > 0
        lo, hi = hi, 2 * hi
    while hi - lo > 1e-6:
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if rejected(mid) else (lo, mid)
    return lo


def max_provable_epsilon(*, delta: float, canaries: int, guesses: int, confidence: float = CONFIDENCE) -> float:
    """The most any black-box audit with these counts can show: ε_lb when every guess is right.

    With δ = 0 and 95 % confidence: about 3.5 for 100 guesses, 5.8 for 1,000. An ε above this can
    neither be confirmed nor refuted by such an audit.
    """
    return epsilon_lower_bound(delta=delta, canaries=canaries, guesses=guesses, correct=guesses, confidence=confidence)


# --------------------------------------------------------------------------- the f-DP bound (pure)

TradeOff = Callable[[float], float]


def fdp_rejects(tradeoff: TradeOff, *, canaries: int, guesses: int, correct: int, confidence: float = CONFIDENCE) -> bool:
    """Whether ``correct`` of ``guesses`` right rejects "the run is f-DP" at ``confidence`` (Mahloujifar et al. 2025).

    ``tradeoff`` is a symmetric trade-off curve f (type II error at type I error α). Their recursive bound:
    under f-DP with m canaries each in with probability ½, P[≥ v of k guesses right] ≤ 1 − confidence
    whenever, starting from r = (1−c)·v/m and h = (1−c)·(k−v)/m, raising h to f(1 − r) and r by the
    matching share i/(k−i) of that rise (i = v−1 … 0, r capped at 1) ends with r + h > k/m.
    """
    if not 0 <= correct <= guesses <= canaries:
        raise ValueError(f"need 0 <= correct <= guesses <= canaries (got {correct}, {guesses}, {canaries})")
    level = 1.0 - confidence
    right, wrong = level * correct / canaries, level * (guesses - correct) / canaries
    for i in range(correct - 1, -1, -1):
        raised = max(wrong, tradeoff(1.0 - right))
        if raised <= wrong:  # a fixed point: neither moves again
            break
        right, wrong = min(1.0, right + i / (guesses - i) * (raised - wrong)), raised
    return right + wrong > guesses / canaries


def gaussian_tradeoff(mu: float) -> TradeOff:
    """The μ-GDP curve f(α) = Φ(Φ⁻¹(1−α) − μ)."""
    return lambda alpha: float(_normal.cdf(_normal.ppf(1.0 - alpha) - mu))


def profile_tradeoff(epsilons: np.ndarray, deltas: np.ndarray) -> TradeOff:
    """The trade-off curve implied by (ε_j, δ_j)-DP for every j (ε_j ≥ 0): the sup of the two lines each pair gives.

    Guarantee: a mechanism (ε_j, δ_j)-DP for all j (both directions) is f-DP for this f; a coarser grid or
    larger δ_j only lowers f (a weaker, still valid null).
    """
    e, d = np.asarray(epsilons, float), np.asarray(deltas, float)
    grow, shrink = np.exp(e), np.exp(-e)

    def f(alpha: float) -> float:
        return float(max(0.0, np.max(1.0 - d - grow * alpha), np.max(shrink * (1.0 - d - alpha))))

    return f


_PROFILE_EPSILONS = np.linspace(0.0, 30.0, 1501)


def subsampled_gaussian_tradeoff(noise_multiplier: float, sample_rate: float, steps: int) -> tuple[TradeOff, Any]:
    """The trade-off curve of T Poisson-subsampled Gaussian steps (σ, q), from dp_accounting's pessimistic PLD, and the PLD.

    Guarantee: the run's mechanism (add/remove or zero-out of one example) is f-DP for the returned f.
    """
    pld = PLD.from_gaussian_mechanism(noise_multiplier, sampling_prob=sample_rate, value_discretization_interval=1e-3).self_compose(steps)
    deltas = np.asarray(pld.get_delta_for_epsilon(_PROFILE_EPSILONS), float)
    return profile_tradeoff(_PROFILE_EPSILONS, deltas), pld


def _largest_rejected(rejected: Callable[[float], bool], lo: float, hi: float, tol: float = 1e-4) -> float:
    """For ``rejected`` monotone (true up to some point), the largest x in [lo, hi] known rejected, from below; lo if none."""
    if not rejected(lo):
        return lo
    if rejected(hi):
        return hi
    while hi - lo > tol * max(1.0, lo):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if rejected(mid) else (lo, mid)
    return lo


def epsilon_lower_bound_fdp(*, sample_rate: float, steps: int, delta: float, canaries: int, guesses: int, correct: int,
                            confidence: float = CONFIDENCE) -> float:
    """ε_lb against the run's own family: T Poisson-subsampled Gaussian steps at rate q, for every σ.

    Rejected σ form an interval [σ*, ∞) (more noise, a stronger f); ε_lb is the PLD ε at δ of the least noise
    still rejected at ``confidence`` (σ bisected on a log scale, rounded towards more noise: from below in ε).
    Guarantee: a run whose mechanism is at least as private as σ = σ(ε_claimed) shows ε_lb > ε_claimed with
    probability ≤ 1 − confidence. 0 when no σ ≤ 1000 is rejected.
    """

    def rejected(log_sigma: float) -> bool:
        f, _ = subsampled_gaussian_tradeoff(math.exp(log_sigma), sample_rate, steps)
        return fdp_rejects(f, canaries=canaries, guesses=guesses, correct=correct, confidence=confidence)

    lo, hi = math.log(0.25), math.log(1000.0)
    if not rejected(hi):
        return 0.0
    # the smallest rejected log σ: bisect "not rejected" from the low end
    lowest = -_largest_rejected(lambda x: rejected(-x), -hi, -lo, tol=1e-3)
    _, pld = subsampled_gaussian_tradeoff(math.exp(lowest), sample_rate, steps)
    return float(pld.get_epsilon_for_delta(delta))


def epsilon_lower_bound_fdp_gdp(*, delta: float, canaries: int, guesses: int, correct: int, confidence: float = CONFIDENCE) -> float:
    """ε_lb against a Gaussian mechanism's curve at (ε, δ) (μ = 1/σ_Gauss(ε, δ)), as jax_privacy's ``epsilon_one_run_fdp``.

    NOT a sound bound for DP-SGD: a subsampled, composed mechanism at (ε, δ) need not be μ-GDP for that μ.
    Reported for comparison only.
    """

    def rejected(eps: float) -> bool:
        sigma = get_sigma_gaussian(eps, delta)
        f = (lambda a: float(a <= 0.0)) if sigma == 0 else gaussian_tradeoff(1.0 / sigma)
        return fdp_rejects(f, canaries=canaries, guesses=guesses, correct=correct, confidence=confidence)

    hi = 1.0
    while rejected(hi) and hi < 64:
        hi *= 2
    return _largest_rejected(rejected, 0.0, hi, tol=1e-6)


def combined_lower_bound(*, estimator: str, delta: float, sample_rate: float, steps: int, canaries: int, guesses: int,
                         correct: int, confidence: float = CONFIDENCE) -> tuple[float, str, dict[str, float]]:
    """(ε_lb, the estimator that gave it, every estimator's value) at ``confidence`` overall.

    ``estimator`` "steinke" or "fdp" is named in advance and taken at ``confidence``; "max" takes both at
    1 − (1 − confidence)/2 and the larger (Bonferroni), so ε_lb keeps ``confidence``.
    """
    if estimator not in ESTIMATORS:
        raise ConfigError(f"--estimator: one of {', '.join(ESTIMATORS)} (got {estimator!r})")
    each = confidence if estimator != "max" else 1.0 - (1.0 - confidence) / 2
    counts = dict(canaries=canaries, guesses=guesses, correct=correct, confidence=each)
    values = {}
    if estimator in ("max", "steinke"):
        values["steinke"] = epsilon_lower_bound(delta=delta, **counts)
    if estimator in ("max", "fdp"):
        values["fdp"] = epsilon_lower_bound_fdp(sample_rate=sample_rate, steps=steps, delta=delta, **counts)
    best = max(values, key=lambda k: values[k])
    return values[best], best, values


# --------------------------------------------------------------------------- canaries


@dataclass(frozen=True)
class Canaries:
    """Canary images and their (wrong) labels, and which ones joined the training split (secret until scored)."""

    x: torch.Tensor
    y: torch.Tensor
    included: np.ndarray

    def __len__(self) -> int:
        return len(self.y)


def make_canaries(splits: Splits, count: int, *, label_seed: int) -> tuple[Splits, Canaries]:
    """Take the last ``count`` training images as canaries, relabelled to a different class.

    The training split is in the order of a keyed hash of each image (``data.load_splits``), so these
    are a random subset, independent of the labels. A mislabelled image is far from what the other
    data teach (its loss is high unless it was trained on), which is what gives the audit power. The
    labels come from the public ``label_seed``; which canaries join comes from a generator seeded
    with 128 secret bits, fresh per call and never stored. Returns the training split with the
    included canaries appended (so N, q and the δ < 1/N check count them) and the canaries.
    """
    train = splits.train
    if not 2 <= count < len(train):
        raise ConfigError(f"--canaries: need 2 <= m < {len(train)}, the training examples (got {count})")
    shift = torch.from_numpy(np.random.default_rng(label_seed).integers(1, splits.num_classes, size=count))
    included = np.random.default_rng(secrets.randbits(128)).random(count) < 0.5
    canaries = Canaries(train.x[-count:], (train.y[-count:] + shift) % splits.num_classes, included)
    keep = torch.from_numpy(included)
    audited = ImageSet(torch.cat([train.x[:-count], canaries.x[keep]]), torch.cat([train.y[:-count], canaries.y[keep]]),
                       torch.cat([train.key[:-count], train.key[-count:][keep]]))  # a canary keeps its image's key
    return replace(splits, train=audited), canaries


# --------------------------------------------------------------------------- scoring and guessing


@torch.no_grad()
def canary_scores(
    model: nn.Module, canaries: Canaries, *, views: int, padding: int, flip: bool, seed: int, batch: int = 256
) -> np.ndarray:
    """Minus each canary's cross-entropy (against its canary label), averaged over ``views`` augmentations.

    Higher means "more likely trained on". Only the trained model is read (a black-box audit);
    the augmentations are the trainer's crops and flips, drawn from a public ``seed``.
    """
    model.eval()
    device = next(model.parameters()).device
    out = []
    for lo in range(0, len(canaries), batch):
        x = canaries.x[lo : lo + batch].to(device)
        y = canaries.y[lo : lo + batch].to(device)
        key = torch.arange(lo, lo + len(y), device=device)  # scoring is post-processing: position keys will do
        d = draw(y, key, seed=seed, step=0, image_hw=(x.shape[2], x.shape[3]), k=views, m=0, n=0, alpha=1.0, padding=padding, flip=flip)
        logits = model(self_augment(x, d.crop, d.flip, padding=padding).flatten(0, 1))  # [b·V, classes]
        loss = nn.functional.cross_entropy(logits, y.repeat_interleave(views), reduction="none")
        out.append(-loss.view(len(y), views).mean(1).cpu())
    return torch.cat(out).double().numpy()


def guess(scores: np.ndarray, *, top: int, bottom: int) -> np.ndarray:
    """+1 ("in") for the ``top`` highest scores, −1 ("out") for the ``bottom`` lowest, 0 (abstain) elsewhere."""
    if top < 0 or bottom < 0 or top + bottom > len(scores):
        raise ValueError(f"guesses: need 0 <= top, bottom and top + bottom <= {len(scores)} canaries")
    order = np.argsort(scores, kind="stable")
    out = np.zeros(len(scores), dtype=np.int64)
    out[order[len(scores) - top :]] = 1
    out[order[:bottom]] = -1
    return out


def count_correct(guesses: np.ndarray, included: np.ndarray) -> int:
    """Guesses that match the truth: +1 on an included canary, −1 on an excluded one."""
    truth = np.where(included, 1, -1)
    return int(np.sum(guesses == truth))


# --------------------------------------------------------------------------- white-box canary slots


class CanaryChunk:
    """The canary slots Poisson-sampled into one step, as a :class:`mechanism.PerExample` source.

    Slot i holds ``norm``·u_i when included, the zero vector when not (the zero-out neighbour).
    """

    def __init__(self, slots: "CanarySlots", picked: torch.Tensor, params: Mapping[str, torch.Tensor]) -> None:
        self._slots, self._picked, self._params = slots, picked, params
        scale = slots.norm * slots.included_t[picked].to(torch.float64)
        self.norms = scale.to(next(iter(params.values())).dtype)
        self.losses = torch.zeros_like(self.norms)

    def weighted_sum(self, factors: torch.Tensor) -> M.Grads:
        coef = (factors.to(torch.float64) * self.norms.to(torch.float64)).to(self.norms.dtype)
        flat = self._slots.combine(self._picked, coef)
        out, at = {}, 0
        for k, p in self._params.items():
            out[k] = flat[at : at + p.numel()].view_as(p).clone()
            at += p.numel()
        return out


class CanarySlots:
    """m white-box canary slots (a :class:`trainer.StepExtra`): fixed unit directions, secret inclusion, released-update sums.

    Directions are public, from ``seed``: ``"dirac"`` (m distinct coordinates of the flattened trainable
    parameters) or ``"random"`` (Gaussian directions, normalised). Inclusion (probability ½ each) and the
    slots' Poisson masks come from generators seeded with 128 / 64 secret bits, never stored.
    """

    def __init__(self, count: int, *, clip_norm: float, seed: int, directions: str = "dirac",
                 included: np.ndarray | None = None) -> None:
        if count < 2:
            raise ConfigError(f"--canaries: need at least 2 (got {count})")
        if directions not in ("dirac", "random"):
            raise ConfigError(f"--directions: dirac or random (got {directions!r})")
        self.examples, self.norm, self.seed, self.directions = count, CANARY_NORM * clip_norm, seed, directions
        self.included = np.random.default_rng(secrets.randbits(128)).random(count) < 0.5 if included is None else included
        self.included_t = torch.from_numpy(self.included)
        self._sampler = torch.Generator().manual_seed(secrets.randbits(64))
        self._dim: int | None = None
        self._coords: torch.Tensor | None = None
        self.update_sum: torch.Tensor | None = None  # Σ_t released update_t, flattened (float64)

    def _setup(self, params: Mapping[str, torch.Tensor]) -> None:
        self._dim = sum(p.numel() for p in params.values())
        self._device, self._dtype = next(iter(params.values())).device, next(iter(params.values())).dtype
        if self.directions == "dirac":
            if self.examples > self._dim:
                raise ConfigError(f"--canaries: {self.examples} Dirac canaries need as many coordinates (the model has {self._dim})")
            gen = torch.Generator().manual_seed(M.derive_seed(self.seed, "canary/dirac"))
            self._coords = torch.randperm(self._dim, generator=gen)[: self.examples]

    def direction(self, i: int) -> torch.Tensor:
        """u_i, a unit vector over the flattened trainable parameters (float64, CPU)."""
        assert self._dim is not None
        if self._coords is not None:
            u = torch.zeros(self._dim, dtype=torch.float64)
            u[self._coords[i]] = 1.0
            return u
        g = torch.randn(self._dim, generator=torch.Generator().manual_seed(M.derive_seed(self.seed, f"canary/{i}")), dtype=torch.float64)
        return g / g.norm()

    def combine(self, picked: torch.Tensor, coef: torch.Tensor) -> torch.Tensor:
        """Σ_j coef_j · u_{picked_j}, flattened, on the parameters' device and dtype."""
        assert self._dim is not None
        flat = torch.zeros(self._dim, dtype=torch.float64)
        if self._coords is not None:
            flat.index_add_(0, self._coords[picked], coef.double().cpu())
        else:
            for i, c in zip(picked.tolist(), coef.double().cpu().tolist()):
                flat.add_(self.direction(i), alpha=c)
        return flat.to(self._device, self._dtype)

    def sample(self, params: Mapping[str, torch.Tensor], sample_rate: float) -> CanaryChunk | None:
        """This step's Poisson sample of the m slots (included or not: an excluded slot adds a zero vector)."""
        if self._dim is None:
            self._setup(params)
        picked = M.poisson_sample(self.examples, sample_rate, self._sampler)
        return CanaryChunk(self, picked, params) if len(picked) else None

    def released(self, update: M.Grads) -> None:
        flat = torch.cat([u.detach().flatten().double().cpu() for u in update.values()])
        self.update_sum = flat if self.update_sum is None else self.update_sum.add_(flat)

    def scores(self) -> np.ndarray:
        """Σ_t ⟨u_i, update_t⟩ = ⟨u_i, Σ_t update_t⟩ for each slot: the released updates only, no mask."""
        if self.update_sum is None:
            raise RuntimeError("CanarySlots.scores: no update was released")
        if self._coords is not None:
            return self.update_sum[self._coords].numpy()
        return np.array([float(self.direction(i) @ self.update_sum) for i in range(self.examples)])


# --------------------------------------------------------------------------- guesses tuned on a held-out half

GUESS_FRACTIONS = (0.02, 0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0)


def tuned_guess_count(scores: np.ndarray, included: np.ndarray, *, delta: float) -> int:
    """The number of guesses (half top "in", half bottom "out") that proves most on these held-out canaries.

    Candidates are ``GUESS_FRACTIONS`` of the canaries (at least 2); the criterion is Steinke et al.'s bound
    (cheap). Use it on canaries that are not scored: choosing k from the scored ones would void the confidence.
    """
    m = len(scores)
    best_k, best = 2, -1.0
    for k in sorted({max(2, int(round(f * m))) for f in GUESS_FRACTIONS}):
        top = (k + 1) // 2
        correct = count_correct(guess(scores, top=top, bottom=k - top), included)
        eps = epsilon_lower_bound(delta=delta, canaries=m, guesses=k, correct=correct)
        if eps > best:
            best_k, best = k, eps
    return best_k


def split_halves(count: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A public random split of the canary indices: (held out to tune the guesses, scored)."""
    order = np.random.default_rng(M.derive_seed(seed, "canary/split")).permutation(count)
    return np.sort(order[: count // 2]), np.sort(order[count // 2 :])


# --------------------------------------------------------------------------- one audited run


def bound_from_scores(scores: np.ndarray, included: np.ndarray, *, guesses: int | None, seed: int, estimator: str, delta: float,
                      sample_rate: float, steps: int) -> dict[str, Any]:
    """Guess and bound: ``guesses`` fixed in advance (all canaries scored), or None: tuned on a public half, the other half scored."""
    if guesses is None:
        held, scored = split_halves(len(scores), seed)
        k = tuned_guess_count(scores[held], included[held], delta=delta)
    else:
        scored, k = np.arange(len(scores)), guesses
    if not 2 <= k <= len(scored):
        raise ConfigError(f"--guesses: need 2 <= guesses <= canaries (got {k} guesses, {len(scored)} canaries)")
    top = (k + 1) // 2
    correct = count_correct(guess(scores[scored], top=top, bottom=k - top), included[scored])
    counts = dict(canaries=len(scored), guesses=k, correct=correct)
    eps, name, values = combined_lower_bound(estimator=estimator, delta=delta, sample_rate=sample_rate, steps=steps, **counts)
    return {
        "epsilon_lower_bound": eps,
        "estimator": name,
        "estimates": values,
        "epsilon_lb_fdp_gaussian_null": epsilon_lower_bound_fdp_gdp(delta=delta, **counts),
        "max_provable_epsilon": max_provable_epsilon(delta=delta, canaries=len(scored), guesses=k),
        "canaries_scored": len(scored),
        "guesses_tuned": guesses is None,
        "guesses": k,
        "correct": correct,
        "guesses_in": top,
        "guesses_out": k - top,
    }


def run_audit(
    cfg: TrainConfig,
    *,
    canaries: int = AUDIT_CANARIES,
    guesses: int | None = None,
    splits: Splits | None = None,
    progress: bool = True,
    white_box: bool = True,
    estimator: str = "max",
    directions: str = "dirac",
) -> dict[str, Any]:
    """Audit one training run of ``cfg``: canaries in, train once with the exact trainer, score, bound.

    White-box (default): :class:`CanarySlots` ride along every logical step; black-box: mislabelled
    training images scored on the final model. ``guesses`` None tunes their number on a public half of the
    canaries and scores the other half; an integer is fixed before the run and every canary is scored.
    ``estimator``: "max" (both at 97.5 %, the larger), or "steinke" / "fdp" named in advance.
    """
    if estimator not in ESTIMATORS:
        raise ConfigError(f"--estimator: one of {', '.join(ESTIMATORS)} (got {estimator!r})")
    if guesses is not None and not 2 <= guesses <= canaries:
        raise ConfigError(f"--guesses: need 2 <= guesses <= canaries (got {guesses} guesses, {canaries} canaries)")
    splits = splits or load_splits(cfg.data)
    if white_box:
        slots = CanarySlots(canaries, clip_norm=cfg.privacy.clip_norm, seed=cfg.seed, directions=directions)
        fitted = fit(cfg, splits=splits, progress=progress, extra=slots)
        scores, included = slots.scores(), slots.included
    else:
        audited, can = make_canaries(splits, canaries, label_seed=cfg.seed)
        fitted = fit(cfg, splits=audited, progress=progress)
        flip, padding = augmentation(cfg, audited)
        scores = canary_scores(fitted.model, can, views=cfg.mix.aug_multiplicity, padding=padding, flip=flip, seed=cfg.seed)
        included = can.included
    res = fitted.result
    delta = cfg.privacy.delta
    bound = bound_from_scores(scores, included, guesses=guesses, seed=cfg.seed, estimator=estimator, delta=delta,
                              sample_rate=res["sample_rate"], steps=res["steps"])
    return {
        "method": cfg.method,
        "private": res["private"],
        "guarantee": res["guarantee"],
        "setting": "white-box" if white_box else "black-box",
        "epsilon": res["epsilon_spent"],
        "epsilon_target": res["epsilon_target"],
        "delta": delta,
        **bound,
        "canaries": canaries,
        "canaries_included": int(included.sum()),
        "confidence": CONFIDENCE,
        "audit_method": (WHITE_BOX_METHOD + f", {directions} directions") if white_box else METHOD,
        "n_train": res["n_train"],
        "sample_rate": res["sample_rate"],
        "steps": res["steps"],
        "noise_multiplier": res["noise_multiplier"],
        "val_accuracy": res["val_accuracy"],
    }
