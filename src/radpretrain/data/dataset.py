"""``StoreDataset``: random access over a store's ingested images, resized for training.

Each item is a dict::

    image  float32 tensor [1, H, W] in [0, 1]
    valid  bool tensor [1, H, W]; False on letterbox padding
    index  int, the row of ``Store.images``
    ...    the requested manifest fields (strings stay ``str``; numbers become
           0-d tensors: int64 for integer/bool columns, float32 for float columns,
           NaN stays NaN; a missing value in a text column becomes ``""``)

``H = W = image_size`` for ``resize="letterbox"`` (the default: keep the aspect
ratio, fit the longest side, centre, pad with 0) and ``resize="stretch"`` (no
aspect keeping, ``valid`` is all True).  With ``resize="bucket"`` the shape is
the image's aspect-ratio bucket (see :mod:`radpretrain.data.buckets`): the
dataset accepts ``(position, h, w)`` tuples from
:class:`~radpretrain.data.buckets.BucketBatchSampler`, or a plain position, in
which case it uses the nearest default bucket for ``image_size``.

Resizing uses Pillow's antialiased bilinear filter (``reducing_gap=2``) on the stored ``uint8``
pixels (float conversion happens after resizing), which is several times faster
than a training step consumes on two CPU cores.  The dataset pickles without
its memory maps, so it works with ``DataLoader(num_workers>0)``.

With ``defer_resize=True`` the items carry the stored pixels instead of ``image`` / ``valid``:
``pixels`` (store dtype [1, h, w], box-reduced only when at least 4x the target) and ``geometry``
(see :mod:`radpretrain.data.geometry`); build the loader with ``collate_fn=dataset.collate`` and
call :func:`radpretrain.data.geometry.finish_batch` on the batch once it is on the training
device, which letterboxes the whole batch there (the engine does both with ``data.resize_on``).
The geometry, and the result to within 1/255, are those of the loader path.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np
import pandas as pd
import torch

from radpretrain.data.buckets import assign_buckets, bucket_shapes
from radpretrain.data.geometry import (
    collate_deferred, fit_size, letterbox, letterbox_array, prepare_for_device, resize_array, stretch, to_float01)
from radpretrain.data.store import REPAIR_HINT, SHARD_DIR, Store
from radpretrain.errors import UserError

RESIZE_MODES = ("letterbox", "stretch", "bucket")
# fit_size, letterbox and stretch live in radpretrain.data.geometry; imported from here by older callers
__all__ = ["RESIZE_MODES", "StoreDataset", "fit_size", "letterbox", "stretch"]


class StoreDataset(torch.utils.data.Dataset):
    """Random access over ``Store.images`` (or the rows ``indices`` of it); see the module docstring."""

    def __init__(
        self,
        root_or_store: str | Path | Store,
        indices: Iterable[int] | None = None,
        image_size: int = 224,
        resize: str = "letterbox",
        fields: Sequence[str] = (),
        transform: Callable[[dict], dict] | None = None,
        defer_resize: bool = False,
    ):
        store = root_or_store if isinstance(root_or_store, Store) else Store(root_or_store)
        if resize not in RESIZE_MODES:
            raise UserError(f"resize={resize!r}: choose one of {', '.join(RESIZE_MODES)}")
        self.root = store.root
        self._store: Store | None = store
        self.image_size = int(image_size)
        if self.image_size < 1:
            raise UserError(f"image_size={image_size!r}: must be a positive number of pixels")
        self.resize = resize
        self.transform = transform
        self.defer_resize = bool(defer_resize)
        if self.defer_resize and transform is not None:
            raise ValueError("defer_resize=True: a per-sample transform needs resized images; resize in the loader")
        images = store.images
        n = len(images)
        if indices is None:
            idx = np.arange(n, dtype=np.int64)
        else:
            idx = np.asarray(list(indices) if not isinstance(indices, np.ndarray) else indices).astype(np.int64).reshape(-1)
            bad = idx[(idx < 0) | (idx >= n)]
            if len(bad):
                raise UserError(f"{self.root}: image index {int(bad[0])} out of range (the store has {n} ingested images)")
        self.indices = idx
        # Plain arrays for the hot path (no pandas per item).
        sub = images.iloc[idx]
        self._heights = sub["height"].to_numpy(np.int64)
        self._widths = sub["width"].to_numpy(np.int64)
        self._offsets = sub["offset"].to_numpy(np.int64)
        shards = sub["shard"].astype(str).to_numpy()
        self._shard_names, self._shard_codes = np.unique(shards, return_inverse=True) if len(shards) else (np.array([], dtype=str), np.array([], dtype=np.int64))
        self._shard_names = [str(s) for s in self._shard_names]
        self._itemsize = store.dtype.itemsize
        self.fields = (fields,) if isinstance(fields, str) else tuple(fields)
        self._fields: dict[str, tuple[str, np.ndarray]] = {}
        for name in self.fields:
            if name not in images.columns:
                raise UserError(f"{self.root}: manifest has no column {name!r} (available: {', '.join(images.columns)})")
            self._fields[name] = _field_values(sub[name])
        self._bucket_shapes = None

    # -- store access --------------------------------------------------------
    @property
    def store(self) -> Store:
        """The :class:`Store` (reopened lazily after unpickling in a worker, without reading its manifest
        again: its shards were checked when the dataset was made, and :meth:`raw` checks each read)."""
        if self._store is None:
            self._store = Store(self.root, check=False)
        return self._store

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_store"] = None  # do not ship the manifest DataFrames to every worker
        return state

    def __len__(self) -> int:
        return len(self.indices)

    def raw(self, pos: int) -> np.ndarray:
        """Stored pixels of dataset position ``pos`` (read-only view, store dtype)."""
        h, w = int(self._heights[pos]), int(self._widths[pos])
        m = self.store._map(self._shard_names[self._shard_codes[pos]])
        start = int(self._offsets[pos]) // self._itemsize
        flat = np.asarray(m[start : start + h * w])
        if flat.size != h * w:  # the shard was cut short after the dataset was made
            raise UserError(f"{self.root / SHARD_DIR / self._shard_names[self._shard_codes[pos]]}: shard truncated "
                            f"(image at byte {int(self._offsets[pos])} missing); "
                            + REPAIR_HINT.format(root=self.root))
        return flat.reshape(h, w)

    def aspect_ratios(self) -> np.ndarray:
        """Height / width of every dataset position (for aspect-ratio buckets)."""
        return self._heights / np.maximum(self._widths, 1)

    def sizes(self) -> np.ndarray:
        """Stored (height, width) of every dataset position, shape [N, 2]."""
        return np.stack([self._heights, self._widths], axis=1)

    def bucket_shape(self, pos: int) -> tuple[int, int]:
        """Default bucket (h, w) for ``pos`` at this ``image_size`` (used when no sampler gives one)."""
        if self._bucket_shapes is None:
            shapes = bucket_shapes(self.image_size)
            self._bucket_shapes = (shapes, assign_buckets(self.aspect_ratios(), shapes))
        shapes, which = self._bucket_shapes
        return shapes[int(which[pos])]

    # -- items ---------------------------------------------------------------
    def __getitem__(self, item) -> dict:
        if isinstance(item, (tuple, list)):
            pos, th, tw = int(item[0]), int(item[1]), int(item[2])
            mode = "letterbox" if self.resize != "stretch" else "stretch"
        else:
            pos = int(item)
            if self.resize == "bucket":
                th, tw = self.bucket_shape(pos)
                mode = "letterbox"
            else:
                th = tw = self.image_size
                mode = self.resize
        if pos < 0:
            pos += len(self)
        raw = self.raw(pos)
        if self.defer_resize:  # stored pixels (a copy out of the memory map) + geometry; resized on the device
            px, geom = prepare_for_device(raw, (th, tw), keep_aspect=mode != "stretch")
            sample = {"pixels": torch.from_numpy(np.array(px))[None], "geometry": torch.from_numpy(geom),
                      "index": int(self.indices[pos])}
        else:
            if mode == "stretch":
                arr, valid = resize_array(raw, th, tw), np.ones((th, tw), dtype=bool)
            else:
                arr, valid = letterbox_array(raw, (th, tw))
            # float conversion in numpy: torch's multi-threaded kernels stall on a busy machine
            img = torch.from_numpy(to_float01(arr))
            sample = {"image": img[None], "valid": torch.from_numpy(valid)[None], "index": int(self.indices[pos])}
        for name, (kind, values) in self._fields.items():
            v = values[pos]
            if kind == "int":
                sample[name] = torch.tensor(int(v), dtype=torch.int64)
            elif kind == "float":
                sample[name] = torch.tensor(float(v), dtype=torch.float32)
            else:
                sample[name] = v
        if self.transform is not None:
            sample = self.transform(sample)
        return sample


    def collate(self, samples: list[dict]) -> dict:
        """The ``collate_fn`` for this dataset's items (:func:`~radpretrain.data.geometry.collate_deferred`
        with ``defer_resize``, else torch's default)."""
        if self.defer_resize:
            return collate_deferred(samples)
        return torch.utils.data.default_collate(samples)


def _field_values(col) -> tuple[str, np.ndarray]:
    """Classify a manifest column as int / float / str and return its values as an array."""
    if pd.api.types.is_bool_dtype(col) or pd.api.types.is_integer_dtype(col):
        if col.isna().any():  # nullable integers with gaps -> float with NaN
            return "float", col.astype("float64").to_numpy()
        return "int", col.astype("int64").to_numpy()
    if pd.api.types.is_numeric_dtype(col):
        return "float", col.astype("float64").to_numpy()
    vals = np.array(["" if (v is None or (isinstance(v, float) and np.isnan(v)) or v is pd.NA) else str(v) for v in col], dtype=object)
    return "str", vals
