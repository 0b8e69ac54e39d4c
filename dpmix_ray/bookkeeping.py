"""The book-keeping accelerator: per-example gradient norms and Σ_i c_i·g_i without the model's
per-example gradients. It decides nothing about privacy: the mechanism (``mechanism.py``) computes
the clip factors c_i from the norms returned here, and tests hold both outputs to the microbatch
loop in float64 (tests/test_grads_fast.py). Measurements: docs/performance.md.

One forward and one backward that forms input gradients only (no parameter is an autograd input, so
no weight gradient is computed). A hook on each trainable layer's output receives ∂L/∂y for the whole
chunk and, with the input a the layer saw, reduces it to per-example squared norms, folding each
example's G images and their spatial positions into one "sequence" of T rows. A layer (T rows, d
inputs, p outputs per row) takes one of three routes:
- "ghost" when its multiplies (the Gram of the rows, see _conv_gram, and T²·p) are below 0.4 of the
  T·d·p that materialising takes: ‖Σ_t g_t a_tᵀ‖² = Σ_{t,t'} (a_t·a_t')(g_t·g_t') without forming the
  gradient; its share of the weighted sum is then one ordinary weight-gradient call on c-weighted
  output gradients;
- "keep": per-example gradients are formed and kept; its share is one weighted sum over examples;
- "norms": formed for their norms only and dropped, the share computed as for "ghost". Layers keep
  while their per-example gradients fit in a budget equal to the bytes of all the layers' inputs
  (tensors autograd saves anyway), most rows first (the most work saved per byte kept).
No route runs a second backward through the network (Opacus's ghost clipping backpropagates
Σ_i c_i·ℓ_i a second time), so a chunk costs one forward, one backward and the norms. Each layer
type has a rule (:func:`layer_rule`): how it records its forward and how it turns ∂L/∂y into squared
norms and a weighted sum.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator, Literal

import torch
import torch.nn.functional as F
from torch import nn

from dpmix_ray.grads import group_loss, trainable
from dpmix_ray.mechanism import Grads
from dpmix_ray.models import WSConv2d

Route = Literal["keep", "norms", "ghost"]
Forming = Literal["patches", "grouped", "loop"]
_Finish = Callable[[torch.Tensor], Grads]
_aten = torch.ops.aten
# Per-example multiplies (G·T·d·p) of a convolution's weight gradient below which batched matmuls over
# strided patches are the fastest forming, and up to which a batched forming (grouped calls; patches for a
# strided 1×1 convolution) beats a loop of oneDNN calls (CPU, measured per layer of the three scratch
# models at K ∈ {1, 4, 16}: docs/performance.md).
_PATCHES_MAX_WORK = 1_000_000
_BATCHED_MAX_WORK = 40_000_000
# Images per grouped call (examples × G) and examples per call: oneDNN's grouped weight gradient slows
# past 32 groups and at group counts not a power of two.
_GROUPED_MAX_IMAGES, _GROUPED_MAX_EXAMPLES = 128, 32


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
            raise RuntimeError("bookkeeping: WSConv2d's forward no longer computes conv2d(x, (w − mean)·r)")
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


_Rule = Callable[[_Call, torch.Tensor, int], tuple[torch.Tensor, _Finish]]
_Recorder = Callable[[nn.Module, torch.Tensor, torch.Tensor, int], _Call]


@dataclass(frozen=True)
class LayerRule:
    """One layer type's rule: ``record`` runs at its forward (route by cost, what to reuse from the
    forward), ``grads`` at its backward (per-example squared norms [b] and the closure that forms its
    share of Σ_i c_i·g_i), ``supports`` says which configurations of the type the rule covers."""

    record: _Recorder
    grads: _Rule
    supports: Callable[[nn.Module], bool]


RULES: dict[type[nn.Module], LayerRule] = {}


def layer_rule(*types: type[nn.Module], record: _Recorder, supports: Callable[[nn.Module], bool] = lambda _: True) -> Callable[[_Rule], _Rule]:
    """Register the decorated ``grads`` function for exactly these layer types (no subclasses)."""

    def register(rule: _Rule) -> _Rule:
        for t in types:
            RULES[t] = LayerRule(record, rule, supports)
        return rule

    return register


def _kept_bytes(mod: nn.Module, a: torch.Tensor, b: int) -> int:
    """Bytes of the layer's per-example gradients, were they kept."""
    return b * sum(p.numel() for p in mod.parameters(recurse=False)) * a.element_size()


