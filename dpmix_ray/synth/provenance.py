"""What a synthetic set's generator was trained on, and whether that includes the private data.

DP-Mix_Diff keeps plain DP-SGD's accounting only if the synthetic images carry no information about
the private data, that is, if their generator never saw it. A set's manifest therefore records its
generator's training data (``provenance``), the union of every declaration there is:

* a built-in's own record: ``tiny-random`` was never trained, ``digits-ddpm`` saw scikit-learn's digits;
* the model's card, read offline from its directory: ``datasets:`` in the front matter of
  ``README.md`` (the Hugging Face model-card field) or ``trained_on`` in ``dpmix_model.json``;
* the user's ``synth.trained_on``.

With none of them, the training data is unknown (``trained_on: null``), and training then needs the
user's explicit ``mix.synthetic_is_public: true``. A known overlap with the private data is refused
whatever that flag says.

"The same data" is decided on image collections, not on names: each name stands for the collections
it holds images of (:data:`_HOLDS`), so ``mnist5k`` meets ``mnist`` and ``emnist`` but not ``digits``
(scikit-learn's UCI scans), and ``optdigits`` meets ``digits``. Names are compared case-, punctuation-
and hub-organisation-blind (``ylecun/MNIST`` is ``mnist``). File and folder sources
(``npz:``/``parquet:``/``imagefolder:`` names) are known only by their resolved path: the same path,
or one inside the other, is the same data.

Names and paths miss a copy of the private images under another name or path. So where a declared
training source is readable here (any ``data.name`` this package loads: ``npz:``/``parquet:``/
``imagefolder:`` files, ``digits``, ``mnist5k``, …), the manifest also records a content sample: the
BLAKE2b hashes of its images' pixels (:func:`dpmix_ray.data.content_hashes`) in residue class 0
modulo ``every`` (all of them up to :data:`SAMPLE_SIZE` images). The same rule applied to the
private images finds any shared image whose hash was sampled, whatever either side is called.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

import torch

from dpmix_ray.config import DataConfig, SynthConfig
from dpmix_ray.data import all_images, content_hashes
from dpmix_ray.errors import ConfigError, DPMixError
from dpmix_ray.synth.pipelines import CLASS_CONDITIONAL_FILE, DIGITS_DDPM, TINY_RANDOM

SAMPLE_SIZE = 4096  # content hashes recorded per set, about: a manifest stays small for CIFAR-sized data
BUILTIN_TRAINED_ON: dict[str, tuple[str, ...]] = {TINY_RANDOM: (), DIGITS_DDPM: ("sklearn-digits",)}
_PATH_PREFIXES = ("imagefolder", "parquet", "npz")  # data.name prefixes that name a file or folder

# A normalised name → the image collections it holds. Two names are the same data when these meet.
_HOLDS: dict[str, frozenset[str]] = {
    name: frozenset(held)
    for names, held in [
        (("digits", "sklearndigits"), {"sklearn-digits"}),
        (("optdigits", "ucioptdigits"), {"optdigits", "sklearn-digits"}),  # sklearn's digits are its test set
        (("mnist", "mnist5k"), {"mnist"}),
        (("qmnist",), {"qmnist", "mnist"}),  # rebuilds all of MNIST from the NIST originals
        (("emnist",), {"emnist", "mnist"}),  # re-cuts NIST SD-19, whose forms MNIST was cut from
        (("cifar10",), {"cifar10"}),
        (("cifar100",), {"cifar100"}),
        (("cinic10",), {"cinic10", "cifar10"}),  # holds all of CIFAR-10
        (("tinyimages", "80mtinyimages", "80milliontinyimages"), {"tiny-images", "cifar10", "cifar100"}),
        (("svhn",), {"svhn"}),
        (("eurosat",), {"eurosat"}),
    ]
    for name in names
}


@dataclass(frozen=True)
class Provenance:
    """A generator's training data (``None``: nobody declared it) and who declared it."""

    trained_on: tuple[str, ...] | None
    declared_by: tuple[str, ...] = ()
    every: int = 1
    image_sample: tuple[str, ...] | None = None  # None: no declared training source was readable here

    def to_json(self) -> dict[str, Any]:
        sample = None if self.image_sample is None else {"every": self.every, "hashes": list(self.image_sample)}
        return {"trained_on": None if self.trained_on is None else list(self.trained_on), "declared_by": list(self.declared_by),
                "image_sample": sample}

    @classmethod
    def from_json(cls, obj: object) -> Provenance | None:
        """A manifest's ``provenance`` block; None when it is absent or malformed (treated as unknown)."""
        if not isinstance(obj, dict):
            return None
        names, by, sample = obj.get("trained_on"), obj.get("declared_by") or [], obj.get("image_sample")
        if not (_is_names(names) and _is_names(by)):
            return None
        if not (isinstance(sample, dict) and isinstance(sample.get("every"), int) and _is_names(sample.get("hashes"))):
            return cls(None if names is None else tuple(names), tuple(by))
        return cls(None if names is None else tuple(names), tuple(by), sample["every"], tuple(sample["hashes"]))


def _sampled(hashes: Iterable[str], every: int) -> set[str]:
    """The content-defined sample: hashes in residue class 0 modulo ``every`` (the same rule on both sides)."""
    return {h for h in hashes if int(h[:8], 16) % every == 0}


def _readable_hashes(names: Iterable[str]) -> list[str] | None:
    """Content hashes of every declared source this package can load here; None when none can be."""
    hashes: list[str] | None = None
    for name in names:
        try:
            x = all_images(DataConfig(name=name))
        except (DPMixError, OSError, ValueError):
            continue  # a hub dataset or a name nobody here can read: only its name is recorded
        hashes = (hashes or []) + content_hashes(x)
    return hashes


