"""Readers: recognise a file by its content and decode it to a [0, 1] image plus metadata.

:func:`load_image` is the one entry point shared by ``ingest`` and the exported
encoders' preprocessing, so training and inference see the same intensities
(rules in :mod:`radpretrain.data.intensity`).

Reading problems raise :class:`ReadError` whose ``reason`` is one of a fixed
vocabulary (:data:`REASONS`); its text never contains header values or paths.
The ``meta`` dict may hold raw identifiers (``patient_id``, ``study_uid``,
``series_uid``) in memory for pseudonymisation; callers must never write them.
"""

from __future__ import annotations

import functools
import logging
import mmap
import os
import struct
import sys
import warnings
import zipfile
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import xxhash
from PIL import Image, ImageOps, UnidentifiedImageError

from radpretrain.data import intensity as I
from radpretrain.data.deid import dicom_age
from radpretrain.data.intensity import to_stored
from radpretrain.data.vocab import normalise_body_part, normalise_modality, normalise_sex, normalise_view

SIDECAR_EXTS = {".csv", ".json", ".txt", ".md", ".xml", ".html", ".htm", ".tsv", ".yaml", ".yml"}
IMAGE_KINDS = ("png", "jpeg", "tiff")
REASONS = (
    "unreadable", "not_dicom_or_image", "no_pixel_data", "unsupported_transfer_syntax",
    "decode_error", "blank", "too_small", "empty_file", "pixel_length",
)


class ReadError(Exception):
    """A file that cannot become an image; ``reason`` is one of :data:`REASONS`."""

    def __init__(self, reason: str):
        assert reason in REASONS, reason
        self.reason = reason
        super().__init__(reason)


# ----------------------------------------------------------------------------- sniffing

SNIFF_BYTES = 352


def sniff(path: str | Path, head: bytes | None = None) -> str:
    """Kind of a file by its content: dicom, png, jpeg, tiff, nifti, npz, sidecar or unknown.

    DICOM is recognised by the 'DICM' magic after the 128-byte preamble, or, for
    files written without preamble, by a first element in group 0002/0008 that
    pydicom then parses.  Extensions only matter for NIfTI/NPZ containers
    and for sidecars (.csv/.json/.txt/... that are not DICOM by content).
    ``head``: the file's first :data:`SNIFF_BYTES` bytes when the caller has read them.
    """
    if head is None:
        try:
            with open(path, "rb") as f:
                head = f.read(SNIFF_BYTES)
        except OSError:
            return "unreadable"
    if not head:
        return "empty"
    if len(head) >= 132 and head[128:132] == b"DICM":
        return "dicom"
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "png"
    if head.startswith(b"\xff\xd8\xff"):
        return "jpeg"
    if head[:4] in (b"II*\x00", b"MM\x00*"):
        return "tiff"
    name = os.path.basename(str(path)).lower()
    if head.startswith(b"\x1f\x8b") and name.endswith(".nii.gz"):
        return "nifti"
    if name.endswith(".nii") and len(head) >= 348 and struct.unpack("<i", head[:4])[0] in (348, 540):
        return "nifti"
    if head.startswith(b"PK\x03\x04") and name.endswith(".npz"):
        return "npz"
    if len(head) >= 8 and _looks_like_raw_dicom(head) and _parses_as_dicom(path):
        return "dicom"
    if os.path.splitext(name)[1] in SIDECAR_EXTS:
        return "sidecar"
    return "unknown"


def _looks_like_raw_dicom(head: bytes) -> bool:
    group_le = struct.unpack("<H", head[:2])[0]
    group_be = struct.unpack(">H", head[:2])[0]
    groups = (0x0002, 0x0004, 0x0008, 0x0010, 0x0018, 0x0020, 0x0028)
    return group_le in groups or group_be in groups


@contextmanager
def quiet_pydicom():
    """Keep pydicom's warnings and log records (which may quote header values) off the console."""
    logger = logging.getLogger("pydicom")
    old_handlers, old_prop = logger.handlers[:], logger.propagate
    logger.handlers = [logging.NullHandler()]
    logger.propagate = False
    try:
        with warnings.catch_warnings(record=True):
            yield
    finally:
        logger.handlers, logger.propagate = old_handlers, old_prop


def _parses_as_dicom(path: Path) -> bool:
    import pydicom  # heavy (pydicom): only when DICOM is read

    try:
        with quiet_pydicom():
            ds = pydicom.dcmread(path, force=True, stop_before_pixels=True)
        return len(ds) > 0 and any(tag.group in (0x0008, 0x0010, 0x0020, 0x0028) for tag in ds.keys())
    except Exception:
        return False


# ----------------------------------------------------------------------------- DICOM

def content_hash(arr: np.ndarray) -> str:
    """XXH3-128 of decoded pixels (dtype and shape included, so equal bytes of other shapes differ), 32 hex chars.

    It finds duplicate images: 128 bits make an accidental collision negligible (about 1e-27 for
    10^6 images) at ~1.5 µs for a 224 x 224 image (SHA-256 took ~50 µs, 5-10 % of ingesting a small
    JPEG).  It is not a cryptographic hash: do not use it to detect deliberate tampering.
    """
    a = np.ascontiguousarray(arr)
    h = xxhash.xxh3_128(f"{a.dtype.str}{a.shape}".encode())
    h.update(a.data)
    return h.hexdigest()


