"""CT volumes and their geometry: MetaImage (``.mhd``/``.raw``, ``.mha``), NIfTI and DICOM series.

Used by ``radpretrain patches`` (:mod:`radpretrain.data.patches`) to cut candidate patches out of
volumes given in world coordinates.

Coordinates.  World coordinates are millimetres in the DICOM patient system (LPS: +x towards the
patient's left, +y posterior, +z head), the system of LUNA16's ``candidates.csv``, of ITK and of
DICOM's ImagePositionPatient.  A volume's voxel ``(i, j, k)`` (``i`` the fastest axis in the file:
the column of a DICOM slice, the first index of a NIfTI array) has its centre at::

    world = origin + D @ (spacing * [i, j, k])

where the columns of the 3 x 3 direction matrix ``D`` are the unit vectors of the index axes in
world space.  Per format:

* MetaImage: ``Offset`` (or ``Position``/``Origin``) is the origin, ``ElementSpacing`` the spacing,
  and ``TransformMatrix`` lists the direction of axis 0, then of axis 1, then of axis 2 (the file's
  rows are the columns of ``D``: how ITK's MetaImageIO reads it).
* NIfTI: the image's affine (nibabel's choice of sform/qform) maps voxels to RAS millimetres; the
  LPS point is ``(-x, -y, z)`` of the RAS one (what ITK does when it reads NIfTI).
* DICOM series: slices of one SeriesInstanceUID sorted along the normal of ImageOrientationPatient;
  ``D`` = (row direction, column direction, slice normal), spacing = (column spacing, row spacing,
  distance between slices), origin = ImagePositionPatient of the first slice.  Uneven slice
  distances are refused (``irregular_slices``).

Values are Hounsfield units as float32: MetaImage values as stored, NIfTI values after
``scl_slope``/``scl_inter``, DICOM values after the modality LUT (RescaleSlope/Intercept).
Only the block of voxels a patch needs is read (:meth:`Volume.block`); uncompressed MetaImage and
NIfTI files are memory-mapped, so a volume is never read whole for a few patches.

Problems raise :class:`VolumeError` whose ``reason`` is one of :data:`VOLUME_REASONS`; its text
never holds a path or a header value.
"""

from __future__ import annotations

import os
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from radpretrain.data import readers as R
from radpretrain.errors import UserError

VOLUME_REASONS = ("unreadable", "truncated", "unsupported", "irregular_slices", "decode_error")
MHD_EXTS = (".mhd", ".mha")
NIFTI_EXTS = (".nii", ".nii.gz")
SKIP_EXTS = (".raw", ".zraw", ".img", ".hdr", ".csv", ".json", ".txt", ".md", ".xml", ".html", ".yaml", ".yml",
             ".tsv")
LPS_FROM_RAS = np.diag([-1.0, -1.0, 1.0])  # its own inverse
SLICE_TOLERANCE = 0.01  # relative spread of DICOM slice distances accepted as even

# MetaImage element types (MetaIO's sizes: MET_LONG is 4 bytes)
_MET_TYPES = {
    "MET_CHAR": "i1", "MET_UCHAR": "u1", "MET_SHORT": "i2", "MET_USHORT": "u2", "MET_INT": "i4",
    "MET_UINT": "u4", "MET_LONG": "i4", "MET_ULONG": "u4", "MET_LONG_LONG": "i8", "MET_ULONG_LONG": "u8",
    "MET_FLOAT": "f4", "MET_DOUBLE": "f8",
}


class VolumeError(Exception):
    """A volume that cannot be used; ``reason`` is one of :data:`VOLUME_REASONS`."""

    def __init__(self, reason: str):
        assert reason in VOLUME_REASONS, reason
        self.reason = reason
        super().__init__(reason)


