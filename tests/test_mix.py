"""The group construction: shapes, label arithmetic, distinct self-augmentations, keyed draws, determinism."""

from dataclasses import fields

import numpy as np
import pytest
import torch
from scipy import stats

from dpmix_ray import mix
from dpmix_ray.mix import SyntheticPool, assemble, build_groups, draw


def augs(x: torch.Tensor, k: int, padding: int, flip: bool, seed: int) -> torch.Tensor:
    """K self-augmentations of each image (the first K images of its group)."""
    return build_groups(x, torch.zeros(len(x), dtype=torch.long), torch.arange(len(x)), num_classes=1, k=k, m=0, n=0, alpha=1.0,
                        padding=padding, flip=flip, seed=seed)[0]


def test_self_augment_crops_are_shifted_copies_and_deterministic():
    x = torch.arange(2 * 1 * 6 * 6, dtype=torch.float32).reshape(2, 1, 6, 6)
    a = augs(x, 5, padding=0, flip=False, seed=0)
    assert a.shape == (2, 5, 1, 6, 6)
    assert torch.equal(a, x[:, None].expand_as(a))  # no padding, no flip: identity
    b1 = augs(x, 5, padding=2, flip=True, seed=1)
    assert torch.equal(b1, augs(x, 5, padding=2, flip=True, seed=1))
    # every crop is a window of the reflect-padded image (possibly flipped)
    padded = torch.nn.functional.pad(x, (2, 2, 2, 2), mode="reflect")
    for bi in range(2):
        for ki in range(5):
            crop = b1[bi, ki, 0]
            windows = [padded[bi, 0, r : r + 6, c : c + 6] for r in range(5) for c in range(5)]
            assert any(torch.equal(crop, w) or torch.equal(crop, w.flip(-1)) for w in windows)


def test_groups_do_not_depend_on_how_a_batch_is_chunked():
    """Draws are made once per batch and sliced: building chunk by chunk gives the batch's groups."""
    gen_x = torch.Generator().manual_seed(2)
    x, y = torch.rand(7, 1, 8, 8, generator=gen_x), torch.tensor([0, 1, 2, 0, 1, 2, 0])
    pool = SyntheticPool.from_tensors(torch.rand(6, 1, 8, 8, generator=gen_x), torch.tensor([0, 1, 2, 0, 1, 2]), 3)
    d = draw(y, torch.arange(7) * 1000, seed=0, step=5, image_hw=(8, 8), k=3, m=2, n=2, alpha=0.5, padding=2, flip=True,
             synthetic=pool, same_class=True)
    whole = assemble(x, y, d, num_classes=3, padding=2, synthetic=pool)
    parts = [assemble(x[lo : lo + 3], y[lo : lo + 3], d[lo : lo + 3], num_classes=3, padding=2, synthetic=pool) for lo in range(0, 7, 3)]
    for got, want in zip((torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])), whole):
        assert torch.equal(got, want)


def test_same_class_pairing_refuses_a_pool_missing_a_class_whatever_the_batch():
    pool = SyntheticPool.from_tensors(torch.rand(4, 1, 8, 8), torch.tensor([0, 0, 1, 1]), 3)
    with pytest.raises(ValueError, match=r"no image of classes \[2\]"):
        draw(torch.tensor([0, 1]), torch.tensor([5, 6]), seed=0, step=0, image_hw=(8, 8), k=1, m=0, n=1, alpha=1.0, padding=0,
             flip=False, synthetic=pool, same_class=True)


def test_groups_shapes_labels_and_mixing():
    gen = torch.Generator().manual_seed(0)
    x, y = torch.rand(3, 1, 8, 8, generator=gen), torch.tensor([0, 1, 2])
    pool = SyntheticPool.from_tensors(torch.rand(6, 1, 8, 8, generator=gen), torch.tensor([0, 1, 2, 0, 1, 2]), 3)
    imgs, tgts = build_groups(x, y, torch.arange(3), num_classes=3, k=4, m=3, n=2, alpha=0.5, padding=1, flip=False,
                              seed=0, synthetic=pool, same_class=True)
    assert imgs.shape == (3, 9, 1, 8, 8) and tgts.shape == (3, 9, 3)
    torch.testing.assert_close(tgts.sum(-1), torch.ones(3, 9))
    assert torch.equal(tgts[:, :7].argmax(-1), y[:, None].expand(3, 7))  # self-augs and self-mixups keep y
    # same-class diffusion-mixups keep a one-hot label of the example's class
    torch.testing.assert_close(tgts[:, 7:], torch.nn.functional.one_hot(y, 3)[:, None].float().expand(3, 2, 3))


