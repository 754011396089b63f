"""radpretrain.transforms: the affine-warp core gives bitwise the three earlier implementations;
the batched Models Genesis corruptions keep the old per-image numpy corruptions' distribution."""

import math

import pytest
import torch
import torch.nn.functional as F

from radpretrain.transforms import GreyAugment, ViewPair, finetune_augment, random_resized_crop_flip


# =========================================================================== frozen copies of the old code
# The affine warps as they were in methods/simclr.py, methods/deepcluster.py and evaluate/protocols.py
# (commit 59d245d), kept verbatim so the shared core can be compared with them bit for bit.
def _old_u(b, lo, hi, g, device):
    return lo + (hi - lo) * torch.rand(b, generator=g, device=device)


def old_grey_augment(x, g, crop_scale=(0.35, 1.0), crop_ratio=(3 / 4, 4 / 3), rotation=10.0, hflip=0.5,
                     brightness=0.2, contrast=0.2, gamma=(0.8, 1.25), blur_p=0.5, blur_sigma=(0.1, 1.5),
                     noise_p=0.5, noise_std=(0.0, 0.03), view_size=None):
    b, _, h, w = x.shape
    dev = x.device
    x = x.float()
    if view_size:
        h = w = view_size
    area = _old_u(b, *crop_scale, g, dev)
    logr = _old_u(b, math.log(crop_ratio[0]), math.log(crop_ratio[1]), g, dev)
    ratio = logr.exp()
    sw = (area * ratio).sqrt().clamp(max=1.0)
    sh = (area / ratio).sqrt().clamp(max=1.0)
    cx = (1 - sw) * (2 * torch.rand(b, generator=g, device=dev) - 1)
    cy = (1 - sh) * (2 * torch.rand(b, generator=g, device=dev) - 1)
    ang = _old_u(b, -rotation, rotation, g, dev) * math.pi / 180
    flip = torch.where(torch.rand(b, generator=g, device=dev) < hflip, -1.0, 1.0)
    cos, sin = ang.cos(), ang.sin()
    theta = torch.stack([
        torch.stack([cos * sw * flip, -sin * sh, cx], dim=1),
        torch.stack([sin * sw * flip, cos * sh, cy], dim=1),
    ], dim=1)
    grid = F.affine_grid(theta, [b, 1, h, w], align_corners=False)
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    gam = torch.exp(_old_u(b, math.log(gamma[0]), math.log(gamma[1]), g, dev)).view(b, 1, 1, 1)
    x = x.clamp(0, 1).pow(gam)
    c = (1 + _old_u(b, -contrast, contrast, g, dev)).view(b, 1, 1, 1)
    m = x.mean(dim=(2, 3), keepdim=True)
    x = (x - m) * c + m + _old_u(b, -brightness, brightness, g, dev).view(b, 1, 1, 1)
    if blur_p > 0:
        sig = _old_u(b, *blur_sigma, g, dev)
        on = torch.rand(b, generator=g, device=dev) < blur_p
        rad = max(1, int(math.ceil(2 * blur_sigma[1])))
        t = torch.arange(-rad, rad + 1, device=dev, dtype=x.dtype)
        k = torch.exp(-(t[None] ** 2) / (2 * sig[:, None] ** 2))
        k = k / k.sum(1, keepdim=True)
        ident = (t == 0).to(x.dtype)[None].expand(b, -1)
        k = torch.where(on[:, None], k, ident)
        xx = x.reshape(1, b, h, w)
        xx = F.conv2d(F.pad(xx, (rad, rad, 0, 0), mode="replicate"), k.view(b, 1, 1, -1), groups=b)
        xx = F.conv2d(F.pad(xx, (0, 0, rad, rad), mode="replicate"), k.view(b, 1, -1, 1), groups=b)
        x = xx.reshape(b, 1, h, w)
    if noise_p > 0:
        std = _old_u(b, *noise_std, g, dev) * (torch.rand(b, generator=g, device=dev) < noise_p)
        x = x + std.view(b, 1, 1, 1) * torch.randn(x.shape, generator=g, device=dev)
    return x.clamp(0, 1)


