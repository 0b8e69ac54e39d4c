"""Privacy accounting and planning: pure functions over (σ, q, T, δ), and what a run's guarantee covers.

DP-Mix keeps every image of an example's group derived from that example (or public data), and
clips the group's gradient once, so one example changes one clipped vector of norm ≤ C. The
mechanism is therefore plain Poisson-subsampled Gaussian DP-SGD. One accountant name per config
is used for calibration *and* reporting (Opacus's ``get_noise_multiplier`` defaults to RDP while
its ``PrivacyEngine`` defaults to PRV).

Neighbouring datasets (``privacy.neighbouring``), the relation every stated ε is about:

* ``zero_out`` (dp_accounting's ``REPLACE_SPECIAL``): one training example is replaced by a null
  example whose gradient is zero. N is the same on both sides, so it is public, and so are q = B/N,
  T and the divisor q·N. A zeroed example contributes exactly what an absent one would (nothing),
  so each step's output distributions are those of the add/remove analysis with N fixed: Opacus's
  RDP and PRV bounds and dp_accounting's RDP repeat-and-select hold unchanged. dp_accounting
  computes the same ε for Poisson-sampled Gaussian under ``REPLACE_SPECIAL`` and
  ``ADD_OR_REMOVE_ONE`` (RDP and PLD; ``tests/test_privacy.py`` checks it).
* ``replace_one`` (``REPLACE_ONE``): one example is swapped for any other, which moves the clipped
  sum by up to 2C. Only dp_accounting's PLD accountant (``accountant: pld``) bounds it for the
  Poisson-subsampled Gaussian; no accountant here composes it with repeat-and-select.

Add/remove is not offered: it would make N itself private, and every output reports N and derives
q, B, epochs and lr from it.

The cost of hyperparameter tuning (Papernot & Steinke 2022) is accounted with dp_accounting's
RDP ``RepeatAndSelectDpEvent``.
"""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from functools import lru_cache

import numpy as np
from dp_accounting import NeighboringRelation, dp_event, mechanism_calibration, pld, rdp
from opacus.accountants import RDPAccountant, create_accountant
from opacus.accountants.analysis import rdp as opacus_rdp
from opacus.accountants.utils import get_noise_multiplier

from dpmix_ray.config import TrainConfig, with_updates
from dpmix_ray.errors import BudgetError

# Calibration stops once ε_spent is within this fraction below the target (so ε_spent ≥ 0.99·target).
EPSILON_REL_TOLERANCE = 0.01
MAX_STEPS = 10_000_000
# Opacus warns when the optimal RDP order is at the edge of its grid; the bound is still valid (just looser).
warnings.filterwarnings("ignore", message="Optimal order is the largest alpha")
# dp_accounting logs (through absl) each fractional RDP order whose series does not converge at small σ, one
# line per order and per event, and drops the order: the bound stays valid (fewer orders), so not news to a user.
logging.getLogger("absl").addFilter(lambda record: "_compute_log_a_frac failed to converge" not in str(record.msg))
# PLD discretisation: the pessimistic estimate stays an upper bound at any interval; 1e-3 matches 1e-4 to
# 4 decimals of ε on MNIST-5k schedules and is 10× faster.
PLD_INTERVAL = 1e-3
# dp_accounting's name for each privacy.neighbouring.
DP_ACCOUNTING_RELATION = {"zero_out": NeighboringRelation.REPLACE_SPECIAL, "replace_one": NeighboringRelation.REPLACE_ONE}
RELATION_WORDS = {"zero_out": "zero-out one training example (N public)", "replace_one": "replace one training example"}


@dataclass(frozen=True)
class Plan:
    """The privacy-relevant schedule of one run: what the trainer executes and what it spends."""

    noise_multiplier: float
    sample_rate: float
    steps: int
    epochs: float
    epsilon_spent: float
    accountant: str
    neighbouring: str

    def as_dict(self) -> dict:
        return asdict(self)


