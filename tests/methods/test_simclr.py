"""SimCLR: grey augmentations in torch, lightly's NT-Xent, loss goes down on the toy store."""

import pytest
import torch

from radpretrain.data.dataset import StoreDataset
from radpretrain.synthetic.toy import make_toy_store
from radpretrain.methods.simclr import SimCLR
from radpretrain.transforms import GreyAugment

CFG = {"seed": 0, "data": {"image_size": 32, "mean": 0.3, "std": 0.2},
       "model": {"backbone": "resnet18", "pretrained": "none"},
       "simclr": {"temperature": 0.2, "hidden_dim": 64, "output_dim": 32}}


@pytest.fixture(scope="module")
def batch(tmp_path_factory):
    root = make_toy_store(tmp_path_factory.mktemp("toy"), n_patients=8, images_per_patient=2)
    ds = StoreDataset(root, image_size=32)
    return torch.utils.data.default_collate([ds[i] for i in range(16)])


def test_augment_is_grey_bounded_seeded_and_varied(batch):
    aug = GreyAugment()
    x = batch["image"]
    a = aug(x, torch.Generator().manual_seed(0))
    b = aug(x, torch.Generator().manual_seed(0))
    c = aug(x, torch.Generator().manual_seed(1))
    assert a.shape == x.shape and a.dtype == torch.float32
    assert a.min() >= 0 and a.max() <= 1
    assert torch.equal(a, b)                       # same generator state -> same views (resume-exact)
    assert (a - c).abs().mean() > 0.01             # different draws -> different views
    assert (a - x).abs().mean() > 0.01


def test_identity_settings_keep_the_image():
    aug = GreyAugment(crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0), rotation=0.0, hflip=0.0, brightness=0.0,
                      contrast=0.0, gamma=(1.0, 1.0), blur_p=0.0, noise_p=0.0)
    x = torch.rand(3, 1, 16, 16)
    assert torch.allclose(aug(x, torch.Generator().manual_seed(0)), x, atol=1e-5)


def test_loss_decreases_on_toy_store(batch, loss_before_after):
    # the CPU preset's setting: ImageNet lite0 from the local wheel (random init needs far more steps)
    torch.manual_seed(0)
    cfg = {**CFG, "model": {"backbone": "tf_efficientnet_lite0", "pretrained": "imagenet"},
           "augment": {"crop_scale": [0.6, 1.0], "rotation": 5.0, "blur_p": 0.2}}
    m = SimCLR(cfg)
    opt = torch.optim.AdamW(m.parameters(), lr=1e-3)

    def eval_loss():  # fixed views; BatchNorm on batch statistics (train mode), no update
        with torch.no_grad():
            g = torch.Generator().manual_seed(99)
            v1, v2 = m.views(batch["image"], g)
            z = m.head(m.encoder(m.normalize(torch.cat([v1, v2]))))
            return float(m.criterion(*z.chunk(2)))

    before, after = loss_before_after(m, opt, batch, eval_loss, 16)
    assert after < 0.9 * before, (before, after)


def test_imagenet_lite0_from_wheel_and_previews(batch, tmp_path):
    m = SimCLR({**CFG, "model": {"backbone": "tf_efficientnet_lite0", "pretrained": "imagenet"}})
    assert m.arch == "tf_efficientnet_lite0" and m.encoder.conv_stem.weight.shape[1] == 1
    paths = m.save_previews(batch, tmp_path)
    assert paths and paths[0].is_file()
    assert m.encoder_meta()["simclr"]["temperature"] == 0.2


def test_local_views_keep_full_detail():
    # a 2-px checkerboard at 128 px: local views (view_size 64, a quarter of the area) sample it at
    # about one input pixel per output pixel and keep the pattern; the same crops taken from the
    # image first shrunk to 64 px (what an encoder trained at 64 px sees) have lost it.
    yy, xx = torch.meshgrid(torch.arange(128), torch.arange(128), indexing="ij")
    board = (((yy // 2) + (xx // 2)) % 2).float().view(1, 1, 128, 128).repeat(4, 1, 1, 1)
    quiet = dict(crop_scale=(0.25, 0.25), crop_ratio=(1.0, 1.0), rotation=0.0, hflip=0.0, brightness=0.0,
                 contrast=0.0, gamma=(1.0, 1.0), blur_p=0.0, noise_p=0.0)
    local = GreyAugment(view_size=64, **quiet)(board, torch.Generator().manual_seed(0))
    small = torch.nn.functional.interpolate(board, size=(64, 64), mode="bilinear", antialias=True)
    upsampled = GreyAugment(**quiet)(small, torch.Generator().manual_seed(0))
    assert local.shape == (4, 1, 64, 64) and upsampled.shape == (4, 1, 64, 64)

    def detail(v):
        return (v[..., 1:] - v[..., :-1]).abs().mean().item()

    assert detail(local) > 0.25 and detail(upsampled) < 0.1
    assert local.min() >= 0 and local.max() <= 1


def test_local_views_model_trains_at_view_size(batch, tmp_path):
    cfg = {**CFG, "data": {"image_size": 32, "mean": 0.3, "std": 0.2}, "augment": {"view_size": 16}}
    m = SimCLR(cfg)
    v1, v2 = m.views(batch["image"], torch.Generator().manual_seed(0))
    assert v1.shape[-2:] == (16, 16) and v2.shape[-2:] == (16, 16)
    assert torch.isfinite(m.compute_loss(batch, 0))
    (p,) = m.save_previews(batch, tmp_path)
    assert p.is_file()


def test_shared_crop_shows_the_same_region_in_both_views(batch):
    quiet = {"rotation": 0.0, "hflip": 0.0, "brightness": 0.0, "contrast": 0.0, "gamma": [1.0, 1.0],
             "blur_p": 0.0, "noise_p": 0.0, "crop_scale": [0.05, 0.2], "view_size": 16}
    shared = SimCLR({**CFG, "augment": {**quiet, "shared_crop": True}})
    apart = SimCLR({**CFG, "augment": quiet})
    a1, a2 = shared.views(batch["image"], torch.Generator().manual_seed(0))
    b1, b2 = apart.views(batch["image"], torch.Generator().manual_seed(0))
    assert a1.shape[-2:] == (16, 16) and torch.allclose(a1, a2, atol=1e-6)  # only the crop varies: same pixels
    assert (b1 - b2).abs().mean() > 0.01                                   # independent crops differ
    noisy = SimCLR({**CFG, "augment": {**quiet, "shared_crop": True, "noise_p": 1.0, "noise_std": [0.05, 0.05]}})
    n1, n2 = noisy.views(batch["image"], torch.Generator().manual_seed(0))
    assert (n1 - n2).abs().mean() > 0.01                                   # per-view augmentations still differ
