"""One-run empirical privacy audit (Steinke, Nasr & Jagielski, NeurIPS 2023, "Privacy auditing
with one (1) training run").

m canaries (mislabelled copies of training images) each join the training split independently
with probability ½, drawn from a secret generator; one run of the exact trainer follows; every
canary is scored by minus its loss averaged over its augmentations, the top-k scores are guessed
"in" and the bottom-k "out". Under (ε, δ)-DP the number of correct guesses is dominated by
Binomial(r, e^ε/(1+e^ε)) plus a δ term; ε_lb is the largest ε that this rejects at 95 %.

The bound's functions are pure; what they prove is in their docstrings. An audit measures the
whole pipeline (augmentation multiplicity, mixup, the fast path) as a user runs it, but only from
below: a small ε_lb does not show that the run is private.
"""

from __future__ import annotations

import math
import secrets
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch
from torch import nn

from dpmix_ray.config import AUDIT_CANARIES, AUDIT_GUESSES, TrainConfig
from dpmix_ray.data import ImageSet, Splits, load_splits
from dpmix_ray.errors import ConfigError
from dpmix_ray.mix import draw, self_augment
from dpmix_ray.trainer import augmentation, fit

CONFIDENCE = 0.95
METHOD = "one-run black-box (Steinke, Nasr & Jagielski 2023), mislabelled canaries, score = -mean loss over augmentations"


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


# --------------------------------------------------------------------------- one audited run


def run_audit(
    cfg: TrainConfig,
    *,
    canaries: int = AUDIT_CANARIES,
    guesses: int = AUDIT_GUESSES,
    splits: Splits | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Audit one training run of ``cfg``: canaries in, train once with the exact trainer, score, bound.

    ``guesses`` is r, fixed before the run (choosing it after seeing the scores would void the
    confidence), split evenly between "in" (top scores) and "out" (bottom scores): both tails carry
    signal, as an excluded mislabelled canary has about the highest loss there is.
    """
    if not 2 <= guesses <= canaries:
        raise ConfigError(f"--guesses: need 2 <= guesses <= canaries (got {guesses} guesses, {canaries} canaries)")
    audited, can = make_canaries(splits or load_splits(cfg.data), canaries, label_seed=cfg.seed)
    fitted = fit(cfg, splits=audited, progress=progress)
    flip, padding = augmentation(cfg, audited)
    scores = canary_scores(fitted.model, can, views=cfg.mix.aug_multiplicity, padding=padding, flip=flip, seed=cfg.seed)
    top = (guesses + 1) // 2
    made = guess(scores, top=top, bottom=guesses - top)
    correct = count_correct(made, can.included)
    delta = cfg.privacy.delta
    res = fitted.result
    counts = dict(canaries=canaries, guesses=guesses, correct=correct)
    return {
        "method": cfg.method,
        "private": res["private"],
        "epsilon": res["epsilon_spent"],
        "epsilon_target": res["epsilon_target"],
        "delta": delta,
        "epsilon_lower_bound": epsilon_lower_bound(delta=delta, **counts),
        "max_provable_epsilon": max_provable_epsilon(delta=delta, canaries=canaries, guesses=guesses),
        **counts,
        "guesses_in": top,
        "guesses_out": guesses - top,
        "canaries_included": int(can.included.sum()),
        "confidence": CONFIDENCE,
        "audit_method": METHOD,
        "n_train": res["n_train"],
        "sample_rate": res["sample_rate"],
        "steps": res["steps"],
        "noise_multiplier": res["noise_multiplier"],
        "val_accuracy": res["val_accuracy"],
    }
