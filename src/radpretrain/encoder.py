"""The small public API for using an encoder: :func:`load_encoder` and its :class:`Preprocess`.

``model, preprocess = radpretrain.load_encoder(FOLDER)`` reads an export folder (``radpretrain
export``: ``model.safetensors`` + ``config.json``) or a pretraining run folder
(``encoder.safetensors`` + ``encoder.json``) and returns the timm model in eval mode and the exact
input pipeline recorded next to it::

    x = preprocess("knee.dcm")   # DICOM/PNG/JPEG/TIFF path, pydicom Dataset, 2-D array; a list: a batch
    features = model(x)          # [N, num_features]

The pipeline is the one the encoder was trained on: the intensity rules of ``radpretrain ingest``
(:func:`radpretrain.data.readers.load_image` / ``load_stored``), the store's shrinking and 8-bit
quantisation, the letterbox of :mod:`radpretrain.data.geometry` and the encoder's mean/std
(docs/sharing.md).  Weights are read only through
:func:`radpretrain.models.weights.load_run_encoder` (safetensors, or torch files with
``weights_only=True``): nothing here unpickles objects.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from radpretrain.data.geometry import letterbox, stretch
from radpretrain.data.intensity import percentile_window, resize_max, to_stored
from radpretrain.data.readers import ReadError, load_image, load_stored
from radpretrain.errors import UserError
from radpretrain.models.weights import load_run_encoder

__all__ = ["Preprocess", "array_to01", "load_encoder", "preprocess_from_meta", "scalar_stat"]


class Preprocess:
    """Turn one radiograph into the encoder's input tensor ``[1, 1, S, S]`` (or a batch for a list).

    Accepts a ``pydicom.Dataset``, a file path (DICOM, PNG, JPEG, TIFF) or a numpy
    array / torch tensor (2-D).  Files and datasets go through
    :func:`radpretrain.data.readers.load_image` (the intensity rules of ingest).
    Arrays: ``uint8`` -> /255, float in [0, 1] -> as is, anything else (other
    integer types, floats outside [0, 1]) -> the 0.5-99.5 % percentile window.
    Then, like ingest, the longest side is shrunk to ``store_max_size`` and the
    image quantised to 8 bits; finally it is letterboxed to ``image_size`` and
    normalised with the encoder's mean/std.  Pixels read from the training
    store (``uint8``) therefore give exactly the training input.
    """

    def __init__(self, image_size: int, mean: float, std: float, resize: str = "letterbox",
                 store_max_size: int | None = 512):
        self.store_max_size = int(store_max_size) if store_max_size else None
        self.image_size = int(image_size)
        self.mean = float(mean)
        self.std = float(std)
        self.resize = resize

    def __repr__(self) -> str:
        return (f"Preprocess(image_size={self.image_size}, mean={self.mean:.4g}, std={self.std:.4g}, "
                f"resize={self.resize!r})")

    def __call__(self, x) -> torch.Tensor:
        if isinstance(x, (list, tuple)):
            if not x:
                raise UserError("preprocess: empty list of images")
            return torch.cat([self(item) for item in x], 0)
        return self.from_stored(self.to_stored(x))

    # Steps, usable on their own ------------------------------------------------
    def to_img01(self, x) -> np.ndarray:
        """Intensity handling only: a float32 2-D image in [0, 1]."""
        if isinstance(x, (str, os.PathLike)):
            return _read_file(Path(x))
        if _is_pydicom_dataset(x):
            return _load_with_readers(x, "pydicom dataset")
        if isinstance(x, torch.Tensor):
            x = x.detach().cpu().numpy()
        if isinstance(x, np.ndarray):
            return array_to01(x)
        raise UserError(f"preprocess: cannot read a {type(x).__name__}; pass a file path, a pydicom Dataset or a 2-D array")

    def to_stored(self, x) -> np.ndarray:
        """``uint8`` 2-D image as the training store holds it.

        Files and DICOM datasets: exactly what ``radpretrain ingest --max-size
        store_max_size`` stores (:func:`radpretrain.data.readers.load_stored`).
        """
        if isinstance(x, (str, os.PathLike)):
            return _read_file(Path(x), stored_max_size=self.store_max_size)
        if _is_pydicom_dataset(x):
            return _load_with_readers(x, "pydicom dataset", stored_max_size=self.store_max_size)
        img01 = self.to_img01(x)
        if self.store_max_size:
            img01 = resize_max(img01, self.store_max_size)
        return to_stored(img01)

    def from_stored(self, img) -> torch.Tensor:
        """Resize + normalise a stored (``uint8``) or [0, 1] 2-D image -> ``[1, 1, S, S]``."""
        img01 = _resize_policy(img, self.image_size, self.resize)
        t = torch.from_numpy(np.ascontiguousarray(img01, dtype=np.float32))
        return ((t - self.mean) / self.std)[None, None]


def _is_pydicom_dataset(x) -> bool:
    try:
        from pydicom.dataset import Dataset  # heavy (pixel handlers): only to recognise a Dataset
    except ImportError:  # pragma: no cover
        return False
    return isinstance(x, Dataset)


def _as2d(a: np.ndarray) -> np.ndarray:
    a = np.asarray(a)
    while a.ndim > 2 and a.shape[0] == 1:
        a = a[0]
    if a.ndim != 2 or a.size == 0:
        raise UserError(f"preprocess: expected a 2-D grey image, got an array of shape {a.shape} "
                        "(pass a list for a batch)")
    return a


def array_to01(x: np.ndarray) -> np.ndarray:
    """The documented rule for arrays: uint8 /255, float in [0, 1] as is, else a percentile window."""
    a = _as2d(x)
    if a.dtype == np.bool_:
        return a.astype(np.float32)
    if a.dtype == np.uint8:
        return a.astype(np.float32) / np.float32(255)
    if np.issubdtype(a.dtype, np.floating):
        f = a.astype(np.float32)
        if np.isfinite(f).all() and f.min() >= 0.0 and f.max() <= 1.0:
            return f
    if not np.issubdtype(a.dtype, np.number):
        raise UserError(f"preprocess: unsupported array dtype {a.dtype}")
    return percentile_window(a)


_FULL = object()  # to_img01: the [0, 1] image at full size, not the stored one


def _read_file(path: Path, stored_max_size=_FULL) -> np.ndarray:
    if not path.is_file():
        raise UserError(f"{path}: no such image file")
    return _load_with_readers(path, str(path), stored_max_size)


def _load_with_readers(x, what: str, stored_max_size=_FULL) -> np.ndarray:
    """``load_image``'s [0, 1] image, or (``stored_max_size`` given, None: no resizing) ``load_stored``'s uint8 one."""
    try:  # _meta may hold raw identifiers in memory: dropped here
        if stored_max_size is _FULL:
            img, _meta = load_image(x)
            return _as2d(np.asarray(img, dtype=np.float32))
        img, _meta = load_stored(x, stored_max_size)
    except ReadError as e:
        raise UserError(f"{what}: cannot read this image ({e})") from None
    return _as2d(np.asarray(img))


def _resize_policy(img, size: int, resize: str) -> np.ndarray:
    """The dataset's own resize (same pixels as training): letterbox, or stretch for stretch-trained encoders."""
    return (stretch if resize == "stretch" else letterbox)(img, size)[0]