def epsilon_spent(*, noise_multiplier: float, sample_rate: float, steps: int, delta: float, accountant: str, neighbouring: str) -> float:
    """ε of ``steps`` Poisson-subsampled Gaussian steps (rate q, noise σ) at ``delta``, for ``neighbouring`` datasets."""
    if steps <= 0:
        return 0.0
    if accountant == "pld":
        acc = _pld_accountant(neighbouring)
        acc.compose(dpsgd_event(noise_multiplier, sample_rate, steps))
        return float(acc.get_epsilon(delta))
    _check_relation(accountant, neighbouring)
    if accountant == "rdp":  # Opacus's RDPAccountant, with its curve for one step computed once per (σ, q)
        curve = _rdp_one_step(noise_multiplier, sample_rate) * steps
        eps, _ = opacus_rdp.get_privacy_spent(orders=RDPAccountant.DEFAULT_ALPHAS, rdp=curve, delta=delta)
        return float(eps)
    acc = create_accountant(mechanism=accountant)
    acc.history = [(noise_multiplier, sample_rate, steps)]
    return float(acc.get_epsilon(delta=delta))


@lru_cache(maxsize=1024)
def _rdp_one_step(noise_multiplier: float, sample_rate: float) -> np.ndarray:
    """Opacus's RDP curve of one Poisson-subsampled Gaussian step at its accountant's default orders. Its
    RDPAccountant computes T steps as T times this curve, so searching T (and re-planning a release)
    computes it once instead of once per candidate T (~0.1 s each)."""
    curve = opacus_rdp.compute_rdp(q=sample_rate, noise_multiplier=noise_multiplier, steps=1, orders=RDPAccountant.DEFAULT_ALPHAS)
    curve.setflags(write=False)
    return curve


def _pld_accountant(neighbouring: str) -> pld.PLDAccountant:
    """dp_accounting's PLD accountant for ``neighbouring`` datasets: single runs and release/'s composition alike."""
    return pld.PLDAccountant(DP_ACCOUNTING_RELATION[neighbouring], value_discretization_interval=PLD_INTERVAL)


def _check_relation(accountant: str, neighbouring: str) -> None:
    """Opacus's analyses are add/remove bounds, which hold for zero_out only (module docstring)."""
    if accountant != "pld" and neighbouring != "zero_out":
        raise ValueError(f"the {accountant} accountant bounds zero_out neighbours only, not {neighbouring}: use pld")


def _smallest_sigma(spent: Callable[[float], float], epsilon: float) -> float:
    """Bisect σ until ``epsilon``·(1 − tolerance) ≤ spent(σ) ≤ ``epsilon`` (ε is decreasing in σ)."""
    lo, hi = 0.0, 1.0
    while not spent(hi) <= epsilon:
        lo, hi = hi, hi * 2
        if hi > 1e6:
            raise ValueError("no σ below 1e6 fits")
    for _ in range(60):  # σ is then exact to float precision, tolerance met or not
        if spent(hi) >= (1 - EPSILON_REL_TOLERANCE) * epsilon:
            break
        mid = (lo + hi) / 2
        lo, hi = (lo, mid) if spent(mid) <= epsilon else (mid, hi)
    return hi


@lru_cache(maxsize=1024)
def calibrate_noise(*, epsilon: float, delta: float, sample_rate: float, steps: int, accountant: str, neighbouring: str) -> float:
    """The smallest σ (within 1% of ε) such that T steps spend at most ``epsilon``.

    Guarantee: the returned σ satisfies ε_spent(σ) ≤ epsilon (re-checked here, never assumed).
    Cached: a sweep resolves the same recipe in its plan, its search's default point and each trial
    (~1 s a calibration); a refusal is raised again, never cached.
    """
    def spent(sigma: float) -> float:
        return epsilon_spent(noise_multiplier=sigma, sample_rate=sample_rate, steps=steps, delta=delta, accountant=accountant,
                             neighbouring=neighbouring)

    try:
        if accountant == "pld":
            sigma = _smallest_sigma(spent, epsilon)
        else:
            _check_relation(accountant, neighbouring)
            sigma = get_noise_multiplier(
                target_epsilon=epsilon,
                target_delta=delta,
                sample_rate=sample_rate,
                steps=steps,
                accountant=accountant,
                epsilon_tolerance=EPSILON_REL_TOLERANCE * epsilon,
            )
    except (ValueError, OverflowError, RuntimeError) as e:
        raise BudgetError(
            f"cannot fit ε={epsilon:g}, δ={delta:g} with q={sample_rate:.4g} over {steps} steps: {e}"
        ) from None
    if not spent(sigma) <= epsilon:
        raise BudgetError(f"calibrated σ={sigma:.4g} spends ε={spent(sigma):.4g} > target {epsilon:g}; refusing")
    return float(sigma)


