"""Metadata-supervised pretraining: predict cheap labels the archive already has.

From the thread "Transfer Learning for Medical Radiography" on the fast.ai forums
(https://forums.fast.ai/t/transfer-learning-for-medical-radiography/4931; "a network
needs to learn anatomy before pathology"): a radiology archive knows each image's body part and the patient's
age for free; training a CNN to predict such labels gives filters learned on
radiographs instead of photographs.  This is plain multi-task supervised
learning (one linear head per field over the encoder's pooled features, summed
cross-entropies) on the store's manifest fields:

- ``body_part``, ``view``, ``sex``, ``modality``: one class per value seen in the store;
- ``age``: ``age_years`` cut into bins (``metadata.age_bins``).

Missing values ('unknown', '', 'other' optionally, NaN) are masked out of the loss
(label -1), so an image with no known field still trains nothing but costs nothing.
Label vocabularies are built from the store (fields with fewer than two known
values are dropped, with a log message) and recorded in ``encoder.json``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from radpretrain.config import get
from radpretrain.data.store import Store
from radpretrain.errors import UserError
from radpretrain.methods.base import Paper, PretrainMethod, Supervision, register
from radpretrain.transforms import GreyAugment, MetadataAugmentSection
from radpretrain.utils import get_logger

log = get_logger("methods.metadata")
UNKNOWN = {"", "unknown", "nan", "none", "na", "n/a"}
DEFAULT_AGE_BINS = [0, 2, 12, 18, 40, 65, 200]


class NoMetadataError(UserError):
    """No requested manifest field has two known values in the store."""


def build_vocabularies(images, heads, age_bins=None, drop_values=()) -> tuple[dict, np.ndarray]:
    """Vocabularies ``{head: [class names]}`` and labels ``int64 [N, H]`` (-1 = unknown) for ``images``."""
    age_bins = list(age_bins or DEFAULT_AGE_BINS)
    drop = UNKNOWN | {str(v).lower() for v in drop_values}
    vocab, cols = {}, []
    for head in heads:
        if head == "age":
            if "age_years" not in images.columns:
                raise UserError("metadata head 'age' needs the manifest column age_years")
            age = images["age_years"].astype("float64").to_numpy()
            lab = np.full(len(age), -1, dtype=np.int64)
            ok = np.isfinite(age)
            lab[ok] = np.clip(np.digitize(age[ok], age_bins[1:-1]), 0, len(age_bins) - 2)
            names = [f"{age_bins[i]}-{age_bins[i + 1]}" for i in range(len(age_bins) - 1)]
        else:
            if head not in images.columns:
                raise UserError(f"metadata head {head!r}: the manifest has no such column "
                                f"(columns: {', '.join(images.columns)})")
            vals = images[head].astype("string").fillna("").to_numpy(dtype=object)
            known = np.array([str(v).strip().lower() not in drop for v in vals])
            names = sorted({str(v) for v, k in zip(vals, known) if k})
            index = {n: i for i, n in enumerate(names)}
            lab = np.array([index[str(v)] if k else -1 for v, k in zip(vals, known)], dtype=np.int64)
        present = np.unique(lab[lab >= 0])
        if len(present) < 2:
            log.warning("metadata head %r dropped: fewer than two known values in the store", head)
            continue
        vocab[head] = names
        cols.append(lab)
    if not vocab:
        raise NoMetadataError(f"metadata: none of the heads {list(heads)} has at least two known values in the store")
    return vocab, np.stack(cols, axis=1)


@dataclass
class HeadsFields:
    """The keys that choose and weigh the heads, shared by ``metadata:`` and ``metadata_heads:``."""

    heads: list[str] = field(default_factory=lambda: ["body_part", "age", "sex", "view"])
    age_bins: list[float] | None = field(default=None, metadata={"help": "ascending bin edges in years, or null"})
    drop_values: list = field(default_factory=list)
    head_weights: dict = field(default_factory=dict)


@dataclass
class MetadataSection(HeadsFields):
    dropout: float = field(default=0.0, metadata={"ge": 0.0, "lt": 1.0})


@dataclass
class MetadataHeadsSection(HeadsFields):
    """``metadata_heads:`` of a method that adds this objective to its own (SimCLR, DINO):
    ``weight`` times the heads' summed cross-entropies joins the method's loss; 0 turns it off."""

    weight: float = field(default=0.0, metadata={"ge": 0.0, "help": "a weight >= 0 (0: no metadata heads)"})


def store_of(cfg: dict, store, who: str) -> Store:
    """``store``, or the store at ``data.root`` (a method built outside the engine)."""
    if store is not None:
        return store
    root = get(cfg, "data.root")
    if not root:
        raise UserError(f"{who} needs the dataset store (data.root)")
    return Store(root)


class MetadataHeads(nn.ModuleDict):
    """One linear head per manifest field over pooled encoder features, and their masked loss.

    The labels of every store row are built once (:func:`build_vocabularies`); a batch's rows are
    looked up by its ``index``.  Used by :class:`MetadataSupervised` as its whole objective and by
    other methods (``metadata_heads.weight > 0``) as an extra one on their own features.
    """

    def __init__(self, images, dim: int, heads, age_bins=None, drop_values=(), dropout: float = 0.0,
                 head_weights: dict | None = None, weight: float = 1.0):
        vocab, labels = build_vocabularies(images, list(heads), age_bins, drop_values or [])
        clash = [h for h in vocab if hasattr(MetadataHeads, h)]
        if clash:
            raise UserError(f"metadata head name(s) {clash} clash with the heads module's own attributes: rename "
                            "the manifest column")
        super().__init__({h: nn.Linear(dim, len(v)) for h, v in vocab.items()})
        self.vocab = vocab
        self.head_names = list(vocab)
        self.age_bins = list(age_bins or DEFAULT_AGE_BINS)
        # a plain CPU tensor, not a buffer: DDP would broadcast a buffer (N x heads) at every step
        self.labels = torch.from_numpy(labels)
        self.dropout = float(dropout)
        weights = head_weights or {}
        self.head_weights = {h: float(weights.get(h, 1.0)) for h in vocab}
        self.weight = float(weight)  # of the whole heads' loss beside another method's (join)

    @classmethod
    def from_section(cls, cfg: dict, store, dim: int, section: str = "metadata_heads") -> "MetadataHeads | None":
        """The heads of a method's ``metadata_heads:`` section, or None when its weight is 0 or when
        no head has two known values in this store (an archive of one body part, no ages: the
        method then trains on its own objective alone, and says so in the log)."""
        if float(get(cfg, f"{section}.weight", 0.0) or 0.0) <= 0:
            return None
        store = store_of(cfg, store, f"{section}.weight > 0")
        heads = list(get(cfg, f"{section}.heads", ["body_part", "age", "sex", "view"]))
        try:
            return cls(store.images, dim, heads, get(cfg, f"{section}.age_bins"),
                       get(cfg, f"{section}.drop_values", []) or [],
                       head_weights=get(cfg, f"{section}.head_weights", {}) or {},
                       weight=float(get(cfg, f"{section}.weight")))
        except NoMetadataError:
            log.warning("%s: none of the heads %s has two known values in this store; training without them",
                        section, heads)
            return None

    def batch_labels(self, index, device) -> torch.Tensor:
        """Labels ``[B, heads]`` (-1 = unknown) of the store rows ``index``."""
        idx = index if isinstance(index, torch.Tensor) else torch.as_tensor(index)
        return self.labels[idx.cpu().long()].to(device)

    def forward(self, features: torch.Tensor) -> dict[str, torch.Tensor]:
        f = F.dropout(features, self.dropout, self.training) if self.dropout else features
        return {h: self[h](f) for h in self.head_names}

    def loss(self, features: torch.Tensor, index) -> dict[str, torch.Tensor]:
        """``{"loss": weighted sum, "loss_<head>": ..., "acc_<head>": ...}`` over the known labels of
        the rows ``index`` (one per row of ``features``)."""
        logits = self(features)
        y = self.batch_labels(index, features.device)
        out = {}
        total = features.new_zeros((), dtype=torch.float32)
        for j, h in enumerate(self.head_names):
            yh = y[:, j]
            known = yh >= 0
            if known.any():
                lh = F.cross_entropy(logits[h].float(), yh.clamp_min(0), reduction="none")
                lh = (lh * known).sum() / known.sum()
                out[f"acc_{h}"] = ((logits[h].argmax(1) == yh) & known).sum().float() / known.sum()
            else:  # keep the graph connected (DDP) with a zero loss
                lh = logits[h].sum() * 0.0
            total = total + self.head_weights[h] * lh
            out[f"loss_{h}"] = lh.detach()
        out["loss"] = total
        return out

    def join(self, own_loss: torch.Tensor, features: torch.Tensor, index) -> dict[str, torch.Tensor]:
        """Another method's loss plus ``weight`` x these heads' loss on ``features`` (one row per entry
        of ``index``): ``{"loss", "own_loss", "metadata_loss", "metadata_loss_<head>", ...}`` to log."""
        meta = self.loss(features, index)
        out = {"loss": own_loss + self.weight * meta["loss"], "own_loss": own_loss.detach()}
        out.update({f"metadata_{k}": v.detach() for k, v in meta.items()})
        return out

    def describe(self) -> dict:
        """What ``encoder.json`` records: each head's classes, the age bins and the loss weight."""
        return {"heads": {h: list(v) for h, v in self.vocab.items()}, "age_bins": list(self.age_bins),
                "weight": self.weight}


