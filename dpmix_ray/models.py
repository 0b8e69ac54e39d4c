"""Classifiers for DP training: a small CNN, WRN-16-4, and torchvision backbones with a linear head.

Every model takes float images in [0, 1] and normalises inside, so mixup and augmentation happen in
pixel space. Every model is ``torch.func.vmap(grad(...))``-friendly: the trainer maps over examples
and each example's batch is its group of augmented images, so nothing may share statistics across a
batch (no BatchNorm that trains) and there is no data-dependent Python control flow.

Every model names its classifier ``head`` (an ``nn.Linear``). ``model.weights`` initialises
everything but the head, which is always fresh: the task's classes are not the pretraining's.
``model.train: head`` trains only the head; the rest is frozen and, for backbones, kept in eval mode,
so pretrained BatchNorm keeps its running statistics and stays DP-safe. ``model.train: full`` on a
backbone with BatchNorm replaces each BatchNorm by GroupNorm: per-example normalisation is what DP
allows, and the pretrained BatchNorm statistics and affine parameters cannot carry over.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from dpmix_ray.config import ModelConfig
from dpmix_ray.errors import ConfigError, DataError

# --------------------------------------------------------------------------- small CNN


def _group_norm(channels: int, max_groups: int = 16) -> nn.GroupNorm:
    return nn.GroupNorm(math.gcd(max_groups, channels), channels)


class SmallCNN(nn.Module):
    """Three strided weight-standardised convolutions (5×5/2, 3×3/2, 3×3/2) with GroupNorm and tanh, a
    4×4 average pool, one hidden linear layer: ~190k parameters at the default widths.

    Why this shape (measured on MNIST-5k under DP-SGD: experiments/results/recipe/models*.jsonl): the previous
    four 3×3 convs at full resolution pooled to 2×2 reached 51–63 % where ``cnn_tiny`` reached 85–88 %,
    at 3× its cost. Downsampling in the first layer makes it as cheap per image as ``cnn_tiny``; the
    4×4 pool keeps where strokes are (pooling to 2×2 alone cost ~6 points); weight standardisation
    keeps each layer's output scale independent of how far the noisy updates have grown its
    weights, so one lr range suits every depth (De et al. 2022)."""

    def __init__(self, in_channels: int, num_classes: int, widths: tuple[int, int, int] = (32, 64, 64), hidden: int = 128) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        c_in = in_channels
        for i, c_out in enumerate(widths):
            kernel = 5 if i == 0 else 3
            layers += [WSConv2d(c_in, c_out, kernel, stride=2, padding=kernel // 2), _group_norm(c_out, 8), nn.Tanh()]
            c_in = c_out
        self.features = nn.Sequential(*layers)
        self.hidden = nn.Sequential(nn.Linear(c_in * 16, hidden), nn.Tanh())
        self.head = nn.Linear(hidden, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.hidden(_pool_to_4x4(self.features((x - 0.5) * 2.0)).flatten(1)))


class TinyCNN(nn.Module):
    """Tramèr & Boneh (2021)'s MNIST CNN (tanh; 8×8/2 conv, 4×4/2 conv, two small linears), ~26k
    parameters: about 20× cheaper per image than ``cnn`` at 28×28, which is what lets a CPU sweep
    run many DP-Mix trials (each example is a group of K + m + n images)."""

    def __init__(self, in_channels: int, num_classes: int) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, 16, 8, stride=2, padding=3), nn.Tanh(), MaxPool2x2Stride1(),
            nn.Conv2d(16, 32, 4, stride=2), nn.Tanh(), MaxPool2x2Stride1(),
        )
        self.hidden = nn.Sequential(nn.Linear(32 * 16, 32), nn.Tanh())
        self.head = nn.Linear(32, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] < 16:  # its strided 8×8 and 4×4 kernels need ≥ 16 px (sklearn digits are 8×8)
            x = F.interpolate(x, size=(16, 16), mode="bilinear", align_corners=False)
        return self.head(self.hidden(_pool_to_4x4(self.features((x - 0.5) * 2.0)).flatten(1)))


class MaxPool2x2Stride1(nn.Module):
    """``nn.MaxPool2d(2, 1)``, computed in channels-last layout: on CPU torch's NCHW max-pool kernel (with the
    indices its backward needs) took ~40 % of a ``cnn_tiny`` training step at 28×28; channels-last, the
    copies there and back included, forward and backward take half the time. Same values and indices."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        nhwc = x.permute(0, 2, 3, 1).contiguous().permute(0, 3, 1, 2)  # channels-last strides (vmap allows this form)
        return F.max_pool2d(nhwc, 2, 1).contiguous()


def _pool_to_4x4(h: torch.Tensor) -> torch.Tensor:
    """Average-pool to 4×4; 28×28 and 32×32 inputs already end there, and CPU adaptive pooling of a 4×4 map
    to itself still costs ~10 % of a small model's step."""
    return h if h.shape[-2:] == (4, 4) else F.adaptive_avg_pool2d(h, 4)


# --------------------------------------------------------------------------- WRN-16-4


