"""A sweep's output directory: its identity (config hash), its durable decisions, its trial ledger.

Pure file handling (no Ray), shared by the sweep driver and ``dpmix-ray report``. The ledger is
append-only JSON lines, one record per finished trial, written the moment Tune reports the trial
finished; a record written twice (a trial re-reported after a resume) or a slot re-run after a kill
is resolved by keeping the last record per (group, phase, index).
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import yaml

from dpmix_ray.config import SweepConfig, config_hash, load_sweep_config
from dpmix_ray.errors import ConfigError

STATE_FILE = "sweep_state.json"
CONFIG_FILE = "sweep.yaml"
LEDGER_FILE = "trials.jsonl"
OPTUNA_FILE = "optuna.db"
TUNE_DIR = "tune"
EXPERIMENT = "trials"


@dataclass
class SweepState:
    """What must survive a kill so that ``--resume`` continues the same sweep, not a new one.

    ``counts`` are the drawn numbers of search trials per group (random under repeat_and_select:
    redrawing them on resume would change the privacy analysis). ``synthetic`` is the generated
    synthetic set's path, so a resume never regenerates it.
    """

    name: str
    config_hash: str
    counts: dict[str, int]
    storage_path: str
    synthetic: str | None = None
    finished: bool = False
    resumes: int = 0


def state_path(out: Path) -> Path:
    return out / STATE_FILE


def read_state(out: Path) -> SweepState:
    p = state_path(out)
    if not p.is_file():
        raise ConfigError(f"{out}: not a sweep output directory (no {STATE_FILE})")
    try:
        return SweepState(**json.loads(p.read_text()))
    except (json.JSONDecodeError, TypeError) as e:
        raise ConfigError(f"{p}: unreadable sweep state ({e})") from None


def write_state(out: Path, state: SweepState) -> None:
    """Atomic replace: a kill mid-write leaves the previous state, never half of one."""
    out.mkdir(parents=True, exist_ok=True)
    tmp = state_path(out).with_suffix(".tmp")
    tmp.write_text(json.dumps(asdict(state), indent=1))
    os.replace(tmp, state_path(out))


def write_config(out: Path, cfg: SweepConfig) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / CONFIG_FILE).write_text(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))


def read_config(out: Path) -> SweepConfig:
    p = out / CONFIG_FILE
    if not p.is_file():
        raise ConfigError(f"{out}: not a sweep output directory (no {CONFIG_FILE})")
    return load_sweep_config(p)  # the stored config is resolved (inline base, name): one loader, one error format


def check_out_dir(out: Path, cfg: SweepConfig, *, resume: bool) -> SweepState | None:
    """The stored state when resuming the same sweep, None for a fresh start; ConfigError otherwise."""
    exists = state_path(out).is_file()
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


def _clean(value: Any) -> Any:
    """JSON has no ±inf/NaN: store them as null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_clean(v) for v in value]
    return value


def append_record(out: Path, record: dict[str, Any]) -> None:
    with (out / LEDGER_FILE).open("a") as f:
        f.write(json.dumps(_clean(record), sort_keys=True) + "\n")
        f.flush()
        os.fsync(f.fileno())


def read_records(out: Path) -> list[dict[str, Any]]:
    """The ledger, last record per (group, phase, index) slot, in slot order. A torn last line is skipped."""
    p = out / LEDGER_FILE
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


def best_search_record(records: list[dict[str, Any]]) -> dict[str, Any] | None:
    """Selection by validation accuracy only, among search trials that ran to completion (ties: earliest)."""
    done = [r for r in records if r["phase"] == "search" and r["status"] == "completed" and r.get("val_accuracy") is not None]
    return max(done, key=lambda r: (r["val_accuracy"], -int(r["index"])), default=None)


def sweep_complete(records: list[dict[str, Any]], counts: dict[str, int], seeds: int) -> bool:
    """Every drawn search slot and every final re-run (for groups with a completed trial) is in the ledger."""
    for key, count in counts.items():
        mine = [r for r in records if r["group"] == key]
        search = [r for r in mine if r["phase"] == "search"]
        finals = [r for r in mine if r["phase"] == "final"]
        wanted = seeds if best_search_record(search) is not None else 0
        if len(search) < count or len(finals) < wanted:
            return False
    return True
