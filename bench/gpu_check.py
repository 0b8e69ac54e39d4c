"""The CUDA paths that need no Ray, on one GPU, in under 4 minutes; the last line is one JSON object.

1. ``grad_step``: the fast private step (``clipped_sum_fast`` + noise) against the non-private step for
   ``wrn16_4`` at 32×32×3, B ∈ {64, 128, 256} × K ∈ {1, 4, 16}; the steps are ``bench/grad_step.py``'s
   (``make_step``), timed here with CUDA synchronisation (median of ``--reps`` after a warm-up) and
   measured by ``torch.cuda.max_memory_allocated`` over what was live before the step.
2. ``train``: a few steps of ``train()`` on CUDA (dpmix_self, K = 2, m = 1, wrn16_4) on a random npz set.
3. ``synth``: the ``tiny-random`` diffusers pipeline in fp16 on CUDA through ``ShardGenerator``, the class
   the Ray Data actors run (without Ray).

Each stage reports its own error instead of stopping the others; the exit code is 1 if any stage failed.
Without a CUDA device: one line saying so, exit 0. ``--smoke`` runs every stage on the CPU at toy sizes
(what the tests here run: it checks the code paths and the imports, not the GPU).

    python bench/gpu_check.py [--smoke] [--reps 3] [--budget-s 150] [--only grad_step|train|synth ...]

On a machine with only torch: ``bench/gpu_check.sh`` (installs the wheels from ``make gpu-wheels``).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import platform
import statistics
import sys
import tempfile
import time
import traceback
import types
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/grad_step.py
sys.path.insert(1, str(Path(__file__).resolve().parents[1]))  # the source tree

BS, KS = (64, 128, 256), (1, 4, 16)
SMOKE_BS, SMOKE_KS = (2,), (1, 2)
_PYARROW = {"real": True}
STAGES = ("grad_step", "train", "synth")


def _stub_pyarrow() -> str:
    """pyarrow (55 MB) is not among the shipped wheels; data.py and synth/sets.py import it at module level
    but no stage here reads or writes Parquet. Without it, an empty stand-in lets them import."""
    if importlib.util.find_spec("pyarrow") is not None:
        import pyarrow

        return pyarrow.__version__
    pa, pq = types.ModuleType("pyarrow"), types.ModuleType("pyarrow.parquet")
    pa.parquet = pq  # type: ignore[attr-defined]
    sys.modules.update({"pyarrow": pa, "pyarrow.parquet": pq})
    _PYARROW["real"] = False
    return "absent (stand-in: no Parquet read or written)"


@contextmanager
def _generators_on(device: torch.device) -> Iterator[None]:
    """grad_step.make_step draws its noise from ``torch.Generator()``, a CPU generator: while it builds its steps,
    its module sees a ``torch`` whose ``Generator()`` is one on ``device`` (nothing else changes)."""
    import grad_step

    proxy = types.ModuleType("torch")
    proxy.__dict__.update(vars(torch))
    proxy.Generator = lambda *a, **k: torch.Generator(device=device)  # type: ignore[attr-defined]
    grad_step.torch = proxy  # type: ignore[attr-defined]
    try:
        yield
    finally:
        grad_step.torch = torch  # type: ignore[attr-defined]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(step: Callable[[], None], device: torch.device, reps: int) -> float:
    times = []
    for _ in range(reps):
        _sync(device)
        start = time.perf_counter()
        step()
        _sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _peak_mb(step: Callable[[], None], device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    _sync(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    step()
    _sync(device)
    return (torch.cuda.max_memory_allocated(device) - base) / 2**20


def grad_step_stage(device: torch.device, *, smoke: bool, reps: int, deadline: float) -> dict[str, Any]:
    import torch.nn.functional as F
    from grad_step import CLASSES, make_step

    from dpmix_ray.config import ModelConfig
    from dpmix_ray.models import build_model

    size = 8 if smoke else 32
    rows, skipped = [], []
    for b in SMOKE_BS if smoke else BS:
        for k in SMOKE_KS if smoke else KS:
            if time.monotonic() > deadline:
                skipped.append({"B": b, "K": k})
                continue
            torch.manual_seed(0)
            model = build_model(ModelConfig(name="wrn16_4"), in_channels=3, num_classes=CLASSES, image_size=size).to(device).train()
            x = torch.rand(b, k, 3, size, size, device=device)
            y = F.one_hot(torch.randint(0, CLASSES, (b, k), device=device), CLASSES).float()
            try:
                with _generators_on(device):
                    steps = {v: make_step(v, model, x, y) for v in ("nonprivate", "fast")}
                for step in steps.values():
                    step()  # warm-up: cuDNN autotuning, allocator
                seconds = {v: _timed(s, device, reps) for v, s in steps.items()}
                mem = {v: _peak_mb(s, device) for v, s in steps.items()}
            except torch.cuda.OutOfMemoryError:
                rows.append({"B": b, "K": k, "error": "CUDA out of memory"})
                torch.cuda.empty_cache()
                continue
            finally:
                steps = {}
                del model, x, y
            row: dict[str, Any] = {
                "B": b, "K": k, "nonprivate_s": round(seconds["nonprivate"], 5), "fast_s": round(seconds["fast"], 5),
                "time_ratio": round(seconds["fast"] / seconds["nonprivate"], 3),
            }
            if mem["nonprivate"] is not None:
                row |= {"nonprivate_peak_mb": round(mem["nonprivate"], 1), "fast_peak_mb": round(mem["fast"], 1),
                        "mem_ratio": round(mem["fast"] / mem["nonprivate"], 3)}
            rows.append(row)
            print(f"grad_step wrn16_4 B={b:<3} K={k:<2} " + " ".join(f"{k2}={v}" for k2, v in row.items() if k2 not in ("B", "K")), file=sys.stderr, flush=True)
    done = [r for r in rows if "time_ratio" in r]
    out: dict[str, Any] = {"model": "wrn16_4", "image": f"3x{size}x{size}", "reps": reps, "rows": rows}
    if done:
        out["worst_time_ratio"] = max(r["time_ratio"] for r in done)
        if "mem_ratio" in done[0]:
            out["worst_mem_ratio"] = max(r["mem_ratio"] for r in done)
    if skipped:
        out["skipped_over_budget"] = skipped
    return out


def train_stage(device: torch.device, *, smoke: bool, tmp: Path) -> dict[str, Any]:
    import numpy as np

    from dpmix_ray.config import TrainConfig
    from dpmix_ray.trainer import train

    rng = np.random.default_rng(0)
    n, size = (120, 8) if smoke else (512, 32)
    np.savez(tmp / "random.npz", x=rng.integers(0, 256, (n, 3, size, size), dtype=np.uint8), y=np.arange(n) % 10)
    cfg = TrainConfig.model_validate({
        "method": "dpmix_self", "device": device.type, "seed": 0,
        "data": {"name": f"npz:{tmp / 'random.npz'}"},
        "model": {"name": "cnn_tiny" if smoke else "wrn16_4"},
        "mix": {"aug_multiplicity": 2, "self_mix": 1},
        "optim": {"batch_size": 32 if smoke else 128, "epochs": 2, "lr": 1.0},
        "privacy": {"epsilon": 8.0, "delta": 1e-3},
    })
    start = time.perf_counter()
    result = train(cfg, progress=False)
    seconds = time.perf_counter() - start
    keep = ("steps", "val_accuracy", "epsilon_spent", "noise_multiplier", "private", "images_per_second")
    out = {k: result.get(k) for k in keep} | {"seconds": round(seconds, 2), "device": result.get("config", {}).get("device")}
    if not (isinstance(out["val_accuracy"], float) and math.isfinite(out["val_accuracy"]) and (out["steps"] or 0) > 0):
        raise RuntimeError(f"train() returned no finite accuracy or no steps: {out}")
    return out


def synth_stage(device: torch.device, *, smoke: bool) -> dict[str, Any]:
    from dpmix_ray.synth.pipelines import resolve_model, to_uint8
    from dpmix_ray.synth.sets import Plan, ShardGenerator

    classes = ["cat", "dog"]
    plan = Plan(tuple(classes), 2, 4, 0)
    spec = resolve_model("tiny-random", progress=False)
    start = time.perf_counter()
    gen = ShardGenerator(spec, classes=classes, prompt="a photo of a {label}", steps=2, guidance=1.0, image_size=8,
                         channels=3, device=device.type, threads=1, plan=plan)  # what each Ray Data actor constructs
    loaded = time.perf_counter() - start
    pipe_dtype = str(gen.source.pipe.unet.dtype) if hasattr(gen.source, "pipe") else None
    path = "ShardGenerator.source (the call inside ShardGenerator.__call__; pyarrow absent)"
    if _PYARROW["real"]:
        table = gen(plan.table(0))  # the whole actor call: plan rows in, image rows out
        path = f"ShardGenerator.__call__ ({table.num_rows} rows) + .source"
    images = gen.source(plan.labels(0).tolist(), [11, 12, 13, 14])
    seconds = time.perf_counter() - start
    pixels = to_uint8(images, image_size=8, channels=3)
    if not (torch.isfinite(images).all() and images.min() >= 0 and images.max() <= 1 and images.std() > 0):
        raise RuntimeError("the pipeline returned non-finite, out-of-range or constant images")
    return {"model": "tiny-random", "unet_dtype": pipe_dtype, "path": path, "images": list(images.shape),
            "uint8": list(pixels.shape), "load_s": round(loaded, 2), "seconds": round(seconds, 2)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true", help="CPU, toy sizes: every stage's code path and imports, no GPU")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--budget-s", type=float, default=150.0, help="grad_step rows not started by then are listed as skipped")
    ap.add_argument("--only", choices=STAGES, action="append", help="run just this stage (repeatable)")
    args = ap.parse_args()

    if not args.smoke and not torch.cuda.is_available():
        print(json.dumps({"gpu": None, "torch": torch.__version__, "skipped": "no CUDA device: nothing measured (run with --smoke for a CPU check of the code paths)"}))
        return 0
    device = torch.device("cpu" if args.smoke else "cuda")
    if args.smoke:
        torch.set_num_threads(1)
    started = time.monotonic()
    report: dict[str, Any] = {
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "device": str(device), "torch": torch.__version__, "cuda": torch.version.cuda, "python": platform.python_version(),
        "pyarrow": _stub_pyarrow(), "smoke": args.smoke,
    }
    failed = False
    stages: list[tuple[str, Callable[[], dict[str, Any]]]] = [
        ("grad_step", lambda: grad_step_stage(device, smoke=args.smoke, reps=1 if args.smoke else args.reps, deadline=started + args.budget_s)),
    ]
    with tempfile.TemporaryDirectory() as tmp:
        stages += [("train", lambda: train_stage(device, smoke=args.smoke, tmp=Path(tmp))), ("synth", lambda: synth_stage(device, smoke=args.smoke))]
        for name, run in stages:
            if args.only and name not in args.only:
                continue
            t0 = time.monotonic()
            try:
                report[name] = run()
            except Exception as e:  # noqa: BLE001 - one stage's failure is reported, the others still run
                failed = True
                report[name] = {"error": f"{type(e).__name__}: {' '.join(str(e).split())[:300]}",
                                "where": traceback.format_exc(limit=-3).strip().splitlines()[-3:]}
            report[name]["stage_s"] = round(time.monotonic() - t0, 1)
            print(f"{name}: {json.dumps(report[name])[:300]}", file=sys.stderr, flush=True)
    report["total_s"] = round(time.monotonic() - started, 1)
    print(json.dumps(report))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