def max_steps(*, epsilon: float, delta: float, sample_rate: float, noise_multiplier: float, accountant: str, neighbouring: str) -> int:
    """The largest T with ε_spent(σ, q, T) ≤ ``epsilon`` (ε is increasing in T)."""

    def fits(t: int) -> bool:
        return epsilon_spent(noise_multiplier=noise_multiplier, sample_rate=sample_rate, steps=t, delta=delta, accountant=accountant,
                             neighbouring=neighbouring) <= epsilon

    if not fits(1):
        raise BudgetError(
            f"σ={noise_multiplier:g} at q={sample_rate:.4g} exceeds ε={epsilon:g} (δ={delta:g}) in a single step"
        )
    lo, hi = 1, 2
    while fits(hi):
        lo, hi = hi, hi * 2
        if hi > MAX_STEPS:
            raise BudgetError(f"σ={noise_multiplier:g} fits more than {MAX_STEPS} steps at ε={epsilon:g}: lower σ")
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo


def steps_for_epochs(epochs: float, sample_rate: float) -> int:
    """Logical steps in ``epochs`` passes at Poisson rate q (an epoch is 1/q expected steps); at least one."""
    return max(1, math.ceil(epochs / sample_rate))


def plan_run(cfg: TrainConfig, n_train: int) -> Plan:
    """Derive the free quantity (σ from epochs, or steps from σ) so that ε_spent ≤ ε_target.

    Raises BudgetError, before anything runs, when the budget can't be met.
    """
    q = min(1.0, cfg.optim.batch_size / n_train)
    p = cfg.privacy
    if not cfg.is_private:
        steps = steps_for_epochs(cfg.optim.epochs, q)
        return Plan(0.0, q, steps, steps * q, math.inf, p.accountant, p.neighbouring)
    accounting = dict(delta=p.delta, sample_rate=q, accountant=p.accountant, neighbouring=p.neighbouring)
    if p.noise_multiplier is None:
        steps = steps_for_epochs(cfg.optim.epochs, q)
        sigma = calibrate_noise(epsilon=p.epsilon, steps=steps, **accounting)
    else:
        sigma = p.noise_multiplier
        steps = max_steps(epsilon=p.epsilon, noise_multiplier=sigma, **accounting)
    spent = epsilon_spent(noise_multiplier=sigma, steps=steps, **accounting)
    if not spent <= p.epsilon:
        raise BudgetError(f"planned run spends ε={spent:.4g} > target {p.epsilon:g}; refusing to run it")
    return Plan(sigma, q, steps, steps * q, spent, p.accountant, p.neighbouring)


def check_plan(plan: Plan, cfg: TrainConfig, n_train: int) -> None:
    """Refuse (BudgetError) a plan that is not this config's on N examples, or that overspends.

    Checked: q = min(1, B/N), the accountant and the neighbouring relation, σ (if the config fixes it),
    T (if it fixes the epochs), and ε recomputed from (σ, q, T, δ) under the config's relation — never
    the plan's own claim — against the target.
    """
    q = min(1.0, cfg.optim.batch_size / n_train)
    p = cfg.privacy
    problems = []
    if not math.isclose(plan.sample_rate, q, rel_tol=1e-12):
        problems.append(f"sample rate {plan.sample_rate:.6g} is not B/N = {q:.6g}")
    if plan.accountant != p.accountant:
        problems.append(f"accountant {plan.accountant} is not the config's {p.accountant}")
    if plan.neighbouring != p.neighbouring:
        problems.append(f"it was planned for {plan.neighbouring} neighbours, not the config's {p.neighbouring}")
    if plan.steps < 1:
        problems.append(f"{plan.steps} steps")
    if cfg.optim.epochs is not None and plan.steps != steps_for_epochs(cfg.optim.epochs, q):
        problems.append(f"{plan.steps} steps are not the config's {cfg.optim.epochs:g} epochs")
    if cfg.is_private:
        if p.noise_multiplier is not None and plan.noise_multiplier != p.noise_multiplier:
            problems.append(f"σ={plan.noise_multiplier:g} is not the config's {p.noise_multiplier:g}")
        if not plan.noise_multiplier > 0:
            problems.append(f"σ={plan.noise_multiplier:g} adds no noise")
        else:
            spent = epsilon_spent(noise_multiplier=plan.noise_multiplier, sample_rate=plan.sample_rate, steps=plan.steps,
                                  delta=p.delta, accountant=p.accountant, neighbouring=p.neighbouring)
            if not spent <= p.epsilon:
                problems.append(f"it spends ε={spent:.6g} > target {p.epsilon:g}")
            if not math.isclose(spent, plan.epsilon_spent, rel_tol=1e-9):
                problems.append(f"it claims ε={plan.epsilon_spent:.6g} but spends {spent:.6g}")
    if problems:
        raise BudgetError(f"privacy plan refused for N={n_train}: " + "; ".join(problems))


