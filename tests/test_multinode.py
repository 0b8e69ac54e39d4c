"""A real Ray cluster on this machine: separate ``ray start`` nodes on loopback, a real S3 API (moto), and
Ray's fake multi-node autoscaler. Every test drives the ``dpmix-ray`` CLI in a subprocess, as a user would.

* two nodes (head: 1 CPU, no GPU; worker: 2 CPU + 1 fake GPU): trials ask for {cpu: 1, gpu: 0.5}, so
  they can only run on the worker, two at a time; the ledger's node ids say where each ran.
* S3: Tune's experiment and checkpoints, and the mirrored out dir, under s3://bucket/sweeps/<name>/.
* the driver killed mid-sweep, the local out dir deleted, a fresh driver resumes from S3 alone.
* the worker node SIGKILLed mid-trial, a new one started: the trial resumes from its epoch checkpoint.
* Ray Data synthesis with two actors on two nodes, byte-identical to one actor on a one-node Ray.
* autoscaling from zero with the fake provider and cluster-fake.yaml; idle workers removed.
"""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml
from raycluster import LocalRayCluster, MotoS3, free_port, kill_group, wait_for
from test_sweep import TINY_BASE as SWEEP_BASE

from dpmix_ray.sweep import state as S

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]
CLI = [sys.executable, "-m", "dpmix_ray.cli"]
TRIAL = {"cpu": 1, "gpu": 0.5}  # only the worker has a (fake) GPU: two trials at a time there, none on the head

TINY_BASE: dict[str, Any] = SWEEP_BASE | {"model": {"name": "cnn_tiny"}}  # test_sweep's tiny sweep, with the cheaper model


def sweep_yaml(path: Path, name: str, **over: Any) -> Path:
    raw: dict[str, Any] = {
        "name": name, "base": TINY_BASE, "epsilons": [2, 8], "delta": 1e-4,
        "space": {"optim.lr": {"loguniform": [0.5, 4.0]}},
        "search": {"sampler": "random", "trials_per_epsilon": 2, "seed": 0}, "final": {"seeds": 1},
        "resources": TRIAL,
    } | over
    path.write_text(yaml.safe_dump(raw))
    return path


@pytest.fixture(scope="module")
def s3(tmp_path_factory: pytest.TempPathFactory) -> Any:
    server = MotoS3().start(tmp_path_factory.mktemp("moto"))
    yield server
    server.stop()


@pytest.fixture(scope="module")
def two_nodes(s3: MotoS3) -> Any:
    """Head (1 CPU, no GPU) + worker (2 CPU, 1 fake GPU), every process able to reach the S3 server."""
    cluster = LocalRayCluster(env={**s3.env, "PYTHONPATH": _pythonpath()})
    try:
        cluster.start_head(num_cpus=1, resources={"dpmix_head": 1})
        cluster.add_worker(num_cpus=2, num_gpus=1, resources={"dpmix_worker": 1})
        yield cluster
    finally:
        cluster.stop()


def _pythonpath() -> str:
    """This checkout first, so Ray's worker processes import the same dpmix_ray as the driver."""
    rest = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p and Path(p).resolve() != REPO]
    return os.pathsep.join([str(REPO), *rest])


