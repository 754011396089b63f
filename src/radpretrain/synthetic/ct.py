"""Synthetic chest CT volumes with planted "nodules", and a LUNA16-like candidate set.

A volume is drawn as a function of *world* position (LPS millimetres), then sampled on the
voxel grid of a :class:`~radpretrain.data.volumes.Geometry`, so any origin, anisotropic spacing
and direction matrix (flipped or permuted axes, oblique) holds the same anatomy at the same
world coordinates.  Anatomy: air (-1000 HU) around an elliptic body cylinder of soft tissue
(40 HU) holding two lungs (-850 HU) with vessels (tubes of 40 HU) and nodules (spheres of
20-80 HU).  Edges are partial-volume blended over about one voxel, so a sphere's centre is
where it was planted to a small fraction of a voxel.

Writers: :func:`write_mhd` (MetaImage ``.mhd`` + ``.raw``, as LUNA16 ships), :func:`write_nifti`
and :func:`write_dicom_series` (one CT file per slice, with fake patient data).

:func:`write_luna_like` (``radpretrain synth OUT --kind luna16``) writes a small LUNA16-like set::

    OUT/subset0/<seriesuid>.mhd, .raw   volumes (or .nii.gz / DICOM series folders)
    OUT/candidates.csv                  seriesuid, coordX, coordY, coordZ, class (1: nodule centre)
    OUT/annotations.csv                 seriesuid, coordX, coordY, coordZ, diameter_mm
    OUT/.synth/truth.json               geometry, nodules and the planted identifiers per scan

Negative candidates (random lung points and points on vessels, the hard ones) lie at least
``clear_mm`` plus the nodule's radius from every nodule centre, so a patch around a negative
never shows a nodule when its half-diagonal (:func:`patch_reach_mm`) plus one voxel (what
interpolation reads) is at most ``clear_mm``.  The candidate list also
holds one candidate outside its volume and one of a scan whose volume is not shipped, as real
candidate lists of a partial download do.  Same seed, same files.
"""

from __future__ import annotations

import csv
import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from radpretrain.data.volumes import Geometry
from radpretrain.errors import UserError
from radpretrain.synthetic.archive import prepare_out

AIR, BODY, LUNG, VESSEL = -1000.0, 40.0, -850.0, 40.0
CT_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
UID_ROOT = "1.3.6.1.4.1.14519.5.2.1.6279.6001."  # the LIDC/LUNA16 prefix; the rest is random
CT_FORMATS = ("mhd", "nifti", "dicom", "mixed")


@dataclass
class Nodule:
    center: np.ndarray  # LPS mm
    radius: float       # mm
    hu: float


@dataclass
class Vessel:
    start: np.ndarray
    direction: np.ndarray  # unit vector
    length: float
    radius: float


@dataclass
class Lung:
    center: np.ndarray
    axes: np.ndarray  # semi-axes along world x, y, z


@dataclass
class Chest:
    """What :func:`plan_chest` placed: the anatomy of one volume in world coordinates."""

    body_center: np.ndarray
    body_axes: np.ndarray  # semi-axes along world x, y (a cylinder along z)
    lungs: list[Lung]
    vessels: list[Vessel]
    nodules: list[Nodule]
    negatives: np.ndarray  # (n, 3) LPS mm
    hard: np.ndarray       # (n,) bool: the negative lies on a vessel


def world_box(geom: Geometry) -> tuple[np.ndarray, np.ndarray]:
    """(low, high) world corner of the volume's extent (the voxels' outer faces)."""
    n = np.asarray(geom.shape, dtype=np.float64)
    corners = np.array([[a, b, c] for a in (-0.5, n[0] - 0.5) for b in (-0.5, n[1] - 0.5) for c in (-0.5, n[2] - 0.5)])
    w = geom.index_to_world(corners)
    return w.min(axis=0), w.max(axis=0)


def _in_lung(p: np.ndarray, lung: Lung, margin: float = 0.0) -> bool:
    q = (p - lung.center) / np.maximum(lung.axes - margin, 1e-3)
    return float(q @ q) <= 1.0


