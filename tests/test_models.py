"""Models: shapes, DP compatibility, vmap(grad) per-example gradients, weight loading."""

from __future__ import annotations

import urllib.error

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, vmap

from dpmix_ray.config import ModelConfig
from dpmix_ray.errors import ConfigError, DataError
from dpmix_ray.models import assert_dp_compatible, build_model


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """One intra-op thread: on a small shared CPU, oversubscribed threads made these tests ~5× slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _build(name: str, channels: int = 1, classes: int = 10, size: int = 28, **kw) -> nn.Module:
    return build_model(ModelConfig(name=name, **kw), in_channels=channels, num_classes=classes, image_size=size)


@pytest.mark.parametrize("name", ["cnn_tiny", "cnn", "wrn16_4"])
@pytest.mark.parametrize("channels", [1, 3])
def test_forward_shapes(name, channels):
    torch.manual_seed(0)
    model = _build(name, channels=channels, classes=7)
    for size in (8, 28, 32):
        out = model(torch.rand(2, channels, size, size))
        assert out.shape == (2, 7) and torch.isfinite(out).all()


def test_cnn_is_small():
    n = sum(p.numel() for p in _build("cnn").parameters())
    assert 50_000 <= n <= 200_000


@pytest.mark.parametrize("name", ["cnn", "cnn_tiny"])
@pytest.mark.parametrize("size", [28, 32, 64])
def test_cnn_pools_to_4x4_only_where_it_is_not_already(name, size):
    """Where the convolutions already end at 4×4 (cnn at 28 and 32 px, cnn_tiny at 28) the pool is skipped;
    elsewhere it pools; the logits equal those of an explicit adaptive pool either way."""
    torch.manual_seed(0)
    model = build_model(ModelConfig(name=name), in_channels=1, num_classes=10, image_size=size).double().eval()
    x = torch.rand(3, 1, size, size, dtype=torch.float64)
    h = model.features((x - 0.5) * 2.0)
    assert (h.shape[-1] == 4) == ((name, size) in {("cnn", 28), ("cnn", 32), ("cnn_tiny", 28)})
    expected = model.head(model.hidden(F.adaptive_avg_pool2d(h, 4).flatten(1)))
    torch.testing.assert_close(model(x), expected, rtol=0, atol=0)


def test_max_pool_2x2_stride_1_is_torch_max_pool_in_value_and_gradient():
    """Same values and gradient as nn.MaxPool2d(2, 1), and an NCHW-contiguous output."""
    from dpmix_ray.models import MaxPool2x2Stride1

    x = torch.randn(4, 3, 13, 11, dtype=torch.float64, requires_grad=True)
    g = torch.randn(4, 3, 12, 10, dtype=torch.float64)
    ours, ref = MaxPool2x2Stride1()(x), nn.MaxPool2d(2, 1)(x)
    assert torch.equal(ours, ref) and ours.is_contiguous()
    torch.testing.assert_close(torch.autograd.grad(ours, x, g)[0], torch.autograd.grad(ref, x, g)[0], rtol=0, atol=0)


def test_wrn16_4_structure():
    model = _build("wrn16_4", channels=3)
    n = sum(p.numel() for p in model.parameters())
    assert 2.5e6 < n < 3.0e6, n  # WRN-16-4 has ~2.75M parameters
    norms = [m for m in model.modules() if isinstance(m, nn.GroupNorm)]
    assert norms and all(m.num_groups == 16 for m in norms)
    conv = model.stem
    # the standardised kernel gives (up to its eps) the same output whatever the raw kernel's scale and offset
    x = torch.rand(1, 3, 8, 8)
    before = conv(x)
    with torch.no_grad():
        conv.weight.mul_(5.0).add_(0.3)
    torch.testing.assert_close(conv(x), before, rtol=1e-2, atol=1e-3)
    plain = nn.functional.conv2d(x, conv.weight, padding=1)
    assert not torch.allclose(plain, before, rtol=0.5)


@pytest.mark.parametrize("name", ["cnn_tiny", "cnn", "wrn16_4"])
def test_no_batchnorm_and_dp_compatible(name):
    model = _build(name)
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    assert_dp_compatible(model)


def test_assert_dp_compatible_refuses_training_batchnorm():
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4))
    model.eval()
    with pytest.raises(ConfigError) as e:
        assert_dp_compatible(model)  # eval now, but it would train with batch statistics
    assert "BatchNorm" in str(e.value) and "'1'" in str(e.value) and "\n" not in str(e.value)
    assert not model.training, "the check restores the modules' modes"
    no_stats = nn.Sequential(nn.BatchNorm2d(4, track_running_stats=False)).eval()
    with pytest.raises(ConfigError):
        assert_dp_compatible(no_stats)


def _per_example_grads_vmap(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
    """Gradient of each example's group-mean loss; x is [B, G, C, H, W], y is [B, G]."""
    params = {k: v.detach() for k, v in model.named_parameters() if v.requires_grad}

    def loss(p: dict[str, torch.Tensor], xg: torch.Tensor, yg: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(functional_call(model, p, (xg,)), yg)

    return vmap(grad(loss), in_dims=(None, 0, 0))(params, x, y)


def _per_example_grads_loop(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
    names = [k for k, v in model.named_parameters() if v.requires_grad]
    rows = []
    for xg, yg in zip(x, y):
        model.zero_grad(set_to_none=True)
        F.cross_entropy(model(xg), yg).backward()
        rows.append({k: v.grad.detach().clone() for k, v in model.named_parameters() if v.requires_grad})
    return {k: torch.stack([r[k] for r in rows]) for k in names}


@pytest.mark.parametrize("name,size", [("cnn_tiny", 8), ("cnn_tiny", 28), ("cnn", 8), ("cnn", 28), ("wrn16_4", 8)])
def test_vmap_grad_equals_loop_float64(name, size):
    torch.manual_seed(0)
    model = _build(name, channels=3, classes=5, size=size).double()
    model.train()
    x = torch.rand(3, 4, 3, size, size, dtype=torch.float64)  # 3 examples, groups of 4 images
    y = torch.randint(0, 5, (3, 4))
    fast, slow = _per_example_grads_vmap(model, x, y), _per_example_grads_loop(model, x, y)
    assert fast.keys() == slow.keys() and len(fast) == len(list(model.parameters()))
    for k in fast:
        assert fast[k].shape == (3, *dict(model.named_parameters())[k].shape)
        torch.testing.assert_close(fast[k], slow[k], rtol=1e-10, atol=1e-12, msg=k)
    assert not torch.allclose(fast["head.weight"][0], fast["head.weight"][1]), "examples differ"


@pytest.fixture(scope="module")
def resnet_file(tmp_path_factory):
    """A random torchvision resnet18 state_dict saved to disk, as a user's local weights would be."""
    from torchvision.models import resnet18

    torch.manual_seed(1)
    net = resnet18()
    with torch.no_grad():  # non-default BN statistics, to see them survive loading
        net.bn1.running_mean.uniform_(-1, 1)
    path = tmp_path_factory.mktemp("w") / "resnet18.pth"
    torch.save(net.state_dict(), path)
    return path, net.state_dict()


def test_resnet18_weights_round_trip_head_mode(resnet_file):
    path, sd = resnet_file
    model = _build("resnet18", channels=1, classes=4, size=8, weights=str(path), train="head")
    torch.testing.assert_close(model.backbone.conv1.weight, sd["conv1.weight"], rtol=0, atol=0)
    torch.testing.assert_close(model.backbone.bn1.running_mean, sd["bn1.running_mean"], rtol=0, atol=0)
    trainable = {k for k, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"head.weight", "head.bias"}
    model.train()
    assert not model.backbone.training and not model.backbone.bn1.training, "frozen backbone stays in eval mode"
    assert model.head.training
    assert_dp_compatible(model)  # BatchNorm on running stats only
    out = model(torch.rand(2, 1, 8, 8))
    assert out.shape == (2, 4)
    out.sum().backward()
    assert model.head.weight.grad is not None and model.backbone.conv1.weight.grad is None


def test_resnet18_full_mode_replaces_batchnorm_and_keeps_conv_weights(resnet_file, tmp_path):
    path, sd = resnet_file
    from safetensors.torch import save_file

    st = tmp_path / "resnet18.safetensors"
    save_file({k: v.contiguous() for k, v in sd.items()}, str(st))
    model = _build("resnet18", channels=3, classes=4, size=32, weights=str(st))
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    assert isinstance(model.backbone.bn1, nn.GroupNorm)
    torch.testing.assert_close(model.backbone.layer1[0].conv1.weight, sd["layer1.0.conv1.weight"], rtol=0, atol=0)
    assert all(p.requires_grad for p in model.parameters())
    assert_dp_compatible(model)
    assert model(torch.rand(1, 3, 32, 32)).shape == (1, 4)


def test_resnet18_full_mode_vmap_grad_float64():
    """Per-example gradients through the GroupNorm resnet18 wrapper (grey→RGB, resize, in-place ReLU,
    residual adds) match a loop; the wrapper resizes to 32 px instead of 224 to keep the test fast."""
    torch.manual_seed(0)
    model = _build("resnet18", channels=1, classes=3, size=8).double().train()
    model.input_size = 32
    with torch.no_grad():
        model.head.weight.normal_()  # the zero-initialised head would send no gradient into the backbone
    x = torch.rand(2, 2, 1, 8, 8, dtype=torch.float64)
    y = torch.randint(0, 3, (2, 2))
    fast, slow = _per_example_grads_vmap(model, x, y), _per_example_grads_loop(model, x, y)
    for k in fast:
        torch.testing.assert_close(fast[k], slow[k], rtol=1e-9, atol=1e-11, msg=k)
    assert fast["backbone.conv1.weight"].abs().max() > 0


def test_missing_and_mismatched_weights_are_data_errors(tmp_path):
    with pytest.raises(DataError) as e:
        _build("resnet18", weights=str(tmp_path / "absent.pt"))
    assert "absent.pt" in str(e.value) and "not found" in str(e.value)
    cnn_file = tmp_path / "cnn.pt"
    torch.save(_build("cnn").state_dict(), cnn_file)
    with pytest.raises(DataError) as e:
        _build("wrn16_4", weights=str(cnn_file))
    assert "does not fit wrn16_4" in str(e.value) and "missing" in str(e.value) and "\n" not in str(e.value)
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(DataError) as e:
        _build("cnn", weights=str(garbage))
    assert "garbage.pt" in str(e.value) and "\n" not in str(e.value)


def test_cnn_weights_load_body_and_freeze_for_head(tmp_path):
    torch.manual_seed(0)
    source = _build("cnn", classes=10)
    path = tmp_path / "cnn.pt"
    torch.save(source.state_dict(), path)
    model = _build("cnn", classes=3, weights=str(path), train="head")  # different class count: fresh head
    torch.testing.assert_close(model.features[0].weight, source.features[0].weight, rtol=0, atol=0)
    assert model.head.out_features == 3
    assert {k for k, p in model.named_parameters() if p.requires_grad} == {"head.weight", "head.bias"}


def test_hub_weights_offline_is_data_error(monkeypatch, tmp_path):
    monkeypatch.setattr(torch.hub, "_hub_dir", str(tmp_path))  # an empty cache

    def offline(*args, **kwargs):
        raise urllib.error.URLError("Name or service not known")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    with pytest.raises(DataError) as e:
        _build("resnet18", weights="hub")
    assert str(e.value) == "could not fetch resnet18 weights from the hub offline: pass model.weights=<local file>"


def test_config_errors():
    with pytest.raises(ConfigError, match=r"model.name: unknown model 'vgg'.*resnet18"):
        _build("vgg")
    with pytest.raises(ConfigError, match="model.train"):
        _build("resnet18", train="head")
    with pytest.raises(ConfigError, match="model.weights"):
        _build("cnn", weights="hub")
    with pytest.raises(ConfigError, match="8×8"):
        _build("cnn", size=4)


def test_vit_b_16_small_image_forward():
    """Built once in the suite: a grey 8×8 image is repeated to RGB and resized to 224."""
    torch.manual_seed(0)
    model = _build("vit_b_16", channels=1, classes=6, size=8)
    assert_dp_compatible(model)
    assert model(torch.rand(1, 1, 8, 8)).shape == (1, 6)
