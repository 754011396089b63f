"""SimCLR: contrastive learning of two augmented views.

Chen, Kornblith, Norouzi, Hinton: *A Simple Framework for Contrastive Learning of
Visual Representations*, ICML 2020.  Uses lightly's ``SimCLRProjectionHead`` and
``NTXentLoss`` (negatives gathered across DDP processes).

Augmentations are grey-level only (no colour jitter): random resized crop, small
rotation, optional horizontal flip, brightness / contrast / gamma, Gaussian blur
and Gaussian noise.  They run batched in torch on the training device
(:class:`GreyAugment`), drawing from the step's seeded generator, so a resumed
run sees the same views as an uninterrupted one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from radpretrain.config import get
from radpretrain.methods.base import PretrainMethod, register, save_image_grid
from radpretrain.settings import probability


def _u(b: int, lo: float, hi: float, g, device) -> torch.Tensor:
    return lo + (hi - lo) * torch.rand(b, generator=g, device=device)


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


@dataclass
class SimCLRAugmentSection(AugmentSection):
    shared_crop: bool = False  # true: both views from one crop (a small finding is in both or neither)


@dataclass
class SimCLRSection:
    temperature: float = field(default=0.1, metadata={"gt": 0.0})
    hidden_dim: int | None = field(default=None, metadata={"ge": 1, "help": "a positive integer or null (the encoder's width)"})
    output_dim: int = field(default=128, metadata={"ge": 1})


class GreyAugment(nn.Module):
    """Batched grey-image augmentations on [B, 1, H, W] images in [0, 1]; output has the same shape.

    Parameters are ranges; a probability of 0 (or a degenerate range) turns a step off.
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
        dev = x.device
        x = x.float()
        if self.view_size:
            h = w = self.view_size
        # random resized crop + rotation + flip as one affine warp (bilinear, zeros outside)
        area = _u(b, *self.crop_scale, g, dev)
        logr = _u(b, math.log(self.crop_ratio[0]), math.log(self.crop_ratio[1]), g, dev)
        ratio = logr.exp()
        sw = (area * ratio).sqrt().clamp(max=1.0)  # fraction of the width kept
        sh = (area / ratio).sqrt().clamp(max=1.0)
        cx = (1 - sw) * (2 * torch.rand(b, generator=g, device=dev) - 1)
        cy = (1 - sh) * (2 * torch.rand(b, generator=g, device=dev) - 1)
        ang = _u(b, -self.rotation, self.rotation, g, dev) * math.pi / 180
        flip = torch.where(torch.rand(b, generator=g, device=dev) < self.hflip, -1.0, 1.0)
        cos, sin = ang.cos(), ang.sin()
        theta = torch.stack([
            torch.stack([cos * sw * flip, -sin * sh, cx], dim=1),
            torch.stack([sin * sw * flip, cos * sh, cy], dim=1),
        ], dim=1)
        grid = F.affine_grid(theta, [b, 1, h, w], align_corners=False)
        x = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        # intensity: gamma, contrast around the mean, brightness
        gam = torch.exp(_u(b, math.log(self.gamma[0]), math.log(self.gamma[1]), g, dev)).view(b, 1, 1, 1)
        x = x.clamp(0, 1).pow(gam)
        c = (1 + _u(b, -self.contrast, self.contrast, g, dev)).view(b, 1, 1, 1)
        m = x.mean(dim=(2, 3), keepdim=True)
        x = (x - m) * c + m + _u(b, -self.brightness, self.brightness, g, dev).view(b, 1, 1, 1)
        # Gaussian blur with a per-image sigma (grouped conv, one kernel per image)
        if self.blur_p > 0:
            sig = _u(b, *self.blur_sigma, g, dev)
            on = torch.rand(b, generator=g, device=dev) < self.blur_p
            rad = max(1, int(math.ceil(2 * self.blur_sigma[1])))
            t = torch.arange(-rad, rad + 1, device=dev, dtype=x.dtype)
            k = torch.exp(-(t[None] ** 2) / (2 * sig[:, None] ** 2))
            k = k / k.sum(1, keepdim=True)
            ident = (t == 0).to(x.dtype)[None].expand(b, -1)
            k = torch.where(on[:, None], k, ident)
            xx = x.reshape(1, b, h, w)
            xx = F.conv2d(F.pad(xx, (rad, rad, 0, 0), mode="replicate"), k.view(b, 1, 1, -1), groups=b)
            xx = F.conv2d(F.pad(xx, (0, 0, rad, rad), mode="replicate"), k.view(b, 1, -1, 1), groups=b)
            x = xx.reshape(b, 1, h, w)
        if self.noise_p > 0:
            std = _u(b, *self.noise_std, g, dev) * (torch.rand(b, generator=g, device=dev) < self.noise_p)
            x = x + std.view(b, 1, 1, 1) * torch.randn(x.shape, generator=g, device=dev)
        return x.clamp(0, 1)