def _random_in_lung(rng: np.random.Generator, lung: Lung, margin: float) -> np.ndarray:
    for _ in range(1000):
        p = lung.center + rng.uniform(-1, 1, 3) * lung.axes
        if _in_lung(p, lung, margin):
            return p
    raise ValueError("synth_ct: the lungs are too small for the margin asked for")


def plan_chest(geom: Geometry, rng: np.random.Generator, n_nodules: int = 3, n_negatives: int = 40,
               n_vessels: int = 10, radius_mm=(3.0, 6.0), clear_mm: float = 20.0, hard_fraction: float = 0.4) -> Chest:
    """Place body, lungs, vessels, nodules and negative candidates inside the volume ``geom``."""
    lo, hi = world_box(geom)
    c, ext = (lo + hi) / 2, hi - lo
    body_axes = np.array([0.46 * ext[0], 0.40 * ext[1]])
    lungs = [Lung(c + np.array([s * 0.21 * ext[0], -0.02 * ext[1], 0.0]),
                  np.array([0.16 * ext[0], 0.29 * ext[1], 0.44 * ext[2]])) for s in (-1, 1)]
    vessels = []
    for v in range(n_vessels):
        lung = lungs[v % 2]
        medial = lung.center + np.array([-np.sign(lung.center[0] - c[0]) * 0.5 * lung.axes[0], 0.0, 0.0])
        d = rng.normal(size=3) * np.array([1.0, 1.0, 0.6])
        d[0] = abs(d[0]) * np.sign(lung.center[0] - c[0])  # away from the middle
        d /= np.linalg.norm(d)
        vessels.append(Vessel(medial + rng.normal(0, 0.15, 3) * lung.axes, d,
                              float(rng.uniform(0.6, 1.2) * lung.axes[0] * 1.5), float(rng.uniform(0.8, 2.2))))
    nodules: list[Nodule] = []
    for n in range(n_nodules):
        r = float(rng.uniform(*radius_mm))
        for _ in range(1000):
            p = _random_in_lung(rng, lungs[int(rng.integers(2))], r + 2.0)
            if all(np.linalg.norm(p - o.center) > 2 * (r + o.radius) + 4 for o in nodules):
                break
        else:
            raise ValueError("synth_ct: no room for another nodule")
        nodules.append(Nodule(p, r, float(rng.uniform(20, 80))))
    negatives, hard = [], []
    for m in range(n_negatives):
        for _ in range(5000):
            on_vessel = bool(vessels) and rng.random() < hard_fraction
            if on_vessel:
                ves = vessels[int(rng.integers(len(vessels)))]
                p = ves.start + ves.direction * rng.uniform(0.1, 0.9) * ves.length
                if not any(_in_lung(p, lg, 1.0) for lg in lungs):
                    continue
            else:
                p = _random_in_lung(rng, lungs[int(rng.integers(2))], 1.0)
            if all(np.linalg.norm(p - o.center) >= o.radius + clear_mm for o in nodules):
                negatives.append(p)
                hard.append(on_vessel)
                break
        else:
            raise ValueError("synth_ct: no room for a negative candidate clear of the nodules; "
                             "use a larger volume or a smaller clear_mm")
    return Chest(np.array([c[0], c[1]]), body_axes, lungs, vessels, nodules,
                 np.array(negatives).reshape(-1, 3), np.array(hard, dtype=bool))


def _cover(d: np.ndarray, h: float) -> np.ndarray:
    """Partial-volume share of a voxel at signed distance ``d`` (mm, negative inside) of an edge."""
    return np.clip(0.5 - d / h, 0.0, 1.0)


def _mix(hu: np.ndarray, value: float, share: np.ndarray) -> None:
    hu += share * (value - hu)


