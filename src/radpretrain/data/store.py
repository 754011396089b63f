"""The dataset store: sharded raw pixels plus one ``manifest.parquet``.

Layout of a store folder::

    DATASET/
      store.json          format, pixel dtype, max side, counts
      manifest.parquet    one row per *input* (ingested, duplicate or quarantined; columns: :mod:`.manifest`)
      shards/*.bin        raw C-order pixel arrays, concatenated; no file per image
      splits.parquet      written by ``radpretrain split``
      qc_summary.json     written by ``radpretrain ingest``
      .ingest/            ingest's plan.json and chunk manifests (resuming, repair, merging)

Pixels are stored after intensity handling, already in display orientation
(bone bright), scaled from [0, 1] to the full range of the store's dtype
(``uint8`` by default).  A row of the manifest points at its pixels with
``shard`` (file name), ``offset`` (bytes) and ``height``/``width``.  Shards are
memory-mapped, so random access costs one page-in and sequential streaming is
a linear read.
"""

from __future__ import annotations

import os
from functools import cached_property
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa

from radpretrain.data.intensity import from_stored, to_stored  # noqa: F401  (to_stored: its old home here still works)
from radpretrain.data.manifest import MANIFEST_COLUMNS
from radpretrain.errors import UserError
from radpretrain.utils import read_json, write_json

STORE_FORMAT = "radpretrain-store"
STORE_VERSION = 1
SHARD_DIR = "shards"
MANIFEST = "manifest.parquet"
SPLITS = "splits.parquet"
WORK_DIR = ".ingest"  # ingest's and merge's bookkeeping: plan.json, chunk manifests (ingest resumes from it)

REPAIR_HINT = ("the store is damaged: 'radpretrain verify {root}' lists what is, and running the same "
               "'radpretrain ingest' command again repairs it")


class ShardWriter:
    """Append images to one shard file; the file appears under its final name only on close.

    A writer killed midway leaves only ``*.tmp`` behind, which readers ignore
    and the next ingest removes.

    Images are gathered and written about :data:`BUFFER` bytes at a time with one
    ``writev`` call.  An image whose memory nothing can change (a read-only array over a
    ``bytes`` object, as numpy makes from a PIL image) is written from its own memory;
    any other is copied when appended, so the caller may reuse or change it afterwards.
    """

    BUFFER = 1 << 20
    MAX_PARTS = 512  # images per writev call (the system allows 1024)

    def __init__(self, path: str | Path, dtype=np.uint8):
        self.path = Path(path)
        # unique per process, so two writers of the same shard never share a temp file
        self.tmp = self.path.with_name(f"{self.path.name}.{os.getpid()}.tmp")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.dtype = np.dtype(dtype)
        self._f = open(self.tmp, "wb", buffering=0)  # unbuffered: the gathered images go out in one call
        self._parts: list[np.ndarray] = []
        self._pending = 0
        self.offset = 0
        self.count = 0

    def append(self, img: np.ndarray) -> int:
        """Write one 2-D image (already in the store dtype); return its byte offset."""
        a = np.ascontiguousarray(img)
        if a.ndim != 2 or a.dtype != self.dtype:
            raise ValueError(f"expected a 2-D {self.dtype} array, got {a.dtype} {a.shape}")
        off = self.offset
        flat = a.reshape(-1).view(np.uint8)
        self._parts.append(flat if _immutable(flat) else flat.copy())
        self._pending += a.nbytes
        self.offset += a.nbytes
        self.count += 1
        if self._pending >= self.BUFFER or len(self._parts) >= self.MAX_PARTS:
            self._flush()
        return off

    def _flush(self) -> None:
        if self._parts:
            try:
                _write_all(self._f.fileno(), [p.data for p in self._parts])
            except OSError as e:  # a write to a descriptor names no file: name the shard (e.g. disk full)
                raise OSError(e.errno, e.strerror, str(self.path)) from None
            self._parts.clear()
            self._pending = 0

    def close(self, commit: bool = True) -> None:
        """Finish the shard: synced to disk and renamed to its final name.

        ``commit=False``: only written out and closed under its temporary name (``self.tmp``);
        :func:`commit_file` ``(self.tmp, self.path)`` commits it later, from any process.
        """
        self._flush()
        if not commit:
            self._f.close()
            return
        os.fsync(self._f.fileno())
        self._f.close()
        os.replace(self.tmp, self.path)

    def abort(self) -> None:
        self._parts.clear()
        self._f.close()
        self.tmp.unlink(missing_ok=True)

    def __enter__(self):
        return self

    def __exit__(self, exc_type, *_):
        if exc_type is None:
            self.close()
        else:
            self.abort()


