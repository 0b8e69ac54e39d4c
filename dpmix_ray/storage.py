"""Shared storage for a sweep: Tune's experiment on ``s3://…`` (any pyarrow URI), the out dir mirrored there.

A multi-node sweep needs storage every node reaches: Tune's trials write their epoch checkpoints
there from whichever node they run on, and the driver writes its experiment snapshots there. The
sweep's own outputs (ledger, state, ``optuna.db``, report, whatever else the out dir holds) are
written on the driver's local disk and mirrored to the same place, so the layout under the URI is
the local layout::

    <storage>/<out dir name>/             the sweep's home ("root" below)
        release/…, curator/sweep_state.json, curator/trials.jsonl, curator/optuna.db, …   (mirrored out dir)
        curator/tune/trials/…             Tune's experiment and trial checkpoints (written there directly)

``<storage>`` is ``dpmix-ray sweep --storage URI``, else the sweep YAML's ``storage:``, else
``$DPMIX_RAY_STORAGE_PATH``. An S3-compatible server (MinIO, moto, Ceph) is reached with the
standard ``AWS_ENDPOINT_URL``, which pyarrow and so Ray read on every node.

When the mirror uploads: at every Tune experiment snapshot (Tune's periodic one, ``TUNE_GLOBAL_CHECKPOINT_S``,
adaptive from 10 s, and the one at the end), from the driver's ``MirrorCallback``, synchronously and in
this order, and once more at the end of the sweep:

1. ``optuna.db``, as a consistent copy (SQLite's online backup: SQLite cannot live on S3, and the raw
   file may be mid-write). Tune has just saved the searcher state; the copy is at least as new.
2. Tune's snapshot itself (experiment state, searcher state), which Tune would upload only in the
   background, after waiting for Tune's upload in flight (an older one must not land after it).
3. Superseded trial checkpoints deleted: those older than the one the uploaded snapshot names. With
   shared storage Tune keeps every checkpoint (``num_to_keep=None``) because Ray 2.60 deletes the
   previous checkpoint *before* its background upload of the snapshot that stops naming it: a driver
   killed in between left a snapshot naming a deleted checkpoint, and the resumed sweep failed that
   (already finished) trial three times (seen in tests/test_multinode.py).
4. The rest of the out dir: ledger, state, report (changed files only).

So the storage always holds, if the driver dies at any point: a Tune snapshot S, every checkpoint S
names, an ``optuna.db`` at least as new as S's searcher state, and a ledger no newer than S. A fresh
driver (``--resume``, nothing on its disk) downloads the out dir and Tune restores S: trials S saw
running are re-run from their last checkpoint named in S (or re-reported from their final
checkpoint, not re-trained); trials Optuna handed out after S are marked FAIL in the study (Tune never
saw them) and their slots are issued again with the same index; the ledger keeps one record per slot.
What is lost: the work since S (at most one snapshot period) of the trials running at the kill.

Nothing here imports Ray.
"""

from __future__ import annotations

import json
import os
import sqlite3
import tempfile
import uuid
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs

from dpmix_ray.errors import ConfigError

STORAGE_ENV = "DPMIX_RAY_STORAGE_PATH"
ENDPOINT_ENV = "AWS_ENDPOINT_URL"
# = dpmix_ray.sweep.state.TUNE_DIR / STATE_FILE (not imported: this module stays free of the sweep package;
# tests/test_sweep.py keeps them equal)
TUNE_DIR = "curator/tune"
STATE_FILE = "curator/sweep_state.json"
_SQLITE_SUFFIXES = (".db", ".sqlite", ".sqlite3")
_SKIP_SUFFIXES = (".tmp", "-journal", "-wal", "-shm", ".lock")


def is_uri(location: str) -> bool:
    """``s3://…``, ``gs://…``: storage reached through a pyarrow filesystem (``file://`` counts as local)."""
    return "://" in location and not location.startswith("file://")


def base_location(configured: str | None) -> str | None:
    """Where sweeps are stored: the config's ``storage`` (``--storage`` sets it), else ``$DPMIX_RAY_STORAGE_PATH``."""
    return configured or os.environ.get(STORAGE_ENV) or None


def sweep_root(base: str, out: Path) -> str:
    """A sweep's home under ``base``: ``<base>/<out dir name>``."""
    if is_uri(base):
        return f"{base.rstrip('/')}/{out.name}"
    return str((Path(base.removeprefix("file://")).expanduser() / out.name).resolve())


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split())[:300]


def filesystem(location: str) -> tuple[pafs.FileSystem, str]:
    """The pyarrow filesystem and path of a URI or local path; ConfigError (one line) if it can't be resolved."""
    if not is_uri(location):
        return pafs.LocalFileSystem(), str(Path(location.removeprefix("file://")).expanduser().resolve())
    try:
        fs, path = pafs.FileSystem.from_uri(location)
    except (pa.ArrowException, OSError, ValueError) as e:
        hint = f" (an S3-compatible server needs {ENDPOINT_ENV})" if location.startswith("s3://") and ENDPOINT_ENV not in os.environ else ""
        raise ConfigError(f"storage {location}: {_one_line(e)}{hint}") from None
    return fs, path.rstrip("/")


