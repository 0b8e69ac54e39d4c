"""The mechanism (``mechanism.py``) alone and as the trainer runs it: sampling, clipping, noise, randomness.

The trainer-level tests watch what each optimizer step receives (``breaks.record_updates``), so a
mechanism wired wrongly into the loop fails here even when its parts pass their unit tests.
"""

import copy
import io
import json
import math
import pickle

import numpy as np
import pytest
import torch
from scipy.stats import chi2

from breaks import break_mechanism, record_updates
from dpmix_ray import bookkeeping as BK
from dpmix_ray import grads as G
from dpmix_ray import mechanism as M
from dpmix_ray import trainer as T
from dpmix_ray.config import ModelConfig, load_train_config
from dpmix_ray.data import load_splits
from dpmix_ray.mix import build_groups
from dpmix_ray.models import build_model

TINY = ["data.name=digits", "optim.batch_size=64", "mix.aug_multiplicity=2", "mix.self_mix=1", "optim.lr=1.0", "privacy.epsilon=8"]


@pytest.fixture(scope="module")
def digits():
    return load_splits(load_train_config(None, TINY).data)


class Zeros:
    """A chunk whose per-example gradients are all zero: what a step releases is its noise alone."""

    def __init__(self, params: dict[str, torch.Tensor], b: int) -> None:
        self.norms, self.losses = torch.zeros(b), torch.zeros(b)
        self._params = params

    def weighted_sum(self, factors: torch.Tensor) -> M.Grads:
        return {k: torch.zeros_like(p) for k, p in self._params.items()}


# --------------------------------------------------------------------------- the parts


def test_poisson_sampling_rate_and_independence():
    n, q, draws = 2000, 0.03, 400
    gen = torch.Generator().manual_seed(0)
    sizes, counts = [], torch.zeros(n)
    for _ in range(draws):
        idx = M.poisson_sample(n, q, gen)
        assert idx.unique().numel() == idx.numel()
        sizes.append(len(idx))
        counts[idx] += 1
    sizes = np.array(sizes)
    # Batch size ~ Binomial(n, q): mean within 4 standard errors, variance near n q (1 - q).
    se = math.sqrt(n * q * (1 - q) / draws)
    assert abs(sizes.mean() - n * q) < 4 * se
    assert 0.7 < sizes.var() / (n * q * (1 - q)) < 1.3
    # Per-example inclusion frequency ~ q for every example (no example favoured).
    assert abs(counts.mean().item() / draws - q) < 0.002
    assert counts.max().item() / draws < q + 6 * math.sqrt(q * (1 - q) / draws)
    assert len(M.poisson_sample(10, 1e-6, gen)) == 0  # empty batches happen and are fine


def test_noise_is_sigma_C_over_expected_batch_once_per_step_whatever_the_chunks():
    sigma, clip, expected = 1.7, 0.6, 50.0
    params = {"w": torch.zeros(400_000, dtype=torch.float64)}
    step = M.LogicalStep(params, clip_norm=clip, noise_multiplier=sigma, expected_batch_size=expected, generator=torch.Generator().manual_seed(0))
    for b in (3, 0, 5):  # three chunks, one of them empty
        step.add(Zeros(params, b))
    out = step.release()["w"]
    assert out.std().item() == pytest.approx(sigma * clip / expected, rel=0.01)
    assert abs(out.mean().item()) < 4 * out.std().item() / math.sqrt(out.numel())
    with pytest.raises(RuntimeError, match="once"):
        step.release()


def test_clip_factors_are_conservative_in_relative_terms():
    norms = torch.tensor([0.0, 0.5, 1.0, 1e3, 1e6, 3e30], dtype=torch.float32)
    c = M.clip_factors(norms, 1.0)
    assert c[0] == 1 and c[1] == 1  # below C: unclipped
    kappa = M.CLIP_MARGIN_ULPS * torch.finfo(torch.float32).eps
    # a norm computed up to κ/2 (relative) too small still leaves with norm ≤ C
    assert (c[2:].double() * norms[2:].double() * (1 + kappa / 2) <= 1.0).all()
    assert (c[2:].double() * norms[2:].double() >= 1.0 / (1 + 2 * kappa)).all()  # and costs no more than κ


@pytest.mark.parametrize("name,channels,size", [("cnn_tiny", 1, 28), ("wrn16_4", 3, 16)])
def test_clipping_holds_in_float32_against_the_float64_reference(name, channels, size):
    """The accelerator's float32 norms give factors c_i with c_i·‖g_i‖ ≤ C for the float64 microbatch
    gradient g_i, every gradient far above C. An absolute margin (‖g‖ + 1e-6) fails on WRN-16-4."""
    torch.manual_seed(0)
    model = build_model(ModelConfig(name=name), in_channels=channels, num_classes=10, image_size=size)
    reference = copy.deepcopy(model).double()
    gen = torch.Generator().manual_seed(1)
    for scale in (1.0, 30.0):
        x, y = torch.rand(5, channels, size, size, generator=gen) * scale, torch.randint(0, 10, (5,), generator=gen)
        imgs, tgts = build_groups(x, y, torch.arange(5), num_classes=10, k=2, m=1, n=0, alpha=0.4, padding=2, flip=True, seed=1)
        ref_norms = G.Materialised(*G.per_example_grads_loop(reference, imgs.double(), tgts.double())).norms
        clip = 1e-3 * float(ref_norms.min())
        factors = M.clip_factors(BK.per_example(model, imgs, tgts).norms, clip).double()
        assert (factors * ref_norms <= clip).all(), (factors * ref_norms / clip - 1).max()


