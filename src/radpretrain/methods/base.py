"""The small interface every pretraining method implements.

A method is a :class:`lightning.LightningModule` built from the resolved config
(``cfg``, a nested dict) and the store it trains on.  The engine
(:mod:`radpretrain.pretrain`) owns data loading, the Trainer, checkpoints,
logging and the final ``encoder.safetensors``; a method owns its model, its loss
and whatever it needs between epochs.

Batches are collated dicts from :class:`radpretrain.data.dataset.StoreDataset`:
``image`` [B, 1, S, S] float in [0, 1], ``valid`` [B, 1, S, S] bool (False on
letterbox padding), ``index`` [B] (row in ``Store.images``) and the manifest
fields listed in :attr:`PretrainMethod.fields`.

Hooks a method may override (all optional except ``training_step``):

- ``fields``: manifest columns the batches must carry (e.g. ``body_part``).
- ``sample_transform()``: per-sample callable run in data-loader workers.
- ``train_sampler(dataset)``: a custom sampler (DeepCluster: uniform over clusters);
  set ``reload_dataloaders_every_epoch = True`` when it changes between epochs.
- ``on_train_epoch_start()``: e.g. DeepCluster's feature extraction + k-means.
- ``save_previews(batch, out_dir)``: a few PNGs a person would look at.
- ``encoder_meta()``: what ``encoder.json`` records besides the engine's fields.
"""

from __future__ import annotations

from pathlib import Path

import lightning as L
import torch
from torch import nn

METHODS: dict[str, type["PretrainMethod"]] = {}


def register(name: str):
    """Class decorator: make a method available to ``radpretrain pretrain --method NAME``."""

    def deco(cls):
        cls.method_name = name
        METHODS[name] = cls
        return cls

    return deco


class PretrainMethod(L.LightningModule):
    method_name: str = ""
    fields: tuple[str, ...] = ()
    reload_dataloaders_every_epoch: bool = False

    def __init__(self, cfg: dict, store=None):
        super().__init__()
        self.cfg = cfg
        self.store = store
        # Subclasses set self.encoder (the timm model that is kept) and self.arch.
        self.encoder: nn.Module | None = None
        self.arch: str = ""
        self.model_kwargs: dict = {}
        data = cfg.get("data", {}) if isinstance(cfg, dict) else {}
        self.register_buffer("norm_mean", torch.tensor(float(data.get("mean", 0.5))), persistent=True)
        self.register_buffer("norm_std", torch.tensor(float(data.get("std", 0.25))), persistent=True)

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """Map [0, 1] store images to encoder input: ``(x - mean) / std`` (see docs/architecture.md)."""
        return (x - self.norm_mean) / self.norm_std

    # -- hooks -------------------------------------------------------------
    def sample_transform(self):
        return None

    def train_sampler(self, dataset):
        return None

    def save_previews(self, batch: dict, out_dir: Path) -> list[Path]:
        return []

    def encoder_meta(self) -> dict:
        return {
            "arch": self.arch,
            "model_kwargs": dict(self.model_kwargs),
            "method": self.method_name,
            "preprocessing": {"mean": float(self.norm_mean), "std": float(self.norm_std)},
        }

    # -- optimisation: AdamW/SGD + linear warm-up then cosine, per step -----
    def configure_optimizers(self):
        from radpretrain.config import get

        opt_cfg = self.cfg.get("optim", {})
        name = str(opt_cfg.get("name", "adamw")).lower()
        lr = float(opt_cfg.get("lr", 1e-3))
        wd = float(opt_cfg.get("weight_decay", 0.05))
        params = [p for p in self.parameters() if p.requires_grad]
        if name == "sgd":
            opt = torch.optim.SGD(params, lr=lr, momentum=float(opt_cfg.get("momentum", 0.9)), weight_decay=wd)
        else:
            opt = torch.optim.AdamW(params, lr=lr, weight_decay=wd, betas=tuple(opt_cfg.get("betas", (0.9, 0.95))))
        total = max(1, int(self.trainer.estimated_stepping_batches)) if self._trainer is not None else 1
        warm = int(opt_cfg.get("warmup_steps", 0)) or int(float(opt_cfg.get("warmup_fraction", 0.05)) * total)
        min_ratio = float(get(self.cfg, "optim.min_lr_ratio", 0.01))
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: warmup_cosine(s, warm, total, min_ratio))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def warmup_cosine(step: int, warmup: int, total: int, min_ratio: float = 0.01) -> float:
    """Learning-rate multiplier: linear warm-up to 1, then cosine down to ``min_ratio``."""
    import math

    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
