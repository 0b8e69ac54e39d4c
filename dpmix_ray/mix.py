"""The per-example group of DP-Mix: K self-augmentations, m self-mixups, n diffusion-mixups.

Every image in example x's group is derived from x alone, or from public synthetic data, so
removing x changes exactly one group (and so one clipped gradient): this is what keeps the
sensitivity at C. That holds for the random choices too: every draw behind x's group (crops, flips,
mixup pairs, λ, synthetic picks) is a counter-based hash of (public seed, x's stable key, step,
draw slot), so x's group at step t is a pure function of x, its key and t. Adding or removing
another example, or where x sits in the batch, changes none of x's draws (one shared stream across
the batch would: every later row's draws would shift). The key is a hash of x's image bytes
(``data.example_keys``), so identical images share a key and, at a step, their draws.

Pure batch-tensor functions on the images' device: the hash is int64 torch arithmetic (splitmix64,
wrapping on overflow), so nothing is copied from the host and nothing waits for it, and resuming
needs no generator state. Crops and flips are drawn per image (torchvision's batch transforms share
one draw across the batch, which would correlate the K augmentations).
"""

from __future__ import annotations

import math
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
    """Every random choice behind a batch's groups, one row per example, each row a function of that
    example's (key, step) alone: a chunk of examples then builds the same groups whatever the chunking
    (a performance knob must not change the mechanism's input) or the batch's other members."""

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
    y: torch.Tensor, key: torch.Tensor, *, seed: int, step: int, image_hw: tuple[int, int], k: int, m: int, n: int,
    alpha: float, padding: int, flip: bool, synthetic: SyntheticPool | None = None, same_class: bool = False,
) -> Draws:
    """The draws for a batch with labels ``y`` and stable example keys ``key`` (int64, on ``y``'s device)
    at logical step ``step``: crops and flips per image; for self-mixups two *distinct*
    self-augmentations i ≠ j and λ ~ Beta(α, α); for diffusion-mixups a self-augmentation, a synthetic
    image and λ. Row r is a function of (``seed``, ``key[r]``, ``step``, ``y[r]``) alone."""
    b, dev = len(y), y.device
    if m > 0 and k < 2:
        raise ValueError("self-mixup needs at least two distinct self-augmentations (K >= 2)")
    if n > 0 and synthetic is None:
        raise ValueError("diffusion-mixup needs a synthetic pool")
    if key.shape != y.shape or key.dtype != torch.int64:
        raise ValueError(f"draw needs one int64 key per example, got {key.dtype} {tuple(key.shape)} for {b} labels")
    s = example_states(key, seed=seed, step=step)
    p = _padding(padding, image_hw)
    crop = _below(uniforms(s, _CROP, 2 * k), 2 * p + 1).view(b, k, 2)
    flips = uniforms(s, _FLIP, k) < 0.5 if flip else torch.zeros((b, k), dtype=torch.bool, device=dev)
    u = uniforms(s, _PAIR, 2 * m).view(b, m, 2)
    i = _below(u[..., 0], k)
    j = (i + 1 + _below(u[..., 1], max(k - 1, 1))) % k  # j ≠ i by construction
    mix_lam = _beta(uniforms(s, _MIX_LAM, m * _BETA_UNIFORMS).view(b, m, _BETA_UNIFORMS), alpha)
    diff_aug = _below(uniforms(s, _DIFF_AUG, n), k)
    diff_src = _synthetic_indices(y, uniforms(s, _DIFF_SRC, n), synthetic, same_class) if n > 0 else diff_aug
    diff_lam = _beta(uniforms(s, _DIFF_LAM, n * _BETA_UNIFORMS).view(b, n, _BETA_UNIFORMS), alpha)
    return Draws(crop, flips, torch.stack([i, j], dim=-1), mix_lam, diff_aug, diff_src, diff_lam)


# --------------------------------------------------------------------------- keyed uniforms


def _signed(v: int) -> int:
    """The int64 with the bits of ``v`` mod 2⁶⁴ (torch's integer arithmetic is signed and wraps)."""
    v %= 1 << 64
    return v - (1 << 64) if v >= 1 << 63 else v


# splitmix64 (Steele, Lea & Flood 2014): the golden-ratio increment and the two finaliser multipliers.
_GAMMA = 0x9E3779B97F4A7C15
_MIX1, _MIX2 = _signed(0xBF58476D1CE4E5B9), _signed(0x94D049BB133111EB)
# Each kind of draw reads its own range of 2³² slots, so changing one count (K, m, n) leaves the others' draws.
_CROP, _FLIP, _PAIR, _MIX_LAM, _DIFF_AUG, _DIFF_SRC, _DIFF_LAM = range(7)


def _shr(z: torch.Tensor, s: int) -> torch.Tensor:
    """Logical right shift of int64 bits (torch's ``>>`` is arithmetic: it copies the sign bit)."""
    return (z >> s) & ((1 << (64 - s)) - 1)


def _mix64(z: torch.Tensor) -> torch.Tensor:
    """splitmix64's finaliser: a bijection of 64 bits in which every input bit flips about half the output bits."""
    z = (z ^ _shr(z, 30)) * _MIX1
    z = (z ^ _shr(z, 27)) * _MIX2
    return z ^ _shr(z, 31)


