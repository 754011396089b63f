"""Aspect-ratio buckets ("smart binning"): fewer padded pixels than a square letterbox.

A few fixed shapes are defined for a base size ``S`` (all sides multiples of
``multiple``, e.g. the ViT patch size)::

    S x S            square
    S x 3S/4         portrait  (h x w)      3S/4 x S   landscape
    S x S/2          tall                   S/2 x S    wide

Each image goes to the bucket whose aspect ratio (h / w) is nearest in log
scale.  :class:`BucketBatchSampler` draws every batch from a single bucket and
yields lists of ``(position, h, w)`` tuples; :class:`~radpretrain.data.dataset.StoreDataset`
with ``resize="bucket"`` letterboxes each image into its bucket's shape, so all
images of a batch have the same shape and little padding.

The order is shuffled, deterministic for ``(seed, epoch)`` (call
:meth:`BucketBatchSampler.set_epoch`), and splits whole batches across
``num_replicas`` processes for DDP (the engine then passes
``use_distributed_sampler=False`` to Lightning).  Square letterbox stays the
default of every method; buckets are opt-in.
"""

from __future__ import annotations

import math
from typing import Iterator, Sequence

import numpy as np
import torch

from radpretrain.data.geometry import fit_size


def _round_to(x: float, multiple: int) -> int:
    return max(multiple, int(math.floor(x / multiple + 0.5)) * multiple)  # half rounds up


def bucket_shapes(size: int, multiple: int = 16, ratios: Sequence[float] = (1.0, 4 / 3, 3 / 4, 2.0, 1 / 2)) -> list[tuple[int, int]]:
    """Bucket shapes ``(h, w)`` for base size ``size``: the longest side is ``size``.

    ``ratios`` are h / w; the shorter side is rounded to a multiple of
    ``multiple`` (at least ``multiple``).  Duplicates are removed, order kept.
    """
    size = int(size)
    out: list[tuple[int, int]] = []
    for r in ratios:
        if r >= 1:
            shape = (size, min(size, _round_to(size / r, multiple)))
        else:
            shape = (min(size, _round_to(size * r, multiple)), size)
        if shape not in out:
            out.append(shape)
    return out


def assign_buckets(aspect_ratios, shapes: Sequence[tuple[int, int]]) -> np.ndarray:
    """Index of the nearest bucket (in log aspect ratio) for every h / w value."""
    ar = np.log(np.asarray(aspect_ratios, dtype=np.float64).reshape(-1))
    bins = np.log(np.array([h / w for h, w in shapes], dtype=np.float64))
    return np.abs(ar[:, None] - bins[None, :]).argmin(axis=1).astype(np.int64)


def padding_fraction(sizes, shapes_per_image) -> float:
    """Mean fraction of padded pixels when letterboxing images of ``sizes`` [N, 2] into ``shapes_per_image`` [N, 2]."""
    fr = []
    for (h, w), (th, tw) in zip(np.asarray(sizes), np.asarray(shapes_per_image)):
        nh, nw, _, _ = fit_size(int(h), int(w), (int(th), int(tw)))
        fr.append(1 - nh * nw / (th * tw))
    return float(np.mean(fr)) if fr else 0.0


class BucketBatchSampler(torch.utils.data.Sampler):
    """Batches of ``(position, h, w)`` tuples, one bucket shape per batch.

    ``aspect_ratios``: h / w per dataset position, or a dataset with an
    ``aspect_ratios()`` method (``StoreDataset``).  Every position appears once
    per epoch (per replica set) unless ``drop_last`` drops incomplete batches.
    With ``num_replicas > 1`` the epoch's batch list is padded by repeating
    batches from its start (or trimmed with ``drop_last``) so every rank gets
    the same number of batches; rank ``r`` takes batches ``r, r + R, ...``.
    """

    def __init__(
        self,
        aspect_ratios,
        batch_size: int,
        image_size: int = 224,
        shapes: Sequence[tuple[int, int]] | None = None,
        multiple: int = 16,
        shuffle: bool = True,
        seed: int = 0,
        drop_last: bool = False,
        num_replicas: int = 1,
        rank: int = 0,
    ):
        if hasattr(aspect_ratios, "aspect_ratios"):
            aspect_ratios = aspect_ratios.aspect_ratios()
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank {rank} outside [0, {num_replicas})")
        self.shapes = [tuple(map(int, s)) for s in (shapes or bucket_shapes(image_size, multiple))]
        self.bucket_of = assign_buckets(aspect_ratios, self.shapes)
        self.batch_size = int(batch_size)
        self.shuffle = shuffle
        self.seed = int(seed)
        self.drop_last = drop_last
        self.num_replicas = int(num_replicas)
        self.rank = int(rank)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def bucket_counts(self) -> dict[tuple[int, int], int]:
        return {s: int((self.bucket_of == b).sum()) for b, s in enumerate(self.shapes)}

    def _all_batches(self) -> list[list[int]]:
        rng = np.random.default_rng([self.seed, self.epoch])
        batches: list[list[int]] = []
        for b in range(len(self.shapes)):
            pos = np.flatnonzero(self.bucket_of == b)
            if self.shuffle:
                pos = rng.permutation(pos)
            for i in range(0, len(pos), self.batch_size):
                chunk = pos[i : i + self.batch_size]
                if len(chunk) < self.batch_size and self.drop_last:
                    continue
                batches.append([int(p) for p in chunk])
        if self.shuffle:
            order = rng.permutation(len(batches))
            batches = [batches[i] for i in order]
        r = self.num_replicas
        if r > 1 and batches:
            if self.drop_last:
                batches = batches[: len(batches) // r * r]
            else:
                extra = (-len(batches)) % r
                batches = batches + [batches[i % len(batches)] for i in range(extra)]
        return batches

    def __iter__(self) -> Iterator[list[tuple[int, int, int]]]:
        for batch in self._all_batches()[self.rank :: self.num_replicas]:
            h, w = self.shapes[int(self.bucket_of[batch[0]])]
            yield [(p, h, w) for p in batch]

    def __len__(self) -> int:
        n = 0
        for b in range(len(self.shapes)):
            c = int((self.bucket_of == b).sum())
            n += c // self.batch_size if self.drop_last else math.ceil(c / self.batch_size)
        r = self.num_replicas
        if r > 1:
            n = n // r if self.drop_last else math.ceil(n / r)
        return n
