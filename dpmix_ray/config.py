"""Every config schema, its YAML loading, ``--set`` overrides and all validation, in one place.

Schemas are frozen pydantic models with ``extra="forbid"``, so an unknown or misspelt key is an
error, never silently ignored. Errors surface as :class:`ConfigError` with one line naming the
dotted key. Checks that need the data (δ < 1/N) live here too, in :func:`check_against_dataset`.
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from dpmix_ray import methods
from dpmix_ray.errors import ConfigError
from dpmix_ray.methods import MethodName


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True)


class DataConfig(_Strict):
    """Which labelled images, and the deterministic train/val/test split.

    ``name``: ``digits`` | ``mnist5k`` (offline, shipped in packages) | ``cifar10`` | ``cifar100`` |
    ``eurosat`` | ``svhn`` (torchvision, under ``root``) | ``imagefolder:<dir>`` | ``parquet:<file>`` |
    ``npz:<file>`` | ``npy:<dir>`` (an image store, ``dpmix_ray.data.write_image_store``).

    ``storage``: chosen explicitly, never by size. ``memory`` (default) loads the set and holds it on the
    training device; ``mmap`` (``npy:`` stores only) keeps the images in the memory-mapped store and
    reads the rows a chunk or an evaluation batch needs, for sets larger than memory.
    """

    name: str = "mnist5k"
    root: str | None = None
    download: bool = False
    val_fraction: float = Field(0.1, gt=0.0, lt=0.5)
    test_fraction: float = Field(0.2, gt=0.0, lt=0.5)
    split_seed: int = 0
    limit: int | None = Field(None, ge=10, description="use only the first `limit` training examples")
    storage: Literal["memory", "mmap"] = "memory"

    @model_validator(mode="after")
    def _mmap_needs_a_store(self) -> "DataConfig":
        if self.storage == "mmap" and not self.name.startswith("npy:"):
            raise ValueError(f"data.storage: mmap reads an image store (data.name=npy:<dir>), not '{self.name}'")
        return self


class ModelConfig(_Strict):
    """``cnn_tiny`` | ``cnn`` | ``wrn16_4`` | a torchvision backbone (``resnet18``, ``vit_b_16``) with a linear head."""

    name: str = "cnn_tiny"
    weights: str | None = None
    train: Literal["full", "head"] = "full"


class SynthConfig(_Strict):
    """A synthetic set from a diffusion model that never saw the private data."""

    model: str = "digits-ddpm"
    classes: list[str] | None = None
    prompt: str = "a photo of a {label}"
    images_per_class: int = Field(100, gt=0)
    image_size: int = Field(28, ge=4)
    channels: Literal[1, 3] = 1
    steps: int = Field(25, ge=1)
    guidance: float | None = Field(None, ge=0.0, description="classifier-free guidance; null = the model's default")
    seed: int = 0
    workers: int = Field(2, ge=1)
    gpus_per_worker: float = Field(0.0, ge=0.0)
    batch_size: int = Field(16, ge=1)
    out: str | None = None
    revision: str | None = None
    trained_on: list[str] | None = Field(
        None, description="the datasets the model was trained on, as you know them (recorded with the set, checked "
        "against data.name); null = only what a built-in or the model's card declares"
    )

    @field_validator("prompt")
    @classmethod
    def _prompt_has_label(cls, v: str) -> str:
        if "{label}" not in v:
            raise ValueError("prompt template must contain '{label}'")
        return v


class MixConfig(_Strict):
    """The per-example group: K self-augmentations, m self-mixups, n diffusion-mixups."""

    aug_multiplicity: int = Field(8, ge=1)
    self_mix: int = Field(4, ge=0)
    diff_mix: int = Field(0, ge=0)
    alpha: float = Field(0.2, gt=0.0)
    synthetic: str | None = Field(None, description="a Parquet/npz path, or 'synth' for the config's synth section")
    synthetic_is_public: bool = Field(
        False, description="vouch that a mix.synthetic set recording no provenance is public data that never saw the private data"
    )
    diff_pairing: Literal["same_class", "any"] = "any"
    crop_padding: int | None = Field(None, ge=0, description="reflect-pad before random crops; null = 4 px per 32 px, 1 px for digits")
    flip: bool | None = Field(None, description="horizontal flip; null = the dataset's default (off for digits)")

    @property
    def group_size(self) -> int:
        return self.aug_multiplicity + self.self_mix + self.diff_mix


class PrivacyConfig(_Strict):
    """The budget, and which datasets count as neighbours (the relation every stated ε is about, dpmix_ray.privacy)."""

    epsilon: float = Field(2.0, gt=0.0)
    delta: float = Field(1.0e-5, gt=0.0, lt=1.0)
    clip_norm: float = Field(1.0, gt=0.0)
    noise_multiplier: float | None = Field(None, gt=0.0)
    accountant: Literal["rdp", "prv", "pld"] = Field(
        "rdp", description="rdp | prv: Opacus's; pld: dp_accounting's privacy-loss-distribution accountant (needed by replace_one)"
    )
    neighbouring: Literal["zero_out", "replace_one"] = Field(
        "zero_out",
        description="zero_out: neighbours replace one training example by a null one with zero gradient, N is public; "
        "replace_one: neighbours swap one example for another (about twice the noise for the same ε; needs accountant: pld)",
    )
    reproducible: bool = Field(
        False,
        description="derive the Poisson masks and the noise from `seed` (research, tests): the run is then NOT private; "
        "false = secret randomness, never saved",
    )

    @model_validator(mode="after")
    def _relation_has_accountant(self) -> "PrivacyConfig":
        if self.neighbouring == "replace_one" and self.accountant != "pld":
            raise ValueError(
                f"neighbouring: replace_one needs accountant: pld (Opacus's {self.accountant} bounds zero_out neighbours only)"
            )
        return self


class OptimConfig(_Strict):
    """SGD settings. ``batch_size``, ``epochs`` and ``lr`` may be null: the trainer derives them from the
    training-set size N and ε by ``dpmix_ray.recipe.resolve`` once N is known. ``epochs: null`` with
    ``privacy.noise_multiplier`` given keeps its meaning: the planner runs the most steps that fit ε."""

    batch_size: int | None = Field(None, ge=1, description="expected (Poisson) logical batch size B = q·N; null = derived from N")
    epochs: float | None = Field(None, gt=0.0, description="null = derived: from privacy.noise_multiplier when given, else from N and ε")
    lr: float | None = Field(None, gt=0.0, description="null = derived: the lr whose noise random walk τ = lr·σC/B·√T is 0.1 (recipe.py); lr·C ≤ 4")
    momentum: float = Field(0.0, ge=0.0, lt=1.0)
    lr_schedule: Literal["constant", "cosine"] = "constant"
    warmup: float = Field(0.0, ge=0.0, lt=1.0, description="linear lr warm-up over this fraction of the steps")
    ema: float | None = Field(
        None, gt=0.0, lt=1.0,
        description="decay of an exponential moving average of the parameters (debiased, as Adam's moments); "
        "validation, test and the released model use the average; null = off",
    )
    physical_batch_size: int | None = Field(
        None, ge=1, description="augmented images per forward/backward chunk; null = choose from memory_cap_mb"
    )
    memory_cap_mb: int = Field(2048, ge=64)


class TrainConfig(_Strict):
    method: MethodName = "dpmix_self"
    data: DataConfig = DataConfig()
    model: ModelConfig = ModelConfig()
    mix: MixConfig = MixConfig()
    privacy: PrivacyConfig = PrivacyConfig()
    optim: OptimConfig = OptimConfig()
    synth: SynthConfig | None = None
    seed: int = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"

    @model_validator(mode="before")
    @classmethod
    def _implied_counts(cls, data: Any) -> Any:
        """A method implies the counts it fixes (dpsgd: K=1, m=n=0; augmult: m=n=0) where the config leaves them unset."""
        method = data.get("method", cls.model_fields["method"].default) if isinstance(data, dict) else None
        if not isinstance(method, str) or method not in methods.METHODS or not isinstance(data.get("mix", {}), dict):
            return data  # the schema reports what is wrong
        mix = dict(data.get("mix") or {})
        for dotted, value in methods.get(method).fixed.items():
            mix.setdefault(dotted.removeprefix("mix."), value)
        return {**data, "mix": mix}

    @model_validator(mode="after")
    def _method_counts(self) -> "TrainConfig":
        k, m, n = self.mix.aug_multiplicity, self.mix.self_mix, self.mix.diff_mix
        problem = methods.get(self.method).problems({methods.K: k, methods.M: m, methods.N: n})
        if problem is not None:
            raise ValueError(problem)
        if m > 0 and k < 2:
            raise ValueError("mix.self_mix > 0 mixes two distinct self-augmentations: it needs mix.aug_multiplicity >= 2")
        if n > 0 and self.mix.synthetic is None:
            raise ValueError("mix.diff_mix > 0 (dpmix_diff) needs mix.synthetic: a Parquet/npz path or 'synth'")
        if self.mix.synthetic == "synth" and self.synth is None:
            raise ValueError("mix.synthetic: 'synth' needs a synth section in the same config")
        if self.method != "nonprivate" and self.privacy.noise_multiplier is not None and self.optim.epochs is not None:
            raise ValueError(
                "privacy.noise_multiplier and optim.epochs are both set: give one (set the other to null), "
                "the planner derives it from the budget"
            )
        return self

    @property
    def is_private(self) -> bool:
        return methods.get(self.method).private


# --------------------------------------------------------------------------- sweeps

Distribution = dict[str, list[Any]]
_DIST_KINDS = ("loguniform", "uniform", "int", "choice")


class ProxyConfig(_Strict):
    """Cheap proxy search trials (TAN): run the search at this batch size with σ scaled to keep σ/B and the step count."""

    batch_size: int = Field(ge=1, description="the proxy trials' expected batch size B'; a trial whose batch is not larger runs at full size")


class BudgetConfig(_Strict):
    """A compute budget: summed trial wall time × the CPUs (or GPUs) each trial holds, in hours. Give one."""

    cpu_hours: float | None = Field(None, gt=0.0)
    gpu_hours: float | None = Field(None, gt=0.0)

    @model_validator(mode="after")
    def _one(self) -> "BudgetConfig":
        if (self.cpu_hours is None) == (self.gpu_hours is None):
            raise ValueError("give exactly one of cpu_hours or gpu_hours, e.g. {cpu_hours: 2}")
        return self


class SearchConfig(_Strict):
    sampler: Literal["tpe", "random"] = "tpe"
    trials_per_epsilon: int = Field(24, ge=1)
    max_concurrent: int | None = Field(None, ge=1)
    seed: int = 0
    scheduler: Literal["asha", "fifo"] | None = Field(
        None, description="asha: stop poor trials early, per ε; fifo or null: run every trial to its end"
    )
    grace: float = Field(
        0.34, gt=0.0, le=1.0, description="ASHA's grace period: the fraction of a trial's steps before it can first be stopped"
    )
    warm_start: bool | None = Field(
        None, description="start every study with the embedded/derived default recipe before any sampled point; "
        "null = on, except under repeat_and_select (random search only)"
    )
    transfer: bool | None = Field(
        None, description="hand each study its neighbouring ε's best recipe so far, moved by the transfer rule; "
        "null = on, except under repeat_and_select"
    )
    proxy: ProxyConfig | None = Field(None, description="run search trials as cheap proxies (never released); null = full size")
    budget: BudgetConfig | None = Field(
        None, description="fit the sweep to a compute budget: trials_per_epsilon is planned from a throughput probe, and "
        "(under per_trial) no search trial is handed out that would overrun it; null = trials_per_epsilon as given"
    )
    trials_shape: float | None = Field(
        None,
        ge=0.0,
        description="repeat_and_select only: the trial count is truncated negative binomial with this shape η "
        "(1 = geometric, 0 = logarithmic) and mean trials_per_epsilon; null = Poisson",
    )


class ResourcesConfig(_Strict):
    cpu: float = Field(1.0, gt=0.0)
    gpu: float = Field(0.0, ge=0.0)


# The one-run audit's defaults (dpmix_ray.audit reads them here, so a sweep's final.audit_* can be checked without torch).
AUDIT_CANARIES = 1000


class FinalConfig(_Strict):
    """After the search: fresh-seed re-runs of each group's chosen recipe, and optionally an audit of it."""

    seeds: int = Field(3, ge=0)
    audit: bool = Field(
        False, description="audit each private group's released recipe with one more training run on the private data "
        "(dpmix_ray.audit, a lower bound ε_lb on its ε): curator only, outside the sweep's guarantee"
    )
    audit_canaries: int | None = Field(None, ge=2, description=f"white-box canary slots m per audit (added to N); null = {AUDIT_CANARIES}")
    audit_guesses: int | None = Field(None, ge=2, description="guesses r per audit (r <= m), fixed in advance; null = tuned on a "
                                      "held-out half of the canaries")

    @property
    def canaries(self) -> int:
        return AUDIT_CANARIES if self.audit_canaries is None else self.audit_canaries

    @property
    def guesses(self) -> int | None:
        return self.audit_guesses

    @model_validator(mode="after")
    def _guesses_within_canaries(self) -> "FinalConfig":
        if self.guesses is not None and self.guesses > self.canaries:
            raise ValueError(
                f"audit_guesses ({self.guesses}) exceeds audit_canaries ({self.canaries}): each guess is about one canary"
            )
        return self


