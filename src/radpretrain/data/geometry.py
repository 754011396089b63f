"""Letterbox and resize: one geometry, two resampling kernels (Pillow in loader workers, batched torch on the device).

The letterbox geometry is :func:`fit_size`: the image keeps its aspect ratio, its longest side
(relative to the target) fits, it is centred and the rest is padded with 0 (``valid`` False).
Every resize in the package follows it: :class:`~radpretrain.data.dataset.StoreDataset`,
aspect-ratio buckets, evaluation, export's preprocessing.

Two kernels resample the pixels, and both compute Pillow's antialiased bilinear filter with
``reducing_gap=2`` (Pillow 13, ``Image.resize``):

1. **In the loader** (:func:`letterbox`, :func:`letterbox_array`, :func:`resize_array`): Pillow
   on the stored ``uint8`` pixels, in the data-loader workers.  The CPU path, unchanged.
2. **On the device** (:func:`prepare_for_device` in the worker, :func:`letterbox_batch` on the
   training device): the worker only applies Pillow's integer box reduction (``Image.reduce``,
   which ``reducing_gap`` does first when the image is at least 4x the target; cheap, and it
   shrinks what is sent to the GPU) and hands over the ``uint8`` pixels; the device resamples the
   whole batch at once as two batched matrix products ``W_y @ X @ W_x^T`` whose rows are Pillow's
   triangle-filter coefficients (support scaled by the reduction factor when downscaling: that is
   the antialiasing) for the letterbox placement of each image; rows outside the placement are
   zero, which is the padding.

Tolerance between the two: the device kernel computes in float32 without Pillow's 8-bit rounding
(Pillow rounds to ``uint8`` after the horizontal pass and after the vertical pass; its fixed-point
coefficients have 22 fractional bits), so each output pixel differs by at most ``1/255`` (half a
grey level per pass, each pass a convex combination) and the masks are identical
(``tests/data/test_geometry.py`` checks both on random images of many sizes, with and without
the reduction).  Not the same as ``torch.nn.functional.interpolate(antialias=True)`` on a
reduced image only in how Pillow's box after ``reduce`` is fractional; here it is followed exactly.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

# Pillow's resize(reducing_gap=...) as StoreDataset calls it: a box reduce() first for big reductions
REDUCING_GAP = 2.0
# columns of the per-image geometry vector of a deferred (device-side) letterbox
GEOMETRY_FIELDS = ("in_h", "in_w", "box_h", "box_w", "new_h", "new_w", "top", "left", "out_h", "out_w")


# -- geometry ---------------------------------------------------------------------------------
def as_hw(size) -> tuple[int, int]:
    """``(h, w)`` of an int S (square) or an (h, w) pair; both positive."""
    if isinstance(size, (tuple, list)):
        h, w = int(size[0]), int(size[1])
    else:
        h = w = int(size)
    if h < 1 or w < 1:
        raise ValueError(f"target size must be positive, got {size!r}")
    return h, w


def fit_size(h: int, w: int, target) -> tuple[int, int, int, int]:
    """Letterbox geometry: ``(new_h, new_w, top, left)`` fitting (h, w) inside ``target`` keeping the aspect ratio."""
    th, tw = as_hw(target)
    scale = min(th / h, tw / w)
    nh = min(th, max(1, int(round(h * scale))))
    nw = min(tw, max(1, int(round(w * scale))))
    return nh, nw, (th - nh) // 2, (tw - nw) // 2


def reduce_factors(h: int, w: int, new_h: int, new_w: int, gap: float = REDUCING_GAP) -> tuple[int, int]:
    """Pillow's ``reducing_gap`` box-reduction factors ``(fy, fx)`` for resizing (h, w) to (new_h, new_w)."""
    return (int(h / new_h / gap) or 1), (int(w / new_w / gap) or 1)


# -- the loader kernel (Pillow) ----------------------------------------------------------------
def to_pil(img: np.ndarray) -> tuple[Image.Image, bool]:
    """A Pillow image of ``img`` and whether it is 8-bit (else 32-bit float in [0, 1])."""
    if img.dtype == np.uint8:
        return Image.fromarray(np.ascontiguousarray(img), mode="L"), True
    if np.issubdtype(img.dtype, np.integer):
        f = img.astype(np.float32) / np.float32(np.iinfo(img.dtype).max)
    else:
        f = img.astype(np.float32, copy=False)
    return Image.fromarray(np.ascontiguousarray(f), mode="F"), False


def to_float01(img: np.ndarray) -> np.ndarray:
    """float32 in [0, 1]: uint8 / 255, other integers / their maximum, floats clipped."""
    if img.dtype == np.uint8:
        return img.astype(np.float32) * np.float32(1 / 255)
    if np.issubdtype(img.dtype, np.integer):
        return img.astype(np.float32) / np.float32(np.iinfo(img.dtype).max)
    return np.clip(img.astype(np.float32, copy=False), 0.0, 1.0)