DEFER_BYTES = 1 << 20  # DICOM values larger than this stay in the file until used (pixel data: mapped, not copied)


def read_dicom(path_or_ds, stop_before_pixels: bool = False):
    """A pydicom Dataset read from a path (values over :data:`DEFER_BYTES` read only when used)."""
    import pydicom  # heavy (pydicom): only when DICOM is read
    from pydicom.errors import InvalidDicomError

    if isinstance(path_or_ds, pydicom.Dataset):
        return path_or_ds
    defer = DEFER_BYTES if isinstance(path_or_ds, (str, os.PathLike)) and not stop_before_pixels else None
    try:
        with quiet_pydicom():
            ds = pydicom.dcmread(path_or_ds, force=True, stop_before_pixels=stop_before_pixels, defer_size=defer)
            _ensure_transfer_syntax(ds)
            return ds
    except InvalidDicomError:
        raise ReadError("not_dicom_or_image") from None
    except Exception:
        raise ReadError("unreadable") from None


def _ensure_transfer_syntax(ds) -> None:
    """Files written without file meta (no preamble): record the encoding they were read with."""
    from pydicom.dataset import FileMetaDataset  # heavy (pydicom): only when DICOM is read
    from pydicom.uid import ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

    meta = getattr(ds, "file_meta", None)
    if meta is not None and "TransferSyntaxUID" in meta:
        return
    implicit, little = getattr(ds, "original_encoding", (None, None))
    if implicit is None:
        return
    if meta is None:
        ds.file_meta = meta = FileMetaDataset()
    meta.TransferSyntaxUID = (ImplicitVRLittleEndian if implicit else
                              ExplicitVRLittleEndian if little else ExplicitVRBigEndian)


def dicom_meta(ds) -> dict:
    """Normalised facts plus raw identifiers (in memory only) from a DICOM header."""
    desc = [ds.get(k) for k in ("StudyDescription", "SeriesDescription", "ProtocolName", "RequestedProcedureDescription")]
    return {
        "source_format": "dicom",
        "modality": normalise_modality(ds.get("Modality")),
        "modality_raw": str(ds.get("Modality") or "").upper(),
        "body_part": normalise_body_part(ds.get("BodyPartExamined"), *desc),
        "body_part_raw": str(ds.get("BodyPartExamined") or ""),  # in memory only (free text)
        "view": normalise_view(ds.get("ViewPosition"), *desc),
        "sex": normalise_sex(ds.get("PatientSex")),
        "age_years": dicom_age(ds),
        "photometric": str(ds.get("PhotometricInterpretation") or ""),
        "n_frames": int(ds.get("NumberOfFrames") or 1) if str(ds.get("NumberOfFrames") or "1").strip().isdigit() else 1,
        "patient_id": str(ds.get("PatientID") or "").strip(),
        "study_uid": str(ds.get("StudyInstanceUID") or "").strip(),
        "series_uid": str(ds.get("SeriesInstanceUID") or "").strip(),
    }


def _decode_frame(ds, frame: int, stats: dict | None = None, max_size: int | None = None) -> np.ndarray:
    """Frame ``frame`` of the pixel data: exactly ``pydicom.pixels.pixel_array(ds, index=frame)``.

    Uncompressed grey data is returned as a read-only view of the dataset's
    pixel bytes when that gives the same values (no copy, see :func:`_native_grey_view`).
    ``stats``: receives ``raw_min``/``raw_max`` when they were measured on the way, and
    ``block_means`` when ``max_size`` (the size the image will be stored at) asks for them.
    """
    from pydicom.pixels import pixel_array  # heavy (pydicom): only when DICOM is read

    if not any(k in ds for k in ("PixelData", "FloatPixelData", "DoubleFloatPixelData")):
        raise ReadError("no_pixel_data")
    tsyntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    _check_pixel_length(ds, tsyntax)
    try:
        with quiet_pydicom():
            if _native_grey(ds, tsyntax):
                return _native_grey_view(ds, frame, stats, max_size)
            return pixel_array(ds, index=frame)
    except ReadError:
        raise
    except (NotImplementedError, RuntimeError) as e:
        text = str(e).lower()
        if "transfer syntax" in text or "plugin" in text or "handler" in text or "no decoders" in text:
            raise ReadError("unsupported_transfer_syntax") from None
        raise ReadError("decode_error") from None
    except Exception:
        if tsyntax is None:
            raise ReadError("unreadable") from None
        raise ReadError("decode_error") from None


def _check_pixel_length(ds, tsyntax) -> None:
    """Uncompressed pixel data must be as long as its header says (Rows x Columns x samples x bits x frames,
    plus DICOM's even-length padding byte): else ``ReadError('pixel_length')``.

    A wrong Rows, Columns, bit depth or frame count would otherwise give a cut or scrambled image (pydicom
    reads the first part of longer data).  Extra bytes that are all zero are padding and are accepted.
    Compressed data is left to its decoder (a mismatch there is a ``decode_error``); a file cut short
    inside its pixel data is left to the reader too (``decode_error``).
    """
    from pydicom.pixels.utils import get_expected_length  # heavy (pydicom): only when DICOM is read

    if tsyntax is None or tsyntax.is_encapsulated or "PixelData" not in ds:
        return
    try:
        expected = int(get_expected_length(ds, "bytes"))
        el = ds.get_item(0x7FE00010, keep_deferred=True)
        declared = getattr(el, "length", None)  # a raw element's declared length (the file's, even if cut short)
        if declared is None:  # an element made in memory: its value
            declared = len(ds.PixelData)
    except Exception:  # a header too broken to say: the decoder reports it
        return
    if declared == 0xFFFFFFFF or declared in (expected, expected + expected % 2):
        return
    if declared < expected or not _zero_tail(ds, el, expected, declared):
        raise ReadError("pixel_length")


