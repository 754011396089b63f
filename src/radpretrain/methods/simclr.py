"""SimCLR: contrastive learning of two augmented views.

Chen, Kornblith, Norouzi, Hinton: *A Simple Framework for Contrastive Learning of
Visual Representations*, ICML 2020.  Uses lightly's ``SimCLRProjectionHead`` and
``NTXentLoss`` (negatives gathered across DDP processes).

Augmentations are grey-level only (no colour jitter): random resized crop, small
rotation, optional horizontal flip, brightness / contrast / gamma, Gaussian blur
and Gaussian noise.  They run batched in torch on the training device
(:class:`radpretrain.transforms.ViewPair`), drawing from the step's seeded generator, so a
resumed run sees the same views as an uninterrupted one.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from radpretrain.config import get
from radpretrain.methods.base import PretrainMethod, register, save_image_grid
from radpretrain.transforms import SimCLRAugmentSection, ViewPair


@dataclass
class SimCLRSection:
    temperature: float = field(default=0.1, metadata={"gt": 0.0})
    hidden_dim: int | None = field(default=None, metadata={"ge": 1, "help": "a positive integer or null (the encoder's width)"})
    output_dim: int = field(default=128, metadata={"ge": 1})


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
        self.pair = ViewPair(get(cfg, "augment", {}) or {})

    def views(self, img: torch.Tensor, g: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor]:
        return self.pair(img, g)

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