def resize_array(img: np.ndarray, h: int, w: int) -> np.ndarray:
    """Antialiased bilinear resize to (h, w); returns uint8 for uint8 input, else float32 in [0, 1]."""
    if img.shape == (h, w):
        return np.array(img) if img.dtype == np.uint8 else to_float01(img)
    pil, is8 = to_pil(img)
    # reducing_gap: a box reduce() first for big reductions (~2x faster, as Image.thumbnail does)
    out = np.array(pil.resize((w, h), Image.BILINEAR, reducing_gap=REDUCING_GAP))  # writable copy for torch
    return out if is8 else np.clip(out, 0.0, 1.0)


def squeeze2d(img) -> np.ndarray:
    """A 2-D array from a grey image (tensor or array; leading axes of size 1 allowed)."""
    if isinstance(img, torch.Tensor):
        img = img.detach().cpu().numpy()
    a = np.asarray(img)
    while a.ndim > 2 and a.shape[0] == 1:
        a = a[0]
    if a.ndim != 2 or a.size == 0:
        raise ValueError(f"expected a non-empty 2-D grey image, got shape {a.shape}")
    return a


def letterbox_array(img: np.ndarray, target) -> tuple[np.ndarray, np.ndarray]:
    """Like :func:`letterbox` but keeps ``uint8`` input as ``uint8`` (converted later, faster)."""
    th, tw = as_hw(target)
    h, w = img.shape
    nh, nw, top, left = fit_size(h, w, (th, tw))
    small = resize_array(img, nh, nw)
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
    a = squeeze2d(img)
    canvas, valid = letterbox_array(a, size)
    return to_float01(canvas), valid


def stretch(img, size) -> tuple[np.ndarray, np.ndarray]:
    """Resize to ``size`` ignoring the aspect ratio; returns ``(img01, valid)`` (valid all True)."""
    a = squeeze2d(img)
    th, tw = as_hw(size)
    return to_float01(resize_array(a, th, tw)), np.ones((th, tw), dtype=bool)


