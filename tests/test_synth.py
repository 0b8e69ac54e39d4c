"""Synthetic sets: Ray Data generation with the tiny random SD pipeline on CPU, read back with plain
pyarrow, 1-vs-2-worker byte identity, cache hit without a model load, resume, repair, refusals."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
import yaml

from dpmix_ray.config import DataConfig, SynthConfig, load_data_config, load_synth_config
from dpmix_ray.data import images_to_table
from dpmix_ray.errors import ConfigError, DataError
from dpmix_ray.synth import provenance
from dpmix_ray.synth import sets as gen
from dpmix_ray.synth import load_synthetic, resolve_synthetic, save_grid
from dpmix_ray.synth.pipelines import resolve_model, to_uint8

CLASSES = ["cat", "dog"]
# 2 classes × 6 images in shards of 4: 3 shards, the last one short.
TINY = dict(model="tiny-random", classes=CLASSES, images_per_class=6, image_size=8, channels=1, steps=2, batch_size=4)
# The dataset's classes, one image each, in two shards of 5.
DIGITS = [str(i) for i in range(10)]
BARE = dict(model="tiny-random", images_per_class=1, image_size=8, channels=1, steps=2, batch_size=5, workers=1)


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory):
    """A private model cache (DPMIX_CACHE) and an offline hub for the module."""
    root = tmp_path_factory.mktemp("synth")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DPMIX_CACHE", str(root / "cache"))
        mp.setenv("RAY_AUTH_MODE", "disabled")
        mp.setenv("HF_HUB_OFFLINE", "1")
        yield root


@pytest.fixture(scope="module")
def ray_session(env: Path):
    """One Ray session for every generating test of the module (generate() reuses it)."""
    import ray

    ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING", log_to_driver=False)
    yield env
    ray.shutdown()


@pytest.fixture(scope="module")
def two_workers(ray_session: Path) -> Path:
    return gen.generate(SynthConfig(**TINY, workers=2, out=str(ray_session / "w2")), progress=False)


def _files(path: Path) -> dict[str, bytes]:
    return {f.name: f.read_bytes() for f in sorted(path.glob("shard-*.parquet"))}


def _no_model(*_args, **_kwargs):
    raise AssertionError("the model was loaded or Ray was run")


# --------------------------------------------------------------------------- pure pieces


def test_plan_is_fixed_shards_with_per_row_seeds() -> None:
    plan = gen.Plan(("a", "b", "c"), 5, 4, seed=0)
    assert plan.num_shards == 4 and [plan.shard_rows(s) for s in range(4)] == [4, 4, 4, 3]
    rows = [plan.table(s) for s in range(plan.num_shards)]
    assert sum(t.num_rows for t in rows) == 15
    assert np.concatenate([plan.labels(s) for s in range(4)]).tolist() == [0] * 5 + [1] * 5 + [2] * 5
    seeds = np.concatenate([t.column("seed").to_numpy() for t in rows])
    assert len(set(seeds.tolist())) == 15 and (seeds >= 0).all()
    # a seed depends on (seed, class name, index) only, not on the shard layout
    other = gen.Plan(("a", "b", "c"), 5, 7, seed=0)
    assert np.array_equal(np.concatenate([other.table(s).column("seed").to_numpy() for s in range(other.num_shards)]), seeds)
    assert gen.row_seed(0, "a", 0) != gen.row_seed(1, "a", 0)


def test_to_uint8_resizes_and_converts_channels() -> None:
    rgb = torch.rand(2, 3, 32, 32)
    grey = to_uint8(rgb, image_size=28, channels=1)
    assert grey.shape == (2, 1, 28, 28) and grey.dtype == np.uint8
    assert to_uint8(torch.rand(2, 1, 8, 8), image_size=28, channels=3).shape == (2, 3, 28, 28)
    ones = to_uint8(torch.ones(1, 3, 8, 8), image_size=8, channels=1)
    assert (ones == 255).all()


def test_import_does_not_import_ray() -> None:
    code = "import sys, dpmix_ray.synth; assert 'ray' not in sys.modules, 'ray imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_cache_key_ignores_workers_and_out() -> None:
    a = SynthConfig(**TINY, workers=1, out="x")
    b = SynthConfig(**TINY, workers=2, out="y")
    assert gen.set_key(a, CLASSES) == gen.set_key(b, CLASSES)
    assert gen.set_key(a, CLASSES) != gen.set_key(SynthConfig(**TINY | {"seed": 1}), CLASSES)
    assert gen.set_key(a, CLASSES) != gen.set_key(SynthConfig(**TINY, gpus_per_worker=0.5), CLASSES)


def test_classes_come_from_config_or_dataset() -> None:
    cfg = SynthConfig(**TINY | {"classes": None})
    with pytest.raises(ConfigError, match="synth.classes"):
        gen.generate(cfg, progress=False)
    with pytest.raises(ConfigError, match="differ"):
        gen.generate(SynthConfig(**TINY), class_names=["cat", "bird"], progress=False)
    assert gen._classes(SynthConfig(model="digits-ddpm"), None) == [str(i) for i in range(10)]


def test_model_not_found_is_one_line(env: Path) -> None:
    with pytest.raises(DataError, match="not a built-in") as e:
        resolve_model("no-such-org/no-such-model")
    assert "\n" not in str(e.value)
    with pytest.raises(DataError, match="not a built-in"):
        resolve_model("./no/such/dir")
    empty = env / "empty-model"
    empty.mkdir()
    with pytest.raises(DataError, match="model_index.json"):
        resolve_model(str(empty))


def test_corrupt_or_foreign_parquet_is_refused(tmp_path: Path) -> None:
    bad = tmp_path / "bad.parquet"
    bad.write_bytes(b"PAR1 this is not parquet")
    with pytest.raises(DataError, match="Parquet"):
        load_synthetic(bad, class_names=CLASSES, channels=1, image_size=8)
    good = tmp_path / "good.parquet"
    pq.write_table(images_to_table(np.zeros((4, 1, 8, 8), np.uint8), np.array([0, 1, 0, 1]), ["cat", "bird"]), good)
    with pytest.raises(DataError, match="classes don't match.*bird"):
        load_synthetic(good, class_names=CLASSES, channels=1, image_size=8)
    with pytest.raises(DataError, match="1×8×8 but the dataset's are 3×8×8"):
        load_synthetic(good, class_names=["cat", "bird"], channels=3, image_size=8)


# --------------------------------------------------------------------------- Ray Data generation
# Each test below runs (or reuses) Ray Data generation: ~10-30 s apiece on two cores, hence slow.


@pytest.mark.slow
def test_two_workers_write_a_set_plain_pyarrow_reads(two_workers: Path) -> None:
    table = pq.read_table(two_workers)  # plain pyarrow, the manifest is skipped
    assert table.num_rows == 12 and table.column_names == ["image", "label", "label_name"]
    assert sorted(p.name for p in two_workers.iterdir()) == ["_manifest.json", *[gen.shard_name(s) for s in range(3)]]
    manifest = gen.read_manifest(two_workers)
    assert manifest["counts"] == {"cat": 6, "dog": 6} and manifest["prompts"]["dog"] == "a photo of a dog"
    assert manifest["model"]["id"] == "tiny-random" and manifest["model"]["source"] == "builtin"
    assert manifest["provenance"] == {"trained_on": [], "declared_by": ["built-in tiny-random"], "image_sample": None}
    assert [s["rows"] for s in manifest["shards"]] == [4, 4, 4]
    assert not two_workers.with_name(two_workers.name + ".partial").exists()
    s = load_synthetic(two_workers, class_names=["dog", "cat"], channels=1, image_size=8)  # mapped by name
    assert s.x.shape == (12, 1, 8, 8) and s.y.tolist() == [1] * 6 + [0] * 6
    assert 0.0 <= s.x.min() and s.x.max() <= 1.0 and s.x.std() > 0


@pytest.mark.slow
def test_one_worker_is_byte_identical_and_cache_hit_loads_nothing(env: Path, two_workers: Path, monkeypatch) -> None:
    one = gen.generate(SynthConfig(**TINY, workers=1, out=str(env / "w1")), progress=False)
    assert _files(one) == _files(two_workers) and len(_files(one)) == 3
    before = {f: f.stat().st_mtime_ns for f in one.iterdir()}
    monkeypatch.setattr(gen, "resolve_model", _no_model)
    monkeypatch.setattr(gen, "_run_ray", _no_model)
    assert gen.generate(SynthConfig(**TINY, workers=2, out=str(one)), progress=False) == one
    assert {f: f.stat().st_mtime_ns for f in one.iterdir()} == before


@pytest.mark.slow
def test_other_config_in_out_is_refused(two_workers: Path, monkeypatch) -> None:
    monkeypatch.setattr(gen, "_run_ray", _no_model)
    with pytest.raises(DataError, match="holds a different synthetic set"):
        gen.generate(SynthConfig(**TINY | {"seed": 7}, out=str(two_workers)), progress=False)
    assert not two_workers.with_name(two_workers.name + ".partial").exists()
    foreign = two_workers.parent / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(DataError, match="not a synthetic set"):
        gen.generate(SynthConfig(**TINY, out=str(foreign)), progress=False)


def shards_generated(monkeypatch) -> list[list[int]]:
    """Spy on the Ray step: the list of shard indices each generate() call asked Ray to make."""
    asked: list[list[int]] = []
    real = gen._run_ray

    def spy(spec, cfg, plan, shards, work, progress):
        asked.append(list(shards))
        return real(spec, cfg, plan, shards, work, progress)

    monkeypatch.setattr(gen, "_run_ray", spy)
    return asked


@pytest.mark.slow
def test_interrupted_run_resumes_only_missing_shards(env: Path, two_workers: Path, monkeypatch) -> None:
    out = env / "resumed"
    cfg = SynthConfig(**TINY, workers=2, out=str(out))
    # What a run killed mid-write leaves in <out>.partial (the layout _run_ray writes, checked by hand
    # against a real kill): its plan, shard 0 complete, shard 2 torn half-way.
    work = out.with_name("resumed.partial")
    done, torn = work / "incoming-1a2b3c4d" / "shard=0", work / "incoming-1a2b3c4d" / "shard=2"
    done.mkdir(parents=True)
    torn.mkdir(parents=True)
    shutil.copy(two_workers / gen.shard_name(0), done / "9f8e_000000_000000-0.parquet")
    (torn / "9f8e_000002_000000-0.parquet").write_bytes((two_workers / gen.shard_name(2)).read_bytes()[:300])
    (work / gen.PLAN).write_text(f'{{"config_hash": "{gen.set_key(cfg, CLASSES)}"}}')
    with pytest.raises(DataError, match="no such file"):
        load_synthetic(out, class_names=CLASSES, channels=1, image_size=8)  # nothing published yet

    asked = shards_generated(monkeypatch)
    assert gen.generate(cfg, progress=False) == out
    assert asked == [[1, 2]]
    assert _files(out) == _files(two_workers) and not work.exists()


@pytest.mark.slow
def test_concurrent_generates_on_one_out_take_turns(env: Path, two_workers: Path, monkeypatch) -> None:
    """Two generate() calls on one out (two trials, two shells): one makes the set while the other
    waits on its lock, then reuses it. Ray is stood in for by copying the finished shards slowly."""
    import threading
    import time

    asked: list[list[int]] = []

    def slow_ray(spec, cfg, plan, shards, work, progress):
        asked.append(list(shards))
        time.sleep(0.5)  # long enough for the other call to reach the lock
        for s in shards:
            shutil.copy(two_workers / gen.shard_name(s), work / gen.shard_name(s))

    monkeypatch.setattr(gen, "_run_ray", slow_ray)
    results: list[Path | BaseException] = []

    def call(out: Path) -> None:
        try:
            results.append(gen.generate(SynthConfig(**TINY, workers=2, out=str(out)), progress=False))
        except BaseException as e:  # noqa: BLE001 - reported by the assertions below
            results.append(e)

    held = env / "held"
    with gen._exclusive(held, progress=False):  # while it is held, a call waits and starts nothing
        waiting = threading.Thread(target=call, args=(held,))
        waiting.start()
        waiting.join(0.5)
        assert waiting.is_alive() and not held.exists() and not asked
    waiting.join(30)
    assert results == [held] and asked == [[0, 1, 2]]

    raced = env / "raced"
    threads = [threading.Thread(target=call, args=(raced,)) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert results[1:] == [raced, raced] and asked == [[0, 1, 2], [0, 1, 2]]  # made once, then reused
    for out in (held, raced):
        assert _files(out) == _files(two_workers) and not out.with_name(out.name + ".partial").exists()


@pytest.mark.slow
def test_corrupt_set_is_refused_then_repaired(env: Path, two_workers: Path, monkeypatch) -> None:
    out = env / "repaired"
    shutil.copytree(two_workers, out)
    shard = out / gen.shard_name(1)
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(DataError, match="corrupt.*shard-00001"):
        load_synthetic(out, class_names=CLASSES, channels=1, image_size=8)
    asked = shards_generated(monkeypatch)
    assert gen.generate(SynthConfig(**TINY, out=str(out)), progress=False) == out
    assert asked == [[1]] and _files(out) == _files(two_workers)
    load_synthetic(out, class_names=CLASSES, channels=1, image_size=8)


@pytest.mark.slow
def test_resolve_synthetic_and_grid(env: Path, two_workers: Path, monkeypatch) -> None:
    monkeypatch.setattr(gen, "_run_ray", _no_model)
    cfg = SynthConfig(**TINY, out=str(two_workers))
    gate = {"private": "cifar10", "is_public": False}
    s = resolve_synthetic("synth", cfg, class_names=CLASSES, channels=1, image_size=8, **gate)
    assert len(s) == 12
    assert len(resolve_synthetic(str(two_workers), None, class_names=CLASSES, channels=1, image_size=8, **gate)) == 12
    with pytest.raises(ConfigError, match="synth.image_size"):
        resolve_synthetic("synth", cfg, class_names=CLASSES, channels=1, image_size=28, **gate)
    with pytest.raises(DataError, match="1×8×8 but the dataset's are 3×8×8"):
        load_synthetic(two_workers, class_names=CLASSES, channels=3, image_size=8)
    with pytest.raises(DataError, match="only in the dataset: \\['bird'\\]"):
        load_synthetic(two_workers, class_names=[*CLASSES, "bird"], channels=1, image_size=8)
    png = env / "grid.png"
    save_grid(two_workers, png, per_class=3)
    from PIL import Image

    with Image.open(png) as img:  # 2 rows × 3 columns of 8 px cells with 2 px gaps, upscaled ×7
        assert img.size == ((3 * 10 + 2) * 7, (2 * 10 + 2) * 7)


@pytest.mark.slow
def test_synth_cli_with_a_data_section_runs_on_ray(ray_session: Path, tmp_path: Path) -> None:
    """Issue 11's config end to end through Ray Data: classes from data, provenance in the manifest."""
    from dpmix_ray import cli

    cfg = tmp_path / "synth.yaml"
    cfg.write_text(yaml.safe_dump({"data": {"name": "digits"}, "synth": BARE | {"workers": 2, "out": str(tmp_path / "set")}}))
    assert cli.main(["synth", str(cfg), "--json"]) == 0
    manifest = gen.read_manifest(tmp_path / "set")
    assert manifest["classes"] == DIGITS and [s["rows"] for s in manifest["shards"]] == [5, 5]
    assert manifest["provenance"] == {"trained_on": [], "declared_by": ["built-in tiny-random"], "image_sample": None}


