"""Intensity handling: from raw pixel values to a float32 image in [0, 1], bone bright.

The rules (``radpretrain-ingest-v1``), applied by :func:`radpretrain.data.readers.load_image`:

* DICOM radiographs (CR, DX, XR, MG, ...): modality LUT (RescaleSlope/Intercept
  or Modality LUT Sequence), then the VOI LUT or window stored in the header
  when there is one, else a robust percentile window (0.5 %–99.5 %);
  MONOCHROME1 is inverted afterwards so bone is bright.
* CT: Hounsfield units windowed to -1000..1400 (bone and soft tissue both visible).
* MR: divided by the image's 99.5th percentile (negative values clipped).
* 8-bit images: divided by 255.  16-bit PNG/TIFF: divided by the largest value
  their bit depth allows, the bit depth being the smallest of 8..16 bits that
  holds the image's maximum (12-bit data in a 16-bit file -> /4095).
  Float images: percentile window.
* Colour: ITU-R BT.601 luma (the grey PIL and most viewers use).

Resizing (:func:`resize_max`) keeps the aspect ratio and uses area averaging
(PIL ``BOX``) when shrinking, so no aliasing.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

PERCENTILES = (0.5, 99.5)
CT_WINDOW = (-1000.0, 1400.0)
MR_PERCENTILE = 99.5
INTENSITY_VERSION = "radpretrain-ingest-v1"
_LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)


def window(x: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """Linear map of [lo, hi] to [0, 1], clipped; float32."""
    x = np.asarray(x, dtype=np.float32)
    if not np.isfinite(lo) or not np.isfinite(hi) or hi <= lo:
        return np.zeros(x.shape, np.float32)
    out = (x - np.float32(lo)) * np.float32(1.0 / (hi - lo))
    return np.clip(out, 0.0, 1.0, out=out)


def affine_of(values: np.ndarray, lut: np.ndarray, tol: float = 1e-5) -> tuple[float, float] | None:
    """(a, b) when ``lut == clip(a * values + b, 0, 1)`` everywhere (a window), else None."""
    inside = np.flatnonzero((lut > 0) & (lut < 1))
    if inside.size < 2:
        return None
    i, j = inside[np.argmin(values[inside])], inside[np.argmax(values[inside])]
    a = (float(lut[j]) - float(lut[i])) / (float(values[j]) - float(values[i]))
    b = float(lut[i]) - a * float(values[i])
    fit = np.clip(a * values.astype(np.float64) + b, 0.0, 1.0)
    return (a, b) if float(np.max(np.abs(fit - lut))) <= tol else None


_BLOCK_VALUES = 1 << 16  # values per block of the blocked passes (256 KiB of float32: stays in cache)


def affine_clip(x: np.ndarray, a: float, b: float, stats: dict | None = None) -> np.ndarray:
    """clip(a * x + b, 0, 1) as float32.

    Evaluated in row blocks that stay in the CPU cache (cast, multiply, add and
    clip on one block before the next), which is bit-identical to the same four
    steps over the whole array.  ``stats``: when given, receives ``raw_min`` and
    ``raw_max`` of ``x`` (measured on the same cached blocks).
    """
    x = np.asarray(x)
    out = np.empty(x.shape, np.float32)
    a32, b32 = np.float32(a), np.float32(b)
    rows = x.reshape(x.shape[0], -1) if x.ndim >= 2 else x.reshape(1, -1)
    flat = out.reshape(rows.shape)
    step = max(1, _BLOCK_VALUES // max(1, rows.shape[1]))
    lo = hi = None
    for r in range(0, rows.shape[0], step):
        src, o = rows[r : r + step], flat[r : r + step]
        if stats is not None and src.size:
            bmin, bmax = src.min(), src.max()
            lo = bmin if lo is None or bmin < lo else lo
            hi = bmax if hi is None or bmax > hi else hi
        o[...] = src
        o *= a32
        o += b32
        np.clip(o, 0.0, 1.0, out=o)
    if stats is not None:
        stats["raw_min"], stats["raw_max"] = lo, hi
    return out


def affine_clip_values(values, a: float, b: float) -> np.ndarray:
    """:func:`affine_clip` of a few values, with the same float32 steps (bit-identical results)."""
    out = np.asarray(values).astype(np.float32)
    out *= np.float32(a)
    out += np.float32(b)
    return np.clip(out, 0.0, 1.0, out=out)


def _sample(x: np.ndarray, max_n: int = 1 << 18) -> np.ndarray:
    """A strided subsample for fast percentiles on large images (deterministic)."""
    flat = x.reshape(-1)
    step = max(1, flat.size // max_n)
    return flat[::step]


def percentile_window(x: np.ndarray, lo_pct: float = PERCENTILES[0], hi_pct: float = PERCENTILES[1]) -> np.ndarray:
    """Window between two percentiles of the image (robust to burnt-in text and collimation)."""
    s = _sample(np.asarray(x))
    s = s[np.isfinite(s)] if s.dtype.kind == "f" else s
    if s.size == 0:
        return np.zeros(np.shape(x), np.float32)
    lo, hi = np.percentile(s, [lo_pct, hi_pct])
    if hi <= lo:  # very peaked histogram: fall back to the full range
        lo, hi = float(np.min(s)), float(np.max(s))
    return window(x, float(lo), float(hi))


def ct_window(hu: np.ndarray, lo: float = CT_WINDOW[0], hi: float = CT_WINDOW[1]) -> np.ndarray:
    return window(hu, lo, hi)


def mr_normalise(x: np.ndarray, pct: float = MR_PERCENTILE) -> np.ndarray:
    """Divide by the image's ``pct`` percentile; negatives clipped to 0."""
    s = _sample(np.asarray(x, dtype=np.float32))
    top = float(np.percentile(s, pct)) if s.size else 0.0
    if top <= 0:
        top = float(np.max(s)) if s.size else 0.0
    return window(x, 0.0, top) if top > 0 else np.zeros(np.shape(x), np.float32)


