"""The one trainer core: every method, every CLI run, Tune trial, benchmark and test calls ``fit``/``train``.

nonprivate / dpsgd / augmult / dpmix_self / dpmix_diff are one loop with different group counts:
private methods Poisson-sample each logical batch, form per-example gradients of the group-mean
loss in physical chunks, and hand them to the mechanism (``mechanism.LogicalStep``: clip each once,
sum, add N(0, σ²C²) once, divide by q·N). The privacy plan (σ or step count) is fixed and checked
before the first step, and a run over budget never starts. The data live on the training device
from the start (as uint8 codes where the pixels allow, converted per chunk): a step copies nothing
from the host. The one exception is chosen in the config: with ``data.storage=mmap`` the images stay
in their memory-mapped store and each chunk's rows are read there and copied to the device.
"""

from __future__ import annotations

import copy
import functools
import math
import time
from dataclasses import dataclass
from collections.abc import Mapping
from typing import Any, Callable, Protocol

import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel
from tqdm.auto import tqdm

from dpmix_ray import bookkeeping as BK
from dpmix_ray import grads as G
from dpmix_ray import mechanism as M
from dpmix_ray import methods
from dpmix_ray.config import TrainConfig, check_against_dataset
from dpmix_ray.data import Images, Splits, load_splits
from dpmix_ray.errors import DivergedError
from dpmix_ray.mix import SyntheticPool, assemble, draw
from dpmix_ray.models import assert_dp_compatible, build_model
from dpmix_ray.privacy import Plan, check_plan, epsilon_spent, plan_run, private_run, run_guarantee
from dpmix_ray.recipe import ema_multi_avg_fn, lr_factor, resolve


@dataclass
class EpochReport:
    """What a caller (CLI progress, Tune trial) sees after each epoch; ``state()`` is a resumable checkpoint."""

    epoch: int
    step: int
    metrics: dict[str, float]
    state: Callable[[], dict[str, Any]]


@dataclass(frozen=True)
class Fitted:
    """A finished run: its result record and the trained model (eval mode; the audit scores canaries with it)."""

    result: dict[str, Any]
    model: nn.Module


