"""See the cost first: the estimate's arithmetic, the probe's inputs, and `dpmix-ray plan CONFIG`."""

import json
import math

import numpy as np
import pytest
import torch

from dpmix_ray import cost
from dpmix_ray.config import TrainConfig, load_train_config
from dpmix_ray.privacy import Plan
from dpmix_ray.recipe import resolve
from test_cli import run

PLAN_FIELDS = ("method", "model", "n_train", "batch_size", "sample_rate", "epochs", "steps", "noise_multiplier", "lr", "clip_norm",
               "aug_multiplicity", "self_mix", "diff_mix", "ema", "lr_schedule", "warmup", "epsilon_target", "epsilon_spent",
               "delta", "accountant", "neighbouring", "images", "eval_images", "estimated_seconds", "probe")


def test_expected_images_and_evaluations():
    plan = Plan(noise_multiplier=1.0, sample_rate=0.1, steps=25, epochs=2.5, epsilon_spent=1.0, accountant="rdp", neighbouring="zero_out")
    assert cost.expected_images(plan, 1000, 12) == pytest.approx(25 * 0.1 * 1000 * 12)
    # 10 steps an epoch: reports after steps 10, 20 and 25, then val + test once (twice with an EMA)
    assert cost.evaluated_images(plan, n_val=100, n_test=200, ema=False) == 3 * 100 + 300
    assert cost.evaluated_images(plan, n_val=100, n_test=200, ema=True) == 3 * 100 + 600


def test_estimate_seconds():
    t = cost.Throughput(train_images_per_second=1000.0, eval_images_per_second=4000.0, timed_steps=5, probe_seconds=3.0,
                        device="cpu", threads=1)
    assert cost.estimate_seconds(train_images=60_000, eval_images=8_000, throughput=t, setup_seconds=1.5) == pytest.approx(63.5)


def test_probe_config_keeps_the_work_and_is_not_private():
    cfg = resolve(TrainConfig.model_validate({"method": "dpmix_diff", "mix": {"aug_multiplicity": 4, "self_mix": 1, "diff_mix": 2,
                                                                              "synthetic": "x.npz"}}), 3500)
    p = cost.probe_config(cfg, 7)
    assert p.mix.group_size == cfg.mix.group_size and p.mix.diff_mix == 0 and p.mix.synthetic is None
    assert p.privacy.reproducible and p.optim.batch_size == cfg.optim.batch_size and p.model == cfg.model


def test_probe_trains_on_generated_inputs_only(monkeypatch):
    """The probe is handed shapes; whatever fit() sees is random, never the dataset's images."""
    import dpmix_ray.trainer as T

    seen = []
    real_fit = T.fit

    def spy(cfg, plan=None, **kw):
        seen.append(kw["splits"])
        return real_fit(cfg, plan, **kw)

    monkeypatch.setattr(T, "fit", spy)
    monkeypatch.setattr("dpmix_ray.data.load_splits", lambda *a, **k: pytest.fail("the probe loaded the dataset"))
    shape = cost.DataShape(n_train=1000, n_val=100, n_test=100, image_shape=(1, 8, 8), num_classes=10, hflip_safe=False)
    cfg = resolve(TrainConfig.model_validate({"data": {"name": "digits"}, "mix": {"aug_multiplicity": 2, "self_mix": 1}}), 1000)
    t = cost.probe(cfg, shape, seconds=1.0, max_steps=4)
    assert t.train_images_per_second > 0 and t.eval_images_per_second > 0 and 1 <= t.timed_steps <= 3
    (splits,) = seen
    assert len(splits.train) == cfg.optim.batch_size and len(splits.val) == 0
    assert torch.equal(splits.train.x, cost.random_splits(shape, cfg.optim.batch_size, torch.device("cpu"), cfg.seed).train.x)


def test_plan_config_prints_every_field_and_writes_nothing(tmp_path):
    images = np.random.default_rng(0).integers(0, 256, (600, 12, 12), dtype=np.uint8)
    np.savez(tmp_path / "d.npz", x=images, y=np.arange(600) % 3)
    (tmp_path / "c.yaml").write_text(f"data: {{name: 'npz:{tmp_path / 'd.npz'}'}}\nmix: {{aug_multiplicity: 2, self_mix: 1}}\n"
                                     "privacy: {delta: 1.0e-4}\noptim: {ema: 0.9}\n")
    before = sorted(p.name for p in tmp_path.rglob("*"))
    proc = run("plan", str(tmp_path / "c.yaml"), "--set", "privacy.epsilon=3", "--json", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    (line,) = proc.stdout.strip().splitlines()
    out = json.loads(line)
    assert all(k in out for k in PLAN_FIELDS), set(PLAN_FIELDS) - set(out)
    assert out["epsilon_target"] == 3 and out["epsilon_spent"] <= 3 and out["ema"] == 0.9
    assert out["images"] == pytest.approx(out["steps"] * out["sample_rate"] * out["n_train"] * 3)
    assert math.isfinite(out["estimated_seconds"]) and out["estimated_seconds"] > 0
    assert sorted(p.name for p in tmp_path.rglob("*")) == before  # nothing written

    human = run("plan", str(tmp_path / "c.yaml"), cwd=tmp_path)
    assert human.returncode == 0 and "estimated wall time" in human.stderr and "T·q·N·(K+m+n)" in human.stderr


def test_plan_refuses_config_and_flags_together():
    from test_cli import assert_one_line_error

    assert_one_line_error(run("plan", "c.yaml", "--epsilon", "2"), "not both")
