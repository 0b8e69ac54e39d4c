"""Model variants for the cnn study only (registered into ``models._SCRATCH`` by recipe_runs --variants).

``cnn_v0`` is the ``cnn`` this project shipped before (four 3×3 convs at full resolution, GroupNorm,
tanh, pooled to 2×2), kept here to measure the replacement against it; ``cnn_narrow`` is the new
``cnn`` at half width.
"""

from __future__ import annotations

from torch import nn

from dpmix_ray.models import SmallCNN, _group_norm


class OldSmallCNN(nn.Module):
    def __init__(self, in_channels: int, num_classes: int) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        for i, (c_in, c_out) in enumerate([(in_channels, 16), (16, 32), (32, 64), (64, 64)]):
            layers += [nn.Conv2d(c_in, c_out, 3, padding=1), _group_norm(c_out, 8), nn.Tanh()]
            if i in (1, 2):
                layers.append(nn.MaxPool2d(2))
        self.features = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(2), nn.Flatten())
        self.hidden = nn.Sequential(nn.Linear(64 * 4, 128), nn.Tanh())
        self.head = nn.Linear(128, num_classes)

    def forward(self, x):
        return self.head(self.hidden(self.features((x - 0.5) * 2.0)))


VARIANTS = {
    "cnn_v0": OldSmallCNN,
    "cnn_narrow": lambda c, k: SmallCNN(c, k, widths=(16, 32, 32), hidden=64),
}