def old_random_resized_crop_flip(x, valid=None, scale=(0.4, 1.0), ratio=(3 / 4, 4 / 3), hflip=0.5, generator=None):
    b = x.shape[0]
    dev = x.device
    u = torch.rand(b, 5, generator=generator, device="cpu" if generator is None else generator.device).to(dev)
    area = scale[0] + (scale[1] - scale[0]) * u[:, 0]
    logr = math.log(ratio[0]) + (math.log(ratio[1]) - math.log(ratio[0])) * u[:, 1]
    r = torch.exp(logr)
    w = torch.sqrt(area * r).clamp(max=1.0)
    h = torch.sqrt(area / r).clamp(max=1.0)
    cx = (2 * u[:, 2] - 1) * (1 - w)
    cy = (2 * u[:, 3] - 1) * (1 - h)
    flip = torch.where(u[:, 4] < hflip, -1.0, 1.0).to(dev)
    theta = torch.zeros(b, 2, 3, device=dev, dtype=x.dtype)
    theta[:, 0, 0] = w * flip
    theta[:, 0, 2] = cx
    theta[:, 1, 1] = h
    theta[:, 1, 2] = cy
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    out = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    if valid is None:
        return out, None
    v = F.grid_sample(valid.to(x.dtype), grid, mode="nearest", padding_mode="zeros", align_corners=False) > 0.5
    return out, v


def old_augment_batch(x, o, gen):
    b = x.shape[0]
    if o.get("flip", True):
        flip = torch.rand(b, generator=gen) < 0.5
        x = torch.where(flip.view(-1, 1, 1, 1), x.flip(-1), x)
    rot = float(o.get("rotate", 0.0))
    crop = float(o.get("crop", 0.0))
    if rot > 0 or crop > 0:
        ang = (torch.rand(b, generator=gen) * 2 - 1) * math.radians(rot)
        scale = 1 - torch.rand(b, generator=gen) * crop
        tx = (torch.rand(b, generator=gen) * 2 - 1) * crop
        ty = (torch.rand(b, generator=gen) * 2 - 1) * crop
        cos, sin = torch.cos(ang) * scale, torch.sin(ang) * scale
        theta = torch.stack([torch.stack([cos, -sin, tx], 1), torch.stack([sin, cos, ty], 1)], 1)
        grid = F.affine_grid(theta, list(x.shape), align_corners=False)
        x = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    br, ct = float(o.get("brightness", 0.0)), float(o.get("contrast", 0.0))
    if br > 0 or ct > 0:
        c = 1 + (torch.rand(b, 1, 1, 1, generator=gen) * 2 - 1) * ct
        d = (torch.rand(b, 1, 1, 1, generator=gen) * 2 - 1) * br
        m = x.mean(dim=(2, 3), keepdim=True)
        x = ((x - m) * c + m + d).clamp_(0, 1)
    return x


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _images(b=6, h=40, w=36, seed=0):
    return torch.rand(b, 1, h, w, generator=_gen(1000 + seed))


# =========================================================================== affine-warp core: bitwise as before
GREY_SETTINGS = [
    {},                                                                   # SimCLR / DINO global views
    {"crop_scale": (0.05, 0.25), "view_size": 24, "blur_p": 0.0},         # simclr_local-like local views
    {"crop_scale": (0.05, 0.4), "view_size": 16},                        # DINO local views
    {"rotation": 0.0, "hflip": 1.0, "crop_ratio": (1.0, 1.0)},
    {"crop_scale": (1.0, 1.0), "crop_ratio": (1.0, 1.0), "rotation": 30.0, "noise_p": 1.0},
]


