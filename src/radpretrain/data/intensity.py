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

Resizing keeps the aspect ratio and averages areas, so no aliasing.  An image
whose longest side is at least twice the target is first reduced by the integer
factor ``f = longest // max_size`` (means of f x f blocks, :func:`block_mean`),
then brought to the exact target size (antialiased bilinear, on an image less
than twice that size); smaller images get one PIL ``BOX`` resize (:func:`resize_max`).
When the intensity transfer is a window (``clip(a * x + b)``), the block means
are taken on the raw pixel values and the window applied to the small image
(:func:`resize_max_window`): the full-resolution float image is never made.
Statistics of large images (percentiles, blank test) are measured on a regular
subsample (:func:`_sample`).

The store holds the [0, 1] image quantised to its integer dtype (:func:`to_stored`; back with
:func:`from_stored`): ingest, ``radpretrain patches`` and the exported encoders' preprocessing
all quantise with it.
"""

from __future__ import annotations

import math

import numpy as np
from PIL import Image

PERCENTILES = (0.5, 99.5)
CT_WINDOW = (-1000.0, 1400.0)
MR_PERCENTILE = 99.5
INTENSITY_VERSION = "radpretrain-ingest-v1"
RESIZE_VERSION = "block-means-then-resize-v1"  # how stored images are shrunk (resize_max, resize_max_window)
_LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)


def to_stored(img01: np.ndarray, dtype=np.uint8) -> np.ndarray:
    """Scale a float image in [0, 1] to the store's integer dtype (rounded, clipped)."""
    info = np.iinfo(dtype)
    x = np.clip(np.asarray(img01, dtype=np.float32), 0.0, 1.0)  # a new array: safe to work in place
    x *= np.float32(info.max)
    np.rint(x, out=x)
    return x.astype(dtype)


def from_stored(arr: np.ndarray) -> np.ndarray:
    """Inverse of :func:`to_stored`: float32 in [0, 1]."""
    return arr.astype(np.float32) / np.float32(np.iinfo(arr.dtype).max)


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


SAMPLE_PIXELS = 1 << 16


