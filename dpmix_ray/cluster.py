"""``dpmix-ray check-cluster``: validate a Ray cluster YAML offline, before ``ray up`` spends money.

Three layers: Ray's own preparation (``prepare_config``: provider defaults, merged setup commands,
per-type worker bounds) and validation (``validate_config``: the shipped ``ray-schema.json`` plus
Ray's semantic checks), then what a dpmix-ray sweep needs from the cluster: a head that runs no
trials, GPU workers that autoscale from zero, every node installing this project, shared storage.
Resources must be spelled out per node type because filling them in from AWS needs credentials.
"""

from __future__ import annotations

import copy
import logging
import re
from pathlib import Path
from typing import Any

import jsonschema

from dpmix_ray.config import read_yaml
from dpmix_ray.errors import ConfigError

STORAGE_ENV = "DPMIX_RAY_STORAGE_PATH"
_SHARED_SCHEMES = ("s3://", "gs://", "gcs://", "abfs://", "az://", "hdfs://")


def _ray_checks(path: Path, raw: dict[str, Any]) -> dict[str, Any]:
    """What ``ray up`` does before touching the cloud: prepare_config, then validate_config."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    logging.getLogger("ray.autoscaler").setLevel(logging.ERROR)
    try:
        prepared = prepare_config(copy.deepcopy(raw))
        validate_config(prepared)
    except jsonschema.ValidationError as e:
        where = ".".join(str(p) for p in e.absolute_path) or "(top level)"
        raise ConfigError(f"{path}: {where}: {e.message.splitlines()[0]} (Ray's cluster schema)") from None
    except (ValueError, RuntimeError, AssertionError, KeyError, TypeError) as e:
        raise ConfigError(f"{path}: {str(e).splitlines()[0] if str(e) else type(e).__name__} (Ray's cluster checks)") from None
    return prepared


def _commands(cfg: dict[str, Any], key: str) -> list[str]:
    return [str(c) for c in cfg.get(key) or []]


def check_cluster(path: Path) -> list[str]:
    """Info lines describing a valid cluster; ConfigError with one line for the first problem."""
    path = Path(path)
    cfg = _ray_checks(path, read_yaml(path))
    from ray import __version__ as ray_version

    types: dict[str, Any] = cfg["available_node_types"]
    head = cfg["head_node_type"]
    lines = [f"{path}: valid for Ray {ray_version} (ray-schema.json + Ray's semantic checks)"]

    for name, t in types.items():
        res = t.get("resources")
        if not res or "CPU" not in res:
            raise ConfigError(f"{path}: available_node_types.{name}.resources: give CPU (and GPU) explicitly; autodetection needs cloud credentials")

    head_res = types[head]["resources"]
    if head_res.get("CPU", 0) != 0 or head_res.get("GPU", 0) != 0:
        raise ConfigError(f"{path}: available_node_types.{head}.resources: the head runs the driver only; set CPU: 0 (and no GPU) so no trial lands on it")
    lines.append(f"head '{head}': {types[head]['node_config'].get('InstanceType', '?')}, CPU 0 (driver only, no trials)")

    workers = {n: t for n, t in types.items() if n != head}
    gpu_workers = {n: t for n, t in workers.items() if t["resources"].get("GPU", 0) >= 1}
    if not gpu_workers:
        raise ConfigError(f"{path}: available_node_types: no worker type offers a GPU")
    for name, t in workers.items():
        if t.get("min_workers", 0) != 0:
            raise ConfigError(f"{path}: available_node_types.{name}.min_workers: must be 0 so idle GPUs are released (got {t['min_workers']})")
        if not 0 < t["max_workers"] <= cfg["max_workers"]:
            raise ConfigError(f"{path}: available_node_types.{name}.max_workers: must be in 1..max_workers={cfg['max_workers']} (got {t['max_workers']})")
        r = t["resources"]
        lines.append(
            f"worker '{name}': {t['node_config'].get('InstanceType', '?')}, {r.get('CPU', 0)} CPU / {r.get('GPU', 0)} GPU, "
            f"0–{t['max_workers']} nodes"
        )

    setup = _commands(cfg, "head_setup_commands") + _commands(cfg, "worker_setup_commands")
    installs = [c for c in setup if re.search(r"pip install .*(dpmix-ray|dpmix_ray)", c)]
    if not installs or not all(any(i in _commands(cfg, k) for i in installs) for k in ("head_setup_commands", "worker_setup_commands")):
        raise ConfigError(f"{path}: setup_commands: head and workers must install this project (pip install … dpmix-ray)")
    lines.append(f"setup installs the project: {installs[0]}")

    storage = re.search(rf"{STORAGE_ENV}=(\S+?)['\"]?(?:\s|$)", "\n".join(setup))
    if storage is None:
        raise ConfigError(f"{path}: setup_commands: export {STORAGE_ENV}=s3://… so every node finds the shared Tune storage")
    url = storage.group(1)
    if not url.startswith(_SHARED_SCHEMES):
        raise ConfigError(f"{path}: {STORAGE_ENV}={url}: a multi-node sweep needs shared storage (s3://, gs://, …), not a node-local path")
    lines.append(f"shared storage: {url}/<sweep out dir name> (Tune's trials + the mirrored output dir; dpmix_ray.storage)")

    images = [cfg.get("docker", {}).get(k) for k in ("image", "head_image", "worker_image")]
    for image in filter(None, images):
        tag = image.rsplit(":", 1)[-1] if ":" in image else ""
        if not tag.startswith(ray_version):
            raise ConfigError(f"{path}: docker image {image} is not Ray {ray_version}, the version this project pins")
    return lines