def _zero_tail(ds, el, start: int, stop: int) -> bool:
    """Whether bytes ``start:stop`` of the pixel data element ``el`` are all zero (read from the file when the
    value was left there); a file too short for them counts as not zero."""
    value = getattr(el, "value", None)
    if value is not None:
        tail = bytes(value[start:stop])
        return len(tail) == stop - start and not any(tail)
    try:
        with open(ds.filename, "rb") as f:
            f.seek(int(el.value_tell) + start)
            left = stop - start
            while left:
                block = f.read(min(left, 1 << 20))
                if not block or any(block):
                    return False
                left -= len(block)
        return True
    except (AttributeError, OSError, TypeError, ValueError):
        return False


def _native_grey(ds, tsyntax) -> bool:
    """Uncompressed, one sample of 8 or 16 bits, MONOCHROME: pixel_array's values are the bytes themselves."""
    try:
        return (tsyntax is not None and not tsyntax.is_encapsulated and "PixelData" in ds
                and int(ds.get("SamplesPerPixel") or 1) == 1 and int(ds.get("BitsAllocated") or 0) in (8, 16)
                and str(ds.get("PhotometricInterpretation") or "").upper() in ("MONOCHROME1", "MONOCHROME2"))
    except (TypeError, ValueError):
        return False


def _native_grey_view(ds, frame: int, stats: dict | None, max_size: int | None = None) -> np.ndarray:
    """pixel_array's frame without its defensive copy: a read-only view of the pixel bytes.

    pydicom masks the bits above Bits Stored (sign-extends signed pixels) by
    shifting a copy; that changes nothing when every value already lies in the
    Bits Stored range, which one pass over the pixels checks (the extremes are
    kept in ``stats``); otherwise the same correction is applied to a copy.
    With ``max_size`` and an image at least twice that size, the same pass also
    sums the blocks of the first resize step (``stats["block_means"] = (f, means)``,
    :func:`intensity.block_mean_checked`), so the pixels are read from memory once.
    """
    from pydicom.pixels import pixel_array  # heavy (pydicom): only when DICOM is read

    arr = _mapped_frame(ds, frame)
    if arr is None:
        arr = pixel_array(ds, index=frame, view_only=True, correct_unused_bits=False)
    if arr.dtype.kind not in "ui" or arr.size == 0:
        return pixel_array(ds, index=frame)
    bits, allocated = int(ds.get("BitsStored") or 0), arr.dtype.itemsize * 8
    if 0 < bits < allocated:
        signed = arr.dtype.kind == "i"
        first, last = (-(1 << (bits - 1)), (1 << (bits - 1)) - 1) if signed else (0, (1 << bits) - 1)
        f = I.shrink_factor(*arr.shape, max_size) if max_size and arr.ndim == 2 else 1
        fused = I.block_mean_checked(arr, f, (first, last)) if f > 1 else None
        if fused is not None:
            means, ext = fused
            if stats is not None:
                stats["block_means"] = (f, means)
        else:
            ext = _extremes(arr)
            if (signed and ext[0] < first) or ext[1] > last:  # unused bits set: pydicom's correction
                arr = arr.copy()
                np.left_shift(arr, allocated - bits, out=arr)
                np.right_shift(arr, allocated - bits, out=arr)
                ext = _extremes(arr)
        if stats is not None:
            stats["raw_min"], stats["raw_max"] = ext
    return arr


def _mapped_frame(ds, frame: int) -> np.ndarray | None:
    """The frame mapped read-only from the file when the pixel data was left there (:func:`read_dicom`), else None.

    Little-endian native data only: the bytes are the pixel values (what
    pydicom's native decoder views), so mapping the file's pages replaces
    copying them into memory.  A file too short for its frames gives None
    (pydicom then reports the problem).
    """
    from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian  # heavy (pydicom): only when DICOM is read

    try:
        el = ds.get_item(0x7FE00010, keep_deferred=True)
        if el is None or getattr(el, "value", 0) is not None or not getattr(ds, "filename", None):
            return None
        if ds.file_meta.TransferSyntaxUID not in (ExplicitVRLittleEndian, ImplicitVRLittleEndian):
            return None
        rows, cols = int(ds.Rows), int(ds.Columns)
        itemsize = int(ds.BitsAllocated) // 8
        frames = int(ds.get("NumberOfFrames") or 1)
        frame_bytes = rows * cols * itemsize
        if not (0 <= frame < frames) or el.length < frames * frame_bytes or frame_bytes == 0:
            return None
        dtype = np.dtype(f"<{'i' if int(ds.get('PixelRepresentation') or 0) else 'u'}{itemsize}")
        offset = int(el.value_tell) + frame * frame_bytes
        with open(ds.filename, "rb") as fh:
            if os.fstat(fh.fileno()).st_size < offset + frame_bytes:
                return None
            mapped = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
        return np.frombuffer(mapped, dtype, count=rows * cols, offset=offset).reshape(rows, cols)
    except (AttributeError, KeyError, TypeError, ValueError, OSError):
        return None