@register("simclr")
class SimCLR(PretrainMethod):
    """SimCLR on any timm backbone; config keys under ``simclr.`` and ``augment.``."""

    config_sections = {"simclr": SimCLRSection, "augment": SimCLRAugmentSection}

    def __init__(self, cfg: dict, store=None):
        super().__init__(cfg, store)
        from lightly.loss import NTXentLoss
        from lightly.models.modules import SimCLRProjectionHead

        from radpretrain.models.backbones import create_backbone

        image_size = int(get(cfg, "data.image_size", 224))
        vit_kw = {}
        from radpretrain.models.backbones import is_vit, resolve_arch

        if is_vit(resolve_arch(get(cfg, "model.backbone", "resnet18"))):
            vit_kw = {"img_size": image_size, "patch_size": int(get(cfg, "model.patch_size", 16) or 16)}
        self.encoder = create_backbone(get(cfg, "model.backbone", "resnet18"), in_chans=1,
                                       pretrained=get(cfg, "model.pretrained", None), **vit_kw,
                                       **(get(cfg, "model.kwargs", {}) or {}))
        self.arch, self.model_kwargs = self.encoder.radpretrain_arch, dict(self.encoder.radpretrain_kwargs)
        dim = self.encoder.num_features
        self.head = SimCLRProjectionHead(input_dim=dim, hidden_dim=int(get(cfg, "simclr.hidden_dim", dim) or dim),
                                         output_dim=int(get(cfg, "simclr.output_dim", 128)))
        self.temperature = float(get(cfg, "simclr.temperature", 0.1))
        self.criterion = NTXentLoss(temperature=self.temperature, gather_distributed=True)
        aug = dict(get(cfg, "augment", {}) or {})
        self.shared_crop = bool(aug.pop("shared_crop", False))
        if self.shared_crop:
            # one crop per image, then two independent flips/rotations/intensity changes: the two
            # views always show the same region, so a small finding is in both views or in neither
            # and is never something the encoder is trained to ignore.
            geometry = {k: aug.pop(k) for k in ("crop_scale", "crop_ratio", "view_size") if k in aug}
            self.crop = GreyAugment(**geometry, rotation=0.0, hflip=0.0, brightness=0.0, contrast=0.0,
                                    gamma=(1.0, 1.0), blur_p=0.0, noise_p=0.0)
            self.augment = GreyAugment.from_config({**aug, "crop_scale": (1.0, 1.0), "crop_ratio": (1.0, 1.0)})
        else:
            self.crop = None
            self.augment = GreyAugment.from_config(aug)

    def views(self, img: torch.Tensor, g: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor]:
        if self.crop is not None:
            img = self.crop(img, g)
        return self.augment(img, g), self.augment(img, g)

    def compute_loss(self, batch, batch_idx):
        g = self.step_generator(batch_idx)
        v1, v2 = self.views(batch["image"], g)
        x = self.normalize(torch.cat([v1, v2], dim=0))
        z = self.head(self.encoder(x))
        z1, z2 = z.chunk(2, dim=0)
        return self.criterion(z1, z2)

    def save_previews(self, batch: dict, out_dir: Path) -> list[Path]:
        img = batch["image"][:8].to(self.device)
        g = torch.Generator(device=self.device)
        g.manual_seed(0)
        with torch.no_grad():
            v1, v2 = self.views(img, g)
            if v1.shape[-2:] != img.shape[-2:]:  # local views: show them at the input's size
                v1, v2 = (F.interpolate(v, size=img.shape[-2:], mode="nearest") for v in (v1, v2))
        step = self.global_step if self._trainer is not None else 0
        return [save_image_grid([img, v1, v2], Path(out_dir) / f"simclr_views_step{step:07d}.png")]

    def encoder_meta(self) -> dict:
        meta = super().encoder_meta()
        meta["simclr"] = {"temperature": self.temperature}
        return meta
