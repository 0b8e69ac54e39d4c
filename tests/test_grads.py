"""Per-example gradients of the group-mean loss, and the sensitivity of their clipped sum on neighbouring datasets."""

import numpy as np
import pytest
import torch
from opacus import GradSampleModule
from opacus.optimizers import DPOptimizer
from torch import nn

from dpmix_ray import grads as G
from dpmix_ray import mechanism as M
from dpmix_ray.mix import SyntheticPool, build_groups, soft_cross_entropy
from dpmix_ray.trainer import per_example_source

CLASSES = 3


def tiny_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.GroupNorm(2, 4), nn.ReLU(),
        nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(16, CLASSES),
    ).double()


def random_groups(b: int, k: int, m: int, n: int, seed: int, scale: float = 1.0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.rand(b, 1, 8, 8, generator=gen, dtype=torch.float64) * scale
    y = torch.randint(0, CLASSES, (b,), generator=gen)
    pool = SyntheticPool.from_tensors(torch.rand(12, 1, 8, 8, generator=gen, dtype=torch.float64), torch.arange(12) % CLASSES, CLASSES)
    return build_groups(x, y, torch.arange(b), num_classes=CLASSES, k=k, m=m, n=n, alpha=0.4, padding=2, flip=True,
                        seed=seed, synthetic=pool if n else None)


def flat(grads: M.Grads) -> torch.Tensor:
    return torch.cat([g.flatten(1) for g in grads.values()], dim=1)


def clip_and_sum(per: M.Grads, clip: float) -> tuple[M.Grads, torch.Tensor]:
    """The mechanism's clipped sum of materialised per-example gradients, and their norms."""
    source = G.Materialised(per, torch.zeros(len(next(iter(per.values())))))
    return M.clipped_sum(source, clip), source.norms


def noisy_mean(per: M.Grads, model: nn.Module, clip: float, sigma: float, expected: float) -> M.Grads:
    step = M.LogicalStep(G.trainable(model), clip_norm=clip, noise_multiplier=sigma, expected_batch_size=expected, generator=torch.Generator())
    step.add(G.Materialised(per, torch.zeros(len(next(iter(per.values()))))))
    return step.release()


@pytest.mark.parametrize("seed", range(6))
def test_vmap_per_example_grads_equal_microbatch_loop(seed):
    rng = np.random.default_rng(seed)
    k, m, n = int(rng.integers(1, 6)), 0, int(rng.integers(0, 4))
    if k >= 2:
        m = int(rng.integers(0, 4))
    model = tiny_model()
    imgs, tgts = random_groups(5, k, m, n, seed)
    fast, loss_fast = G.per_example_grads_vmap(model, imgs, tgts)
    ref, loss_ref = G.per_example_grads_loop(model, imgs, tgts)
    torch.testing.assert_close(flat(fast), flat(ref), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(loss_fast, loss_ref, rtol=1e-12, atol=1e-12)


def test_group_gradient_is_the_gradient_of_the_group_mean_loss():
    model = tiny_model()
    imgs, tgts = random_groups(1, 3, 2, 0, 7)
    per, _ = G.per_example_grads_vmap(model, imgs, tgts)
    loss = soft_cross_entropy(model(imgs[0]), tgts[0]).mean()
    expected = torch.autograd.grad(loss, list(model.parameters()))
    torch.testing.assert_close(flat(per)[0], torch.cat([e.flatten() for e in expected]))


@pytest.mark.parametrize("seed", range(5))
def test_neighbouring_datasets_change_the_clipped_sum_by_at_most_C(seed):
    rng = np.random.default_rng(100 + seed)
    k = int(rng.integers(2, 6))
    m, n = int(rng.integers(0, 4)), int(rng.integers(0, 3))
    clip = float(rng.uniform(0.01, 2.0))
    model = tiny_model()
    imgs, tgts = random_groups(6, k, m, n, seed, scale=float(rng.uniform(1, 50)))
    per, _ = G.per_example_grads_vmap(model, imgs, tgts)
    full, norms = clip_and_sum(per, clip)
    for drop in range(6):
        keep = [i for i in range(6) if i != drop]
        neighbour, _ = clip_and_sum({kk: v[keep] for kk, v in per.items()}, clip)
        diff = torch.cat([(full[kk] - neighbour[kk]).flatten() for kk in full]).norm()
        assert diff <= clip * (1 + 1e-9)
        if norms[drop] > clip:
            assert diff == pytest.approx(clip, rel=1e-5)  # the bound is attained: clipping is active


def test_a_group_depends_only_on_its_own_example():
    """No cross-example mixing: changing x_j leaves every other example's group bit-identical."""
    gen = torch.Generator().manual_seed(3)
    x = torch.rand(4, 1, 8, 8, generator=gen)
    y = torch.tensor([0, 1, 2, 0])
    pool = SyntheticPool.from_tensors(torch.rand(9, 1, 8, 8, generator=gen), torch.arange(9) % 3, 3)
    kw = dict(num_classes=3, k=4, m=3, n=2, alpha=0.2, padding=2, flip=True, synthetic=pool)
    key = torch.tensor([11, 22, 33, 44])
    a, ta = build_groups(x, y, key, seed=0, **kw)
    x2 = x.clone()
    x2[2] = torch.rand(1, 8, 8, generator=gen)
    b, tb = build_groups(x2, y, key, seed=0, **kw)
    for i in (0, 1, 3):
        assert torch.equal(a[i], b[i]) and torch.equal(ta[i], tb[i])
    assert not torch.equal(a[2], b[2])


def test_k1_equals_plain_opacus_dpsgd():
    """K=1, m=n=0 with σ=0 gives exactly Opacus's clipped, averaged DP-SGD gradient."""
    model = tiny_model()
    imgs, tgts = random_groups(8, 1, 0, 0, 11, scale=20.0)
    clip, b = 0.05, 8
    per, _ = G.per_example_grads_vmap(model, imgs, tgts)
    ours = noisy_mean(per, model, clip, 0.0, b)

    ref_model = GradSampleModule(tiny_model())
    opt = DPOptimizer(torch.optim.SGD(ref_model.parameters(), lr=0.1), noise_multiplier=0.0, max_grad_norm=clip, expected_batch_size=b)
    loss = soft_cross_entropy(ref_model(imgs[:, 0]), tgts[:, 0]).mean()
    loss.backward()
    opt.pre_step()
    theirs = [p.grad for p in ref_model.parameters()]
    torch.testing.assert_close(torch.cat([g.flatten() for g in ours.values()]), torch.cat([g.flatten() for g in theirs]), rtol=1e-5, atol=1e-9)


def test_no_clipping_no_noise_equals_nonprivate_sgd():
    model = tiny_model()
    imgs, tgts = random_groups(6, 4, 2, 0, 5)
    per, _ = G.per_example_grads_vmap(model, imgs, tgts)
    private = noisy_mean(per, model, 1e12, 0.0, 6)
    nonprivate, _ = G.summed_grads_nonprivate(model, imgs, tgts)
    for k in private:
        torch.testing.assert_close(private[k], nonprivate[k] / 6, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("seed", range(3))
def test_neighbouring_datasets_through_the_trainers_default_path(seed):
    """The same sensitivity bound for what the trainer actually runs (the fast clipped sum)."""
    rng = np.random.default_rng(200 + seed)
    k, m, n = int(rng.integers(2, 5)), int(rng.integers(0, 3)), int(rng.integers(0, 3))
    clip = float(rng.uniform(0.01, 1.0))
    model = tiny_model()
    imgs, tgts = random_groups(5, k, m, n, seed, scale=float(rng.uniform(1, 50)))
    source = per_example_source(model)
    full = M.clipped_sum(source(imgs, tgts), clip)
    for drop in range(5):
        keep = [i for i in range(5) if i != drop]
        neighbour = M.clipped_sum(source(imgs[keep], tgts[keep]), clip)
        diff = torch.cat([(full[kk] - neighbour[kk]).flatten() for kk in full]).norm()
        assert diff <= clip * (1 + 1e-9)