def _extremes(arr: np.ndarray) -> tuple[int | None, int]:
    """(min, max) of integer pixels; the min of unsigned pixels is not measured (None): one pass fewer."""
    return (None if arr.dtype.kind == "u" else int(arr.min())), int(arr.max())


def _dicom_unit(arr: np.ndarray, ds, *, ct_window, mr_percentile, frame: int, stats: dict):
    """``(img01, None)`` or, for a window-like transfer of grey integer pixels, ``(None, (a, b))``
    meaning ``img01 == intensity.affine_clip(arr, a, b)`` (not computed: callers may shrink ``arr`` first).

    ``stats``: ``raw_max`` (and ``raw_min`` of signed or possibly blank images) of ``arr``,
    measured here if missing; with ``(a, b)``, ``value_range`` (bounds of ``arr``) and either
    ``range01`` (the float32 min and max of ``img01``) or ``blank = False``.
    """
    from pydicom.pixels import apply_color_lut  # heavy (pydicom): only when DICOM is read

    photometric = str(ds.get("PhotometricInterpretation") or "MONOCHROME2").upper()
    if photometric == "PALETTE COLOR":
        arr = apply_color_lut(arr, ds)
        top = float(np.max(arr)) if arr.size else 0
        grey = I.to_grey(arr)
        return I.window(grey, 0, 255 if top <= 255 else 65535), None
    if arr.ndim == 3:  # colour (pydicom already converted YBR to RGB)
        grey = I.to_grey(arr)
        return (I.window(grey, 0, 255) if arr.dtype == np.uint8 or int(ds.get("BitsStored") or 8) <= 8
                else I.percentile_window(grey)), None
    smp = I._sample(arr)
    transfer = grey_transfer(arr, ds, ct_window=ct_window, mr_percentile=mr_percentile, frame=frame, sample=smp)
    if arr.dtype.kind in "ui" and arr.dtype.itemsize <= 2 and arr.size > (1 << 16):
        if stats.get("raw_max") is None:
            stats["raw_min"], stats["raw_max"] = _extremes(arr)
        lo = 0 if arr.dtype.kind == "u" else stats["raw_min"]
        hi = stats["raw_max"]
        # the transfer of every value the image can hold (lo..max): a window when it is clip(a * x + b)
        values = np.arange(lo, hi + 1, dtype=np.int32)
        affine = I.affine_of(values, transfer(values).astype(np.float32, copy=False))
        if affine is not None:
            stats["value_range"] = (lo, hi)
            # monotonic: the result's extremes are the transfer of the raw extremes (same float32 steps);
            # a subsample whose values already span a grey level shows the image is not blank
            ends = I.affine_clip_values([smp.min(), smp.max()], *affine)
            if I.is_blank_range(ends.min(), ends.max()):
                stats["raw_min"], stats["raw_max"] = int(arr.min()), hi
                ends = I.affine_clip_values([stats["raw_min"], hi], *affine)
                stats["range01"] = (float(ends.min()), float(ends.max()))
            else:
                stats["blank"] = False
            return None, affine
        # any other transfer: a lookup table of every value the dtype can hold, in the order of its
        # unsigned view (so the view indexes the table): one gather over the image
        unsigned = np.dtype(f"u{arr.dtype.itemsize}")
        every = np.arange(np.iinfo(unsigned).max + 1, dtype=np.int64).astype(unsigned).view(arr.dtype)
        lut = transfer(every.astype(np.int32)).astype(np.float32, copy=False)
        return np.take(lut, arr.view(unsigned)), None
    return transfer(arr).astype(np.float32, copy=False), None


def dicom_to_unit(arr: np.ndarray, ds, *, ct_window=I.CT_WINDOW, mr_percentile=I.MR_PERCENTILE, frame: int = 0,
                  stats: dict | None = None) -> np.ndarray:
    """The DICOM intensity pipeline (module doc of :mod:`intensity`); returns float32 [0, 1], bone bright.

    Grey images go through a pointwise transfer function (modality LUT, window
    or VOI LUT, MONOCHROME1 inversion) whose data-dependent parts (percentiles)
    are measured on the image first.  For integer pixels it is evaluated on
    every value the image can hold (0 or its minimum .. its maximum); a window (``clip(a * x + b)``)
    is then applied in one pass (:func:`intensity.affine_clip`), any other
    function as a lookup table.  ``stats``: when given, receives what was
    measured on the way (``raw_max``, ``raw_min``, ``range01``: see :func:`_dicom_unit`).
    """
    st = dict(stats or {})
    with quiet_pydicom():
        img, affine = _dicom_unit(arr, ds, ct_window=ct_window, mr_percentile=mr_percentile, frame=frame, stats=st)
    if stats is not None:
        stats.update(st)
    return I.affine_clip(arr, *affine) if affine is not None else img