def scalar_stat(v) -> float:
    """A recorded mean or std as one number (a per-channel list is averaged: the grey equivalent)."""
    if isinstance(v, (list, tuple)):
        v = float(np.mean([float(x) for x in v]))
    return float(v)


def preprocess_from_meta(meta: dict, image_size: int | None = None) -> Preprocess:
    """The :class:`Preprocess` of an encoder description (``encoder.json`` or export ``config.json``)."""
    pre = meta.get("preprocessing") or {}
    if "mean" not in pre or "std" not in pre:
        raise UserError(f"encoder {meta.get('arch', '?')}: no preprocessing mean/std recorded; cannot build its input")
    size = image_size or pre.get("image_size") or meta.get("image_size") or 224
    return Preprocess(int(size), scalar_stat(pre["mean"]), scalar_stat(pre["std"]),
                      str(pre.get("resize") or meta.get("resize") or "letterbox"),
                      store_max_size=pre.get("store_max_size", 512))


def load_encoder(path, device: str | torch.device = "cpu", image_size: int | None = None
                 ) -> tuple[torch.nn.Module, Callable[[Any], torch.Tensor]]:
    """Load an export (or run) folder; returns ``(model, preprocess)``, the model in eval mode.

    ``preprocess(x)`` takes a pydicom Dataset, a DICOM/PNG/JPEG path or a 2-D
    array and returns ``[1, 1, S, S]`` (a list gives ``[N, 1, S, S]``); move it
    to the model's device yourself.
    """
    p = Path(path)
    if not p.exists():
        raise UserError(f"{p}: no such encoder folder")
    model, meta = load_run_encoder(p, device=device)
    return model.eval(), preprocess_from_meta(meta, image_size)
