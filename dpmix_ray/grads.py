"""Per-example gradients of the group-mean loss, clipping, and noise: the DP-SGD mechanism.

An example's "gradient" is the gradient of the mean loss over its whole group (K + m + n images),
clipped to norm C once. Opacus has no augmentation multiplicity (its issue #455), so the group is
handled here: ``torch.func.vmap(grad)`` over examples with the group as the inner batch (fast
path), and a one-example-at-a-time loop (reference) that tests hold the fast path to.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn
from torch.func import functional_call, grad, vmap

from dpmix_ray.mix import soft_cross_entropy

Grads = dict[str, torch.Tensor]
PerExampleFn = Callable[[nn.Module, torch.Tensor, torch.Tensor], tuple[Grads, torch.Tensor]]


def trainable(model: nn.Module) -> dict[str, nn.Parameter]:
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


def _frozen(model: nn.Module) -> dict[str, torch.Tensor]:
    """Buffers and frozen parameters: constants of the functional call."""
    out = {name: b for name, b in model.named_buffers()}
    out.update({name: p.detach() for name, p in model.named_parameters() if not p.requires_grad})
    return out


def group_loss(model: nn.Module, images: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-example group-mean losses: images [b, G, C, H, W], targets [b, G, classes] → [b]."""
    b, g = images.shape[:2]
    logits = model(images.reshape(b * g, *images.shape[2:]))
    return soft_cross_entropy(logits, targets.reshape(b * g, -1)).reshape(b, g).mean(1)


def per_example_grads_vmap(model: nn.Module, images: torch.Tensor, targets: torch.Tensor) -> tuple[Grads, torch.Tensor]:
    """∇θ of each example's group-mean loss, [b, *θ.shape] per parameter, and the losses [b]."""
    params = {k: v.detach() for k, v in trainable(model).items()}
    consts = _frozen(model)

    def loss_one(p: Grads, imgs: torch.Tensor, tgts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = functional_call(model, (p, consts), (imgs,))
        loss = soft_cross_entropy(logits, tgts).mean()
        return loss, loss.detach()

    grads, losses = vmap(grad(loss_one, has_aux=True), in_dims=(None, 0, 0), randomness="different")(params, images, targets)
    return grads, losses


def per_example_grads_loop(model: nn.Module, images: torch.Tensor, targets: torch.Tensor) -> tuple[Grads, torch.Tensor]:
    """Reference: one autograd call per example (a microbatch of one group). Slow and obviously right."""
    params = trainable(model)
    per: dict[str, list[torch.Tensor]] = {k: [] for k in params}
    losses = []
    for i in range(images.shape[0]):
        loss = group_loss(model, images[i : i + 1], targets[i : i + 1]).sum()
        for name, gi in zip(params, torch.autograd.grad(loss, list(params.values()))):
            per[name].append(gi)
        losses.append(loss.detach())
    return {k: torch.stack(v) for k, v in per.items()}, torch.stack(losses)


def clip_and_sum(grads: Grads, clip_norm: float) -> tuple[Grads, torch.Tensor]:
    """Σ_i g_i·min(1, C/‖g_i‖): each example contributes a vector of norm ≤ C. Returns (sum, norms)."""
    norms = torch.linalg.vector_norm(torch.stack([g.flatten(1).norm(dim=1) for g in grads.values()], dim=1), dim=1)
    factor = (clip_norm / (norms + 1e-6)).clamp(max=1.0)
    return {k: torch.einsum("b,b...->...", factor.to(g.dtype), g) for k, g in grads.items()}, norms


def noisy_mean(summed: Grads, *, noise_multiplier: float, clip_norm: float, expected_batch_size: float, generator: torch.Generator | None) -> Grads:
    """(Σ clipped + N(0, σ²C²)) / (q·N): noise added once per logical step, divided by the *expected* batch size.

    Dividing by the expected (not realised) batch size keeps the released quantity a function of the
    noisy sum alone, as the Poisson-subsampled Gaussian analysis assumes.
    """
    std = noise_multiplier * clip_norm
    return {
        k: (s + std * torch.randn(s.shape, generator=generator, dtype=s.dtype, device=s.device)) / expected_batch_size
        if std > 0
        else s / expected_batch_size
        for k, s in summed.items()
    }


def summed_grads_nonprivate(model: nn.Module, images: torch.Tensor, targets: torch.Tensor) -> tuple[Grads, torch.Tensor]:
    """Σ_i ∇θ loss_i in one backward pass (no per-example gradients): the non-private reference step."""
    params = trainable(model)
    losses = group_loss(model, images, targets)
    gs = torch.autograd.grad(losses.sum(), list(params.values()))
    return dict(zip(params, gs)), losses.detach()
