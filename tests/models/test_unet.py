"""U-Net for Models Genesis: shapes (odd sizes too), norms, and the kept encoder is a plain timm model."""

import pytest
import timm
import torch

from radpretrain.errors import UserError
from radpretrain.models.backbones import create_backbone
from radpretrain.models.unet import UNet, encoder_feature_channels
from radpretrain.models.weights import load_run_encoder, save_encoder


@pytest.mark.parametrize("arch,norm", [("resnet18", "batch"), ("resnet18", "instance"),
                                       ("efficientnet_b0", "instance"), ("densenet121", "batch")])
def test_output_shape_equals_input_even_and_odd(arch, norm):
    torch.manual_seed(0)
    unet = UNet(create_backbone(arch), norm=norm)
    for h, w in [(64, 64), (63, 47), (65, 71)]:
        y = unet(torch.randn(2, 1, h, w))
        assert y.shape == (2, 1, h, w)
        assert torch.isfinite(y).all()
    kinds = {type(m) for m in unet.blocks.modules()}
    assert (torch.nn.InstanceNorm2d if norm == "instance" else torch.nn.BatchNorm2d) in kinds
    assert (torch.nn.BatchNorm2d if norm == "instance" else torch.nn.InstanceNorm2d) not in kinds


def test_skip_features_are_the_features_only_stages():
    torch.manual_seed(0)
    enc = create_backbone("resnet18")
    unet = UNet(enc).eval()
    fo = timm.create_model("resnet18", features_only=True, in_chans=1).eval()
    fo.load_state_dict(enc.state_dict(), strict=False)  # same weights (features_only drops fc)
    x = torch.randn(1, 1, 64, 64)
    with torch.no_grad():
        ours, theirs = unet.features(x), fo(x)
    assert [f.shape for f in ours] == [f.shape for f in theirs]
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b)
    assert encoder_feature_channels(enc) == fo.feature_info.channels()


def test_bad_norm_is_a_user_error():
    with pytest.raises(UserError, match="decoder_norm"):
        UNet(create_backbone("resnet18"), norm="group")


@pytest.mark.parametrize("arch", ["densenet121", "resnet18"])
def test_trained_encoder_reloads_as_plain_timm_model(tmp_path, arch):
    """DenseNet's features_only model renames modules; our kept encoder must not."""
    torch.manual_seed(0)
    enc = create_backbone(arch)
    unet = UNet(enc, norm="instance")
    opt = torch.optim.SGD(unet.parameters(), lr=1e-3)
    x = torch.rand(2, 1, 48, 48)
    before = {k: v.clone() for k, v in enc.state_dict().items()}
    for _ in range(2):  # change the weights (and BN statistics) a little
        opt.zero_grad()
        ((torch.sigmoid(unet(x)) - x) ** 2).mean().backward()
        opt.step()
    assert any(not torch.equal(before[k], v) for k, v in enc.state_dict().items())
    plain_keys = set(timm.create_model(arch, num_classes=0, in_chans=1).state_dict())
    assert set(enc.state_dict()) == plain_keys
    save_encoder(enc, {"arch": enc.radpretrain_arch, "model_kwargs": enc.radpretrain_kwargs}, tmp_path)
    model, meta = load_run_encoder(tmp_path)
    enc.eval()
    with torch.no_grad():
        out = model(x)
        assert torch.isfinite(out).all()
        torch.testing.assert_close(out, enc(x))
        for a, b in zip(model.forward_intermediates(x, intermediates_only=True), unet.features(x)):
            torch.testing.assert_close(a, b)
