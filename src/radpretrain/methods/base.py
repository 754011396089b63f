"""The small interface every pretraining method implements.

A method is a :class:`lightning.LightningModule` built from the resolved config
(``cfg``, a nested dict) and the store it trains on.  The engine
(:mod:`radpretrain.pretrain`) owns data loading, the Trainer, checkpoints,
logging and the final ``encoder.safetensors``; a method owns its model, its loss
and whatever it needs between epochs.

A method is one module ``radpretrain/methods/<name>.py`` plus one packaged preset
``radpretrain/configs/<name>_cpu.yaml``.  Its class says what it is, and registers::

    @register("name")
    class Name(PretrainMethod):
        display_name = "..."                       # model cards, docs
        paper = Paper(title=..., authors=(...), year=..., venue=..., link=...)
        supervision = Supervision.CONTRASTIVE      # the kind of signal it learns from
        config_sections = {"name": NameSection}   # dataclasses its YAML keys are checked against

        def __init__(self, cfg, store=None):
            super().__init__(cfg, store)
            self.build_encoder()                   # self.encoder from model.*, recorded for encoder.json
            ...

        def compute_loss(self, batch, batch_idx): ...

:func:`register` refuses a class that leaves out one of these or has no ``<name>_cpu`` preset,
and :mod:`radpretrain.methods` finds the modules by itself (no list to extend).

Batches are collated dicts from :class:`radpretrain.data.dataset.StoreDataset`:
``image`` [B, 1, S, S] float in [0, 1], ``valid`` [B, 1, S, S] bool (False on
letterbox padding), ``index`` [B] (row in ``Store.images``) and the manifest
fields listed in :attr:`PretrainMethod.fields`.

Hooks a method may override (all optional except ``training_step`` / ``compute_loss``):

- ``fields``: manifest columns the batches must carry (e.g. ``body_part``).
- ``sample_transform()``: per-sample callable run in data-loader workers.
- ``train_sampler(dataset)``: a custom sampler (DeepCluster: uniform over clusters);
  set ``reload_dataloaders_every_epoch = True`` when it changes between epochs.
- ``on_train_epoch_start()``: e.g. DeepCluster's feature extraction + k-means.
- ``preview_rows(batch, generator)``: the rows of the preview grid a person would look at
  (``preview_name`` names the file); :meth:`PretrainMethod.save_previews` cuts the batch to
  ``previews.n`` images and writes ``previews/<preview_name>_stepNNNNNNN.png``.
- ``encoder_meta()``: what ``encoder.json`` records besides the engine's fields.
- ``export_encoder_module()``: the module written to ``encoder.safetensors`` (default
  ``self.encoder``; DINO: its teacher backbone).
- ``compile_modules()``: what ``trainer.compile`` compiles (default ``[self.encoder]``).

Batches on a GPU: the engine's data module owns ``transfer_batch_to_device``; with
``data.resize_on`` (auto: on a GPU, unless the method has a ``sample_transform``) the workers send
the stored pixels and the batch is letterboxed there, on the device.  Device-side work of a
method (batched augmentation, corruptions) belongs in ``on_after_batch_transfer`` or
``compute_loss``, which see the finished ``image`` / ``valid``; a ``sample_transform`` keeps the
resize in the workers.

Helpers of the base class:

- ``build_encoder(**vit_kwargs)``: the timm encoder from ``model.*`` (one input channel,
  ``model.pretrained``; a ViT at ``data.image_size`` with ``model.patch_size``), with ``arch`` and
  ``model_kwargs`` recorded for ``encoder.json``.
- ``compute_loss(batch, batch_idx)``: return the loss (a tensor, or a dict with
  ``"loss"`` and other scalars to log).  When a method defines it, the base class
  provides ``training_step`` (logs ``train/loss``) and ``validation_step``
  (logs ``val/loss``, used by early stopping).  Methods may still write their own
  ``training_step``/``validation_step`` instead.
- ``step_generator(batch_idx)``: a ``torch.Generator`` seeded by
  ``(seed, epoch, batch_idx, rank)``; randomness drawn from it (MAE masks,
  augmentations) is the same in a resumed run and in an uninterrupted one.
"""