def _env(s3: MotoS3, tmp: Path, **extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(s3.env)
    env.update({"PYTHONPATH": _pythonpath(), "RAY_AUTH_MODE": "disabled", "DPMIX_CACHE": str(tmp / "cache"), "HF_HUB_OFFLINE": "1"})
    env.pop("RAY_ADDRESS", None)
    env.update(extra)
    return env


def _start(args: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:
    with log.open("w") as f:
        return subprocess.Popen([*CLI, *args], env=env, stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)


def _run(args: list[str], env: dict[str, str], log: Path, timeout: float) -> str:
    proc = _start(args, env, log)
    try:
        rc = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_group(proc)
        raise AssertionError(f"dpmix-ray {args[0]} ran past {timeout:.0f} s: {log.read_text()[-3000:]}") from None
    out = log.read_text()
    assert rc == 0, f"dpmix-ray {args[0]} exited {rc}: {out[-3000:]}"
    return out


def _ledger_lines(raw: bytes | None) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (raw or b"").decode().splitlines() if line.strip()]


def _slot(r: dict[str, Any]) -> tuple[str, str, int]:
    return r["group"], r["phase"], int(r["index"])


def _optuna_states(db: Path) -> list[str]:
    with sqlite3.connect(db) as c:
        return sorted(state for (state,) in c.execute("SELECT state FROM trials"))


# --------------------------------------------------------------------------- sweep on two nodes, S3, driver loss


def test_two_node_sweep_on_s3_resumes_from_s3_alone_after_the_driver_dies(tmp_path: Path, two_nodes: LocalRayCluster, s3: MotoS3) -> None:
    cfg = sweep_yaml(tmp_path / "sweep.yaml", "mn", base=TINY_BASE | {"optim": {"batch_size": 32, "epochs": 2, "lr": 1.0}})
    out, storage, prefix = tmp_path / "head-disk" / "mn", f"s3://{s3.bucket}/sweeps", "sweeps/mn/"
    args = ["sweep", str(cfg), "--address", two_nodes.address, "--storage", storage, "--out", str(out)]
    env = _env(s3, tmp_path)

    # Snapshots (and so mirror uploads) every second instead of Tune's adaptive >= 10 s: the kill lands mid-sweep.
    driver = _start(args, env | {"TUNE_GLOBAL_CHECKPOINT_S": "1"}, tmp_path / "driver1.log")
    try:
        wait_for("the first ledger record on S3", lambda: _ledger_lines(s3.read(prefix + S.LEDGER_FILE)), timeout=300, every=0.2)
    finally:
        kill_group(driver)  # the driver dies mid-sweep: no clean shutdown, nothing flushed
    before = {_slot(r): r for r in _ledger_lines(s3.read(prefix + S.LEDGER_FILE))}
    remote_state = json.loads(s3.read(prefix + S.STATE_FILE) or b"{}")
    assert before and not remote_state["finished"] and len(before) < 6  # 2 ε × (2 search + 1 final)
    assert not (out / S.TUNE_DIR).exists()  # Tune's experiment never touched the driver's disk
    shutil.rmtree(out.parent)  # a fresh driver: nothing on local disk

    _run([*args, "--resume"], env, tmp_path / "driver2.log", timeout=400)

    lines = _ledger_lines((out / S.LEDGER_FILE).read_bytes())
    state, records = S.read_state(out), S.read_records(out)
    assert state.finished and state.resumes == 1 and S.sweep_complete(records, state.counts, dict.fromkeys(state.counts, 1))
    assert len(records) == sum(state.counts.values()) + sum(1 for c in state.counts.values() if c) == 6  # + one final per ε
    for slot in {_slot(r) for r in lines}:  # nothing ran twice: each slot is one Tune trial, re-reported at most
        assert len({r["trial_id"] for r in lines if _slot(r) == slot}) == 1, slot
    for slot, r in before.items():  # finished before the kill: never trained again (same trial, same seconds)
        again = [x for x in lines if _slot(x) == slot]
        assert {x["trial_id"] for x in again} == {r["trial_id"]} and {x["trial_seconds"] for x in again} == {r["trial_seconds"]}

    # where trials ran: all on the worker (the only node with a GPU), none on the head
    worker = next(n.node_id for n in two_nodes.nodes if not n.head)
    assert {r["node_id"] for r in records} == {worker} and two_nodes.head.node_id not in {r["node_id"] for r in lines}

    # the layout under S3 is the local layout; Tune's experiment and checkpoints are there only
    remote = s3.keys(prefix)
    mirrored = {k[len(prefix):] for k in remote if not k.startswith(f"{prefix}{S.TUNE_DIR}/") and not k.endswith("/")}  # "/": Tune's dir markers
    local = {p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()}
    assert mirrored == local and {S.LEDGER_FILE, S.OPTUNA_FILE, S.STATE_FILE, S.CURATOR_REPORT, f"{S.RELEASE_TABLE}.json"} <= local
    assert {S.released_model_name(g) for g in state.counts} <= local  # the selected trials' weights, via their S3 checkpoints
    assert s3.read(prefix + S.LEDGER_FILE) == (out / S.LEDGER_FILE).read_bytes()
    assert any(k.startswith(f"{prefix}{S.TUNE_DIR}/trials/experiment_state") for k in remote)
    assert any("/checkpoint_" in k for k in remote) and not (out / S.TUNE_DIR).exists()
    kept: dict[str, set[str]] = {}  # trial dir -> checkpoints holding state: superseded ones were deleted
    for k in remote:
        if k.endswith("/state.pt"):
            kept.setdefault(k.split("/")[-3], set()).add(k.split("/")[-2])
    assert len(kept) == len(records) and all(len(c) == 1 for c in kept.values()), kept

    # optuna.db came back from S3 in step: no trial left RUNNING, one COMPLETE per completed search trial
    (tmp_path / "s3.db").write_bytes(s3.read(prefix + S.OPTUNA_FILE) or b"")
    states = _optuna_states(tmp_path / "s3.db")
    assert "RUNNING" not in states
    assert states.count("COMPLETE") == sum(1 for r in records if r["phase"] == "search" and r["status"] == "completed")

    # `dpmix-ray report s3://…` from anywhere: rebuilt from S3 and uploaded back
    s3.client().delete_object(Bucket=s3.bucket, Key=prefix + S.CURATOR_REPORT)
    printed = _run(["report", f"{storage}/mn"], _env(s3, tmp_path / "elsewhere"), tmp_path / "report.log", timeout=120)
    html = Path(printed.strip().splitlines()[-1].split("curator only: ")[-1])
    assert html.is_file() and html.read_bytes() == s3.read(prefix + S.CURATOR_REPORT)
    assert str(tmp_path / "elsewhere") in str(html)


# --------------------------------------------------------------------------- Ray Data synthesis on two nodes


def test_synthesis_with_two_actors_on_two_nodes_writes_the_bytes_of_one_actor_on_one_node(tmp_path: Path, two_nodes: LocalRayCluster, s3: MotoS3) -> None:
    synth = {"model": "tiny-random", "classes": ["cat", "dog"], "images_per_class": 6, "image_size": 8, "channels": 1,
             "steps": 2, "batch_size": 4}
    (tmp_path / "two.yaml").write_text(yaml.safe_dump({"synth": synth | {"workers": 2, "out": str(tmp_path / "two")}}))
    (tmp_path / "one.yaml").write_text(yaml.safe_dump({"synth": synth | {"workers": 1, "out": str(tmp_path / "one")}}))
    before = {a[2] for a in two_nodes.actors()}

    _run(["synth", str(tmp_path / "two.yaml"), "--json"], _env(s3, tmp_path, RAY_ADDRESS=two_nodes.address), tmp_path / "two.log", 300)
    _run(["synth", str(tmp_path / "one.yaml"), "--json"], _env(s3, tmp_path), tmp_path / "one.log", 300)  # its own one-node Ray

    two = {p.name: p.read_bytes() for p in sorted((tmp_path / "two").glob("shard-*.parquet"))}
    one = {p.name: p.read_bytes() for p in sorted((tmp_path / "one").glob("shard-*.parquet"))}
    assert len(two) == 3 and two == one
    generators = [a for a in two_nodes.actors() if a[2] not in before and "MapWorker" in a[0]]
    assert len(generators) == 2 and {node for _, node, _ in generators} == {n.node_id for n in two_nodes.nodes}  # one per node


# --------------------------------------------------------------------------- worker node lost mid-trial


def test_lost_worker_node_trial_resumes_from_its_epoch_checkpoint_on_a_new_node(tmp_path: Path, two_nodes: LocalRayCluster, s3: MotoS3) -> None:
    cfg = sweep_yaml(tmp_path / "sweep.yaml", "wl", epsilons=[4], final={"seeds": 0},
                     base=TINY_BASE | {"optim": {"batch_size": 16, "epochs": 64, "lr": 1.0}})  # 0.2 s (quiet) to 2 s an epoch here
    out, prefix = tmp_path / "out" / "wl", "sweeps/wl/"
    old = next(n for n in two_nodes.nodes if not n.head and n.proc.poll() is None)
    driver = _start(["sweep", str(cfg), "--address", two_nodes.address, "--storage", f"s3://{s3.bucket}/sweeps", "--out", str(out)],
                    _env(s3, tmp_path), tmp_path / "driver.log")
    try:
        saved = wait_for("a trial's first epoch checkpoint on S3", lambda: [k for k in s3.keys(f"{prefix}{S.TUNE_DIR}/") if k.endswith("/state.pt")], timeout=300)
        two_nodes.kill(old)  # SIGKILL to the worker node's process group: raylet, trial workers, all at once
        new = two_nodes.add_worker(num_cpus=2, num_gpus=1, resources={"dpmix_worker": 1})
        rc = driver.wait(timeout=400)
    finally:
        kill_group(driver)
    assert rc == 0, (tmp_path / "driver.log").read_text()[-3000:]

    lines, records, state = _ledger_lines((out / S.LEDGER_FILE).read_bytes()), S.read_records(out), S.read_state(out)
    assert state.finished and len(records) == len(lines) == sum(state.counts.values()) == 2  # every trial once
    assert all(r["status"] == "completed" for r in records)
    checkpointed = {r["trial_id"] for r in records if any(f"-{r['trial_id']}/checkpoint_" in k for k in saved)}
    assert checkpointed  # the kill landed after a trial's first epoch checkpoint, before it finished
    for r in records:
        if r["trial_id"] in checkpointed:  # resumed from its epoch checkpoint (on S3, written from the lost node)
            assert r["retries"] >= 1 and r["resumed_from_step"] > 0
        if r["retries"] >= 1:  # a retried trial (checkpointed or not yet) ran again on the new node
            assert r["node_id"] == new.node_id
    assert old.node_id not in two_nodes.alive()


# --------------------------------------------------------------------------- autoscaling from zero (fake provider)


def test_fake_autoscaler_launches_gpu_workers_from_zero_and_removes_them_when_idle(tmp_path: Path, s3: MotoS3) -> None:
    cluster = LocalRayCluster(env={**s3.env, "PYTHONPATH": _pythonpath()})
    fake = yaml.safe_load((REPO / "cluster-fake.yaml").read_text())
    worker_types = {k: v for k, v in fake["available_node_types"].items() if k != fake["head_node_type"]}
    try:
        port = free_port()
        fake["provider"]["gcs_address"] = f"127.0.0.2:{port}"
        fake["idle_timeout_minutes"] = 0.1  # 6 s
        (tmp_path / "home").mkdir()
        config = tmp_path / "home" / "ray_bootstrap_config.yaml"  # where a `ray up` head keeps it (the driver reads it)
        config.write_text(yaml.safe_dump(fake))
        cluster.start_head(num_cpus=0, port=port, args=(f"--autoscaling-config={config}",), env={
            "RAY_FAKE_CLUSTER": "1", "AUTOSCALER_UPDATE_INTERVAL_S": "1",
            "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",  # launched nodes take 127.0.0.1, not the machine's outward address
        })
        time.sleep(3)
        assert list(cluster.alive()) == [cluster.head.node_id]  # min_workers: 0, nothing pending: zero workers

        cfg = sweep_yaml(tmp_path / "sweep.yaml", "as", epsilons=[4], final={"seeds": 0}, resources={"cpu": 1, "gpu": 1})
        _run(["sweep", str(cfg), "--address", cluster.address, "--storage", f"s3://{s3.bucket}/sweeps", "--out", str(tmp_path / "as")],
             _env(s3, tmp_path, HOME=str(tmp_path / "home")), tmp_path / "driver.log", timeout=400)

        records = S.read_records(tmp_path / "as")
        launched = {nid: info for nid, info in cluster.node_infos().items() if nid != cluster.head.node_id}
        assert len(records) == 2 and all(r["status"] == "completed" for r in records)
        assert launched and {r["node_id"] for r in records} <= set(launched)  # trials ran on autoscaled workers
        assert all(nid.startswith("f" * 51) for nid in launched)  # the fake provider's ids: launched by the autoscaler
        shapes = [{k: v for k, v in t["resources"].items() if k in ("CPU", "GPU")} for t in worker_types.values()]
        for info in launched.values():  # each launched node is one of the declared GPU worker types
            assert {k: v for k, v in info.resources_total.items() if k in ("CPU", "GPU")} in shapes
        wait_for("idle workers to be removed", lambda: list(cluster.alive()) == [cluster.head.node_id], timeout=120, every=1)
    finally:
        cluster.stop()