def test_class_conditional_model_samples_and_refuses_unknown_classes(env: Path) -> None:
    from dpmix_ray.synth.digits_ddpm import ClassConditional, train

    model = env / "cc-model"
    train(model, steps=2, progress=False)
    spec = resolve_model(str(model))
    assert spec.kind == "class-conditional" and spec.classes == tuple(str(i) for i in range(10))
    source = ClassConditional(spec.path, class_names=["3", "7"], steps=2, guidance=2.0, device="cpu")
    a = source([0, 1], [11, 12])
    assert a.shape == (2, 1, 8, 8) and torch.equal(a, source([0, 1], [11, 12]))
    with pytest.raises(DataError, match="only knows classes"):
        ClassConditional(spec.path, class_names=["cat"], steps=2, guidance=2.0, device="cpu")


def test_local_model_without_safetensors_is_refused(env: Path) -> None:
    from dpmix_ray.synth.pipelines import TextToImage, build_tiny_random

    pickled = env / "pickled-model"
    build_tiny_random().save_pretrained(pickled, safe_serialization=False)  # UNet and VAE as .bin pickles
    assert list(pickled.rglob("*.bin"))
    spec = resolve_model(str(pickled))
    with pytest.raises(DataError, match="cannot load .* as safetensors"):
        TextToImage(spec, class_names=CLASSES, prompt="a {label}", steps=1, guidance=1.0, device="cpu")