def to_grey(arr: np.ndarray) -> np.ndarray:
    """Colour (H, W, 3|4) -> luma (H, W) float32 in the input's units; grey passes through."""
    a = np.asarray(arr)
    if a.ndim == 3 and a.shape[-1] in (3, 4):
        return a[..., :3].astype(np.float32) @ _LUMA
    if a.ndim == 3 and a.shape[-1] in (1, 2):  # grey (+ alpha)
        return a[..., 0]
    return a


def integer_bits(arr: np.ndarray) -> int:
    """Bit depth (8..16) that holds the image's largest value."""
    top = int(np.max(arr)) if arr.size else 0
    return int(min(16, max(8, top.bit_length())))


def scale_by_depth(arr: np.ndarray) -> np.ndarray:
    """Integer image -> [0, 1]: 8-bit /255, wider by the bit depth its maximum needs; float by percentiles."""
    a = np.asarray(arr)
    if a.dtype == np.uint8:
        return a.astype(np.float32) * np.float32(1 / 255)
    if a.dtype.kind in "ui":
        if a.size and int(np.min(a)) < 0:
            return percentile_window(a)
        return window(a, 0.0, float(2 ** integer_bits(a) - 1))
    if a.dtype == np.bool_:
        return a.astype(np.float32)
    return percentile_window(a)


BLANK_TOL = 1.0 / 255


def is_blank(img01: np.ndarray, tol: float = BLANK_TOL) -> bool:
    """True when the image carries no information (constant within one grey level)."""
    if img01.size == 0:
        return True
    s = _sample(img01)
    return float(np.max(s) - np.min(s)) < tol and float(np.ptp(img01)) < tol


def is_blank_range(lo, hi, tol: float = BLANK_TOL) -> bool:
    """:func:`is_blank` from the image's float32 minimum and maximum (same test: their difference < tol)."""
    return float(np.float32(hi) - np.float32(lo)) < tol


def resize_max(img01: np.ndarray, max_size: int) -> np.ndarray:
    """Shrink so the longest side is <= ``max_size`` (aspect kept, area averaging); never enlarges."""
    h, w = img01.shape
    longest = max(h, w)
    if not max_size or longest <= max_size:
        return np.asarray(img01, dtype=np.float32)
    scale = max_size / longest
    nh, nw = max(1, int(round(h * scale))), max(1, int(round(w * scale)))
    nh, nw = min(nh, max_size), min(nw, max_size)
    src = np.ascontiguousarray(img01, dtype=np.float32)
    im = _float_image(src, w, h)
    out = np.asarray(im.resize((nw, nh), resample=Image.Resampling.BOX), dtype=np.float32)
    return np.clip(out, 0.0, 1.0)


def _float_image(src: np.ndarray, w: int, h: int) -> Image.Image:
    """A PIL "F" image over the memory of a C-contiguous float32 array, without a copy.

    ``Image.frombuffer`` maps only 8/16-bit modes; for "F" it allocates, zero-fills and
    copies the whole image, which costs more than the resize itself on large radiographs.
    The resize then reads the same values, so the result is identical; if this Pillow
    lacks the mapping, ``frombuffer`` is used.
    """
    try:
        core = Image.core.map_buffer(src, (w, h), "raw", 0, ("F", 0, 1))
        im = Image.new("F", (0, 0))._new(core)
        im.readonly = 1
        return im
    except Exception:
        return Image.frombuffer("F", (w, h), src, "raw", "F", 0, 1)
