"""SimCLR: contrastive learning of two augmented views.

Chen, Kornblith, Norouzi, Hinton: *A Simple Framework for Contrastive Learning of
Visual Representations*, ICML 2020.  Uses lightly's ``SimCLRProjectionHead`` and
``NTXentLoss`` (negatives gathered across DDP processes).

Augmentations are grey-level only (no colour jitter): random resized crop, small
rotation, optional horizontal flip, brightness / contrast / gamma, Gaussian blur
and Gaussian noise.  They run batched in torch on the training device
(:class:`radpretrain.transforms.ViewPair`), drawing from the step's seeded generator, so a
resumed run sees the same views as an uninterrupted one.

With ``metadata_heads.weight > 0`` the archive's metadata heads
(:class:`~radpretrain.methods.metadata.MetadataHeads`: body part, age, sex, view) are trained on
the encoder features of both views as well, and their weighted loss joins NT-Xent.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from radpretrain.config import get
from radpretrain.methods.base import Paper, PretrainMethod, Supervision, register
from radpretrain.methods.metadata import MetadataHeads, MetadataHeadsSection
from radpretrain.transforms import SimCLRAugmentSection, ViewPair


@dataclass
class SimCLRSection:
    temperature: float = field(default=0.1, metadata={"gt": 0.0})
    hidden_dim: int | None = field(default=None, metadata={"ge": 1, "help": "a positive integer or null (the encoder's width)"})
    output_dim: int = field(default=128, metadata={"ge": 1})


@register("simclr")
class SimCLR(PretrainMethod):
    """SimCLR on any timm backbone; config keys under ``simclr.`` and ``augment.``."""

    display_name = "SimCLR (contrastive)"
    paper = Paper("A Simple Framework for Contrastive Learning of Visual Representations",
                  ("Chen", "Kornblith", "Norouzi", "Hinton"), 2020, "ICML", "https://arxiv.org/abs/2002.05709")
    supervision = Supervision.CONTRASTIVE
    config_sections = {"simclr": SimCLRSection, "augment": SimCLRAugmentSection, "metadata_heads": MetadataHeadsSection}
    preview_name = "simclr_views"

    def __init__(self, cfg: dict, store=None):
        super().__init__(cfg, store)
        from lightly.loss import NTXentLoss  # heavy (torchvision): imported when a SimCLR model is built
        from lightly.models.modules import SimCLRProjectionHead  # heavy, as above

        self.build_encoder()
        dim = self.encoder.num_features
        self.head = SimCLRProjectionHead(input_dim=dim, hidden_dim=int(get(cfg, "simclr.hidden_dim", dim) or dim),
                                         output_dim=int(get(cfg, "simclr.output_dim", 128)))
        self.temperature = float(get(cfg, "simclr.temperature", 0.1))
        self.criterion = NTXentLoss(temperature=self.temperature, gather_distributed=True)
        self.pair = ViewPair(get(cfg, "augment", {}) or {})
        self.metadata_heads = MetadataHeads.from_section(cfg, store, dim)

    def views(self, img: torch.Tensor, g: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor]:
        return self.pair(img, g)

    def compute_loss(self, batch, batch_idx):
        g = self.step_generator(batch_idx)
        v1, v2 = self.views(batch["image"], g)
        x = self.normalize(torch.cat([v1, v2], dim=0))
        f = self.encoder(x)
        z1, z2 = self.head(f).chunk(2, dim=0)
        loss = self.criterion(z1, z2)
        if self.metadata_heads is None:
            return loss
        return self.metadata_heads.join(loss, f, torch.as_tensor(batch["index"]).repeat(2))

    def preview_rows(self, batch: dict, generator: torch.Generator) -> list[torch.Tensor]:
        """Rows: input, first view, second view."""
        img = batch["image"]
        v1, v2 = self.views(img, generator)
        if v1.shape[-2:] != img.shape[-2:]:  # local views: show them at the input's size
            v1, v2 = (F.interpolate(v, size=img.shape[-2:], mode="nearest") for v in (v1, v2))
        return [img, v1, v2]

    def encoder_meta(self) -> dict:
        meta = super().encoder_meta()
        meta["simclr"] = {"temperature": self.temperature}
        if self.metadata_heads is not None:
            meta["metadata"] = self.metadata_heads.describe()
        return meta