class WSConv2d(nn.Conv2d):
    """A convolution with weight standardisation (zero mean, unit variance per output filter), which
    lets GroupNorm networks train as well as BatchNorm ones (De et al. 2022). ``grads.clipped_sum_fast``
    reads w' and the scale r from this forward's autograd nodes: keep it conv2d(x, (w − mean)·r)."""

    eps = 1e-5

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        mean = w.mean(dim=(1, 2, 3), keepdim=True)
        var = w.var(dim=(1, 2, 3), keepdim=True, unbiased=False)
        return F.conv2d(x, (w - mean) * torch.rsqrt(var + self.eps), self.bias, self.stride, self.padding, self.dilation, self.groups)


class _WideBlock(nn.Module):
    """Pre-activation residual block: GN-ReLU-conv twice, with a 1×1 shortcut when the shape changes."""

    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.norm1 = _group_norm(c_in)
        self.conv1 = WSConv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.norm2 = _group_norm(c_out)
        self.conv2 = WSConv2d(c_out, c_out, 3, padding=1, bias=False)
        self.shortcut = WSConv2d(c_in, c_out, 1, stride=stride, bias=False) if stride != 1 or c_in != c_out else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.norm1(x))
        skip = x if self.shortcut is None else self.shortcut(out)
        out = self.conv1(out)
        out = self.conv2(F.relu(self.norm2(out)))
        return out + skip


class WideResNet(nn.Module):
    """WRN-depth-width with GroupNorm (16 groups) and weight-standardised convs, as in De et al. 2022."""

    def __init__(self, in_channels: int, num_classes: int, depth: int = 16, width: int = 4) -> None:
        super().__init__()
        blocks_per_stage = (depth - 4) // 6
        widths = [16, 16 * width, 32 * width, 64 * width]
        self.stem = WSConv2d(in_channels, widths[0], 3, padding=1, bias=False)
        blocks: list[nn.Module] = []
        c_in = widths[0]
        for stage, c_out in enumerate(widths[1:]):
            for b in range(blocks_per_stage):
                blocks.append(_WideBlock(c_in, c_out, stride=2 if stage > 0 and b == 0 else 1))
                c_in = c_out
        self.blocks = nn.Sequential(*blocks)
        self.norm = _group_norm(c_in)
        self.head = nn.Linear(c_in, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.blocks(self.stem((x - 0.5) * 2.0))
        return self.head(F.relu(self.norm(out)).mean(dim=(2, 3)))


# --------------------------------------------------------------------------- torchvision backbones


@dataclass(frozen=True)
class Backbone:
    """How to use one torchvision model: its input size and the dotted name of its classifier layer."""

    input_size: int
    head: str


BACKBONES: dict[str, Backbone] = {
    "resnet18": Backbone(input_size=224, head="fc"),
    "vit_b_16": Backbone(input_size=224, head="heads.head"),
}
_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)