# --------------------------------------------------------------------------- provenance
# Generation below runs the real model through ShardGenerator without Ray (``_bare``), so each test
# takes a few seconds; the Ray path is the same code and is covered by the slow tests above.



def _bare(spec, cfg, plan, shards, work, progress) -> None:
    """``_run_ray`` without Ray: the same ShardGenerator per shard, written with plain pyarrow."""
    make = gen.ShardGenerator(
        spec, classes=list(plan.classes), prompt=cfg.prompt, steps=cfg.steps, guidance=gen.guidance_of(cfg, spec),
        image_size=cfg.image_size, channels=cfg.channels, device="cpu", threads=1, plan=plan,
    )
    for s in shards:
        pq.write_table(make(plan.table(s)).drop_columns(["shard"]), work / gen.shard_name(s))


@pytest.fixture
def bare(env: Path, monkeypatch) -> Path:
    monkeypatch.setattr(gen, "_run_ray", _bare)
    return env


def _one_line(e: pytest.ExceptionInfo, *needles: str) -> None:
    assert "\n" not in str(e.value)
    for needle in needles:
        assert needle in str(e.value), str(e.value)


def test_set_key_of_existing_configs_is_unchanged() -> None:
    """Adding synth.trained_on must not re-key (and regenerate or refuse) sets made before it existed."""
    assert gen.set_key(SynthConfig(**TINY), CLASSES) == "926f44827c51c586"
    assert gen.set_key(SynthConfig(), DIGITS) == "95dd469b3d0fb071"
    assert gen.set_key(SynthConfig(**TINY, trained_on=["cifar10"]), CLASSES) != "926f44827c51c586"


