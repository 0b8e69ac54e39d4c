"""The book-keeping accelerator (``bookkeeping.per_example``) held to the microbatch loop and to vmap, in float64.

Every route a layer can take (per-example gradients kept, formed for norms only, ghost norms; one
grouped call when G = 1) is forced in turn, on the project's models and on layer variants they lack.
"""

import numpy as np
import pytest
import torch
from torch import nn

from dpmix_ray import bookkeeping as BK
from dpmix_ray import grads as G
from dpmix_ray import mechanism as M
from dpmix_ray import trainer as T
from dpmix_ray.config import ModelConfig, load_train_config
from dpmix_ray.data import load_splits
from dpmix_ray.mix import SyntheticPool, build_groups
from dpmix_ray.models import WSConv2d, build_model

CLASSES = 5
# route, or route/forming: how a convolution's per-example gradients are formed for keep and norms
ROUTES = ("auto", "keep", "norms", "ghost-pixels", "ghost-unfold", "keep/loop", "norms/loop", "keep/grouped", "keep/patches")


def force(route: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every Linear/Conv2d layer takes ``route`` (a grouped convolution has no ghost route); a ghost
    convolution forms its Gram from the padded input's pixels or by unfolding. A forced forming
    applies to ungrouped convolutions."""
    if route == "auto":
        return
    route, _, forming = route.partition("/")
    if route.startswith("ghost"):
        costs = (0, 1) if route == "ghost-pixels" else (1, 0)
        monkeypatch.setattr(BK, "_gram_costs", lambda *a: costs)
        route = "ghost"

    def record(mod, a, out, b, original=BK._record):
        call = original(mod, a, out, b)
        if call.rows and not (route == "ghost" and getattr(mod, "groups", 1) != 1):
            call.route, call.out = route, out.detach()
        if forming and isinstance(mod, nn.Conv2d) and mod.groups == 1:
            call.forming, call.transient_bytes = forming, (0 if forming == "loop" else a[0].numel() * 8)
        return call

    def plan(calls, b, original=BK._plan):
        forced = [c.route for c in calls]
        original(calls, b)  # sizes the slices; may turn "keep" into "norms"
        for c, r in zip(calls, forced):
            c.route = r

    monkeypatch.setattr(BK, "_record", record)
    monkeypatch.setattr(BK, "_plan", plan)


def groups(b: int, k: int, m: int, n: int, *, channels: int, size: int, seed: int, scale: float = 1.0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.rand(b, channels, size, size, generator=gen, dtype=torch.float64) * scale
    y = torch.randint(0, CLASSES, (b,), generator=gen)
    pool = SyntheticPool.from_tensors(torch.rand(10, channels, size, size, generator=gen, dtype=torch.float64), torch.arange(10) % CLASSES, CLASSES)
    return build_groups(x, y, torch.arange(b), num_classes=CLASSES, k=k, m=m, n=n, alpha=0.4, padding=2, flip=True,
                        seed=seed, synthetic=pool if n else None)


class Odd(nn.Module):
    """Layer variants the project's models lack: conv bias, stride, dilation, groups; a GroupNorm after
    a grouped conv; a Linear over a sequence axis (T = G·S rows per example); a Linear without bias."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 4, 3, stride=2, dilation=2, padding=2)
        self.grouped = nn.Conv2d(4, 4, 3, padding=1, groups=2, bias=False)
        self.norm = nn.GroupNorm(2, 4)
        self.seq = nn.Linear(4, 6, bias=False)
        self.head = nn.Linear(6, CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm(self.grouped(torch.tanh(self.conv(x))))  # [N, 4, 4, 4]
        s = torch.tanh(self.seq(h.flatten(2).transpose(1, 2)))  # [N, 16, 6]: a sequence of 16 rows
        return self.head(s.mean(1))


def model_and_size(name: str) -> tuple[nn.Module, int, int]:
    torch.manual_seed(0)
    if name == "odd":
        return Odd().double(), 2, 8
    channels, size = {"cnn_tiny": (1, 12), "cnn": (1, 8), "wrn16_4": (3, 8)}[name]
    return build_model(ModelConfig(name=name), in_channels=channels, num_classes=CLASSES, image_size=size).double(), channels, size


def flat(grads: M.Grads) -> torch.Tensor:
    return torch.cat([g.flatten() for g in grads.values()])


def clip_and_sum(per: M.Grads, clip: float) -> tuple[M.Grads, torch.Tensor]:
    """The mechanism's clipped sum of materialised per-example gradients, and their norms."""
    source = G.Materialised(per, torch.zeros(len(next(iter(per.values())))))
    return M.clipped_sum(source, clip), source.norms


def fast(model: nn.Module, imgs: torch.Tensor, tgts: torch.Tensor, clip: float) -> tuple[M.Grads, torch.Tensor, torch.Tensor]:
    """The accelerator's clipped sum (factors from the mechanism), norms and losses."""
    pending = BK.per_example(model, imgs, tgts)
    return M.clipped_sum(pending, clip), pending.norms, pending.losses


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize("name,seed", [("cnn_tiny", 0), ("cnn", 1), ("wrn16_4", 2), ("odd", 3), ("cnn_tiny", 4), ("odd", 5)])
def test_fast_clipped_sum_equals_microbatch_loop_and_vmap(name, seed, route, monkeypatch):
    force(route, monkeypatch)
    rng = np.random.default_rng(seed)
    k = int(rng.integers(1, 4))
    m = int(rng.integers(0, 3)) if k >= 2 else 0
    n = int(rng.integers(0, 2))
    model, channels, size = model_and_size(name)
    imgs, tgts = groups(3, k, m, n, channels=channels, size=size, seed=seed, scale=float(rng.uniform(1, 5)))
    per, ref_losses = G.per_example_grads_loop(model, imgs, tgts)
    per_vmap, _ = G.per_example_grads_vmap(model, imgs, tgts)
    ref_norms = clip_and_sum(per, 1.0)[1]
    for clip in (float(ref_norms.median()), 1e9):  # some examples clipped; none clipped
        summed, norms, losses = fast(model, imgs, tgts, clip)
        ref, _ = clip_and_sum(per, clip)
        assert list(summed) == list(ref) == list(G.trainable(model))
        torch.testing.assert_close(norms, ref_norms, rtol=1e-12, atol=0)
        torch.testing.assert_close(flat(summed), flat(ref), rtol=1e-10, atol=1e-13)
        torch.testing.assert_close(flat(summed), flat(clip_and_sum(per_vmap, clip)[0]), rtol=1e-10, atol=1e-13)
        torch.testing.assert_close(losses, ref_losses, rtol=1e-13, atol=0)


@pytest.mark.parametrize("forming", ["grouped", "patches"])
def test_k1_forms_small_convolutions_in_slices_and_agrees(forming, monkeypatch):
    """G = 1 with little work per example: grouped calls, or batched matmuls over patches, over slices of
    the 7 examples whose size the plan sets from the memory budget."""
    monkeypatch.setattr(BK, "_SLICE_FLOOR_BYTES", 0)  # these layers are tiny: only the budget sizes their slices
    sizes = []

    def record(mod, a, out, b, original=BK._record):
        call = original(mod, a, out, b)
        if isinstance(mod, nn.Conv2d):
            call.forming, call.transient_bytes = forming, a[0].numel() * 8
        return call

    def per_example_conv(call, w, gy, b, original=BK._per_example_conv):
        for chunk in original(call, w, gy, b):
            sizes.append(chunk.shape[0])
            yield chunk

    monkeypatch.setattr(BK, "_record", record)
    monkeypatch.setattr(BK, "_per_example_conv", per_example_conv)
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(4, 4, 3, padding=1), nn.Tanh(), nn.Conv2d(4, 4, 3, padding=1, bias=False), nn.Flatten(), nn.Linear(144, CLASSES)
    ).double()
    imgs, tgts = groups(7, 1, 0, 0, channels=4, size=6, seed=9)
    summed, norms, _ = fast(model, imgs, tgts, 0.05)
    ref, ref_norms = clip_and_sum(G.per_example_grads_loop(model, imgs, tgts)[0], 0.05)
    torch.testing.assert_close(flat(summed), flat(ref), rtol=1e-10, atol=1e-13)
    torch.testing.assert_close(norms, ref_norms, rtol=1e-12, atol=0)
    assert any(1 < n < 7 for n in sizes), sizes


def test_forming_follows_the_work_per_example():
    """Small per-example problems and strided 1×1 convolutions are batched as patches, mid-sized ones with
    ≥ 16 input channels as grouped calls (any G), the rest loop (docs/performance.md has the timings)."""
    small, mid, large = nn.Conv2d(16, 32, 4, stride=2), nn.Conv2d(16, 32, 3, padding=1), nn.Conv2d(64, 64, 3, padding=1)
    first, shortcut, pointwise = nn.Conv2d(1, 32, 5, padding=2), nn.Conv2d(64, 128, 1, stride=2), nn.Conv2d(16, 64, 1)
    assert BK._forming(small, torch.Size([64, 16, 13, 13]), torch.Size([64, 32, 5, 5]), 64)[0] == "patches"
    assert BK._forming(mid, torch.Size([64, 16, 28, 28]), torch.Size([64, 32, 28, 28]), 64)[0] == "grouped"
    assert BK._forming(mid, torch.Size([256, 16, 28, 28]), torch.Size([256, 32, 28, 28]), 64)[0] == "grouped"
    assert BK._forming(large, torch.Size([8, 64, 32, 32]), torch.Size([8, 64, 32, 32]), 8)[0] == "grouped"
    assert BK._forming(large, torch.Size([32, 64, 32, 32]), torch.Size([32, 64, 32, 32]), 8)[0] == "loop"
    assert BK._forming(first, torch.Size([256, 1, 28, 28]), torch.Size([256, 32, 28, 28]), 64)[0] == "loop"
    assert BK._forming(shortcut, torch.Size([32, 64, 32, 32]), torch.Size([32, 128, 16, 16]), 8)[0] == "patches"
    assert BK._forming(pointwise, torch.Size([32, 16, 32, 32]), torch.Size([32, 64, 32, 32]), 8)[0] == "loop"


def test_grouped_slices_hold_at_most_128_images(monkeypatch):
    """G > 1: a grouped call's batch is the slice's G images of each example; slices are powers of two."""
    monkeypatch.setattr(BK, "_KEEP_BUDGET", 100.0)  # the slice caps, not the memory budget
    conv = nn.Conv2d(16, 32, 3, padding=1)
    for g, expected in ((1, 32), (4, 32), (16, 8)):
        a = torch.zeros(64 * g, 16, 16, 16)
        call = BK._record_conv(conv, a, conv(a), 64)
        assert call.forming == "grouped"
        BK._plan([call], 64)
        assert call.per_call == expected, (g, call.per_call)


def test_per_example_source_dispatch(monkeypatch):
    model, channels, size = model_and_size("cnn_tiny")
    imgs, tgts = groups(3, 2, 1, 0, channels=channels, size=size, seed=1)
    default = T.per_example_source(model)(imgs, tgts)
    assert isinstance(default, BK.Pending)
    ref = T.per_example_source(model, G.per_example_grads_loop)(imgs, tgts)
    torch.testing.assert_close(flat(M.clipped_sum(default, 0.1)), flat(M.clipped_sum(ref, 0.1)), rtol=1e-10, atol=1e-13)

    # A trainable parameter outside the registered rules (LayerNorm): the dispatcher takes vmap.
    other = nn.Sequential(nn.Conv2d(1, 3, 3), nn.Flatten(), nn.LayerNorm(300), nn.Linear(300, CLASSES)).double()
    assert not BK.supports(other)
    with pytest.raises(ValueError, match="outside the registered layer rules"):
        fast(other, imgs, tgts, 0.1)
    used = []
    monkeypatch.setattr(G, "per_example_grads_vmap", lambda *a: used.append(1) or G.per_example_grads_loop(*a))
    assert isinstance(T.per_example_source(other)(imgs, tgts), G.Materialised)
    assert used


def test_rules_come_from_the_registry_and_cover_exact_types():
    assert set(BK.RULES) == {nn.Linear, nn.Conv2d, WSConv2d, nn.GroupNorm}

    class MyLinear(nn.Linear):
        pass

    assert not BK.supports(nn.Sequential(nn.Flatten(), MyLinear(4, 2)))  # a subclass may change the forward
    assert not BK.supports(nn.Sequential(nn.Conv2d(1, 2, 3, padding="same")))  # the rule's `supports` refuses it
    assert not BK.supports(nn.Sequential(nn.Conv2d(1, 2, 3, padding=1, padding_mode="reflect")))


def test_supported_models_and_frozen_bodies():
    for name in ("cnn_tiny", "cnn", "wrn16_4"):
        assert BK.supports(model_and_size(name)[0])
    model, channels, size = model_and_size("cnn")
    model.features.requires_grad_(False)  # a frozen body: only the Linear layers train
    assert BK.supports(model)
    imgs, tgts = groups(3, 2, 0, 1, channels=channels, size=size, seed=2)
    summed, _, _ = fast(model, imgs, tgts, 0.1)
    ref, _ = clip_and_sum(G.per_example_grads_loop(model, imgs, tgts)[0], 0.1)
    assert list(summed) == list(ref) == ["hidden.0.weight", "hidden.0.bias", "head.weight", "head.bias"]
    torch.testing.assert_close(flat(summed), flat(ref), rtol=1e-10, atol=1e-13)
    model.head.bias.requires_grad_(False)  # half-frozen layer: no rule
    assert not BK.supports(model)


def test_a_layer_run_twice_is_refused():
    class Twice(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(CLASSES, CLASSES)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.lin(self.lin(x.flatten(1)[:, :CLASSES]))

    imgs, tgts = groups(2, 1, 0, 0, channels=1, size=4, seed=0)
    with pytest.raises(RuntimeError, match="ran twice"):
        fast(Twice().double(), imgs, tgts, 1.0)


def test_trainer_default_is_the_fast_path_and_equals_the_loop():
    cfg = load_train_config(None, ["data.name=digits", "optim.batch_size=64", "optim.epochs=0.1", "mix.aug_multiplicity=2",
                                   "mix.self_mix=1", "optim.lr=1.0", "privacy.epsilon=8", "privacy.reproducible=true"])
    splits = load_splits(cfg.data)
    fast = T.train(cfg, splits=splits, progress=False)
    loop = T.train(cfg, splits=splits, progress=False, per_example_fn=G.per_example_grads_loop)
    assert fast["val_accuracy"] == pytest.approx(loop["val_accuracy"], abs=1 / 180)
    assert fast["steps"] == loop["steps"]


def _peak_mb(fn) -> float:
    """Peak of live tensor bytes allocated during ``fn`` (the profiler's allocation events), in MiB."""
    from torch.profiler import profile

    with profile(profile_memory=True) as prof:
        fn()
    live = peak = 0
    for _, nbytes in sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"):
        live += nbytes
        peak = max(peak, live)
    return peak / 2**20


@pytest.mark.parametrize("method", ["dpmix_self", "nonprivate"])
def test_chunk_from_memory_cap_fits_the_cap(method):
    cfg = load_train_config(None, [f"method={method}", "model.name=cnn", "optim.memory_cap_mb=64", "mix.aug_multiplicity=8", "mix.self_mix=4"])
    torch.manual_seed(0)
    model = build_model(cfg.model, in_channels=1, num_classes=10, image_size=28).train()
    chunk = T.examples_per_chunk(cfg, model, (1, 28, 28))
    x = torch.rand(chunk, 12, 1, 28, 28)
    y = torch.nn.functional.one_hot(torch.randint(0, 10, (chunk, 12)), 10).float()
    step = (lambda: fast(model, x, y, 1.0)) if method != "nonprivate" else (lambda: G.summed_grads_nonprivate(model, x, y))
    assert 64 / 4 <= _peak_mb(step) <= 64


def test_memory_probe_leaves_buffers_and_rng_alone():
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.Flatten(), nn.Linear(72, CLASSES)).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    torch.manual_seed(5)
    G.step_memory(model, (1, 8, 8), 3, private=False, fast=False)
    draw = torch.rand(1)
    torch.manual_seed(5)
    assert torch.equal(draw, torch.rand(1))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def bench_report(*args: str) -> dict:
    """Run bench/grad_step.py with ``args``; its last line, the JSON report."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, str(root / "bench" / "grad_step.py"), *args], capture_output=True, text=True, check=True, cwd=root)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_bench_quick_runs_and_reports():
    report = bench_report("--quick")
    assert {(r["model"], r["variant"]) for r in report["rows"]} == {(m, v) for m in ("cnn_tiny", "wrn16_4") for v in ("nonprivate", "vmap", "fast")}
    assert all(r["seconds"] > 0 and r["peak_mb"] > 0 for r in report["rows"])
    assert report["worst_fast_ratio"] > 0 and report["worst_fast_mem_ratio"] > 0


def test_bench_in_fresh_processes_reports_medians_and_ranges():
    report = bench_report("--quick", "--models", "cnn_tiny", "--ks", "1", "--processes", "2")
    assert report["processes"] == 2 and [r["variant"] for r in report["rows"]] == ["nonprivate", "vmap", "fast"]
    for r in report["rows"]:
        low, high = r["ratio_range"]
        assert 0 < low <= r["ratio"] <= high
    assert report["worst_fast_ratio"] == report["rows"][-1]["ratio"]


def test_fast_path_peak_memory_stays_near_the_nonprivate_step():
    """Profiled peak of live tensor bytes (deterministic, unlike time): the fast path on WRN-16-4 stays
    within 1.35× the non-private step. Holding a tensor read from the forward's autograd nodes together
    with its graph kept every layer's w − mean alive and took this to 1.5×."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
    from grad_step import make_step, peak_mb

    torch.manual_seed(0)
    model = build_model(ModelConfig(name="wrn16_4"), in_channels=3, num_classes=CLASSES, image_size=16)
    x = torch.rand(4, 1, 3, 16, 16)
    y = torch.nn.functional.one_hot(torch.randint(0, CLASSES, (4, 1)), CLASSES).float()
    peaks = {}
    for variant in ("nonprivate", "fast"):
        step = make_step(variant, model, x, y)
        step()
        peaks[variant] = peak_mb(step)
    assert peaks["fast"] <= 1.35 * peaks["nonprivate"], peaks


def test_group_norm_statistics_come_from_the_forward_or_are_recomputed():
    norm = nn.GroupNorm(4, 8).double()
    a = torch.randn(3, 8, 5, 5, dtype=torch.float64)
    out = norm(a)
    saved = BK._group_norm_stats(norm, a, out)
    recomputed = BK._group_norm_stats(norm, a, out * 1.0)  # another node: no saved statistics to read
    flat = a.reshape(3, 4, -1)
    for stats in (saved, recomputed):
        assert not stats[0].requires_grad
        torch.testing.assert_close(stats[0], flat.mean(-1), rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(stats[1], (flat.var(-1, unbiased=False) + norm.eps).rsqrt(), rtol=1e-12, atol=0)
