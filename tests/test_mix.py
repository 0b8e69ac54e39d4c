"""The group construction: shapes, label arithmetic, distinct self-augmentations, determinism."""

import pytest
import torch

from dpmix_ray.mix import SyntheticPool, assemble, build_groups, draw


def augs(x: torch.Tensor, k: int, padding: int, flip: bool, seed: int) -> torch.Tensor:
    """K self-augmentations of each image (the first K images of its group)."""
    return build_groups(x, torch.zeros(len(x), dtype=torch.long), num_classes=1, k=k, m=0, n=0, alpha=1.0, padding=padding,
                        flip=flip, gen=torch.Generator().manual_seed(seed))[0]


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
    d = draw(y, image_hw=(8, 8), k=3, m=2, n=2, alpha=0.5, padding=2, flip=True, gen=torch.Generator().manual_seed(0),
             synthetic=pool, same_class=True)
    whole = assemble(x, y, d, num_classes=3, padding=2, synthetic=pool)
    parts = [assemble(x[lo : lo + 3], y[lo : lo + 3], d[lo : lo + 3], num_classes=3, padding=2, synthetic=pool) for lo in range(0, 7, 3)]
    for got, want in zip((torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])), whole):
        assert torch.equal(got, want)


def test_same_class_pairing_refuses_a_pool_missing_a_class_whatever_the_batch():
    pool = SyntheticPool.from_tensors(torch.rand(4, 1, 8, 8), torch.tensor([0, 0, 1, 1]), 3)
    with pytest.raises(ValueError, match=r"no image of classes \[2\]"):
        draw(torch.tensor([0, 1]), image_hw=(8, 8), k=1, m=0, n=1, alpha=1.0, padding=0, flip=False,
             gen=torch.Generator(), synthetic=pool, same_class=True)


def test_groups_shapes_labels_and_mixing():
    gen = torch.Generator().manual_seed(0)
    x, y = torch.rand(3, 1, 8, 8, generator=gen), torch.tensor([0, 1, 2])
    pool = SyntheticPool.from_tensors(torch.rand(6, 1, 8, 8, generator=gen), torch.tensor([0, 1, 2, 0, 1, 2]), 3)
    imgs, tgts = build_groups(x, y, num_classes=3, k=4, m=3, n=2, alpha=0.5, padding=1, flip=False,
                              gen=torch.Generator().manual_seed(0), synthetic=pool, same_class=True)
    assert imgs.shape == (3, 9, 1, 8, 8) and tgts.shape == (3, 9, 3)
    torch.testing.assert_close(tgts.sum(-1), torch.ones(3, 9))
    assert torch.equal(tgts[:, :7].argmax(-1), y[:, None].expand(3, 7))  # self-augs and self-mixups keep y
    # same-class diffusion-mixups keep a one-hot label of the example's class
    torch.testing.assert_close(tgts[:, 7:], torch.nn.functional.one_hot(y, 3)[:, None].float().expand(3, 2, 3))


def test_diffusion_mixup_soft_label_matches_the_pixel_weights():
    x, y = torch.zeros(1, 1, 4, 4), torch.tensor([0])
    pool = SyntheticPool.from_tensors(torch.ones(1, 1, 4, 4), torch.tensor([1]), 2)
    imgs, tgts = build_groups(x, y, num_classes=2, k=1, m=0, n=5, alpha=1.0, padding=0, flip=False,
                              gen=torch.Generator().manual_seed(0), synthetic=pool)
    lam_pixels = 1 - imgs[0, 1:].mean(dim=(1, 2, 3))  # image = λ·0 + (1−λ)·1
    torch.testing.assert_close(tgts[0, 1:, 0], lam_pixels)
    torch.testing.assert_close(tgts[0, 1:, 1], 1 - lam_pixels)


def test_self_mixup_uses_two_distinct_augmentations():
    """With K=2 distinct self-augs, every mixup is λ·a_0 + (1−λ)·a_1 with λ strictly inside (0, 1): a mix of
    an augmentation with itself (a lone augmentation, λ ∈ {0, 1}) fails. α = 4 keeps λ away from 0 and 1."""
    x = torch.rand(50, 1, 8, 8)
    imgs, _ = build_groups(x, torch.zeros(50, dtype=torch.long), num_classes=2, k=2, m=3, n=0, alpha=4.0,
                           padding=3, flip=True, gen=torch.Generator().manual_seed(0))
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
        imgs, _ = build_groups(x, torch.zeros(4000, dtype=torch.long), num_classes=2, k=2, m=1, n=0, alpha=alpha,
                               padding=0, flip=True, gen=torch.Generator().manual_seed(1))
        corner = imgs[:, :, 0, 0, 0]
        lam = corner[corner[:, 0] != corner[:, 1], 2]
        assert len(lam) > 1500
        assert lam.mean().item() == pytest.approx(0.5, abs=0.03)
        assert lam.var().item() == pytest.approx(1 / (4 * (2 * alpha + 1)), rel=0.15), alpha