class Geometry:
    """Where the voxels of a volume lie in world (LPS, mm) space; see the module docstring."""

    def __init__(self, shape, spacing, origin, direction):
        self.shape = tuple(int(n) for n in shape)
        self.spacing = np.asarray(spacing, dtype=np.float64).reshape(3)
        self.origin = np.asarray(origin, dtype=np.float64).reshape(3)
        self.direction = np.asarray(direction, dtype=np.float64).reshape(3, 3)
        if len(self.shape) != 3 or min(self.shape) < 1:
            raise VolumeError("unsupported")
        if not (np.all(np.isfinite(self.spacing)) and np.all(self.spacing > 0) and np.all(np.isfinite(self.origin))):
            raise VolumeError("unsupported")
        # index -> world is affine: world = origin + matrix @ ijk
        self.matrix = self.direction * self.spacing[None, :]
        if not np.all(np.isfinite(self.matrix)) or abs(np.linalg.det(self.matrix)) < 1e-12:
            raise VolumeError("unsupported")
        self._inverse = np.linalg.inv(self.matrix)

    def index_to_world(self, ijk) -> np.ndarray:
        """World points (..., 3) of continuous voxel indices (..., 3)."""
        return np.asarray(ijk, dtype=np.float64) @ self.matrix.T + self.origin

    def world_to_index(self, xyz) -> np.ndarray:
        """Continuous voxel indices (..., 3) of world points (..., 3)."""
        return (np.asarray(xyz, dtype=np.float64) - self.origin) @ self._inverse.T

    def inside(self, ijk) -> np.ndarray:
        """True where a continuous index lies in the volume (within the extent of its voxels)."""
        ijk = np.asarray(ijk, dtype=np.float64)
        n = np.asarray(self.shape, dtype=np.float64)
        return np.all((ijk >= -0.5) & (ijk <= n - 0.5), axis=-1)

    def ras_affine(self) -> np.ndarray:
        """The 4 x 4 voxel -> RAS affine of this geometry (as a NIfTI file holds it)."""
        a = np.eye(4)
        a[:3, :3] = LPS_FROM_RAS @ self.matrix
        a[:3, 3] = LPS_FROM_RAS @ self.origin
        return a

    @classmethod
    def from_ras_affine(cls, shape, affine) -> "Geometry":
        a = np.asarray(affine, dtype=np.float64)
        m = LPS_FROM_RAS @ a[:3, :3]
        spacing = np.linalg.norm(m, axis=0)
        if np.any(spacing <= 0) or not np.all(np.isfinite(spacing)):
            raise VolumeError("unsupported")
        return cls(shape, spacing, LPS_FROM_RAS @ a[:3, 3], m / spacing[None, :])

    def __repr__(self) -> str:
        return (f"Geometry(shape={self.shape}, spacing={self.spacing.tolist()}, origin={self.origin.tolist()}, "
                f"direction={self.direction.tolist()})")


class Volume:
    """Voxel values (``raw[i, j, k]``, any array-like: a memory map, a transposed view) in HU after
    ``raw * slope + inter``, with their :class:`Geometry`."""

    def __init__(self, raw, geometry: Geometry, slope: float = 1.0, inter: float = 0.0):
        if tuple(raw.shape) != geometry.shape:
            raise VolumeError("unsupported")
        self.raw, self.geometry = raw, geometry
        self.slope, self.inter = float(slope), float(inter)

    def block(self, lo, hi) -> np.ndarray:
        """HU (float32) of voxels ``lo[a] <= index[a] < hi[a]`` (bounds inside the volume)."""
        try:
            part = np.asarray(self.raw[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]])
        except (OSError, ValueError, EOFError, zlib.error):
            raise VolumeError("decode_error") from None
        out = part.astype(np.float32)
        if self.slope != 1.0:
            out *= np.float32(self.slope)
        if self.inter != 0.0:
            out += np.float32(self.inter)
        return out


# ----------------------------------------------------------------------------- MetaImage

def read_mhd_header(path) -> tuple[dict[str, str], int]:
    """(``key -> value`` of a MetaImage header, byte offset just after it).

    The header is ``Key = value`` lines; it ends with the ``ElementDataFile`` line (in a ``.mha``
    file the pixel data follows it).
    """
    fields: dict[str, str] = {}
    try:
        with open(path, "rb") as f:
            pos = 0
            for _ in range(200):
                line = f.readline(4096)
                if not line:
                    break
                pos += len(line)
                text = line.decode("latin-1").strip()
                if not text:
                    continue
                key, eq, value = text.partition("=")
                if not eq:
                    raise VolumeError("unreadable")
                key = key.strip()
                fields[key] = value.strip()
                if key == "ElementDataFile":
                    return fields, pos
    except OSError:
        raise VolumeError("unreadable") from None
    raise VolumeError("unreadable")


def _floats(text: str | None, n: int) -> list[float] | None:
    if text is None:
        return None
    try:
        vals = [float(v) for v in text.split()]
    except ValueError:
        raise VolumeError("unreadable") from None
    if len(vals) != n:
        raise VolumeError("unsupported")
    return vals


def _is_true(text: str | None) -> bool:
    return str(text or "").strip().lower() in ("true", "1", "yes")


