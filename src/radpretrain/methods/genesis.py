"""Models Genesis in 2-D: restore images from random corruptions with a U-Net.

Zhou, Sodha, Rahman Siddiquee, Feng, Tajbakhsh, Gotway, Liang, "Models Genesis:
Generic Autodidactic Models for 3D Medical Image Analysis", MICCAI 2019
(extended in Medical Image Analysis 67, 2021).  A U-Net sees a corrupted image and
is trained with a mean-squared restoration loss to output the original; only its
encoder is kept.  The thesis seed (004, "Models-Genesis-style 2D pretraining on 21
mixed CT/MR/X-ray datasets") applies the idea to 2-D images with VGG16/ResNet50
encoders and compares BatchNorm with InstanceNorm in the decoder.

Corruptions (one image, numpy, every random draw from a ``numpy.random.Generator``
so a corruption is reproducible from its seed), in the order and with the default
probabilities of the authors' released configuration (``flip_rate=0.4``,
``local_rate=0.5``, ``nonlinear_rate=0.9``, ``paint_rate=0.9``,
``outpaint_rate=0.8`` i.e. in-painting 0.2 of the painted images):

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

import os
from dataclasses import dataclass, field
from typing import Literal
from pathlib import Path

import numpy as np
import torch

from radpretrain.config import get
from radpretrain.errors import UserError
from radpretrain.methods.base import PretrainMethod, register, save_image_grid
from radpretrain.settings import ModelSection


# --------------------------------------------------------------------------- corruptions
def bezier_curve(points: np.ndarray, n: int = 1000) -> tuple[np.ndarray, np.ndarray]:
    """Sample a cubic Bézier curve with control points ``points`` [4, 2] at ``n`` values of t."""
    p = np.asarray(points, dtype=np.float64)
    t = np.linspace(0.0, 1.0, n)[:, None]
    basis = np.concatenate([(1 - t) ** 3, 3 * (1 - t) ** 2 * t, 3 * (1 - t) * t ** 2, t ** 3], axis=1)
    xy = basis @ p
    return xy[:, 0], xy[:, 1]


def random_bezier_mapping(rng: np.random.Generator, decreasing: bool = False, n: int = 1000):
    """A random monotone map of [0, 1] onto [0, 1] as ``(xs, ys)`` for ``np.interp``."""
    cx = np.sort(rng.random(2))
    cy = np.sort(rng.random(2))
    pts = np.array([[0.0, 0.0], [cx[0], cy[0]], [cx[1], cy[1]], [1.0, 1.0]])
    xs, ys = bezier_curve(pts, n)
    xs = np.maximum.accumulate(xs)  # guard against rounding; the curve is monotone in exact arithmetic
    if decreasing:
        ys = 1.0 - ys
    return xs, ys


def nonlinear_transform(img: np.ndarray, rng: np.random.Generator, invert_rate: float = 0.5) -> np.ndarray:
    """Map intensities through a random Bézier curve (decreasing with probability ``invert_rate``)."""
    xs, ys = random_bezier_mapping(rng, decreasing=bool(rng.random() < invert_rate))
    return np.interp(img, xs, ys).astype(img.dtype)


def local_pixel_shuffle(img: np.ndarray, rng: np.random.Generator, n_blocks: int = 1000,
                        max_frac: float = 0.1) -> tuple[np.ndarray, list[tuple[int, int, int, int]]]:
    """Permute pixels inside ``n_blocks`` random small blocks; returns (image, [(y, x, h, w), ...])."""
    out = np.array(img, copy=True)
    h, w = out.shape[-2:]
    bh_max, bw_max = max(1, int(h * max_frac)), max(1, int(w * max_frac))
    blocks = []
    for _ in range(int(n_blocks)):
        bh = int(rng.integers(1, bh_max + 1))
        bw = int(rng.integers(1, bw_max + 1))
        y = int(rng.integers(0, h - bh + 1))
        x = int(rng.integers(0, w - bw + 1))
        win = out[..., y:y + bh, x:x + bw].reshape(-1)
        out[..., y:y + bh, x:x + bw] = rng.permutation(win).reshape(bh, bw)
        blocks.append((y, x, bh, bw))
    return out, blocks


def _box(rng: np.random.Generator, size: int, lo: int, hi: int, margin: int = 3) -> tuple[int, int]:
    """Random (start, length) with length in [lo, hi], kept ``margin`` pixels off the border when possible."""
    lo = max(1, min(lo, size))
    hi = max(lo, min(hi, size))
    length = int(rng.integers(lo, hi + 1))
    m = margin if size - length - 2 * margin >= 0 else 0
    start = int(rng.integers(m, size - length - m + 1))
    return start, length


def in_painting(img: np.ndarray, rng: np.random.Generator, max_boxes: int = 5,
                p_continue: float = 0.95) -> tuple[np.ndarray, np.ndarray]:
    """Fill up to ``max_boxes`` boxes (1/6..1/3 of each side) with uniform noise; returns (image, mask)."""
    out = np.array(img, copy=True)
    h, w = out.shape[-2:]
    mask = np.zeros((h, w), dtype=bool)
    cnt = max_boxes
    while cnt > 0 and rng.random() < p_continue:
        y, bh = _box(rng, h, h // 6, h // 3)
        x, bw = _box(rng, w, w // 6, w // 3)
        out[..., y:y + bh, x:x + bw] = rng.random((bh, bw)).astype(out.dtype)
        mask[y:y + bh, x:x + bw] = True
        cnt -= 1
    return out, mask


def out_painting(img: np.ndarray, rng: np.random.Generator, max_boxes: int = 5,
                 p_continue: float = 0.95) -> tuple[np.ndarray, np.ndarray]:
    """Replace everything by noise except up to ``max_boxes`` kept boxes; returns (image, kept mask)."""
    h, w = img.shape[-2:]
    out = rng.random(img.shape).astype(img.dtype)
    keep = np.zeros((h, w), dtype=bool)
    cnt = max_boxes
    first = True
    while cnt > 0 and (first or rng.random() < p_continue):
        y, bh = _box(rng, h, h - 4 * h // 7, h - 3 * h // 7)
        x, bw = _box(rng, w, w - 4 * w // 7, w - 3 * w // 7)
        out[..., y:y + bh, x:x + bw] = img[..., y:y + bh, x:x + bw]
        keep[y:y + bh, x:x + bw] = True
        cnt -= 1
        first = False
    return out, keep


@dataclass
class GenesisCorruption:
    """The combined corruption with the Models Genesis default probabilities."""

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

    def __call__(self, img: np.ndarray, rng: np.random.Generator, valid: np.ndarray | None = None):
        """Return ``(corrupted, target, valid)`` for a 2-D image in [0, 1]; target/valid may be flipped."""
        x = np.asarray(img, dtype=np.float32)
        v = np.ones(x.shape, dtype=bool) if valid is None else np.asarray(valid, dtype=bool)
        cnt = 3
        while cnt > 0 and rng.random() < self.flip_rate:
            axis = int(rng.integers(0, 2))
            x, v = np.flip(x, axis), np.flip(v, axis)
            cnt -= 1
        target = np.ascontiguousarray(x)
        v = np.ascontiguousarray(v)
        y = target
        if rng.random() < self.local_rate:
            y, _ = local_pixel_shuffle(y, rng, self.local_blocks)
        if rng.random() < self.nonlinear_rate:
            y = nonlinear_transform(y, rng, self.nonlinear_invert_rate)
        if rng.random() < self.paint_rate:
            if rng.random() < self.inpaint_rate:
                y, _ = in_painting(y, rng)
            else:
                y, _ = out_painting(y, rng)
        return np.ascontiguousarray(y, dtype=np.float32), target, v


class GenesisTransform:
    """Per-sample transform for data-loader workers: adds ``corrupted`` to a StoreDataset sample.

    The random generator is created lazily in each worker from ``torch.initial_seed()``
    (distinct per worker and per epoch; reproducible under ``seed_everything(workers=True)``).
    """

    def __init__(self, corruption: GenesisCorruption):
        self.corruption = corruption
        self._rng = None
        self._pid = None

    def rng(self) -> np.random.Generator:
        if self._rng is None or self._pid != os.getpid():
            self._rng = np.random.default_rng(torch.initial_seed() % (2 ** 63))
            self._pid = os.getpid()
        return self._rng

    def __call__(self, sample: dict) -> dict:
        img = sample["image"]
        valid = sample.get("valid")
        arr = img.numpy() if isinstance(img, torch.Tensor) else np.asarray(img)
        varr = None if valid is None else (valid.numpy() if isinstance(valid, torch.Tensor) else np.asarray(valid))
        lead = arr.shape[:-2]
        cor, tgt, v = self.corruption(arr.reshape(arr.shape[-2:]), self.rng(),
                                      None if varr is None else varr.reshape(varr.shape[-2:]))
        sample = dict(sample)
        sample["image"] = torch.from_numpy(tgt.reshape(lead + tgt.shape))
        sample["corrupted"] = torch.from_numpy(cor.reshape(lead + cor.shape))
        if valid is not None:
            sample["valid"] = torch.from_numpy(v.reshape(lead + v.shape))
        return sample


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
    config_sections = {"genesis": GenesisCorruption, "model": GenesisModelSection}
    """Models Genesis (Zhou et al. 2019) in 2-D: U-Net restoration of corrupted radiographs.

    Config: ``model.backbone`` (a timm CNN), ``model.pretrained``, ``model.decoder_norm``
    (``batch``/``instance``), ``model.decoder_channels`` (finest first, or null), and the
    corruption probabilities under ``genesis.`` (see :class:`GenesisCorruption`).
    """

    def __init__(self, cfg: dict, store=None):
        super().__init__(cfg, store)
        from radpretrain.models.backbones import create_backbone, is_vit, resolve_arch
        from radpretrain.models.unet import UNet

        name = str(get(cfg, "model.backbone", "resnet18"))
        if is_vit(resolve_arch(name)):
            raise UserError(f"genesis needs a CNN backbone with multi-scale features (resnet18/50, densenet121, "
                            f"vgg16_bn, efficientnet_b0, ...), got model.backbone={name!r}")
        self.encoder = create_backbone(name, in_chans=1, pretrained=get(cfg, "model.pretrained", None),
                                       **(get(cfg, "model.kwargs", {}) or {}))
        self.arch, self.model_kwargs = self.encoder.radpretrain_arch, dict(self.encoder.radpretrain_kwargs)
        self.unet = UNet(self.encoder, decoder_channels=get(cfg, "model.decoder_channels", None),
                         norm=str(get(cfg, "model.decoder_norm", "instance")))
        self.corruption = GenesisCorruption.from_cfg(cfg)
        self.seed = int(get(cfg, "seed", 0) or 0)
        self._rng = np.random.default_rng(self.seed)

    # data ------------------------------------------------------------------
    def sample_transform(self):
        return GenesisTransform(self.corruption)

    def corrupt_batch(self, batch: dict, rng: np.random.Generator | None = None) -> dict:
        """Corrupt a CPU batch in the calling process (when the data loader did not do it)."""
        rng = self._rng if rng is None else rng
        imgs = batch["image"]
        valid = batch.get("valid")
        cors, tgts, vals = [], [], []
        for i in range(imgs.shape[0]):
            v = None if valid is None else valid[i, 0].cpu().numpy()
            c, t, vv = self.corruption(imgs[i, 0].cpu().numpy(), rng, v)
            cors.append(c)
            tgts.append(t)
            vals.append(vv)
        batch = dict(batch)
        batch["corrupted"] = torch.from_numpy(np.stack(cors))[:, None].to(imgs.dtype)
        batch["image"] = torch.from_numpy(np.stack(tgts))[:, None].to(imgs.dtype)
        if valid is not None:
            batch["valid"] = torch.from_numpy(np.stack(vals))[:, None]
        return batch

    def on_before_batch_transfer(self, batch, dataloader_idx: int = 0):
        if not (isinstance(batch, dict) and "image" in batch):
            return batch
        if self._trainer is not None and not self.trainer.training:
            # validation: the same corruption of the same images at every check, whatever the
            # data-loader workers drew, so val/loss curves (early stopping, best.ckpt) are comparable
            first = batch.get("index")
            first = int(first.reshape(-1)[0]) if isinstance(first, torch.Tensor) and first.numel() else 0
            batch = {k: v for k, v in batch.items() if k != "corrupted"}
            return self.corrupt_batch(batch, np.random.default_rng([self.seed, first]))
        if "corrupted" not in batch:
            batch = self.corrupt_batch(batch)
        return batch

    # model -----------------------------------------------------------------
    def compile_modules(self) -> list[torch.nn.Module]:
        return [self.unet]  # encoder + decoder

    def restore(self, corrupted: torch.Tensor) -> torch.Tensor:
        """Restored image in [0, 1] from a corrupted [0, 1] image."""
        return torch.sigmoid(self.unet(self.normalize(corrupted)))

    def compute_loss(self, batch, batch_idx):
        restored = self.restore(batch["corrupted"])
        return masked_mse(restored, batch["image"], batch.get("valid"))

    def encoder_meta(self) -> dict:
        meta = super().encoder_meta()
        meta["genesis"] = {"decoder_norm": self.unet.norm, "decoder_channels": list(self.unet.decoder_channels),
                           "corruption": dict(self.corruption.__dict__)}
        return meta

    # previews --------------------------------------------------------------
    @torch.no_grad()
    def save_previews(self, batch: dict, out_dir: Path) -> list[Path]:
        """``genesis_restore_stepN.png``: rows input / corrupted / restored (one column per image)."""
        batch = {k: (v.detach().cpu()[:8] if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}
        if "corrupted" not in batch:
            batch = self.corrupt_batch(batch, np.random.default_rng(self.seed))
        was_training = self.training
        self.eval()
        try:
            restored = self.restore(batch["corrupted"].to(self.device, torch.float32)).float().cpu()
        finally:
            self.train(was_training)
        step = self.global_step if self._trainer is not None else 0
        path = Path(out_dir) / f"genesis_restore_step{step:07d}.png"
        save_image_grid([batch["image"], batch["corrupted"], restored], path)
        return [path]