def check_reachable(location: str) -> None:
    """Fail before anything starts when the bucket (or local parent) can't be listed."""
    fs, path = filesystem(location)
    bucket = path.split("/", 1)[0] if is_uri(location) else str(Path(path).parent)
    try:
        info = fs.get_file_info(bucket)
    except (OSError, pa.ArrowException) as e:
        raise ConfigError(f"storage {location}: {_one_line(e)}") from None
    if info.type == pafs.FileType.NotFound and is_uri(location):
        raise ConfigError(f"storage {location}: bucket '{bucket}' not found (create it first)")


def _skipped(rel: str) -> bool:
    parts = rel.split("/")
    return rel.startswith(f"{TUNE_DIR}/") or rel.endswith(_SKIP_SUFFIXES) or any(p.startswith(".") for p in parts)


def _sqlite_snapshot(src: Path, dst: Path) -> None:
    """A consistent copy of a live SQLite file (the online backup API), never a torn one."""
    s, d = sqlite3.connect(f"file:{src}?mode=ro", uri=True), sqlite3.connect(dst)
    try:
        s.backup(d)
    finally:
        d.close()
        s.close()


class Mirror:
    """The local out dir mirrored to ``root`` (a URI or a local path), file by file, changed files only.

    Picklable (Tune pickles its callbacks): the filesystem is rebuilt lazily in each process.
    """

    def __init__(self, local: Path, root: str):
        self.local = Path(local)
        self.root = root.rstrip("/")
        self._fs: pafs.FileSystem | None = None
        self._path = ""
        self._sent: dict[str, tuple[int, int]] = {}

    def __getstate__(self) -> dict[str, Any]:
        return {"local": self.local, "root": self.root}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["local"], state["root"])  # type: ignore[misc]

    def __repr__(self) -> str:
        return f"Mirror({self.local} -> {self.root})"

    @property
    def tune_uri(self) -> str:
        """Tune's ``storage_path``: the experiment lands at ``<root>/tune/<experiment>``."""
        return f"{self.root}/{TUNE_DIR}"

    def _target(self) -> tuple[pafs.FileSystem, str]:
        if self._fs is None:
            self._fs, self._path = filesystem(self.root)
        return self._fs, self._path

    # ------------------------------------------------------------------ reading the remote side

    def remote_files(self) -> dict[str, int]:
        """Relative path -> size of every mirrored file under root (Tune's dir excluded)."""
        fs, path = self._target()
        infos = fs.get_file_info(pafs.FileSelector(path, recursive=True, allow_not_found=True))
        found = {}
        for info in infos:
            if info.type == pafs.FileType.File:
                rel = info.path[len(path) + 1 :]
                if not _skipped(rel):
                    found[rel] = info.size
        return found

    def read_remote(self, rel: str) -> bytes | None:
        fs, path = self._target()
        try:
            with fs.open_input_stream(f"{path}/{rel}") as f:
                return f.read()
        except FileNotFoundError:
            return None
        except OSError as e:
            if "not exist" in str(e) or "NoSuchKey" in str(e) or "not found" in str(e).lower():
                return None
            raise

    def remote_state(self) -> dict[str, Any] | None:
        raw = self.read_remote(STATE_FILE)
        if raw is None:
            return None
        try:
            return json.loads(raw)
        except ValueError:
            raise ConfigError(f"{self.root}/{STATE_FILE}: unreadable sweep state") from None

    # ------------------------------------------------------------------ upload

    def _upload(self, src: Path, rel: str) -> None:
        fs, path = self._target()
        dest = f"{path}/{rel}"
        if not is_uri(self.root):  # object stores have no directories (creating one writes a marker object)
            fs.create_dir(dest.rsplit("/", 1)[0], recursive=True)
        with tempfile.TemporaryDirectory() as tmp:
            if src.suffix in _SQLITE_SUFFIXES:
                snap = Path(tmp) / src.name
                _sqlite_snapshot(src, snap)
                src = snap
            data = src.read_bytes()
        if is_uri(self.root):  # one PUT: an object is replaced whole or not at all
            with fs.open_output_stream(dest) as f:
                f.write(data)
        else:  # a local/NFS path: write aside, then rename over
            tmp_dest = f"{dest}.{uuid.uuid4().hex[:8]}.tmp"
            with fs.open_output_stream(tmp_dest) as f:
                f.write(data)
            fs.move(tmp_dest, dest)

    def push(self, *, only: tuple[str, ...] | None = None, prune: bool = False) -> list[str]:
        """Upload every local file that changed since the last push (``only``: just these relative paths);
        returns their relative paths.

        ``prune``: also delete mirrored files under root that are no longer on the local side (the
        end of a sweep, when the local dir is complete), so the layouts stay equal.
        """
        sent = []
        local_files = {}
        if self.local.is_dir():
            for p in sorted(self.local.rglob("*")):
                rel = p.relative_to(self.local).as_posix()
                if p.is_file() and not _skipped(rel):
                    local_files[rel] = p
        for rel, p in local_files.items():
            if only is not None and rel not in only:
                continue
            st = p.stat()
            key = (st.st_size, st.st_mtime_ns)
            if self._sent.get(rel) == key:
                continue
            self._upload(p, rel)
            self._sent[rel] = key
            sent.append(rel)
        if prune:
            fs, path = self._target()
            for rel in set(self.remote_files()) - set(local_files):
                fs.delete_file(f"{path}/{rel}")
                self._sent.pop(rel, None)
        return sent

    # ------------------------------------------------------------------ download

    def pull(self) -> list[str]:
        """Download every mirrored file into the local dir (replacing local copies); returns them."""
        fs, path = self._target()
        got = []
        for rel in sorted(self.remote_files()):
            dest = self.local / rel
            dest.parent.mkdir(parents=True, exist_ok=True)
            tmp = dest.with_name(f".{dest.name}.{uuid.uuid4().hex[:8]}.tmp")
            with fs.open_input_stream(f"{path}/{rel}") as f:
                tmp.write_bytes(f.read())
            os.replace(tmp, dest)
            st = dest.stat()
            self._sent[rel] = (st.st_size, st.st_mtime_ns)
            got.append(rel)
        return got