def test_diffusion_mixup_soft_label_matches_the_pixel_weights():
    x, y = torch.zeros(1, 1, 4, 4), torch.tensor([0])
    pool = SyntheticPool.from_tensors(torch.ones(1, 1, 4, 4), torch.tensor([1]), 2)
    imgs, tgts = build_groups(x, y, torch.arange(1), num_classes=2, k=1, m=0, n=5, alpha=1.0, padding=0, flip=False,
                              seed=0, synthetic=pool)
    lam_pixels = 1 - imgs[0, 1:].mean(dim=(1, 2, 3))  # image = λ·0 + (1−λ)·1
    torch.testing.assert_close(tgts[0, 1:, 0], lam_pixels)
    torch.testing.assert_close(tgts[0, 1:, 1], 1 - lam_pixels)


def test_self_mixup_uses_two_distinct_augmentations():
    """With K=2 distinct self-augs, every mixup is λ·a_0 + (1−λ)·a_1 with λ strictly inside (0, 1): a mix of
    an augmentation with itself (a lone augmentation, λ ∈ {0, 1}) fails. α = 4 keeps λ away from 0 and 1."""
    x = torch.rand(50, 1, 8, 8)
    imgs, _ = build_groups(x, torch.zeros(50, dtype=torch.long), torch.arange(50), num_classes=2, k=2, m=3, n=0, alpha=4.0,
                           padding=3, flip=True, seed=0)
    a0, a1 = imgs[:, 0], imgs[:, 1]
    distinct = (a0 - a1).abs().amax(dim=(1, 2, 3)) > 1e-3
    assert distinct.sum() >= 40
    d = (a0 - a1)[distinct].flatten(1)
    for mixed in imgs[:, 2:].unbind(1):
        lam = ((mixed - a1)[distinct].flatten(1) * d).sum(1) / (d * d).sum(1)
        torch.testing.assert_close(mixed[distinct], lam[:, None, None, None] * a0[distinct] + (1 - lam[:, None, None, None]) * a1[distinct], rtol=1e-4, atol=1e-5)
        assert ((lam > 0.02) & (lam < 0.98)).all(), lam


def test_mixup_weights_are_beta_alpha_alpha():
    """Two augmentations of a half-black, half-white image, one flipped: a mixup's corner pixel is λ or 1 − λ,
    both Beta(α, α): mean ½, variance 1/(4(2α + 1))."""
    x = torch.cat([torch.zeros(1, 1, 4, 4), torch.ones(1, 1, 4, 4)], dim=3).expand(4000, -1, -1, -1)
    for alpha in (0.2, 2.0):
        imgs, _ = build_groups(x, torch.zeros(4000, dtype=torch.long), torch.arange(4000), num_classes=2, k=2, m=1, n=0,
                               alpha=alpha, padding=0, flip=True, seed=1)
        corner = imgs[:, :, 0, 0, 0]
        lam = corner[corner[:, 0] != corner[:, 1], 2]
        assert len(lam) > 1500
        assert lam.mean().item() == pytest.approx(0.5, abs=0.03)
        assert lam.var().item() == pytest.approx(1 / (4 * (2 * alpha + 1)), rel=0.15), alpha


KW = dict(image_hw=(8, 8), k=4, m=3, n=2, alpha=0.2, padding=2, flip=True)


def test_keyed_hash_is_splitmix64_with_64_bit_wraparound():
    """The int64 torch arithmetic equals splitmix64 over Python's unbounded integers mod 2⁶⁴: the
    multiplications wrap and the right shifts are logical, also for negative keys."""
    mask = (1 << 64) - 1

    def mix64(z: int) -> int:
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & mask
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & mask
        return z ^ (z >> 31)

    keys = [0, 1, -1, 2**63 - 1, -(2**63), 123456789012345, -987654321]
    seed, step, kind = 0xDEADBEEFCAFEBABE, 7, 3
    states = mix.example_states(torch.tensor(keys), seed=seed, step=step)
    u = mix.uniforms(states, kind, 5)
    for key, state, row in zip(keys, states.tolist(), u.tolist()):
        want = mix64((mix64((key & mask) ^ seed) + step * 0x9E3779B97F4A7C15) & mask)
        assert state & mask == want
        for c, got in enumerate(row):
            r = mix64((want + ((kind << 32) + 1 + c) * 0x9E3779B97F4A7C15) & mask) >> 12
            assert got == (r + 0.5) * 2.0**-52 and 0 < got < 1