class SweepConfig(_Strict):
    name: str = "sweep"
    base: TrainConfig = TrainConfig()
    epsilons: list[float] = Field(default_factory=lambda: [1.0, 2.0, 4.0, 8.0], min_length=1)
    delta: float = Field(1.0e-5, gt=0.0, lt=1.0)
    space: dict[str, Distribution] = Field(default_factory=dict)
    search: SearchConfig = SearchConfig()
    tuning_privacy: Literal["per_trial", "repeat_and_select"] = "per_trial"
    resources: ResourcesConfig = ResourcesConfig()
    final: FinalConfig = FinalConfig()
    baselines: list[MethodName] = Field(default_factory=list)
    synth: SynthConfig | None = None
    # Where the sweep lives (dpmix_ray.storage): <storage>/<out dir name>. Not part of the sweep's identity
    # (excluded from dumps, so from config_hash and the stored sweep.yaml): `--storage` and
    # $DPMIX_RAY_STORAGE_PATH set the same thing.
    storage: str | None = Field(None, exclude=True, description="s3://bucket/prefix (or a shared path) for Tune and the sweep's outputs")

    @model_validator(mode="after")
    def _tuning_relation(self) -> "SweepConfig":
        if self.tuning_privacy == "repeat_and_select" and self.base.privacy.neighbouring != "zero_out":
            raise ValueError(
                "tuning_privacy: repeat_and_select needs base.privacy.neighbouring: zero_out (no accountant here composes "
                "replace_one with repeat-and-select)"
            )
        return self

    @model_validator(mode="after")
    def _budget_resources(self) -> "SweepConfig":
        b = self.search.budget
        if b is not None and b.gpu_hours is not None and self.resources.gpu == 0:
            raise ValueError("search.budget.gpu_hours: trials hold no GPU (resources.gpu is 0); give cpu_hours")
        return self

    @field_validator("epsilons")
    @classmethod
    def _positive_eps(cls, v: list[float]) -> list[float]:
        for e in v:
            if not e > 0:
                raise ValueError(f"every epsilon must be > 0 (got {e})")
        return v

    @field_validator("space")
    @classmethod
    def _space(cls, v: dict[str, Distribution]) -> dict[str, Distribution]:
        for key, dist in v.items():
            if key not in DP_SPACE_KEYS:
                _check_path(TrainConfig, key)
            _check_distribution(key, dist)
        for a, b, why in _EXCLUSIVE_SPACE_KEYS:
            if a in v and b in v:
                raise ValueError(f"space searches both {a} and {b}: {why}")
        return v


