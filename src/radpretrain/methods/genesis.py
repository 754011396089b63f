"""Models Genesis in 2-D: restore images from random corruptions with a U-Net.

Zhou, Sodha, Rahman Siddiquee, Feng, Tajbakhsh, Gotway, Liang, "Models Genesis:
Generic Autodidactic Models for 3D Medical Image Analysis", MICCAI 2019
(extended in Medical Image Analysis 67, 2021).  A U-Net sees a corrupted image and
is trained with a mean-squared restoration loss to output the original; only its
encoder is kept.  Song, *Comparison of self-supervised and ImageNet pretraining for
medical image classification* (master's thesis, Politecnico di Torino, 2020) applies
the idea to 2-D images of 21 mixed CT/MR/X-ray datasets with VGG16/ResNet50 encoders
and compares BatchNorm with InstanceNorm in the decoder.

Corruptions (:class:`radpretrain.transforms.GenesisCorruption`) are batched torch ops on
the device, applied in the training and validation steps and drawn from the step's
generator (validation: a generator seeded by the batch's first image, so every check sees
the same corruption).  In the order and with the default probabilities of the authors'
released configuration (``flip_rate=0.4``, ``local_rate=0.5``, ``nonlinear_rate=0.9``,
``paint_rate=0.9``, ``outpaint_rate=0.8`` i.e. in-painting 0.2 of the painted images):

1. flip (both input and target; up to 3 tries with ``flip_rate``);
2. local pixel shuffling: blocks of at most 1/10 of each side, pixels permuted
   within the block.  Deviation: each block permutes the *current* image (the
   original read blocks from the clean copy), so every step is a permutation and
   the image's pixel multiset is preserved; ``genesis.local_blocks`` blocks
   (default 1000 in 2-D; 10,000 in the 3-D original);
3. non-linear intensity mapping by a cubic Bézier curve through (0, 0) and (1, 1)
   with two random control points; half of the curves are decreasing (the
   original's "flip" of the curve).  Deviation: the control points' coordinates are
   sorted (p1 <= p2 in x and in y), which makes the curve a monotone function
   of [0, 1] onto [0, 1]; the original sorted the sampled curve instead;
4. in-painting (up to 5 boxes of 1/6..1/3 of each side, 0.95 chance each, filled
   with uniform noise) or out-painting (noise everywhere except up to 5 kept
   boxes of 3/7..4/7 of each side).

The restoration loss is the MSE between ``sigmoid(unet(normalize(corrupted)))``
and the clean [0, 1] image, on valid (non-padding) pixels only.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch

from radpretrain.config import get
from radpretrain.errors import UserError
from radpretrain.methods.base import Paper, PretrainMethod, Supervision, register
from radpretrain.models.unet import UNet
from radpretrain.settings import ModelSection
from radpretrain.transforms import GenesisCorruption


# --------------------------------------------------------------------------- the method
def masked_mse(pred: torch.Tensor, target: torch.Tensor, valid: torch.Tensor | None) -> torch.Tensor:
    """Mean squared error over valid pixels only."""
    se = (pred.float() - target.float()) ** 2
    if valid is None:
        return se.mean()
    v = valid.to(se.dtype)
    return (se * v).sum() / v.sum().clamp_min(1.0)


@dataclass
class GenesisModelSection(ModelSection):
    """``model:`` with the U-Net decoder's keys."""

    decoder_norm: Literal["batch", "instance"] = "instance"
    decoder_channels: list[int] | None = field(default=None, metadata={"ge": 1, "help": "channels per skip level, finest first, or null"})