def _sample(x: np.ndarray, max_n: int = SAMPLE_PIXELS) -> np.ndarray:
    """A regular subsample for fast statistics on large images (deterministic), flattened.

    Every ``s``-th row and column (``s = ceil(sqrt(size / max_n))``), so only the
    sampled rows are read from memory; images of at most ``max_n`` values are used whole.
    """
    x = np.asarray(x)
    if x.size <= max_n:
        return x.reshape(-1)
    if x.ndim >= 2:
        s = math.ceil(math.sqrt(x.size / max_n))
        return x[::s, ::s].reshape(-1)
    return x[:: max(1, x.size // max_n)]


def percentiles(values: np.ndarray, qs) -> np.ndarray:
    """``np.percentile(values, qs)`` (linear interpolation) by one sort: float64, one per ``q``.

    Sorting the subsample is several times faster than numpy's selection for the
    sample sizes used here; the interpolation is numpy's ``linear`` rule.
    """
    s = np.sort(np.asarray(values).reshape(-1))
    q = np.asarray(qs, dtype=np.float64).reshape(-1) / 100.0
    pos = q * (s.size - 1)
    i = np.clip(np.floor(pos).astype(np.intp), 0, s.size - 1)
    j = np.minimum(i + 1, s.size - 1)
    t = pos - i
    a, b = s[i].astype(np.float64), s[j].astype(np.float64)
    d = b - a
    return np.where(t < 0.5, a + d * t, b - d * (1.0 - t))


def percentile_window(x: np.ndarray, lo_pct: float = PERCENTILES[0], hi_pct: float = PERCENTILES[1]) -> np.ndarray:
    """Window between two percentiles of the image (robust to burnt-in text and collimation)."""
    s = _sample(np.asarray(x))
    s = s[np.isfinite(s)] if s.dtype.kind == "f" else s
    if s.size == 0:
        return np.zeros(np.shape(x), np.float32)
    lo, hi = percentiles(s, [lo_pct, hi_pct])
    if hi <= lo:  # very peaked histogram: fall back to the full range
        lo, hi = float(np.min(s)), float(np.max(s))
    return window(x, float(lo), float(hi))


def ct_window(hu: np.ndarray, lo: float = CT_WINDOW[0], hi: float = CT_WINDOW[1]) -> np.ndarray:
    return window(hu, lo, hi)


def mr_normalise(x: np.ndarray, pct: float = MR_PERCENTILE) -> np.ndarray:
    """Divide by the image's ``pct`` percentile; negatives clipped to 0."""
    s = _sample(np.asarray(x, dtype=np.float32))
    top = float(percentiles(s, [pct])[0]) if s.size else 0.0
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


def target_size(h: int, w: int, max_size: int) -> tuple[int, int]:
    """Size after shrinking so the longest side is ``max_size`` (aspect kept, rounded); never enlarges."""
    longest = max(h, w)
    if not max_size or longest <= max_size:
        return h, w
    scale = max_size / longest
    nh, nw = max(1, int(round(h * scale))), max(1, int(round(w * scale)))
    return min(nh, max_size), min(nw, max_size)


def shrink_factor(h: int, w: int, max_size: int) -> int:
    """Integer block size of the first, exact reduction step (1: none); the result stays >= the target."""
    longest = max(h, w)
    return longest // max_size if max_size and longest > max_size else 1


def _accumulators(dtype: np.dtype, f: int, value_range) -> tuple[np.dtype, np.dtype]:
    """Dtypes that hold exact sums of ``f`` values (first pass) and of ``f * f`` values (blocks)."""
    if dtype.kind == "f":
        acc = np.dtype(np.float64 if dtype.itemsize > 4 else np.float32)
        return acc, acc
    info = np.iinfo(dtype)
    lo, hi = (int(value_range[0]), int(value_range[1])) if value_range is not None else (info.min, info.max)
    mag = max(abs(lo), abs(hi), 1)
    kinds = (np.uint16, np.uint32, np.uint64) if dtype.kind == "u" else (np.int16, np.int32, np.int64)

    def pick(n: int, candidates) -> np.dtype:
        for t in candidates:
            if n * mag <= np.iinfo(t).max:
                return np.dtype(t)
        return np.dtype(np.float64)

    if f * f * mag < (1 << 24):  # block sums exact in float32: accumulate them there (no conversion pass)
        return pick(f, kinds if dtype.itemsize <= 2 else kinds[1:]), np.dtype(np.float32)
    return pick(f, kinds if dtype.itemsize <= 2 else kinds[1:]), pick(f * f, kinds[1:])


def _group_size(vdt: np.dtype, f: int, value_range, dtype: np.dtype) -> int:
    """How many sums of ``f`` values (first pass, 16-bit) can be added without leaving that dtype."""
    info = np.iinfo(dtype)
    lo, hi = (int(value_range[0]), int(value_range[1])) if value_range is not None else (info.min, info.max)
    return max(1, int(np.iinfo(vdt).max // (f * max(abs(lo), abs(hi), 1))))


def block_mean(x: np.ndarray, f: int, value_range=None) -> np.ndarray:
    """Means of ``f`` x ``f`` pixel blocks (integer-factor area reduction) as float32.

    The result has ``ceil(H / f)`` x ``ceil(W / f)`` pixels; blocks of the last
    row/column may be partial and average only the pixels they hold.  Integer
    pixels are summed exactly; ``value_range`` (their min, max), when known,
    lets 8/16-bit sums of a column of blocks stay 16-bit (half the memory traffic).
    """
    x = np.asarray(x)
    if x.ndim != 2:
        raise ValueError(f"block_mean: expected a 2-D image, got shape {x.shape}")
    if x.dtype == np.bool_:
        x = x.view(np.uint8)
    if f <= 1:
        return np.array(x, dtype=np.float32)
    vdt, _ = _accumulators(x.dtype, f, value_range)
    h, w = x.shape
    hq, hr = divmod(h, f)
    v = np.empty((hq + (hr > 0), w), vdt)
    if hq:  # sums of f rows (contiguous rows: one pass over the image)
        x[: hq * f].reshape(hq, f, w).sum(axis=1, dtype=vdt, out=v[:hq])
    if hr:
        x[hq * f :].sum(axis=0, dtype=vdt, out=v[hq])
    return _block_mean_rows(v, f, h, w, value_range, x.dtype)


def _block_mean_rows(v: np.ndarray, f: int, h: int, w: int, value_range, dtype: np.dtype) -> np.ndarray:
    """The second half of :func:`block_mean`: ``v`` holds the sums of each ``f`` rows of the image."""
    _, hdt = _accumulators(dtype, f, value_range)
    hr = h % f
    wq, wr = divmod(w, f)
    s = np.empty((v.shape[0], wq + (wr > 0)), hdt)
    if wq:  # sums of f columns of those: groups summed in the first pass's dtype while they fit, then widened
        body = s[:, :wq]
        g = _group_size(v.dtype, f, value_range, dtype) if v.dtype.itemsize == 2 else 1
        for k0 in range(0, f, g):
            part = v[:, k0 : wq * f : f]
            if g > 1 and k0 + 1 < f:
                part = part + v[:, k0 + 1 : wq * f : f]
                for k in range(k0 + 2, min(f, k0 + g)):
                    part += v[:, k : wq * f : f]
            if k0 == 0:
                np.copyto(body, part, casting="unsafe")
            else:
                np.add(body, part, out=body, casting="unsafe")
    if wr:
        v[:, wq * f :].sum(axis=1, dtype=hdt, out=s[:, wq])
    out = s if s.dtype == np.float32 else s.astype(np.float32)
    out *= np.float32(1.0 / (f * f))
    if hr:
        out[-1] *= np.float32(f / hr)
    if wr:
        out[:, -1] *= np.float32(f / wr)
    return out


_BAND_BYTES = 1 << 19  # rows per band of block_mean_checked: ~512 KiB, stays in the CPU cache


def block_mean_checked(x: np.ndarray, f: int, bound: tuple[int, int]):
    """``(block_mean(x, f), (min, max))`` of integer pixels in one pass over memory, or None.

    The image is read in bands of rows small enough to stay in the CPU cache;
    each band's extremes are measured, then its rows summed, so the pixels come
    from memory once.  ``bound`` (lo, hi): the values the pixels are expected to
    hold (it also sizes the sums); the first band with a value outside gives
    None.  ``min`` is measured for signed pixels only (None otherwise).
    Bit-identical to :func:`block_mean` (exact integer sums).
    """
    x = np.asarray(x)
    h, w = x.shape
    lo_ok, hi_ok = int(bound[0]), int(bound[1])
    signed = x.dtype.kind == "i"
    vdt, _ = _accumulators(x.dtype, f, (lo_ok, hi_ok))
    hq, hr = divmod(h, f)
    v = np.empty((hq + (hr > 0), w), vdt)
    step = max(1, _BAND_BYTES // max(1, f * w * x.itemsize)) * f
    lo = hi = None
    for r in range(0, h, step):
        band = x[r : r + step]
        bmax = int(band.max())
        bmin = int(band.min()) if signed else None
        if bmax > hi_ok or (signed and bmin < lo_ok):
            return None
        hi = bmax if hi is None or bmax > hi else hi
        if signed:
            lo = bmin if lo is None or bmin < lo else lo
        n, rest = divmod(band.shape[0], f)
        if n:
            band[: n * f].reshape(n, f, w).sum(axis=1, dtype=vdt, out=v[r // f : r // f + n])
        if rest:
            band[n * f :].sum(axis=0, dtype=vdt, out=v[r // f + n])
    return _block_mean_rows(v, f, h, w, (lo if signed else 0, hi), x.dtype), (lo, hi)


def _pil_resize(img: np.ndarray, nh: int, nw: int, resample, box=None) -> np.ndarray:
    """PIL resize of a float32 image (mapped into PIL without a copy) to (nh, nw), clipped to [0, 1]."""
    src = np.ascontiguousarray(img, dtype=np.float32)
    h, w = src.shape
    out = np.asarray(_float_image(src, w, h).resize((nw, nh), resample=resample, box=box), dtype=np.float32)
    return np.clip(out, 0.0, 1.0)


def _finish_resize(img: np.ndarray, nh: int, nw: int, f: int, full: tuple[int, int]) -> np.ndarray:
    """The exact target size (nh, nw) from ``img``, the image of size ``full`` or its ``f`` x ``f`` block means.

    ``f == 1``: one PIL ``BOX`` resize (area averaging).  ``f > 1``: block means
    of the target size are the result (their last row/column may be partial
    blocks: the grid then sits up to one block-fraction off at that edge, < 1
    stored pixel); otherwise an antialiased ``BILINEAR`` resize that reads them
    as covering ``full / f`` pixels, so the geometry is that of the full image.
    """
    h, w = img.shape
    if (h, w) == (nh, nw):  # block means (a new array: clipped in place)
        return np.clip(img, 0.0, 1.0, out=img if f > 1 else None)
    if f > 1:
        return _pil_resize(img, nh, nw, Image.Resampling.BILINEAR, box=(0.0, 0.0, full[1] / f, full[0] / f))
    return _pil_resize(img, nh, nw, Image.Resampling.BOX)


def resize_max(img01: np.ndarray, max_size: int) -> np.ndarray:
    """Shrink a [0, 1] image so the longest side is <= ``max_size`` (aspect kept, area averaging); never enlarges.

    Smaller than twice the target: one PIL ``BOX`` resize.  Larger: block means
    of ``f = longest // max_size`` pixels first, then to the exact size
    (:func:`_finish_resize`).
    """
    h, w = img01.shape
    if not max_size or max(h, w) <= max_size:
        return np.asarray(img01, dtype=np.float32)
    nh, nw = target_size(h, w, max_size)
    f = shrink_factor(h, w, max_size)
    return _finish_resize(block_mean(img01, f) if f > 1 else img01, nh, nw, f, (h, w))


def resize_max_window(raw: np.ndarray, a: float, b: float, max_size: int, value_range=None,
                      means: np.ndarray | None = None) -> np.ndarray:
    """``clip(a * raw + b, 0, 1)`` shrunk like :func:`resize_max`, with the block means taken on ``raw``.

    Pixels stay raw until the image is small: block means of the raw values,
    then the window (:func:`affine_clip`), then the exact size (:func:`_finish_resize`).  Equal
    to ``resize_max(affine_clip(raw, a, b), max_size)`` up to the order of
    averaging and clipping (they differ only where a block straddles the
    window's ends).  ``value_range``: bounds of ``raw`` when known; ``means``:
    ``block_mean(raw, shrink_factor(...))`` when already made (it is not modified).
    """
    h, w = raw.shape
    if not max_size or max(h, w) <= max_size:
        return affine_clip(raw, a, b)
    nh, nw = target_size(h, w, max_size)
    f = shrink_factor(h, w, max_size)
    if f == 1:
        return _finish_resize(affine_clip(raw, a, b), nh, nw, f, (h, w))
    if means is not None:
        return _finish_resize(affine_clip(means, a, b), nh, nw, f, (h, w))
    small = block_mean(raw, f, value_range)  # a new float32 array: the window is applied in place
    small *= np.float32(a)  # the steps of affine_clip
    small += np.float32(b)
    np.clip(small, 0.0, 1.0, out=small)
    return _finish_resize(small, nh, nw, f, (h, w))


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
