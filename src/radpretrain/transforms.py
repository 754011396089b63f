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
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

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

