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
        raise UserError(f"metadata: none of the heads {list(heads)} has at least two known values in the store")
    return vocab, np.stack(cols, axis=1)


@dataclass
class MetadataSection:
    heads: list[str] = field(default_factory=lambda: ["body_part", "age", "sex", "view"])
    age_bins: list[float] | None = field(default=None, metadata={"help": "ascending bin edges in years, or null"})
    drop_values: list = field(default_factory=list)
    dropout: float = field(default=0.0, metadata={"ge": 0.0, "lt": 1.0})
    head_weights: dict = field(default_factory=dict)


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
        if store is None:
            root = get(cfg, "data.root")
            if not root:
                raise UserError("metadata method needs the dataset store (data.root)")
            store = Store(root)
            self.store = store
        heads = list(get(cfg, "metadata.heads", ["body_part", "age", "sex", "view"]))
        vocab, labels = build_vocabularies(store.images, heads, get(cfg, "metadata.age_bins"),
                                           get(cfg, "metadata.drop_values", []) or [])
        self.vocab = vocab
        self.head_names = list(vocab)
        # a plain CPU tensor, not a buffer: DDP would broadcast a buffer (N x heads) at every step
        self.labels = torch.from_numpy(labels)
        self.build_encoder()
        dim = self.encoder.num_features
        self.dropout = nn.Dropout(float(get(cfg, "metadata.dropout", 0.0)))
        self.heads = nn.ModuleDict({h: nn.Linear(dim, len(v)) for h, v in vocab.items()})
        weights = get(cfg, "metadata.head_weights", {}) or {}
        self.head_weights = {h: float(weights.get(h, 1.0)) for h in vocab}
        aug = get(cfg, "augment", {}) or {}
        self.augment = GreyAugment.from_config(aug) if aug.get("enabled", True) and aug else None

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        f = self.dropout(self.encoder(self.normalize(x)))
        return {h: head(f) for h, head in self.heads.items()}

    def batch_labels(self, batch) -> torch.Tensor:
        idx = batch["index"]
        idx = idx if isinstance(idx, torch.Tensor) else torch.as_tensor(idx)
        return self.labels[idx.cpu().long()].to(self.device)

    def compute_loss(self, batch, batch_idx):
        img = batch["image"]
        if self.training and self.augment is not None:
            img = self.augment(img, self.step_generator(batch_idx))
        logits = self(img)
        y = self.batch_labels(batch)
        out = {}
        total = img.new_zeros(())
        for j, h in enumerate(self.head_names):
            yh = y[:, j]
            known = yh >= 0
            if known.any():
                lh = F.cross_entropy(logits[h].float(), yh.clamp_min(0), reduction="none")
                lh = (lh * known).sum() / known.sum()
                acc = ((logits[h].argmax(1) == yh) & known).sum().float() / known.sum()
            else:  # keep the graph connected (DDP) with a zero loss
                lh = logits[h].sum() * 0.0
                acc = None
            total = total + self.head_weights[h] * lh
            out[f"loss_{h}"] = lh.detach()
            if acc is not None:
                out[f"acc_{h}"] = acc
        out["loss"] = total
        return out

    def preview_rows(self, batch: dict, generator: torch.Generator) -> list[torch.Tensor]:
        """Rows: input and, with augmentation on, its augmented view."""
        img = batch["image"]
        return [img] if self.augment is None else [img, self.augment(img, generator)]

    def encoder_meta(self) -> dict:
        meta = super().encoder_meta()
        meta["metadata"] = {"heads": {h: list(v) for h, v in self.vocab.items()},
                            "age_bins": list(get(self.cfg, "metadata.age_bins", DEFAULT_AGE_BINS) or DEFAULT_AGE_BINS)}
        return meta