def render_hu(geom: Geometry, chest: Chest, rng: np.random.Generator | None = None, noise: float = 20.0) -> np.ndarray:
    """Hounsfield units (float32, indexed ``[i, j, k]``) of ``chest`` sampled on the voxels of ``geom``."""
    ni, nj, nk = geom.shape
    idx = np.stack(np.meshgrid(np.arange(ni), np.arange(nj), np.arange(nk), indexing="ij"), axis=-1)
    p = geom.index_to_world(idx.reshape(-1, 3))
    h = float(np.exp(np.mean(np.log(geom.spacing))))  # edge width: the voxels' mean size
    hu = np.full(len(p), AIR)
    q = np.hypot((p[:, 0] - chest.body_center[0]) / chest.body_axes[0], (p[:, 1] - chest.body_center[1]) / chest.body_axes[1])
    _mix(hu, BODY, _cover((q - 1) * chest.body_axes.min(), h))
    lung_share = np.zeros(len(p))
    for lung in chest.lungs:
        q = np.linalg.norm((p - lung.center) / lung.axes, axis=1)
        lung_share = np.maximum(lung_share, _cover((q - 1) * lung.axes.min(), h))
    _mix(hu, LUNG, lung_share)
    for ves in chest.vessels:
        rel = p - ves.start
        t = np.clip(rel @ ves.direction, 0.0, ves.length)
        d = np.linalg.norm(rel - t[:, None] * ves.direction, axis=1) - ves.radius
        _mix(hu, VESSEL, _cover(d, h) * lung_share)
    for nod in chest.nodules:
        d = np.linalg.norm(p - nod.center, axis=1) - nod.radius
        _mix(hu, nod.hu, _cover(d, h))
    if rng is not None and noise > 0:
        hu += rng.normal(0.0, noise, len(p))
    return hu.reshape(ni, nj, nk).astype(np.float32)


def nodule_mask(geom: Geometry, nodules: list[Nodule]) -> np.ndarray:
    """1.0 inside any nodule, 0.0 elsewhere (float32, ``[i, j, k]``): what a patch must not show."""
    ni, nj, nk = geom.shape
    idx = np.stack(np.meshgrid(np.arange(ni), np.arange(nj), np.arange(nk), indexing="ij"), axis=-1)
    p = geom.index_to_world(idx.reshape(-1, 3))
    m = np.zeros(len(p), dtype=np.float32)
    for nod in nodules:
        m[np.linalg.norm(p - nod.center, axis=1) <= nod.radius + 1e-9] = 1.0
    return m.reshape(ni, nj, nk)


# ----------------------------------------------------------------------------- writers

def _hu16(hu: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(hu), -2048, 3071).astype(np.int16)


def _orientation_code(direction: np.ndarray) -> str:
    """ITK's AnatomicalOrientation letters (where each index axis comes *from*; identity = RAI)."""
    letters = []
    for a in range(3):
        w = int(np.argmax(np.abs(direction[:, a])))
        pos = direction[w, a] > 0
        letters.append(("R", "L", "A", "P", "I", "S")[2 * w + (0 if pos else 1)])
    return "".join(letters)


def _num(v: float) -> str:
    return repr(float(v)) if not float(v).is_integer() else str(int(v))


def write_mhd(path, hu: np.ndarray, geom: Geometry) -> Path:
    """MetaImage header ``path`` (.mhd) and its ``.raw`` data (MET_SHORT, little endian)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    raw = path.with_suffix(".raw")
    lines = [
        "ObjectType = Image", "NDims = 3", "BinaryData = True", "BinaryDataByteOrderMSB = False",
        "CompressedData = False",
        "TransformMatrix = " + " ".join(_num(v) for v in geom.direction.T.reshape(-1)),  # axis 0's direction first
        "Offset = " + " ".join(_num(v) for v in geom.origin),
        "CenterOfRotation = 0 0 0",
        f"AnatomicalOrientation = {_orientation_code(geom.direction)}",
        "ElementSpacing = " + " ".join(_num(v) for v in geom.spacing),
        "DimSize = " + " ".join(str(n) for n in geom.shape),
        "ElementType = MET_SHORT",
        f"ElementDataFile = {raw.name}",
    ]
    raw.write_bytes(np.ascontiguousarray(_hu16(hu).transpose(2, 1, 0)).astype("<i2").tobytes())  # x fastest
    path.write_text("\n".join(lines) + "\n")
    return path


def write_nifti(path, hu: np.ndarray, geom: Geometry) -> Path:
    """A NIfTI-1 file (int16 HU) whose RAS affine is ``geom``'s."""
    import nibabel as nib  # heavy, optional (nibabel): only for --ct-format nifti

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    affine = geom.ras_affine()
    img = nib.Nifti1Image(_hu16(hu), affine)
    img.set_sform(affine, code=1)
    img.set_qform(affine, code=1)
    nib.save(img, str(path))
    return path


