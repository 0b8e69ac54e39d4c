"""The one trainer core end to end, on the offline digits data (seconds on CPU)."""

import dataclasses

import numpy as np
import pytest
import torch
from torch.overrides import TorchFunctionMode

from dpmix_ray import grads as G
from dpmix_ray import trainer as T
from dpmix_ray.config import load_train_config
from dpmix_ray.data import load_splits
from dpmix_ray.errors import BudgetError, DivergedError
from dpmix_ray.privacy import plan_run

TINY = ["data.name=digits", "optim.batch_size=64", "optim.epochs=1", "mix.aug_multiplicity=2", "mix.self_mix=1", "optim.lr=1.0"]


@pytest.fixture(scope="module")
def digits():
    return load_splits(load_train_config(None, TINY).data)


def test_private_run_reports_everything_and_stays_within_budget(digits):
    cfg = load_train_config(None, TINY + ["privacy.epsilon=4"])
    epochs = []
    res = T.train(cfg, splits=digits, progress=False, on_epoch=epochs.append)
    for key in ["method", "private", "guarantee", "val_accuracy", "test_accuracy", "epsilon_target", "epsilon_spent", "delta", "noise_multiplier",
                "sample_rate", "steps", "epochs", "clip_norm", "aug_multiplicity", "self_mix", "diff_mix", "seed",
                "wall_seconds", "images_per_second"]:
        assert key in res
    assert 0.98 * 4 <= res["epsilon_spent"] <= 4
    assert res["steps"] == 20 and epochs[-1].step == 20 and epochs[-1].metrics["epsilon_spent"] == pytest.approx(res["epsilon_spent"])
    assert res["images_per_second"] > 0 and 0 <= res["test_accuracy"] <= 1
    assert res["private"] is True and f"N={res['n_train']} examples of the training split" in res["guarantee"]
    assert all("train_loss" not in e.metrics for e in epochs)  # computed on private data without noise: not reported


def test_nonprivate_learns(digits):
    cfg = load_train_config(None, TINY + ["method=nonprivate", "optim.epochs=3", "optim.lr=0.05", "optim.momentum=0.9"])
    res = T.train(cfg, splits=digits, progress=False)
    assert res["val_accuracy"] > 0.6 and res["epsilon_spent"] is None
    assert res["private"] is False and res["guarantee"].startswith("NOT PRIVATE")


def test_over_budget_is_refused_before_anything_is_built(digits, monkeypatch):
    def boom(*a, **k):
        raise AssertionError("a model was built for a run over budget")

    monkeypatch.setattr(T, "build_model", boom)
    cfg = load_train_config(None, TINY + ["privacy.noise_multiplier=0.3", "optim.epochs=null", "privacy.epsilon=0.5"])
    with pytest.raises(BudgetError, match="single step"):
        T.train(cfg, splits=digits, progress=False)


