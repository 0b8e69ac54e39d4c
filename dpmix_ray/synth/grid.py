"""A PNG grid of a synthetic set (one row per class) for the README.

Command: ``python -m dpmix_ray.synth.grid SET_DIR_OR_CONFIG.yaml OUT.png [--per-class N] [--set k=v …]``.
Given a config file it first generates (or reuses) the config's ``synth`` set.
"""

from __future__ import annotations

import argparse
import os
import sys
import uuid
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from dpmix_ray.errors import DPMixError


def save_grid(path_to_set: str | Path, png_path: str | Path, per_class: int = 8) -> None:
    """Write the first ``per_class`` images of every class, one class per row, upscaled to ≥ 56 px."""
    from dpmix_ray.synth.sets import _read_set

    x, y, names = _read_set(Path(path_to_set).expanduser())
    pad = 2
    size = x.shape[-1]
    scale = max(1, -(-56 // size))
    rows = []
    for c in range(len(names)):
        imgs = x[y == c][:per_class]
        cells = torch.ones(per_class, x.shape[1], size, size)
        cells[: len(imgs)] = imgs
        rows.append(cells)
    grid = torch.ones(x.shape[1], len(names) * (size + pad) + pad, per_class * (size + pad) + pad)
    for r, cells in enumerate(rows):
        for k in range(per_class):
            top, left = pad + r * (size + pad), pad + k * (size + pad)
            grid[:, top : top + size, left : left + size] = cells[k]
    arr = (grid.clamp(0, 1) * 255).round().to(torch.uint8).numpy()
    img = Image.fromarray(arr[0] if arr.shape[0] == 1 else np.ascontiguousarray(arr.transpose(1, 2, 0)))
    img = img.resize((img.width * scale, img.height * scale), Image.Resampling.NEAREST)
    out = Path(png_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{uuid.uuid4().hex[:8]}.tmp")
    img.save(tmp, format="PNG")
    os.replace(tmp, out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dpmix_ray.synth.grid", description=__doc__.splitlines()[0])
    parser.add_argument("source", help="a synthetic set directory, or a config file with a synth section")
    parser.add_argument("png", help="where to write the PNG grid")
    parser.add_argument("--per-class", type=int, default=8)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a synth config key")
    args = parser.parse_args(argv)
    try:
        source = Path(args.source)
        if source.is_file():
            from dpmix_ray.config import load_synth_config
            from dpmix_ray.synth.sets import generate

            source = generate(load_synth_config(source, args.set))
        save_grid(source, args.png, per_class=args.per_class)
    except DPMixError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(args.png)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