def pin_plan(cfg: TrainConfig, plan: Plan, n_train: int) -> TrainConfig:
    """A private ``cfg`` rewritten so that :func:`plan_run` on ``n_train`` examples gives exactly ``plan``'s (σ, q, T).

    A config cannot fix σ and epochs together; with σ fixed the planner runs the most steps within ε.
    So σ is pinned and ε is set to what the plan's T spends: the most steps within that ε is T itself
    (ε grows with T). Checked here, never assumed: BudgetError if the config does not plan to ``plan``.
    On other data (another N) the same σ runs the most steps its own q allows within that ε.
    """
    spent = epsilon_spent(noise_multiplier=plan.noise_multiplier, sample_rate=plan.sample_rate, steps=plan.steps,
                          delta=cfg.privacy.delta, accountant=plan.accountant, neighbouring=plan.neighbouring)
    pinned = with_updates(cfg, {"privacy.noise_multiplier": plan.noise_multiplier, "privacy.epsilon": spent,
                                "privacy.accountant": plan.accountant, "privacy.neighbouring": plan.neighbouring,
                                "optim.epochs": None})
    again = plan_run(pinned, n_train)
    if (again.noise_multiplier, again.steps) != (plan.noise_multiplier, plan.steps) or not math.isclose(again.sample_rate, plan.sample_rate, rel_tol=1e-12):
        raise BudgetError(f"cannot pin σ={plan.noise_multiplier:g}, T={plan.steps} in a config: it plans σ={again.noise_multiplier:g}, T={again.steps}")
    return pinned


def private_run(cfg: TrainConfig) -> bool:
    """Whether a run's (ε, δ) holds: a private method with secret mechanism randomness."""
    return cfg.is_private and not cfg.privacy.reproducible


def relation_phrase(cfg: TrainConfig, *, at: tuple[float, float] | None = None) -> str:
    """The neighbouring relation a stated (ε, δ) is about, in words; every guarantee text says it through this.

    ``data.limit`` keeps a prefix of the training split in hash order, so one changed example of the
    full split can also change which other example falls inside the limit: a replacement. Under
    zero_out that is two zero-outs, (2ε, (1+e^ε)δ) by group privacy (with numbers where ``at`` =
    (ε, δ) is given); under replace_one it is what the accounting already covers.
    """
    p = cfg.privacy
    words = f"neighbouring datasets: {RELATION_WORDS[p.neighbouring]}"
    if cfg.data.limit is None:
        return words
    limit = f"data.limit={cfg.data.limit} keeps a prefix of the training split in hash order, so one changed example can swap another in or out"
    if p.neighbouring == "replace_one":
        return f"{words}; {limit}: a replacement, which the stated (ε, δ) covers"
    worse = "" if at is None else f" = ({2 * at[0]:.4g}, {(1 + math.exp(at[0])) * at[1]:.3g})"
    return f"{words}; {limit}: against such a replacement only (2ε, (1+e^ε)δ){worse} holds, by group privacy"


def run_guarantee(cfg: TrainConfig, n_train: int) -> str:
    """One line: what a single run's (ε, δ) covers, or why there is none."""
    p = cfg.privacy
    if not cfg.is_private:
        return "NOT PRIVATE: method nonprivate neither clips nor adds noise"
    if p.reproducible:
        return (
            f"NOT PRIVATE: privacy.reproducible is true, so the Poisson masks and the noise derive from the public "
            f"seed {cfg.seed} and can be recomputed and removed; the nominal ε={p.epsilon:g} would need secret randomness"
        )
    return (
        f"(ε={p.epsilon:g}, δ={p.delta:g})-DP ({p.accountant} accountant; {relation_phrase(cfg, at=(p.epsilon, p.delta))}) "
        f"for the N={n_train} examples of the training split, for this one run; the validation and test splits are "
        "held-out data, and what is computed on them (accuracies, selection) is not private"
    )