@pytest.mark.parametrize(
    ("a", "b", "same"),
    [
        ("digits", "digits", True), ("sklearn-digits", "digits", True), ("optdigits", "digits", True),
        ("digits", "mnist5k", False), ("mnist", "mnist5k", True), ("ylecun/MNIST", "mnist5k", True),
        ("emnist", "mnist5k", True), ("CIFAR-10", "cifar10", True), ("cifar100", "cifar10", False),
        ("uoft-cs/cifar10", "cifar10", True), ("80M Tiny Images", "cifar100", True), ("laion/laion2B-en", "cifar10", False),
        ("npz:/d/x.npz", "npz:/d/x.npz", True), ("imagefolder:/d", "parquet:/d/sub/x.parquet", True),
        ("npz:/d/x.npz", "npz:/d/y.npz", False), ("npz:/d/mnist.npz", "mnist", False),
    ],
)
def test_same_data_is_decided_on_collections_and_paths(a: str, b: str, same: bool) -> None:
    assert provenance.same_data(a, b) is same and provenance.same_data(b, a) is same


def test_provenance_of_built_ins_cards_and_declarations(env: Path, monkeypatch) -> None:
    from dpmix_ray.synth.digits_ddpm import train

    assert provenance.of_model(SynthConfig(model="tiny-random"), None).to_json() == {"trained_on": [], "declared_by": ["built-in tiny-random"], "image_sample": None}
    assert provenance.of_model(SynthConfig(model="digits-ddpm"), None).trained_on == ("sklearn-digits",)
    plain = env / "plain-model"
    plain.mkdir(exist_ok=True)
    assert provenance.of_model(SynthConfig(model=str(plain)), plain) == provenance.Provenance(None)
    (plain / "README.md").write_text("---\nlicense: mit\ndatasets:\n- laion/laion2B-en\n- ylecun/mnist\n---\n# A model\n")
    card = provenance.of_model(SynthConfig(model=str(plain)), plain)
    assert card.trained_on == ("laion/laion2B-en", "ylecun/mnist") and card.declared_by == ("model card (README.md datasets)",)
    monkeypatch.chdir(env)
    both = provenance.of_model(SynthConfig(model=str(plain), trained_on=["npz:pub.npz", "laion/laion2B-en"]), plain)
    assert both.trained_on == ("laion/laion2B-en", f"npz:{env / 'pub.npz'}", "ylecun/mnist"), "a union, paths made absolute"
    assert both.declared_by == ("model card (README.md datasets)", "synth.trained_on")
    cc = env / "cc-card"
    train(cc, steps=1, progress=False)
    assert provenance.of_model(SynthConfig(model=str(cc)), cc).trained_on == ("sklearn-digits",), "digits-ddpm's own file says so"


