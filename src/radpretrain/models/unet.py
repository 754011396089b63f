"""A 2-D U-Net whose encoder is any timm CNN, for Models Genesis pretraining.

Zhou et al., "Models Genesis: Generic Autodidactic Models for 3D Medical Image
Analysis", MICCAI 2019 (and MedIA 2021) restore corrupted images with a U-Net
and keep its encoder.  Song, "Comparison of self-supervised and ImageNet pretraining
for medical image classification" (master's thesis, Politecnico di Torino, 2020) does
the same in 2-D with VGG16 and ResNet50 encoders and compares BatchNorm with
InstanceNorm in the decoder.

Design
------
The encoder is a *plain* timm model (``timm.create_model(arch, num_classes=0,
in_chans=1)``, normally from :func:`radpretrain.models.backbones.create_backbone`),
not a ``features_only`` model: ``features_only`` renames modules for some
architectures (``features.denseblock1`` -> ``features_denseblock1`` in DenseNet,
``features.5`` -> ``features_5`` in VGG), so its state dict would not load into
the classifier model that every later stage rebuilds.  The skip features come
from timm's ``forward_intermediates()`` of the same plain model, i.e. the very
stages (``feature_info``) that ``features_only=True`` would return, computed by
the same parameters.  The kept encoder is therefore ``unet.encoder`` itself and
its ``state_dict()`` has plain timm key names.

The decoder is light: from the deepest feature map upwards, each block resizes
to the next skip's exact spatial size (so odd input sizes work), concatenates
the skip and applies two 3x3 conv-norm-ReLU layers; a last block brings the map
back to the input size and a 1x1 conv gives one output channel.  ``norm`` is
``"batch"`` or ``"instance"`` (affine InstanceNorm).
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from radpretrain.errors import UserError

NORMS = ("batch", "instance")


def _norm(kind: str, ch: int) -> nn.Module:
    if kind == "batch":
        return nn.BatchNorm2d(ch)
    if kind == "instance":
        return nn.InstanceNorm2d(ch, affine=True)
    raise UserError(f"model.decoder_norm={kind!r}: choose one of {', '.join(NORMS)}")


class DecoderBlock(nn.Module):
    """Resize to the skip's size, concatenate, then two conv3x3-norm-ReLU layers."""

    def __init__(self, in_ch: int, skip_ch: int, out_ch: int, norm: str = "batch"):
        super().__init__()
        self.conv1 = nn.Conv2d(in_ch + skip_ch, out_ch, 3, padding=1, bias=False)
        self.norm1 = _norm(norm, out_ch)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1, bias=False)
        self.norm2 = _norm(norm, out_ch)
        self.act = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor, skip: torch.Tensor | None, size: Sequence[int]) -> torch.Tensor:
        x = F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False)
        if skip is not None:
            x = torch.cat([x, skip], dim=1)
        x = self.act(self.norm1(self.conv1(x)))
        return self.act(self.norm2(self.conv2(x)))


def encoder_feature_channels(encoder: nn.Module) -> list[int]:
    """Channels of the encoder's ``feature_info`` stages (what ``features_only`` would return)."""
    info = getattr(encoder, "feature_info", None)
    if not info or not hasattr(encoder, "forward_intermediates"):
        raise UserError(f"{type(encoder).__name__}: this timm model has no feature_info/forward_intermediates; "
                        "Models Genesis needs a CNN backbone with multi-scale features (e.g. resnet50, densenet121, "
                        "vgg16_bn, efficientnet_b0)")
    return [int(f["num_chs"]) for f in info]


class UNet(nn.Module):
    """U-Net = plain timm encoder (kept) + light decoder (thrown away after pretraining).

    ``forward(x)`` takes the normalised one-channel image [B, 1, H, W] and returns
    [B, out_chans, H, W] logits (apply a sigmoid for an image in [0, 1]).
    """

    def __init__(self, encoder: nn.Module, decoder_channels: Sequence[int] | None = None,
                 norm: str = "batch", out_chans: int = 1):
        super().__init__()
        if norm not in NORMS:
            raise UserError(f"model.decoder_norm={norm!r}: choose one of {', '.join(NORMS)}")
        self.encoder = encoder
        chans = encoder_feature_channels(encoder)
        n = len(chans)
        if decoder_channels is None:  # light: 32 channels at the finest skip, doubling, at most 256
            decoder_channels = [min(256, 32 * 2 ** i) for i in range(n)]
        decoder_channels = list(decoder_channels)
        if len(decoder_channels) < n:  # pad with the last value
            decoder_channels += [decoder_channels[-1]] * (n - len(decoder_channels))
        # decoder_channels[i] is the width after merging skip i (i = 0 is the finest).
        self.decoder_channels = decoder_channels[:n]
        blocks = []
        in_ch = chans[-1]
        for i in range(n - 2, -1, -1):
            blocks.append(DecoderBlock(in_ch, chans[i], self.decoder_channels[i], norm))
            in_ch = self.decoder_channels[i]
        self.blocks = nn.ModuleList(blocks)
        self.final_block = DecoderBlock(in_ch, 0, max(8, in_ch // 2), norm)
        self.head = nn.Conv2d(max(8, in_ch // 2), out_chans, 1)
        self.norm = norm

    def features(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The encoder's multi-scale feature maps (finest first), as ``features_only`` would give."""
        return self.encoder.forward_intermediates(x, intermediates_only=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feats = self.features(x)
        y = feats[-1]
        for block, skip in zip(self.blocks, feats[-2::-1]):
            y = block(y, skip, skip.shape[-2:])
        y = self.final_block(y, None, x.shape[-2:])
        return self.head(y)