def test_an_examples_draws_depend_on_its_key_and_the_step_alone():
    """The same (key, step) in another batch, at another row, beside other examples, draws the same row;
    the next step, or another key, draws afresh. Same-class picks read the example's own label only."""
    pool = SyntheticPool.from_tensors(torch.rand(12, 1, 8, 8), torch.arange(12) % 3, 3)
    a = draw(torch.tensor([0, 1, 2]), torch.tensor([10, 20, 30]), seed=9, step=4, synthetic=pool, same_class=True, **KW)
    b = draw(torch.tensor([2, 1, 0, 1]), torch.tensor([30, 77, 10, 88]), seed=9, step=4, synthetic=pool, same_class=True, **KW)
    for f in fields(mix.Draws):
        got, want = getattr(b, f.name), getattr(a, f.name)
        assert torch.equal(got[2], want[0]) and torch.equal(got[0], want[2]), f.name
    later = draw(torch.tensor([0]), torch.tensor([10]), seed=9, step=5, synthetic=pool, same_class=True, **KW)
    other_seed = draw(torch.tensor([0]), torch.tensor([10]), seed=8, step=4, synthetic=pool, same_class=True, **KW)
    for d in (later, other_seed):
        assert not torch.equal(d.mix_lam[0], a.mix_lam[0]) and not torch.equal(d.diff_lam[0], a.diff_lam[0])


def test_keyed_draws_are_in_range_and_balanced():
    """Crops within the padding, flips about half, self-mixup pairs i ≠ j uniform over ordered pairs,
    diffusion picks of the example's class (same_class) or anywhere in the pool (random)."""
    b = 6000
    y = torch.arange(b) % 3
    pool = SyntheticPool.from_tensors(torch.rand(10, 1, 8, 8), torch.tensor([0, 0, 0, 0, 1, 1, 2, 2, 2, 2]), 3)
    d = draw(y, torch.arange(b) * 7919 - 10**12, seed=3, step=11, synthetic=pool, same_class=True, **KW)
    assert d.crop.min() == 0 and d.crop.max() == 4  # 2·padding + 1 offsets
    assert torch.bincount(d.crop.flatten(), minlength=5).min() > 0.18 * d.crop.numel()
    assert d.flip.float().mean().item() == pytest.approx(0.5, abs=0.01)
    i, j = d.pair[..., 0], d.pair[..., 1]
    assert (i != j).all() and i.min() == 0 and j.max() == 3
    pairs = torch.bincount((4 * i + j).flatten(), minlength=16)
    off = pairs[torch.arange(16) % 5 != 0].float()  # the 12 ordered pairs i ≠ j
    assert pairs.sum() == off.sum() and ((off / off.mean() - 1).abs() < 0.15).all(), pairs
    assert d.diff_aug.min() == 0 and d.diff_aug.max() == 3
    assert torch.equal(pool.y[d.diff_src], y[:, None].expand_as(d.diff_src))
    assert set(d.diff_src[y == 1].unique().tolist()) == {4, 5}
    anywhere = draw(y, torch.arange(b), seed=3, step=11, synthetic=pool, same_class=False, **KW).diff_src
    assert torch.bincount(anywhere.flatten(), minlength=10).min() > 0.08 * anywhere.numel()


@pytest.mark.parametrize("alpha", [0.2, 1.0])
def test_keyed_mixup_weights_pass_a_ks_test_against_beta(alpha):
    """λ of 20,000 keyed draws against Beta(α, α): Kolmogorov–Smirnov distance below the 0.1 % critical
    value (1.95/√n), mean ½. The gammas are exact (Marsaglia–Tsang) up to the documented < 10⁻²¹."""
    lam = draw(torch.zeros(20000, dtype=torch.long), torch.arange(20000), seed=5, step=0, image_hw=(8, 8), k=2, m=1, n=0,
               alpha=alpha, padding=0, flip=False).mix_lam.flatten().numpy()
    assert ((lam >= 0) & (lam <= 1)).all() and lam.mean() == pytest.approx(0.5, abs=0.01)
    assert stats.kstest(lam, stats.beta(alpha, alpha).cdf).statistic < 1.95 / np.sqrt(len(lam))