# Search coordinates that are not config keys: the DP-aware parameterisation (dpmix_ray.sweep.space).
DP_SPACE_KEYS: dict[str, str] = {
    "dp.tau": "the noise's random walk per coordinate over a run, τ = lr·σC/B·√T: lr follows once σ is planned",
    "dp.steps": "the number of logical steps T at the point's batch size (epochs = T·B/N)",
    "dp.compute": "epochs × G (G = K+m+n): the run's per-example-gradient images per training example; epochs = it ÷ G",
}
_EXCLUSIVE_SPACE_KEYS = (
    ("privacy.noise_multiplier", "optim.epochs", "search at most one, the planner derives the other"),
    ("privacy.noise_multiplier", "dp.steps", "search at most one, the planner derives the other"),
    ("optim.epochs", "dp.steps", "give the run's length once"),
    ("optim.epochs", "dp.compute", "give the run's length once"),
    ("dp.steps", "dp.compute", "give the run's length once"),
    ("privacy.noise_multiplier", "dp.compute", "search at most one, the planner derives the other"),
    ("optim.lr", "dp.tau", "lr follows from τ once σ is planned; search one of them"),
)


def _check_path(model: type[BaseModel], dotted: str) -> None:
    """Refuse a dotted path that is not a leaf field of ``model``."""
    node: Any = model
    for part in dotted.split("."):
        fields = getattr(node, "model_fields", None)
        if fields is None or part not in fields:
            raise ValueError(f"space: unknown config path '{dotted}'")
        ann = fields[part].annotation
        node = next((a for a in getattr(ann, "__args__", (ann,)) if isinstance(a, type) and issubclass(a, BaseModel)), ann)