def _record_linear(mod: nn.Module, a: torch.Tensor, out: torch.Tensor, b: int) -> _Call:
    assert isinstance(mod, nn.Linear)
    t, d, p = a.numel() // (b * mod.in_features), mod.in_features, mod.out_features
    return _Call(mod, a, None, t, _kept_bytes(mod, a, b), "ghost" if _ghost_pays(t * t * (d + p), t * d * p) else "keep")


@layer_rule(nn.Linear, record=_record_linear)
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
    batched: as matmuls over a strided copy of the padded input's patches (small problems, and strided
    1×1 convolutions), or as one grouped convolution with examples as groups and their G images as its
    batch (≥ 16 input channels: with fewer, oneDNN's grouped kernel is slow); large ones, and 1×1
    convolutions of stride 1 (a plain matrix product for oneDNN), take one call per example."""
    g, elt = a_shape[0] // b, mod.weight.element_size()
    d, p, t = mod.weight[0].numel(), mod.out_channels, out_shape[2] * out_shape[3]
    work, pointwise = g * t * d * p, mod.kernel_size == (1, 1)
    if mod.groups != 1:
        return "loop", 0
    if work < _PATCHES_MAX_WORK or (pointwise and mod.stride != (1, 1) and work < _BATCHED_MAX_WORK):
        return "patches", (g * t * (d + p) + d * p) * elt
    if not pointwise and a_shape[1] >= 16 and work < _BATCHED_MAX_WORK:
        # oneDNN reorders its output (about three gradients' size); G > 1 copies the slice's images
        return "grouped", (3 * d * p + (g * (a_shape[1:].numel() + out_shape[1:].numel()) if g > 1 else 0)) * elt
    return "loop", 0


def _unfolded(mod: nn.Conv2d, xp: torch.Tensor, g: int, out: torch.Tensor) -> torch.Tensor:
    """Each example's patches of the zero-padded input ``xp`` ([n·G, c, Hp, Wp], contiguous), copied into
    ``out`` ([n, c, kh, kw, G, Ho, Wo]) through one strided view and returned as [n, d, G·T]."""
    n, c, (kh, kw), (ho, wo) = out.shape[0], xp.shape[1], mod.kernel_size, out.shape[-2:]
    (sh, sw), (dh, dw) = mod.stride, mod.dilation
    s0, s1, s2, s3 = xp.stride()
    view = xp.as_strided((n, c, kh, kw, g, ho, wo), (g * s0, s1, s2 * dh, s3 * dw, s0, s2 * sh, s3 * sw))
    return out.copy_(view).view(n, c * kh * kw, g * ho * wo)


def _padded(mod: nn.Conv2d, a: torch.Tensor) -> torch.Tensor:
    ph, pw = mod.padding
    return (F.pad(a, (pw, pw, ph, ph)) if ph or pw else a).contiguous()


def _patch_grads(mod: nn.Conv2d, a: torch.Tensor, gy: torch.Tensor, b: int, k: int) -> Iterator[torch.Tensor]:
    """Per-example weight gradients, k examples per batched matmul: ∂L/∂y as [k, p, G·T] times the
    padded input's patches as [k, G·T, d], copied once per slice into one reused buffer."""
    g, xp, gy = a.shape[0] // b, _padded(mod, a), gy.contiguous()
    p, ho, wo = gy.shape[1:]
    buffer = xp.new_empty(min(k, b), xp.shape[1], *mod.kernel_size, g, ho, wo)
    for i in range(0, b, k):
        n = min(k, b - i)
        patches = _unfolded(mod, xp[i * g : (i + n) * g], g, buffer[:n])
        rows = gy[i * g : (i + n) * g].view(n, g, p, ho * wo).transpose(1, 2).reshape(n, p, g * ho * wo)
        yield torch.bmm(rows, patches.transpose(1, 2)).view(n, *mod.weight.shape)


def _images_as_batch(t: torch.Tensor, n: int, g: int) -> torch.Tensor:
    """[n·G, c, h, w] → [G, n·c, h, w]: n examples as channel groups, their G images as the batch
    (a view when G = 1), so that a grouped weight gradient sums each example's images."""
    return t.view(n, g, *t.shape[1:]).transpose(0, 1).reshape(g, n * t.shape[1], *t.shape[2:])


def _per_example_conv(call: _Call, w: torch.Tensor, gy: torch.Tensor, b: int) -> Iterator[torch.Tensor]:
    """Per-example weight gradients of a convolution whose chunk holds b examples of G images each,
    yielded in consecutive chunks of examples ([k, *w.shape]) so that a caller after norms holds one.

    Grouped: examples as groups, inputs as views, k examples per call; a weight gradient does not
    depend on the weight, so a broadcast zero stands in for k copies of it."""
    mod, a, k = call.module, call.a, call.per_call
    if call.forming == "patches":
        yield from _patch_grads(mod, a, gy, b, k)
    elif call.forming == "grouped":
        g = a.shape[0] // b
        shapes_only = torch.zeros((), dtype=w.dtype, device=w.device).expand(k * w.shape[0], *w.shape[1:])
        for i in range(0, b, k):
            n = min(k, b - i)
            gy_i, a_i = (_images_as_batch(t[i * g : (i + n) * g], n, g) for t in (gy, a))
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
    xp = _padded(mod, a)
    if via_unfold <= via_pixels:
        cols = _unfolded(mod, xp, g, xp.new_empty(b, xp.shape[1], *mod.kernel_size, g, *out_hw))  # [b, d, T]
        return torch.bmm(cols.transpose(1, 2), cols), cols.sum(1)
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


def _record_conv(mod: nn.Module, a: torch.Tensor, out: torch.Tensor, b: int) -> _Call:
    """Route and forming by cost; a WSConv2d's w' and r read from its forward."""
    assert isinstance(mod, nn.Conv2d)
    t, d, p = out.shape[0] // b * out.shape[2] * out.shape[3], mod.weight[0].numel(), mod.out_channels
    forming, transient = _forming(mod, a.shape, out.shape, b)
    ws = _Standardisation(out) if isinstance(mod, WSConv2d) else None
    # The Gram of a grouped convolution's input is per group: no ghost route for it here.
    ghost = mod.groups == 1 and _ghost_pays(min(_gram_costs(mod, a.shape, b, t)) + t * t * p, t * d * p)  # see _conv_gram
    kept = _kept_bytes(mod, a, b)
    return _Call(mod, a, out.detach() if ghost and ws is not None else None, t, kept, "ghost" if ghost else "keep", forming, transient, ws=ws)


def _zero_padded(mod: nn.Module) -> bool:
    """Numeric zero padding only: the patch and Gram arithmetic assumes it."""
    return isinstance(mod, nn.Conv2d) and mod.padding_mode == "zeros" and not isinstance(mod.padding, str)


@layer_rule(nn.Conv2d, WSConv2d, record=_record_conv, supports=_zero_padded)
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


def _group_norm_stats(mod: nn.GroupNorm, a: torch.Tensor, out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The mean and rstd ([N, groups]) the forward normalised with: saved by its NativeGroupNormBackward0
    node (detached: not its graph), or recomputed where torch's GroupNorm took another kernel."""
    node = out.grad_fn
    if type(node).__name__ == "NativeGroupNormBackward0":
        return node._saved_result1.detach(), node._saved_result2.detach()
    _, mean, rstd = _aten.native_group_norm(a, None, None, a.shape[0], a.shape[1], a[0, 0].numel(), mod.num_groups, mod.eps)
    return mean, rstd


def _record_group_norm(mod: nn.Module, a: torch.Tensor, out: torch.Tensor, b: int) -> _Call:
    """C-sized per-example gradients: always kept; the forward's statistics reused."""
    assert isinstance(mod, nn.GroupNorm)
    return _Call(mod, a, None, 0, 0, "keep", stats=_group_norm_stats(mod, a, out))


@layer_rule(nn.GroupNorm, record=_record_group_norm)
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




def _record(mod: nn.Module, a: torch.Tensor, out: torch.Tensor, b: int) -> _Call:
    """The layer's forward as its rule records it (the planner may later turn "keep" into "norms")."""
    return RULES[type(mod)].record(mod, a, out, b)


def _ghost_pays(ghost_cost: int, materialise_cost: int) -> bool:
    """Against materialising the T×d by T×p product: measured on CPU, the routes break even near 0.35
    (a Gram multiply is slower, and the ghost route adds the weighted weight-gradient call); near it
    the ghost route is taken for the memory it saves."""
    return ghost_cost < 0.4 * materialise_cost


# The share of the layers' input bytes that kept per-example gradients and forming slices may take. At 1.0 the
# strided cnn kept 4.7 MB of conv2 gradients beside a 9.4 MB non-private peak (1.59×); at 0.5 its worst is
# 1.28× and WRN-16-4, cnn_tiny are unchanged within the timing spread (bench/grad_step.py).
_KEEP_BUDGET = 0.5
# A forming slice may always take this many bytes: below ~16 examples a slice's fixed cost shows (cnn_tiny's
# 8×8 conv at K = 1, ms: 1.19 with 3 examples a slice, 0.84 with 16).
_SLICE_FLOOR_BYTES = 1 << 20


def _plan(calls: list[_Call], b: int) -> None:
    """Keep per-example gradients, most rows first, while they fit in a budget: half the bytes of the layers'
    inputs (tensors autograd saves anyway; :data:`_KEEP_BUDGET`). What is left of it (at least
    :data:`_SLICE_FLOOR_BYTES`) caps the transient of a slice of per-example convolution gradients being formed."""
    budget = int(_KEEP_BUDGET * sum({c.a.data_ptr(): c.a.numel() * c.a.element_size() for c in calls}.values()))
    for call in sorted((c for c in calls if c.route == "keep"), key=lambda c: -c.rows):
        if call.kept_bytes > budget:
            call.route = "norms"
        else:
            budget -= call.kept_bytes
    for call in calls:
        if call.transient_bytes:
            k = max(1, min(b, max(budget, _SLICE_FLOOR_BYTES) // call.transient_bytes))
            if call.forming == "grouped":  # a power of two (cnn's 32→64 conv at 14×14, ms: 3.6 with 32 groups, 7.1 with 61)
                g = call.a.shape[0] // b
                k = min(k, _GROUPED_MAX_EXAMPLES, max(1, _GROUPED_MAX_IMAGES // g))
                k = 1 << (k.bit_length() - 1)
            call.per_call = k


def fast_layers(model: nn.Module) -> dict[nn.Module, str] | None:
    """Each trainable layer with its name prefix, or None when a trainable parameter sits where no rule
    applies (another layer type or configuration, a partly frozen layer, a shared parameter)."""
    layers: dict[nn.Module, str] = {}
    for prefix, mod in model.named_modules():
        own = list(mod.parameters(recurse=False))
        if not any(p.requires_grad for p in own):
            continue
        rule = RULES.get(type(mod))
        if rule is None or not rule.supports(mod) or not all(p.requires_grad for p in own):
            return None
        layers[mod] = prefix
    if sum(len(list(m.parameters(recurse=False))) for m in layers) != len(trainable(model)):
        return None
    return layers


def supports(model: nn.Module) -> bool:
    """Whether a registered rule covers every trainable parameter of ``model``."""
    return fast_layers(model) is not None


@dataclass
class Pending:
    """One chunk after its backward: per-example ``norms`` and ``losses``, and each layer's closure
    for its share of Σ_i c_i·g_i (a :class:`mechanism.PerExample`)."""

    norms: torch.Tensor
    losses: torch.Tensor
    names: list[str]  # the model's trainable parameters, in order
    finishes: list[tuple[str, _Finish]]  # (layer's name prefix, closure)

    def weighted_sum(self, factors: torch.Tensor) -> Grads:
        summed: Grads = {}
        for prefix, finish in self.finishes:
            summed.update({f"{prefix}.{k}" if prefix else k: g for k, g in finish(factors).items()})
        return {k: summed[k] for k in self.names}


def per_example(model: nn.Module, images: torch.Tensor, targets: torch.Tensor, layers: dict[nn.Module, str] | None = None) -> Pending:
    """Per-example norms of ∇θ ℓ_i over the group-mean losses ℓ_i, and what forms Σ_i c_i·∇θ ℓ_i.

    ``layers``: :func:`fast_layers` of the model, when the caller has it. Each trainable layer must run
    once per forward, downstream of the first one to run (true of the project's models).
    """
    layers = layers if layers is not None else fast_layers(model)
    if layers is None:
        raise ValueError("bookkeeping: the model has trainable parameters outside the registered layer rules")
    b = images.shape[0]
    calls: dict[nn.Module, _Call] = {}
    pieces: dict[nn.Module, tuple[torch.Tensor, _Finish]] = {}
    first: list[torch.Tensor] = []

    def on_forward(mod: nn.Module, inputs: tuple[torch.Tensor, ...], out: torch.Tensor) -> None:
        if mod in calls:
            raise RuntimeError(f"bookkeeping: layer '{layers[mod]}' ran twice in one forward")
        calls[mod] = _record(mod, inputs[0].detach(), out, b)

        def on_grad(gy: torch.Tensor) -> None:
            call = calls.pop(mod)  # drops the held input as soon as the layer is done
            with torch.no_grad():
                pieces[mod] = RULES[type(mod)].grads(call, gy, b)

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
        raise RuntimeError("bookkeeping: some trainable layer did not run in the forward")
    _plan(list(calls.values()), b)
    # Differentiating w.r.t. the first layer's output runs every hook and forms no weight gradient.
    torch.autograd.grad(losses.sum(), first)
    if calls:
        raise RuntimeError(f"bookkeeping: layers {[layers[m] for m in calls]} are not downstream of the first trainable layer")
    norms = torch.stack([sq for sq, _ in pieces.values()]).sum(0).sqrt()
    return Pending(norms, losses.detach(), list(trainable(model)), [(layers[m], finish) for m, (_, finish) in pieces.items()])