@pytest.mark.parametrize("settings", GREY_SETTINGS)
def test_grey_augment_equals_the_old_implementation_bitwise(settings):
    x = _images()
    for seed in range(4):
        new = GreyAugment(**settings)(x, _gen(seed))
        old = old_grey_augment(x, _gen(seed), **settings)
        assert torch.equal(new, old), (settings, seed)


def test_view_pair_equals_the_old_simclr_views_bitwise():
    x = _images(b=5, h=48, w=48)
    aug = {"crop_scale": (0.05, 0.25), "crop_ratio": (0.75, 1.333), "view_size": 24, "rotation": 10.0,
           "blur_p": 0.0, "noise_p": 0.5}
    for seed in range(3):
        g_new, g_old = _gen(seed), _gen(seed)
        v1, v2 = ViewPair({**aug, "shared_crop": True})(x, g_new)
        # the old SimCLR.views with shared_crop: one geometry-only crop, then two full views of it
        quiet = dict(rotation=0.0, hflip=0.0, brightness=0.0, contrast=0.0, gamma=(1.0, 1.0), blur_p=0.0, noise_p=0.0)
        crop = old_grey_augment(x, g_old, crop_scale=aug["crop_scale"], crop_ratio=aug["crop_ratio"],
                                view_size=24, **quiet)
        rest = {k: v for k, v in aug.items() if k not in ("crop_scale", "crop_ratio", "view_size")}
        o1 = old_grey_augment(crop, g_old, crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0), **rest)
        o2 = old_grey_augment(crop, g_old, crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0), **rest)
        assert torch.equal(v1, o1) and torch.equal(v2, o2)
        w1, w2 = ViewPair(aug)(x, _gen(seed))
        g_old = _gen(seed)
        assert torch.equal(w1, old_grey_augment(x, g_old, **aug)) and torch.equal(w2, old_grey_augment(x, g_old, **aug))


@pytest.mark.parametrize("scale,hflip", [((0.4, 1.0), 0.5), ((0.2, 0.2), 1.0), ((1.0, 1.0), 0.0)])
def test_deepcluster_crops_equal_the_old_implementation_bitwise(scale, hflip):
    x = _images(b=7)
    valid = torch.ones_like(x, dtype=torch.bool)
    valid[..., :, :5] = False
    for seed in range(4):
        out, v = random_resized_crop_flip(x, valid, scale, hflip=hflip, generator=_gen(seed))
        ref, rv = old_random_resized_crop_flip(x, valid, scale, hflip=hflip, generator=_gen(seed))
        assert torch.equal(out, ref) and torch.equal(v, rv)
    torch.manual_seed(5)
    a, none = random_resized_crop_flip(x, None, scale, hflip=hflip)
    torch.manual_seed(5)
    assert none is None and torch.equal(a, old_random_resized_crop_flip(x, None, scale, hflip=hflip)[0])


@pytest.mark.parametrize("o", [
    {"flip": True, "rotate": 10, "crop": 0.1, "brightness": 0.1, "contrast": 0.1},   # evaluate's defaults
    {"flip": False, "rotate": 25, "crop": 0.0},
    {"flip": True, "rotate": 0, "crop": 0.2, "brightness": 0.0, "contrast": 0.3},
    {"flip": True},
])
def test_finetune_augment_equals_the_old_implementation_bitwise(o):
    x = _images(b=8, h=32, w=32)
    for seed in range(4):
        assert torch.equal(finetune_augment(x, o, _gen(seed)), old_augment_batch(x, o, _gen(seed)))


# =========================================================================== the GPU code path
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@cuda
def test_views_on_cuda():
    dev = torch.device("cuda")
    x = _images(b=64).to(dev)
    v = GreyAugment()(x, torch.Generator(device=dev).manual_seed(0))
    assert v.device.type == "cuda" and v.min() >= 0 and v.max() <= 1
    assert torch.equal(v, GreyAugment()(x, torch.Generator(device=dev).manual_seed(0)))
    out, _ = random_resized_crop_flip(x, None, generator=torch.Generator(device=dev).manual_seed(0))
    assert out.device.type == "cuda"