# --------------------------------------------------------------------------- Tune's snapshot and checkpoints


def upload_snapshot(staging: str | Path, fs: pafs.FileSystem, fs_path: str) -> list[str]:
    """Tune's experiment snapshot (the top-level files of its driver staging dir: experiment state,
    searcher state, tuner.pkl) uploaded now and synchronously, where Tune would upload it in the background."""
    sent = []
    for p in sorted(Path(staging).iterdir()):
        if p.is_file() and p.suffix in (".json", ".pkl") and not p.name.startswith("tmp"):
            with fs.open_output_stream(f"{fs_path}/{p.name}") as f:
                f.write(p.read_bytes())
            sent.append(p.name)
    return sent


CHECKPOINT_PREFIX = "checkpoint_"


def prune_checkpoints(fs: pafs.FileSystem, trial_fs_path: str, keep: str) -> list[str]:
    """Delete a trial's ``checkpoint_NNNNNN`` dirs older than ``keep`` (the path of the one the uploaded
    snapshot names); newer ones (uploaded by a worker, not yet registered) are left alone."""
    keep_name = keep.rstrip("/").rsplit("/", 1)[-1]
    if not keep_name.startswith(CHECKPOINT_PREFIX):
        return []
    deleted = []
    for info in fs.get_file_info(pafs.FileSelector(trial_fs_path, allow_not_found=True)):
        name = info.base_name
        if info.type == pafs.FileType.Directory and name.startswith(CHECKPOINT_PREFIX) and name < keep_name:
            fs.delete_dir(info.path)
            deleted.append(name)
    return deleted


def _local_state(out: Path) -> dict[str, Any] | None:
    try:
        return json.loads((out / STATE_FILE).read_text())
    except (OSError, ValueError):
        return None


def prepare_out(mirror: Mirror, *, resume: bool) -> None:
    """Before a sweep starts or resumes with shared storage: refuse a clash, fetch what a resume needs.

    Fresh start: the root must not hold a sweep already. Resume: the root's copy is downloaded when
    there is no local copy, or when the root's is newer (continued from another machine: more resumes).
    A local copy at least as new is kept: it is the one the mirror was made from.
    """
    remote = mirror.remote_state()
    if not resume:
        if remote is not None:
            raise ConfigError(
                f"{mirror.root}: already holds sweep '{remote.get('name')}'; pass --resume to continue it, "
                "or choose another --out name or --storage"
            )
        return
    local = _local_state(mirror.local)
    if remote is None:
        if local is None:
            raise ConfigError(f"--resume: neither {mirror.local} nor {mirror.root} holds a sweep to resume (no {STATE_FILE})")
        return
    if local is not None and remote.get("config_hash") != local.get("config_hash"):
        raise ConfigError(
            f"--resume: {mirror.local} (config {local.get('config_hash')}) and {mirror.root} "
            f"(config {remote.get('config_hash')}) hold different sweeps; choose another --out or --storage"
        )
    if local is None or int(remote.get("resumes", 0)) > int(local.get("resumes", 0)):
        mirror.pull()


def fetch_remote_sweep(uri: str) -> tuple[Path, Mirror]:
    """``dpmix-ray report s3://…``: the sweep's mirrored files in a local cache dir, and the mirror back to it."""
    fs, path = filesystem(uri)
    cache = Path(os.environ.get("DPMIX_CACHE") or Path.home() / ".cache" / "dpmix-ray").expanduser()  # = synth.pipelines.cache_root()
    local = cache / "remote" / path.replace(":", "_")
    mirror = Mirror(local, uri)
    if mirror.remote_state() is None:
        raise ConfigError(f"{uri}: not a sweep (no {STATE_FILE} there)")
    mirror.pull()
    return local, mirror
