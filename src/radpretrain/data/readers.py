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

import hashlib
import functools
import logging
import os
import re
import struct
import sys
import warnings
import zipfile
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from radpretrain.data import intensity as I

SIDECAR_EXTS = {".csv", ".json", ".txt", ".md", ".xml", ".html", ".htm", ".tsv", ".yaml", ".yml"}
IMAGE_KINDS = ("png", "jpeg", "tiff")
REASONS = (
    "unreadable", "not_dicom_or_image", "no_pixel_data", "unsupported_transfer_syntax",
    "decode_error", "blank", "too_small", "empty_file",
)
MODALITIES = ("CR", "DX", "CT", "MR", "XR", "OT")
BODY_PARTS = (
    "hand", "wrist", "forearm", "elbow", "humerus", "shoulder", "chest", "abdomen", "pelvis", "hip",
    "femur", "knee", "leg", "ankle", "foot", "spine", "skull", "other", "unknown",
)
VIEWS = ("AP", "PA", "LAT", "OBL", "other", "unknown")


class ReadError(Exception):
    """A file that cannot become an image; ``reason`` is one of :data:`REASONS`."""

    def __init__(self, reason: str):
        assert reason in REASONS, reason
        self.reason = reason
        super().__init__(reason)


# ----------------------------------------------------------------------------- vocabularies

_BODY_WORDS = {
    "hand": "HAND HANDS MANO FINGER FINGERS THUMB METACARPAL METACARPALS PHALANX PHALANGES FINGERS",
    "wrist": "WRIST WRISTS CARPUS CARPAL SCAPHOID HANDGELENK",
    "forearm": "FOREARM FOREARMS RADIUS ULNA UNTERARM",
    "elbow": "ELBOW ELBOWS ELLBOGEN ELLENBOGEN OLECRANON",
    "humerus": "HUMERUS ARM UPPERARM OBERARM",
    "shoulder": "SHOULDER SHOULDERS CLAVICLE SCAPULA SCHULTER ACJ",
    "chest": "CHEST THORAX LUNG LUNGS CXR RIB RIBS STERNUM HEART THORAX TORAX",
    "abdomen": "ABDOMEN ABD KUB BAUCH ABDOMINAL LIVER KIDNEY KIDNEYS",
    "pelvis": "PELVIS BECKEN PELVIC ISCHIUM ILIUM",
    "hip": "HIP HIPS HUEFTE HUFTE",
    "femur": "FEMUR THIGH OBERSCHENKEL FEMORAL",
    "knee": "KNEE KNEES PATELLA KNIE",
    "leg": "LEG LEGS LOWERLEG TIBIA FIBULA UNTERSCHENKEL TIBFIB",
    "ankle": "ANKLE ANKLES OSG SPRUNGGELENK MALLEOLUS",
    "foot": "FOOT FEET TOE TOES CALCANEUS HEEL FUSS FOREFOOT",
    "spine": "SPINE CSPINE TSPINE LSPINE SSPINE CERVICAL LUMBAR SACRUM COCCYX VERTEBRA VERTEBRAE "
             "LWS HWS BWS WIRBELSAEULE SCOLIOSIS",
    "skull": "SKULL HEAD BRAIN SINUS SINUSES FACE MANDIBLE ORBIT ORBITS SCHAEDEL CRANIUM SELLA",
}
BODY_KEYWORDS = {w: part for part, words in _BODY_WORDS.items() for w in words.split()}
_VIEW_WORDS = {
    "AP": "AP", "PA": "PA", "LAT": "LAT", "LATERAL": "LAT", "LL": "LAT", "RL": "LAT", "SEITLICH": "LAT",
    "OBL": "OBL", "OBLIQUE": "OBL", "LAO": "OBL", "RAO": "OBL", "LPO": "OBL", "RPO": "OBL", "SCHRAEG": "OBL",
}
_WEAK_WORDS = {"LEG", "LEGS", "ARM", "LOWER", "UPPER", "LIMB", "LIMBS", "EXTREMITY", "L", "R", "LT", "RT",
               "LEFT", "RIGHT", "BOTH"}
