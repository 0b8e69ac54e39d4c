"""dpmix_ray.storage without Ray or S3: the mirror onto a local "shared" path (the same pyarrow calls as for
s3://, which tests/test_multinode.py runs against a real S3 API), resume rules, Tune snapshot and checkpoints."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pyarrow.fs as pafs
import pytest

from dpmix_ray import storage as st
from dpmix_ray.errors import ConfigError


def _sweep_dir(root: Path, *, resumes: int = 0, config_hash: str = "h1") -> Path:
    out = root / "mn"
    (out / st.TUNE_DIR / "trials").mkdir(parents=True)
    (out / st.TUNE_DIR / "trials" / "experiment_state.json").write_text("{}")  # Tune's own: never mirrored
    (out / "release").mkdir()
    (out / "release" / "best.md").write_text("best")
    (out / st.STATE_FILE).write_text(json.dumps({"name": "mn", "config_hash": config_hash, "resumes": resumes}))
    (out / "trials.jsonl").write_text('{"a": 1}\n')
    (out / "sweep_state.tmp").write_text("half")  # an atomic write in progress
    with sqlite3.connect(out / "optuna.db") as c:
        c.execute("CREATE TABLE t (x)")
        c.execute("INSERT INTO t VALUES (1)")
    return out


def _files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_sweep_root_and_where_storage_comes_from(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    assert st.sweep_root("s3://bucket/sweeps/", Path("/x/results/mn")) == "s3://bucket/sweeps/mn"
    assert st.sweep_root(str(tmp_path), Path("results/mn")) == str(tmp_path / "mn")
    monkeypatch.delenv(st.STORAGE_ENV, raising=False)
    assert st.base_location(None) is None
    monkeypatch.setenv(st.STORAGE_ENV, "s3://env/x")
    assert st.base_location(None) == "s3://env/x" and st.base_location("s3://cfg/y") == "s3://cfg/y"
    assert st.is_uri("s3://b/k") and not st.is_uri("/nfs/x") and not st.is_uri("file:///nfs/x")


def test_push_mirrors_the_out_dir_but_not_tune_and_only_what_changed(tmp_path: Path) -> None:
    out = _sweep_dir(tmp_path / "local")
    m = st.Mirror(out, str(tmp_path / "shared" / "mn"))
    assert sorted(m.push()) == [st.STATE_FILE, "optuna.db", "release/best.md", "trials.jsonl"]
    assert m.push() == []  # nothing changed
    (out / "trials.jsonl").write_text('{"a": 1}\n{"b": 2}\n')
    assert m.push() == ["trials.jsonl"]
    remote = tmp_path / "shared" / "mn"
    assert not (remote / st.TUNE_DIR).exists() and not (remote / "sweep_state.tmp").exists()
    with sqlite3.connect(remote / "optuna.db") as c:  # a consistent SQLite copy, not the raw bytes
        assert c.execute("SELECT x FROM t").fetchall() == [(1,)]
    (out / "release" / "best.md").unlink()
    m.push(prune=True)
    assert not (remote / "release" / "best.md").exists()  # layouts stay equal
    assert m.push(only=("optuna.db",)) == []


def test_pull_into_an_empty_dir_gives_the_same_files(tmp_path: Path) -> None:
    out = _sweep_dir(tmp_path / "a")
    st.Mirror(out, str(tmp_path / "shared" / "mn")).push()
    fresh = tmp_path / "b" / "mn"
    st.Mirror(fresh, str(tmp_path / "shared" / "mn")).pull()
    expected = {k: v for k, v in _files(out).items() if not k.startswith(f"{st.TUNE_DIR}/") and not k.endswith(".tmp")}
    got = _files(fresh)
    assert set(got) == set(expected)
    assert {k: v for k, v in got.items() if k != "optuna.db"} == {k: v for k, v in expected.items() if k != "optuna.db"}
    with sqlite3.connect(fresh / "optuna.db") as c:  # a backup copy: same rows, its own header counters
        assert c.execute("SELECT x FROM t").fetchall() == [(1,)]


def test_prepare_out_refuses_clashes_and_fetches_what_a_resume_needs(tmp_path: Path) -> None:
    shared = str(tmp_path / "shared" / "mn")
    st.Mirror(_sweep_dir(tmp_path / "first", resumes=1), shared).push()

    with pytest.raises(ConfigError, match="already holds sweep 'mn'"):  # a fresh start onto a stored sweep
        st.prepare_out(st.Mirror(tmp_path / "new" / "mn", shared), resume=False)
    with pytest.raises(ConfigError, match="neither"):
        st.prepare_out(st.Mirror(tmp_path / "none" / "mn", str(tmp_path / "empty" / "mn")), resume=True)

    empty = st.Mirror(tmp_path / "fresh" / "mn", shared)
    st.prepare_out(empty, resume=True)  # nothing local: fetched
    assert json.loads((tmp_path / "fresh" / "mn" / st.STATE_FILE).read_text())["resumes"] == 1

    older = _sweep_dir(tmp_path / "older", resumes=0)
    (older / "trials.jsonl").write_text("stale\n")
    st.prepare_out(st.Mirror(older, shared), resume=True)  # the stored copy was continued elsewhere: fetched
    assert (older / "trials.jsonl").read_text() == '{"a": 1}\n'

    newer = _sweep_dir(tmp_path / "newer", resumes=1)
    (newer / "trials.jsonl").write_text("local is the newest\n")
    st.prepare_out(st.Mirror(newer, shared), resume=True)  # the mirror was made from it: kept
    assert (newer / "trials.jsonl").read_text() == "local is the newest\n"

    with pytest.raises(ConfigError, match="different sweeps"):
        st.prepare_out(st.Mirror(_sweep_dir(tmp_path / "other", config_hash="h2"), shared), resume=True)


def test_snapshot_upload_and_checkpoint_pruning(tmp_path: Path) -> None:
    fs = pafs.LocalFileSystem()
    staging, exp = tmp_path / "staging", tmp_path / "exp"
    staging.mkdir()
    exp.mkdir()
    (staging / "experiment_state-1.json").write_text("{}")
    (staging / "searcher-state-1.pkl").write_bytes(b"p")
    (staging / "tmp-searcher.pkl").write_bytes(b"half")
    (staging / "trial_a").mkdir()
    assert st.upload_snapshot(staging, fs, str(exp)) == ["experiment_state-1.json", "searcher-state-1.pkl"]

    trial = exp / "trial_a"
    for i in range(4):
        (trial / f"checkpoint_{i:06d}").mkdir(parents=True)
    (trial / "result.json").write_text("")
    assert st.prune_checkpoints(fs, str(trial), str(trial / "checkpoint_000002")) == ["checkpoint_000000", "checkpoint_000001"]
    assert sorted(p.name for p in trial.iterdir()) == ["checkpoint_000002", "checkpoint_000003", "result.json"]  # newer kept


def test_unreachable_storage_is_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")  # nothing listens: refused at once
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "x")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "x")
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    with pytest.raises(ConfigError) as e:
        st.check_reachable("s3://no-bucket/sweeps/mn")
    assert "\n" not in str(e.value) and "s3://no-bucket" in str(e.value)
