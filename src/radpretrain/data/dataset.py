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
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np
import torch
from PIL import Image

from radpretrain.data.store import REPAIR_HINT, SHARD_DIR, Store
from radpretrain.errors import UserError

RESIZE_MODES = ("letterbox", "stretch", "bucket")


def _as_hw(size) -> tuple[int, int]:
    if isinstance(size, (tuple, list)):
        h, w = int(size[0]), int(size[1])
    else:
        h = w = int(size)
    if h < 1 or w < 1:
        raise ValueError(f"target size must be positive, got {size!r}")
    return h, w


def _to_pil(img: np.ndarray) -> tuple[Image.Image, bool]:
    """A Pillow image of ``img`` and whether it is 8-bit (else 32-bit float in [0, 1])."""
    if img.dtype == np.uint8:
        return Image.fromarray(np.ascontiguousarray(img), mode="L"), True
    if np.issubdtype(img.dtype, np.integer):
        f = img.astype(np.float32) / np.float32(np.iinfo(img.dtype).max)
    else:
        f = img.astype(np.float32, copy=False)
    return Image.fromarray(np.ascontiguousarray(f), mode="F"), False


def _resize(img: np.ndarray, h: int, w: int) -> np.ndarray:
    """Antialiased bilinear resize to (h, w); returns uint8 for uint8 input, else float32 in [0, 1]."""
    if img.shape == (h, w):
        return np.array(img) if img.dtype == np.uint8 else _float01(img)
    pil, is8 = _to_pil(img)
    # reducing_gap: a box reduce() first for big reductions (~2x faster, as Image.thumbnail does)
    out = np.array(pil.resize((w, h), Image.BILINEAR, reducing_gap=2.0))  # writable copy for torch
    return out if is8 else np.clip(out, 0.0, 1.0)


def _float01(img: np.ndarray) -> np.ndarray:
    if img.dtype == np.uint8:
        return img.astype(np.float32) * np.float32(1 / 255)
    if np.issubdtype(img.dtype, np.integer):
        return img.astype(np.float32) / np.float32(np.iinfo(img.dtype).max)
    return np.clip(img.astype(np.float32, copy=False), 0.0, 1.0)


def _squeeze2d(img) -> np.ndarray:
    if isinstance(img, torch.Tensor):
        img = img.detach().cpu().numpy()
    a = np.asarray(img)
    while a.ndim > 2 and a.shape[0] == 1:
        a = a[0]
    if a.ndim != 2 or a.size == 0:
        raise ValueError(f"expected a non-empty 2-D grey image, got shape {a.shape}")
    return a


def fit_size(h: int, w: int, target) -> tuple[int, int, int, int]:
    """Letterbox geometry: ``(new_h, new_w, top, left)`` fitting (h, w) inside ``target`` keeping the aspect ratio."""
    th, tw = _as_hw(target)
    scale = min(th / h, tw / w)
    nh = min(th, max(1, int(round(h * scale))))
    nw = min(tw, max(1, int(round(w * scale))))
    return nh, nw, (th - nh) // 2, (tw - nw) // 2


def _letterbox_raw(img: np.ndarray, target) -> tuple[np.ndarray, np.ndarray]:
    """Like :func:`letterbox` but keeps ``uint8`` input as ``uint8`` (converted later, faster)."""
    th, tw = _as_hw(target)
    h, w = img.shape
    nh, nw, top, left = fit_size(h, w, (th, tw))
    small = _resize(img, nh, nw)
    canvas = np.zeros((th, tw), dtype=small.dtype)
    canvas[top : top + nh, left : left + nw] = small
    valid = np.zeros((th, tw), dtype=bool)
    valid[top : top + nh, left : left + nw] = True
    return canvas, valid


def letterbox(img, size) -> tuple[np.ndarray, np.ndarray]:
    """Fit a grey image inside ``size`` (int S or (H, W)) keeping its aspect ratio.

    The longest side (relative to the target) is scaled to fit, the image is
    centred and the rest is padded with 0.  ``img`` is a 2-D array (``uint8``,
    another integer dtype scaled by its maximum, or float in [0, 1]; a leading
    axis of size 1 is allowed).  Returns ``(img01, valid)``: float32 [H, W] in
    [0, 1] and a bool mask [H, W] that is False on the padding.
    """
    a = _squeeze2d(img)
    canvas, valid = _letterbox_raw(a, size)
    return _float01(canvas), valid


def stretch(img, size) -> tuple[np.ndarray, np.ndarray]:
    """Resize to ``size`` ignoring the aspect ratio; returns ``(img01, valid)`` (valid all True)."""
    a = _squeeze2d(img)
    th, tw = _as_hw(size)
    return _float01(_resize(a, th, tw)), np.ones((th, tw), dtype=bool)


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
        from radpretrain.data.buckets import assign_buckets, bucket_shapes

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
        if mode == "stretch":
            arr, valid = _resize(raw, th, tw), np.ones((th, tw), dtype=bool)
        else:
            arr, valid = _letterbox_raw(raw, (th, tw))
        # float conversion in numpy: torch's multi-threaded kernels stall on a busy machine
        img = torch.from_numpy(_float01(arr))
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


def _field_values(col) -> tuple[str, np.ndarray]:
    """Classify a manifest column as int / float / str and return its values as an array."""
    import pandas as pd

    if pd.api.types.is_bool_dtype(col) or pd.api.types.is_integer_dtype(col):
        if col.isna().any():  # nullable integers with gaps -> float with NaN
            return "float", col.astype("float64").to_numpy()
        return "int", col.astype("int64").to_numpy()
    if pd.api.types.is_numeric_dtype(col):
        return "float", col.astype("float64").to_numpy()
    vals = np.array(["" if (v is None or (isinstance(v, float) and np.isnan(v)) or v is pd.NA) else str(v) for v in col], dtype=object)
    return "str", vals
