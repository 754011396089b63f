"""``radpretrain evaluate`` options (``key=value`` after the flags), checked against a schema.

Each section is a dataclass (see :mod:`radpretrain.config`): a misspelt key, a value of the
wrong type (``n_boot=abc``) or out of range is a one-line error before anything runs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from radpretrain.config import apply_overrides, schema_defaults

_POSITIVE = {"gt": 0.0}


@dataclass
class LinearOptions:
    C: float | list[float] = field(default_factory=lambda: [1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0], metadata=_POSITIVE)
    alpha: float | list[float] = field(default_factory=lambda: [0.01, 0.1, 1.0, 10.0, 100.0, 1000.0], metadata=_POSITIVE)
    max_iter: int = field(default=3000, metadata={"ge": 1})
    pool: str | list[str] = "default"


@dataclass
class KnnOptions:
    k: int | list[int] = field(default_factory=lambda: [1, 3, 5, 10, 20, 50], metadata={"ge": 1})
    pool: str | list[str] = "default"


@dataclass
class FinetuneOptions:
    epochs: int = field(default=10, metadata={"ge": 1})
    lr: float = field(default=1e-3, metadata=_POSITIVE)
    lr_sweep: float | list[float] | None = field(default=None, metadata=_POSITIVE)
    weight_decay: float = field(default=1e-4, metadata={"ge": 0.0})
    batch_size: int = field(default=32, metadata={"ge": 1})
    warmup_epochs: int = field(default=0, metadata={"ge": 0})
    patience: int | None = field(default=3, metadata={"ge": 0})
    augment: bool = True
    flip: bool = True
    rotate: float = field(default=10.0, metadata={"ge": 0.0, "le": 180.0})
    crop: float = field(default=0.1, metadata={"ge": 0.0, "lt": 1.0})
    brightness: float = field(default=0.1, metadata={"ge": 0.0})
    contrast: float = field(default=0.1, metadata={"ge": 0.0, "le": 1.0})


@dataclass
class StateDictOptions:
    strip_prefix: str | None = None
    rename: str | list[str] | None = None
    strict: bool = True
    mean: float | None = None
    std: float | None = field(default=None, metadata=_POSITIVE)


OPTION_SCHEMA: dict[str, object] = {
    "linear": LinearOptions,
    "knn": KnnOptions,
    "finetune": FinetuneOptions,
    "state_dict": StateDictOptions,
    "grey": Literal["timm", "replicate"],
    "val_fraction": Literal["same", "full"],
    "n_boot": (int, {"ge": 1}),
    "batch_size": (int, {"ge": 1}),
}


def option_defaults() -> dict:
    out = schema_defaults(OPTION_SCHEMA)
    out.update({"grey": "timm", "val_fraction": "same", "n_boot": 1000, "batch_size": 64})
    return out


def parse_options(overrides: list[str]) -> dict:
    """The defaults with ``key=value`` overrides applied, every key and value checked."""
    return apply_overrides(option_defaults(), overrides, schema=OPTION_SCHEMA)