_TOKEN_RE = re.compile(r"[A-Za-z]+")


def _tokens(text) -> list[str]:
    return [t.upper() for t in _TOKEN_RE.findall(str(text or ""))]


def body_part_from_text(*texts) -> str | None:
    """First vocabulary keyword found in the texts (in order), or None."""
    for text in texts:
        for tok in _tokens(text):
            if tok in BODY_KEYWORDS:
                return BODY_KEYWORDS[tok]
    return None


def normalise_body_part(body_part_examined=None, *descriptions) -> str:
    """BodyPartExamined, else description keywords; 'other' if only unknown words, 'unknown' if nothing."""
    hit = body_part_from_text(body_part_examined)
    weak = not hit or set(_tokens(body_part_examined)) <= _WEAK_WORDS
    if weak:  # generic header term (LEG, ARM, LOWER LIMB): a specific description keyword wins
        hit = body_part_from_text(*descriptions) or hit
    if hit:
        return hit
    return "other" if str(body_part_examined or "").strip() else "unknown"


def normalise_view(view_position=None, *descriptions) -> str:
    vp = str(view_position or "").strip().upper()
    if vp:
        for tok in _tokens(vp):
            if tok in _VIEW_WORDS:
                return _VIEW_WORDS[tok]
        return "other"
    for text in descriptions:
        for tok in _tokens(text):
            if tok in _VIEW_WORDS:
                return _VIEW_WORDS[tok]
    return "unknown"


def normalise_modality(value) -> str:
    m = str(value or "").strip().upper()
    return m if m in MODALITIES else ("OT" if m else "OT")


# ----------------------------------------------------------------------------- sniffing

def sniff(path: str | Path) -> str:
    """Kind of a file by its content: dicom, png, jpeg, tiff, nifti, npz, sidecar or unknown.

    DICOM is recognised by the 'DICM' magic after the 128-byte preamble, or, for
    files written without preamble, by a first element in group 0002/0008 that
    pydicom then parses.  Extensions only matter for NIfTI/NPZ containers
    and for sidecars (.csv/.json/.txt/... that are not DICOM by content).
    """
    try:
        with open(path, "rb") as f:
            head = f.read(352)
    except OSError:
        return "unreadable"
    name = os.path.basename(str(path)).lower()
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
    import pydicom

    try:
        with quiet_pydicom():
            ds = pydicom.dcmread(path, force=True, stop_before_pixels=True)
        return len(ds) > 0 and any(tag.group in (0x0008, 0x0010, 0x0020, 0x0028) for tag in ds.keys())
    except Exception:
        return False


# ----------------------------------------------------------------------------- DICOM

def content_hash(arr: np.ndarray) -> str:
    """SHA-256 of decoded pixels (dtype and shape included, so equal bytes of other shapes differ)."""
    a = np.ascontiguousarray(arr)
    h = hashlib.sha256(f"{a.dtype.str}{a.shape}".encode())
    h.update(a.data)
    return h.hexdigest()


def read_dicom(path_or_ds, stop_before_pixels: bool = False):
    import pydicom
    from pydicom.errors import InvalidDicomError

    if isinstance(path_or_ds, pydicom.Dataset):
        return path_or_ds
    try:
        with quiet_pydicom():
            ds = pydicom.dcmread(path_or_ds, force=True, stop_before_pixels=stop_before_pixels)
            _ensure_transfer_syntax(ds)
            return ds
    except InvalidDicomError:
        raise ReadError("not_dicom_or_image") from None
    except Exception:
        raise ReadError("unreadable") from None


def _ensure_transfer_syntax(ds) -> None:
    """Files written without file meta (no preamble): record the encoding they were read with."""
    from pydicom.dataset import FileMetaDataset
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
    from radpretrain.data.deid import dicom_age, normalise_sex

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


