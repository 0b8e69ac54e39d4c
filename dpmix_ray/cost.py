"""What a run costs, before paying for it: the resolved recipe, the per-example gradient work, and a
wall-time estimate from a short measured throughput probe.

The probe trains the real model on the real device through the trainer itself (:func:`trainer.fit`,
so the same per-example gradient code, mechanism and update) for a few steps, on RANDOM images of the
data's shape with random labels: it is handed shapes, never the private examples. It runs at the
config's batch size and group size with the sampling rate 1 (every step takes the whole random set,
one evaluation of an empty validation set after each step), under ``privacy.reproducible`` (nothing
of it is private or released). Its first step warms up (oneDNN primitives, the allocator) and is not
timed. A diffusion-mixup costs what a self-mixup costs (one more image of the group through the
model), so the probe forms n more self-mixups instead of reading a synthetic set.

The estimate, for a run of T steps at rate q on N examples with groups of G = K + m + n images:

    setup + T·q·N·G / (training images/s) + (evaluated images) / (evaluation images/s)

where the trainer evaluates the validation split after every epoch (⌈T / round(1/q)⌉ times) and
the validation and test splits once at the end (twice with an EMA: the average and the live model).
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from typing import Any

import torch

from dpmix_ray import methods
from dpmix_ray.config import TrainConfig, with_updates
from dpmix_ray.privacy import Plan

PROBE_SECONDS = 12.0  # timed steps stop once this much has passed (the whole probe stays under ~20 s)
PROBE_MAX_STEPS = 40


@dataclass(frozen=True)
class DataShape:
    """What the probe and the estimate may know of a dataset: sizes and shapes, never its images."""

    n_train: int
    n_val: int
    n_test: int
    image_shape: tuple[int, int, int]
    num_classes: int
    hflip_safe: bool
    load_seconds: float = 0.0


@dataclass(frozen=True)
class Throughput:
    """A probe's measurement: images through the training step and through evaluation, per second."""

    train_images_per_second: float
    eval_images_per_second: float
    timed_steps: int
    probe_seconds: float
    device: str
    threads: int

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


class _Enough(Exception):
    """Raised from the probe's epoch callback to end its run once enough steps are timed."""


def expected_images(plan: Plan, n_train: int, group_size: int) -> float:
    """Per-example gradient evaluations of a run, in images: T·q·N·G (the expected count; the realised
    one depends on the secret Poisson masks)."""
    return plan.steps * plan.sample_rate * n_train * group_size


def evaluated_images(plan: Plan, *, n_val: int, n_test: int, ema: bool) -> int:
    """Images the trainer evaluates: the validation split after every epoch and at the end, the test split
    at the end, both once more for the live model when an EMA is released."""
    reports = math.ceil(plan.steps / max(1, round(1 / plan.sample_rate)))
    return reports * n_val + (n_val + n_test) * (2 if ema else 1)


def estimate_seconds(*, train_images: float, eval_images: float, throughput: Throughput, setup_seconds: float = 0.0) -> float:
    """Wall seconds of a run from its image counts and a measured throughput (module docstring)."""
    return setup_seconds + train_images / throughput.train_images_per_second + eval_images / throughput.eval_images_per_second


def probe_config(cfg: TrainConfig, steps: int) -> TrainConfig:
    """The config the probe trains: ``cfg`` (resolved: batch size and lr set) for ``steps`` steps at
    rate 1, reproducible randomness, a δ valid for a batch-sized set, diffusion-mixups as self-mixups."""
    b = cfg.optim.batch_size
    updates: dict[str, Any] = {"optim.epochs": float(steps), "privacy.noise_multiplier": None, "privacy.reproducible": True,
                               "privacy.delta": min(cfg.privacy.delta, 0.5 / b)}
    k, m, n = cfg.mix.aug_multiplicity, cfg.mix.self_mix, cfg.mix.diff_mix
    if n > 0:
        method = "dpmix_self" if k >= 2 else "augmult"
        k, m = (k, m + n) if k >= 2 else (k + n, 0)
        updates |= {"method": method, "mix.aug_multiplicity": k, "mix.self_mix": m, "mix.diff_mix": 0, "mix.synthetic": None}
    elif not methods.get(cfg.method).private:
        updates.pop("privacy.delta")
    return with_updates(cfg, updates)