def test_check_public_refuses_seen_and_unvouched_sets() -> None:
    digits_ddpm = provenance.of_model(SynthConfig(model="digits-ddpm"), None)
    for vouched in (False, True):  # the flag never overrides a recorded overlap
        with pytest.raises(ConfigError) as e:
            provenance.check_public(digits_ddpm, private="digits", is_public=vouched, where="s")
        _one_line(e, "mix.synthetic:", "sklearn-digits", "data.name: digits")
    provenance.check_public(digits_ddpm, private="mnist5k", is_public=False, where="s")
    for unknown in (None, provenance.Provenance(None)):
        with pytest.raises(ConfigError) as e:
            provenance.check_public(unknown, private="digits", is_public=False, where="s")
        _one_line(e, "mix.synthetic_is_public: true")
        provenance.check_public(unknown, private="digits", is_public=True, where="s")


def _copy_images(x: torch.Tensor, path: Path) -> str:
    """``x`` written as a new npz file: the same images under another name and path."""
    from dpmix_ray.data import write_labelled_images

    write_labelled_images(path, (x * 255).round().to(torch.uint8), np.zeros(len(x), dtype=np.int64), ["a"])
    return f"npz:{path}"


def test_a_generator_trained_on_a_renamed_copy_of_the_private_images_is_refused(tmp_path: Path) -> None:
    from dpmix_ray.data import all_images

    private = all_images(DataConfig(name="digits"))
    copy = _copy_images(private[::3], tmp_path / "renamed" / "public_scans.npz")  # a third of them, another name
    prov = provenance.of_model(SynthConfig(model="tiny-random", trained_on=[copy]), None)
    assert prov.image_sample is not None and not provenance.same_data(copy, "digits"), "names alone cannot tell"
    for vouched in (False, True):
        with pytest.raises(ConfigError) as e:
            provenance.check_public(prov, private="digits", is_public=vouched, where="s", private_images=private)
        _one_line(e, "mix.synthetic:", "identical to private ones", "whatever their name or path")
    back = provenance.Provenance.from_json(json.loads(json.dumps(prov.to_json())))
    with pytest.raises(ConfigError, match="identical to private ones"):  # as a manifest records it
        provenance.check_public(back, private="npz:/elsewhere/private.npz", is_public=False, where="s", private_images=private)
    unrelated = _copy_images(torch.rand(300, 1, 8, 8, generator=torch.Generator().manual_seed(0)), tmp_path / "noise.npz")
    other = provenance.of_model(SynthConfig(model="tiny-random", trained_on=[unrelated]), None)
    provenance.check_public(other, private="digits", is_public=False, where="s", private_images=private)


