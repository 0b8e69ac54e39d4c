"""The one trainer core end to end, on the offline digits data (seconds on CPU)."""

import pytest
import torch

from dpmix_ray import grads as G
from dpmix_ray import trainer as T
from dpmix_ray.config import load_train_config
from dpmix_ray.data import load_splits
from dpmix_ray.errors import BudgetError, DivergedError

TINY = ["data.name=digits", "optim.batch_size=64", "optim.epochs=1", "mix.aug_multiplicity=2", "mix.self_mix=1", "optim.lr=1.0"]


@pytest.fixture(scope="module")
def digits():
    return load_splits(load_train_config(None, TINY).data)


def test_private_run_reports_everything_and_stays_within_budget(digits):
    cfg = load_train_config(None, TINY + ["privacy.epsilon=4"])
    epochs = []
    res = T.train(cfg, splits=digits, progress=False, on_epoch=epochs.append)
    for key in ["method", "val_accuracy", "test_accuracy", "epsilon_target", "epsilon_spent", "delta", "noise_multiplier",
                "sample_rate", "steps", "epochs", "clip_norm", "aug_multiplicity", "self_mix", "diff_mix", "seed",
                "wall_seconds", "images_per_second"]:
        assert key in res
    assert 0.98 * 4 <= res["epsilon_spent"] <= 4
    assert res["steps"] == 20 and len(epochs) == 1 and epochs[0].metrics["epsilon_spent"] == pytest.approx(res["epsilon_spent"])
    assert res["images_per_second"] > 0 and 0 <= res["test_accuracy"] <= 1


def test_nonprivate_learns(digits):
    cfg = load_train_config(None, TINY + ["method=nonprivate", "optim.epochs=3", "optim.lr=0.05", "optim.momentum=0.9"])
    res = T.train(cfg, splits=digits, progress=False)
    assert res["val_accuracy"] > 0.6 and res["epsilon_spent"] is None


def test_over_budget_is_refused_before_anything_is_built(digits, monkeypatch):
    def boom(*a, **k):
        raise AssertionError("a model was built for a run over budget")

    monkeypatch.setattr(T, "build_model", boom)
    cfg = load_train_config(None, TINY + ["privacy.noise_multiplier=0.3", "optim.epochs=null", "privacy.epsilon=0.5"])
    with pytest.raises(BudgetError, match="single step"):
        T.train(cfg, splits=digits, progress=False)


@pytest.mark.parametrize("fast", [None, G.per_example_grads_vmap])  # None: the trainer's default fast path
def test_trainer_fast_paths_equal_the_reference_loop(digits, fast):
    cfg = load_train_config(None, TINY + ["optim.epochs=0.2", "privacy.epsilon=8"])
    a = T.train(cfg, splits=digits, progress=False, per_example_fn=fast)
    b = T.train(cfg, splits=digits, progress=False, per_example_fn=G.per_example_grads_loop)
    assert a["val_accuracy"] == pytest.approx(b["val_accuracy"], abs=1 / 180)
    assert a["steps"] == b["steps"] and a["noise_multiplier"] == b["noise_multiplier"]


def test_resume_from_an_epoch_checkpoint_is_exact(digits):
    cfg = load_train_config(None, TINY + ["optim.epochs=2", "privacy.epsilon=8"])
    states = []
    full = T.train(cfg, splits=digits, progress=False, on_epoch=lambda r: states.append(r.state()))
    resumed = T.train(cfg, splits=digits, progress=False, resume_state=states[0])
    assert resumed["val_accuracy"] == full["val_accuracy"] and resumed["test_accuracy"] == full["test_accuracy"]


def test_divergence_is_reported(digits):
    def nan_fn(model, imgs, tgts):
        g, losses = G.per_example_grads_vmap(model, imgs, tgts)
        return g, losses * float("nan")

    cfg = load_train_config(None, TINY)
    with pytest.raises(DivergedError, match="diverged"):
        T.train(cfg, splits=digits, progress=False, per_example_fn=nan_fn)


def test_dpmix_diff_trains_on_a_labelled_npz_set(digits, tmp_path):
    from dpmix_ray.data import write_labelled_images

    # A stand-in public set: blurred class means of digits (any labelled images of the right shape work).
    x = torch.stack([digits.train.x[digits.train.y == c].mean(0) for c in range(10)]).repeat(3, 1, 1, 1)
    write_labelled_images(tmp_path / "syn.npz", (x * 255).round().to(torch.uint8).numpy(), torch.arange(30).remainder(10).numpy(), digits.class_names)
    cfg = load_train_config(None, TINY + ["method=dpmix_diff", "mix.diff_mix=2", f"mix.synthetic={tmp_path / 'syn.npz'}",
                                          "mix.diff_pairing=same_class", "optim.epochs=0.3"])
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
