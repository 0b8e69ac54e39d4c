"""Every config error is refused with one line naming the key."""

import pytest

from dpmix_ray.config import (
    check_against_dataset,
    load_sweep_config,
    load_synth_config,
    load_train_config,
    parse_overrides,
    with_updates,
)
from dpmix_ray.errors import ConfigError


def refuse(overrides, pattern):
    with pytest.raises(ConfigError, match=pattern) as e:
        load_train_config(None, overrides)
    assert "\n" not in str(e.value)


def test_embedded_default_is_valid_dpmix_self_on_mnist5k():
    cfg = load_train_config(None)
    assert cfg.method == "dpmix_self" and cfg.data.name == "mnist5k" and cfg.mix.self_mix > 0


def test_overrides_are_yaml_typed_and_dotted():
    cfg = load_train_config(None, ["privacy.epsilon=4", "mix.aug_multiplicity=16", "optim.lr_schedule=cosine", "model.weights=null"])
    assert cfg.privacy.epsilon == 4.0 and cfg.mix.aug_multiplicity == 16 and cfg.optim.lr_schedule == "cosine"
    assert parse_overrides(["a.b=[1, 2]"]) == {"a.b": [1, 2]}


@pytest.mark.parametrize(
    "overrides, pattern",
    [
        (["privacy.epsilon=0"], r"privacy\.epsilon: .*greater than 0"),
        (["privacy.epsilon=-1"], r"privacy\.epsilon"),
        (["privacy.delta=1.5"], r"privacy\.delta"),
        (["mix.aug_multiplicity=0"], r"mix\.aug_multiplicity"),
        (["mix.colour=1"], r"mix\.colour: unknown key"),
        (["bogus=1"], r"bogus: unknown key"),
        (["method=dpsgd", "mix.aug_multiplicity=4"], r"method dpsgd needs mix\.aug_multiplicity=1"),  # [search: implied counts]
        (["method=augmult", "mix.self_mix=2"], r"augmult needs mix\.self_mix=0"),
        (["method=dpmix_diff", "mix.diff_mix=2"], r"needs mix\.synthetic"),
        (["method=dpmix_diff", "mix.diff_mix=0"], r"dpmix_diff needs mix\.diff_mix >= 1"),
        (["mix.aug_multiplicity=1", "mix.self_mix=1"], r"distinct self-augmentations"),
        (["privacy.noise_multiplier=1.0", "optim.epochs=3"], r"both set"),
        (["privacy.accountant=gdp"], r"privacy\.accountant"),
        (["privacy.neighbouring=add_remove"], r"privacy\.neighbouring"),
        (["privacy.neighbouring=replace_one"], r"privacy: neighbouring: replace_one needs accountant: pld"),
        (["privacy.neighbouring=replace_one", "privacy.accountant=prv"], r"replace_one needs accountant: pld"),
        (["method=magic"], r"method"),
        (["mix.synthetic=synth", "method=dpmix_diff", "mix.diff_mix=1"], r"needs a synth section"),
        (["optim=3"], r"optim"),
        (["notakeyvalue"], r"expected key=value"),
    ],
)
def test_config_errors_name_the_key(overrides, pattern):
    refuse(overrides, pattern)


def test_delta_must_be_below_one_over_n():
    cfg = load_train_config(None, ["privacy.delta=1e-3"])
    with pytest.raises(ConfigError, match=r"privacy\.delta: .* 1/N"):
        check_against_dataset(cfg, 5000)
    check_against_dataset(cfg, 500)  # 1e-3 < 1/500


def test_bad_yaml_missing_file_and_non_mapping(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("method: dpsgd\nmix: {aug_multiplicity: 1\n")
    with pytest.raises(ConfigError, match=r"invalid YAML at line \d+"):
        load_train_config(bad)
    with pytest.raises(ConfigError, match="not found"):
        load_train_config(tmp_path / "nope.yaml")
    lst = tmp_path / "list.yaml"
    lst.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_train_config(lst)


def test_sweep_config_validation(tmp_path):
    base = tmp_path / "base.yaml"
    base.write_text("method: dpsgd\nmix: {aug_multiplicity: 1, self_mix: 0}\n")
    sweep = tmp_path / "s.yaml"
    sweep.write_text("base: base.yaml\nepsilons: [1, 2]\nspace:\n  optim.lr: {loguniform: [0.1, 8]}\n")
    cfg = load_sweep_config(sweep)
    assert cfg.base.method == "dpsgd" and cfg.name == "s"
    for override, pattern in [
        ("space={optim.lrr: {uniform: [0, 1]}}", r"unknown config path 'optim\.lrr'"),
        ("space={optim.lr: {uniform: [2, 1]}}", r"empty or inverted range"),
        ("space={optim.lr: {loguniform: [0, 1]}}", r"low > 0"),
        ("space={privacy.noise_multiplier: {uniform: [1, 2]}, optim.epochs: {uniform: [1, 2]}}", r"at most one"),
        ("epsilons=[1, -2]", r"epsilon must be > 0"),
        ("search.trials_per_epsilon=0", r"search\.trials_per_epsilon"),
        ("base={privacy: {neighbouring: replace_one}}", r"privacy: neighbouring: replace_one needs accountant: pld"),
    ]:
        with pytest.raises(ConfigError, match=pattern):
            load_sweep_config(sweep, [override])


def test_synth_section_and_prompt_template(tmp_path):
    f = tmp_path / "t.yaml"
    f.write_text("synth: {model: tiny-random, images_per_class: 3}\n")
    assert load_synth_config(f).images_per_class == 3
    with pytest.raises(ConfigError, match=r"prompt.*\{label\}"):
        load_synth_config(f, ["synth.prompt=a photo"])
    with pytest.raises(ConfigError, match=r"images_per_class"):
        load_synth_config(f, ["synth.images_per_class=0"])


def test_with_updates_revalidates():
    cfg = load_train_config(None)
    assert with_updates(cfg, {"mix.self_mix": 0}).mix.self_mix == 0
    with pytest.raises(ConfigError):
        with_updates(cfg, {"mix.aug_multiplicity": 1})


def test_replace_one_is_refused_with_repeat_and_select(tmp_path):
    sweep = tmp_path / "s.yaml"
    sweep.write_text("base: {privacy: {neighbouring: replace_one, accountant: pld}}\nepsilons: [1]\n")
    assert load_sweep_config(sweep).base.privacy.neighbouring == "replace_one"
    with pytest.raises(ConfigError, match=r"repeat_and_select needs base\.privacy\.neighbouring: zero_out") as e:
        load_sweep_config(sweep, ["tuning_privacy=repeat_and_select"])
    assert "\n" not in str(e.value)