def mhd_geometry(fields: dict[str, str]) -> Geometry:
    if fields.get("ObjectType", "Image").strip().lower() != "image":
        raise VolumeError("unsupported")
    try:
        ndims = int(fields.get("NDims", "0"))
    except ValueError:
        raise VolumeError("unreadable") from None
    if ndims != 3:
        raise VolumeError("unsupported")
    dims = _floats(fields.get("DimSize"), 3)
    if dims is None or any(d != int(d) or d < 1 for d in dims):
        raise VolumeError("unreadable")
    spacing = _floats(fields.get("ElementSpacing") or fields.get("ElementSize"), 3) or [1.0, 1.0, 1.0]
    origin = _floats(fields.get("Offset") or fields.get("Position") or fields.get("Origin"), 3) or [0.0, 0.0, 0.0]
    matrix = _floats(fields.get("TransformMatrix") or fields.get("Rotation") or fields.get("Orientation"), 9)
    rows = np.asarray(matrix if matrix is not None else [1, 0, 0, 0, 1, 0, 0, 0, 1], dtype=np.float64).reshape(3, 3)
    return Geometry([int(d) for d in dims], spacing, origin, rows.T)  # row a of the file = direction of axis a


def open_mhd(path) -> Volume:
    """A MetaImage volume (``.mhd`` header + data file, or ``.mha``); uncompressed data is memory-mapped."""
    path = Path(path)
    fields, header_end = read_mhd_header(path)
    geom = mhd_geometry(fields)
    etype = fields.get("ElementType", "").strip().upper()
    if etype not in _MET_TYPES:
        raise VolumeError("unsupported")
    try:
        channels = int(fields.get("ElementNumberOfChannels", "1"))
    except ValueError:
        raise VolumeError("unreadable") from None
    if channels != 1 or "ElementDataFile" not in fields:
        raise VolumeError("unsupported")
    msb = _is_true(fields.get("ElementByteOrderMSB") or fields.get("BinaryDataByteOrderMSB"))
    dtype = np.dtype(_MET_TYPES[etype]).newbyteorder(">" if msb else "<")
    if "BinaryData" in fields and not _is_true(fields["BinaryData"]):
        raise VolumeError("unsupported")  # ASCII voxel values
    data_name = fields["ElementDataFile"].strip()
    if data_name.upper() == "LOCAL":
        data_path, offset = path, header_end
    elif data_name.upper().startswith("LIST") or "%" in data_name or " " in data_name:
        raise VolumeError("unsupported")  # one file per slice
    else:
        data_path, offset = path.parent / data_name, 0
    ni, nj, nk = geom.shape
    nbytes = ni * nj * nk * dtype.itemsize
    try:
        size = os.path.getsize(data_path)
    except OSError:
        raise VolumeError("unreadable") from None
    try:
        skip = int(fields.get("HeaderSize", "0"))
    except ValueError:
        raise VolumeError("unreadable") from None
    compressed = _is_true(fields.get("CompressedData"))
    if compressed:
        try:
            with open(data_path, "rb") as f:
                f.seek(offset + max(skip, 0))
                data = zlib.decompress(f.read())
        except (OSError, zlib.error):
            raise VolumeError("decode_error") from None
        if len(data) < nbytes:
            raise VolumeError("truncated")
        arr = np.frombuffer(data, dtype=dtype, count=ni * nj * nk)
    else:
        offset = size - nbytes if skip == -1 else offset + max(skip, 0)
        if offset < 0 or size < offset + nbytes:
            raise VolumeError("truncated")
        try:
            arr = np.memmap(data_path, dtype=dtype, mode="r", offset=offset, shape=(ni * nj * nk,))
        except (OSError, ValueError):
            raise VolumeError("unreadable") from None
    return Volume(arr.reshape(nk, nj, ni).transpose(2, 1, 0), geom)  # x fastest in the file


# ----------------------------------------------------------------------------- NIfTI

def open_nifti(path) -> Volume:
    """A NIfTI volume; the RAS affine converted to LPS; values scaled by scl_slope/scl_inter."""
    import nibabel as nib  # heavy, optional (nibabel): only for NIfTI volumes

    try:
        img = nib.load(str(path))
        shape = tuple(int(s) for s in img.shape)
        if len(shape) == 4 and shape[3] == 1:
            shape = shape[:3]
        if len(shape) != 3:
            raise VolumeError("unsupported")
        geom = Geometry.from_ras_affine(shape, img.affine)
        proxy = img.dataobj
        slope, inter = getattr(proxy, "slope", 1.0), getattr(proxy, "inter", 0.0)
        slope = 1.0 if slope is None or not np.isfinite(slope) or slope == 0 else float(slope)
        inter = 0.0 if inter is None or not np.isfinite(inter) else float(inter)
        # raw stored values: an uncompressed file is memory-mapped by nibabel, a .nii.gz read once
        raw = proxy.get_unscaled() if hasattr(proxy, "get_unscaled") else np.asanyarray(proxy)
        if raw.ndim == 4:
            raw = raw[..., 0]
    except VolumeError:
        raise
    except EOFError:
        raise VolumeError("truncated") from None
    except Exception:
        raise VolumeError("unreadable") from None
    return Volume(raw, geom, slope, inter)


