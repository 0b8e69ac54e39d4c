"""The per-example group of DP-Mix: K self-augmentations, m self-mixups, n diffusion-mixups.

Every image in example x's group is derived from x alone, or from public synthetic data, so
removing x changes exactly one group (and so one clipped gradient): this is what keeps the
sensitivity at C. Pure batch-tensor functions; randomness comes from an explicit numpy Generator
so a run is reproducible and resumable. Crops and flips are drawn per image (torchvision's batch
transforms share one draw across the batch, which would correlate the K augmentations).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class SyntheticPool:
    """Public synthetic images (pixel space [0, 1]) and their labels, indexed by class for same-class pairing."""

    x: torch.Tensor
    y: torch.Tensor
    by_class: tuple[np.ndarray, ...]

    @classmethod
    def from_tensors(cls, x: torch.Tensor, y: torch.Tensor, num_classes: int) -> "SyntheticPool":
        labels = y.cpu().numpy()
        return cls(x, y, tuple(np.flatnonzero(labels == c) for c in range(num_classes)))

    def to(self, device: torch.device) -> "SyntheticPool":
        return SyntheticPool(self.x.to(device), self.y.to(device), self.by_class)


def self_augment(x: torch.Tensor, k: int, *, padding: int, flip: bool, rng: np.random.Generator) -> torch.Tensor:
    """K independent reflect-padded random crops (+ optional horizontal flips) of each image.

    x: [B, C, H, W] → [B, K, C, H, W].
    """
    b, c, h, w = x.shape
    p = min(padding, h - 1, w - 1)
    src = F.pad(x, (p, p, p, p), mode="reflect") if p > 0 else x
    oy = torch.from_numpy(rng.integers(0, 2 * p + 1, size=(b, k))).to(x.device)
    ox = torch.from_numpy(rng.integers(0, 2 * p + 1, size=(b, k))).to(x.device)
    rows = (oy[..., None] + torch.arange(h, device=x.device))  # [B, K, H]
    cols = (ox[..., None] + torch.arange(w, device=x.device))  # [B, K, W]
    if flip:
        flipped = torch.from_numpy(rng.random((b, k)) < 0.5).to(x.device)
        cols = torch.where(flipped[..., None], cols.flip(-1), cols)
    bi = torch.arange(b, device=x.device)[:, None, None, None]
    # src[b, :, rows, cols] with per-(b,k) index grids → [B, K, H, W, C]
    out = src.permute(0, 2, 3, 1)[bi, rows[..., :, None], cols[..., None, :]]
    return out.permute(0, 1, 4, 2, 3).contiguous()


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
    rng: np.random.Generator,
    synthetic: SyntheticPool | None = None,
    same_class: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Each example's group of G = K + m + n images and soft targets.

    Returns images [B, G, C, H, W] and targets [B, G, num_classes], ordered as
    [K self-augs | m self-mixups | n diffusion-mixups]:
    - self-mixup: λ·a_i + (1−λ)·a_j with i ≠ j (two *distinct* self-augs), λ ~ Beta(α, α), label y;
    - diffusion-mixup: λ·a_i + (1−λ)·s with s a synthetic image, label λ·y + (1−λ)·y_s.
    """
    b = x.shape[0]
    augs = self_augment(x, k, padding=padding, flip=flip, rng=rng)
    onehot = F.one_hot(y, num_classes).to(x.dtype)
    parts, targets = [augs], [onehot[:, None, :].expand(b, k, num_classes)]
    bi = torch.arange(b, device=x.device)[:, None]
    if m > 0:
        if k < 2:
            raise ValueError("self-mixup needs at least two distinct self-augmentations (K >= 2)")
        i = rng.integers(0, k, size=(b, m))
        j = (i + rng.integers(1, k, size=(b, m))) % k  # j ≠ i by construction
        lam = torch.from_numpy(rng.beta(alpha, alpha, size=(b, m))).to(x)[..., None, None, None]
        parts.append(lam * augs[bi, _idx(i, x)] + (1 - lam) * augs[bi, _idx(j, x)])
        targets.append(onehot[:, None, :].expand(b, m, num_classes))
    if n > 0:
        if synthetic is None:
            raise ValueError("diffusion-mixup needs a synthetic pool")
        i = rng.integers(0, k, size=(b, n))
        s = _synthetic_indices(y.cpu().numpy(), n, synthetic, same_class, rng)
        lam = torch.from_numpy(rng.beta(alpha, alpha, size=(b, n))).to(x)
        s_t = _idx(s, synthetic.x)
        syn_x, syn_y = synthetic.x[s_t].to(x), F.one_hot(synthetic.y[s_t], num_classes).to(x)
        parts.append(lam[..., None, None, None] * augs[bi, _idx(i, x)] + (1 - lam[..., None, None, None]) * syn_x)
        targets.append(lam[..., None] * onehot[:, None, :] + (1 - lam[..., None]) * syn_y)
    return torch.cat(parts, dim=1), torch.cat(targets, dim=1)


def _idx(a: np.ndarray, like: torch.Tensor) -> torch.Tensor:
    return torch.from_numpy(a).to(like.device)


def _synthetic_indices(
    labels: np.ndarray, n: int, pool: SyntheticPool, same_class: bool, rng: np.random.Generator
) -> np.ndarray:
    if not same_class:
        return rng.integers(0, len(pool.y), size=(len(labels), n))
    out = np.empty((len(labels), n), dtype=np.int64)
    for row, label in enumerate(labels):
        members = pool.by_class[label]
        if len(members) == 0:
            raise ValueError(f"same-class diffusion-mixup: the synthetic set has no image of class {label}")
        out[row] = members[rng.integers(0, len(members), size=n)]
    return out


def soft_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-image cross-entropy against soft targets: [..., classes] → [...]."""
    return -(targets * F.log_softmax(logits, dim=-1)).sum(-1)
