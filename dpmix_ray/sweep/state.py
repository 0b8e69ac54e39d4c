"""A sweep's output directory: what is released, what only the curator may see, and the file I/O of both.

``OUT/release/`` holds what may be published, each item beside the guarantee that covers it: the best
row per ε, its model weights, and the table and plot of those rows. ``OUT/curator/`` holds everything
else: the config, the sweep state (drawn trial counts, privacy plans), the ledger of every trial,
Optuna's studies, Tune's experiment, the full report. Under ``repeat_and_select`` the curator's files
are exactly what the Papernot–Steinke bound treats as hidden.

Every read and write of the out dir goes through the few functions below (``write_file``,
``read_text``, ``append_record``, …), so mirroring the layout elsewhere is one hook. Optuna's SQLite
file and Tune's directory are written by those libraries at :func:`path` locations.

The ledger is append-only JSON lines, one record per finished trial, written the moment Tune
reports the trial finished; a record written twice (a trial re-reported after a resume) or a slot
re-run after a kill is resolved by keeping the last record per (group, phase, index).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

from dpmix_ray.config import SweepConfig, config_hash, load_sweep_config
from dpmix_ray.errors import ConfigError
from dpmix_ray.sweep import selection

RELEASE = "release"
CURATOR = "curator"

STATE_FILE = f"{CURATOR}/sweep_state.json"
CONFIG_FILE = f"{CURATOR}/sweep.yaml"
LEDGER_FILE = f"{CURATOR}/trials.jsonl"
TRIALS_TABLE = f"{CURATOR}/trials.parquet"
OPTUNA_FILE = f"{CURATOR}/optuna.db"
TUNE_DIR = f"{CURATOR}/tune"
CURATOR_MODELS = f"{CURATOR}/models"
CURATOR_REPORT = f"{CURATOR}/report.html"
AUDIT_FILE = f"{CURATOR}/audit.jsonl"
BUDGET_STOPS = f"{CURATOR}/budget_stops.json"
RELEASE_TABLE = f"{RELEASE}/best_per_epsilon"  # .json, .csv, .md
RELEASE_PLOT = f"{RELEASE}/accuracy_vs_epsilon.png"
RELEASE_MODELS = f"{RELEASE}/models"
RELEASE_RECIPES = f"{RELEASE}/recipes"
EXPERIMENT = "trials"

# Which file is which: the report and the docs list these, in this order.
FILES: dict[str, str] = {
    f"{RELEASE_TABLE}.{{json,csv,md}}": "released: the best row per (method, ε) and the guarantee that covers it",
    RELEASE_PLOT: "released: test accuracy of the released models against ε",
    f"{RELEASE_MODELS}/*.pt": "released: each row's model weights, with its guarantee inside the file",
    f"{RELEASE_RECIPES}/*.yaml": "released: each row's recipe as a complete train config (σ and T pinned)",
    CURATOR_REPORT: "curator only: this report, with every trial",
    LEDGER_FILE: "curator only: the ledger, one JSON record per finished trial",
    TRIALS_TABLE: "curator only: every trial as a table",
    OPTUNA_FILE: "curator only: one Optuna study per (method, ε); opens in optuna-dashboard",
    STATE_FILE: "curator only: drawn trial counts, privacy plans, the synthetic set's path",
    CONFIG_FILE: "curator only: the resolved sweep config",
    f"{CURATOR_MODELS}/": "curator only: each group's release candidate so far (its selected full-size trial, or its first final run)",
    f"{TUNE_DIR}/": "curator only: Tune's experiment state and trial checkpoints",
    AUDIT_FILE: "curator only (final.audit): one audit per private group's released recipe, its ε_lb; extra training runs "
    "on the private data, outside the sweep's guarantee",
}


def path(out: Path, rel: str) -> Path:
    """The local path of ``rel`` (one of the names above) in ``out``."""
    return Path(out) / rel


def write_file(out: Path, rel: str, data: bytes | str) -> None:
    """Atomic replace: a kill mid-write leaves the previous file, never half of one."""
    p = path(out, rel)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(p.name + ".tmp")
    tmp.write_bytes(data.encode() if isinstance(data, str) else data)
    os.replace(tmp, p)


def read_text(out: Path, rel: str) -> str:
    return path(out, rel).read_text()


def remove(out: Path, rel: str) -> None:
    path(out, rel).unlink(missing_ok=True)


def list_files(out: Path, rel_dir: str) -> list[str]:
    """The files directly in ``rel_dir``, as out-relative names."""
    d = path(out, rel_dir)
    return sorted(f"{rel_dir}/{p.name}" for p in d.iterdir() if p.is_file()) if d.is_dir() else []


def publish_release(out: Path, files: dict[str, bytes | str], *, replace: bool) -> bool:
    """Write ``release/`` (``files``: out-relative names under it) as one directory rename, so nobody ever sees half
    of a release or a mix of two. ``replace=False`` (repeat_and_select: one release, ever) keeps an existing
    ``release/`` and returns False; a second version would be a second release of the same search."""
    final = path(out, RELEASE)
    if final.exists() and not replace:
        return False
    stage = Path(tempfile.mkdtemp(prefix=".release-", dir=out))
    for rel, data in files.items():
        p = stage / Path(rel).relative_to(RELEASE)
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data.encode() if isinstance(data, str) else data)
    old = Path(tempfile.mkdtemp(prefix=".release-old-", dir=out))
    try:
        if final.exists():
            os.replace(final, old / RELEASE)
        os.rename(stage, final)  # fails if another writer put a release/ there meanwhile
    except OSError:
        shutil.rmtree(stage, ignore_errors=True)
        if not final.exists() and (old / RELEASE).exists():
            os.replace(old / RELEASE, final)
        return False
    finally:
        shutil.rmtree(old, ignore_errors=True)
    return True


@dataclass
class SweepState:
    """What must survive a kill so that ``--resume`` continues the same sweep, not a new one.

    ``counts`` are the drawn numbers of search trials per group (random under repeat_and_select:
    redrawing them on resume would change the privacy analysis). ``plans`` are the privacy plans
    fixed before Ray started (per group under repeat_and_select; see :mod:`dpmix_ray.sweep.budget`);
    a resume uses them, never re-plans. ``n_train`` is the base config's training-split size.
    ``synthetic`` is the generated synthetic set's path, so a resume never regenerates it.
    """

    name: str
    config_hash: str
    counts: dict[str, int]
    storage_path: str
    n_train: int
    plans: dict[str, dict[str, Any]] = field(default_factory=dict)
    synthetic: str | None = None
    compute: dict[str, Any] | None = None  # search.budget's plan (sweep.estimate.plan_budget); the searcher keeps within it
    estimate: dict[str, Any] | None = None  # the cost estimated before the run (sweep.estimate.estimate_summary), for the report
    finished: bool = False
    resumes: int = 0


def read_state(out: Path) -> SweepState:
    p = path(out, STATE_FILE)
    if not p.is_file():
        raise ConfigError(f"{out}: not a sweep output directory (no {STATE_FILE})")
    try:
        return SweepState(**json.loads(p.read_text()))
    except (json.JSONDecodeError, TypeError) as e:
        raise ConfigError(f"{p}: unreadable sweep state ({e})") from None


def write_state(out: Path, state: SweepState) -> None:
    write_file(out, STATE_FILE, json.dumps(clean(asdict(state)), indent=1))


def write_config(out: Path, cfg: SweepConfig) -> None:
    write_file(out, CONFIG_FILE, yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))


def read_config(out: Path) -> SweepConfig:
    p = path(out, CONFIG_FILE)
    if not p.is_file():
        raise ConfigError(f"{out}: not a sweep output directory (no {CONFIG_FILE})")
    return load_sweep_config(p)  # the stored config is resolved (inline base, name): one loader, one error format


def check_out_dir(out: Path, cfg: SweepConfig, *, resume: bool) -> SweepState | None:
    """The stored state when resuming the same sweep, None for a fresh start; ConfigError otherwise."""
    exists = path(out, STATE_FILE).is_file()
    if not resume:
        if exists:
            raise ConfigError(f"{out}: already holds sweep '{read_state(out).name}'; pass --resume to continue it or choose another --out")
        return None
    if not exists:
        raise ConfigError(f"--resume: {out} holds no sweep to resume (no {STATE_FILE})")
    state = read_state(out)
    if state.config_hash != config_hash(cfg):
        raise ConfigError(
            f"--resume: {out} holds sweep '{state.name}' with config hash {state.config_hash}, "
            f"not this config ({config_hash(cfg)}); resume with the same YAML and --set values"
        )
    return state


def clean(value: Any) -> Any:
    """JSON has no ±inf/NaN: store them as null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: clean(v) for k, v in value.items()}
    if isinstance(value, list):
        return [clean(v) for v in value]
    return value