# --------------------------------------------------------------------------- tuning cost

_RDP_ORDERS = tuple([1 + x / 10.0 for x in range(1, 100)] + list(range(11, 64)) + [128, 256, 512, 1024])


def _tuning_accountant() -> rdp.RdpAccountant:
    """RDP under zero-out: dp_accounting composes repeat-and-select for it, not for replace-one."""
    return rdp.RdpAccountant(list(_RDP_ORDERS), DP_ACCOUNTING_RELATION["zero_out"])


def dpsgd_event(noise_multiplier: float, sample_rate: float, steps: int) -> dp_event.DpEvent:
    """One DP-SGD run as dp_accounting sees it: T Poisson-subsampled Gaussian steps."""
    return dp_event.SelfComposedDpEvent(
        dp_event.PoissonSampledDpEvent(sample_rate, dp_event.GaussianDpEvent(noise_multiplier)), steps
    )


def repeat_and_select_epsilon(
    *, noise_multiplier: float, sample_rate: float, steps: int, delta: float, mean_trials: float, shape: float
) -> float:
    """ε of releasing the best of a random number of DP-SGD trials (Papernot & Steinke 2022), zero-out neighbours.

    The trial count must be drawn from the distribution named by ``shape`` (∞ = Poisson, 1 =
    geometric, otherwise truncated negative binomial) with mean ``mean_trials``, and selection may
    depend on the trials' outputs only through this random search.
    """
    return composed_epsilon([repeat_and_select_event(dpsgd_event(noise_multiplier, sample_rate, steps), mean_trials, shape)], delta)


def repeat_and_select_event(run: dp_event.DpEvent, mean_trials: float, shape: float) -> dp_event.DpEvent:
    """Releasing the best of a random number of ``run`` trials (count distribution as in :func:`repeat_and_select_epsilon`)."""
    return dp_event.RepeatAndSelectDpEvent(run, mean_trials, shape)


def composed_epsilon(events: Sequence[dp_event.DpEvent], delta: float, neighbouring: str = "zero_out") -> float:
    """ε at ``delta`` of publishing the outputs of every event together, on the same data.

    Releases from one training split compose: their RDP curves add up in one accountant, which is
    tighter than summing ε's and still far above any one release's ε. Under ``replace_one`` the runs
    compose in dp_accounting's PLD accountant (RDP would state the zero-out figure; repeat-and-select is
    refused there). No event: nothing released, ε = 0.
    """
    if not events:
        return 0.0
    if neighbouring == "replace_one":
        acc = _pld_accountant(neighbouring)
    else:
        acc = _tuning_accountant()
    for event in events:
        acc.compose(event)
    return float(acc.get_epsilon(delta))


def calibrate_noise_for_tuning(
    *, epsilon: float, delta: float, sample_rate: float, steps: int, mean_trials: float, shape: float
) -> float:
    """The smallest σ such that the whole random search (repeat-and-select) meets ``epsilon``."""

    def event(sigma: float) -> dp_event.DpEvent:
        return repeat_and_select_event(dpsgd_event(sigma, sample_rate, steps), mean_trials, shape)

    try:
        sigma = mechanism_calibration.calibrate_dp_mechanism(
            _tuning_accountant,
            event,
            epsilon,
            delta,
            mechanism_calibration.LowerEndpointAndGuess(1e-3, 1.0),
            tol=1e-4,
        )
    except mechanism_calibration.NoBracketIntervalFoundError:
        raise BudgetError(f"cannot fit a random search of mean {mean_trials:g} trials into ε={epsilon:g}") from None
    # Brent's tolerance is in σ-space: nudge σ up until the bound provably holds.
    while repeat_and_select_epsilon(
        noise_multiplier=sigma, sample_rate=sample_rate, steps=steps, delta=delta, mean_trials=mean_trials, shape=shape
    ) > epsilon:
        sigma *= 1.001
    return float(sigma)