def _decode_frame(ds, frame: int) -> np.ndarray:
    from pydicom.pixels import pixel_array

    if not any(k in ds for k in ("PixelData", "FloatPixelData", "DoubleFloatPixelData")):
        raise ReadError("no_pixel_data")
    tsyntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    try:
        with quiet_pydicom():
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


def dicom_to_unit(arr: np.ndarray, ds, *, ct_window=I.CT_WINDOW, mr_percentile=I.MR_PERCENTILE, frame: int = 0,
                  stats: dict | None = None) -> np.ndarray:
    """The DICOM intensity pipeline (module doc of :mod:`intensity`); returns float32 [0, 1], bone bright.

    Grey images go through a pointwise transfer function (modality LUT, window
    or VOI LUT, MONOCHROME1 inversion) whose data-dependent parts (percentiles)
    are measured on the image first; for integer pixels it is evaluated once
    per possible value and applied as a lookup table (one pass over the image).
    ``stats``: when given and the transfer is window-like, receives ``raw_min``,
    ``raw_max`` of ``arr`` and ``range01`` (the result's float32 min and max),
    measured during that pass.
    """
    from pydicom.pixels import apply_color_lut

    photometric = str(ds.get("PhotometricInterpretation") or "MONOCHROME2").upper()
    with quiet_pydicom():
        if photometric == "PALETTE COLOR":
            arr = apply_color_lut(arr, ds)
            top = float(np.max(arr)) if arr.size else 0
            grey = I.to_grey(arr)
            return I.window(grey, 0, 255 if top <= 255 else 65535)
        if arr.ndim == 3:  # colour (pydicom already converted YBR to RGB)
            grey = I.to_grey(arr)
            return I.window(grey, 0, 255) if arr.dtype == np.uint8 or int(ds.get("BitsStored") or 8) <= 8 else I.percentile_window(grey)
        transfer = grey_transfer(arr, ds, ct_window=ct_window, mr_percentile=mr_percentile, frame=frame)
        if arr.dtype.kind in "ui" and arr.dtype.itemsize <= 2 and arr.size > (1 << 16):
            # every value the dtype can hold, in the order of its unsigned view (so the view indexes the table)
            unsigned = np.dtype(f"u{arr.dtype.itemsize}")
            values = np.arange(np.iinfo(unsigned).max + 1, dtype=np.int64).astype(unsigned).view(arr.dtype)
            values = values.astype(np.int32)
            lut = transfer(values).astype(np.float32, copy=False)
            affine = I.affine_of(values, lut)
            if affine is not None:  # window-like transfer: clip(a * x + b) in place, cheaper than a gather
                out = I.affine_clip(arr, *affine, stats=stats)
                if stats is not None and stats.get("raw_min") is not None:
                    # monotonic: the result's extremes are the transfer of the raw extremes (same float32 steps)
                    ends = I.affine_clip_values([stats["raw_min"], stats["raw_max"]], *affine)
                    stats["range01"] = (float(ends.min()), float(ends.max()))
                return out
            return np.take(lut, arr.view(unsigned))
        return transfer(arr).astype(np.float32, copy=False)


def grey_transfer(arr: np.ndarray, ds, *, ct_window=I.CT_WINDOW, mr_percentile=I.MR_PERCENTILE, frame: int = 0):
    """The pointwise raw -> [0, 1] function of a grey DICOM image (its percentiles measured on ``arr``)."""
    from pydicom.pixels import apply_modality_lut

    photometric = str(ds.get("PhotometricInterpretation") or "MONOCHROME2").upper()
    modality = str(ds.get("Modality") or "").upper()
    sample = apply_modality_lut(I._sample(arr), ds)
    invert = photometric == "MONOCHROME1"

    def finish(img):
        img = np.asarray(img, dtype=np.float32)
        return 1.0 - img if invert else img

    if modality == "CT":
        lo, hi = ct_window
        return lambda v: finish(I.window(apply_modality_lut(v, ds), lo, hi))
    if modality == "MR":
        s = np.asarray(sample, dtype=np.float32)
        top = float(np.percentile(s, mr_percentile)) if s.size else 0.0
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
    lo, hi = (np.percentile(s, I.PERCENTILES) if s.size else (0.0, 0.0))
    if hi <= lo and s.size:
        lo, hi = float(np.min(s)), float(np.max(s))
    lo, hi = float(lo), float(hi)
    return lambda v: finish(I.window(apply_modality_lut(v, ds), lo, hi))