def random_splits(shape: DataShape, n: int, device: torch.device, seed: int = 0) -> Any:
    """``n`` random training images of the data's shape with random labels (and empty val/test): the probe's data."""
    from dpmix_ray.data import ImageSet, Splits

    gen = torch.Generator(device="cpu").manual_seed(seed)
    x = torch.rand(n, *shape.image_shape, generator=gen).to(device)
    y = torch.randint(0, shape.num_classes, (n,), generator=gen).to(device)
    key = torch.arange(n, dtype=torch.int64, device=device)  # random images: any distinct keys will do
    empty = ImageSet(x[:0], y[:0], key[:0])
    return Splits(ImageSet(x, y, key), empty, empty, shape.num_classes, [str(i) for i in range(shape.num_classes)], shape.hflip_safe)


def probe(cfg: TrainConfig, shape: DataShape, *, seconds: float = PROBE_SECONDS, max_steps: int = PROBE_MAX_STEPS) -> Throughput:
    """Measure ``cfg``'s training and evaluation throughput on random inputs of ``shape`` (module docstring).

    ``cfg`` must be resolved (``recipe.resolve``). Trains through :func:`dpmix_ray.trainer.fit`; writes nothing."""
    from dpmix_ray.models import build_model
    from dpmix_ray.trainer import evaluate, fit, resolve_device

    started = time.perf_counter()
    run = probe_config(cfg, max_steps)
    device = resolve_device(cfg.device)
    splits = random_splits(shape, cfg.optim.batch_size, device, cfg.seed)
    marks: list[tuple[int, float]] = []

    def on_step(rep: Any) -> None:
        marks.append((rep.step, time.perf_counter()))
        # one timed step at least (after the untimed first); then stop before the next would pass the allowance
        if len(marks) >= 2 and 2 * marks[-1][1] - marks[0][1] - marks[-2][1] > seconds:
            raise _Enough

    try:
        fit(run, on_epoch=on_step, progress=False, splits=splits)
    except _Enough:
        pass
    (first, t0), (last, t1) = marks[0], marks[-1]
    per_step = cfg.optim.batch_size * cfg.mix.group_size
    train_ips = per_step * (last - first) / (t1 - t0)
    model = build_model(cfg.model, in_channels=shape.image_shape[0], num_classes=shape.num_classes, image_size=shape.image_shape[1]).to(device)
    images = splits.train if len(splits.train) >= 256 else random_splits(shape, 256, device, cfg.seed).train
    evaluate(model, images)
    t = time.perf_counter()
    evaluate(model, images)
    eval_ips = len(images) / max(1e-9, time.perf_counter() - t)
    return Throughput(train_ips, eval_ips, last - first, time.perf_counter() - started, str(device), torch.get_num_threads())


def data_shape(data: Any) -> DataShape:
    """Sizes and shapes of ``data``'s splits (a :class:`~dpmix_ray.config.DataConfig`), and how long loading them took."""
    from dpmix_ray.data import load_splits

    t = time.perf_counter()
    s = load_splits(data)
    return DataShape(len(s.train), len(s.val), len(s.test), tuple(s.train.x.shape[1:]), s.num_classes, s.hflip_safe,
                     time.perf_counter() - t)