def append_record(out: Path, record: dict[str, Any]) -> None:
    p = path(out, LEDGER_FILE)
    p.parent.mkdir(parents=True, exist_ok=True)
    with p.open("a") as f:
        f.write(json.dumps(clean(record), sort_keys=True) + "\n")
        f.flush()
        os.fsync(f.fileno())


def read_records(out: Path) -> list[dict[str, Any]]:
    """The ledger, last record per (group, phase, index) slot, in slot order. A torn last line is skipped."""
    p = path(out, LEDGER_FILE)
    if not p.is_file():
        return []
    slots: dict[tuple[str, str, int], dict[str, Any]] = {}
    for line in p.read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        slots[(rec["group"], rec["phase"], int(rec["index"]))] = rec
    return [slots[k] for k in sorted(slots, key=lambda k: (k[0], k[1] != "search", k[2]))]


def read_audits(out: Path) -> dict[str, dict[str, Any]]:
    """``final.audit``'s results by group (:mod:`dpmix_ray.sweep.audits`); empty when there are none."""
    p = path(out, AUDIT_FILE)
    lines = p.read_text().splitlines() if p.is_file() else []
    return {a["group"]: a for a in map(json.loads, lines)}


def add_audit(out: Path, audit: dict[str, Any]) -> None:
    """One more line, written with the file's earlier lines as one atomic replace (so no line is ever torn)."""
    p = path(out, AUDIT_FILE)
    before = p.read_text() if p.is_file() else ""
    write_file(out, AUDIT_FILE, before + json.dumps(clean(audit), sort_keys=True) + "\n")


