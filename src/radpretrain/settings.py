"""The pretraining engine's config sections, one dataclass each (see :mod:`radpretrain.config`).

A field is a key, its annotation the type a YAML value must have, its ``metadata`` the range
(``ge``/``gt``/``le``/``lt``), a ``check`` for other rules and a ``help`` text for errors.
Methods add sections of their own (``PretrainMethod.config_sections``) and may extend
:class:`ModelSection` with keys of their own.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Literal

from radpretrain.config import schema_defaults


def _minus_one_or_positive(v) -> str | None:
    return None if v is None or v == -1 or v >= 1 else "not a step or epoch count"


@dataclass
class DataSection:
    root: str | None = None  # set from --data
    image_size: int = field(default=64, metadata={"ge": 8})
    batch_size: int = field(default=32, metadata={"ge": 1, "help": "a positive integer, per process (global batch = batch_size x devices x nodes)"})
    num_workers: int = field(default=0, metadata={"ge": 0})
    resize: Literal["letterbox", "bucket"] = "letterbox"
    # where images are resized to data.image_size: auto = on the GPU when training on one (loader workers
    # send the stored uint8 pixels), in the loader workers otherwise (the CPU path)
    resize_on: Literal["auto", "loader", "device"] = "auto"
    balance: Literal["none", "modality", "body_part", "modality_body_part"] = "none"
    max_per_patient: int | None = field(default=None, metadata={"ge": 1})
    respect_keep: bool = True  # drop images with keep == False in splits.parquet (per-patient caps)
    exclude_split: str | list[str] | None = None  # e.g. test: never pretrain on the held-out split
    val_fraction: float = field(default=0.1, metadata={"ge": 0.0, "lt": 1.0})
    mean: float | None = None  # null: chosen by data.stats
    std: float | None = field(default=None, metadata={"gt": 0.0})
    stats: Literal["auto", "dataset", "weights"] = "auto"
    stats_sample: int = field(default=256, metadata={"ge": 1})
    shuffle: bool = True
    stats_source: str | None = None  # recorded by the engine: where mean/std came from


@dataclass
class ModelSection:
    backbone: str = "resnet18"
    pretrained: str | None = field(default="none", metadata={"help": "none, imagenet or a weights file"})
    patch_size: int = field(default=16, metadata={"ge": 1})
    freeze_bn_stats: bool = False  # true: the encoder's BatchNorm keeps its start statistics
    kwargs: dict = field(default_factory=dict)  # extra timm.create_model kwargs, recorded in encoder.json


@dataclass
class OptimSection:
    name: Literal["adamw", "sgd"] = "adamw"
    lr: float = field(default=1.0e-3, metadata={"gt": 0.0})
    weight_decay: float = field(default=0.05, metadata={"ge": 0.0})
    warmup_fraction: float = field(default=0.05, metadata={"ge": 0.0, "le": 1.0})
    warmup_steps: int = field(default=0, metadata={"ge": 0, "help": "0: use warmup_fraction"})
    min_lr_ratio: float = field(default=0.01, metadata={"ge": 0.0, "le": 1.0})
    betas: tuple[float, float] = field(default=(0.9, 0.95), metadata={"ge": 0.0, "lt": 1.0})
    momentum: float = field(default=0.9, metadata={"ge": 0.0, "lt": 1.0})  # SGD


@dataclass
class TrainerSection:
    max_epochs: int | None = field(default=10, metadata={"check": _minus_one_or_positive, "help": "-1 (no limit) or a positive integer"})
    max_steps: int | None = field(default=-1, metadata={"check": _minus_one_or_positive, "help": "-1 (no limit) or a positive integer"})
    accelerator: str = "auto"
    devices: int | str | list[int] = "auto"
    num_nodes: int | str = "auto"
    strategy: str = "auto"
    precision: str | int = field(default="auto", metadata={"help": "auto (bf16-mixed on GPUs that support it), 32-true, bf16-mixed, 16-mixed"})
    accumulate_grad_batches: int = field(default=1, metadata={"ge": 1})
    gradient_clip_val: float | None = field(default=None, metadata={"ge": 0.0})
    val_check_interval: int | float | None = field(default=None, metadata={"gt": 0})
    check_val_every_n_epoch: int | None = field(default=1, metadata={"ge": 1})
    limit_val_batches: int | float = field(default=1.0, metadata={"ge": 0})
    checkpoint_every_n_steps: int | None = field(default=100, metadata={"ge": 0})
    keep_checkpoints: int = field(default=3, metadata={"ge": -1, "help": "newest periodic step*.ckpt kept besides last.ckpt and best.ckpt; -1 keeps all"})
    log_every_n_steps: int = field(default=10, metadata={"ge": 1})
    enable_progress_bar: bool = True
    sync_batchnorm: bool = False
    channels_last: bool | Literal["auto"] = "auto"  # NHWC: auto = depthwise CNNs on CPU, CNNs on GPUs
    deterministic: bool | Literal["warn"] = False
    # torch.compile of the method's compute modules (PretrainMethod.compile_modules; the encoder by default):
    # off (YAML false), default (YAML true), max-autotune; falls back to eager with a one-line warning
    compile: bool | Literal["off", "default", "max-autotune"] = field(
        default="off", metadata={"help": "off, default or max-autotune (torch.compile of the encoder)"})
    cpu_threads: int | Literal["auto"] | None = field(
        default=None, metadata={"ge": 1, "help": "a positive integer, auto (one per idle core) or null (torch's default)"})


@dataclass
class EarlyStoppingSection:
    patience: int | None = field(default=None, metadata={"ge": 1})
    min_delta: float = field(default=0.0, metadata={"ge": 0.0})


@dataclass
class PreviewsSection:
    every_n_epochs: int = field(default=1, metadata={"ge": 0, "help": "epochs between previews; 0: none"})
    n: int = field(default=8, metadata={"ge": 0})


@dataclass
class ExportSection:
    weights: Literal["best", "last"] = "best"  # best: lowest val/loss, when there is a validation set


ENGINE_SCHEMA: dict[str, object] = {
    "method": str,
    "seed": (int, {"ge": 0}),
    "data": DataSection,
    "model": ModelSection,
    "optim": OptimSection,
    "trainer": TrainerSection,
    "early_stopping": EarlyStoppingSection,
    "previews": PreviewsSection,
    "export": ExportSection,
}

DEFAULTS: dict = {"seed": 0, **schema_defaults(ENGINE_SCHEMA)}
DEFAULTS["optim"]["betas"] = list(DEFAULTS["optim"]["betas"])
ENGINE_SECTIONS = tuple(k for k in ENGINE_SCHEMA if dataclasses.is_dataclass(ENGINE_SCHEMA[k]))


def probability(**kw) -> dict:
    """Field metadata for a probability in [0, 1] (``kw`` adds help and other keys)."""
    return {"ge": 0.0, "le": 1.0, **kw}
