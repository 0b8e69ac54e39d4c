"""Per-example gradients of the group-mean loss, clipping, and noise: the DP-SGD mechanism.

An example's "gradient" is the gradient of the mean loss over its whole group (K + m + n images),
clipped to norm C once. Opacus has no augmentation multiplicity (its issue #455), so the group is
handled here, three ways that tests hold to each other: a one-example-at-a-time loop (the
reference), ``torch.func.vmap(grad)`` over examples with the group as the inner batch (any model),
and ``clipped_sum_fast`` (book-keeping with ghost norms per layer; what the trainer runs when the
model's trainable layers are Linear, Conv2d, WSConv2d, GroupNorm), which returns the clipped sum
without the model's per-example gradients. Measurements: docs/performance.md.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator, Literal

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, vmap

from dpmix_ray.mix import soft_cross_entropy
from dpmix_ray.models import WSConv2d

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


def _clip_factors(norms: torch.Tensor, clip_norm: float) -> torch.Tensor:
    return (clip_norm / (norms + 1e-6)).clamp(max=1.0)


def clip_and_sum(grads: Grads, clip_norm: float) -> tuple[Grads, torch.Tensor]:
    """Σ_i g_i·min(1, C/‖g_i‖): each example contributes a vector of norm ≤ C. Returns (sum, norms)."""
    norms = torch.linalg.vector_norm(torch.stack([g.flatten(1).norm(dim=1) for g in grads.values()], dim=1), dim=1)
    factor = _clip_factors(norms, clip_norm)
    return {k: torch.einsum("b,b...->...", factor.to(g.dtype), g) for k, g in grads.items()}, norms


def noisy_mean(summed: Grads, *, noise_multiplier: float, clip_norm: float, expected_batch_size: float, generator: torch.Generator | None) -> Grads:
    """(Σ clipped + N(0, σ²C²)) / (q·N): noise added once per logical step, divided by the *expected* batch size.

    Dividing by the expected (not realised) batch size keeps the released quantity a function of the
    noisy sum alone, as the Poisson-subsampled Gaussian analysis assumes. The noise is drawn already
    scaled and then updated in place: one allocation per parameter instead of four.
    """
    std = noise_multiplier * clip_norm
    if std == 0:
        return {k: s / expected_batch_size for k, s in summed.items()}
    return {k: torch.empty_like(s).normal_(0.0, std, generator=generator).add_(s).div_(expected_batch_size) for k, s in summed.items()}


def summed_grads_nonprivate(model: nn.Module, images: torch.Tensor, targets: torch.Tensor) -> tuple[Grads, torch.Tensor]:
    """Σ_i ∇θ loss_i in one backward pass (no per-example gradients): the non-private reference step."""
    params = trainable(model)
    losses = group_loss(model, images, targets)
    gs = torch.autograd.grad(losses.sum(), list(params.values()))
    return dict(zip(params, gs)), losses.detach()


# --------------------------------------------------------------------------- fast path: book-keeping
#
# One forward and one backward that forms input gradients only (no parameter is an autograd input, so
# no weight gradient is computed). A hook on each trainable layer's output receives ∂L/∂y for the whole
# chunk and, with the input a the layer saw, reduces it to per-example squared norms, folding each
# example's G images and their spatial positions into one "sequence" of T rows. A layer (T rows, d
# inputs, p outputs per row) takes one of three routes:
# - "ghost" when its multiplies (the Gram of the rows, see _conv_gram, and T²·p) are below 0.4 of the
#   T·d·p that materialising takes: ‖Σ_t g_t a_tᵀ‖² = Σ_{t,t'} (a_t·a_t')(g_t·g_t') without forming the
#   gradient; its share of the clipped sum is then one ordinary weight-gradient call on c-weighted
#   output gradients (c_i = min(1, C/‖∇ℓ_i‖));
# - "keep": per-example gradients are formed and kept; its share is one weighted sum over examples;
# - "norms": formed for their norms only and dropped, the share computed as for "ghost". Layers keep
#   while their per-example gradients fit in a budget equal to the bytes of all the layers' inputs
#   (tensors autograd saves anyway), most rows first (the most work saved per byte kept).
# No route runs a second backward through the network (Opacus's ghost clipping backpropagates
# Σ_i c_i·ℓ_i a second time), so the step costs one forward, one backward and the norms.

Route = Literal["keep", "norms", "ghost"]
Forming = Literal["patches", "grouped", "loop"]
_Finish = Callable[[torch.Tensor], Grads]
_aten = torch.ops.aten
# Per-example multiplies (G·T·d·p) of a convolution's weight gradient below which batched matmuls
# over strided patches beat oneDNN calls, and (G = 1) below which grouped calls beat a loop (CPU, measured).
_PATCHES_MAX_WORK = 1_000_000
_GROUPED_MAX_WORK = 1 << 22


def _rows(t: torch.Tensor, b: int, features_dim: int) -> torch.Tensor:
    """[b·G, …] → [b, T, features]: each example's G images and their positions as T rows."""
    t = t.movedim(features_dim, -1)
    return t.reshape(b, -1, t.shape[-1])