def sweep_complete(records: list[dict[str, Any]], counts: dict[str, int], finals: dict[str, int]) -> bool:
    """Every drawn search slot, and each group's ``finals[group]`` re-runs once it has a selected trial, is in the ledger."""
    for key, count in counts.items():
        mine = [r for r in records if r["group"] == key]
        search = [r for r in mine if r["phase"] == "search"]
        done = [r for r in mine if r["phase"] == "final"]
        wanted = finals.get(key, 0) if selection.best(search) is not None else 0
        if len(search) < count or len(done) < wanted:
            return False
    return True


def model_dir(group: str) -> str:
    return f"{CURATOR_MODELS}/{file_stem(group)}"


def model_name(group: str, phase: str, index: int) -> str:
    """The curator's copy of one trial's model (a release candidate: :func:`dpmix_ray.sweep.selection.released`)."""
    return f"{model_dir(group)}/{phase}{index}.pt"


def released_model_name(group: str) -> str:
    return f"{RELEASE_MODELS}/{file_stem(group)}.pt"


def recipe_name(group: str) -> str:
    return f"{RELEASE_RECIPES}/{file_stem(group)}.yaml"


def file_stem(group: str) -> str:
    """``dpmix_self@eps=2`` → ``dpmix_self-eps2``."""
    return group.replace("@eps=", "-eps")