@register("metadata")
class MetadataSupervised(PretrainMethod):
    """Multi-head classification of manifest fields; config keys under ``metadata.``."""

    display_name = "Supervised pretraining on routine metadata (body part, view, age)"
    paper = Paper("Transfer Learning for Medical Radiography", (), None, "fast.ai forums",
                  "https://forums.fast.ai/t/transfer-learning-for-medical-radiography/4931")
    supervision = Supervision.METADATA
    config_sections = {"metadata": MetadataSection, "augment": MetadataAugmentSection}

    def __init__(self, cfg: dict, store=None):
        super().__init__(cfg, store)
        self.store = store = store_of(cfg, store, "metadata method")
        self.build_encoder()
        self.heads = MetadataHeads(store.images, self.encoder.num_features,
                                   get(cfg, "metadata.heads", ["body_part", "age", "sex", "view"]),
                                   get(cfg, "metadata.age_bins"), get(cfg, "metadata.drop_values", []) or [],
                                   dropout=float(get(cfg, "metadata.dropout", 0.0)),
                                   head_weights=get(cfg, "metadata.head_weights", {}) or {})
        self.vocab, self.head_names = self.heads.vocab, self.heads.head_names
        aug = get(cfg, "augment", {}) or {}
        self.augment = GreyAugment.from_config(aug) if aug.get("enabled", True) and aug else None

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.heads(self.encoder(self.normalize(x)))

    def batch_labels(self, batch) -> torch.Tensor:
        return self.heads.batch_labels(batch["index"], self.device)

    def compute_loss(self, batch, batch_idx):
        img = batch["image"]
        if self.training and self.augment is not None:
            img = self.augment(img, self.step_generator(batch_idx))
        return self.heads.loss(self.encoder(self.normalize(img)), batch["index"])

    def preview_rows(self, batch: dict, generator: torch.Generator) -> list[torch.Tensor]:
        """Rows: input and, with augmentation on, its augmented view."""
        img = batch["image"]
        return [img] if self.augment is None else [img, self.augment(img, generator)]

    def encoder_meta(self) -> dict:
        meta = super().encoder_meta()
        meta["metadata"] = self.heads.describe()
        return meta
