"""Memory of the image sets the trainer holds on its device: float32 against uint8 codes (``ImageSet.compact``).

For each shape, generated uint8 pixels become the float32 set a loader returns (``data._to_float``);
then, each in a fresh process (so peaks do not mix), ``as_float`` moves that set to the device as it is,
``as_uint8`` compacts it first, and both convert one chunk of 512 images as the trainer does. Reported:
the bytes the device holds for the set (x, y, keys, table), the device's peak during set-up and the
chunk (CUDA only: ``torch.cuda.max_memory_allocated``), and the host process's peak RSS growth over
the loaded float set (what compaction's temporaries cost on the host).

    .venv/bin/python bench/data_memory.py [--device cpu|cuda]

Last line: one JSON object, a row per (shape, layout).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys

import numpy as np
import torch

from dpmix_ray.data import ImageSet, _to_float

SHAPES = {"mnist 60,000×1×28×28": (60_000, 1, 28, 28), "cifar 50,000×3×32×32": (50_000, 3, 32, 32)}


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def measure(shape: tuple[int, ...], layout: str, device: str) -> dict[str, float]:
    """One (shape, layout) in this process: held device MB, device peak MB (CUDA), host RSS growth MB."""
    codes = np.random.default_rng(0).integers(0, 256, size=shape, dtype=np.uint8)
    loaded = ImageSet(_to_float(codes), torch.zeros(shape[0], dtype=torch.long), torch.arange(shape[0]))
    del codes
    rss0 = _rss_mb()
    dev = torch.device(device)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    held = (loaded.compact() if layout == "as_uint8" else loaded).to(dev)
    chunk = held.images(torch.arange(512, device=dev))
    assert torch.equal(chunk.cpu(), loaded.x[:512])
    held_bytes = sum(t.numel() * t.element_size() for t in (held.x, held.y, held.key, held.lut) if t is not None)
    peak = torch.cuda.max_memory_allocated(dev) / 2**20 if dev.type == "cuda" else float("nan")
    return {"held_mb": held_bytes / 2**20, "device_peak_mb": peak, "host_rss_growth_mb": _rss_mb() - rss0}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--one", nargs=2, metavar=("SHAPE", "LAYOUT"), help=argparse.SUPPRESS)  # the child process
    args = ap.parse_args()
    if args.one:
        print(json.dumps(measure(SHAPES[args.one[0]], args.one[1], args.device)))
        return 0
    rows = []
    for name in SHAPES:
        for layout in ("as_float", "as_uint8"):
            out = subprocess.run([sys.executable, __file__, "--device", args.device, "--one", name, layout],
                                 capture_output=True, text=True, check=True).stdout
            row = {"shape": name, "layout": layout, "device": args.device} | json.loads(out.splitlines()[-1])
            print(f"{name:24} {layout:9} held {row['held_mb']:8.1f} MB  device peak {row['device_peak_mb']:8.1f} MB  "
                  f"host RSS +{row['host_rss_growth_mb']:7.1f} MB", flush=True)
            rows.append(row)
    print(json.dumps(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
