"""A PNG grid of a synthetic set (one row per class) for the README; ``python -m dpmix_ray.synth`` draws it."""

from __future__ import annotations

import os
import uuid
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from dpmix_ray.synth.sets import read_set


def save_grid(path_to_set: str | Path, png_path: str | Path, per_class: int = 8) -> None:
    """Write the first ``per_class`` images of every class, one class per row, upscaled to ≥ 56 px."""
    x, y, names = read_set(Path(path_to_set).expanduser())
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