# ----------------------------------------------------------------------------- DICOM series

@dataclass
class DicomSlice:
    path: str
    position: np.ndarray      # ImagePositionPatient
    orientation: np.ndarray   # ImageOrientationPatient (6)
    spacing: tuple[float, float]  # PixelSpacing: (between rows, between columns)
    rows: int
    columns: int
    frames: int


def dicom_slice(ds, path) -> DicomSlice | None:
    """The geometry facts of one DICOM image header, or None when it has none."""
    try:
        pos = np.asarray([float(v) for v in ds.ImagePositionPatient], dtype=np.float64)
        ori = np.asarray([float(v) for v in ds.ImageOrientationPatient], dtype=np.float64)
        ps = [float(v) for v in ds.PixelSpacing]
        frames = int(ds.get("NumberOfFrames") or 1)
        if pos.shape != (3,) or ori.shape != (6,) or len(ps) != 2:
            return None
        return DicomSlice(str(path), pos, ori, (ps[0], ps[1]), int(ds.Rows), int(ds.Columns), frames)
    except (AttributeError, KeyError, TypeError, ValueError):
        return None


def dicom_series_geometry(slices: list[DicomSlice]) -> tuple[Geometry, list[DicomSlice]]:
    """Geometry of a series and its slices in index (``k``) order; raises :class:`VolumeError`."""
    if not slices or any(s.frames != 1 for s in slices):
        raise VolumeError("unsupported")
    first = slices[0]
    for s in slices[1:]:
        if (s.rows, s.columns) != (first.rows, first.columns) or not np.allclose(s.orientation, first.orientation,
                                                                               atol=1e-4):
            raise VolumeError("unsupported")
        if not np.allclose(s.spacing, first.spacing, rtol=1e-4):
            raise VolumeError("unsupported")
    row_dir, col_dir = first.orientation[:3], first.orientation[3:]
    row_dir = row_dir / np.linalg.norm(row_dir)
    col_dir = col_dir / np.linalg.norm(col_dir)
    normal = np.cross(row_dir, col_dir)
    order = sorted(slices, key=lambda s: float(s.position @ normal))
    pos = np.array([s.position for s in order])
    if len(order) == 1:
        dz = 1.0
    else:
        steps = np.diff(pos @ normal)
        dz = float(np.mean(steps))
        if dz <= 0 or float(np.max(np.abs(steps - dz))) > SLICE_TOLERANCE * dz:
            raise VolumeError("irregular_slices")
        # the slices must lie along the normal (no gantry tilt / shear)
        along = pos - pos[0]
        off_axis = along - np.outer(along @ normal, normal)
        if float(np.max(np.abs(off_axis))) > SLICE_TOLERANCE * max(dz, 1.0) + 1e-3:
            raise VolumeError("unsupported")
    direction = np.stack([row_dir, col_dir, normal], axis=1)
    row_spacing, col_spacing = first.spacing
    geom = Geometry((first.columns, first.rows, len(order)), (col_spacing, row_spacing, dz), pos[0], direction)
    return geom, order


def open_dicom_series(slices: list[DicomSlice]) -> Volume:
    """The volume of one DICOM series (every slice decoded, modality LUT applied)."""
    from pydicom.pixels import apply_modality_lut  # heavy (pydicom): only for DICOM series

    geom, order = dicom_series_geometry(slices)
    ni, nj, nk = geom.shape
    vol = np.empty((ni, nj, nk), dtype=np.float32)
    for k, s in enumerate(order):
        try:
            ds = R.read_dicom(s.path)
            with R.quiet_pydicom():
                arr = apply_modality_lut(ds.pixel_array, ds)
        except R.ReadError as e:
            raise VolumeError("unreadable" if e.reason in ("unreadable", "not_dicom_or_image") else "decode_error") from None
        except Exception:
            raise VolumeError("decode_error") from None
        if arr.shape != (nj, ni):
            raise VolumeError("unsupported")
        vol[:, :, k] = np.asarray(arr, dtype=np.float32).T  # pixel [row j, column i]
    return Volume(vol, geom)


# ----------------------------------------------------------------------------- finding volumes