def test_secret_randomness_is_never_serialised_and_seeded_from_secrets(monkeypatch):
    secret = M.Randomness.secret_on(torch.device("cpu"))
    assert secret.state() is None and "sampler" not in repr(secret)
    for leak in (pickle.dumps, copy.deepcopy, lambda r: torch.save(r, io.BytesIO())):
        with pytest.raises(TypeError, match="never"):
            leak(secret)
    draws = [torch.rand(4, generator=M.Randomness.secret_on(torch.device("cpu")).noise) for _ in range(2)]
    assert not torch.equal(*draws)
    monkeypatch.setattr(M.secrets, "randbits", lambda bits: 12345 if bits >= 64 else 0)  # the source is `secrets`
    draws = [torch.rand(4, generator=M.Randomness.secret_on(torch.device("cpu")).noise) for _ in range(2)]
    assert torch.equal(*draws)


def test_reproducible_randomness_resumes_and_the_two_kinds_do_not_mix():
    a = M.Randomness.from_seed(3, torch.device("cpu"))
    torch.rand(5, generator=a.noise)
    b = M.Randomness.from_seed(99, torch.device("cpu"))
    b.load_state(pickle.loads(pickle.dumps(a.state())))
    assert torch.equal(torch.rand(5, generator=a.noise), torch.rand(5, generator=b.noise))
    assert M.derive_seed(3, "noise") != M.derive_seed(4, "noise") != M.derive_seed(3, "poisson")
    with pytest.raises(ValueError, match="cannot resume each other"):
        M.Randomness.secret_on(torch.device("cpu")).load_state(a.state())
    with pytest.raises(ValueError, match="cannot resume each other"):
        a.load_state(None)


# --------------------------------------------------------------------------- as the trainer runs it


def zero_gradients(released):
    def fn(model, imgs, tgts):
        released.see(imgs.shape[0])
        b = imgs.shape[0]
        return {k: torch.zeros(b, *p.shape) for k, p in G.trainable(model).items()}, torch.zeros(b)

    return fn


def test_trainer_noise_is_sigma_C_over_qN_once_per_step_on_poisson_batches(digits, monkeypatch):
    """≥ 2,000 steps of zero gradients, one example per physical chunk, C = 0.3, q·N = 4: each update
    coordinate is N(0, σ²C²/(qN)²) (a 99.9 % chi-square interval); batch sizes are Binomial(N, q);
    empty batches are noised too. Noise per chunk, σ instead of σC, noise halved, division by the
    realised batch size, or fixed-size batches each fail it. Reproducible mode: the draws, and so
    the test's outcome, are fixed."""
    released = record_updates(monkeypatch, coordinates=100)
    cfg = load_train_config(None, [
        "data.name=digits", "method=dpsgd", "mix.aug_multiplicity=1", "mix.self_mix=0", "optim.batch_size=4", f"optim.epochs={2010 * 4 / len(digits.train)}",
        "privacy.epsilon=8", "privacy.clip_norm=0.3", "optim.physical_batch_size=1", "optim.lr=1e-6", "privacy.reproducible=true",
    ])
    res = T.train(cfg, splits=digits, progress=False, per_example_fn=zero_gradients(released))
    assert res["steps"] >= 2000 and len(released.updates) == res["steps"]
    qn = res["sample_rate"] * res["n_train"]
    assert qn == pytest.approx(4)
    noise = torch.stack(released.updates).double()
    stat = float(noise.pow(2).sum()) / (res["noise_multiplier"] * 0.3 / qn) ** 2  # ~ χ²(draws)
    low, high = chi2.ppf([0.0005, 0.9995], noise.numel())
    assert low <= stat <= high, f"variance / expected = {stat / noise.numel():.4f}"
    sizes = np.array(released.batch_sizes)
    q = res["sample_rate"]
    assert abs(sizes.mean() - qn) < 4 * math.sqrt(qn * (1 - q) / len(sizes))
    assert 0.8 < sizes.var() / (qn * (1 - q)) < 1.2
    empty = torch.from_numpy(sizes == 0)
    assert empty.sum() > 10 and (noise[empty].abs().sum(1) > 0).all()


def test_a_steps_update_does_not_depend_on_the_chunk_size(digits, monkeypatch):
    """Reproducible mode, the trainer's default path: 1, 4 or all examples per physical chunk release
    the same updates (to float rounding, far below the noise)."""
    runs, plan = [], None
    for images_per_chunk in (3, 12, 10_000):  # G = 3 images per example
        released = record_updates(monkeypatch)
        cfg = load_train_config(None, TINY + ["optim.epochs=0.15", "privacy.clip_norm=0.5", "privacy.reproducible=true",
                                              f"optim.physical_batch_size={images_per_chunk}"])
        plan = T.train(cfg, splits=digits, progress=False)
        runs.append(torch.stack(released.updates))
    noise_std = plan["noise_multiplier"] * 0.5 / (plan["sample_rate"] * plan["n_train"])
    assert len(runs[0]) == plan["steps"] >= 3
    for other in runs[1:]:
        torch.testing.assert_close(other, runs[0], rtol=0, atol=1e-4 * noise_std)