@register("genesis")
class Genesis(PretrainMethod):
    """Models Genesis (Zhou et al. 2019) in 2-D: U-Net restoration of corrupted radiographs.

    Config: ``model.backbone`` (a timm CNN), ``model.pretrained``, ``model.decoder_norm``
    (``batch``/``instance``), ``model.decoder_channels`` (finest first, or null), and the
    corruption probabilities under ``genesis.`` (see :class:`GenesisCorruption`).
    """

    display_name = "Models Genesis (image restoration)"
    paper = Paper("Models Genesis: Generic Autodidactic Models for 3D Medical Image Analysis",
                  ("Zhou", "Sodha", "Rahman Siddiquee", "Feng", "Tajbakhsh", "Gotway", "Liang"), 2019, "MICCAI",
                  "https://arxiv.org/abs/1908.06912")
    supervision = Supervision.RESTORATION
    config_sections = {"genesis": GenesisCorruption, "model": GenesisModelSection}
    preview_name = "genesis_restore"

    def __init__(self, cfg: dict, store=None):
        super().__init__(cfg, store)
        if self.backbone_is_vit():
            raise UserError(f"genesis needs a CNN backbone with multi-scale features (resnet18/50, densenet121, "
                            f"vgg16_bn, efficientnet_b0, ...), got model.backbone={self.backbone!r}")
        self.build_encoder()
        self.unet = UNet(self.encoder, decoder_channels=get(cfg, "model.decoder_channels", None),
                         norm=str(get(cfg, "model.decoder_norm", "instance")))
        self.corruption = GenesisCorruption.from_cfg(cfg)
        self.seed = int(get(cfg, "seed", 0) or 0)

    # corruption --------------------------------------------------------------
    def corrupt_batch(self, batch: dict, generator: torch.Generator) -> dict:
        """``batch`` with ``corrupted`` added and ``image`` / ``valid`` flipped as the corrupted input.

        Runs on the batch's device; ``generator`` must live there too.
        """
        with torch.autocast(batch["image"].device.type, enabled=False):  # Bézier curves and noise in float32
            cor, tgt, valid = self.corruption(batch["image"], generator, batch.get("valid"))
        batch = dict(batch)
        batch["corrupted"], batch["image"] = cor, tgt
        if valid is not None:
            batch["valid"] = valid
        return batch

    def corruption_generator(self, batch: dict, batch_idx: int) -> torch.Generator:
        """Training: the step's generator.  Validation: seeded by (seed, the batch's first image), so
        every check corrupts the same images alike and val/loss curves (early stopping, best.ckpt)
        are comparable."""
        device = batch["image"].device
        if self._trainer is None or self.trainer.training:
            return self.step_generator(batch_idx, device=device)
        index = batch.get("index")
        first = int(index.reshape(-1)[0]) if isinstance(index, torch.Tensor) and index.numel() else 0
        g = torch.Generator(device=device)
        g.manual_seed((self.seed * 1_000_003 + first) % (2**63 - 1))
        return g

    # model -----------------------------------------------------------------
    def compile_modules(self) -> list[torch.nn.Module]:
        return [self.unet]  # encoder + decoder

    def restore(self, corrupted: torch.Tensor) -> torch.Tensor:
        """Restored image in [0, 1] from a corrupted [0, 1] image."""
        return torch.sigmoid(self.unet(self.normalize(corrupted)))

    def compute_loss(self, batch, batch_idx):
        batch = self.corrupt_batch(batch, self.corruption_generator(batch, batch_idx))
        restored = self.restore(batch["corrupted"])
        return masked_mse(restored, batch["image"], batch.get("valid"))

    def encoder_meta(self) -> dict:
        meta = super().encoder_meta()
        meta["genesis"] = {"decoder_norm": self.unet.norm, "decoder_channels": list(self.unet.decoder_channels),
                           "corruption": dict(self.corruption.__dict__)}
        return meta

    # previews --------------------------------------------------------------
    def preview_rows(self, batch: dict, generator: torch.Generator) -> list[torch.Tensor]:
        """Rows: input, corrupted, restored (corruptions drawn from a generator seeded by ``seed``)."""
        if "corrupted" not in batch:
            g = torch.Generator(device=self.device)
            g.manual_seed(self.seed)
            batch = self.corrupt_batch(batch, g)
        return [batch["image"], batch["corrupted"], self.restore(batch["corrupted"].float()).float()]