class BackboneClassifier(nn.Module):
    """A torchvision feature extractor and a fresh linear head; grey images are repeated to RGB, resized
    to the backbone's input size and ImageNet-normalised. A frozen backbone stays in eval mode."""

    def __init__(self, backbone: nn.Module, feature_dim: int, num_classes: int, input_size: int, *, frozen: bool) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = nn.Linear(feature_dim, num_classes)
        nn.init.zeros_(self.head.weight)  # a zero head starts at uniform predictions: the usual DP fine-tuning start
        nn.init.zeros_(self.head.bias)
        self.input_size = input_size
        self.frozen = frozen
        self.register_buffer("mean", torch.tensor(_IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(_IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
        if frozen:
            self.backbone.requires_grad_(False)
            self.backbone.eval()

    def train(self, mode: bool = True) -> "BackboneClassifier":
        super().train(mode)
        if self.frozen:
            self.backbone.eval()
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        if x.shape[-2:] != (self.input_size, self.input_size):
            x = F.interpolate(x, size=(self.input_size, self.input_size), mode="bilinear", align_corners=False)
        return self.head(self.backbone((x - self.mean) / self.std))


def _split_dotted(module: nn.Module, dotted: str) -> tuple[nn.Module, str]:
    *parents, leaf = dotted.split(".")
    for part in parents:
        module = getattr(module, part)
    return module, leaf


def _read_state_dict(path: str, what: str) -> dict[str, torch.Tensor]:
    p = Path(path).expanduser()
    if not p.is_file():
        raise DataError(f"model.weights: {p}: file not found ({what} needs a state_dict .pt/.pth/.safetensors)")
    try:
        if p.suffix == ".safetensors":
            from safetensors.torch import load_file

            sd = load_file(str(p), device="cpu")
        else:
            sd = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:  # torch.load / safetensors raise many types for a bad file
        raise DataError(f"model.weights: {p}: not a readable state_dict ({' '.join(str(e).split())[:200]})") from None
    if not isinstance(sd, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in sd.items()):
        raise DataError(f"model.weights: {p}: expected a state_dict (a mapping of names to tensors)")
    return sd


def _hub_state_dict(name: str) -> dict[str, torch.Tensor]:
    """torchvision's DEFAULT weights for ``name``, from the torch hub cache or a download."""
    from torchvision.models import get_model_weights

    try:
        return get_model_weights(name).DEFAULT.get_state_dict(progress=False, check_hash=True)
    except Exception:  # urllib, http and hash errors all mean the same thing to the user
        raise DataError(f"could not fetch {name} weights from the hub offline: pass model.weights=<local file>") from None


def _load_except_head(module: nn.Module, sd: dict[str, torch.Tensor], head: str, source: str, name: str) -> None:
    """Load every key except the head's, strictly: same names and same shapes, or a DataError."""
    prefix = head + "."
    sd = {k: v for k, v in sd.items() if not k.startswith(prefix)}
    expected = {k: v for k, v in module.state_dict().items() if not k.startswith(prefix)}
    missing, unexpected = sorted(expected.keys() - sd.keys()), sorted(sd.keys() - expected.keys())
    wrong = [k for k in sorted(expected.keys() & sd.keys()) if expected[k].shape != sd[k].shape]
    problems = [
        f"{label} {', '.join(keys[:3])}{'…' if len(keys) > 3 else ''} ({len(keys)})"
        for label, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong))
        if keys
    ]
    if problems:
        raise DataError(f"model.weights: {source} does not fit {name}: {'; '.join(problems)}")
    module.load_state_dict(sd, strict=False)


def batchnorm_to_groupnorm(module: nn.Module) -> nn.Module:
    """Replace every BatchNorm2d by a GroupNorm (up to 32 groups) over the same channels, in place."""
    for child_name, child in module.named_children():
        if isinstance(child, nn.BatchNorm2d):
            setattr(module, child_name, _group_norm(child.num_features, 32))
        else:
            batchnorm_to_groupnorm(child)
    return module


def _build_backbone(cfg: ModelConfig, num_classes: int) -> nn.Module:
    from torchvision.models import get_model

    spec = BACKBONES[cfg.name]
    net = get_model(cfg.name, weights=None)
    if cfg.weights is not None:
        sd = _hub_state_dict(cfg.name) if cfg.weights == "hub" else _read_state_dict(cfg.weights, cfg.name)
        _load_except_head(net, sd, spec.head, "hub" if cfg.weights == "hub" else cfg.weights, cfg.name)
    parent, leaf = _split_dotted(net, spec.head)
    feature_dim = getattr(parent, leaf).in_features
    setattr(parent, leaf, nn.Identity())
    if cfg.train == "full":
        batchnorm_to_groupnorm(net)
    return BackboneClassifier(net, feature_dim, num_classes, spec.input_size, frozen=cfg.train == "head")


# --------------------------------------------------------------------------- entry points

_SCRATCH: dict[str, Callable[[int, int], nn.Module]] = {
    "cnn": SmallCNN,
    "cnn_tiny": TinyCNN,
    "wrn16_4": lambda c, k: WideResNet(c, k, depth=16, width=4),
}


def build_model(cfg: ModelConfig, *, in_channels: int, num_classes: int, image_size: int) -> nn.Module:
    """The model ``cfg.name`` for images of ``in_channels`` × ``image_size``² and ``num_classes`` classes."""
    if cfg.name not in _SCRATCH and cfg.name not in BACKBONES:
        raise ConfigError(f"model.name: unknown model '{cfg.name}' (choose from {', '.join([*_SCRATCH, *BACKBONES])})")
    if cfg.train == "head" and cfg.weights is None:
        raise ConfigError("model.train: 'head' trains only the head on a frozen body, which needs model.weights")
    if cfg.name in BACKBONES:
        return _build_backbone(cfg, num_classes)
    if cfg.weights == "hub":
        raise ConfigError(f"model.weights: 'hub' is for torchvision backbones ({', '.join(BACKBONES)}), not {cfg.name}")
    if image_size < 8:
        raise ConfigError(f"model.name: {cfg.name} needs images of at least 8×8 (got {image_size}×{image_size})")
    model = _SCRATCH[cfg.name](in_channels, num_classes)
    if cfg.weights is not None:
        _load_except_head(model, _read_state_dict(cfg.weights, cfg.name), "head", cfg.weights, cfg.name)
    if cfg.train == "head":
        for name, p in model.named_parameters():
            p.requires_grad_(name.startswith("head."))
    return model


def assert_dp_compatible(model: nn.Module) -> None:
    """Refuse a model in which a BatchNorm would use batch statistics in training: they mix examples,
    so one example's gradient would depend on others and the per-example sensitivity bound fails."""
    modes = {m: m.training for m in model.modules()}
    model.train()
    try:
        offenders = [
            name
            for name, m in model.named_modules()
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and (m.training or not m.track_running_stats)
        ]
    finally:
        for m, mode in modes.items():
            m.training = mode
    if offenders:
        raise ConfigError(
            f"model: BatchNorm layer '{offenders[0]}' would train on batch statistics, which breaks DP: "
            "use GroupNorm (model.train=full replaces it) or freeze the backbone (model.train=head)"
        )