class StepExtra(Protocol):
    """Extra examples joined to every logical step (the white-box audit's canary slots), and a view of the releases.

    ``examples`` slots count in N whatever they hold (so q does not reveal them); :meth:`sample` Poisson-samples
    them at rate q from its own randomness and returns their per-example gradients (enters the same clip, sum and
    noise as every other example), or None; :meth:`released` sees each step's update, as any observer could.
    """

    examples: int

    def sample(self, params: Mapping[str, torch.Tensor], sample_rate: float) -> M.PerExample | None: ...

    def released(self, update: M.Grads) -> None: ...


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def examples_per_chunk(cfg: TrainConfig, model: nn.Module, image_shape: tuple[int, ...]) -> int:
    """Examples per physical chunk. ``physical_batch_size`` counts augmented images (a group is one example).

    When it is null, size the chunk from ``memory_cap_mb`` with the step's memory model
    (``grads.step_memory``: activations measured by a forward of one and of two images, scaled by
    what the private or non-private step adds to them).
    """
    g = cfg.mix.group_size
    if cfg.optim.physical_batch_size is not None:
        return max(1, cfg.optim.physical_batch_size // g)
    fixed, per_example = G.step_memory(model, image_shape, g, private=cfg.is_private, fast=BK.supports(model))
    return max(1, int((cfg.optim.memory_cap_mb * 2**20 - fixed) // per_example))


def augmentation(cfg: TrainConfig, splits: Splits) -> tuple[bool, int]:
    """(flip, crop padding) of the self-augmentations; none for a method that does not augment
    (``dpsgd``: see :mod:`dpmix_ray.methods`). Defaults: flips where the dataset allows
    them; padding 4 px per 32 px for natural images, 1 px for digits, where shifts beyond a pixel
    change how a centred digit looks (measured on MNIST-5k at ε=2, dpmix_self val: 91.4 / 90.2 / 85.9%
    at 1 / 2 / 3 px).
    """
    if not methods.get(cfg.method).augments:  # [search: methods registry]
        return False, 0
    flip = cfg.mix.flip if cfg.mix.flip is not None else splits.hflip_safe
    if cfg.mix.crop_padding is not None:
        return flip, cfg.mix.crop_padding
    return flip, max(1, splits.image_size // 8) if splits.hflip_safe else 1


@torch.no_grad()
def evaluate(model: nn.Module, data: Images, batch: int = 1024) -> float:
    """Accuracy on ``data``, whose labels live on the model's device (one host sync at the end; a
    stored set's images are read from its store batch by batch)."""
    model.eval()
    correct = torch.zeros((), dtype=torch.long, device=data.y.device)
    for i in range(0, len(data), batch):
        correct += (model(data.images(slice(i, i + batch))).argmax(1) == data.y[i : i + batch]).sum()
    model.train()
    return int(correct) / max(1, len(data))


def per_example_source(model: nn.Module, per_example_fn: G.PerExampleFn | None = None) -> Callable[[torch.Tensor, torch.Tensor], M.PerExample]:
    """What produces a chunk's per-example norms and weighted sum: the book-keeping accelerator when a
    rule covers every trainable layer (its layers scanned once), else vmap; a given ``per_example_fn``
    (the microbatch reference, a test's stand-in) is materialised as it is."""
    layers = BK.fast_layers(model) if per_example_fn is None else None
    if layers is not None:
        return lambda imgs, tgts: BK.per_example(model, imgs, tgts, layers)
    fn = per_example_fn or G.per_example_grads_vmap
    return lambda imgs, tgts: G.Materialised(*fn(model, imgs, tgts))


def _synthetic_pool(cfg: TrainConfig, splits: Splits, progress: bool) -> SyntheticPool | None:
    if cfg.mix.diff_mix == 0:
        return None
    from dpmix_ray.synth import resolve_synthetic  # diffusers/ray only when DP-Mix_Diff is used

    s = resolve_synthetic(
        cfg.mix.synthetic, cfg.synth, class_names=splits.class_names, channels=splits.channels,
        image_size=splits.image_size, private=cfg.data.name, is_public=cfg.mix.synthetic_is_public, progress=progress,
        private_images=torch.cat([splits.train.x, splits.val.x, splits.test.x]),
    )
    return SyntheticPool.from_tensors(s.x, s.y, splits.num_classes)


def fit(
    cfg: TrainConfig,
    plan: Plan | None = None,
    *,
    on_epoch: Callable[[EpochReport], None] | None = None,
    resume_state: dict[str, Any] | None = None,
    progress: bool = True,
    splits: Splits | None = None,
    per_example_fn: G.PerExampleFn | None = None,
    extra: StepExtra | None = None,
) -> Fitted:
    """Train one config end to end: its result record (see :func:`_result`) and the trained model.

    ``plan``: the privacy plan (σ or T, q); None plans here, a given one is checked against the config
    and N. Either way a run over budget raises BudgetError before anything is built. ``extra``: slots added to
    N and to every logical step (:class:`StepExtra`, the white-box audit). A resumed
    default run continues with fresh secret randomness; only a reproducible run resumes bit for bit.
    """
    wall_start = time.perf_counter()
    torch.manual_seed(cfg.seed)
    device = resolve_device(cfg.device)
    splits = splits or load_splits(cfg.data)
    n_real = len(splits.train)
    n = n_real + (extra.examples if extra is not None else 0)
    cfg = resolve(cfg, n)  # null batch size / epochs / lr derived from N and ε; the result records them
    check_against_dataset(cfg, n)
    plan = plan if plan is not None else plan_run(cfg, n)
    check_plan(plan, cfg, n)  # BudgetError here: nothing has run

    model = build_model(cfg.model, in_channels=splits.channels, num_classes=splits.num_classes, image_size=splits.image_size)
    if cfg.is_private:
        assert_dp_compatible(model)
    model.to(device).train()
    if splits.train.key is None:
        raise ValueError("the training split needs per-example keys (data.load_splits sets them): the draws are keyed by them")
    # uint8 on the device where the pixels allow it; each chunk becomes float32 where it is read
    train_set, val_set, test_set = (s.compact().to(device) for s in (splits.train, splits.val, splits.test))
    pool = _synthetic_pool(cfg, splits, progress)
    pool = pool.to(device) if pool is not None else None
    params = G.trainable(model)
    opt = torch.optim.SGD(params.values(), lr=cfg.optim.lr, momentum=cfg.optim.momentum)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, functools.partial(lr_factor, total=plan.steps, warmup=cfg.optim.warmup, schedule=cfg.optim.lr_schedule)
    )
    # The EMA averages the released noisy iterates (post-processing); evaluation and the result use it.
    ema = AveragedModel(model, multi_avg_fn=ema_multi_avg_fn(cfg.optim.ema)) if cfg.optim.ema is not None else None
    released = ema.module if ema is not None else model

    rand = M.Randomness.secret_on(device) if private_run(cfg) else M.Randomness.from_seed(cfg.seed, device)
    start_step, train_seconds = 0, 0.0
    if resume_state is not None:
        if resume_state["plan"] != plan.as_dict():
            raise ValueError("resume state belongs to a different privacy plan")
        model.load_state_dict(resume_state["model"])
        opt.load_state_dict(resume_state["optimizer"])
        sched.load_state_dict(resume_state["scheduler"])
        if ema is not None:
            ema.load_state_dict(resume_state["ema"])
        rand.load_state(resume_state["mechanism"])
        start_step, train_seconds = resume_state["step"], resume_state["seconds"]

    flip, padding = augmentation(cfg, splits)
    draw_kwargs = dict(
        image_hw=splits.train.image_shape[1:], k=cfg.mix.aug_multiplicity, m=cfg.mix.self_mix,
        n=cfg.mix.diff_mix, alpha=cfg.mix.alpha, padding=padding, flip=flip, synthetic=pool,
        seed=M.derive_seed(cfg.seed, "augment"),  # public: crops, flips, λ; keyed per example and step (no state)
        same_class=cfg.mix.diff_pairing == "same_class",
    )
    source = per_example_source(model, per_example_fn)
    chunk = examples_per_chunk(cfg, model, splits.train.image_shape)
    steps_per_epoch = max(1, round(1 / plan.sample_rate))
    perm: torch.Tensor | None = None

    def batch_indices(step: int) -> torch.Tensor:
        nonlocal perm
        if cfg.is_private:
            return M.poisson_sample(n_real, plan.sample_rate, rand.sampler)
        # Non-private reference: shuffled fixed-size batches, one permutation per epoch.
        pos = (step % steps_per_epoch) * cfg.optim.batch_size
        if perm is None or step % steps_per_epoch == 0:
            perm = torch.randperm(n_real, generator=rand.sampler, device=device)
        return perm[pos : pos + cfg.optim.batch_size]

    def state() -> dict[str, Any]:
        """A deep copy (training goes on mutating the live tensors); secret randomness is not in it."""
        return copy.deepcopy({
            "plan": plan.as_dict(), "model": model.state_dict(), "optimizer": opt.state_dict(),
            "scheduler": sched.state_dict(), "mechanism": rand.state(),
            "step": step + 1, "seconds": train_seconds, "ema": ema.state_dict() if ema is not None else None,
        })

    bar = tqdm(total=plan.steps, initial=start_step, disable=not progress, desc=cfg.method, unit="step", dynamic_ncols=True)
    # The training loss is reported for non-private runs only: it is computed on private data, unnoised.
    loss_sum, loss_count = torch.zeros((), device=device), 0
    step = start_step - 1
    for step in range(start_step, plan.steps):
        t0 = time.perf_counter()
        idx = batch_indices(step)
        if cfg.is_private:
            logical = M.LogicalStep(params, clip_norm=cfg.privacy.clip_norm, noise_multiplier=plan.noise_multiplier,
                                    expected_batch_size=plan.sample_rate * n, generator=rand.noise)
        else:
            summed: M.Grads = {k: torch.zeros_like(p) for k, p in params.items()}
        labels = train_set.y[idx]
        # Each row keyed by its example's stable key and the step: neither the chunking nor the batch's
        # other members change an example's group.
        draws = draw(labels, train_set.key[idx], step=step, **draw_kwargs)
        for lo in range(0, len(idx), chunk):
            sel = idx[lo : lo + chunk]
            imgs, tgts = assemble(train_set.images(sel), labels[lo : lo + chunk], draws[lo : lo + chunk],
                                  num_classes=splits.num_classes, padding=padding, synthetic=pool)
            if cfg.is_private:
                logical.add(source(imgs, tgts))
            else:
                part, losses = G.summed_grads_nonprivate(model, imgs, tgts)
                for k in summed:
                    summed[k] += part[k]
                loss_sum += losses.sum()
                loss_count += len(sel)
        joined = extra.sample(params, plan.sample_rate) if extra is not None else None
        if joined is not None and cfg.is_private:
            logical.add(joined)
        elif joined is not None:
            for k, g in joined.weighted_sum(torch.ones_like(joined.norms)).items():
                summed[k] += g
        size = len(idx) + (len(joined.norms) if joined is not None else 0)
        update = logical.release() if cfg.is_private else {k: s / max(1, size) for k, s in summed.items()}
        if extra is not None:
            extra.released(update)
        for k, p in params.items():
            p.grad = update[k]
        opt.step()
        sched.step()
        if ema is not None:
            ema.update_parameters(model)
        train_seconds += time.perf_counter() - t0
        bar.update(1)
        if not bool(torch.stack([p.isfinite().all() for p in params.values()]).all()):
            bar.close()
            raise DivergedError(f"training diverged at step {step + 1}: a parameter is not finite")

        if (step + 1) % steps_per_epoch == 0 or step + 1 == plan.steps:
            metrics = {"val_accuracy": evaluate(released, val_set), "epsilon_spent": _spent_so_far(cfg, plan, step + 1)}
            if not cfg.is_private:
                metrics["train_loss"] = float(loss_sum) / max(1, loss_count)
                loss_sum.zero_()
                loss_count = 0
            bar.set_postfix({k: f"{v:.3f}" for k, v in metrics.items()})
            if on_epoch is not None:
                on_epoch(EpochReport(epoch=(step + 1 + steps_per_epoch - 1) // steps_per_epoch, step=step + 1, metrics=metrics, state=state))
    bar.close()
    result = _result(cfg, plan, released, val_set, test_set, n, device, train_seconds)
    if ema is not None:  # the live iterate too, so one run shows what the average bought
        result |= {"val_accuracy_live": evaluate(model, val_set), "test_accuracy_live": evaluate(model, test_set)}
    result["wall_seconds"] = time.perf_counter() - wall_start
    return Fitted(result, released.eval())


def train(cfg: TrainConfig, plan: Plan | None = None, **options: Any) -> dict[str, Any]:
    """:func:`fit`'s result record alone (the same keyword options)."""
    return fit(cfg, plan, **options).result


def _spent_so_far(cfg: TrainConfig, plan: Plan, steps: int) -> float:
    if not cfg.is_private:
        return math.inf
    return epsilon_spent(
        noise_multiplier=plan.noise_multiplier, sample_rate=plan.sample_rate, steps=steps, delta=cfg.privacy.delta, accountant=plan.accountant,
        neighbouring=plan.neighbouring,
    )


def _result(cfg: TrainConfig, plan: Plan, model: nn.Module, val: Images, test: Images, n_train: int, device: torch.device, seconds: float) -> dict[str, Any]:
    """The run's record. ``private`` and ``guarantee`` say what its ε covers; ``images_per_second`` counts
    the *expected* images, T·q·N·G (the realised count is a function of the secret Poisson masks)."""
    images = plan.steps * plan.sample_rate * n_train * cfg.mix.group_size
    return {
        "method": cfg.method,
        "private": private_run(cfg),
        "guarantee": run_guarantee(cfg, n_train),
        "val_accuracy": evaluate(model, val),
        "test_accuracy": evaluate(model, test),
        "epsilon_target": cfg.privacy.epsilon if cfg.is_private else None,
        "epsilon_spent": plan.epsilon_spent if cfg.is_private else None,
        "delta": cfg.privacy.delta if cfg.is_private else None,
        "accountant": plan.accountant,
        "neighbouring": plan.neighbouring,
        "noise_multiplier": plan.noise_multiplier,
        "sample_rate": plan.sample_rate,
        "steps": plan.steps,
        "epochs": plan.epochs,
        "batch_size": cfg.optim.batch_size,
        "clip_norm": cfg.privacy.clip_norm,
        "aug_multiplicity": cfg.mix.aug_multiplicity,
        "self_mix": cfg.mix.self_mix,
        "diff_mix": cfg.mix.diff_mix,
        "seed": cfg.seed,
        "n_train": n_train,
        "device": str(device),
        "images_per_second": images / seconds if seconds > 0 else 0.0,
        "config": cfg.model_dump(mode="json"),
    }