# -- the device kernel (batched torch) ----------------------------------------------------------
def prepare_for_device(img: np.ndarray, target, keep_aspect: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Worker side of the device letterbox: ``(pixels, geometry)`` for :func:`letterbox_batch`.

    ``pixels`` are the stored pixels (``uint8`` stays ``uint8``), box-reduced by Pillow exactly as
    ``Image.resize(reducing_gap=2)`` would before resampling; ``geometry`` is a float64 vector
    with :data:`GEOMETRY_FIELDS`.  ``keep_aspect=False`` gives the stretch geometry.
    """
    th, tw = as_hw(target)
    h, w = img.shape
    nh, nw, top, left = fit_size(h, w, (th, tw)) if keep_aspect else (th, tw, 0, 0)
    box_h, box_w = float(h), float(w)
    fy, fx = reduce_factors(h, w, nh, nw)
    if (h, w) != (nh, nw) and (fy > 1 or fx > 1):
        pil, is8 = to_pil(img)
        img = np.asarray(pil.reduce((fx, fy)))
        box_h, box_w = h / fy, w / fx  # Pillow resamples this (fractional) box of the reduced image
    elif img.dtype != np.uint8 and not np.issubdtype(img.dtype, np.floating):
        img = to_float01(img)
    geom = np.array([img.shape[0], img.shape[1], box_h, box_w, nh, nw, top, left, th, tw], dtype=np.float64)
    return np.ascontiguousarray(img), geom


def resample_weights(in_len: torch.Tensor, box_len: torch.Tensor, new_len: torch.Tensor, offset: torch.Tensor,
                     out_len: int, max_in: int) -> torch.Tensor:
    """Per-image resampling matrices ``[B, out_len, max_in]`` (float32) of Pillow's antialiased bilinear filter.

    Output row ``offset + i`` (``0 <= i < new_len``) holds the normalised triangle-filter weights of
    input samples ``j < in_len`` for output sample ``i`` of resizing the box ``[0, box_len)`` to
    ``new_len`` samples (Pillow's ``precompute_coeffs``: centre ``(i + 0.5) * scale``, support and
    filter width ``max(scale, 1)``); every other row is zero (letterbox padding).
    """
    dev = in_len.device
    box = box_len.to(torch.float64)
    new = new_len.to(torch.float64)
    scale = box / new  # [B]
    fscale = scale.clamp(min=1.0)
    i = torch.arange(out_len, device=dev, dtype=torch.float64)[None, :] - offset.to(torch.float64)[:, None]  # [B, O]
    inside = (i >= 0) & (i < new[:, None])
    # filter argument (j + 0.5 - centre) / filterscale = j / fs - (centre - 0.5) / fs: the per-row part in
    # float64, the [B, O, I] part in float32 (error ~1e-5 of a weight, far below the 1/255 tolerance)
    shift = (((i + 0.5) * scale[:, None] - 0.5) / fscale[:, None]).to(torch.float32)  # [B, O]
    j = torch.arange(max_in, device=dev, dtype=torch.float32)
    jn = j[None, :] / fscale.to(torch.float32)[:, None]  # [B, I]
    wts = (1.0 - (jn[:, None, :] - shift[:, :, None]).abs()).clamp_(min=0.0)
    wts.mul_(((j[None, :] < in_len[:, None]).to(torch.float32))[:, None, :])
    wts.mul_(inside.to(torch.float32)[:, :, None])
    norm = wts.sum(-1, keepdim=True)
    return wts.div_(norm.clamp(min=1e-12))


def letterbox_batch(pixels: torch.Tensor, geometry: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Letterbox a batch on its device: ``(image float32 [B, 1, H, W] in [0, 1], valid bool [B, 1, H, W])``.

    ``pixels``: [B, 1, Hm, Wm] (or [B, Hm, Wm]) stored pixels from :func:`prepare_for_device`,
    zero-padded to the batch's largest; ``geometry``: [B, 10] (:data:`GEOMETRY_FIELDS`), one output
    shape per batch.  Matches :func:`letterbox` to within 1/255 per pixel (see the module docstring).
    """
    x = pixels[:, 0] if pixels.dim() == 4 else pixels
    g = geometry.to(device=x.device, dtype=torch.float64)
    out_hw = g[:, 8:10]
    if bool((out_hw != out_hw[:1]).any()):
        raise ValueError("letterbox_batch: all images of a batch must have the same output shape")
    th, tw = int(out_hw[0, 0]), int(out_hw[0, 1])
    if x.dtype == torch.uint8:
        unit = 1.0 / 255.0
    elif x.is_floating_point():
        unit = 1.0
    else:
        raise TypeError(f"letterbox_batch: pixels must be uint8 or float, got {x.dtype}")
    lens = g.round().long()
    wy = resample_weights(lens[:, 0], g[:, 2], lens[:, 4], lens[:, 6], th, x.shape[1])
    wx = resample_weights(lens[:, 1], g[:, 3], lens[:, 5], lens[:, 7], tw, x.shape[2])
    xf = x.to(torch.float32)
    # two passes in full float32 (no TF32 / bf16, which would cost the 1/255 tolerance); the order of the
    # passes does not matter without rounding in between (Pillow: horizontal, round, vertical, round)
    img = torch.bmm(torch.bmm(wy, xf), wx.transpose(1, 2))
    img = (img * unit).clamp_(0.0, 1.0)
    rows = torch.arange(th, device=x.device)[None, :]
    cols = torch.arange(tw, device=x.device)[None, :]
    vr = (rows >= lens[:, 6:7]) & (rows < lens[:, 6:7] + lens[:, 4:5])  # [B, H]
    vc = (cols >= lens[:, 7:8]) & (cols < lens[:, 7:8] + lens[:, 5:6])  # [B, W]
    valid = vr[:, :, None] & vc[:, None, :]
    return img[:, None], valid[:, None]


def collate_deferred(samples: list[dict]) -> dict:
    """Collate items of a deferred-resize dataset: ``pixels`` padded to the batch's largest
    [B, 1, Hm, Wm] (store dtype), ``geometry`` stacked [B, 10], everything else as torch's default."""
    hm = max(int(s["pixels"].shape[-2]) for s in samples)
    wm = max(int(s["pixels"].shape[-1]) for s in samples)
    first = samples[0]["pixels"]
    shape = (len(samples), 1, hm, wm)
    # in a loader worker the batch goes to shared memory straight away (as torch's default_collate
    # does), saving a copy; integer padding is never read (its resampling weights are 0), so it is
    # left uninitialised; float padding is zeroed (0 x NaN would be NaN)
    in_worker = torch.utils.data.get_worker_info() is not None
    out = torch.empty(shape, dtype=first.dtype)
    if in_worker:
        out.share_memory_()
    if first.is_floating_point():
        out.zero_()
    for k, s in enumerate(samples):
        p = s["pixels"]
        out[k, 0, : p.shape[-2], : p.shape[-1]] = p.reshape(p.shape[-2], p.shape[-1])
    rest = [{k: v for k, v in s.items() if k not in ("pixels", "geometry")} for s in samples]
    batch = torch.utils.data.default_collate(rest)
    batch["pixels"] = out
    batch["geometry"] = torch.stack([torch.as_tensor(s["geometry"], dtype=torch.float64) for s in samples])
    return batch


def finish_batch(batch):
    """A deferred batch (``pixels`` + ``geometry``, on any device) with ``image`` and ``valid`` added by
    :func:`letterbox_batch` there and the stored pixels dropped; any other batch unchanged."""
    if not (isinstance(batch, dict) and "pixels" in batch and "geometry" in batch):
        return batch
    out = {k: v for k, v in batch.items() if k not in ("pixels", "geometry")}
    out["image"], out["valid"] = letterbox_batch(batch["pixels"], batch["geometry"])
    return out


__all__ = ["GEOMETRY_FIELDS", "REDUCING_GAP", "as_hw", "collate_deferred", "finish_batch", "fit_size", "letterbox",
           "letterbox_array", "letterbox_batch", "prepare_for_device", "reduce_factors", "resample_weights",
           "resize_array", "squeeze2d", "stretch", "to_float01", "to_pil"]