def _immutable(a: np.ndarray) -> bool:
    """True when the array's memory belongs to a ``bytes`` object (through views): nothing can change it
    (numpy makes every array over such memory read-only and refuses to make it writeable)."""
    base = a.base
    while isinstance(base, np.ndarray):
        base = base.base
    return type(base) is bytes


def _write_all(fd: int, views: list) -> None:
    """``os.writev`` of all of ``views``, continuing after a partial write."""
    while views:
        n = os.writev(fd, views)
        while views and n >= len(views[0]):
            n -= len(views[0])
            views = views[1:]
        if views and n:
            views = [memoryview(views[0])[n:], *views[1:]]


def commit_file(tmp: str | Path, path: str | Path) -> None:
    """Sync a finished temporary file to disk, then rename it to ``path`` (what :meth:`ShardWriter.close` does)."""
    fd = os.open(tmp, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def write_store_meta(root: str | Path, dtype="uint8", max_size: int = 512, **extra) -> None:
    meta = {"format": STORE_FORMAT, "version": STORE_VERSION, "dtype": str(np.dtype(dtype)), "max_size": int(max_size)}
    meta.update(extra)
    write_json(Path(root) / "store.json", meta)


def write_manifest(root: str | Path, df: pd.DataFrame) -> Path:
    """Write ``manifest.parquet`` atomically."""
    path = Path(root) / MANIFEST
    tmp = path.with_name(".manifest.parquet.tmp")
    try:
        df.reset_index(drop=True).to_parquet(tmp, index=False)
    except OSError as e:  # Arrow's errors name no file (e.g. disk full); no partial file is left
        tmp.unlink(missing_ok=True)
        raise OSError(e.errno, e.strerror or str(e), str(path)) from None
    os.replace(tmp, path)
    return path


class Store:
    """Read access to a dataset store.

    ``store.manifest`` has every input; ``store.images`` only the ingested rows
    (index 0..N-1, the order that :meth:`read` and the Dataset use).

    Opening checks that ``store.json`` and ``manifest.parquet`` can be read and (``check``) that every
    shard an ingested image lives in exists and is long enough for it (one ``stat`` per shard); a
    damaged store gives a one-line :class:`UserError` naming the file.  ``radpretrain verify`` also
    checks the pixels' hashes.
    """

    def __init__(self, root: str | Path, check: bool = True):
        self.root = Path(root)
        meta_path = self.root / "store.json"
        if not meta_path.is_file():
            raise UserError(f"{self.root}: not a radpretrain dataset store (no store.json); create one with 'radpretrain ingest'")
        try:
            self.meta = read_json(meta_path)
        except (OSError, ValueError) as e:
            raise UserError(f"{meta_path}: cannot be read ({type(e).__name__}); "
                            + REPAIR_HINT.format(root=self.root)) from None
        if not isinstance(self.meta, dict) or self.meta.get("format") != STORE_FORMAT:
            raise UserError(f"{meta_path}: unknown store format "
                            f"{self.meta.get('format') if isinstance(self.meta, dict) else None!r}")
        if not (self.root / MANIFEST).is_file():
            raise UserError(f"{self.root}: no {MANIFEST}; the ingest did not finish (run it again to resume)")
        self.dtype = np.dtype(self.meta.get("dtype", "uint8"))
        self._maps: dict[str, np.memmap] = {}
        if check:
            self.check_shards()

    @cached_property
    def manifest(self) -> pd.DataFrame:
        path = self.root / MANIFEST
        try:
            df = pd.read_parquet(path)
        except (OSError, ValueError, pa.ArrowException) as e:
            raise UserError(f"{path}: not a readable manifest ({type(e).__name__}); "
                            + REPAIR_HINT.format(root=self.root)) from None
        missing = [c for c in ("image_id", "status", "height", "width", "shard", "offset") if c not in df.columns]
        if missing:
            raise UserError(f"{path}: the manifest lacks the columns {', '.join(missing)}; "
                            + REPAIR_HINT.format(root=self.root))
        return df

    @cached_property
    def images(self) -> pd.DataFrame:
        df = self.manifest
        return df[df["status"] == "ingested"].reset_index(drop=True)

    def shard_sizes_needed(self) -> dict[str, int]:
        """Shard name -> the bytes its ingested images need (offset + height x width x itemsize, at most)."""
        img = self.images
        if not len(img):
            return {}
        ends = img["offset"].to_numpy(np.int64) + (img["height"].to_numpy(np.int64) * img["width"].to_numpy(np.int64)
                                                   * self.dtype.itemsize)
        return {str(k): int(v) for k, v in pd.Series(ends).groupby(img["shard"].astype(str).to_numpy()).max().items()}

    def check_shards(self) -> None:
        """Every shard holding an ingested image exists and is long enough for it; else a one-line UserError."""
        for shard, needed in self.shard_sizes_needed().items():
            path = self.root / SHARD_DIR / shard
            try:
                size = path.stat().st_size
            except FileNotFoundError:
                raise UserError(f"{path}: shard missing; " + REPAIR_HINT.format(root=self.root)) from None
            if size < needed:
                raise UserError(f"{path}: shard truncated ({size} bytes, its images need {needed}); "
                                + REPAIR_HINT.format(root=self.root))

    @property
    def label_columns(self) -> list[str]:
        return [c for c in self.manifest.columns if c not in MANIFEST_COLUMNS]

    def __len__(self) -> int:
        return len(self.images)

    def _map(self, shard: str) -> np.memmap:
        m = self._maps.get(shard)
        if m is None:
            path = self.root / SHARD_DIR / shard
            if not path.is_file():
                raise UserError(f"{path}: shard missing from the store")
            m = np.memmap(path, dtype=self.dtype, mode="r")
            self._maps[shard] = m
        return m

    def read(self, i: int) -> np.ndarray:
        """Stored pixels of ingested image ``i`` (a read-only view in the store dtype)."""
        row = self.images.iloc[i]
        return self.read_row(row)

    def read_row(self, row) -> np.ndarray:
        h, w = int(row["height"]), int(row["width"])
        start = int(row["offset"]) // self.dtype.itemsize
        m = self._map(str(row["shard"]))
        flat = np.asarray(m[start : start + h * w])
        if flat.size != h * w:  # the shard was cut short after the store was opened
            raise UserError(f"{self.root / SHARD_DIR / str(row['shard'])}: shard truncated (image at byte "
                            f"{int(row['offset'])} missing); " + REPAIR_HINT.format(root=self.root))
        return flat.reshape(h, w)

    def read_float(self, i: int) -> np.ndarray:
        """Image ``i`` as float32 in [0, 1]."""
        return from_stored(self.read(i))

    def index_of(self, image_id: str) -> int:
        hits = np.flatnonzero(self.images["image_id"].to_numpy() == image_id)
        if len(hits) == 0:
            raise UserError(f"{self.root}: no ingested image with id {image_id!r}")
        return int(hits[0])

    def __getstate__(self):  # memmaps are reopened in worker processes
        state = self.__dict__.copy()
        state["_maps"] = {}
        return state