def example_states(key: torch.Tensor, *, seed: int, step: int) -> torch.Tensor:
    """[B] int64: one 64-bit state per (public ``seed``, example ``key``, ``step``); distinct keys give
    distinct states at a step (``_mix64`` is a bijection)."""
    return _mix64(_mix64(key ^ _signed(seed)) + _signed(step * _GAMMA))


def uniforms(state: torch.Tensor, kind: int, count: int) -> torch.Tensor:
    """[B, count] float64 uniforms in (0, 1): splitmix64's outputs at slots kind·2³² + 1 … count of each
    state, their top 52 bits r as (r + ½)·2⁻⁵², never 0 or 1 (the gamma sampler takes logs)."""
    slot = torch.arange(count, device=state.device) + (kind << 32) + 1
    z = _mix64(state[:, None] + slot * _signed(_GAMMA))
    return (_shr(z, 12).to(torch.float64) + 0.5) * 2.0**-52


def _below(u: torch.Tensor, n: int | torch.Tensor) -> torch.Tensor:
    """⌊u·n⌋, uniform on 0 … n − 1 (the clamp catches u·n rounding up to n)."""
    i = (u * n).long()
    return torch.minimum(i, n - 1) if isinstance(n, torch.Tensor) else i.clamp(max=n - 1)


# Candidates per gamma draw. Marsaglia–Tsang accepts a candidate with probability ≥ 0.9516 for shape
# a ≥ 1 (the worst case, a = 1, by quadrature), so all 16 fail with probability < 0.0484¹⁶ < 10⁻²¹ per
# draw; then the draw is d = a − 1/3, near the mode. Three uniforms a candidate, one for the α < 1 boost.
GAMMA_CANDIDATES = 16
_GAMMA_UNIFORMS = 3 * GAMMA_CANDIDATES + 1
_BETA_UNIFORMS = 2 * _GAMMA_UNIFORMS


def _log_gamma(u: torch.Tensor, alpha: float) -> torch.Tensor:
    """log X, X ~ Gamma(α, 1), from ``_GAMMA_UNIFORMS`` uniforms (last dim): Marsaglia & Tsang (2000) at
    shape a = α, or a = α + 1 times U^(1/α) for α < 1; the first accepted of the fixed candidates.
    In logs because X underflows float64 at small α."""
    r = GAMMA_CANDIDATES
    a = alpha if alpha >= 1 else alpha + 1
    d = a - 1 / 3
    c = 1 / math.sqrt(9 * d)
    x = torch.sqrt(-2 * torch.log(u[..., :r])) * torch.cos(2 * math.pi * u[..., r : 2 * r])  # Box–Muller normals
    t = 1 + c * x
    log_v = 3 * torch.log(t.clamp_min(torch.finfo(torch.float64).tiny))
    accept = (t > 0) & (torch.log(u[..., 2 * r : 3 * r]) < 0.5 * x * x + d - d * torch.exp(log_v) + d * log_v)
    first = torch.where(accept, torch.arange(r, device=u.device), r).amin(-1, keepdim=True)
    chosen = log_v.gather(-1, first.clamp(max=r - 1)).squeeze(-1)
    out = math.log(d) + torch.where(accept.any(-1), chosen, 0.0)
    return out + torch.log(u[..., 3 * r]) / alpha if alpha < 1 else out


def _beta(u: torch.Tensor, alpha: float) -> torch.Tensor:
    """λ ~ Beta(α, α) as X/(X + Y) with X, Y ~ Gamma(α) from ``_BETA_UNIFORMS`` uniforms (last dim), in
    float64 and as a logistic of log X − log Y (no 0/0 when both underflow)."""
    return torch.sigmoid(_log_gamma(u[..., :_GAMMA_UNIFORMS], alpha) - _log_gamma(u[..., _GAMMA_UNIFORMS:], alpha))


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
    key: torch.Tensor,
    *,
    seed: int,
    step: int = 0,
    num_classes: int,
    k: int,
    m: int,
    n: int,
    alpha: float,
    padding: int,
    flip: bool,
    synthetic: SyntheticPool | None = None,
    same_class: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`draw` then :func:`assemble`, for a batch built in one piece."""
    d = draw(y, key, seed=seed, step=step, image_hw=(x.shape[2], x.shape[3]), k=k, m=m, n=n, alpha=alpha, padding=padding,
             flip=flip, synthetic=synthetic, same_class=same_class)
    return assemble(x, y, d, num_classes=num_classes, padding=padding, synthetic=synthetic)


def _synthetic_indices(y: torch.Tensor, u: torch.Tensor, pool: SyntheticPool | None, same_class: bool) -> torch.Tensor:
    """[B, n] pool indices from uniforms ``u`` [B, n]: uniform over the pool, or over the example's own
    class (row r reads ``y[r]`` only). A pool lacking a class is refused for same-class pairing whatever
    the batch holds (the refusal must not depend on private labels)."""
    assert pool is not None
    if not same_class:
        return _below(u, len(pool.y))
    if pool.empty_classes:
        raise ValueError(f"same-class diffusion-mixup: the synthetic set has no image of classes {list(pool.empty_classes)}")
    return pool.members[y[:, None], _below(u, pool.counts[y][:, None])]


def soft_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-image cross-entropy against soft targets: [..., classes] → [...]."""
    return -(targets * F.log_softmax(logits, dim=-1)).sum(-1)