def test_manifest_records_provenance_deterministically(bare: Path) -> None:
    paths = [gen.generate(SynthConfig(**BARE, out=str(bare / f"prov{i}")), class_names=DIGITS, progress=False) for i in (1, 2)]
    blocks = [gen.read_manifest(p)["provenance"] for p in paths]
    assert blocks[0] == blocks[1] == {"trained_on": [], "declared_by": ["built-in tiny-random"], "image_sample": None}
    assert gen.read_provenance(paths[0]) == provenance.Provenance((), ("built-in tiny-random",))
    s = resolve_synthetic(str(paths[0]), None, class_names=DIGITS, channels=1, image_size=8, private="digits", is_public=False)
    assert len(s) == 10


def test_set_made_before_provenance_gets_it_on_reuse(bare: Path, monkeypatch) -> None:
    cfg = SynthConfig(**BARE, out=str(bare / "old"))
    out = gen.generate(cfg, class_names=DIGITS, progress=False)
    manifest = gen.read_manifest(out)
    del manifest["provenance"]
    (out / gen.MANIFEST).write_text(json.dumps(manifest))
    assert gen.read_provenance(out) is None
    monkeypatch.setattr(gen, "_run_ray", _no_model)
    assert gen.generate(cfg, class_names=DIGITS, progress=False) == out
    assert gen.read_provenance(out) == provenance.Provenance((), ("built-in tiny-random",))


