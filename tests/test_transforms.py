"""radpretrain.transforms: the affine-warp core gives bitwise the three earlier implementations;
the batched Models Genesis corruptions keep the old per-image numpy corruptions' distribution."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from radpretrain.errors import UserError
from radpretrain.transforms import (
    GenesisCorruption, GreyAugment, ViewPair, bezier_curves, bezier_draw, bezier_map, box_draw, box_union,
    finetune_augment, flip_draw, flip_images, interp, local_pixel_shuffle, paint, paint_draw,
    random_resized_crop_flip, shuffle_block_draw, shuffle_blocks,
)


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


# =========================================================================== old Models Genesis (numpy), frozen
# methods/genesis.py before the batched rewrite (commit 59d245d): the reference distribution.
def _np_bezier(rng, decreasing):
    cx, cy = np.sort(rng.random(2)), np.sort(rng.random(2))
    p = np.array([[0.0, 0.0], [cx[0], cy[0]], [cx[1], cy[1]], [1.0, 1.0]])
    t = np.linspace(0.0, 1.0, 1000)[:, None]
    xy = np.concatenate([(1 - t) ** 3, 3 * (1 - t) ** 2 * t, 3 * (1 - t) * t ** 2, t ** 3], axis=1) @ p
    xs, ys = np.maximum.accumulate(xy[:, 0]), xy[:, 1]
    return xs, (1.0 - ys if decreasing else ys)


def _np_shuffle(img, rng, n_blocks):
    out = np.array(img, copy=True)
    h, w = out.shape
    bh_max, bw_max = max(1, int(h * 0.1)), max(1, int(w * 0.1))
    for _ in range(n_blocks):
        bh, bw = int(rng.integers(1, bh_max + 1)), int(rng.integers(1, bw_max + 1))
        y, x = int(rng.integers(0, h - bh + 1)), int(rng.integers(0, w - bw + 1))
        out[y:y + bh, x:x + bw] = rng.permutation(out[y:y + bh, x:x + bw].reshape(-1)).reshape(bh, bw)
    return out


def _np_box(rng, size, lo, hi, margin=3):
    lo = max(1, min(lo, size))
    hi = max(lo, min(hi, size))
    length = int(rng.integers(lo, hi + 1))
    m = margin if size - length - 2 * margin >= 0 else 0
    return int(rng.integers(m, size - length - m + 1)), length


def _np_inpaint(img, rng):
    out = np.array(img, copy=True)
    h, w = out.shape
    cnt = 5
    while cnt > 0 and rng.random() < 0.95:
        y, bh = _np_box(rng, h, h // 6, h // 3)
        x, bw = _np_box(rng, w, w // 6, w // 3)
        out[y:y + bh, x:x + bw] = rng.random((bh, bw))
        cnt -= 1
    return out


def _np_outpaint(img, rng):
    h, w = img.shape
    out = rng.random(img.shape).astype(img.dtype)
    cnt, first = 5, True
    while cnt > 0 and (first or rng.random() < 0.95):
        y, bh = _np_box(rng, h, h - 4 * h // 7, h - 3 * h // 7)
        x, bw = _np_box(rng, w, w - 4 * w // 7, w - 3 * w // 7)
        out[y:y + bh, x:x + bw] = img[y:y + bh, x:x + bw]
        cnt, first = cnt - 1, False
    return out


def old_genesis(img, rng, c: GenesisCorruption):
    x = np.asarray(img, dtype=np.float32)
    cnt = 3
    while cnt > 0 and rng.random() < c.flip_rate:
        x = np.flip(x, int(rng.integers(0, 2)))
        cnt -= 1
    target = y = np.ascontiguousarray(x)
    if rng.random() < c.local_rate:
        y = _np_shuffle(y, rng, c.local_blocks)
    if rng.random() < c.nonlinear_rate:
        y = np.interp(y, *_np_bezier(rng, bool(rng.random() < c.nonlinear_invert_rate))).astype(np.float32)
    if rng.random() < c.paint_rate:
        y = _np_inpaint(y, rng) if rng.random() < c.inpaint_rate else _np_outpaint(y, rng)
    return np.asarray(y, dtype=np.float32), target


def _old_batch(img, n, c, seed=0):
    rng = np.random.default_rng(seed)
    outs = [old_genesis(img, rng, c) for _ in range(n)]
    return np.stack([o[0] for o in outs]), np.stack([o[1] for o in outs])


def _new_batch(img, n, c, seed=0):
    x = torch.from_numpy(np.ascontiguousarray(img)).expand(n, 1, *img.shape).contiguous()
    cor, tgt, _ = c(x, _gen(seed))
    return cor[:, 0].numpy(), tgt[:, 0].numpy()


def _close(a, b, n_a, n_b, sd, k=4.5):
    """|mean_a - mean_b| within k standard errors of the difference (sd: the statistic's std)."""
    assert abs(a - b) <= k * sd * math.sqrt(1 / n_a + 1 / n_b) + 1e-9, (a, b)


def _ramp(h=30, w=28):
    # every pixel a distinct value: a flip or a permutation is recognisable
    return (np.arange(h * w, dtype=np.float32).reshape(h, w) + 0.5) / (h * w)


# =========================================================================== Genesis: same distribution as before
def test_flips_match_the_old_distribution():
    c = GenesisCorruption(flip_rate=0.4, local_rate=0, nonlinear_rate=0, paint_rate=0)
    img = _ramp()
    n = 4000

    def classes(tgt):  # 0 none, 1 upside down, 2 left-right, 3 both
        return (tgt[:, 0, 0] == img[-1, 0]) * 1 + (tgt[:, 0, 0] == img[0, -1]) * 2 + (tgt[:, 0, 0] == img[-1, -1]) * 3

    old = np.bincount(classes(_old_batch(img, n, c)[1]), minlength=4) / n
    new = np.bincount(classes(_new_batch(img, n, c)[1]), minlength=4) / n
    # exact: P(left-right) = 0.5 * P(>= 1 flip) - P(both) ...; both = P(2 flips) / 2
    expect = np.array([1 - 0.2 - 0.2 + 0.048, 0.2 - 0.048, 0.2 - 0.048, 0.048])
    for p, q, e in zip(old, new, expect):
        _close(p, q, n, n, math.sqrt(e * (1 - e)))
        _close(q, e, n, 1e12, math.sqrt(e * (1 - e)))


def test_flip_draw_parities_and_flip_images():
    rows, cols = flip_draw(20000, 1.0, _gen(0), "cpu")  # always 3 flips: exactly one axis odd
    assert torch.equal(rows ^ cols, torch.ones_like(rows))
    assert abs(rows.float().mean().item() - 0.5) < 0.02
    rows, cols = flip_draw(100, 0.0, _gen(0), "cpu")
    assert not rows.any() and not cols.any()
    x = _images(b=4)
    r, c = torch.tensor([False, True, False, True]), torch.tensor([False, False, True, True])
    out = flip_images(x, r, c)
    for i, ref in enumerate([x[0], x[1].flip(-2), x[2].flip(-1), x[3].flip(-2).flip(-1)]):
        assert torch.equal(out[i], ref)


def test_flips_move_target_and_valid_mask_with_the_input():
    c = GenesisCorruption(flip_rate=0.7, local_rate=0, nonlinear_rate=0, paint_rate=0)
    x = _images(b=64, h=20, w=16)
    valid = torch.zeros_like(x, dtype=torch.bool)
    valid[..., :5, :3] = True  # an asymmetric mask
    cor, tgt, v = c(x, _gen(1), valid)
    assert torch.equal(cor, tgt)
    seen = set()
    for i in range(64):
        for k, (fr, fc) in enumerate([(False, False), (True, False), (False, True), (True, True)]):
            ref = flip_images(x[i:i + 1], torch.tensor([fr]), torch.tensor([fc]))
            if torch.equal(tgt[i:i + 1], ref):
                assert torch.equal(v[i:i + 1], flip_images(valid[i:i + 1], torch.tensor([fr]), torch.tensor([fc])))
                seen.add(k)
                break
        else:
            raise AssertionError(f"image {i}: the target is no flip of the input")
    assert seen == {0, 1, 2, 3}
    assert c(x, _gen(1))[2] is None


def test_local_shuffle_matches_the_old_distribution():
    c = GenesisCorruption(flip_rate=0, local_rate=0.5, local_blocks=40, nonlinear_rate=0, paint_rate=0)
    img = _ramp()
    n = 600
    stats = []
    for cor, tgt in (_old_batch(img, n, c), _new_batch(img, n, c)):
        moved = (cor != tgt).reshape(n, -1)
        # how far values travelled: each value is unique, so its origin is known
        src = np.argsort(tgt.reshape(n, -1), axis=1)
        origin = np.take_along_axis(src, np.searchsorted(np.sort(tgt.reshape(n, -1), axis=1)[0], cor.reshape(n, -1))
                                    .clip(0, img.size - 1), axis=1)
        dist = np.abs(origin // img.shape[1] - np.arange(img.size) // img.shape[1]).mean(1)
        np.testing.assert_array_equal(np.sort(cor.reshape(n, -1), 1), np.sort(tgt.reshape(n, -1), 1))
        stats.append((moved.any(1).mean(), moved.mean(1)[moved.any(1)], dist[moved.any(1)]))
    (p_old, f_old, d_old), (p_new, f_new, d_new) = stats
    _close(p_old, p_new, n, n, 0.5)
    assert abs(p_new - 0.5) < 0.08
    _close(f_old.mean(), f_new.mean(), len(f_old), len(f_new), f_old.std())
    _close(d_old.mean(), d_new.mean(), len(d_old), len(d_new), d_old.std())


def test_shuffle_blocks_sizes_and_positions():
    y, x, bh, bw = shuffle_block_draw(64, 40, 25, 200, _gen(0), "cpu")
    assert y.shape == (200, 64)
    assert set(bh.unique().tolist()) == {1, 2, 3, 4} and set(bw.unique().tolist()) == {1, 2}
    assert (y >= 0).all() and (x >= 0).all() and (y + bh <= 40).all() and (x + bw <= 25).all()
    assert y.min() == 0 and (y + bh).max() == 40 and x.min() == 0 and (x + bw).max() == 25


def test_shuffle_blocks_is_a_sequence_of_block_permutations():
    b, h, w, t = 5, 17, 23, 30
    x = _images(b=b, h=h, w=w)
    blocks = shuffle_block_draw(b, h, w, t, _gen(3), "cpu", max_frac=0.25)
    on = torch.tensor([True, True, False, True, True])
    keys = torch.rand(t, b, 4 * 5, generator=_gen(4))
    out = shuffle_blocks(x, blocks, on, keys)
    y0, x0, bh, bw = blocks
    for i in range(b):  # reference: numpy-style, block after block, each permuting the current image
        ref = x[i, 0].clone()
        touched = torch.zeros(h, w, dtype=torch.bool)
        for k in range(t if on[i] else 0):
            ys, xs, hh, ww = (int(v[k, i]) for v in (y0, x0, bh, bw))
            win = ref[ys:ys + hh, xs:xs + ww].reshape(-1)
            ref[ys:ys + hh, xs:xs + ww] = win[keys[k, i, :hh * ww].argsort()].reshape(hh, ww)
            touched[ys:ys + hh, xs:xs + ww] = True
        assert torch.equal(out[i, 0], ref)
        assert torch.equal(out[i, 0][~touched], x[i, 0][~touched])
        assert torch.equal(out[i, 0].flatten().sort().values, x[i, 0].flatten().sort().values)
        # batched == image by image
        one = shuffle_blocks(x[i:i + 1], tuple(v[:, i:i + 1] for v in blocks), on[i:i + 1], keys[:, i:i + 1])
        assert torch.equal(one, out[i:i + 1])
    assert torch.equal(out[2], x[2])
    # several channels move alike (one permutation per image)
    two = shuffle_blocks(torch.cat([x, 1 - x], dim=1), blocks, on, keys)
    assert torch.equal(two[:, :1], out) and torch.equal(two[:, 1:], shuffle_blocks(1 - x, blocks, on, keys))


def test_shuffle_permutations_are_uniform():
    # one 1 x 3 block per image: all 6 orders equally likely
    n = 6000
    x = torch.tensor([0.0, 1.0, 2.0]).view(1, 1, 1, 3).expand(n, 1, 1, 3).contiguous()
    z = torch.zeros(1, n, dtype=torch.long)
    out = shuffle_blocks(x, (z, z, z + 1, z + 3), torch.ones(n, dtype=torch.bool), torch.rand(1, n, 3, generator=_gen(0)))
    code = (out[:, 0, 0] * torch.tensor([9.0, 3.0, 1.0])).sum(1).long()
    freq = torch.bincount(code, minlength=27)[code.unique()].float() / n
    assert len(freq) == 6 and (freq - 1 / 6).abs().max() < 4.5 * math.sqrt(1 / 6 * 5 / 6 / n)


def test_local_shuffle_is_seeded_and_chunking_does_not_matter_for_the_blocks():
    x = _images(b=4)
    on = torch.ones(4, dtype=torch.bool)
    a = local_pixel_shuffle(x, on, 100, _gen(7))
    assert torch.equal(a, local_pixel_shuffle(x, on, 100, _gen(7)))
    assert not torch.equal(a, local_pixel_shuffle(x, on, 100, _gen(8)))
    assert torch.equal(local_pixel_shuffle(x, ~on, 100, _gen(7)), x)
    # a chunk of all blocks at once and of one block at a time give the same distribution of moved pixels
    many = [(local_pixel_shuffle(x, on, 30, _gen(s), chunk=c) != x).float().mean().item()
            for c in (1, 64) for s in range(20)]
    assert abs(np.mean(many[:20]) - np.mean(many[20:])) < 0.05


def test_bezier_mapping_matches_the_old_distribution_and_is_monotone():
    n = 2000
    cx, cy, dec = bezier_draw(n, 0.5, _gen(0), "cpu")
    grid = torch.linspace(0, 1, 257).expand(n, -1).reshape(n, 1, 1, 257)
    y = bezier_map(grid, cx, cy, dec)[:, 0, 0]
    d = y.diff(dim=1)
    assert ((d >= -1e-6) | dec[:, None]).all() and ((d <= 1e-6) | ~dec[:, None]).all()
    assert y.min() >= 0 and y.max() <= 1
    torch.testing.assert_close(y[:, 0], dec.float(), atol=1e-6, rtol=0)
    torch.testing.assert_close(y[:, -1], 1 - dec.float(), atol=1e-6, rtol=0)
    assert abs(dec.float().mean().item() - 0.5) < 0.03
    rng = np.random.default_rng(0)
    old = np.stack([np.interp(grid[0, 0, 0].numpy(), *_np_bezier(rng, bool(rng.random() < 0.5))) for _ in range(n)])
    inc_old, inc_new = old[:, 64] < old[:, 192], (y[:, 64] < y[:, 192]).numpy()
    _close(inc_old.mean(), inc_new.mean(), n, n, 0.5)
    for j in (32, 64, 128, 192, 224):  # the mapped value's mean and spread at a few intensities
        for sel_old, sel_new in ((inc_old, inc_new), (~inc_old, ~inc_new)):
            a, b = old[sel_old, j], y.numpy()[sel_new, j]
            _close(a.mean(), b.mean(), len(a), len(b), a.std())
            assert abs(a.std() - b.std()) < 0.2 * a.std()
    for j in (16, 128, 240):  # the curves' shape: slope spread (sorted control points: flat-ish in the middle)
        sa, sb = old[:, j + 8] - old[:, j - 8], (y[:, j + 8] - y[:, j - 8]).numpy()
        assert abs(np.abs(sa).std() - np.abs(sb).std()) < 0.2 * np.abs(sa).std(), j


def test_interp_equals_numpy_and_bezier_map_is_per_image():
    cx, cy, dec = bezier_draw(6, 0.5, _gen(2), "cpu")
    x = _images(b=6)
    out = bezier_map(x, cx, cy, dec)
    xs, ys = bezier_curves(cx, cy)
    ys = torch.where(dec[:, None], 1 - ys, ys)
    for i in range(6):
        ref = np.interp(x[i].double().numpy(), xs[i].numpy(), ys[i].numpy())
        np.testing.assert_allclose(out[i].numpy(), ref, rtol=1e-5, atol=1e-6)
        assert torch.equal(bezier_map(x[i:i + 1], cx[i:i + 1], cy[i:i + 1], dec[i:i + 1]), out[i:i + 1])
    v = torch.tensor([[0.0, 0.25, 0.5, 1.0]])
    np.testing.assert_allclose(interp(v, torch.tensor([[0.0, 0.5, 0.5, 1.0]]), torch.tensor([[0.0, 1.0, 2.0, 4.0]])),
                               [np.interp([0.0, 0.25, 0.5, 1.0], [0.0, 0.5, 0.5, 1.0], [0.0, 1.0, 2.0, 4.0])])


def test_painting_matches_the_old_distribution():
    c = GenesisCorruption(flip_rate=0, local_rate=0, nonlinear_rate=0, paint_rate=0.9, inpaint_rate=0.2)
    img = _ramp(42, 35)
    n = 3000
    res = []
    for cor, tgt in (_old_batch(img, n, c), _new_batch(img, n, c)):
        changed = (cor != tgt).reshape(n, -1).mean(1)
        res.append((changed == 0, (changed > 0) & (changed < 0.5), changed >= 0.5, changed,
                    (cor != tgt).mean(0)))
    for k in range(3):  # untouched / in-painted-like / out-painted-like shares
        p = res[0][k].mean()
        _close(p, res[1][k].mean(), n, n, math.sqrt(max(p * (1 - p), 0.01)))
    for sel in (1, 2):
        a, b = res[0][3][res[0][sel]], res[1][3][res[1][sel]]
        _close(a.mean(), b.mean(), len(a), len(b), a.std())
    # where on the image: the per-pixel probability of being painted
    assert np.abs(res[0][4] - res[1][4]).max() < 0.06


def test_in_painting_boxes_inside_the_image():
    h, w, n = 48, 36, 4000
    yy, bh, xx, bw, active = paint_draw(n, h, w, _gen(0), "cpu", outer=False)
    assert (bh >= h // 6).all() and (bh <= h // 3).all() and (bw >= w // 6).all() and (bw <= w // 3).all()
    assert (yy >= 3).all() and (yy + bh <= h - 3).all() and (xx >= 3).all() and (xx + bw <= w - 3).all()
    assert set(bh.unique().tolist()) == set(range(h // 6, h // 3 + 1))
    counts = torch.bincount(active.sum(1), minlength=6).float() / n
    expect = torch.tensor([0.05 * 0.95 ** k for k in range(5)] + [0.95 ** 5])
    assert (counts - expect).abs().max() < 4.5 * math.sqrt(0.25 / n)
    assert torch.equal(active, active.cumprod(1).bool())  # boxes are taken in order
    x = _images(b=8, h=h, w=w)
    noise = torch.rand(x.shape, generator=_gen(1))
    mask = box_union(h, w, yy[:8], bh[:8], xx[:8], bw[:8], active[:8])
    out = paint(x, noise, mask, mask, torch.ones(8, dtype=torch.bool), torch.zeros(8, dtype=torch.bool))
    assert torch.equal(out[~mask], x[~mask]) and torch.equal(out[mask], noise[mask])
    for i in range(8):  # the union is exactly the active boxes, image by image
        ref = torch.zeros(h, w, dtype=torch.bool)
        for k in range(5):
            if active[i, k]:
                ref[yy[i, k]:yy[i, k] + bh[i, k], xx[i, k]:xx[i, k] + bw[i, k]] = True
        assert torch.equal(mask[i, 0], ref)
        assert torch.equal(box_union(h, w, yy[i:i + 1], bh[i:i + 1], xx[i:i + 1], bw[i:i + 1], active[i:i + 1]),
                           mask[i:i + 1])


def test_out_painting_keeps_its_boxes():
    h, w, n = 42, 35, 4000
    yy, bh, xx, bw, active = paint_draw(n, h, w, _gen(0), "cpu", outer=True)
    assert active[:, 0].all()
    assert (bh >= h - 4 * h // 7).all() and (bh <= h - 3 * h // 7).all()
    assert (yy >= 3).all() and (yy + bh <= h - 3).all() and (xx + bw <= w - 3).all()
    counts = torch.bincount(active.sum(1), minlength=6).float() / n
    expect = torch.tensor([0.0] + [0.05 * 0.95 ** k for k in range(4)] + [0.95 ** 4])
    assert (counts - expect).abs().max() < 4.5 * math.sqrt(0.25 / n)
    x = _images(b=8, h=h, w=w)
    noise = torch.rand(x.shape, generator=_gen(1))
    keep = box_union(h, w, yy[:8], bh[:8], xx[:8], bw[:8], active[:8])
    out = paint(x, noise, keep, keep, torch.zeros(8, dtype=torch.bool), torch.ones(8, dtype=torch.bool))
    assert keep.flatten(1).any(1).all()
    assert torch.equal(out[keep], x[keep]) and torch.equal(out[~keep], noise[~keep])
    untouched = paint(x, noise, keep, keep, torch.zeros(8, dtype=torch.bool), torch.zeros(8, dtype=torch.bool))
    assert torch.equal(untouched, x)


def test_box_draw_drops_the_margin_when_the_box_does_not_fit():
    start, length = box_draw(2000, 8, 6, 8, 1, _gen(0), "cpu")
    assert (start >= 0).all() and (start + length <= 8).all() and (length >= 6).all()
    assert (start == 0).any() and ((start + length) == 8).any()


def test_rates_of_each_step():
    x = _images(b=4000, h=20, w=20)
    n = x.shape[0]

    def changed(**kw):
        base = dict(flip_rate=0.0, local_rate=0.0, nonlinear_rate=0.0, paint_rate=0.0, local_blocks=20)
        cor, tgt, _ = GenesisCorruption(**{**base, **kw})(x, _gen(0))
        return (cor != tgt).flatten(1).any(1).float().mean().item()

    for kw, p in [({"local_rate": 0.5}, 0.5), ({"nonlinear_rate": 0.9}, 0.9), ({"paint_rate": 0.9}, 0.9 * (1 - 0.2 * 0.05)),
                  ({"local_rate": 0.2}, 0.2), ({}, 0.0)]:
        assert abs(changed(**kw) - p) <= 4.5 * math.sqrt(max(p * (1 - p), 1e-4) / n), (kw, p)
    cor, _, _ = GenesisCorruption(flip_rate=0, local_rate=0, nonlinear_rate=1.0, nonlinear_invert_rate=0.3,
                                  paint_rate=0)(x, _gen(1))
    dec = ((cor - cor.mean((2, 3), keepdim=True)) * (x - x.mean((2, 3), keepdim=True))).mean((1, 2, 3)) < 0
    assert abs(dec.float().mean().item() - 0.3) < 4.5 * math.sqrt(0.21 / n)


def test_whole_corruption_matches_the_old_distribution():
    c = GenesisCorruption(local_blocks=30)
    img = _ramp(32, 32)
    n = 2000
    (co, to), (cn, tn) = _old_batch(img, n, c), _new_batch(img, n, c)
    mse_old, mse_new = ((co - to) ** 2).mean((1, 2)), ((cn - tn) ** 2).mean((1, 2))
    _close(mse_old.mean(), mse_new.mean(), n, n, mse_old.std())
    for q in (0.1, 0.25, 0.5, 0.75, 0.9):
        assert abs(np.quantile(mse_old, q) - np.quantile(mse_new, q)) < 0.15 * np.quantile(mse_old, 0.9), q
    _close(cn.mean(), co.mean(), n, n, co.mean((1, 2)).std())
    assert cn.min() >= 0 and cn.max() <= 1 and cn.dtype == np.float32


def test_corruption_is_seeded_and_shapes():
    c = GenesisCorruption(local_blocks=50)
    x = _images(b=6, h=33, w=29)
    valid = torch.ones_like(x, dtype=torch.bool)
    valid[..., -4:, :] = False
    a, b = c(x, _gen(3), valid), c(x, _gen(3), valid)
    for u, v in zip(a, b):
        assert torch.equal(u, v)
    assert not torch.equal(a[0], c(x, _gen(4), valid)[0])
    cor, tgt, v = a
    assert cor.shape == tgt.shape == v.shape == x.shape and cor.dtype == torch.float32 and v.dtype == torch.bool
    assert v.sum() == valid.sum()
    ident = GenesisCorruption(flip_rate=0, local_rate=0, nonlinear_rate=0, paint_rate=0)
    cor, tgt, v = ident(x, _gen(0), valid)
    assert torch.equal(cor, x) and torch.equal(tgt, x) and torch.equal(v, valid)


def test_config_rates_are_checked():
    with pytest.raises(UserError, match="genesis.paint_rate"):
        GenesisCorruption.from_cfg({"genesis": {"paint_rate": 1.5}})
    c = GenesisCorruption.from_cfg({"genesis": {"local_blocks": 7}})
    assert c.local_blocks == 7 and (c.nonlinear_rate, c.local_rate, c.paint_rate, c.inpaint_rate, c.flip_rate) == (
        0.9, 0.5, 0.9, 0.2, 0.4)


# =========================================================================== the GPU code path
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@cuda
def test_on_cuda_same_generator_same_result_and_same_ops_as_cpu():
    dev = torch.device("cuda")
    x = _images(b=16, h=64, w=64)
    c = GenesisCorruption(local_blocks=200)
    g1, g2 = torch.Generator(device=dev).manual_seed(0), torch.Generator(device=dev).manual_seed(0)
    a, b = c(x.to(dev), g1), c(x.to(dev), g2)
    assert a[0].device.type == "cuda" and torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    # the same parameters give the same images on both devices
    blocks = shuffle_block_draw(16, 64, 64, 100, _gen(0), "cpu")
    on = torch.rand(16, generator=_gen(1)) < 0.5
    keys = torch.rand(100, 16, 36, generator=_gen(2))
    cpu = shuffle_blocks(x, blocks, on, keys)
    gpu = shuffle_blocks(x.to(dev), tuple(v.to(dev) for v in blocks), on.to(dev), keys.to(dev))
    assert torch.equal(cpu, gpu.cpu())
    cx, cy, dec = bezier_draw(16, 0.5, _gen(3), "cpu")
    torch.testing.assert_close(bezier_map(x.to(dev), cx.to(dev), cy.to(dev), dec.to(dev)).cpu(),
                               bezier_map(x, cx, cy, dec), rtol=1e-4, atol=1e-5)
    boxes = paint_draw(16, 64, 64, _gen(4), "cpu", outer=True)
    assert torch.equal(box_union(64, 64, *[v.to(dev) for v in boxes]).cpu(), box_union(64, 64, *boxes))
    rows, cols = flip_draw(16, 0.5, _gen(5), "cpu")
    assert torch.equal(flip_images(x.to(dev), rows.to(dev), cols.to(dev)).cpu(), flip_images(x, rows, cols))


@cuda
def test_on_cuda_statistics():
    dev = torch.device("cuda")
    x = _images(b=4000, h=20, w=20).to(dev)
    g = torch.Generator(device=dev).manual_seed(0)
    cor, tgt, _ = GenesisCorruption(flip_rate=0, local_rate=0.5, nonlinear_rate=0, paint_rate=0, local_blocks=20)(x, g)
    moved = (cor != tgt).flatten(1).any(1).float().mean().item()
    assert abs(moved - 0.5) < 4.5 * math.sqrt(0.25 / 4000)
    assert torch.equal(cor.flatten(1).sort(1).values, tgt.flatten(1).sort(1).values)


@cuda
def test_views_on_cuda():
    dev = torch.device("cuda")
    x = _images(b=64).to(dev)
    v = GreyAugment()(x, torch.Generator(device=dev).manual_seed(0))
    assert v.device.type == "cuda" and v.min() >= 0 and v.max() <= 1
    assert torch.equal(v, GreyAugment()(x, torch.Generator(device=dev).manual_seed(0)))
    out, _ = random_resized_crop_flip(x, None, generator=torch.Generator(device=dev).manual_seed(0))
    assert out.device.type == "cuda"
