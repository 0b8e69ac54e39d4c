"""A real multi-node Ray cluster and a real S3 API on this machine, for tests.

* :class:`LocalRayCluster`: a head and worker nodes, each a ``ray start --block`` process group of its own
  (``start_new_session``), each on its own loopback address (127.0.0.2 for the head, 127.0.0.3, .4, … for
  workers: distinct "hosts", and Ray never resolves them to the machine's outward address as it does
  127.0.0.1), with its own ``--num-cpus``/``--num-gpus``/custom resources, every port chosen free (so it
  can't collide with other Ray instances here) and its own temp dir. Stopped by SIGKILL to the process
  groups it started: never ``ray stop``, which would end every Ray on the machine.
* :class:`MotoS3`: ``moto`` in server mode on 127.0.0.1 with a bucket; its ``env`` is what the driver and
  every Ray node need (``AWS_ENDPOINT_URL`` is read by pyarrow, hence by Ray, in every process).

Node ids come from the GCS directly (``GcsClient``), so a test can look at the cluster without
connecting a driver to it.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

RAY = str(Path(sys.executable).with_name("ray"))
FAST_HEALTH_CHECKS = {  # a SIGKILLed node is declared dead in ~3 s, not ~15-30 s
    "RAY_health_check_initial_delay_ms": "1000",
    "RAY_health_check_period_ms": "1000",
    "RAY_health_check_failure_threshold": "3",
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(what: str, check: Any, timeout: float, every: float = 0.5) -> Any:
    """Poll ``check()`` until it returns something truthy; AssertionError naming ``what`` on timeout."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(every)


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def kill_group(proc: subprocess.Popen, timeout: float = 20.0) -> None:
    """SIGKILL a process group this test started, then wait for it to be gone (reaped)."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()
    deadline = time.monotonic() + timeout
    while _group_alive(proc.pid) and time.monotonic() < deadline:
        time.sleep(0.2)


@dataclass
class RayNode:
    ip: str
    proc: subprocess.Popen
    log: Path
    head: bool
    node_id: str = ""


@dataclass
class LocalRayCluster:
    """Nodes started with ``ray start --block``; see the module docstring."""

    env: dict[str, str] = field(default_factory=dict)
    temp_dir: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="rc", dir="/tmp")))  # short: socket paths
    nodes: list[RayNode] = field(default_factory=list)
    port: int = 0
    _next_ip: int = 2

    @property
    def address(self) -> str:
        return f"127.0.0.2:{self.port}"

    @property
    def head(self) -> RayNode:
        return next(n for n in self.nodes if n.head)

    def _env(self, extra: dict[str, str] | None) -> dict[str, str]:
        env = dict(os.environ)
        env.update({"RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0", **self.env, **(extra or {})})
        return env

    def _start(self, args: list[str], *, head: bool, num_cpus: int, num_gpus: int, resources: dict[str, float],
               env: dict[str, str] | None) -> RayNode:
        ip = f"127.0.0.{self._next_ip}"
        self._next_ip += 1
        log = self.temp_dir / f"node-{ip}.log"
        cmd = [
            RAY, "start", "--block", f"--node-ip-address={ip}", f"--temp-dir={self.temp_dir}",
            f"--num-cpus={num_cpus}", f"--num-gpus={num_gpus}", f"--resources={json.dumps(resources)}",
            "--min-worker-port=0", "--max-worker-port=0", f"--node-manager-port={free_port()}",
            f"--object-manager-port={free_port()}", f"--dashboard-agent-listen-port={free_port()}",
            f"--dashboard-agent-grpc-port={free_port()}", f"--metrics-export-port={free_port()}",
            f"--runtime-env-agent-port={free_port()}", "--object-store-memory=100000000", "--disable-usage-stats", *args,
        ]
        with log.open("w") as f:
            proc = subprocess.Popen(cmd, env=self._env(env), stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    start_new_session=True)
        node = RayNode(ip=ip, proc=proc, log=log, head=head)
        self.nodes.append(node)
        try:
            node.node_id = wait_for(f"the Ray node at {ip} to join (log: {log})", lambda: self._alive_id(node), timeout=120)
        except AssertionError:
            self.kill(node)
            raise
        return node

    def start_head(self, *, num_cpus: int, num_gpus: int = 0, resources: dict[str, float] | None = None,
                   args: tuple[str, ...] = (), env: dict[str, str] | None = None, port: int | None = None) -> RayNode:
        self.port = port or free_port()
        return self._start(["--head", f"--port={self.port}", "--include-dashboard=false", *args], head=True,
                           num_cpus=num_cpus, num_gpus=num_gpus, resources=resources or {}, env={**FAST_HEALTH_CHECKS, **(env or {})})

    def add_worker(self, *, num_cpus: int, num_gpus: int = 0, resources: dict[str, float] | None = None) -> RayNode:
        return self._start([f"--address={self.address}"], head=False, num_cpus=num_cpus, num_gpus=num_gpus,
                           resources=resources or {}, env=None)

    # ------------------------------------------------------------------ looking at it

    def node_infos(self) -> dict[str, Any]:
        """node id (hex) -> GcsNodeInfo, dead nodes included; {} while the GCS doesn't answer."""
        from ray._raylet import GcsClient

        try:
            return {nid.hex(): info for nid, info in GcsClient(address=self.address).get_all_node_info(timeout=5).items()}
        except Exception:  # noqa: BLE001 - not up yet
            return {}

    def alive(self) -> dict[str, Any]:
        return {nid: info for nid, info in self.node_infos().items() if info.state == 0}  # GcsNodeState.ALIVE

    def actors(self) -> list[tuple[str, str, str]]:
        """(class name, node id, actor id) of every actor the GCS remembers, dead ones included."""
        from ray._private.services import _get_gcs_client_options
        from ray._private.state import GlobalState

        state = GlobalState()
        state._initialize_global_state(_get_gcs_client_options(self.address))
        try:
            return [(a["ActorClassName"], a["Address"]["NodeID"], aid) for aid, a in state.actor_table(None).items()]
        finally:
            state.disconnect()

    def _alive_id(self, node: RayNode) -> str | None:
        if node.proc.poll() is not None:
            raise AssertionError(f"ray start for {node.ip} exited with {node.proc.returncode}: {node.log.read_text()[-2000:]}")
        return next((nid for nid, info in self.alive().items() if info.node_manager_address == node.ip), None)

    # ------------------------------------------------------------------ stopping

    def kill(self, node: RayNode) -> None:
        """SIGKILL the node's process group (raylet, its workers, and on the head the GCS)."""
        kill_group(node.proc)

    def stop(self) -> None:
        for node in sorted(self.nodes, key=lambda n: n.head):  # workers first
            self.kill(node)
        shutil.rmtree(self.temp_dir, ignore_errors=True)