def first_updates(digits, monkeypatch, extra: list[str]) -> torch.Tensor:
    released = record_updates(monkeypatch)
    T.train(load_train_config(None, TINY + ["optim.epochs=0.1"] + extra), splits=digits, progress=False)
    return torch.stack(released.updates)


def test_default_runs_differ_in_their_noise_and_reproducible_runs_agree(digits, monkeypatch):
    a, b = first_updates(digits, monkeypatch, []), first_updates(digits, monkeypatch, [])
    assert not torch.allclose(a[0], b[0])
    r1, r2 = (first_updates(digits, monkeypatch, ["privacy.reproducible=true"]) for _ in range(2))
    assert torch.equal(r1, r2)


def test_breaks_are_seen_by_the_trainer(digits, monkeypatch):
    """The shared test-only breaks reach what a run releases (the audit relies on them)."""
    released = record_updates(monkeypatch)
    break_mechanism(monkeypatch, "skip_noise")
    cfg = load_train_config(None, TINY + ["optim.epochs=0.05", "privacy.reproducible=true"])
    T.train(cfg, splits=digits, progress=False, per_example_fn=zero_gradients(released))
    assert all(u.abs().sum() == 0 for u in released.updates)
    break_mechanism(monkeypatch, "public_randomness")
    assert torch.equal(first_updates(digits, monkeypatch, []), first_updates(digits, monkeypatch, []))
    with pytest.raises(KeyError, match="skip_noise"):
        break_mechanism(monkeypatch, "nothing")


def _windows(state: bytes) -> list[bytes]:
    """32-byte windows from inside a generator's state (past any small header fields)."""
    return [state[i : i + 32] for i in range(64, len(state) - 32, max(32, len(state) // 5))]


def test_a_default_run_saves_no_seed_or_generator_state_of_the_mechanism(digits, monkeypatch):
    """The checkpoints (``EpochReport.state()``, as ``torch.save`` writes them) and the result hold
    neither the mechanism's secret seeds nor its generators' states at that moment; the same search
    finds them in a reproducible run's checkpoint."""
    seeds: list[int] = []
    real_bits, real_secret = M.secrets.randbits, M.Randomness.secret_on.__func__
    monkeypatch.setattr(M.secrets, "randbits", lambda bits: seeds.append(real_bits(bits)) or seeds[-1])
    made: list[M.Randomness] = []
    monkeypatch.setattr(M.Randomness, "secret_on", classmethod(lambda cls, device: made.append(real_secret(cls, device)) or made[-1]))

    def run(extra: list[str]) -> tuple[list[tuple[bytes, list[bytes]]], bytes]:
        saved = []

        def on_epoch(rep: T.EpochReport) -> None:
            live = [g.get_state().numpy().tobytes() for r in made for g in (r.sampler, r.noise)]
            if not live:  # reproducible: the generators are the run's own, found through the state itself
                live = [v.numpy().tobytes() for v in rep.state()["mechanism"].values()]
            buf = io.BytesIO()
            torch.save(rep.state(), buf)
            saved.append((buf.getvalue(), live))

        res = T.train(load_train_config(None, TINY + ["optim.epochs=1.1"] + extra), splits=digits, progress=False, on_epoch=on_epoch)
        return saved, json.dumps(res).encode()

    saved, result = run([])
    assert len(seeds) == 2 and len(made) == 1 and len(saved) == 2
    for blob in [b for b, _ in saved] + [result]:
        for s in seeds:
            assert s.to_bytes(8, "little") not in blob and str(s).encode() not in blob
    for blob, live in saved:
        assert not any(w in blob for state in live for w in _windows(state))
    made.clear()
    control, _ = run(["privacy.reproducible=true"])
    assert all(any(w in blob for w in _windows(state)) for blob, live in control for state in live)


def test_a_resumed_default_run_draws_fresh_secrets(digits, monkeypatch):
    states = []
    cfg = load_train_config(None, TINY + ["optim.epochs=1.1"])
    T.train(cfg, splits=digits, progress=False, on_epoch=lambda r: states.append(r.state()))
    assert states[0]["mechanism"] is None
    resumed = []
    for _ in range(2):
        released = record_updates(monkeypatch)
        T.train(cfg, splits=digits, progress=False, resume_state=states[0])
        resumed.append(torch.stack(released.updates))
    assert len(resumed[0]) == len(resumed[1]) > 0 and not torch.allclose(resumed[0][0], resumed[1][0])
    with pytest.raises(ValueError, match="cannot resume each other"):
        T.train(load_train_config(None, TINY + ["optim.epochs=1.1", "privacy.reproducible=true"]), splits=digits, progress=False, resume_state=states[0])