def _header_voi(ds, frame: int):
    """The header's VOI LUT / window as a function to [0, 1] (pydicom's apply_voi_lut), or None."""
    from pydicom.pixels import apply_voi_lut

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
    from PIL import ImageOps

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
    from PIL import Image, UnidentifiedImageError

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
    import nibabel as nib

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
    import nibabel as nib

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

def _non_dicom_meta(fmt: str, arr: np.ndarray) -> dict:
    return {
        "source_format": fmt, "modality": "XR", "modality_raw": "", "body_part": "unknown", "view": "unknown",
        "sex": "unknown", "age_years": float("nan"), "photometric": "RGB" if arr.ndim == 3 else "MONOCHROME2",
        "n_frames": 1, "patient_id": "", "study_uid": "", "series_uid": "",
    }


def load_image(src, *, index: int | None = None, ct_window=I.CT_WINDOW, mr_percentile=I.MR_PERCENTILE,
               with_hash: bool = False, kind: str | None = None, decoded: bool = False,
               dicom_facts: dict | None = None):
    """Decode one image to ``(img01 float32 2-D in [0, 1], meta)`` with the ingest intensity rules.

    ``src``: a path (DICOM by content, PNG/JPEG/TIFF, NIfTI, NPZ), a pydicom
    ``Dataset``, a PIL image or a numpy array (treated like a PNG's pixels).
    ``index``: DICOM frame (multi-frame: the first by default), NIfTI axial
    slice (default: the middle one when ``index`` is None) or NPZ image (of the
    first ``*_images`` array).  Raises :class:`ReadError` (a reason code).
    ``meta`` holds normalised facts and, in memory only, raw identifiers.
    ``decoded=True`` returns a :class:`Decoded` instead (what ingest uses: the
    same image and meta, plus exact shortcuts to the stored pixels);
    ``dicom_facts``: :func:`dicom_meta` of the dataset when the caller has it already.
    """
    kw = dict(index=index, ct_window=ct_window, mr_percentile=mr_percentile, with_hash=with_hash, kind=kind,
              dicom_facts=dicom_facts)
    if kind in IMAGE_KINDS or isinstance(src, np.ndarray):  # no pydicom involved: no need to quieten it
        d = _decode(src, **kw)
    else:
        with quiet_pydicom():
            d = _decode(src, **kw)
    return d if decoded else (d.img01(), d.meta)


_U8 = np.arange(256, dtype=np.uint8)


@functools.lru_cache(maxsize=None)
def _u8_tables():
    """[0, 1] value and stored value of every uint8 pixel under the 8-bit rule (same functions, elementwise)."""
    from radpretrain.data.store import to_stored

    unit = I.scale_by_depth(_U8)
    stored = to_stored(unit)
    return unit, stored, bool(np.array_equal(stored, _U8))