def write_dicom_series(folder, hu: np.ndarray, geom: Geometry, *, series_uid: str, study_uid: str,
                       patient_id: str, patient_name: str = "DOE^JANE", rng: np.random.Generator | None = None) -> Path:
    """One CT DICOM file per ``k`` slice (uint16 + RescaleIntercept -1024) with the geometry of ``geom``.

    ``geom``'s third direction must be perpendicular to the first two (any orthonormal direction is).
    """
    from pydicom.dataset import Dataset, FileMetaDataset  # heavy (pydicom): only for DICOM series
    from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, ExplicitVRLittleEndian

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = rng or np.random.default_rng(0)
    stored = np.clip(np.rint(hu) + 1024, 0, 4095).astype(np.uint16)
    row_dir, col_dir = geom.direction[:, 0], geom.direction[:, 1]
    for k in range(geom.shape[2]):
        sop = f"{series_uid}.{k + 1}"
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CT_STORAGE
        meta.MediaStorageSOPInstanceUID = sop
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID, ds.SOPInstanceUID = CT_STORAGE, sop
        ds.Modality = "CT"
        ds.PatientID, ds.PatientName = patient_id, patient_name
        ds.PatientBirthDate, ds.PatientSex = "19580312", "F"
        ds.StudyDate = ds.SeriesDate = "20090614"
        ds.AccessionNumber = f"A{int(rng.integers(10**6, 10**7))}"
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid, series_uid
        ds.BodyPartExamined = "CHEST"
        ds.SeriesNumber, ds.InstanceNumber = 1, k + 1
        ds.ImagePositionPatient = [round(float(v), 6) for v in geom.index_to_world([0, 0, k])]
        ds.ImageOrientationPatient = [round(float(v), 8) for v in (*row_dir, *col_dir)]
        ds.PixelSpacing = [float(geom.spacing[1]), float(geom.spacing[0])]  # between rows, between columns
        ds.SliceThickness = float(geom.spacing[2])
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.Rows, ds.Columns = geom.shape[1], geom.shape[0]
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
        ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = -1024, 1, "HU"
        ds.PixelData = np.ascontiguousarray(stored[:, :, k].T).tobytes()  # [row j, column i]
        ds.save_as(folder / f"IM{k + 1:04d}.dcm", enforce_file_format=True)
    return folder


# ----------------------------------------------------------------------------- LUNA16-like set

def _fake_uid(rng: np.random.Generator) -> str:
    return UID_ROOT + "".join(str(int(d)) for d in rng.integers(0, 10, 26)).lstrip("0")


def luna_geometry(rng: np.random.Generator, shape=(128, 128, 48)) -> Geometry:
    """A LUNA16-like scan geometry: in-plane 0.7-0.8 mm, 2.5 mm slices, identity direction."""
    sxy = float(np.round(rng.uniform(0.70, 0.80), 4))
    spacing = (sxy, sxy, 2.5)
    origin = (float(np.round(-shape[0] * sxy / 2 + rng.uniform(-10, 10), 3)),
              float(np.round(-shape[1] * sxy / 2 + rng.uniform(-10, 10), 3)),
              float(np.round(rng.uniform(-320, -280), 2)))
    return Geometry(shape, spacing, origin, np.eye(3))