def content_sample(names: Iterable[str]) -> tuple[int, tuple[str, ...] | None]:
    """(every, sampled hashes) of the declared sources readable here; (1, None) when none is."""
    hashes = _readable_hashes(names)
    if hashes is None:
        return 1, None
    every = max(1, math.ceil(len(hashes) / SAMPLE_SIZE))
    return every, tuple(sorted(_sampled(hashes, every)))


def _is_names(value: object) -> bool:
    return value is None or (isinstance(value, list) and all(isinstance(v, str) for v in value))


def _path_of(name: str) -> Path | None:
    prefix, sep, rest = name.partition(":")
    return Path(rest).expanduser().resolve() if sep and prefix in _PATH_PREFIXES and rest else None


def _holds(name: str) -> frozenset[str]:
    key = re.sub(r"[^a-z0-9]", "", name.lower().rsplit("/", 1)[-1])
    return _HOLDS.get(key, frozenset({key}))


def same_data(a: str, b: str) -> bool:
    """Whether two dataset names (``data.name`` values or declared training sets) share images."""
    pa, pb = _path_of(a), _path_of(b)
    if pa is not None or pb is not None:
        return pa is not None and pb is not None and (pa.is_relative_to(pb) or pb.is_relative_to(pa))
    return bool(_holds(a) & _holds(b))


def _absolute(name: str) -> str:
    """A declared file or folder source with its path made absolute, so the record survives a ``cd``."""
    path = _path_of(name)
    return name if path is None else f"{name.partition(':')[0]}:{path}"


def _front_matter(text: str) -> dict[str, Any]:
    if not text.startswith("---"):
        return {}
    end = text.find("\n---", 3)
    try:
        meta = yaml.safe_load(text[3:end]) if end > 0 else None
    except yaml.YAMLError:
        return {}
    return meta if isinstance(meta, dict) else {}


def _card(model_dir: Path) -> tuple[str, list[str]] | None:
    """What the model's own files declare it was trained on, if they say (a list of names)."""
    if (model_dir / CLASS_CONDITIONAL_FILE).is_file():
        names: object = json.loads((model_dir / CLASS_CONDITIONAL_FILE).read_text()).get("trained_on")
        source = f"{CLASS_CONDITIONAL_FILE} trained_on"
    elif (model_dir / "README.md").is_file():
        names = _front_matter((model_dir / "README.md").read_text(errors="replace")).get("datasets")
        names = [names] if isinstance(names, str) else names
        source = "model card (README.md datasets)"
    else:
        return None
    return (source, names) if isinstance(names, list) and names and _is_names(names) else None


def of_model(cfg: SynthConfig, model_dir: Path | None) -> Provenance:
    """``cfg.model``'s provenance: the built-in record, its card (when ``model_dir`` is given) and
    ``synth.trained_on`` together. Without ``model_dir`` only what is known before building it."""
    parts: list[tuple[str, Iterable[str]]] = []
    if cfg.model in BUILTIN_TRAINED_ON:
        parts.append((f"built-in {cfg.model}", BUILTIN_TRAINED_ON[cfg.model]))
    elif model_dir is not None and (card := _card(model_dir)) is not None:
        parts.append(card)
    if cfg.trained_on is not None:
        parts.append(("synth.trained_on", [_absolute(n) for n in cfg.trained_on]))
    if not parts:
        return Provenance(None)
    names = tuple(sorted({n for _, names in parts for n in names}))
    return Provenance(names, tuple(src for src, _ in parts), *content_sample(names))


def refuse_seen(prov: Provenance | None, *, private: str, where: str, key: str = "synth.model",
                private_images: torch.Tensor | None = None) -> None:
    """ConfigError, naming ``key``, when ``prov`` records training data that holds the private dataset:
    by name or path, or (given ``private_images``) by a recorded content hash of one of them."""
    seen = [n for n in (prov.trained_on or ()) if same_data(n, private)] if prov is not None else []
    if seen:
        raise ConfigError(
            f"{key}: {where} comes from a generator trained on {', '.join(seen)} (declared by "
            f"{', '.join(prov.declared_by)}), which holds the private data (data.name: {private}); mixing with it "
            "would leak that data: use a generator trained on other data"
        )
    if prov is None or prov.image_sample is None or private_images is None:
        return
    shared = _sampled(content_hashes(private_images), prov.every) & set(prov.image_sample)
    if shared:
        raise ConfigError(
            f"{key}: {where} comes from a generator whose recorded training data ({', '.join(prov.trained_on or ())}) "
            f"holds images identical to private ones (data.name: {private}; {len(shared)} in its content sample), "
            "whatever their name or path; mixing with it would leak that data: use a generator trained on other data"
        )


def check_public(prov: Provenance | None, *, private: str, is_public: bool, where: str,
                 private_images: torch.Tensor | None = None) -> None:
    """Refuse a synthetic set whose generator saw ``private`` (by name, path or, given ``private_images``,
    content), or whose provenance is unknown unless the user vouched for it with ``mix.synthetic_is_public``."""
    refuse_seen(prov, private=private, where=where, key="mix.synthetic", private_images=private_images)
    if (prov is None or prov.trained_on is None) and not is_public:
        raise ConfigError(
            f"mix.synthetic_is_public: {where} records no provenance (what its generator was trained on); set "
            f"mix.synthetic_is_public: true if it is public data that never saw {private}, or generate it with "
            "dpmix-ray synth (synth.trained_on declares a model's training data)"
        )
