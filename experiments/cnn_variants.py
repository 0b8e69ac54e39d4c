"""Model variants for the cnn study only (registered into ``models._SCRATCH`` by recipe_runs --variants).

``cnn_v0`` is the ``cnn`` this project shipped before (four 3×3 convs at full resolution, GroupNorm,
tanh, pooled to 2×2), kept here to measure the replacement against it; ``cnn_narrow`` is the strided
WS/GroupNorm design at half width, ``cnn_plain_gn`` the same without weight standardisation, and
``cnn_tiny_wide`` is ``cnn_tiny``'s layout at twice the channels and hidden units.
"""

from __future__ import annotations

from torch import nn

from dpmix_ray.models import SmallCNN, TinyCNN, _group_norm


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


def _plain_gn(c: int, k: int) -> nn.Module:
    """SmallCNN with ordinary convolutions in place of the weight-standardised ones."""
    model = SmallCNN(c, k)
    for i, m in enumerate(model.features):
        if isinstance(m, nn.Conv2d):
            model.features[i] = nn.Conv2d(m.in_channels, m.out_channels, m.kernel_size, m.stride, m.padding)
    return model


def _tiny_wide(c: int, k: int) -> nn.Module:
    """cnn_tiny's layers (8×8/2 conv, 4×4/2 conv, tanh, stride-1 max-pools) at 32/64 channels, 64 hidden."""
    model = TinyCNN(c, k)
    model.features = nn.Sequential(
        nn.Conv2d(c, 32, 8, stride=2, padding=3), nn.Tanh(), nn.MaxPool2d(2, 1),
        nn.Conv2d(32, 64, 4, stride=2), nn.Tanh(), nn.MaxPool2d(2, 1),
        nn.AdaptiveAvgPool2d(4), nn.Flatten(),
    )
    model.hidden = nn.Sequential(nn.Linear(64 * 16, 64), nn.Tanh())
    model.head = nn.Linear(64, k)
    return model


VARIANTS = {
    "cnn_v0": OldSmallCNN,
    "cnn_narrow": lambda c, k: SmallCNN(c, k, widths=(16, 32, 32), hidden=64),
    "cnn_plain_gn": _plain_gn,
    "cnn_tiny_wide": _tiny_wide,
}