def _check_distribution(key: str, dist: Distribution) -> None:
    if not isinstance(dist, dict) or len(dist) != 1 or next(iter(dist)) not in _DIST_KINDS:
        raise ValueError(f"space.{key}: give exactly one of {', '.join(_DIST_KINDS)}, e.g. {{uniform: [0.5, 4]}}")
    kind, args = next(iter(dist.items()))
    if kind == "choice":
        if not isinstance(args, list) or not args:
            raise ValueError(f"space.{key}: choice needs a non-empty list")
        return
    if not isinstance(args, list) or len(args) != 2 or not all(isinstance(a, (int, float)) for a in args):
        raise ValueError(f"space.{key}: {kind} needs [low, high]")
    low, high = args
    if not low < high:
        raise ValueError(f"space.{key}: empty or inverted range [{low}, {high}]")
    if kind == "loguniform" and low <= 0:
        raise ValueError(f"space.{key}: loguniform needs low > 0 (got {low})")
    if kind == "int" and not (float(low).is_integer() and float(high).is_integer()):
        raise ValueError(f"space.{key}: int needs integer bounds")


# --------------------------------------------------------------------------- loading


def _format_validation_error(err: ValidationError, where: str) -> str:
    first = err.errors()[0]
    loc = ".".join(str(p) for p in first["loc"] if not str(p).startswith("function-"))
    msg = first["msg"].removeprefix("Value error, ")
    if first["type"] == "extra_forbidden":
        msg = "unknown key"
    got = first.get("input")
    shown = "" if first["type"] in ("extra_forbidden", "value_error") or isinstance(got, (dict, list)) else f" (got {got!r})"
    return f"{where}: {loc + ': ' if loc else ''}{msg}{shown}"