@dataclass
class MotoS3:
    """A real S3 API (moto server) on 127.0.0.1 with one bucket."""

    bucket: str = field(default_factory=lambda: f"dpmix-{uuid.uuid4().hex[:12]}")
    port: int = 0
    proc: subprocess.Popen | None = None
    log: Path | None = None
    _client: Any = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def env(self) -> dict[str, str]:
        return {
            "AWS_ENDPOINT_URL": self.endpoint, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_DEFAULT_REGION": "us-east-1", "AWS_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true",
        }

    def start(self, log_dir: Path) -> MotoS3:
        self.port = free_port()
        self.log = log_dir / "moto.log"
        with self.log.open("w") as f:
            self.proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
                                         stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)

        def up() -> bool:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                    return True
            except OSError:
                return False

        wait_for(f"moto on port {self.port} (log: {self.log})", up, timeout=60, every=0.2)
        self.client().create_bucket(Bucket=self.bucket)
        return self

    def client(self) -> Any:
        import boto3

        if self._client is None:  # creating a boto3 client takes ~0.5 s here: once
            self._client = boto3.client("s3", endpoint_url=self.endpoint, aws_access_key_id="testing", aws_secret_access_key="testing",
                            region_name="us-east-1")
        return self._client

    def keys(self, prefix: str = "") -> dict[str, int]:
        """Every object under ``prefix`` -> its size."""
        found: dict[str, int] = {}
        for page in self.client().get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=prefix):
            found.update({o["Key"]: o["Size"] for o in page.get("Contents", [])})
        return found

    def read(self, key: str) -> bytes | None:
        try:
            return self.client().get_object(Bucket=self.bucket, Key=key)["Body"].read()
        except Exception:  # noqa: BLE001 - NoSuchKey
            return None

    def stop(self) -> None:
        if self.proc is not None:
            kill_group(self.proc)