def grey_transfer(arr: np.ndarray, ds, *, ct_window=I.CT_WINDOW, mr_percentile=I.MR_PERCENTILE, frame: int = 0,
                  sample: np.ndarray | None = None):
    """The pointwise raw -> [0, 1] function of a grey DICOM image (its percentiles measured on ``arr``).

    ``sample``: ``intensity._sample(arr)`` when the caller has it already.
    """
    from pydicom.pixels import apply_modality_lut  # heavy (pydicom): only when DICOM is read

    photometric = str(ds.get("PhotometricInterpretation") or "MONOCHROME2").upper()
    modality = str(ds.get("Modality") or "").upper()
    sample = apply_modality_lut(I._sample(arr) if sample is None else sample, ds)
    invert = photometric == "MONOCHROME1"

    def finish(img):
        img = np.asarray(img, dtype=np.float32)
        return 1.0 - img if invert else img

    if modality == "CT":
        lo, hi = ct_window
        return lambda v: finish(I.window(apply_modality_lut(v, ds), lo, hi))
    if modality == "MR":
        s = np.asarray(sample, dtype=np.float32)
        top = float(I.percentiles(s, [mr_percentile])[0]) if s.size else 0.0
        top = top if top > 0 else (float(s.max()) if s.size else 0.0)
        return lambda v: finish(I.window(apply_modality_lut(v, ds), 0.0, top) if top > 0 else np.zeros(np.shape(v), np.float32))
    if "VOILUTSequence" in ds or "WindowCenter" in ds:
        voi = _header_voi(ds, frame)
        if voi is not None and not I.is_blank(voi(sample)):
            return lambda v: finish(voi(apply_modality_lut(v, ds)))
    bits = int(ds.get("BitsStored") or 16)
    no_rescale = "RescaleSlope" not in ds and "ModalityLUTSequence" not in ds
    if bits <= 8 and no_rescale and arr.dtype.kind in "ui":
        return lambda v: finish(I.window(v, 0, 2 ** bits - 1))
    s = np.asarray(sample)
    s = s[np.isfinite(s)] if s.dtype.kind == "f" else s
    lo, hi = (I.percentiles(s, I.PERCENTILES) if s.size else (0.0, 0.0))
    if hi <= lo and s.size:
        lo, hi = float(np.min(s)), float(np.max(s))
    lo, hi = float(lo), float(hi)
    return lambda v: finish(I.window(apply_modality_lut(v, ds), lo, hi))


def _header_voi(ds, frame: int):
    """The header's VOI LUT / window as a function to [0, 1] (pydicom's apply_voi_lut), or None."""
    from pydicom.pixels import apply_voi_lut  # heavy (pydicom): only when DICOM is read

    try:
        if "VOILUTSequence" in ds:
            lut = np.asarray(ds.VOILUTSequence[0].LUTData)
            lo, hi = float(lut.min()), float(lut.max())
        else:
            ends = apply_voi_lut(np.array([-1e12, 1e12], dtype=np.float64), ds, index=0, prefer_lut=False)
            lo, hi = float(np.min(ends)), float(np.max(ends))
    except Exception:
        return None
    if hi <= lo:
        return None

    def voi(x):
        return I.window(apply_voi_lut(np.asarray(x), ds, index=0, prefer_lut=True), lo, hi)

    return voi


# ----------------------------------------------------------------------------- PNG / JPEG / TIFF

def pil_to_array(im) -> np.ndarray:
    """A PIL image (first page) -> 2-D or 3-D numpy array in its native dtype."""
    if getattr(im, "format", None) in ("JPEG", "TIFF") and "exif" in im.info:
        if im.getexif().get(0x0112, 1) != 1:  # EXIF orientation
            im = ImageOps.exif_transpose(im)
    mode = im.mode
    if mode == "P":
        im = im.convert("RGBA" if "transparency" in im.info else "RGB")
    elif mode in ("1", "CMYK", "YCbCr", "LAB", "HSV"):
        im = im.convert("L" if mode == "1" else "RGB")
    elif mode in ("LA", "PA"):
        im = im.convert("L")
    elif mode.startswith("I;16"):
        return np.asarray(im).astype(np.uint16)
    a = np.asarray(im)
    if a.dtype == np.int32 and a.size and int(a.min()) >= 0 and int(a.max()) <= 65535:
        a = a.astype(np.uint16)
    return a


def image_to_unit(arr: np.ndarray) -> np.ndarray:
    """Non-DICOM array -> [0, 1]: colour to grey, 8-bit /255, 16-bit by bit depth, float by percentiles."""
    a = np.asarray(arr)
    if a.ndim == 3:
        if a.shape[-1] in (1, 2):
            a = a[..., 0]
        else:
            grey = I.to_grey(a)
            return I.window(grey, 0, 255) if a.dtype == np.uint8 else I.scale_by_depth(np.rint(grey).astype(a.dtype)) if a.dtype.kind in "ui" else I.percentile_window(grey)
    return I.scale_by_depth(a)


_PIL_FORMATS = {"png": ["PNG"], "jpeg": ["JPEG", "MPO"], "tiff": ["TIFF"]}


def read_pil(path, kind: str | None = None) -> np.ndarray:
    try:
        with Image.open(path, formats=_PIL_FORMATS.get(kind)) as im:
            im.seek(0)
            return pil_to_array(im)
    except UnidentifiedImageError:
        raise ReadError("not_dicom_or_image") from None
    except (OSError, SyntaxError, ValueError):
        raise ReadError("decode_error") from None


