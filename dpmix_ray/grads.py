"""Per-example gradients of the group-mean loss, materialised: the reference producers, and the memory model.

An example's "gradient" is the gradient of the mean loss over its whole group (K + m + n images).
Opacus has no augmentation multiplicity (its issue #455), so the group is handled here: a
one-example-at-a-time loop (the reference) and ``torch.func.vmap(grad)`` over examples with the group
as the inner batch (any model). The book-keeping accelerator (``bookkeeping.py``) computes the same
norms and weighted sums without materialising them; tests hold all three to each other.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn
from torch.func import functional_call, grad, vmap

from dpmix_ray.mechanism import Grads
from dpmix_ray.mix import soft_cross_entropy

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



@dataclass
class Materialised:
    """Per-example gradients held in memory ([b, *θ.shape] each) as a :class:`mechanism.PerExample`."""

    grads: Grads
    losses: torch.Tensor
    norms: torch.Tensor = field(init=False)

    def __post_init__(self) -> None:
        per_param = torch.stack([g.flatten(1).norm(dim=1) for g in self.grads.values()], dim=1)
        self.norms = torch.linalg.vector_norm(per_param, dim=1)

    def weighted_sum(self, factors: torch.Tensor) -> Grads:
        return {k: torch.einsum("b,b...->...", factors.to(g.dtype), g) for k, g in self.grads.items()}


def summed_grads_nonprivate(model: nn.Module, images: torch.Tensor, targets: torch.Tensor) -> tuple[Grads, torch.Tensor]:
    """Σ_i ∇θ loss_i in one backward pass (no per-example gradients): the non-private reference step."""
    params = trainable(model)
    losses = group_loss(model, images, targets)
    gs = torch.autograd.grad(losses.sum(), list(params.values()))
    return dict(zip(params, gs)), losses.detach()


def _saved_bytes(model: nn.Module, image_shape: tuple[int, ...], images: int) -> int:
    """Bytes of the tensors autograd saves in one forward of ``images`` zero images (parameters and
    buffers excluded; a storage counted once). Buffers and the RNG are restored afterwards."""
    p = next(model.parameters())
    state = [(v, v.clone()) for v in model.buffers()]
    skip = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in skip:
            saved[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.random.fork_rng(devices=[p.device] if p.device.type == "cuda" else []), torch.enable_grad():
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model(torch.zeros(images, *image_shape, dtype=p.dtype, device=p.device))
    with torch.no_grad():
        for buffer, value in state:
            buffer.copy_(value)
    return sum(saved.values())


def step_memory(model: nn.Module, image_shape: tuple[int, ...], group_size: int, *, private: bool, fast: bool) -> tuple[int, int]:
    """(bytes whatever the chunk, bytes per example) at the peak of one step, to size chunks from a memory cap.

    The activations are measured: autograd's saved tensors for one and for two images tell the
    per-image part from what is saved once per forward (WSConv2d's standardised weights). The factors
    (peak over saved activations) come from bench/grad_step.py and the memory-cap test: non-private ≤ 1.53
    (the strided ``cnn``, whose weight standardisation adds transients in backward); the fast path
    keeps per-example gradients and its transients within the layers' input bytes (≤ the saved
    activations), so ≤ 2; vmap holds its per-example gradients twice and about 3× the activations.
    ``fast``: whether the book-keeping accelerator runs the step (``bookkeeping.supports(model)``).
    """
    once, twice = _saved_bytes(model, image_shape, 1), _saved_bytes(model, image_shape, 2)
    per_image, fixed = twice - once, 2 * once - twice
    if not private:
        factor, per_example_grads = 1.6, 0
    elif fast:
        factor, per_example_grads = 2.0, 0
    else:
        factor, per_example_grads = 3.0, 2 * sum(p.numel() * p.element_size() for p in trainable(model).values())
    return int(factor * max(0, fixed)), int(factor * group_size * per_image) + per_example_grads
