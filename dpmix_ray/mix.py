"""The per-example group of DP-Mix: K self-augmentations, m self-mixups, n diffusion-mixups.

Every image in example x's group is derived from x alone, or from public synthetic data, so
removing x changes exactly one group (and so one clipped gradient): this is what keeps the
sensitivity at C. Pure batch-tensor functions on the images' device: every draw comes from an
explicit ``torch.Generator`` on that device (seeded from the public ``seed``, so a run is
reproducible and resumable), and nothing is copied from the host. Crops and flips are drawn per
image (torchvision's batch transforms share one draw across the batch, which would correlate the K
augmentations).
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class SyntheticPool:
    """Public synthetic images (pixel space [0, 1]) and their labels; ``members[c, :counts[c]]`` are the
    indices of class c (for same-class pairing), ``empty_classes`` those it lacks."""

    x: torch.Tensor
    y: torch.Tensor
    members: torch.Tensor
    counts: torch.Tensor
    empty_classes: tuple[int, ...]

    @classmethod
    def from_tensors(cls, x: torch.Tensor, y: torch.Tensor, num_classes: int) -> "SyntheticPool":
        counts = torch.bincount(y, minlength=num_classes)[:num_classes]
        members = torch.zeros(num_classes, max(1, int(counts.max())), dtype=torch.long, device=y.device)
        for c in range(num_classes):
            idx = torch.nonzero(y == c).flatten()
            members[c, : len(idx)] = idx
        return cls(x, y, members, counts, tuple(int(c) for c in torch.nonzero(counts == 0).flatten()))

    def to(self, device: torch.device) -> "SyntheticPool":
        return SyntheticPool(self.x.to(device), self.y.to(device), self.members.to(device), self.counts.to(device), self.empty_classes)


@dataclass(frozen=True)
class Draws:
    """Every random choice behind a batch's groups, one row per example, drawn once per logical batch:
    a chunk of examples then builds the same groups whatever the chunking (a performance knob must not
    change the mechanism's input), and example i's group depends on x_i and row i alone."""

    crop: torch.Tensor  # [B, K, 2] crop offsets (rows, columns) into the reflect-padded image
    flip: torch.Tensor  # [B, K] horizontal flips
    pair: torch.Tensor  # [B, m, 2] the two distinct self-augmentations of each self-mixup
    mix_lam: torch.Tensor  # [B, m]
    diff_aug: torch.Tensor  # [B, n] the self-augmentation of each diffusion-mixup
    diff_src: torch.Tensor  # [B, n] its synthetic image (pool index)
    diff_lam: torch.Tensor  # [B, n]

    def __getitem__(self, rows: slice) -> "Draws":
        return Draws(*(getattr(self, f.name)[rows] for f in fields(self)))


def draw(
    y: torch.Tensor, *, image_hw: tuple[int, int], k: int, m: int, n: int, alpha: float, padding: int, flip: bool,
    gen: torch.Generator, synthetic: SyntheticPool | None = None, same_class: bool = False,
) -> Draws:
    """The draws for a batch with labels ``y`` (on ``gen``'s device): crops and flips per image; for
    self-mixups two *distinct* self-augmentations i ≠ j and λ ~ Beta(α, α); for diffusion-mixups a
    self-augmentation, a synthetic image and λ."""
    b, dev = len(y), y.device
    if m > 0 and k < 2:
        raise ValueError("self-mixup needs at least two distinct self-augmentations (K >= 2)")
    if n > 0 and synthetic is None:
        raise ValueError("diffusion-mixup needs a synthetic pool")
    p = _padding(padding, image_hw)
    crop = torch.randint(0, 2 * p + 1, (b, k, 2), generator=gen, device=dev)
    flips = torch.rand((b, k), generator=gen, device=dev) < 0.5 if flip else torch.zeros((b, k), dtype=torch.bool, device=dev)
    i = torch.randint(0, k, (b, m), generator=gen, device=dev)
    j = (i + torch.randint(1, max(k, 2), (b, m), generator=gen, device=dev)) % k  # j ≠ i by construction
    mix_lam = _beta(alpha, (b, m), gen, dev)
    diff_aug = torch.randint(0, k, (b, n), generator=gen, device=dev)
    diff_src = _synthetic_indices(y, n, synthetic, same_class, gen) if n > 0 else diff_aug
    return Draws(crop, flips, torch.stack([i, j], dim=-1), mix_lam, diff_aug, diff_src, _beta(alpha, (b, n), gen, dev))


def _padding(padding: int, image_hw: tuple[int, int]) -> int:
    """Reflect padding needs fewer pixels than the image has."""
    return min(padding, image_hw[0] - 1, image_hw[1] - 1)


def self_augment(x: torch.Tensor, crop: torch.Tensor, flip: torch.Tensor, *, padding: int) -> torch.Tensor:
    """Reflect-padded crops at ``crop`` offsets [B, K, 2], flipped where ``flip`` [B, K]: [B, C, H, W] → [B, K, C, H, W]."""
    b, c, h, w = x.shape
    dev = x.device
    p = _padding(padding, (h, w))
    src = F.pad(x, (p, p, p, p), mode="reflect") if p > 0 else x
    rows = crop[..., 0, None] + torch.arange(h, device=dev)  # [B, K, H]
    cols = crop[..., 1, None] + torch.arange(w, device=dev)  # [B, K, W]
    cols = torch.where(flip[..., None], cols.flip(-1), cols)
    bi = torch.arange(b, device=dev)[:, None, None, None]
    # src[b, :, rows, cols] with per-(b,k) index grids → [B, K, H, W, C]
    out = src.permute(0, 2, 3, 1)[bi, rows[..., :, None], cols[..., None, :]]
    return out.permute(0, 1, 4, 2, 3).contiguous()


def _beta(alpha: float, shape: tuple[int, ...], gen: torch.Generator, device: torch.device) -> torch.Tensor:
    """λ ~ Beta(α, α) as the first coordinate of a Dirichlet(α, α), drawn in float64 (a float32 gamma
    draw at small α underflows to 0, and 0/0 would follow)."""
    concentration = torch.full((*shape, 2), alpha, dtype=torch.float64, device=device)
    return torch._sample_dirichlet(concentration, generator=gen)[..., 0]


def assemble(
    x: torch.Tensor, y: torch.Tensor, d: Draws, *, num_classes: int, padding: int, synthetic: SyntheticPool | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Each example's group of G = K + m + n images and soft targets, from its draws.

    Returns images [B, G, C, H, W] and targets [B, G, num_classes], ordered as
    [K self-augs | m self-mixups | n diffusion-mixups]:
    - self-mixup: λ·a_i + (1−λ)·a_j with i ≠ j (two *distinct* self-augs), label y;
    - diffusion-mixup: λ·a_i + (1−λ)·s with s a synthetic image, label λ·y + (1−λ)·y_s.
    """
    b, k, m, n = x.shape[0], d.crop.shape[1], d.pair.shape[1], d.diff_src.shape[1]
    augs = self_augment(x, d.crop, d.flip, padding=padding)
    onehot = F.one_hot(y, num_classes).to(x.dtype)
    parts, targets = [augs], [onehot[:, None, :].expand(b, k, num_classes)]
    bi = torch.arange(b, device=x.device)[:, None]
    if m > 0:
        lam = d.mix_lam.to(x.dtype)[..., None, None, None]
        parts.append(lam * augs[bi, d.pair[..., 0]] + (1 - lam) * augs[bi, d.pair[..., 1]])
        targets.append(onehot[:, None, :].expand(b, m, num_classes))
    if n > 0:
        assert synthetic is not None
        lam = d.diff_lam.to(x.dtype)
        syn_x, syn_y = synthetic.x[d.diff_src].to(x.dtype), F.one_hot(synthetic.y[d.diff_src], num_classes).to(x.dtype)
        parts.append(lam[..., None, None, None] * augs[bi, d.diff_aug] + (1 - lam[..., None, None, None]) * syn_x)
        targets.append(lam[..., None] * onehot[:, None, :] + (1 - lam[..., None]) * syn_y)
    return torch.cat(parts, dim=1), torch.cat(targets, dim=1)


def build_groups(
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    num_classes: int,
    k: int,
    m: int,
    n: int,
    alpha: float,
    padding: int,
    flip: bool,
    gen: torch.Generator,
    synthetic: SyntheticPool | None = None,
    same_class: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`draw` then :func:`assemble`, for a batch built in one piece."""
    d = draw(y, image_hw=(x.shape[2], x.shape[3]), k=k, m=m, n=n, alpha=alpha, padding=padding, flip=flip, gen=gen,
             synthetic=synthetic, same_class=same_class)
    return assemble(x, y, d, num_classes=num_classes, padding=padding, synthetic=synthetic)


def _synthetic_indices(y: torch.Tensor, n: int, pool: SyntheticPool | None, same_class: bool, gen: torch.Generator) -> torch.Tensor:
    """[B, n] pool indices: uniform over the pool, or over the example's class. A pool lacking a class is
    refused for same-class pairing whatever the batch holds (the refusal must not depend on private labels)."""
    assert pool is not None
    if not same_class:
        return torch.randint(0, len(pool.y), (len(y), n), generator=gen, device=y.device)
    if pool.empty_classes:
        raise ValueError(f"same-class diffusion-mixup: the synthetic set has no image of classes {list(pool.empty_classes)}")
    counts = pool.counts[y][:, None]  # [B, 1]
    u = torch.rand((len(y), n), generator=gen, device=y.device, dtype=torch.float64)
    return pool.members[y[:, None], torch.minimum((u * counts).long(), counts - 1)]


def soft_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-image cross-entropy against soft targets: [..., classes] → [...]."""
    return -(targets * F.log_softmax(logits, dim=-1)).sum(-1)