@dataclass
class VolumeSource:
    """One volume found in the sources, keyed by its series UID (kept in memory only)."""

    uid: str
    kind: str                 # mhd, nifti, dicom
    path: str                 # the header / NIfTI file, or the first slice's file
    rel: str                  # path relative to its source (pseudonymised before use)
    slices: list[DicomSlice] = field(default_factory=list)
    facts: dict = field(default_factory=dict)  # DICOM: dicom_meta() of the first slice (raw ids in memory)
    error: str | None = None  # a reason found while scanning

    def geometry(self) -> Geometry:
        if self.error:
            raise VolumeError(self.error)
        if self.kind == "mhd":
            fields, _ = read_mhd_header(self.path)
            return mhd_geometry(fields)
        if self.kind == "nifti":
            import nibabel as nib  # heavy, optional (nibabel): only for NIfTI volumes

            try:
                img = nib.load(self.path)
                shape = tuple(int(s) for s in img.shape)
                affine = img.affine
            except Exception:
                raise VolumeError("unreadable") from None
            if len(shape) == 4 and shape[3] == 1:
                shape = shape[:3]
            if len(shape) != 3:
                raise VolumeError("unsupported")
            return Geometry.from_ras_affine(shape, affine)
        return dicom_series_geometry(self.slices)[0]

    def open(self) -> Volume:
        if self.error:
            raise VolumeError(self.error)
        if self.kind == "mhd":
            return open_mhd(self.path)
        if self.kind == "nifti":
            return open_nifti(self.path)
        return open_dicom_series(self.slices)


def _volume_kind(name: str) -> str | None:
    low = name.lower()
    if low.endswith(MHD_EXTS):
        return "mhd"
    if low.endswith(NIFTI_EXTS):
        return "nifti"
    return None


def _uid_from_name(name: str) -> str:
    low = name.lower()
    for ext in (".nii.gz", ".nii", ".mhd", ".mha"):
        if low.endswith(ext):
            return name[: -len(ext)]
    return name


def find_volumes(sources) -> tuple[dict[str, VolumeSource], dict]:
    """Every volume under ``sources`` (files or folders, recursive, sorted, hidden names skipped).

    MetaImage and NIfTI files are named after their series UID (``<uid>.mhd``, ``<uid>.nii.gz``, as
    LUNA16 ships them); DICOM files (recognised by content) are grouped by SeriesInstanceUID.
    Returns ``({uid: VolumeSource}, counts)``; a UID found twice keeps one volume (the first
    MetaImage/NIfTI file in sorted path order, else the DICOM series) and is counted in
    ``duplicate_uids``.
    """
    files: list[tuple[str, str]] = []
    for src in sources:
        root = Path(src)
        if root.is_file():
            files.append((str(root), root.name))
            continue
        if not root.is_dir():
            raise UserError(f"{root}: no such file or folder")
        for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            rel_dir = os.path.relpath(dirpath, root)
            for fn in sorted(filenames):
                if not fn.startswith("."):
                    rel = fn if rel_dir == "." else f"{rel_dir}/{fn}".replace(os.sep, "/")
                    files.append((os.path.join(dirpath, fn), rel))
    files.sort(key=lambda t: t[1])
    found: dict[str, VolumeSource] = {}
    series: dict[str, VolumeSource] = {}
    counts = {"files": len(files), "mhd": 0, "nifti": 0, "dicom_files": 0, "dicom_series": 0, "duplicate_uids": 0,
              "dicom_without_geometry": 0}
    for full, rel in files:
        name = os.path.basename(rel)
        kind = _volume_kind(name)
        if kind is not None:
            counts[kind] += 1
            uid = _uid_from_name(name)
            if uid in found:
                counts["duplicate_uids"] += 1
                continue
            found[uid] = VolumeSource(uid, kind, full, rel)
            continue
        if name.lower().endswith(SKIP_EXTS):
            continue
        if R.sniff(full) != "dicom":
            continue
        try:
            ds = R.read_dicom(full, stop_before_pixels=True)
        except R.ReadError:
            continue
        with R.quiet_pydicom():
            uid = str(ds.get("SeriesInstanceUID") or "").strip()
            sl = dicom_slice(ds, full)
            facts = R.dicom_meta(ds) if uid and uid not in series else None
        if not uid:
            continue
        counts["dicom_files"] += 1
        if uid not in series:
            parent = rel.rsplit("/", 1)[0] if "/" in rel else rel
            series[uid] = VolumeSource(uid, "dicom", full, parent, facts=facts or {})
        if sl is None:
            counts["dicom_without_geometry"] += 1
            series[uid].error = "unsupported"
        else:
            series[uid].slices.append(sl)
    for uid, vs in series.items():
        counts["dicom_series"] += 1
        if uid in found:
            counts["duplicate_uids"] += 1
            continue
        found[uid] = vs
    return found, counts