from __future__ import annotations

import enum
import math
import re
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import numpy as np
import torch
from PIL import Image
from torch import nn

from radpretrain.config import get, is_preset
from radpretrain.errors import UserError
from radpretrain.models.backbones import create_backbone, is_vit, resolve_arch
from radpretrain.settings import ModelSection

METHODS: dict[str, type["PretrainMethod"]] = {}


@dataclass(frozen=True)
class Paper:
    """The publication (or public source) a method follows, as model cards and docs cite it."""

    title: str
    authors: tuple[str, ...]  # surnames, in the paper's order; empty for an anonymous source
    year: int | None
    venue: str  # "CVPR", "ICML", "MICCAI", "fast.ai forums", ...
    link: str  # arXiv abstract, DOI or URL

    def reference(self) -> str:
        """``He et al., Masked Autoencoders Are Scalable Vision Learners, CVPR 2022 (arXiv:2111.06377)``."""
        a = self.authors
        who = (f"{a[0]} et al." if len(a) > 2 else " and ".join(a)) if a else ""
        where = " ".join(str(x) for x in (self.venue, self.year) if x)
        m = re.match(r"https?://arxiv\.org/abs/(.+)$", self.link)
        link = f"arXiv:{m.group(1)}" if m else self.link
        return ", ".join(x for x in (who, self.title, where) if x) + (f" ({link})" if link else "")


class Supervision(enum.Enum):
    """The kind of signal a method learns from (model cards, the docs' method table)."""

    CONTRASTIVE = "self-supervised, contrastive"
    SELF_DISTILLATION = "self-supervised, self-distillation"
    MASKED_IMAGE_MODELLING = "self-supervised, masked image modelling"
    CLUSTERING = "self-supervised, clustering"
    RESTORATION = "self-supervised, restoration"
    METADATA = "supervised by the archive's metadata (weak labels)"

    @property
    def hub_tag(self) -> str:
        """The Hugging Face Hub tag of a model card."""
        return "weakly-supervised-learning" if self is Supervision.METADATA else "self-supervised-learning"


def register(name: str):
    """Class decorator: make a method available to ``radpretrain pretrain --method NAME``.

    Refuses a class that does not say what it is (``display_name``, ``paper``, ``supervision``)
    and a method without its packaged preset ``configs/NAME_cpu.yaml``.
    """

    def deco(cls):
        where = f"{cls.__module__}.{cls.__qualname__}"
        if not (isinstance(cls, type) and issubclass(cls, PretrainMethod)):
            raise TypeError(f"{where}: @register({name!r}) needs a PretrainMethod subclass")
        if not isinstance(cls.__dict__.get("display_name"), str) or not cls.display_name:
            raise TypeError(f"{where}: a method declares its display_name")
        if not isinstance(cls.paper, Paper):
            raise TypeError(f"{where}: a method declares its paper (a methods.base.Paper)")
        if not isinstance(cls.supervision, Supervision):
            raise TypeError(f"{where}: a method declares its supervision (a methods.base.Supervision)")
        old = METHODS.get(name)
        if old is not None and (old.__module__, old.__qualname__) != (cls.__module__, cls.__qualname__):
            raise TypeError(f"{where}: method {name!r} is already registered by {METHODS[name].__module__}")
        if not is_preset(f"{name}_cpu"):
            raise UserError(f"method {name!r} ({cls.__module__}) has no packaged preset configs/{name}_cpu.yaml: "
                            "a method is its module plus that preset")
        cls.method_name = name
        METHODS[name] = cls
        return cls

    return deco