def recipe_summary(cfg: TrainConfig, plan: Plan, shape: DataShape) -> dict[str, Any]:
    """Every setting a run of resolved ``cfg`` under ``plan`` executes, with its per-example gradient work."""
    private = cfg.is_private
    return {
        "method": cfg.method, "model": cfg.model.name, "n_train": shape.n_train, "batch_size": cfg.optim.batch_size,
        "sample_rate": plan.sample_rate, "epochs": plan.epochs, "steps": plan.steps, "noise_multiplier": plan.noise_multiplier,
        "lr": cfg.optim.lr, "momentum": cfg.optim.momentum, "clip_norm": cfg.privacy.clip_norm if private else None,
        "aug_multiplicity": cfg.mix.aug_multiplicity, "self_mix": cfg.mix.self_mix, "diff_mix": cfg.mix.diff_mix,
        "group_size": cfg.mix.group_size, "ema": cfg.optim.ema, "lr_schedule": cfg.optim.lr_schedule, "warmup": cfg.optim.warmup,
        "epsilon_target": cfg.privacy.epsilon if private else None,
        "epsilon_spent": plan.epsilon_spent if private else None, "delta": cfg.privacy.delta if private else None,
        "accountant": plan.accountant if private else None,
        "neighbouring": plan.neighbouring if private else None,
        "images": expected_images(plan, shape.n_train, cfg.mix.group_size),
        "eval_images": evaluated_images(plan, n_val=shape.n_val, n_test=shape.n_test, ema=cfg.optim.ema is not None),
    }


def estimate_run(cfg: TrainConfig, shape: DataShape, *, seconds: float = PROBE_SECONDS) -> dict[str, Any]:
    """``dpmix-ray plan CONFIG``: the resolved recipe, its work, a probe's throughput and the estimated wall seconds.

    Raises ConfigError / BudgetError as ``train`` would, before anything runs. Trains only the probe; writes nothing."""
    from dpmix_ray.config import check_against_dataset
    from dpmix_ray.privacy import plan_run
    from dpmix_ray.recipe import resolve

    cfg = resolve(cfg, shape.n_train)
    check_against_dataset(cfg, shape.n_train)
    plan = plan_run(cfg, shape.n_train)
    summary = recipe_summary(cfg, plan, shape)
    measured = probe(cfg, shape, seconds=seconds)
    estimate = estimate_seconds(train_images=summary["images"], eval_images=summary["eval_images"], throughput=measured,
                                setup_seconds=shape.load_seconds)
    return summary | {"estimated_seconds": estimate, "data_load_seconds": shape.load_seconds, "probe": measured.as_dict()}


def duration(seconds: float) -> str:
    """``3 h 05 min``, ``12 min 40 s``, ``38 s``."""
    s = round(seconds)
    if s >= 3600:
        return f"{s // 3600} h {s % 3600 // 60:02d} min"
    return f"{s // 60} min {s % 60:02d} s" if s >= 60 else f"{s} s"


def describe_run(e: dict[str, Any]) -> list[str]:
    """The human form of :func:`estimate_run`'s record."""
    eps = (f"ε = {e['epsilon_spent']:.3f} ≤ {e['epsilon_target']:g}, δ = {e['delta']:g} ({e['accountant']}, {e['neighbouring']})"
           if e["epsilon_target"] is not None else "NOT PRIVATE (no ε)")
    p = e["probe"]
    return [
        f"{e['method']} on {e['model']}: N = {e['n_train']:,}, B = {e['batch_size']:,} (q = {e['sample_rate']:.4g}), "
        f"{e['epochs']:.1f} epochs = T = {e['steps']:,} steps",
        f"σ = {e['noise_multiplier']:.4g}, lr = {e['lr']:.4g}, momentum = {e['momentum']:g}, C = {e['clip_norm']}, "
        f"K = {e['aug_multiplicity']}, m = {e['self_mix']}, n = {e['diff_mix']}, EMA = {e['ema']}, "
        f"schedule = {e['lr_schedule']} (warm-up {e['warmup']:g})",
        eps,
        f"work: T·q·N·(K+m+n) = {e['images']:,.0f} images through per-example gradients, {e['eval_images']:,} evaluated",
        f"estimated wall time: {duration(e['estimated_seconds'])} (probe: {p['train_images_per_second']:,.0f} training and "
        f"{p['eval_images_per_second']:,.0f} evaluation images/s over {p['timed_steps']} random-input steps on {p['device']}, "
        f"{p['threads']} thread(s), {p['probe_seconds']:.1f} s)",
    ]