# ----------------------------------------------------------------------------- NIfTI / NPZ

def nifti_shape(path) -> tuple[int, ...]:
    import nibabel as nib  # heavy, optional (nibabel): only when NIfTI is read

    try:
        return tuple(int(s) for s in nib.load(str(path)).shape)
    except Exception:
        raise ReadError("unreadable") from None


def nifti_slice_indices(n_slices: int, k: int) -> list[int]:
    """``k`` slices evenly spread through the middle of a volume (ends avoided), deterministic."""
    if n_slices <= 0 or k <= 0:
        return []
    k = min(k, n_slices)
    return sorted({min(n_slices - 1, (i + 1) * n_slices // (k + 1)) for i in range(k)})


def _canonical_nifti(path: str):
    """The volume in RAS orientation; the last one is kept, so sampling several slices reads it once."""
    st = os.stat(path)
    return _canonical_nifti_cached(path, st.st_mtime_ns, st.st_size)


@functools.lru_cache(maxsize=1)
def _canonical_nifti_cached(path: str, mtime_ns: int, size: int):
    import nibabel as nib  # heavy, optional (nibabel): only when NIfTI is read

    return nib.as_closest_canonical(nib.load(path))


def read_nifti_slice(path, z: int) -> np.ndarray:
    """Axial slice ``z`` (RAS canonical orientation), rotated so anterior is up."""
    try:
        img = _canonical_nifti(str(path))
        data = img.dataobj
        sl = np.asarray(data[:, :, z] if len(img.shape) == 3 else data[:, :, z, 0] if len(img.shape) == 4 else data)
    except Exception:
        raise ReadError("decode_error") from None
    if sl.ndim != 2:
        raise ReadError("decode_error")
    return np.rot90(sl).copy()


def nifti_to_unit(sl: np.ndarray, *, ct_window=I.CT_WINDOW, mr_percentile=I.MR_PERCENTILE) -> tuple[np.ndarray, str]:
    """CT when the slice holds Hounsfield-like values (min <= -500), else MR-style scaling."""
    x = np.asarray(sl, dtype=np.float32)
    if x.size and float(np.nanmin(x)) <= -500:
        return I.ct_window(x, *ct_window), "CT"
    return I.mr_normalise(np.nan_to_num(x), mr_percentile), "MR"


def npz_image_keys(path) -> list[tuple[str, int, str | None]]:
    """(images key, count, labels key or None) for every ``*_images`` array of an NPZ (MedMNIST layout)."""
    try:
        with zipfile.ZipFile(path) as z:
            names = {n[:-4]: n for n in z.namelist() if n.endswith(".npy")}
            out = []
            for key in sorted(names):
                if not (key == "images" or key.endswith("_images")):
                    continue
                with z.open(names[key]) as f:
                    version = np.lib.format.read_magic(f)
                    shape, _, _ = (np.lib.format.read_array_header_1_0(f) if version == (1, 0)
                                   else np.lib.format.read_array_header_2_0(f))
                lab = key[: -len("images")] + "labels"
                out.append((key, int(shape[0]) if shape else 0, lab if lab in names else None))
            return out
    except (zipfile.BadZipFile, OSError, ValueError):
        raise ReadError("unreadable") from None


# ----------------------------------------------------------------------------- entry point

_NON_DICOM_META = {
    "source_format": "", "modality": "XR", "modality_raw": "", "body_part": "unknown", "view": "unknown",
    "sex": "unknown", "age_years": float("nan"), "photometric": "", "n_frames": 1, "patient_id": "",
    "study_uid": "", "series_uid": "",
}


def _non_dicom_meta(fmt: str, arr: np.ndarray) -> dict:
    meta = _NON_DICOM_META.copy()
    meta["source_format"] = fmt
    meta["photometric"] = "RGB" if arr.ndim == 3 else "MONOCHROME2"
    return meta


def load_image(src, *, index: int | None = None, ct_window=I.CT_WINDOW, mr_percentile=I.MR_PERCENTILE,
               with_hash: bool = False, kind: str | None = None, decoded: bool = False,
               dicom_facts: dict | None = None, max_size: int | None = None):
    """Decode one image to ``(img01 float32 2-D in [0, 1], meta)`` with the ingest intensity rules.

    ``src``: a path (DICOM by content, PNG/JPEG/TIFF, NIfTI, NPZ), a pydicom
    ``Dataset``, a PIL image, a numpy array (treated like a PNG's pixels) or a
    binary file object holding a PNG/JPEG/TIFF file (``kind`` then says which).
    ``index``: DICOM frame (multi-frame: the first by default), NIfTI axial
    slice (default: the middle one when ``index`` is None) or NPZ image (of the
    first ``*_images`` array).  Raises :class:`ReadError` (a reason code).
    ``meta`` holds normalised facts and, in memory only, raw identifiers.
    ``img01`` has the full resolution; what ingest stores is :func:`load_stored`.
    ``decoded=True`` returns a :class:`Decoded` instead (the same image and
    meta, made only when needed, plus :meth:`Decoded.stored`);
    ``dicom_facts``: :func:`dicom_meta` of the dataset when the caller has it already.
    ``with_hash``: ``meta["content_hash"]`` = :func:`content_hash` of the decoded pixels.
    ``max_size``: the size :meth:`Decoded.stored` will be asked for, so the decoder can
    prepare it on its one pass over the pixels (results are the same without it).
    """
    if kind in IMAGE_KINDS and hasattr(src, "read"):  # an open PNG/JPEG/TIFF (ingest's case): the short way
        d = _decode_image_file(src, kind, with_hash, max_size)
        return d if decoded else (d.img01(), d.meta)
    kw = dict(index=index, ct_window=ct_window, mr_percentile=mr_percentile, with_hash=with_hash, kind=kind,
              dicom_facts=dicom_facts, max_size=max_size)
    if kind in IMAGE_KINDS or isinstance(src, np.ndarray):  # no pydicom involved: no need to quieten it
        d = _decode(src, **kw)
    else:
        with quiet_pydicom():
            d = _decode(src, **kw)
    return d if decoded else (d.img01(), d.meta)


def load_stored(src, max_size: int | None = 512, **kw):
    """``(uint8 2-D image, meta)``: exactly the pixels ``radpretrain ingest --max-size max_size`` stores for ``src``.

    The one function behind both ingest and the exported encoders'
    preprocessing of files (:meth:`Decoded.stored`); keyword arguments as for
    :func:`load_image`.  ``max_size`` None or 0: no resizing.
    """
    d = load_image(src, decoded=True, max_size=max_size, **kw)
    return d.stored(max_size), d.meta


_U8 = np.arange(256, dtype=np.uint8)
_U8_SCALE = 1.0 / 255  # the 8-bit rule as a window: clip(x / 255), the same float32 steps as scale_by_depth


@functools.lru_cache(maxsize=None)
def _u8_tables():
    """[0, 1] value and stored value of every uint8 pixel under the 8-bit rule (same functions, elementwise)."""
    unit = I.scale_by_depth(_U8)
    stored = to_stored(unit)
    return unit, stored, bool(np.array_equal(stored, _U8))


class Decoded:
    """One decoded image: ``meta`` (as :func:`load_image` gives it), its [0, 1] image and what ingest stores.

    Three forms, the [0, 1] image being made only when asked for:

    * ``u8``: 8-bit grey pixels under the 8-bit rule (``x / 255``);
    * ``raw`` + ``affine`` ``(a, b)``: grey pixels under a window-like transfer,
      ``img01 == intensity.affine_clip(raw, a, b)``;
    * ``img``: the [0, 1] image itself (any other transfer, colour, NIfTI, ...).

    :meth:`img01` is exactly ``load_image``'s image and :meth:`is_blank`
    exactly ``intensity.is_blank(img01)``.  :meth:`stored` is the store's
    uint8 image: ``to_stored(img01)`` when no resizing is needed; else, for
    ``u8``/``raw``, ``to_stored(intensity.resize_max_window(raw, a, b, ...))``
    (block means of the raw values, then the window, then the exact size: the
    full-size float image is never made), and for ``img`` ``to_stored(intensity.resize_max(img01, ...))``.
    """

    __slots__ = ("meta", "shape", "_img", "_u8", "_raw", "_affine", "_value_range", "_range01", "_blank",
                 "_block_means")

    def __init__(self, meta, shape, img=None, u8=None, raw=None, affine=None, value_range=None, range01=None,
                 blank=None, block_means=None):
        self.meta, self.shape, self._img, self._u8 = meta, shape, img, u8
        self._raw, self._affine, self._value_range, self._range01 = raw, affine, value_range, range01
        self._blank, self._block_means = blank, block_means  # (f, intensity.block_mean(raw, f)) if made already

    def img01(self) -> np.ndarray:
        if self._img is None:
            if self._u8 is not None:
                img = I.scale_by_depth(self._u8)
            else:
                img = I.affine_clip(self._raw, *self._affine)
            self._img = np.ascontiguousarray(img, dtype=np.float32)
        return self._img

    def is_blank(self) -> bool:
        if self._blank is not None:
            return self._blank
        if self._range01 is not None:
            return I.is_blank_range(*self._range01)
        return I.is_blank(self.img01())

    def stored(self, max_size: int | None) -> np.ndarray:
        """The uint8 pixels ingest stores (longest side <= ``max_size``; None or 0: no resizing)."""
        full_size = not max_size or max(self.shape) <= max_size
        if full_size and self._u8 is not None:
            _, table, identity = _u8_tables()
            return self._u8 if identity else np.take(table, self._u8)
        if full_size:
            return to_stored(self.img01())
        if self._u8 is not None:
            return to_stored(I.resize_max_window(self._u8, _U8_SCALE, 0.0, max_size, self._value_range))
        if self._raw is not None:
            f, means = self._block_means or (None, None)
            means = means if f == I.shrink_factor(*self.shape, max_size) else None
            return to_stored(I.resize_max_window(self._raw, *self._affine, max_size, self._value_range, means))
        return to_stored(I.resize_max(self.img01(), max_size))


def _is_dataset(src) -> bool:
    pydicom = sys.modules.get("pydicom")  # a Dataset exists only once pydicom is imported: no import for PNG/JPEG
    return pydicom is not None and isinstance(src, pydicom.Dataset)


def _decode_image_file(src, kind: str, with_hash: bool, max_size: int | None) -> Decoded:
    """:func:`_decode` of an open PNG/JPEG/TIFF file (``kind`` known from its content)."""
    arr = read_pil(src, kind)
    return _finish_decoded(arr, _non_dicom_meta(kind, arr), {}, None, None, with_hash, max_size)


def _u8_stats(u8: np.ndarray, max_size: int | None) -> dict:
    """What the store needs to know of an 8-bit grey image's values, measured only as far as needed.

    The extremes (``value_range``, ``range01``) serve the blank/constant tests and the
    resize.  An image stored at full size in which a few pixels of the middle row already span
    two grey levels or more is neither blank (a range under one level) nor constant, whatever
    its extremes: the pass over all pixels is then skipped (the results are those the extremes
    would give).  The few pixels are compared as Python ints: cheaper than two numpy reductions.
    """
    h, w = u8.shape
    if u8.size and max_size and max(h, w) <= max_size:
        few = u8[h // 2, :: max(1, w // 16)].tobytes()
        if max(few) - min(few) >= 2:
            return {"blank": False, "raw_constant": False}
    lo, hi = (int(u8.min()), int(u8.max())) if u8.size else (0, 0)
    unit = _u8_tables()[0]
    return {"raw_min": lo, "raw_max": hi, "range01": (float(unit[lo]), float(unit[hi])), "value_range": (lo, hi)}


def _decode(src, *, index, ct_window, mr_percentile, with_hash, kind, dicom_facts=None, max_size=None) -> Decoded:
    stats: dict = {}
    img = affine = None
    if isinstance(src, np.ndarray):
        arr = src
        meta = _non_dicom_meta("array", arr)
    elif _is_dataset(src):
        ds = src
        arr = _decode_frame(ds, index or 0, stats, max_size)
        meta = dict(dicom_facts) if dicom_facts is not None else dicom_meta(ds)
        img, affine = _dicom_unit(arr, ds, ct_window=ct_window, mr_percentile=mr_percentile, frame=index or 0,
                                  stats=stats)
    elif hasattr(src, "mode") and hasattr(src, "size") and not isinstance(src, (str, Path)):
        arr = pil_to_array(src)
        meta = _non_dicom_meta("png", arr)
    else:
        path = src if isinstance(src, str) else Path(src)  # a str is used as is (no Path object per file)
        kind = kind or sniff(path)
        if kind == "dicom":
            return _decode(read_dicom(path), index=index, ct_window=ct_window, mr_percentile=mr_percentile,
                           with_hash=with_hash, kind=None, dicom_facts=dicom_facts, max_size=max_size)
        if kind in IMAGE_KINDS:
            arr = read_pil(path, kind)
            meta = _non_dicom_meta(kind, arr)
        elif kind == "nifti":
            shape = nifti_shape(path)
            z = index if index is not None else (shape[2] // 2 if len(shape) >= 3 else 0)
            arr = read_nifti_slice(path, z)
            img, modality = nifti_to_unit(arr, ct_window=ct_window, mr_percentile=mr_percentile)
            meta = _non_dicom_meta("nifti", arr)
            meta["modality"] = modality
        elif kind == "npz":
            keys = npz_image_keys(path)
            if not keys:
                raise ReadError("no_pixel_data")
            with np.load(path, allow_pickle=False) as z:
                arr = np.asarray(z[keys[0][0]][index or 0])
            meta = _non_dicom_meta("npz", arr)
        elif kind in ("unreadable", "empty"):
            raise ReadError("unreadable" if kind == "unreadable" else "empty_file")
        else:
            raise ReadError("not_dicom_or_image")
    return _finish_decoded(arr, meta, stats, img, affine, with_hash, max_size)


def _finish_decoded(arr, meta: dict, stats: dict, img, affine, with_hash: bool, max_size) -> Decoded:
    """The decoded pixels ``arr`` (with ``img``/``affine`` when the source's rules made them) as a :class:`Decoded`."""
    u8 = None
    if img is None and affine is None:  # non-DICOM pixels (file, PIL image, array): the PNG rules
        if arr.dtype == np.uint8 and arr.ndim == 2:
            u8 = np.ascontiguousarray(arr)  # 8-bit grey: the [0, 1] image is made only when needed
            stats = _u8_stats(u8, max_size)
        else:
            img = image_to_unit(arr)
    shape = arr.shape if img is None else img.shape
    if len(shape) != 2:
        raise ReadError("decode_error")
    meta["orig_height"], meta["orig_width"] = int(shape[0]), int(shape[1])
    if arr.size == 0:
        meta["raw_constant"] = True
    elif "raw_constant" in stats:
        meta["raw_constant"] = stats["raw_constant"]
    elif stats.get("raw_min") is not None and stats.get("raw_max") is not None:
        meta["raw_constant"] = bool(stats["raw_min"] == stats["raw_max"])
    else:
        meta["raw_constant"] = bool(np.ptp(I._sample(arr)) == 0 and np.ptp(arr) == 0)
    if with_hash:
        meta["content_hash"] = content_hash(arr)
    if img is not None:
        img = np.ascontiguousarray(img, dtype=np.float32)
    return Decoded(meta, (int(shape[0]), int(shape[1])), img=img, u8=u8, raw=arr if affine is not None else None,
                   affine=affine, value_range=stats.get("value_range"), range01=stats.get("range01"),
                   blank=stats.get("blank"), block_means=stats.get("block_means") if affine is not None else None)