class Decoded:
    """One decoded image: ``meta`` (as :func:`load_image` gives it), its [0, 1] image and shortcuts for ingest.

    :meth:`img01` is exactly ``load_image``'s image; :meth:`stored` is exactly
    ``store.to_stored(intensity.resize_max(img01, max_size))`` and
    :meth:`is_blank` exactly ``intensity.is_blank(img01)``, but without the
    float image where that is not needed: an 8-bit grey image that needs no
    resizing is mapped through a 256-entry table of the same functions, and
    window-like DICOM transfers measure the extremes during their single pass.
    """

    __slots__ = ("meta", "shape", "_img", "_u8", "_range01")

    def __init__(self, meta, shape, img=None, u8=None, range01=None):
        self.meta, self.shape, self._img, self._u8, self._range01 = meta, shape, img, u8, range01

    def img01(self) -> np.ndarray:
        if self._img is None:
            self._img = np.ascontiguousarray(I.scale_by_depth(self._u8), dtype=np.float32)
        return self._img

    def is_blank(self) -> bool:
        if self._img is None and self._u8 is not None and self._u8.size:
            unit = _u8_tables()[0]
            return I.is_blank_range(unit[int(self._u8.min())], unit[int(self._u8.max())])
        if self._range01 is not None:
            return I.is_blank_range(*self._range01)
        return I.is_blank(self.img01())

    def stored(self, max_size: int | None) -> np.ndarray:
        """The uint8 pixels ingest stores (longest side <= ``max_size``)."""
        from radpretrain.data.store import to_stored

        if self._u8 is not None and (not max_size or max(self.shape) <= max_size):
            _, table, identity = _u8_tables()
            return self._u8 if identity else np.take(table, self._u8)
        return to_stored(I.resize_max(self.img01(), max_size))


def _is_dataset(src) -> bool:
    pydicom = sys.modules.get("pydicom")  # a Dataset exists only once pydicom is imported: no import for PNG/JPEG
    return pydicom is not None and isinstance(src, pydicom.Dataset)


def _decode(src, *, index, ct_window, mr_percentile, with_hash, kind, dicom_facts=None) -> Decoded:
    stats: dict = {}
    img = None
    if isinstance(src, np.ndarray):
        arr = src
        meta = _non_dicom_meta("array", arr)
    elif _is_dataset(src):
        ds = src
        arr = _decode_frame(ds, index or 0)
        meta = dict(dicom_facts) if dicom_facts is not None else dicom_meta(ds)
        img = dicom_to_unit(arr, ds, ct_window=ct_window, mr_percentile=mr_percentile, frame=index or 0, stats=stats)
    elif hasattr(src, "mode") and hasattr(src, "size") and not isinstance(src, (str, Path)):
        arr = pil_to_array(src)
        meta = _non_dicom_meta("png", arr)
    else:
        path = src if isinstance(src, str) else Path(src)  # a str is used as is (no Path object per file)
        kind = kind or sniff(path)
        if kind == "dicom":
            return _decode(read_dicom(path), index=index, ct_window=ct_window, mr_percentile=mr_percentile,
                           with_hash=with_hash, kind=None, dicom_facts=dicom_facts)
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
    u8 = None
    if img is None:  # non-DICOM pixels (file, PIL image, array): the PNG rules
        if arr.dtype == np.uint8 and arr.ndim == 2:
            u8 = np.ascontiguousarray(arr)  # 8-bit grey: the [0, 1] image is made only when needed
            lo, hi = (int(u8.min()), int(u8.max())) if u8.size else (0, 0)
            stats = {"raw_min": lo, "raw_max": hi}
        else:
            img = image_to_unit(arr)
    shape = u8.shape if u8 is not None else img.shape
    if len(shape) != 2:
        raise ReadError("decode_error")
    meta["orig_height"], meta["orig_width"] = int(shape[0]), int(shape[1])
    if arr.size == 0:
        meta["raw_constant"] = True
    elif stats.get("raw_min") is not None:
        meta["raw_constant"] = bool(stats["raw_min"] == stats["raw_max"])
    else:
        meta["raw_constant"] = bool(np.ptp(I._sample(arr)) == 0 and np.ptp(arr) == 0)
    if with_hash:
        meta["content_hash"] = content_hash(arr)
    if img is not None:
        img = np.ascontiguousarray(img, dtype=np.float32)
    return Decoded(meta, (int(shape[0]), int(shape[1])), img=img, u8=u8, range01=stats.get("range01"))