def parse_overrides(items: list[str] | None) -> dict[str, Any]:
    """``["privacy.epsilon=2", "mix.aug_multiplicity=8"]`` → ``{"privacy.epsilon": 2, ...}`` (YAML-typed values)."""
    out: dict[str, Any] = {}
    for item in items or []:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set {item!r}: expected key=value, e.g. privacy.epsilon=2")
        try:
            out[key.strip()] = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError:
            out[key.strip()] = raw
    return out


def apply_overrides(raw: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """Return a copy of ``raw`` with dotted ``overrides`` set (intermediate mappings are created)."""
    out = json.loads(json.dumps(raw)) if raw else {}
    for dotted, value in overrides.items():
        node = out
        parts = dotted.split(".")
        for i, part in enumerate(parts[:-1]):
            nxt = node.get(part)
            if nxt is None:
                nxt = node[part] = {}
            if not isinstance(nxt, dict):
                raise ConfigError(f"--set {dotted}: '{'.'.join(parts[: i + 1])}' is not a section")
            node = nxt
        node[parts[-1]] = value
    return out


def read_yaml(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{p}: config file not found")
    try:
        data = yaml.safe_load(p.read_text())
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(f"{p}: invalid YAML{where}: {problem}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: the top level must be a mapping of config keys")
    return data


def _build(schema: type[_Strict], raw: dict[str, Any], where: str) -> Any:
    try:
        return schema.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(_format_validation_error(e, where)) from None


def load_train_config(path: str | Path | None = None, overrides: list[str] | None = None) -> TrainConfig:
    """The embedded default when ``path`` is None; otherwise YAML, then ``--set`` overrides, validated once."""
    raw = read_yaml(path) if path is not None else {}
    return _build(TrainConfig, apply_overrides(raw, parse_overrides(overrides)), str(path or "config"))


def load_sweep_config(path: str | Path, overrides: list[str] | None = None) -> SweepConfig:
    """A sweep YAML; ``base`` may be inline or a path to a train config (relative to the sweep file)."""
    raw = apply_overrides(read_yaml(path), parse_overrides(overrides))
    base = raw.get("base")
    if isinstance(base, str):
        base_path = Path(base) if Path(base).is_absolute() else Path(path).parent / base
        raw["base"] = read_yaml(base_path)
    raw.setdefault("name", Path(path).stem)
    return _build(SweepConfig, raw, str(path))


def _section(path: str | Path, overrides: list[str] | None, key: str) -> tuple[Any, str]:
    """``key``'s mapping in a synth or train config, else in a sweep config's ``base`` (inline or a file)."""
    raw = apply_overrides(read_yaml(path), parse_overrides(overrides))
    if key in raw:
        return raw[key], key
    base = raw.get("base")
    if isinstance(base, str):
        base = read_yaml(Path(base) if Path(base).is_absolute() else Path(path).parent / base)
    return (base.get(key), f"base.{key}") if isinstance(base, dict) else (None, key)


def load_synth_config(path: str | Path, overrides: list[str] | None = None) -> SynthConfig:
    """The ``synth:`` section of any config file (a synth, train or sweep config; a sweep's own
    ``synth`` first, as the sweep uses it, then its base's)."""
    section, where = _section(path, overrides, "synth")
    if not isinstance(section, dict):
        raise ConfigError(f"{path}: no synth section (expected a 'synth:' mapping)")
    return _build(SynthConfig, section, f"{path}: {where}")


def load_data_config(path: str | Path, overrides: list[str] | None = None) -> DataConfig | None:
    """The ``data:`` section beside a synth section (a sweep's ``base.data``), or None when there is none:
    a synth set made for a dataset takes its class names and is checked against it."""
    section, where = _section(path, overrides, "data")
    if section is None:
        return None
    if not isinstance(section, dict):
        raise ConfigError(f"{path}: {where}: expected a mapping")
    return _build(DataConfig, section, f"{path}: {where}")


def privacy_config(raw: dict[str, Any], where: str) -> PrivacyConfig:
    """A privacy section on its own (``dpmix-ray plan``), validated as in a config file."""
    return _build(PrivacyConfig, raw, where)


def with_updates(cfg: TrainConfig, updates: dict[str, Any]) -> TrainConfig:
    """A new validated TrainConfig with dotted ``updates`` applied (used by sweeps for sampled values)."""
    return _build(TrainConfig, apply_overrides(cfg.model_dump(mode="json"), updates), "trial config")


def config_hash(cfg: BaseModel) -> str:
    """A stable short hash of a config's canonical JSON (cache keys, resume checks)."""
    canon = json.dumps(cfg.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canon.encode()).hexdigest()[:16]


def check_against_dataset(cfg: TrainConfig, n_train: int) -> None:
    """Checks that need the training-set size N."""
    if cfg.is_private and cfg.privacy.delta >= 1.0 / n_train:
        raise ConfigError(
            f"privacy.delta: {cfg.privacy.delta:g} is not < 1/N = {1.0 / n_train:.3g} for N={n_train} training "
            "examples (a δ that large permits leaking a whole example)"
        )
    if cfg.optim.batch_size is not None and cfg.optim.batch_size > n_train:
        raise ConfigError(f"optim.batch_size: {cfg.optim.batch_size} exceeds the {n_train} training examples")
    if cfg.optim.epochs is not None and not math.isfinite(cfg.optim.epochs):
        raise ConfigError("optim.epochs: must be finite")
