"""A training set larger than the memory cap, read from its memory-mapped store (``data.storage=mmap``),
against the in-memory path on a set that fits.

Generates two image stores of random uint8 3×64×64 pixels in /tmp (``data.write_image_store``,
streamed): ``--big`` examples (default 200,000: 2.4 GiB of pixels, 9.4 GiB as the float32 set the
in-memory path loads) and ``--small`` (default 10,000). Each case runs in a fresh process (so peaks
do not mix): the same private run, ``cnn_tiny``, dpsgd, expected batch 256, ``--steps`` logical steps,
torch on one thread, val and test 1 % each (evaluation reads the store too). Cases:

* ``memory small``: the in-memory path (``data.storage=memory``) on the small store;
* ``mmap small``: the same set through the store;
* ``mmap big``: the big store, its pages in the page cache (it was just written and hashed);
* ``mmap big, cold``: the same after ``posix_fadvise(DONTNEED)`` drops its cached pages, so the
  sampled rows come from the disk.

Reported per case: seconds per step (the trainer's step time, not set-up), set-up seconds (splits,
whose key pass hashes every image), and peak RSS (``ru_maxrss``: it counts the store pages a process
has mapped and touched, which the kernel can reclaim, so it over-states what the mmap path needs),
beside the peak after the imports alone (torch and the project: about 0.75 GiB here). The big cases run
inside a memory cgroup limited to ``--cap-mb`` (default 1024 MB, under the 2.29 GiB of pixels alone;
page cache included, so the kernel must drop store pages to stay under it); the bench fails if one dies
there. Where no cgroup can be made (not root, no v1 memory controller) it falls back to failing when a
big case's peak RSS reaches the cap. The stores are deleted at the end.

    PYTHONPATH=. .venv/bin/python bench/big_data.py [--big 200000] [--small 10000] [--steps 20] [--cap-mb 1024]

Last line: one JSON object, a row per case.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from dpmix_ray.config import load_train_config
from dpmix_ray.data import load_splits, write_image_store
from dpmix_ray.trainer import fit

SHAPE = (3, 64, 64)
BATCH = 256
CASES = (("memory small", "memory", "small", False), ("mmap small", "mmap", "small", False),
         ("mmap big", "mmap", "big", False), ("mmap big, cold", "mmap", "big", True))


def generate(path: Path, n: int, rows: int = 4096) -> None:
    """A store of ``n`` random images in chunks of ``rows`` (never the whole set in memory)."""
    rng = np.random.default_rng(0)
    chunks = (rng.integers(0, 256, size=(min(rows, n - lo), *SHAPE), dtype=np.uint8) for lo in range(0, n, rows))
    write_image_store(path, chunks, rng.integers(0, 10, size=n), [f"c{i}" for i in range(10)])


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def measure(store: Path, storage: str, steps: int, cold: bool) -> dict[str, float]:
    """One case in this process: seconds per step, set-up seconds, peak RSS MB (and after the imports)."""
    torch.set_num_threads(1)
    imports = _peak_rss_mb()
    base = [f"data.name=npy:{store}", f"data.storage={storage}", "data.val_fraction=0.01", "data.test_fraction=0.01",
            "method=dpsgd", "mix.aug_multiplicity=1", "mix.self_mix=0", "model.name=cnn_tiny", f"optim.batch_size={BATCH}",
            "optim.physical_batch_size=64", "optim.lr=0.5", "privacy.epsilon=8", "privacy.delta=1e-6",  # δ < 1/N at N = 196,065
            "privacy.reproducible=true", "device=cpu"]
    t0 = time.perf_counter()
    splits = load_splits(load_train_config(None, base).data)
    setup = time.perf_counter() - t0
    if cold:
        fd = os.open(store / "x.npy", os.O_RDONLY)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        os.close(fd)
    n = len(splits.train)
    cfg = load_train_config(None, base + [f"optim.epochs={steps * BATCH / n}"])
    res = fit(cfg, splits=splits, progress=False).result
    train_seconds = res["steps"] * res["sample_rate"] * n / res["images_per_second"]  # G = 1
    return {"n_train": n, "steps": res["steps"], "s_per_step": train_seconds / res["steps"], "setup_s": setup,
            "imports_rss_mb": imports, "peak_rss_mb": _peak_rss_mb()}


_CGROUP_V1 = Path("/sys/fs/cgroup/memory")


def memory_cap(limit_mb: float) -> Path | None:
    """A fresh cgroup-v1 memory group limited to ``limit_mb`` (page cache included; swap too where accounted), or
    None where this machine offers none to us (not root, or no v1 memory controller)."""
    group = _CGROUP_V1 / f"dpmix-big-{os.getpid()}"
    try:
        group.mkdir()
        (group / "memory.limit_in_bytes").write_text(str(int(limit_mb * 2**20)))
        if (group / "memory.memsw.limit_in_bytes").exists():
            (group / "memory.memsw.limit_in_bytes").write_text(str(int(limit_mb * 2**20)))
    except OSError:
        return None
    return group


def run_case(cmd: list[str], group: Path | None) -> subprocess.CompletedProcess:
    """One case in a fresh process, inside ``group`` when given (the child joins it before it imports anything)."""
    join = (lambda: (group / "cgroup.procs").write_text(str(os.getpid()))) if group is not None else None
    return subprocess.run(cmd, capture_output=True, text=True, preexec_fn=join)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--big", type=int, default=200_000)
    ap.add_argument("--small", type=int, default=10_000)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--cap-mb", type=float, default=1024)
    ap.add_argument("--one", nargs=4, metavar=("STORE", "STORAGE", "STEPS", "COLD"), help=argparse.SUPPRESS)  # a child
    args = ap.parse_args()
    if args.one:
        store, storage, steps, cold = args.one
        print(json.dumps(measure(Path(store), storage, int(steps), cold == "1")))
        return 0
    tmp = Path(tempfile.mkdtemp(prefix="dpmix-big-", dir="/tmp"))
    rows = []
    try:
        for size, n in (("small", args.small), ("big", args.big)):
            t0 = time.perf_counter()
            generate(tmp / size, n)
            gib = n * np.prod(SHAPE) / 2**30
            print(f"generated {size}: {n:,} × {'×'.join(map(str, SHAPE))} uint8 = {gib:.2f} GiB in {time.perf_counter() - t0:.0f} s", flush=True)
        for name, storage, size, cold in CASES:
            group = memory_cap(args.cap_mb) if size == "big" else None
            try:
                child = run_case([sys.executable, __file__, "--one", str(tmp / size), storage, str(args.steps), str(int(cold))], group)
                capped = {} if group is None else {
                    "cap_mb": args.cap_mb, "cgroup_peak_mb": int((group / "memory.max_usage_in_bytes").read_text()) / 2**20,
                    "cap_hits": int((group / "memory.failcnt").read_text())}
            finally:
                if group is not None:
                    group.rmdir()
            if child.returncode != 0:
                print(f"{name}: the child process failed (exit {child.returncode}{', over the memory cap?' if group else ''}):\n"
                      f"{child.stderr[-4000:]}", file=sys.stderr)
                return 1
            row = {"case": name, "n": args.big if size == "big" else args.small} | json.loads(child.stdout.splitlines()[-1]) | capped
            cap = f"  in a {args.cap_mb:.0f} MB cgroup: peak {capped['cgroup_peak_mb']:.0f} MB, {capped['cap_hits']:,} reclaims" if capped else ""
            print(f"{name:15} N={row['n']:>8,}  {row['steps']} steps  {row['s_per_step'] * 1e3:7.1f} ms/step  "
                  f"set-up {row['setup_s']:6.1f} s  peak RSS {row['peak_rss_mb']:7.1f} MB (imports {row['imports_rss_mb']:.0f}){cap}", flush=True)
            rows.append(row)
    finally:
        shutil.rmtree(tmp)
    print(json.dumps(rows))
    over = [r["case"] for r in rows if r["n"] == args.big and "cap_mb" not in r and r["peak_rss_mb"] >= args.cap_mb]
    if over:  # no cgroup here: fall back to the process's peak RSS (which also counts the store's mapped pages)
        print(f"no memory cgroup, and peak RSS over {args.cap_mb:.0f} MB: {', '.join(over)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