def _zeros(b: int, like: torch.Tensor) -> torch.Tensor:
    return torch.zeros(b, dtype=like.dtype, device=like.device)


class _Standardisation:
    """WSConv2d's w' = (w − mean)·r per output filter (n entries, r = (var + ε)^(−1/2)), and the linear
    map from ∂L/∂w' back to ∂L/∂w = r·(g − Σg/n − w'·⟨g, w'⟩/n). Its squared norm needs only three
    per-filter reductions of g, Q = ‖g‖², S = Σg, D = ⟨g, w'⟩: r²·(Q − S²/n − D²·(2n − ‖w'‖²)/n²), so
    per-example gradients are never mapped one by one; the clipped sum is mapped once.

    w' and r are the forward's own tensors, read from the autograd nodes that saved them (the
    convolution saves w', the product (w − mean)·r saves r): recomputing them costs a few passes over
    the weights per layer and step. ‖w'‖² per filter is then n·var/(var + ε) = n·(1 − ε·r²)."""

    def __init__(self, out: torch.Tensor) -> None:
        conv = out.grad_fn
        scale = conv.next_functions[1][0] if type(conv).__name__ == "ConvolutionBackward0" else None
        if type(scale).__name__ != "MulBackward0":
            raise RuntimeError("clipped_sum_fast: WSConv2d's forward no longer computes conv2d(x, (w − mean)·r)")
        w_std, r = conv._saved_weight.detach(), scale._saved_other.detach()  # not their graph: it holds w − mean
        self.n = w_std[0].numel()
        self.w_std = w_std.flatten(1)  # [filters, n]
        self.r = r.flatten(1)  # [filters, 1]
        self.w_sq = self.n * (1 - WSConv2d.eps * self.r[:, 0].pow(2))

    def sq_norms(self, q: torch.Tensor, s: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
        """Per-example squared norms of ∂L/∂w from per-example, per-filter Q, S, D (each [b, filters])."""
        n = self.n
        per_filter = q - s.pow(2) / n - d.pow(2) * (2 * n - self.w_sq) / n**2
        return (self.r[:, 0].pow(2) * per_filter.clamp(min=0)).sum(1)

    def pull_back(self, g: torch.Tensor) -> torch.Tensor:
        flat = g.flatten(1)
        s, d = flat.sum(1, keepdim=True), torch.linalg.vecdot(flat, self.w_std).unsqueeze(1)
        # r·(g − S/n − w'·D/n), with one weight-sized allocation
        return (flat - s / self.n).addcmul_(self.w_std, d, value=-1 / self.n).mul_(self.r).view_as(g)


def _weighted_sum(c: torch.Tensor, chunks: list[torch.Tensor]) -> torch.Tensor:
    """Σ_i c_i·g_i for per-example gradients held as consecutive chunks of examples ([k, …] each)."""
    total, start = None, 0
    for ch in chunks:
        part = torch.einsum("b,b...->...", c[start : start + ch.shape[0]], ch)
        total = part if total is None else total.add_(part)
        start += ch.shape[0]
    assert total is not None
    return total


@dataclass
class _Call:
    """One trainable layer's forward, as the backward hook and the route planner see it."""

    module: nn.Module
    a: torch.Tensor
    out: torch.Tensor | None  # held only for a WSConv2d's ghost route
    rows: int  # T per example
    kept_bytes: int  # its per-example gradients, if kept
    route: Route
    forming: Forming = "loop"  # how a convolution's per-example gradients are formed (keep, norms)
    transient_bytes: int = 0  # per example, while a slice of them is formed
    per_call: int = 1  # examples per slice, set by the plan
    ws: _Standardisation | None = None  # a WSConv2d's w' and r, from its forward
    stats: tuple[torch.Tensor, torch.Tensor] | None = None  # a GroupNorm's mean and rstd, from its forward


def _linear(call: _Call, gy: torch.Tensor, b: int) -> tuple[torch.Tensor, _Finish]:
    mod, a, route = call.module, call.a, call.route
    a2, g2 = _rows(a, b, -1), _rows(gy, b, -1)
    bias = g2.sum(1) if mod.bias is not None else None
    sq = bias.pow(2).sum(1) if bias is not None else _zeros(b, gy)
    if route == "ghost":
        sq = sq + (torch.bmm(a2, a2.transpose(1, 2)) * torch.bmm(g2, g2.transpose(1, 2))).sum((1, 2))
    else:
        per = torch.bmm(g2.transpose(1, 2), a2)
        sq = sq + torch.linalg.vector_norm(per.flatten(1), dim=1).pow(2)
    # Each branch's closure holds only what its route needs (the kept gradients, or a and ∂L/∂y).
    if route == "keep":

        def weight(c: torch.Tensor) -> torch.Tensor:
            return _weighted_sum(c, [per])
    else:

        def weight(c: torch.Tensor) -> torch.Tensor:
            return (g2 * c[:, None, None]).flatten(0, 1).T @ a2.flatten(0, 1)

    def finish(c: torch.Tensor) -> Grads:
        return {"weight": weight(c)} | ({"bias": c @ bias} if bias is not None else {})

    return sq, finish


def _conv_weight_grad(mod: nn.Conv2d, w: torch.Tensor, gy: torch.Tensor, a: torch.Tensor, groups: int) -> torch.Tensor:
    """∂L/∂w of ``mod``'s convolution (with weight of w's shape) alone: no input gradient is formed."""
    return _aten.convolution_backward(
        gy, a, w, None, mod.stride, mod.padding, mod.dilation, False, (0, 0), groups, (False, True, False)
    )[1]


def _forming(mod: nn.Conv2d, a_shape: torch.Size, out_shape: torch.Size, b: int) -> tuple[Forming, int]:
    """How to form the per-example weight gradients, and the bytes per example while a slice is formed.

    oneDNN's weight-gradient call costs ~50 µs whatever its size, so small per-example problems are
    batched: as matmuls over a strided copy of the padded input's patches, or (G = 1) as one grouped
    convolution with examples as groups; large ones take one call per example."""
    g, elt = a_shape[0] // b, mod.weight.element_size()
    d, p, t = mod.weight[0].numel(), mod.out_channels, out_shape[2] * out_shape[3]
    work = g * t * d * p
    if mod.groups == 1 and work < _PATCHES_MAX_WORK:
        return "patches", (g * t * (d + p) + d * p) * elt
    if mod.groups == 1 and g == 1 and work < _GROUPED_MAX_WORK:
        return "grouped", 3 * d * p * elt  # oneDNN reorders its output: about three gradients' size
    return "loop", 0


def _patch_grads(mod: nn.Conv2d, a: torch.Tensor, gy: torch.Tensor, b: int, k: int) -> Iterator[torch.Tensor]:
    """Per-example weight gradients, k examples per batched matmul: ∂L/∂y as [k, p, G·T] times the
    padded input's patches as [k, G·T, d], a strided view copied once per slice."""
    g = a.shape[0] // b
    ph, pw = mod.padding
    xp = (F.pad(a, (pw, pw, ph, ph)) if ph or pw else a).contiguous()
    gy = gy.contiguous()
    c, (kh, kw), (sh, sw), (dh, dw) = xp.shape[1], mod.kernel_size, mod.stride, mod.dilation
    p, ho, wo = gy.shape[1:]
    s0, s1, s2, s3 = xp.stride()
    buffer = xp.new_empty(min(k, b), c, kh, kw, g, ho, wo)  # one allocation for every slice's copy
    for i in range(0, b, k):
        n = min(k, b - i)
        view = xp[i * g : (i + n) * g].as_strided((n, c, kh, kw, g, ho, wo), (g * s0, s1, s2 * dh, s3 * dw, s0, s2 * sh, s3 * sw))
        patches = buffer[:n].copy_(view).view(n, c * kh * kw, g * ho * wo)
        rows = gy[i * g : (i + n) * g].view(n, g, p, ho * wo).transpose(1, 2).reshape(n, p, g * ho * wo)
        yield torch.bmm(rows, patches.transpose(1, 2)).view(n, *mod.weight.shape)


def _per_example_conv(call: _Call, w: torch.Tensor, gy: torch.Tensor, b: int) -> Iterator[torch.Tensor]:
    """Per-example weight gradients of a convolution whose chunk holds b examples of G images each,
    yielded in consecutive chunks of examples ([k, *w.shape]) so that a caller after norms holds one.

    Grouped: examples as groups, inputs as views, k examples per call; a weight gradient does not
    depend on the weight, so a broadcast zero stands in for k copies of it."""
    mod, a, k = call.module, call.a, call.per_call
    if call.forming == "patches":
        yield from _patch_grads(mod, a, gy, b, k)
    elif call.forming == "grouped":
        shapes_only = torch.zeros((), dtype=w.dtype, device=w.device).expand(k * w.shape[0], *w.shape[1:])
        for i in range(0, b, k):
            gy_i, a_i = gy[i : i + k].reshape(1, -1, *gy.shape[2:]), a[i : i + k].reshape(1, -1, *a.shape[2:])
            n = gy[i : i + k].shape[0]
            yield _conv_weight_grad(mod, shapes_only[: n * w.shape[0]], gy_i, a_i, n).view(n, *w.shape)
    else:
        g = a.shape[0] // b
        for i in range(b):
            yield _conv_weight_grad(mod, w, gy[i * g : (i + 1) * g], a[i * g : (i + 1) * g], mod.groups)[None]


def _padded_positions(mod: nn.Conv2d, out_hw: torch.Size) -> list[tuple[slice, slice]]:
    """For each kernel offset, the rows and columns of the zero-padded input that it reads, in output order."""
    (sh, sw), (dh, dw), (kh, kw) = mod.stride, mod.dilation, mod.kernel_size
    ho, wo = out_hw
    return [
        (slice(dy * dh, dy * dh + sh * (ho - 1) + 1, sh), slice(dx * dw, dx * dw + sw * (wo - 1) + 1, sw))
        for dy in range(kh)
        for dx in range(kw)
    ]


def _gram_costs(mod: nn.Conv2d, a_shape: torch.Size, b: int, t: int) -> tuple[int, int]:
    """Multiplies for the Gram of an example's unfolded rows: (via the padded input's pixels, via unfold)."""
    g, c = a_shape[0] // b, a_shape[1]
    padded = g * (a_shape[2] + 2 * mod.padding[0]) * (a_shape[3] + 2 * mod.padding[1])
    return padded * padded * c, t * t * mod.weight[0].numel()


def _conv_gram(mod: nn.Conv2d, a: torch.Tensor, b: int, out_hw: torch.Size) -> tuple[torch.Tensor, torch.Tensor]:
    """Per example, the Gram matrix of its unfolded input rows, A_tt' = a_t·a_t' ([b, T, T]), and each
    row's sum Σ a_t ([b, T]). Either by unfolding, or without: the Gram of the zero-padded input's
    pixels (over channels, all G images) is formed once and A is the sum over kernel offsets of its
    shifted slices, (G·Hp·Wp)²·C multiplies instead of T²·C·k² (k² fewer for a stride-1 convolution)."""
    g = a.shape[0] // b
    t = g * out_hw[0] * out_hw[1]
    via_pixels, via_unfold = _gram_costs(mod, a.shape, b, t)
    if via_unfold <= via_pixels:
        rows = _rows(F.unfold(a, mod.kernel_size, mod.dilation, mod.padding, mod.stride), b, 1)  # [b, T, d]
        return torch.bmm(rows, rows.transpose(1, 2)), rows.sum(2)
    ph, pw = mod.padding
    xp = F.pad(a, (pw, pw, ph, ph))
    _, c, hp, wp = xp.shape
    x2 = xp.view(b, g, c, hp * wp).transpose(1, 2).reshape(b, c, g * hp * wp)
    full = torch.bmm(x2.transpose(1, 2), x2).view(b, g, hp, wp, g, hp, wp)
    pixel_sums = xp.sum(1).view(b, g, hp, wp)
    gram = row_sums = None
    for rows_, cols in _padded_positions(mod, out_hw):
        part, part_sums = full[:, :, rows_, cols][:, :, :, :, :, rows_, cols], pixel_sums[:, :, rows_, cols]
        gram = part.clone() if gram is None else gram.add_(part)
        row_sums = part_sums.clone() if row_sums is None else row_sums.add_(part_sums)
    return gram.reshape(b, t, t), row_sums.reshape(b, t)


def _conv2d(call: _Call, gy: torch.Tensor, b: int) -> tuple[torch.Tensor, _Finish]:
    """Conv2d, and WSConv2d through :class:`_Standardisation` (gradients are formed or ghosted for w' and
    mapped back). The ghost route of a WSConv2d needs the layer's output (for ⟨g, w'⟩)."""
    mod, a, out, route, ws = call.module, call.a, call.out, call.route, call.ws
    w_eff = mod.weight.detach() if ws is None else ws.w_std.view_as(mod.weight)
    bias = gy.reshape(b, -1, gy.shape[1], gy[0, 0].numel()).sum((1, 3)) if mod.bias is not None else None
    sq = bias.pow(2).sum(1) if bias is not None else _zeros(b, gy)
    if route == "ghost":
        g2 = _rows(gy, b, 1)  # [b, T, p]
        gram, row_sums = _conv_gram(mod, a, b, gy.shape[2:])
        q = (torch.bmm(gram, g2) * g2).sum(1)  # per-filter ‖∂L/∂w'_o‖², [b, p]
        if ws is None:
            sq = sq + q.sum(1)
        else:
            assert out is not None
            y = _rows(out if mod.bias is None else out - mod.bias.detach()[:, None, None], b, 1)  # a_t·w'_o
            sq = sq + ws.sq_norms(q, torch.einsum("btp,bt->bp", g2, row_sums), (g2 * y).sum(1))
    else:
        per: list[torch.Tensor] = []
        # Per chunk only the reductions that need the gradients; the arithmetic on them runs once.
        norms, sums, dots = [], [], []
        for chunk in _per_example_conv(call, w_eff, gy, b):
            if ws is None:
                norms.append(torch.linalg.vector_norm(chunk.flatten(1), dim=1))
            else:
                f = chunk.flatten(2)  # [k, p, n]
                norms.append(torch.linalg.vector_norm(f, dim=2))
                sums.append(f.sum(2))
                dots.append(torch.linalg.vecdot(f, ws.w_std))
            if route == "keep":
                per.append(chunk)
        q = torch.cat(norms).pow(2)
        sq = sq + (q if ws is None else ws.sq_norms(q, torch.cat(sums), torch.cat(dots)))
    if route == "keep":

        def weight(c: torch.Tensor) -> torch.Tensor:
            return _weighted_sum(c, per)
    else:
        g = a.shape[0] // b

        def weight(c: torch.Tensor) -> torch.Tensor:
            return _conv_weight_grad(mod, w_eff, gy * c.repeat_interleave(g)[:, None, None, None], a, mod.groups)

    def finish(c: torch.Tensor) -> Grads:
        w = weight(c)
        return {"weight": w if ws is None else ws.pull_back(w)} | ({"bias": c @ bias} if bias is not None else {})

    return sq, finish


def _group_norm(call: _Call, gy: torch.Tensor, b: int) -> tuple[torch.Tensor, _Finish]:
    """Affine GroupNorm: per-example gradients are C-sized, so always kept. ATen's own GroupNorm backward
    forms them (Σ g·x̂, Σ g per channel) without an x̂ tensor, in one call whose batch is all b·G images
    laid side by side as b·G·C channels (views; each image keeps its own groups' statistics); each
    example's gradient is then the sum over its G images."""
    mod, a = call.module, call.a
    n_img, c, groups = a.shape[0], a.shape[1], mod.num_groups
    hw = a[0, 0].numel()
    assert call.stats is not None
    mean, rstd = call.stats
    _, gw, gb = _aten.native_group_norm_backward(
        gy.reshape(1, n_img * c, hw), a.reshape(1, n_img * c, hw), mean.reshape(1, -1), rstd.reshape(1, -1), None,
        1, n_img * c, hw, n_img * groups, (False, True, True),
    )
    gw, gb = gw.view(b, -1, c).sum(1), gb.view(b, -1, c).sum(1)
    return gw.pow(2).sum(1) + gb.pow(2).sum(1), lambda c_: {"weight": c_ @ gw, "bias": c_ @ gb}


_Rule = Callable[[_Call, torch.Tensor, int], tuple[torch.Tensor, _Finish]]
_RULES: dict[type[nn.Module], _Rule] = {nn.Linear: _linear, nn.Conv2d: _conv2d, WSConv2d: _conv2d, nn.GroupNorm: _group_norm}


def _group_norm_stats(mod: nn.GroupNorm, a: torch.Tensor, out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The mean and rstd ([N, groups]) the forward normalised with: saved by its NativeGroupNormBackward0
    node (detached: not its graph), or recomputed where torch's GroupNorm took another kernel."""
    node = out.grad_fn
    if type(node).__name__ == "NativeGroupNormBackward0":
        return node._saved_result1.detach(), node._saved_result2.detach()
    _, mean, rstd = _aten.native_group_norm(a, None, None, a.shape[0], a.shape[1], a[0, 0].numel(), mod.num_groups, mod.eps)
    return mean, rstd


def _record(mod: nn.Module, a: torch.Tensor, out: torch.Tensor, b: int) -> _Call:
    """The route by cost alone ("ghost" or "keep"; the planner may turn "keep" into "norms"), and what
    the rule reuses from the forward: a WSConv2d's w' and r, a GroupNorm's statistics."""
    kept = b * sum(p.numel() for p in mod.parameters(recurse=False)) * a.element_size()
    if isinstance(mod, nn.GroupNorm):  # C-sized per-example gradients, always kept
        return _Call(mod, a, None, 0, 0, "keep", stats=_group_norm_stats(mod, a, out))
    if isinstance(mod, nn.Linear):
        t, d, p = a.numel() // (b * mod.in_features), mod.in_features, mod.out_features
        return _Call(mod, a, None, t, kept, "ghost" if _ghost_pays(t * t * (d + p), t * d * p) else "keep")
    assert isinstance(mod, nn.Conv2d)
    t, d, p = out.shape[0] // b * out.shape[2] * out.shape[3], mod.weight[0].numel(), mod.out_channels
    forming, transient = _forming(mod, a.shape, out.shape, b)
    ws = _Standardisation(out) if isinstance(mod, WSConv2d) else None
    # The Gram of a grouped convolution's input is per group: no ghost route for it here.
    ghost = mod.groups == 1 and _ghost_pays(min(_gram_costs(mod, a.shape, b, t)) + t * t * p, t * d * p)  # see _conv_gram
    return _Call(mod, a, out.detach() if ghost and ws is not None else None, t, kept, "ghost" if ghost else "keep", forming, transient, ws=ws)


def _ghost_pays(ghost_cost: int, materialise_cost: int) -> bool:
    """Against materialising the T×d by T×p product: measured on CPU, the routes break even near 0.35
    (a Gram multiply is slower, and the ghost route adds the weighted weight-gradient call); near it
    the ghost route is taken for the memory it saves."""
    return ghost_cost < 0.4 * materialise_cost


def _plan(calls: list[_Call], b: int) -> None:
    """Keep per-example gradients, most rows first, while they fit in a budget: the bytes of the layers'
    inputs, tensors autograd saves anyway. What is left of it caps the transient of a slice of
    per-example convolution gradients being formed (patches or a grouped call)."""
    budget = sum({c.a.data_ptr(): c.a.numel() * c.a.element_size() for c in calls}.values())
    for call in sorted((c for c in calls if c.route == "keep"), key=lambda c: -c.rows):
        if call.kept_bytes > budget:
            call.route = "norms"
        else:
            budget -= call.kept_bytes
    for call in calls:
        if call.transient_bytes:
            k = max(1, min(b, budget // call.transient_bytes))
            # oneDNN's grouped weight gradient slows down past 32 groups, and at counts not a power of
            # two (cnn's 32→64 conv at 14×14, ms: 3.6 with 32 groups, 5.1 with 64, 7.1 with 61)
            call.per_call = 1 << min(k.bit_length() - 1, 5) if call.forming == "grouped" else k


def _fast_layers(model: nn.Module) -> dict[nn.Module, str] | None:
    """Each trainable layer with its name prefix, or None when a trainable parameter sits where no rule
    applies (another layer type, a partly frozen layer, a shared parameter, a non-zero padding mode)."""
    layers: dict[nn.Module, str] = {}
    for prefix, mod in model.named_modules():
        own = list(mod.parameters(recurse=False))
        if not any(p.requires_grad for p in own):
            continue
        if type(mod) not in _RULES or not all(p.requires_grad for p in own):
            return None
        if isinstance(mod, nn.Conv2d) and (mod.padding_mode != "zeros" or isinstance(mod.padding, str)):
            return None
        layers[mod] = prefix
    if sum(len(list(m.parameters(recurse=False))) for m in layers) != len(trainable(model)):
        return None
    return layers


def supports_fast(model: nn.Module) -> bool:
    """Whether :func:`clipped_sum_fast` has a rule for every trainable parameter of ``model``."""
    return _fast_layers(model) is not None


def clipped_sum_fast(model: nn.Module, images: torch.Tensor, targets: torch.Tensor, clip_norm: float) -> tuple[Grads, torch.Tensor, torch.Tensor]:
    """Σ_i clip_C(∇θ ℓ_i) over the group-mean losses ℓ_i, never forming the whole model's per-example gradients.

    The same mechanism as ``clip_and_sum(per_example_grads_vmap(...))``: same norms, same factors
    min(1, C/(‖g_i‖ + 1e-6)). Returns (clipped sum, norms [b], losses [b]). Each trainable layer must
    run once per forward, downstream of the first one to run (true of the project's models).
    """
    layers = _fast_layers(model)
    if layers is None:
        raise ValueError("clipped_sum_fast: the model has trainable parameters outside Linear/Conv2d/WSConv2d/GroupNorm layers")
    return _clipped_sum_fast(model, layers, images, targets, clip_norm)


def _clipped_sum_fast(
    model: nn.Module, layers: dict[nn.Module, str], images: torch.Tensor, targets: torch.Tensor, clip_norm: float
) -> tuple[Grads, torch.Tensor, torch.Tensor]:
    b = images.shape[0]
    calls: dict[nn.Module, _Call] = {}
    pieces: dict[nn.Module, tuple[torch.Tensor, _Finish]] = {}
    first: list[torch.Tensor] = []

    def on_forward(mod: nn.Module, inputs: tuple[torch.Tensor, ...], out: torch.Tensor) -> None:
        if mod in calls:
            raise RuntimeError(f"clipped_sum_fast: layer '{layers[mod]}' ran twice in one forward")
        calls[mod] = _record(mod, inputs[0].detach(), out, b)

        def on_grad(gy: torch.Tensor) -> None:
            call = calls.pop(mod)  # drops the held input as soon as the layer is done
            with torch.no_grad():
                pieces[mod] = _RULES[type(mod)](call, gy, b)

        out.register_hook(on_grad)
        if not first:
            first.append(out)

    handles = [m.register_forward_hook(on_forward) for m in layers]
    try:
        losses = group_loss(model, images, targets)
    finally:
        for h in handles:
            h.remove()
    if len(calls) != len(layers):
        raise RuntimeError("clipped_sum_fast: some trainable layer did not run in the forward")
    _plan(list(calls.values()), b)
    # Differentiating w.r.t. the first layer's output runs every hook and forms no weight gradient.
    torch.autograd.grad(losses.sum(), first)
    if calls:
        raise RuntimeError(f"clipped_sum_fast: layers {[layers[m] for m in calls]} are not downstream of the first trainable layer")
    norms = torch.stack([sq for sq, _ in pieces.values()]).sum(0).sqrt()
    factors = _clip_factors(norms, clip_norm)
    summed: Grads = {}
    for mod, (_, finish) in pieces.items():
        summed.update({f"{layers[mod]}.{k}" if layers[mod] else k: g for k, g in finish(factors).items()})
    return {k: summed[k] for k in trainable(model)}, norms, losses.detach()


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


def step_memory(model: nn.Module, image_shape: tuple[int, ...], group_size: int, *, private: bool) -> tuple[int, int]:
    """(bytes whatever the chunk, bytes per example) at the peak of one step, to size chunks from a memory cap.

    The activations are measured: autograd's saved tensors for one and for two images tell the
    per-image part from what is saved once per forward (WSConv2d's standardised weights). The factors
    (peak over saved activations) come from bench/grad_step.py: non-private ≤ 1.45; the fast path
    keeps per-example gradients and its transients within the layers' input bytes (≤ the saved
    activations), so ≤ 2; vmap holds its per-example gradients twice and about 3× the activations.
    """
    once, twice = _saved_bytes(model, image_shape, 1), _saved_bytes(model, image_shape, 2)
    per_image, fixed = twice - once, 2 * once - twice
    if not private:
        factor, per_example_grads = 1.5, 0
    elif supports_fast(model):
        factor, per_example_grads = 2.0, 0
    else:
        factor, per_example_grads = 3.0, 2 * sum(p.numel() * p.element_size() for p in trainable(model).values())
    return int(factor * max(0, fixed)), int(factor * group_size * per_image) + per_example_grads


def clipped_sum(
    model: nn.Module, images: torch.Tensor, targets: torch.Tensor, *, clip_norm: float, per_example_fn: PerExampleFn | None = None
) -> tuple[Grads, torch.Tensor]:
    """The clipped sum and the losses of one chunk, as the trainer needs them.

    ``per_example_fn=None`` takes :func:`clipped_sum_fast` when the model allows it, else vmap; a given
    ``per_example_fn`` (the microbatch reference, a test's stand-in) is followed by :func:`clip_and_sum`.
    """
    if per_example_fn is None and (layers := _fast_layers(model)) is not None:  # one layer scan per chunk
        summed, _, losses = _clipped_sum_fast(model, layers, images, targets, clip_norm)
        return summed, losses
    per, losses = (per_example_fn or per_example_grads_vmap)(model, images, targets)
    return clip_and_sum(per, clip_norm)[0], losses
