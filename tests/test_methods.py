"""The methods table: implied counts, refusals, and the three readers (config, sweep plan, trainer) agree with it."""

from __future__ import annotations

from typing import get_args

import pytest

from dpmix_ray import methods
from dpmix_ray.config import SweepConfig, load_train_config
from dpmix_ray.errors import ConfigError
from dpmix_ray.sweep import plan as P


@pytest.mark.parametrize(("method", "counts"), [("dpsgd", (1, 0, 0)), ("augmult", (8, 0, 0)), ("dpmix_self", (8, 4, 0))])
def test_a_method_implies_its_fixed_counts_unless_set(method: str, counts: tuple[int, int, int]) -> None:
    cfg = load_train_config(None, [f"method={method}"])  # today's defaults are K=8, m=4
    assert (cfg.mix.aug_multiplicity, cfg.mix.self_mix, cfg.mix.diff_mix) == counts
    assert load_train_config(None, ["method=augmult", "mix.aug_multiplicity=3"]).mix.aug_multiplicity == 3


@pytest.mark.parametrize(("overrides", "needle"), [
    (["method=dpsgd", "mix.aug_multiplicity=2"], "method dpsgd needs mix.aug_multiplicity=1, mix.self_mix=0, mix.diff_mix=0 (use augmult for K>1)"),
    (["method=augmult", "mix.self_mix=1"], "method augmult needs mix.self_mix=0"),
    (["method=dpmix_diff"], "method dpmix_diff needs mix.diff_mix >= 1"),
])
def test_explicit_counts_that_contradict_the_method_are_refused_in_one_line(overrides: list[str], needle: str) -> None:
    with pytest.raises(ConfigError) as e:
        load_train_config(None, overrides)
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_table_names_every_method_of_the_schema() -> None:
    assert tuple(methods.METHODS) == get_args(methods.MethodName)
    assert [m for m, spec in methods.METHODS.items() if not spec.private] == ["nonprivate"]


def test_sweep_plan_reads_fixed_counts_and_ignored_keys_from_the_table() -> None:
    cfg = SweepConfig.model_validate({
        "base": {"method": "dpmix_self", "mix": {"aug_multiplicity": 4, "self_mix": 2}}, "baselines": ["augmult", "dpsgd", "nonprivate"],
        "space": {"optim.lr": {"uniform": [1, 2]}, "mix.aug_multiplicity": {"int": [2, 4]}, "mix.alpha": {"uniform": [0.1, 1]},
                  "privacy.clip_norm": {"uniform": [0.5, 2]}},
    })
    spaces = {g.method: set(g.space) for g in P.build_groups(cfg)}
    assert spaces["dpsgd"] == {"optim.lr", "privacy.clip_norm"}
    assert spaces["augmult"] == {"optim.lr", "mix.aug_multiplicity", "privacy.clip_norm"}
    assert spaces["nonprivate"] == set()  # the non-private ceiling is one run at the derived recipe, never searched
    for g in P.build_groups(cfg):
        assert g.fixed == dict(methods.get(g.method).fixed)
        trial = P.trial_config(cfg, g, {}, seed=0)
        assert methods.get(g.method).problems(
            {methods.K: trial.mix.aug_multiplicity, methods.M: trial.mix.self_mix, methods.N: trial.mix.diff_mix}) is None


def test_trainer_self_augments_exactly_the_methods_the_table_says() -> None:
    from types import SimpleNamespace

    from dpmix_ray.trainer import augmentation

    natural = SimpleNamespace(hflip_safe=True, image_size=32)
    for name, spec in methods.METHODS.items():
        if name == "dpmix_diff":
            continue  # needs a synthetic set to validate; same rule as the others
        cfg = load_train_config(None, [f"method={name}"])
        assert (augmentation(cfg, natural) != (False, 0)) == spec.augments, name