def _tiny_copy(where: Path, card: str | None = None) -> Path:
    """A local copy of the tiny-random pipeline (no built-in record), optionally with a model card."""
    from dpmix_ray.synth.pipelines import ensure_tiny_random

    if not where.exists():
        shutil.copytree(ensure_tiny_random(), where)
    if card is not None:
        (where / "README.md").write_text(card)
    return where


def test_training_refuses_a_set_whose_generator_saw_the_private_data(bare: Path, monkeypatch) -> None:
    from dpmix_ray import trainer
    from dpmix_ray.config import load_train_config

    steps = []
    cfg = load_train_config(None, [
        "data.name=digits", "method=dpmix_diff", "mix.aug_multiplicity=2", "mix.self_mix=1", "mix.diff_mix=1",
        "mix.synthetic=synth", "mix.synthetic_is_public=true", "synth.model=digits-ddpm", "synth.image_size=8",
        f"synth.out={bare / 'never'}",
    ])
    with monkeypatch.context() as mp, pytest.raises(ConfigError) as e:
        mp.setattr(gen, "resolve_model", _no_model)  # digits-ddpm is neither trained nor loaded
        trainer.train(cfg, progress=False, on_epoch=steps.append)
    _one_line(e, "synth.model", "built-in digits-ddpm", "data.name: digits")
    assert not steps and not (bare / "never").exists()

    # A local model whose card declares the private data: refused after reading the card, before any image.
    monkeypatch.setattr(gen, "_run_ray", _no_model)
    model = _tiny_copy(bare / "card-mnist", "---\ndatasets: [ylecun/mnist]\n---\n")
    with pytest.raises(ConfigError, match="ylecun/mnist .*data.name: mnist5k"):
        gen.generate_for(SynthConfig(**BARE | {"model": str(model), "out": str(bare / "no")}), DataConfig(name="mnist5k"))
    assert not list(bare.glob("no*")), "nothing written"