def test_a_given_plan_is_used_or_refused_before_anything_is_built(digits, monkeypatch):
    cfg = load_train_config(None, TINY + ["optim.epochs=0.1", "privacy.epsilon=4"])
    plan = plan_run(cfg, len(digits.train))
    fitted = T.fit(cfg, plan, splits=digits, progress=False)
    assert fitted.result["steps"] == plan.steps and fitted.result["noise_multiplier"] == plan.noise_multiplier
    assert not fitted.model.training and fitted.result["val_accuracy"] == T.evaluate(fitted.model, digits.val)

    def boom(*a, **k):
        raise AssertionError("a model was built for a refused plan")

    monkeypatch.setattr(T, "build_model", boom)
    for bad in (plan_run(cfg, len(digits.train) // 2), dataclasses.replace(plan, noise_multiplier=plan.noise_multiplier / 3)):
        with pytest.raises(BudgetError, match="privacy plan refused"):
            T.train(cfg, bad, splits=digits, progress=False)


@pytest.mark.parametrize("fast", [None, G.per_example_grads_vmap])  # None: the trainer's default fast path
def test_trainer_fast_paths_equal_the_reference_loop(digits, fast):
    cfg = load_train_config(None, TINY + ["optim.epochs=0.2", "privacy.epsilon=8", "privacy.reproducible=true"])
    a = T.train(cfg, splits=digits, progress=False, per_example_fn=fast)
    b = T.train(cfg, splits=digits, progress=False, per_example_fn=G.per_example_grads_loop)
    assert a["val_accuracy"] == pytest.approx(b["val_accuracy"], abs=1 / 180)
    assert a["steps"] == b["steps"] and a["noise_multiplier"] == b["noise_multiplier"]


def test_resume_from_an_epoch_checkpoint_is_exact_in_reproducible_mode(digits):
    cfg = load_train_config(None, TINY + ["optim.epochs=2", "privacy.epsilon=8", "privacy.reproducible=true"])
    states = []
    full = T.train(cfg, splits=digits, progress=False, on_epoch=lambda r: states.append(r.state()))
    resumed = T.train(cfg, splits=digits, progress=False, resume_state=states[0])
    assert resumed["val_accuracy"] == full["val_accuracy"] and resumed["test_accuracy"] == full["test_accuracy"]


def test_divergence_is_reported(digits):
    """Seen in the parameters (post-processing of the released updates), not in the private loss."""

    def nan_fn(model, imgs, tgts):
        g, losses = G.per_example_grads_vmap(model, imgs, tgts)
        return {k: v * float("nan") for k, v in g.items()}, losses

    cfg = load_train_config(None, TINY)
    with pytest.raises(DivergedError, match="diverged"):
        T.train(cfg, splits=digits, progress=False, per_example_fn=nan_fn)


def test_dpmix_diff_trains_on_a_labelled_npz_set(digits, tmp_path):
    from dpmix_ray.data import write_labelled_images

    # A stand-in public set that never saw digits: seeded noise images, three a class, vouched public.
    x = torch.rand(30, *digits.train.x.shape[1:], generator=torch.Generator().manual_seed(0))
    write_labelled_images(tmp_path / "syn.npz", (x * 255).round().to(torch.uint8).numpy(), torch.arange(30).remainder(10).numpy(), digits.class_names)
    cfg = load_train_config(None, TINY + ["method=dpmix_diff", "mix.diff_mix=2", f"mix.synthetic={tmp_path / 'syn.npz'}",
                                          "mix.synthetic_is_public=true", "mix.diff_pairing=same_class", "optim.epochs=0.3"])
    res = T.train(cfg, splits=digits, progress=False)
    assert res["diff_mix"] == 2 and res["epsilon_spent"] <= cfg.privacy.epsilon
    # G = K + m + n = 2 + 1 + 2 images per example went through the model
    assert res["images_per_second"] > 0


def test_augmentation_defaults(digits):
    from dataclasses import replace

    cfg = load_train_config(None, TINY)
    assert T.augmentation(cfg, digits) == (False, 1)  # digits: no flips, 1 px shifts
    natural = replace(digits, hflip_safe=True)
    assert T.augmentation(cfg, natural) == (True, 1)  # 8 px images: 4 px per 32 px → 1
    assert T.augmentation(load_train_config(None, TINY + ["mix.crop_padding=3", "mix.flip=false"]), natural) == (False, 3)
    dpsgd = load_train_config(None, TINY + ["method=dpsgd", "mix.aug_multiplicity=1", "mix.self_mix=0"])
    assert T.augmentation(dpsgd, natural) == (False, 0)  # plain DP-SGD sees raw images


class Transfers(TorchFunctionMode):
    """Counts the calls that can copy host data to a device: ``Tensor.to``/``cuda`` given a device or a
    tensor, ``torch.tensor``/``as_tensor`` (and ``torch.from_numpy``, patched, not a torch function).
    On CPU they copy nothing, but the same calls on CUDA would each be a host-to-device copy."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in (torch.Tensor.to, torch.Tensor.cuda):
            targets = list(args[1:]) + list(kwargs.values())
            self.count += any(isinstance(t, (torch.device, str, int, torch.Tensor)) and not isinstance(t, bool) for t in targets)
        elif func in (torch.tensor, torch.as_tensor):
            self.count += 1
        return func(*args, **kwargs)


def test_a_step_copies_nothing_from_the_host(digits, monkeypatch):
    """The data go to the device once: runs of 2 and 6 steps (8 examples per physical chunk: 16 and
    48 chunks) make the same number of transfer calls, all of them set-up."""

    def count(epochs: float) -> tuple[int, int]:
        mode = Transfers()
        from_numpy = torch.from_numpy
        monkeypatch.setattr(torch, "from_numpy", lambda a: setattr(mode, "count", mode.count + 1) or from_numpy(a))
        cfg = load_train_config(None, TINY + [f"optim.epochs={epochs}", "optim.physical_batch_size=24"])
        with mode:
            res = T.train(cfg, splits=digits, progress=False)
        return mode.count, res["steps"]

    (short, short_steps), (long, long_steps) = count(0.1), count(0.3)
    assert short_steps < long_steps
    assert short == long > 0, (short, long)  # > 0: the set-up copies are seen, so per-step ones would be
    probe = Transfers()
    with probe:
        torch.zeros(2).to(torch.device("cpu"))
        torch.zeros(2).to(torch.float64)  # a dtype change is no transfer
        torch.as_tensor(np.zeros(2))
    assert probe.count == 2


def test_adding_an_example_leaves_every_other_group_bit_identical(tmp_path, monkeypatch):
    """On D and D ∪ {x} (x first in the source, so every source position moves), with the same public
    seed and the same other examples sampled (the Poisson draws fixed by a hook), every other example's
    group at two steps is bit-identical, though x takes a row before them in the batch."""
    from sklearn.datasets import load_digits

    from dpmix_ray import mechanism as M
    from dpmix_ray.data import write_labelled_images

    d = load_digits()
    images, labels = np.rint(d.images * (255 / 16)).astype(np.uint8), d.target

    def splits_of(rows: list[int], name: str):
        write_labelled_images(tmp_path / name, images[rows], labels[rows], [str(c) for c in range(10)])
        return load_splits(load_train_config(None, TINY + [f"data.name=npz:{tmp_path / name}"]).data)

    base = list(range(1, 301))
    small = splits_of(base, "d.npz")
    big = next(s for s in (splits_of([c, *base], f"dx{c}.npz") for c in range(301, 320)) if len(s.train) == len(small.train) + 1)
    train_keys = small.train.key.tolist()
    others = torch.tensor([k for k in train_keys if train_keys.count(k) == 1][::8][:24])  # spread over the split
    x_key = next(k for k in big.train.key.tolist() if k not in set(train_keys))
    moved = [k for k in others.tolist() if big.train.key.tolist().index(k) != train_keys.index(k)]
    assert 0 < len(moved) < len(others)  # x lands among them: training-set indices move too
    orders = [others.tolist(), others.flip(0).tolist()]
    captured: list[tuple[int, torch.Tensor, torch.Tensor]] = []
    state = {"step": -1, "with_x": False, "splits": small}
    assemble = T.assemble

    def fixed_sample(n, q, generator):
        state["step"] += 1
        order = list(orders[state["step"] % 2])
        if state["with_x"]:
            order.insert(0 if state["step"] == 0 else 12, x_key)
        index = {k: i for i, k in enumerate(state["splits"].train.key.tolist())}
        return torch.tensor([index[k] for k in order])

    def recording_assemble(*args, **kwargs):
        imgs, tgts = assemble(*args, **kwargs)
        captured.append((state["step"], imgs, tgts))
        return imgs, tgts

    monkeypatch.setattr(M, "poisson_sample", fixed_sample)
    monkeypatch.setattr(T, "assemble", recording_assemble)
    cfg = load_train_config(None, TINY + ["optim.epochs=0.6", "optim.physical_batch_size=9"])

    def groups(splits, with_x: bool) -> dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]]:
        """(step, key) → that example's images and targets, for the first two steps."""
        state.update(step=-1, with_x=with_x, splits=splits)
        captured.clear()
        T.train(cfg, splits=splits, progress=False)
        out = {}
        for step in (0, 1):
            imgs = torch.cat([i for s, i, _ in captured if s == step])
            tgts = torch.cat([t for s, _, t in captured if s == step])
            order = list(orders[step])
            if with_x:
                order.insert(0 if step == 0 else 12, x_key)
            out |= {(step, k): (imgs[r], tgts[r]) for r, k in enumerate(order)}
        return out

    without, with_x = groups(small, False), groups(big, True)
    assert len(without) == 48 and len(with_x) == 50
    for where, (imgs, tgts) in without.items():
        assert torch.equal(imgs, with_x[where][0]) and torch.equal(tgts, with_x[where][1]), where
    assert not torch.equal(with_x[(0, x_key)][0], with_x[(1, x_key)][0])  # the step enters x's draws


def test_uint8_data_on_the_device_train_bit_identically_to_float(digits, monkeypatch):
    """A reproducible run holds the splits as uint8 codes (``ImageSet.compact``) and converts each chunk
    where it is read: its results equal a run that holds float32 sets, and a second uint8 run's."""
    from dpmix_ray.data import ImageSet

    cfg = load_train_config(None, TINY + ["optim.epochs=0.3", "privacy.epsilon=8", "privacy.reproducible=true",
                                          "optim.physical_batch_size=15"])
    held = []
    to = ImageSet.to
    monkeypatch.setattr(ImageSet, "to", lambda self, device: held.append(self.x.dtype) or to(self, device))
    compact = [T.fit(cfg, splits=digits, progress=False) for _ in range(2)]
    assert held == [torch.uint8] * 6
    monkeypatch.setattr(ImageSet, "compact", lambda self: self)
    plain = T.fit(cfg, splits=digits, progress=False)
    assert held[6:] == [torch.float32] * 3
    for key in ("val_accuracy", "test_accuracy", "steps", "noise_multiplier"):
        assert compact[0].result[key] == compact[1].result[key] == plain.result[key], key
    for name, p in plain.model.state_dict().items():  # the trained weights, bit for bit
        assert all(torch.equal(f.model.state_dict()[name], p) for f in compact), name


def test_a_memory_mapped_store_trains_bit_identically_to_memory(tmp_path, monkeypatch):
    """``data.storage=mmap`` reads each chunk from the store: a reproducible run draws the same Poisson
    samples and ends with the same weights and accuracies as the in-memory run of the same store."""
    from sklearn.datasets import load_digits

    from dpmix_ray import mechanism as M
    from dpmix_ray.data import StoredImageSet, write_image_store

    d = load_digits()
    images = np.rint(d.images * (255 / 16)).astype(np.uint8)[:, None]
    write_image_store(tmp_path / "store", [images[:1000], images[1000:]], d.target, [str(c) for c in range(10)])
    sampled: list[list[torch.Tensor]] = []
    poisson = M.poisson_sample
    monkeypatch.setattr(M, "poisson_sample", lambda *a: sampled[-1].append(poisson(*a)) or sampled[-1][-1])

    def run(storage: str) -> T.Fitted:
        sampled.append([])
        cfg = load_train_config(None, TINY + [f"data.name=npy:{tmp_path / 'store'}", f"data.storage={storage}", "optim.epochs=0.3",
                                              "privacy.epsilon=8", "privacy.reproducible=true", "optim.physical_batch_size=15"])
        return T.fit(cfg, progress=False)

    read = []
    images_of = StoredImageSet.images
    monkeypatch.setattr(StoredImageSet, "images", lambda self, rows: read.append(1) or images_of(self, rows))
    memory, mapped = run("memory"), run("mmap")
    assert read and len(sampled[0]) == len(sampled[1]) == memory.result["steps"] > 1
    assert all(torch.equal(a, b) for a, b in zip(*sampled))
    for key in ("val_accuracy", "test_accuracy", "n_train", "noise_multiplier"):
        assert memory.result[key] == mapped.result[key], key
    for name, p in memory.model.state_dict().items():
        assert torch.equal(mapped.model.state_dict()[name], p), name