def write_luna_like(out, n_scans: int = 3, seed: int = 0, fmt: str = "mhd", shape=(128, 128, 48),
                    n_nodules: int = 4, n_negatives: int = 60, clear_mm: float = 20.0, extras: bool = True,
                    overwrite: bool = False) -> dict:
    """Write a LUNA16-like set (see the module docstring); returns a summary dict.

    ``fmt``: ``mhd`` (as LUNA16), ``nifti``, ``dicom`` or ``mixed`` (the formats in turn).
    ``clear_mm``: negatives lie at least this far from every nodule's surface.
    """
    if n_scans < 1:
        raise UserError(f"--patients must be at least 1 for a CT candidate set (got {n_scans})")
    if fmt not in CT_FORMATS:
        raise UserError(f"--ct-format {fmt}: choose from {', '.join(CT_FORMATS)}")
    out = Path(out)
    prepare_out(out, overwrite)
    rng = np.random.default_rng([int(seed), 16])
    rows, notes, truth, phi = [], [], [], []
    for s in range(n_scans):
        srng = np.random.default_rng([int(seed), 16, s])
        geom = luna_geometry(srng, shape)
        chest = plan_chest(geom, srng, n_nodules=n_nodules, n_negatives=n_negatives, clear_mm=clear_mm)
        hu = render_hu(geom, chest, srng)
        uid = _fake_uid(srng)
        kind = ("mhd", "nifti", "dicom")[s % 3] if fmt == "mixed" else fmt
        pid = f"LIDC-SYN-{int(srng.integers(1000, 9999)):04d}"
        if kind == "mhd":
            write_mhd(out / "subset0" / f"{uid}.mhd", hu, geom)
        elif kind == "nifti":
            write_nifti(out / "subset0" / f"{uid}.nii.gz", hu, geom)
        else:
            study = _fake_uid(srng)
            write_dicom_series(out / "subset0" / pid / uid, hu, geom, series_uid=uid, study_uid=study,
                               patient_id=pid, rng=srng)
            phi += [pid, study]
        phi.append(uid)
        cands = [(n.center, 1) for n in chest.nodules] + [(p, 0) for p in chest.negatives]
        for i in srng.permutation(len(cands)):
            rows.append((uid, *cands[i][0], cands[i][1]))
        notes += [(uid, *n.center, 2 * n.radius) for n in chest.nodules]
        truth.append({"seriesuid": uid, "format": kind, "patient_id": pid if kind == "dicom" else None,
                      "shape": list(geom.shape), "spacing": geom.spacing.tolist(), "origin": geom.origin.tolist(),
                      "direction": geom.direction.tolist(),
                      "nodules": [{"center": n.center.tolist(), "radius_mm": n.radius, "hu": n.hu} for n in chest.nodules],
                      "negatives": int(len(chest.negatives)), "hard_negatives": int(chest.hard.sum())})
    extra = {}
    if extras:
        lo, hi = world_box(Geometry(truth[0]["shape"], truth[0]["spacing"], truth[0]["origin"], truth[0]["direction"]))
        rows.append((truth[0]["seriesuid"], float(hi[0] + 50.0), float((lo[1] + hi[1]) / 2), float((lo[2] + hi[2]) / 2), 0))
        missing = _fake_uid(rng)
        phi.append(missing)
        rows.append((missing, -50.0, 20.0, -150.0, 0))
        extra = {"outside_volume": 1, "unknown_series": 1}
    with open(out / "candidates.csv", "w", newline="") as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(["seriesuid", "coordX", "coordY", "coordZ", "class"])
        for uid, x, y, z, c in rows:
            w.writerow([uid, f"{x:.6f}", f"{y:.6f}", f"{z:.6f}", c])
    with open(out / "annotations.csv", "w", newline="") as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(["seriesuid", "coordX", "coordY", "coordZ", "diameter_mm"])
        for uid, x, y, z, d in notes:
            w.writerow([uid, f"{x:.6f}", f"{y:.6f}", f"{z:.6f}", f"{d:.4f}"])
    hidden = out / ".synth"
    hidden.mkdir(exist_ok=True)
    summary = {"kind": "luna16", "n_scans": n_scans, "seed": int(seed), "format": fmt, "clear_mm": clear_mm,
               "candidates": len(rows), "positives": sum(1 for r in rows if r[4] == 1),
               "negatives": sum(1 for r in rows if r[4] == 0), "planted_rejects": extra}
    (hidden / "truth.json").write_text(json.dumps({"summary": summary, "scans": truth}, indent=1) + "\n")
    (hidden / "planted_phi.json").write_text(json.dumps({"all": sorted(phi)}, indent=1) + "\n")
    summary["out"] = str(out)
    return summary


def patch_reach_mm(size: int, spacing_mm: float) -> float:
    """How far from its centre a square patch of ``size`` pixels at ``spacing_mm`` reaches, in any
    plane through the centre: half its diagonal."""
    return math.sqrt(2.0) * size * spacing_mm / 2.0