def test_a_set_without_provenance_needs_synthetic_is_public(bare: Path, tmp_path: Path) -> None:
    from dpmix_ray import trainer
    from dpmix_ray.config import load_train_config
    from dpmix_ray.data import write_labelled_images

    write_labelled_images(tmp_path / "pub.npz", np.zeros((10, 1, 8, 8), np.uint8), np.arange(10), DIGITS)
    args = ["data.name=digits", "method=dpmix_diff", "mix.aug_multiplicity=2", "mix.self_mix=1", "mix.diff_mix=1",
            f"mix.synthetic={tmp_path / 'pub.npz'}", "optim.batch_size=64", "optim.epochs=0.1", "privacy.epsilon=8"]
    steps = []
    with pytest.raises(ConfigError) as e:
        trainer.train(load_train_config(None, args), progress=False, on_epoch=steps.append)
    _one_line(e, "mix.synthetic_is_public: true", "pub.npz")
    assert not steps
    assert trainer.train(load_train_config(None, [*args, "mix.synthetic_is_public=true"]), progress=False)["diff_mix"] == 1

    # A generated set whose local model declares nothing records trained_on: null, and is gated the same way.
    cfg = SynthConfig(**BARE | {"model": str(_tiny_copy(bare / "no-card")), "out": str(bare / "unknown")})
    with pytest.raises(ConfigError, match="mix.synthetic_is_public"):
        gen.generate_for(cfg, DataConfig(name="digits"), synthetic_is_public=False, progress=False)
    assert gen.read_manifest(bare / "unknown")["provenance"] == {"trained_on": None, "declared_by": [], "image_sample": None}
    assert gen.generate_for(cfg, DataConfig(name="digits"), synthetic_is_public=True, progress=False) == bare / "unknown"
    declared = cfg.model_copy(update={"trained_on": ["laion/laion2B-en"], "out": str(bare / "declared")})
    out = gen.generate_for(declared, DataConfig(name="digits"), synthetic_is_public=False, progress=False)
    assert gen.read_provenance(out) == provenance.Provenance(("laion/laion2B-en",), ("synth.trained_on",))


# --------------------------------------------------------------------------- class names from the data section


def test_synth_cli_takes_classes_from_the_data_section(bare: Path, tmp_path: Path, capsys) -> None:
    """Issue 11: ``data: {name: digits}``, ``model: tiny-random`` and no synth.classes was refused."""
    from dpmix_ray import cli

    synth = {**BARE, "out": str(tmp_path / "set")}
    cfg = tmp_path / "synth.yaml"
    cfg.write_text(yaml.safe_dump({"data": {"name": "digits"}, "synth": synth}))
    assert cli.main(["synth", str(cfg), "--json"]) == 0
    assert gen.read_manifest(tmp_path / "set")["classes"] == DIGITS
    assert cli.main(["synth", str(cfg), "--json", "--set", "synth.model=digits-ddpm"]) == 2  # digits-ddpm saw digits
    assert "synth.model" in capsys.readouterr().err

    # A sweep config: synth and data under its base (inline, or a train config file it points to).
    sweep = tmp_path / "sweep.yaml"
    sweep.write_text(yaml.safe_dump({"base": {"data": {"name": "digits"}, "synth": synth | {"images_per_class": 2}}}))
    assert load_synth_config(sweep).images_per_class == 2 and load_data_config(sweep) == DataConfig(name="digits")
    (tmp_path / "base.yaml").write_text(yaml.safe_dump({"data": {"name": "mnist5k"}}))
    sweep.write_text(yaml.safe_dump({"base": "base.yaml", "synth": synth}))
    assert load_data_config(sweep) == DataConfig(name="mnist5k") and load_synth_config(sweep).model == "tiny-random"
    assert load_data_config(sweep, ["base=null"]) is None
