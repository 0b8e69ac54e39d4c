"""check-cluster on the shipped cluster.yaml and on broken copies of it (offline, no cloud)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import pytest
import yaml

from dpmix_ray.cluster import check_cluster
from dpmix_ray.errors import ConfigError

CLUSTER = Path(__file__).resolve().parents[1] / "cluster.yaml"


def _broken(tmp_path: Path, edit: Callable[[dict[str, Any]], None]) -> Path:
    cfg = yaml.safe_load(CLUSTER.read_text())
    edit(cfg)
    p = tmp_path / "cluster.yaml"
    p.write_text(yaml.safe_dump(cfg))
    return p


def test_shipped_cluster_is_valid() -> None:
    lines = check_cluster(CLUSTER)
    text = "\n".join(lines)
    assert "CPU 0" in text and "s3://" in text
    assert any("GPU" in line and line.startswith("worker") for line in lines)


def _set(path: str, value: Any) -> Callable[[dict[str, Any]], None]:
    def edit(cfg: dict[str, Any]) -> None:
        *parents, last = path.split("/")
        node = cfg
        for p in parents:
            node = node[p]
        node[last] = value

    return edit


def _drop(path: str) -> Callable[[dict[str, Any]], None]:
    def edit(cfg: dict[str, Any]) -> None:
        *parents, last = path.split("/")
        node = cfg
        for p in parents:
            node = node[p]
        del node[last]

    return edit


@pytest.mark.parametrize(
    ("edit", "needle"),
    [
        # Ray's schema
        (_set("max_workers", "ten"), "schema"),
        (_drop("available_node_types/gpu_1x_a10g/node_config"), "schema"),
        (_set("unknown_top_level_key", 1), "schema"),
        (_set("available_node_types/gpu_1x_a10g/resources", {"CPU": 8, "GPU": 0.5}), "schema"),
        # Ray's semantic checks
        (_set("head_node_type", "nope"), "head_node_type"),
        (_set("max_workers", 0), "max_workers"),
        # what a sweep needs
        (_set("available_node_types/ray.head.default/resources", {"CPU": 4}), "CPU: 0"),
        (_set("available_node_types/gpu_1x_a10g/min_workers", 1), "min_workers"),
        (_set("available_node_types/gpu_4x_a10g/max_workers", 50), "max_workers"),
        (_set("setup_commands", ["pip install --quiet torch"]), "install this project"),
        (_set("setup_commands", ["pip install -e ~/dpmix-ray", "echo 'export DPMIX_RAY_STORAGE_PATH=/tmp/tune' >> ~/.bashrc"]), "shared storage"),
        (_set("setup_commands", ["pip install -e ~/dpmix-ray"]), "DPMIX_RAY_STORAGE_PATH"),
        (_set("docker/worker_image", "rayproject/ray:2.9.0-py311-gpu"), "not Ray"),
    ],
)
def test_broken_copies_are_refused_with_one_line(tmp_path: Path, edit: Callable[[dict[str, Any]], None], needle: str | None) -> None:
    p = _broken(tmp_path, edit)
    with pytest.raises(ConfigError) as e:
        check_cluster(p)
    msg = str(e.value)
    assert "\n" not in msg
    if needle is not None:
        assert needle in msg


def test_no_gpu_worker_is_refused(tmp_path: Path) -> None:
    def cpu_only(cfg: dict[str, Any]) -> None:
        for name, t in cfg["available_node_types"].items():
            if name != cfg["head_node_type"]:
                t["resources"] = {"CPU": 8}

    with pytest.raises(ConfigError, match="GPU"):
        check_cluster(_broken(tmp_path, cpu_only))


def test_missing_and_unparsable_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        check_cluster(tmp_path / "none.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("cluster_name: [unclosed\n")
    with pytest.raises(ConfigError, match="invalid YAML"):
        check_cluster(bad)


# --------------------------------------------------------------------------- cluster.yaml and its fake-provider twin

FAKE = CLUSTER.with_name("cluster-fake.yaml")
_NOT_CUSTOM = {"CPU", "memory", "object_store_memory"}  # CPU scaled down; memory figures are the fake nodes' own


def test_fake_provider_config_is_valid_for_ray() -> None:
    from ray.autoscaler._private.util import validate_config  # what the fake head's autoscaler runs on it

    fake = yaml.safe_load(FAKE.read_text())
    validate_config(fake)
    assert fake["provider"]["type"] == "fake_multinode"


def _drift(aws: dict[str, Any], fake: dict[str, Any]) -> list[str]:
    """Where the fake-provider config is out of step with cluster.yaml: type names and head, GPU and custom
    resources per type, worker bounds; CPU may only be scaled down (and a CPU-0 head stays CPU 0)."""
    found = []
    if not fake["head_node_type"] == aws["head_node_type"] == "ray.head.default":  # the fake provider's fixed head type
        found.append(f"head_node_type {aws['head_node_type']} / {fake['head_node_type']}")
    if set(fake["available_node_types"]) != set(aws["available_node_types"]):
        found.append(f"node types {sorted(aws['available_node_types'])} / {sorted(fake['available_node_types'])}")
    if fake["max_workers"] != aws["max_workers"]:
        found.append("max_workers")
    for name, real in aws["available_node_types"].items():
        twin = fake["available_node_types"].get(name)
        if twin is None:
            continue
        r, t = real["resources"], twin["resources"]
        if {k: v for k, v in r.items() if k not in _NOT_CUSTOM} != {k: v for k, v in t.items() if k not in _NOT_CUSTOM}:
            found.append(f"{name}: GPU/custom resources")
        if not (t["CPU"] <= r["CPU"] and (t["CPU"] == 0) == (r["CPU"] == 0)):
            found.append(f"{name}: CPU {r['CPU']} / {t['CPU']}")
        if (real.get("min_workers", 0), real.get("max_workers", 0)) != (twin.get("min_workers", 0), twin.get("max_workers", 0)):
            found.append(f"{name}: worker bounds")
    return found


def test_fake_provider_config_declares_the_same_node_types_as_cluster_yaml() -> None:
    assert _drift(yaml.safe_load(CLUSTER.read_text()), yaml.safe_load(FAKE.read_text())) == []


@pytest.mark.parametrize(
    ("edit", "needle"),
    [
        (_set("available_node_types/gpu_4x_a10g/resources/GPU", 8), "gpu_4x_a10g: GPU/custom"),
        (_set("available_node_types/gpu_1x_a10g/resources/accelerator_type:A10G", 1), "gpu_1x_a10g: GPU/custom"),
        (_set("available_node_types/gpu_1x_a10g/resources/CPU", 0), "gpu_1x_a10g: CPU"),
        (_set("available_node_types/gpu_1x_a10g/max_workers", 3), "gpu_1x_a10g: worker bounds"),
        (_drop("available_node_types/gpu_4x_a10g"), "node types"),
    ],
)
def test_in_step_check_catches_a_drifted_cluster_yaml(edit: Callable[[dict[str, Any]], None], needle: str) -> None:
    aws = yaml.safe_load(CLUSTER.read_text())
    edit(aws)
    assert any(needle in d for d in _drift(aws, yaml.safe_load(FAKE.read_text())))


# --------------------------------------------------------------------------- bench/gpu_check.py

GPU_CHECK = CLUSTER.parent / "bench" / "gpu_check.py"


def _gpu_check(*args: str, env: dict[str, str] | None = None) -> tuple[int, list[str]]:
    import os
    import subprocess
    import sys

    run_env = {**os.environ, "PYTHONPATH": str(CLUSTER.parent), **(env or {})}
    proc = subprocess.run([sys.executable, str(GPU_CHECK), *args], capture_output=True, text=True, env=run_env, timeout=300)
    return proc.returncode, proc.stdout.strip().splitlines()


def test_gpu_check_without_a_gpu_says_so_in_one_line_and_exits_0() -> None:
    import json

    rc, lines = _gpu_check(env={"CUDA_VISIBLE_DEVICES": ""})
    assert rc == 0 and len(lines) == 1
    report = json.loads(lines[0])
    assert report["gpu"] is None and "no CUDA device" in report["skipped"] and "grad_step" not in report


@pytest.mark.slow
def test_gpu_check_smoke_runs_every_stage_on_cpu(tmp_path: Path) -> None:
    """Every stage's code path and imports, on the CPU at toy sizes (the figures need a GPU)."""
    import json

    rc, lines = _gpu_check("--smoke", env={"DPMIX_CACHE": str(tmp_path), "HF_HUB_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": ""})
    report = json.loads(lines[-1])
    assert rc == 0, report
    assert [(r["B"], r["K"]) for r in report["grad_step"]["rows"]] == [(2, 1), (2, 2)]
    assert all(r["time_ratio"] > 0 for r in report["grad_step"]["rows"])
    assert report["train"]["steps"] > 0 and report["train"]["device"] == "cpu"
    assert report["synth"]["images"] == [4, 3, 32, 32] and report["synth"]["unet_dtype"] == "torch.float32"  # fp16 on CUDA