class PretrainMethod(L.LightningModule):
    method_name: str = ""  # set by @register
    # What the method is (checked by @register): model cards and the docs read these.
    display_name: str = ""
    paper: Paper | None = None
    supervision: Supervision | None = None
    # Config sections of the method's own (``{"mae": MAESection}``): dataclasses the YAML and the
    # overrides are checked against (radpretrain.pretrain.config); may extend ``model``.
    config_sections: dict[str, type] = {}
    fields: tuple[str, ...] = ()
    reload_dataloaders_every_epoch: bool = False
    preview_name: str = ""  # previews/<preview_name>_stepNNNNNNN.png; default <method>_inputs

    def __init__(self, cfg: dict, store=None):
        super().__init__()
        self.cfg = cfg
        self.store = store
        # Subclasses set self.encoder (the timm model that is kept), normally with build_encoder().
        self.encoder: nn.Module | None = None
        self.arch: str = ""
        self.model_kwargs: dict = {}
        data = cfg.get("data", {}) if isinstance(cfg, dict) else {}
        self.register_buffer("norm_mean", torch.tensor(float(data.get("mean", 0.5))), persistent=True)
        self.register_buffer("norm_std", torch.tensor(float(data.get("std", 0.25))), persistent=True)
        model = cfg.get("model", {}) if isinstance(cfg, dict) else {}
        self.freeze_bn_stats = bool(model.get("freeze_bn_stats", False))

    # -- the encoder -----------------------------------------------------------
    @property
    def backbone(self) -> str:
        """``model.backbone`` as given (a short name such as ``vit_tiny``, or a timm name)."""
        return str(get(self.cfg, "model.backbone", ModelSection.backbone))

    def backbone_is_vit(self) -> bool:
        return is_vit(resolve_arch(self.backbone))

    def build_encoder(self, **vit_kwargs) -> nn.Module:
        """``self.encoder`` from the ``model:`` section: a timm backbone with one input channel and
        ``num_classes=0`` (pooled features), ``model.pretrained`` weights; a ViT gets
        ``img_size=data.image_size``, ``patch_size=model.patch_size`` and ``vit_kwargs`` (e.g.
        ``dynamic_img_size=True``); ``model.kwargs`` come last and win.  Records ``self.arch`` and
        ``self.model_kwargs``, which ``encoder.json`` keeps to rebuild it."""
        kw = {}
        if self.backbone_is_vit():
            kw = {"img_size": int(get(self.cfg, "data.image_size", 224)),
                  "patch_size": int(get(self.cfg, "model.patch_size", 16) or 16), **vit_kwargs}
        kw.update(get(self.cfg, "model.kwargs", {}) or {})
        self.encoder = create_backbone(self.backbone, in_chans=1, pretrained=get(self.cfg, "model.pretrained", None),
                                       **kw)
        self.arch, self.model_kwargs = self.encoder.radpretrain_arch, dict(self.encoder.radpretrain_kwargs)
        return self.encoder

    def train(self, mode: bool = True):
        """The train/eval switch; with ``model.freeze_bn_stats`` the encoder's BatchNorm layers stay
        in eval mode: they normalise with, and keep, their start statistics while their scale and
        shift still learn."""
        super().train(mode)
        if mode:
            self._freeze_bn()
        return self

    def _freeze_bn(self) -> None:
        if self.freeze_bn_stats and self.encoder is not None:
            for m in self.encoder.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.eval()

    def on_train_batch_start(self, batch, batch_idx):
        # Lightning does not always call train(): a new module starts in train mode, and the
        # validation loop restores each submodule's mode itself; check before every step (cheap).
        self._freeze_bn()

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """Map [0, 1] store images to encoder input: ``(x - mean) / std`` (see docs/architecture.md)."""
        return (x - self.norm_mean) / self.norm_std

    # -- hooks -------------------------------------------------------------
    compute_loss = None  # optional: (batch, batch_idx) -> Tensor | dict with "loss"

    @property
    def has_val_loss(self) -> bool:
        """Whether validation batches give a ``val/loss`` (the engine enables early stopping then)."""
        return self.compute_loss is not None or type(self).validation_step is not PretrainMethod.validation_step

    def training_step(self, batch, batch_idx):
        if self.compute_loss is None:
            raise NotImplementedError(f"{type(self).__name__} must define training_step or compute_loss")
        return self._log_loss(self.compute_loss(batch, batch_idx), "train", batch)

    def validation_step(self, batch, batch_idx):
        if self.compute_loss is None:
            return None
        return self._log_loss(self.compute_loss(batch, batch_idx), "val", batch)

    def _log_loss(self, out, stage: str, batch) -> torch.Tensor:
        if not isinstance(out, dict):
            out = {"loss": out}
        bs = int(batch["image"].shape[0]) if isinstance(batch, dict) and "image" in batch else None
        train = stage == "train"
        for k, v in out.items():
            if v is None:
                continue
            v = v.detach() if isinstance(v, torch.Tensor) and k != "loss" else v
            self.log(f"{stage}/{k}", v, prog_bar=(k == "loss"), on_step=train, on_epoch=not train,
                     sync_dist=True, batch_size=bs)  # logged losses are global means under DDP
        return out["loss"]

    def step_generator(self, batch_idx: int, device=None) -> torch.Generator:
        """A generator seeded by (seed, epoch, batch_idx, rank, train/val): reproducible across resumes."""
        seed = int(self.cfg.get("seed", 0) or 0) if isinstance(self.cfg, dict) else 0
        epoch = self.current_epoch if self._trainer is not None else 0
        rank = self.global_rank if self._trainer is not None else 0
        val = 1 if (self._trainer is not None and not self.trainer.training) else 0
        key = (((seed * 1_000_003 + epoch) * 1_000_033 + int(batch_idx)) * 1_009 + rank) * 2 + val
        g = torch.Generator(device=device if device is not None else self.device)
        g.manual_seed(key % (2**63 - 1))
        return g

    def compile_modules(self) -> list[nn.Module]:
        """Modules whose ``forward`` ``trainer.compile`` compiles with ``torch.compile`` (weights and
        state-dict keys unchanged): the encoder by default; a method whose step does not call the
        encoder's ``forward`` (MAE) or that has more compute (a decoder, a teacher) names its own."""
        return [self.encoder] if self.encoder is not None else []

    def sample_transform(self):
        return None

    def train_sampler(self, dataset):
        return None

    # -- previews ----------------------------------------------------------------
    def preview_rows(self, batch: dict, generator: torch.Generator) -> list[torch.Tensor]:
        """The rows of the preview grid, each [n, 1, H, W] in [0, 1] (rows may differ in width; none:
        no preview).  ``batch`` holds the first ``previews.n`` images, on the method's device; the
        model is in eval mode and gradients are off; ``generator`` is seeded the same every time, so
        previews of successive epochs show the same views.  Default: the input images."""
        return [batch["image"]] if "image" in batch else []

    def preview_count(self) -> int:
        """``previews.n``: images per preview."""
        return int(get(self.cfg, "previews.n", 8) or 0)

    @torch.no_grad()
    def save_previews(self, batch: dict, out_dir: Path) -> list[Path]:
        """Write ``OUT_DIR/<preview_name>_stepNNNNNNN.png`` from :meth:`preview_rows`; returns the paths."""
        n = self.preview_count()
        if n <= 0:
            return []
        batch = {k: (v.detach()[:n].to(self.device) if isinstance(v, torch.Tensor)
                     else v[:n] if isinstance(v, (list, tuple)) else v) for k, v in batch.items()}
        g = torch.Generator(device=self.device)
        g.manual_seed(0)
        was_training = self.training
        self.eval()
        try:
            rows = self.preview_rows(batch, g)
        finally:
            self.train(was_training)
        if not rows:
            return []
        step = self.global_step if self._trainer is not None else 0
        name = self.preview_name or f"{self.method_name}_inputs"
        return [save_image_grid(rows, Path(out_dir) / f"{name}_step{step:07d}.png")]

    def export_encoder_module(self) -> nn.Module:
        """The module whose weights the engine exports: ``self.encoder`` unless a method keeps another."""
        return self.encoder

    def encoder_meta(self) -> dict:
        return {
            "arch": self.arch,
            "model_kwargs": dict(self.model_kwargs),
            "method": self.method_name,
            "preprocessing": {"mean": float(self.norm_mean), "std": float(self.norm_std)},
        }

    # -- optimisation: AdamW/SGD + linear warm-up then cosine, per step -----
    def total_steps(self) -> int:
        """Optimiser steps of the whole run (schedules: learning rate, DINO's teacher momentum).

        The engine sets ``total_steps_hint`` (no early data loading, which would break exact
        mid-epoch resume); otherwise Lightning's estimate, or 1 outside a trainer.
        """
        hint = getattr(self, "total_steps_hint", None)
        if hint:
            return max(1, int(hint))
        return max(1, int(self.trainer.estimated_stepping_batches)) if self._trainer is not None else 1

    def configure_optimizers(self):
        opt_cfg = self.cfg.get("optim", {})
        opt = make_optimizer([p for p in self.parameters() if p.requires_grad], opt_cfg)
        total = self.total_steps()
        warm = int(opt_cfg.get("warmup_steps", 0)) or int(float(opt_cfg.get("warmup_fraction", 0.05)) * total)
        min_ratio = float(get(self.cfg, "optim.min_lr_ratio", 0.01))
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: warmup_cosine(s, warm, total, min_ratio))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def make_optimizer(params: list, opt_cfg: dict) -> torch.optim.Optimizer:
    """AdamW (default) or SGD from the ``optim`` config section.

    AdamW uses PyTorch's fused kernel when every parameter is a floating-point CPU or CUDA
    tensor: one kernel for all parameters instead of a dozen small operations per tensor,
    which on a CPU is a tenth of a small model's step.
    """
    name = str(opt_cfg.get("name", "adamw")).lower()
    lr = float(opt_cfg.get("lr", 1e-3))
    wd = float(opt_cfg.get("weight_decay", 0.05))
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=float(opt_cfg.get("momentum", 0.9)), weight_decay=wd)
    if name != "adamw":
        raise UserError(f"optim.name={name!r}: use adamw or sgd")
    fused = bool(params) and all(p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in params)
    return torch.optim.AdamW(params, lr=lr, weight_decay=wd, betas=tuple(opt_cfg.get("betas", (0.9, 0.95))),
                             fused=fused or None)


def warmup_cosine(step: int, warmup: int, total: int, min_ratio: float = 0.01) -> float:
    """Learning-rate multiplier: linear warm-up to 1, then cosine down to ``min_ratio``."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def save_image_grid(rows, path) -> Path:
    """Save a PNG grid: ``rows`` is a list of [B, 1, H, W] tensors in [0, 1] (one grid row each).

    Used by :meth:`PretrainMethod.save_previews`; rows may have different widths (padded with black).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    strips = []
    for r in rows:
        a = r.detach().float().cpu().clamp(0, 1).numpy()[:, 0]  # [B, H, W]
        gap = np.zeros((a.shape[1], 2), dtype=np.float32)
        parts = []
        for i in range(a.shape[0]):
            parts += [a[i], gap]
        strips.append(np.concatenate(parts, axis=1))
    width = max(s.shape[1] for s in strips)
    strips = [np.pad(s, ((0, 2), (0, width - s.shape[1]))) for s in strips]
    grid = (np.concatenate(strips, axis=0) * 255).round().astype(np.uint8)
    Image.fromarray(grid, mode="L").save(path)
    return path
