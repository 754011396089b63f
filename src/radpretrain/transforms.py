"""Random views and corruptions of grey radiographs, batched on the device the batch is on.

Every transform here takes a batch ``[B, C, H, W]`` (float in [0, 1]) and a
``torch.Generator`` created on the batch's device (a method's ``step_generator``), draws
all its random parameters for the whole batch at once, and is pure torch, so it runs on
CPU and CUDA tensors alike and a resumed run repeats its draws exactly.

- **Affine-warp core** (:func:`affine_theta`, :func:`affine_warp`, :func:`crop_geometry`):
  a per-image affine map (crop scale and aspect, centre, rotation, horizontal flip) sampled
  with ``affine_grid`` / ``grid_sample`` (Jaderberg, Simonyan, Zisserman, Kavukcuoglu,
  *Spatial Transformer Networks*, NeurIPS 2015).  Used by the grey views, DeepCluster's
  crops and evaluation's fine-tuning augmentation; each caller draws its parameters in its
  own order, so their outputs are bitwise those of the three earlier copies.
- **Grey views** (:class:`GreyAugment`, ``augment:`` keys, :class:`AugmentSection`): SimCLR's
  augmentations without colour (Chen, Kornblith, Norouzi, Hinton, *A Simple Framework for
  Contrastive Learning of Visual Representations*, ICML 2020), used by SimCLR, DINO and the
  metadata method.
- **DeepCluster crops** (:func:`random_resized_crop_flip`; Caron, Bojanowski, Joulin, Douze,
  *Deep Clustering for Unsupervised Learning of Visual Features*, ECCV 2018) and
  **fine-tuning augmentation** (:func:`finetune_augment`).
- **Models Genesis corruptions** (:class:`GenesisCorruption`; Zhou, Sodha, Rahman Siddiquee,
  Feng, Tajbakhsh, Gotway, Liang, *Models Genesis: Generic Autodidactic Models for 3D Medical
  Image Analysis*, MICCAI 2019): flips, local pixel shuffling, Bézier intensity mapping,
  in-/out-painting.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from radpretrain.errors import UserError
from radpretrain.settings import probability


def _rand(shape, g: torch.Generator | None, device, dtype=torch.float32) -> torch.Tensor:
    return torch.rand(shape, generator=g, device=device, dtype=dtype)


def _u(b: int, lo: float, hi: float, g, device) -> torch.Tensor:
    """``b`` uniform numbers in [lo, hi)."""
    return lo + (hi - lo) * torch.rand(b, generator=g, device=device)


# --------------------------------------------------------------------------- affine-warp core
def crop_geometry(area: torch.Tensor, log_ratio: torch.Tensor, ux: torch.Tensor, uy: torch.Tensor):
    """Random-resized-crop geometry (Szegedy et al., *Going Deeper with Convolutions*, CVPR 2015).

    ``area`` (fraction of the image) and ``log_ratio`` (log of width / height) give the
    crop's width and height as fractions of the image's (at most 1); ``ux``, ``uy`` in
    [0, 1) place its centre anywhere the crop stays inside the image.  Returns
    ``(sw, sh, cx, cy)`` in ``affine_grid`` units (centre in [-1, 1]).
    """
    ratio = log_ratio.exp()
    sw = (area * ratio).sqrt().clamp(max=1.0)
    sh = (area / ratio).sqrt().clamp(max=1.0)
    return sw, sh, (1 - sw) * (2 * ux - 1), (1 - sh) * (2 * uy - 1)


def affine_theta(sx: torch.Tensor, sy: torch.Tensor, tx: torch.Tensor, ty: torch.Tensor,
                 angle: torch.Tensor | None = None, flip: torch.Tensor | None = None) -> torch.Tensor:
    """Per-image ``[B, 2, 3]`` matrices mapping output to input coordinates (``affine_grid``'s).

    Scale ``(sx, sy)`` (fraction of the input's width / height seen), rotation ``angle``
    (radians; None: none), horizontal ``flip`` (-1 flips, +1 keeps; None: none) and centre
    ``(tx, ty)`` in [-1, 1].  With neither angle nor flip the off-diagonal terms are exact zeros.
    """
    if angle is None:
        a, d = sx, sy
        b = c = torch.zeros_like(sx)
    else:
        cos, sin = angle.cos(), angle.sin()
        a, b, c, d = cos * sx, -sin * sy, sin * sx, cos * sy
    if flip is not None:
        a = a * flip
        if angle is not None:
            c = c * flip
    return torch.stack([torch.stack([a, b, tx], dim=1), torch.stack([c, d, ty], dim=1)], dim=1)


def affine_warp(x: torch.Tensor, theta: torch.Tensor, size: tuple[int, int] | None = None,
                valid: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Warp ``x`` [B, C, H, W] by ``theta`` to ``size`` (default: the input's), bilinear, zeros outside.

    ``valid`` (bool [B, 1, H, W], False on padding) follows the same geometry by nearest
    neighbour; outside the input is invalid.  Returns ``(warped, warped valid or None)``.
    """
    b, c, h, w = x.shape
    oh, ow = size if size is not None else (h, w)
    grid = F.affine_grid(theta.to(x.dtype), [b, c, oh, ow], align_corners=False)
    out = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    if valid is None:
        return out, None
    v = F.grid_sample(valid.to(x.dtype), grid, mode="nearest", padding_mode="zeros", align_corners=False) > 0.5
    return out, v


# --------------------------------------------------------------------------- grey views
_POS = {"gt": 0.0}


@dataclass
class AugmentSection:
    """``augment:`` -- the random grey views (:class:`GreyAugment`'s parameters)."""

    crop_scale: tuple[float, float] = field(default=(0.35, 1.0), metadata={"gt": 0.0, "le": 1.0})
    crop_ratio: tuple[float, float] = field(default=(3 / 4, 4 / 3), metadata=_POS)
    rotation: float = field(default=10.0, metadata={"ge": 0.0, "le": 180.0})
    hflip: float = field(default=0.5, metadata=probability())
    brightness: float = field(default=0.2, metadata={"ge": 0.0})
    contrast: float = field(default=0.2, metadata={"ge": 0.0, "le": 1.0})
    gamma: tuple[float, float] = field(default=(0.8, 1.25), metadata=_POS)
    blur_p: float = field(default=0.5, metadata=probability())
    blur_sigma: tuple[float, float] = field(default=(0.1, 1.5), metadata=_POS)
    noise_p: float = field(default=0.5, metadata=probability())
    noise_std: tuple[float, float] = field(default=(0.0, 0.03), metadata={"ge": 0.0})
    view_size: int | None = field(default=None, metadata={"ge": 8})


class GreyAugment(nn.Module):
    """Batched grey-image views (SimCLR's, Chen et al. 2020, without colour) of [B, 1, H, W] images in [0, 1].

    Random resized crop + rotation + flip as one affine warp, then gamma / contrast /
    brightness, Gaussian blur and Gaussian noise.  Parameters are ranges; a probability of
    0 (or a degenerate range) turns a step off.
    """

    def __init__(self, crop_scale=(0.35, 1.0), crop_ratio=(3 / 4, 4 / 3), rotation=10.0, hflip=0.5,
                 brightness=0.2, contrast=0.2, gamma=(0.8, 1.25), blur_p=0.5, blur_sigma=(0.1, 1.5),
                 noise_p=0.5, noise_std=(0.0, 0.03), view_size=None):
        super().__init__()
        # view_size: side of the output views; None keeps the input's size.  Smaller than the
        # input (e.g. 64 from 128-px images) makes crops *local views at full detail*: the
        # encoder trains on the cheap small input but sees structures at the scale of the
        # larger images it will later be used on.
        self.view_size = None if view_size in (None, 0, "none") else int(view_size)
        self.crop_scale, self.crop_ratio, self.rotation, self.hflip = tuple(crop_scale), tuple(crop_ratio), float(rotation), float(hflip)
        self.brightness, self.contrast, self.gamma = float(brightness), float(contrast), tuple(gamma)
        self.blur_p, self.blur_sigma, self.noise_p, self.noise_std = float(blur_p), tuple(blur_sigma), float(noise_p), tuple(noise_std)

    @classmethod
    def from_config(cls, cfg: dict | None) -> "GreyAugment":
        cfg = dict(cfg or {})
        cfg.pop("enabled", None)
        return cls(**cfg)

    def forward(self, x: torch.Tensor, g: torch.Generator | None = None) -> torch.Tensor:
        b, _, h, w = x.shape
        x = x.float()
        if self.view_size:
            h = w = self.view_size
        x = self._geometry(x, g, (h, w)).clamp(0, 1)
        x = self._intensity(x, g)
        x = self._blur(x, g)
        if self.noise_p > 0:
            std = _u(b, *self.noise_std, g, x.device) * (torch.rand(b, generator=g, device=x.device) < self.noise_p)
            x = x + std.view(b, 1, 1, 1) * torch.randn(x.shape, generator=g, device=x.device)
        return x.clamp(0, 1)

    def _geometry(self, x, g, size) -> torch.Tensor:
        """Random resized crop + rotation + horizontal flip: one affine warp (bilinear, zeros outside)."""
        b, dev = x.shape[0], x.device
        area = _u(b, *self.crop_scale, g, dev)
        logr = _u(b, math.log(self.crop_ratio[0]), math.log(self.crop_ratio[1]), g, dev)
        ux, uy = torch.rand(b, generator=g, device=dev), torch.rand(b, generator=g, device=dev)
        sw, sh, cx, cy = crop_geometry(area, logr, ux, uy)
        ang = _u(b, -self.rotation, self.rotation, g, dev) * math.pi / 180
        flip = torch.where(torch.rand(b, generator=g, device=dev) < self.hflip, -1.0, 1.0)
        return affine_warp(x, affine_theta(sw, sh, cx, cy, ang, flip), size)[0]

    def _intensity(self, x, g) -> torch.Tensor:
        """Gamma, then contrast around the image mean, then brightness."""
        b, dev = x.shape[0], x.device
        gam = torch.exp(_u(b, math.log(self.gamma[0]), math.log(self.gamma[1]), g, dev)).view(b, 1, 1, 1)
        x = x.pow(gam)
        c = (1 + _u(b, -self.contrast, self.contrast, g, dev)).view(b, 1, 1, 1)
        m = x.mean(dim=(2, 3), keepdim=True)
        return (x - m) * c + m + _u(b, -self.brightness, self.brightness, g, dev).view(b, 1, 1, 1)

    def _blur(self, x, g) -> torch.Tensor:
        """Gaussian blur with a per-image sigma (separable grouped convolution, one kernel per image)."""
        if self.blur_p <= 0:
            return x
        b, _, h, w = x.shape
        dev = x.device
        sig = _u(b, *self.blur_sigma, g, dev)
        on = torch.rand(b, generator=g, device=dev) < self.blur_p
        rad = max(1, int(math.ceil(2 * self.blur_sigma[1])))
        t = torch.arange(-rad, rad + 1, device=dev, dtype=x.dtype)
        k = torch.exp(-(t[None] ** 2) / (2 * sig[:, None] ** 2))
        k = k / k.sum(1, keepdim=True)
        k = torch.where(on[:, None], k, (t == 0).to(x.dtype)[None].expand(b, -1))
        xx = x.reshape(1, b, h, w)
        xx = F.conv2d(F.pad(xx, (rad, rad, 0, 0), mode="replicate"), k.view(b, 1, 1, -1), groups=b)
        xx = F.conv2d(F.pad(xx, (0, 0, rad, rad), mode="replicate"), k.view(b, 1, -1, 1), groups=b)
        return xx.reshape(b, 1, h, w)


@dataclass
class SimCLRAugmentSection(AugmentSection):
    """SimCLR's ``augment:``: the grey views plus ``shared_crop`` (:class:`ViewPair`)."""

    shared_crop: bool = False  # true: both views from one crop (a small finding is in both or neither)


class ViewPair(nn.Module):
    """SimCLR's positive pair (Chen et al. 2020): two independent grey views of each image.

    With ``shared_crop`` both views are cut from one random crop per image, then flipped,
    rotated and changed in intensity independently: they always show the same region, so a
    small finding is in both views or in neither and is never something the encoder is
    trained to ignore.
    """

    def __init__(self, aug: dict | None = None):
        super().__init__()
        aug = dict(aug or {})
        if aug.pop("shared_crop", False):
            geometry = {k: aug.pop(k) for k in ("crop_scale", "crop_ratio", "view_size") if k in aug}
            self.crop = GreyAugment(**geometry, rotation=0.0, hflip=0.0, brightness=0.0, contrast=0.0,
                                    gamma=(1.0, 1.0), blur_p=0.0, noise_p=0.0)
            self.augment = GreyAugment.from_config({**aug, "crop_scale": (1.0, 1.0), "crop_ratio": (1.0, 1.0)})
        else:
            self.crop = None
            self.augment = GreyAugment.from_config(aug)

    def forward(self, img: torch.Tensor, g: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        if self.crop is not None:
            img = self.crop(img, g)
        return self.augment(img, g), self.augment(img, g)


@dataclass
class MetadataAugmentSection(AugmentSection):
    """The metadata method's ``augment:``: light grey views, on unless ``enabled: false``."""

    enabled: bool = True


def random_resized_crop_flip(x: torch.Tensor, valid: torch.Tensor | None = None, scale=(0.4, 1.0),
                             ratio=(3 / 4, 4 / 3), hflip: float = 0.5, generator: torch.Generator | None = None):
    """DeepCluster's views (Caron et al. 2018): per-image random resized crop + horizontal flip, same size.

    The crop covers ``scale`` of the image area with aspect ``ratio``; ``valid`` (bool)
    follows the same geometry (nearest neighbour).  The five uniforms per image are drawn
    on the generator's device (the global CPU generator when None).  Returns ``(views, valid)``.
    """
    b, dev = x.shape[0], x.device
    u = torch.rand(b, 5, generator=generator, device="cpu" if generator is None else generator.device).to(dev)
    area = scale[0] + (scale[1] - scale[0]) * u[:, 0]
    logr = math.log(ratio[0]) + (math.log(ratio[1]) - math.log(ratio[0])) * u[:, 1]
    sw, sh, cx, cy = crop_geometry(area, logr, u[:, 2], u[:, 3])
    flip = torch.where(u[:, 4] < hflip, -1.0, 1.0)
    return affine_warp(x, affine_theta(sw, sh, cx, cy, flip=flip), valid=valid)


def finetune_augment(x: torch.Tensor, o: dict, gen: torch.Generator) -> torch.Tensor:
    """Fine-tuning augmentation of a [B, 1, S, S] batch in [0, 1] (evaluation's ``finetune.*`` keys).

    Horizontal flip (``flip``, p = 0.5), rotation up to ``rotate`` degrees with a zoom-in by up
    to ``crop`` and a shift up to ``crop`` (one affine warp), brightness / contrast.
    """
    b = x.shape[0]
    dev = gen.device
    if o.get("flip", True):
        flip = (torch.rand(b, generator=gen, device=dev) < 0.5).to(x.device)
        x = torch.where(flip.view(-1, 1, 1, 1), x.flip(-1), x)
    rot = float(o.get("rotate", 0.0))
    crop = float(o.get("crop", 0.0))
    if rot > 0 or crop > 0:
        ang = (torch.rand(b, generator=gen, device=dev) * 2 - 1) * math.radians(rot)
        scale = 1 - torch.rand(b, generator=gen, device=dev) * crop          # zoom in by up to `crop`
        tx = (torch.rand(b, generator=gen, device=dev) * 2 - 1) * crop
        ty = (torch.rand(b, generator=gen, device=dev) * 2 - 1) * crop
        x = affine_warp(x, affine_theta(scale, scale, tx, ty, ang).to(x.device))[0]
    br, ct = float(o.get("brightness", 0.0)), float(o.get("contrast", 0.0))
    if br > 0 or ct > 0:
        c = (1 + (torch.rand(b, 1, 1, 1, generator=gen, device=dev) * 2 - 1) * ct).to(x.device)
        d = ((torch.rand(b, 1, 1, 1, generator=gen, device=dev) * 2 - 1) * br).to(x.device)
        m = x.mean(dim=(2, 3), keepdim=True)
        x = ((x - m) * c + m + d).clamp_(0, 1)
    return x


# --------------------------------------------------------------------------- Models Genesis
# Zhou et al., MICCAI 2019 (Medical Image Analysis 67, 2021): the image is corrupted by a
# chain of random transformations and a U-Net learns to restore it.  Each step below is
# split in a draw (random parameters of the whole batch from one generator) and a pure
# function of the batch and those parameters, which is what the tests compare image by image.
def _randint(lo, hi, shape, g, device) -> torch.Tensor:
    """Integers uniform in [lo, hi] (bounds: ints or tensors broadcasting to ``shape``), int64."""
    lo = torch.as_tensor(lo, device=device)
    hi = torch.as_tensor(hi, device=device)
    u = _rand(shape, g, device, torch.float64)
    return torch.minimum(lo + (u * (hi - lo + 1).to(torch.float64)).long(), hi)


def _coin(b: int, p: float, g, device) -> torch.Tensor:
    return _rand(b, g, device) < p


def flip_draw(b: int, rate: float, g, device, tries: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    """Models Genesis' flips: up to ``tries`` flips, each taken with ``rate`` while the previous was,
    along a random axis.  Returns ``(flip_rows, flip_cols)``, bool [B]: the parity of each axis."""
    taken = (_rand((b, tries), g, device) < rate).cumprod(dim=1).bool()
    cols = _rand((b, tries), g, device) < 0.5  # axis 1 of the image (left-right), else axis 0
    return (taken & ~cols).sum(1) % 2 == 1, (taken & cols).sum(1) % 2 == 1


def flip_images(x: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """Flip image i upside down where ``rows[i]`` and left-right where ``cols[i]``."""
    x = torch.where(rows.view(-1, 1, 1, 1), x.flip(-2), x)
    return torch.where(cols.view(-1, 1, 1, 1), x.flip(-1), x)


def shuffle_block_draw(b: int, h: int, w: int, n_blocks: int, g, device, max_frac: float = 0.1):
    """``n_blocks`` blocks per image: sides in [1, max_frac x side], anywhere inside the image.

    Returns ``(y, x, bh, bw)``, int64 [n_blocks, B]: block t of image i is
    ``[y, y + bh) x [x, x + bw)`` at index ``[t, i]``.
    """
    bh_max, bw_max = max(1, int(h * max_frac)), max(1, int(w * max_frac))
    shape = (int(n_blocks), b)
    bh = _randint(1, bh_max, shape, g, device)
    bw = _randint(1, bw_max, shape, g, device)
    return _randint(0, h - bh, shape, g, device), _randint(0, w - bw, shape, g, device), bh, bw


def shuffle_blocks(x: torch.Tensor, blocks, on: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """Permute the pixels inside each block, block after block (each permutes the current image).

    ``blocks`` = ``(y, x, bh, bw)`` int64 [T, B]; ``on`` bool [B] (images left alone where
    False); ``keys`` [T, B, M] uniform in [0, 1), M >= the largest block's area: block t of
    image i moves its k-th pixel (raster order) to the place of its ``argsort(keys)``-th, a
    uniformly random permutation.  Vectorised over the batch and the block's pixels with one
    gather + scatter per block; a pixel's value only ever moves inside a block, so every
    image keeps its pixel multiset.  Padding pixels are shuffled like the others (as before).
    """
    y0, x0, bh, bw = blocks
    b, c, h, w = x.shape
    n, m = h * w, keys.shape[-1]
    j = torch.arange(m, device=x.device)
    inside = j < (bh * bw * on.long()[None]).unsqueeze(-1)                     # [T, B, M]; none when off
    perm = torch.where(inside, keys, 2.0 + j.to(keys.dtype)).argsort(dim=-1)   # in-block first, random
    # offset of a block's k-th pixel (raster order) from its corner, for each block width q: a table
    q = torch.arange(1, min(m, w) + 1, device=x.device)[:, None]  # widths (a block fits in the image and in M)
    table = torch.cat([torch.zeros_like(j)[None], (j // q) * w + j % q])       # row q: width q
    offset = table[bw]                                                          # [T, B, M]
    corner = (y0 * w + x0).unsqueeze(-1)
    # flat pixel indices; the k-th pixel takes the value of the perm[k]-th; the dummy slot n elsewhere
    src = torch.where(inside, corner + offset.gather(-1, perm), n)
    dst = torch.where(inside, corner + offset, n)
    if c > 1:  # every channel of an image moves alike: channels become rows of the batch
        src, dst = src.repeat_interleave(c, dim=1), dst.repeat_interleave(c, dim=1)
    flat = torch.cat([x.reshape(b * c, n), x.new_zeros(b * c, 1)], dim=1)
    for s, d in zip(src.unbind(0), dst.unbind(0)):  # in order: blocks overlap, each permutes the current image
        flat.scatter_(1, d, flat.gather(1, s))
    return flat[:, :n].reshape(b, c, h, w)


def local_pixel_shuffle(x: torch.Tensor, on: torch.Tensor, n_blocks: int, g, max_frac: float = 0.1,
                        chunk: int = 64) -> torch.Tensor:
    """Models Genesis' local pixel shuffling of the images where ``on``: ``n_blocks`` random blocks.

    The permutation keys are drawn ``chunk`` blocks at a time (memory: chunk x B x the
    largest block's area); ``chunk`` changes which random numbers go to which block, not
    their distribution.
    """
    b, _, h, w = x.shape
    y0, x0, bh, bw = shuffle_block_draw(b, h, w, n_blocks, g, x.device, max_frac)
    m = max(1, int(h * max_frac)) * max(1, int(w * max_frac))
    for s in range(0, int(n_blocks), chunk):
        sl = slice(s, s + chunk)
        keys = _rand((y0[sl].shape[0], b, m), g, x.device)
        x = shuffle_blocks(x, (y0[sl], x0[sl], bh[sl], bw[sl]), on, keys)
    return x


def bezier_curves(cx: torch.Tensor, cy: torch.Tensor, n: int = 1000) -> tuple[torch.Tensor, torch.Tensor]:
    """Cubic Bézier curves through (0, 0), (cx0, cy0), (cx1, cy1), (1, 1), sampled at ``n`` values of t.

    ``cx``, ``cy``: [B, 2]; returns ``(xs, ys)`` [B, n] in their dtype, ``xs`` made non-decreasing
    (it is in exact arithmetic when ``cx`` is sorted).
    """
    t = torch.linspace(0.0, 1.0, n, dtype=cx.dtype, device=cx.device)
    b1, b2, b3 = 3 * (1 - t) ** 2 * t, 3 * (1 - t) * t ** 2, t ** 3

    def curve(p):
        return p[:, :1] * b1 + p[:, 1:] * b2 + b3

    return curve(cx).cummax(dim=1).values, curve(cy)


def interp(v: torch.Tensor, xs: torch.Tensor, ys: torch.Tensor) -> torch.Tensor:
    """Row-wise ``numpy.interp``: ``v`` [B, K] through the piecewise-linear maps ``xs -> ys`` [B, n]."""
    n = xs.shape[1]
    i = torch.searchsorted(xs, v.contiguous(), right=True).clamp(1, n - 1)
    x0, x1, y0, y1 = xs.gather(1, i - 1), xs.gather(1, i), ys.gather(1, i - 1), ys.gather(1, i)
    frac = ((v - x0) / (x1 - x0).clamp_min(torch.finfo(xs.dtype).tiny)).clamp(0, 1)
    out = torch.where(v >= xs[:, -1:], ys[:, -1:], y0 + frac * (y1 - y0))
    return torch.where(v <= xs[:, :1], ys[:, :1], out)


def bezier_draw(b: int, invert_rate: float, g, device):
    """Two random control points with sorted coordinates (monotone curve), and which curves decrease."""
    u = _rand((b, 2, 2), g, device, torch.float64).sort(dim=-1).values
    return u[:, 0], u[:, 1], _coin(b, invert_rate, g, device)


def bezier_map(x: torch.Tensor, cx: torch.Tensor, cy: torch.Tensor, decreasing: torch.Tensor) -> torch.Tensor:
    """Map intensities through each image's Bézier curve (``1 - curve`` where ``decreasing``): a
    monotone map of [0, 1] onto [0, 1]."""
    xs, ys = bezier_curves(cx, cy)
    ys = torch.where(decreasing[:, None], 1.0 - ys, ys)
    b = x.shape[0]
    return interp(x.reshape(b, -1), xs.to(x.dtype), ys.to(x.dtype)).reshape(x.shape)


def box_draw(b: int, size: int, lo: int, hi: int, k: int, g, device, margin: int = 3):
    """``k`` random intervals per image, length in [lo, hi], kept ``margin`` px off the border when
    they fit with it: ``(start, length)`` int64 [B, k]."""
    lo = max(1, min(lo, size))
    hi = max(lo, min(hi, size))
    length = _randint(lo, hi, (b, k), g, device)
    m = torch.where(size - length - 2 * margin >= 0, margin, 0)
    return _randint(m, size - length - m, (b, k), g, device), length


def box_union(h: int, w: int, y: torch.Tensor, bh: torch.Tensor, x: torch.Tensor, bw: torch.Tensor,
              active: torch.Tensor) -> torch.Tensor:
    """Union of the active boxes (all [B, k]) as a bool mask [B, 1, H, W]."""
    rows = torch.arange(h, device=y.device)
    cols = torch.arange(w, device=y.device)
    in_r = (rows >= y[..., None]) & (rows < (y + bh)[..., None])               # [B, k, H]
    in_c = (cols >= x[..., None]) & (cols < (x + bw)[..., None]) & active[..., None]
    return (in_r[..., :, None] & in_c[..., None, :]).any(dim=1, keepdim=True)


def paint_draw(b: int, h: int, w: int, g, device, outer: bool, max_boxes: int = 5, p_continue: float = 0.95):
    """Boxes of in-painting (``outer=False``: 1/6..1/3 of each side; a box is added with
    ``p_continue`` while the previous one was, so possibly none) or out-painting (``outer=True``:
    3/7..4/7; the first box always).  Returns ``(y, bh, x, bw, active)`` [B, max_boxes]."""
    if outer:
        y, bh = box_draw(b, h, h - 4 * h // 7, h - 3 * h // 7, max_boxes, g, device)
        x, bw = box_draw(b, w, w - 4 * w // 7, w - 3 * w // 7, max_boxes, g, device)
    else:
        y, bh = box_draw(b, h, h // 6, h // 3, max_boxes, g, device)
        x, bw = box_draw(b, w, w // 6, w // 3, max_boxes, g, device)
    go = _rand((b, max_boxes), g, device) < p_continue
    if outer:
        go[:, 0] = True
    return y, bh, x, bw, go.cumprod(dim=1).bool()


def paint(x: torch.Tensor, noise: torch.Tensor, inner: torch.Tensor, kept: torch.Tensor,
          inpaint: torch.Tensor, outpaint: torch.Tensor) -> torch.Tensor:
    """In-painting (noise in the ``inner`` boxes) where ``inpaint``, out-painting (noise outside the
    ``kept`` boxes) where ``outpaint``; masks [B, 1, H, W], flags [B]."""
    fill = (inner & inpaint.view(-1, 1, 1, 1)) | (~kept & outpaint.view(-1, 1, 1, 1))
    return torch.where(fill, noise, x)


@dataclass
class GenesisCorruption:
    """``genesis:`` -- the combined corruption with the Models Genesis default probabilities.

    In the order and with the defaults of the authors' released configuration (``flip_rate``
    0.4, ``local_rate`` 0.5, ``nonlinear_rate`` 0.9, ``paint_rate`` 0.9, ``inpaint_rate`` 0.2
    of the painted images): flips (input, target and valid mask), local pixel shuffling
    (``local_blocks`` blocks), Bézier intensity mapping (decreasing with
    ``nonlinear_invert_rate``), in- or out-painting with uniform noise.
    """

    flip_rate: float = 0.4
    local_rate: float = 0.5
    local_blocks: int = 1000
    nonlinear_rate: float = 0.9
    nonlinear_invert_rate: float = 0.5
    paint_rate: float = 0.9
    inpaint_rate: float = 0.2

    @classmethod
    def from_cfg(cls, cfg: dict) -> "GenesisCorruption":
        m = cfg.get("genesis", {}) or {}
        kw = {k: type(getattr(cls, k))(m[k]) for k in cls.__dataclass_fields__ if k in m}
        for k, v in kw.items():
            if k.endswith("_rate") and not 0.0 <= v <= 1.0:
                raise UserError(f"genesis.{k}={v}: a probability must be in [0, 1]")
        return cls(**kw)

    def __call__(self, x: torch.Tensor, g: torch.Generator | None, valid: torch.Tensor | None = None):
        """``(corrupted, target, valid)`` for a batch [B, C, H, W] in [0, 1] (float32).

        ``target`` is the (possibly flipped) clean image and ``valid`` the equally flipped mask
        (None when not given); the other steps ignore the mask, as before: letterbox padding is
        shuffled and painted like the image, and the loss skips it.
        """
        b, _, h, w = x.shape
        dev = x.device
        target, valid = x.float(), (None if valid is None else valid.bool())
        if self.flip_rate > 0:  # a step whose probability is 0 is skipped, its draws too
            rows, cols = flip_draw(b, self.flip_rate, g, dev)
            target = flip_images(target, rows, cols)
            valid = None if valid is None else flip_images(valid, rows, cols)
        y = target
        if self.local_rate > 0 and self.local_blocks > 0:
            y = local_pixel_shuffle(y, _coin(b, self.local_rate, g, dev), self.local_blocks, g)
        if self.nonlinear_rate > 0:
            on = _coin(b, self.nonlinear_rate, g, dev)
            cx, cy, dec = bezier_draw(b, self.nonlinear_invert_rate, g, dev)
            y = torch.where(on.view(-1, 1, 1, 1), bezier_map(y, cx, cy, dec), y)
        if self.paint_rate > 0:
            painted, inner = _coin(b, self.paint_rate, g, dev), _coin(b, self.inpaint_rate, g, dev)
            box_in, box_out = paint_draw(b, h, w, g, dev, outer=False), paint_draw(b, h, w, g, dev, outer=True)
            y = paint(y, _rand(y.shape, g, dev), box_union(h, w, *box_in), box_union(h, w, *box_out),
                      painted & inner, painted & ~inner)
        return y, target, valid
