"""``radpretrain patches``: candidate locations in CT volumes -> a labelled store of 2-D patches.

The downstream task of LUNA16's false-positive reduction: every row of a candidates CSV
(``seriesuid, coordX, coordY, coordZ, class``; world millimetres in the LPS patient system) is
a location in a CT volume to classify as nodule (class 1) or not (class 0).  For each candidate
this module samples ``--size`` x ``--size`` pixel patches centred on it, applies ingest's CT
window (:func:`radpretrain.data.intensity.ct_window`) and writes a normal dataset store
(:mod:`radpretrain.data.store`) that ``split``, ``info``, ``pretrain`` and ``evaluate`` read like
any other.

Volumes (:mod:`radpretrain.data.volumes`): MetaImage ``<seriesuid>.mhd``/``.raw`` (LUNA16's
format), NIfTI ``<seriesuid>.nii[.gz]`` and DICOM series (grouped by SeriesInstanceUID), found
recursively under the ``VOLUMES`` folders.  A candidate's world point becomes a continuous voxel
index through the volume's origin, spacing and direction matrix.

Patches (``--planes``), in patient axes and radiological display:

* ``axial``: the transverse plane through the candidate (columns towards the patient's left,
  rows towards posterior: the patient's right on the image's left, anterior up);
* ``three``: axial, coronal (rows towards the feet) and sagittal (columns towards posterior);
* ``random``: ``--random-planes`` planes of random orientation through the candidate (a uniformly
  random rotation of the axial frame, seeded per candidate row), i.e. planes of the cube around it.

Pixels are ``--spacing`` mm apart (default: the volume's smallest voxel spacing, so an axial
patch of a usual CT samples its own voxel grid); values are trilinearly interpolated in HU at
the exact candidate position (the patch centre, between the two middle pixels for an even
size).  Patch parts outside the volume are filled with air (-1000 HU) and counted.

Store: the manifest has ingest's columns, then ``label`` (the candidate's class),
``candidate_id`` (keyed pseudonym of the series UID and the CSV row), ``scan_id`` (the scan's
pseudonym, equal to ``series_id``) and ``plane``.  ``patient_id`` is the keyed pseudonym of the
patient (an optional ``patient_id`` column of the CSV, else the DICOM PatientID, else one per
scan), so every patch of a scan shares its patient and ``split`` keeps them in one fold.
Candidates that cannot become patches (``invalid_row``, ``unknown_series``, ``unreadable_volume``,
``outside_volume``) are ``quarantined`` rows of the manifest, counted in ``qc_summary.json`` and
listed by CSV row number (never by series UID) in ``rejected_candidates.csv``.

``--neg-per-pos N`` keeps ``round(N x positives)`` of the usable negatives, chosen uniformly at
random with ``--seed`` (deterministic); the full counts are recorded in ``qc_summary.json`` and
``store.json`` (``candidates``) so ``evaluate`` can estimate false positives per scan on the
full candidate list (docs/ct_patches.md).
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm import tqdm

from radpretrain.data import intensity as I
from radpretrain.data.deid import Pseudonymizer, check_store_location
from radpretrain.data.manifest import CONTENT_HASH, MANIFEST_COLUMNS, cast_columns, qc_summary
from radpretrain.data.readers import content_hash
from radpretrain.data.store import SHARD_DIR, ShardWriter, write_manifest, write_store_meta
from radpretrain.data.vocab import BODY_PARTS
from radpretrain.data.volumes import VolumeError, find_volumes
from radpretrain.errors import InputFileError, UserError
from radpretrain.utils import get_logger, write_json

log = get_logger("radpretrain.data.patches")

LABEL_COLUMN = "label"
CANDIDATE_COLUMN = "candidate_id"
SCAN_COLUMN = "scan_id"
PLANE_COLUMN = "plane"
EXTRA_COLUMNS = [LABEL_COLUMN, CANDIDATE_COLUMN, SCAN_COLUMN, PLANE_COLUMN]
ID_COLUMNS = [CANDIDATE_COLUMN, SCAN_COLUMN]
STORE_KIND = "ct-candidate-patches"
REJECTS_FILE = "rejected_candidates.csv"
CANDIDATE_REASONS = ("invalid_row", "unknown_series", "unreadable_volume", "outside_volume")
PLANE_MODES = ("axial", "three", "random")
REQUIRED_COLUMNS = ("seriesuid", "coordX", "coordY", "coordZ", "class")
PATIENT_COLUMN = "patient_id"
AIR_HU = -1000.0

# (column direction, row direction) of each fixed plane, in LPS
FIXED_PLANES = {
    "axial": ((1.0, 0.0, 0.0), (0.0, 1.0, 0.0)),
    "coronal": ((1.0, 0.0, 0.0), (0.0, 0.0, -1.0)),
    "sagittal": ((0.0, 1.0, 0.0), (0.0, 0.0, -1.0)),
}


# ----------------------------------------------------------------------------- candidates

def read_candidates(path) -> pd.DataFrame:
    """The candidates CSV as a table: ``row`` (1-based data row), ``seriesuid``, ``x, y, z`` (float),
    ``cls`` (int, -1 when invalid), ``patient`` ('' when not given) and ``problem`` ('' or ``invalid_row``).

    Column names are matched case-insensitively; a missing column is a :class:`InputFileError`.
    Rows with a missing or non-numeric coordinate or a class that is not an integer >= 0 are kept
    with ``problem = invalid_row`` (they are listed, not dropped).
    """
    p = Path(path)
    try:
        df = pd.read_csv(p, dtype=str, keep_default_na=False)
    except FileNotFoundError:
        raise InputFileError(p, "no such candidates file") from None
    except (OSError, ValueError, pd.errors.ParserError, UnicodeDecodeError) as e:
        raise InputFileError(p, f"cannot read the candidates CSV ({type(e).__name__})") from None
    lower = {c.strip().lower(): c for c in df.columns}
    missing = [c for c in REQUIRED_COLUMNS if c.lower() not in lower]
    if missing:
        raise InputFileError(p, f"the candidates CSV needs the columns {', '.join(REQUIRED_COLUMNS)} "
                             f"(missing: {', '.join(missing)})")
    if not len(df):
        raise InputFileError(p, "the candidates CSV has no rows")
    col = {c: df[lower[c.lower()]].astype(str).str.strip() for c in REQUIRED_COLUMNS}
    xyz = np.stack([pd.to_numeric(col[c], errors="coerce").to_numpy(np.float64) for c in ("coordX", "coordY", "coordZ")],
                   axis=1)
    cls_f = pd.to_numeric(col["class"], errors="coerce").to_numpy(np.float64)
    ok_cls = np.isfinite(cls_f) & (cls_f >= 0) & (cls_f == np.round(cls_f))
    ok = np.all(np.isfinite(xyz), axis=1) & ok_cls & (col["seriesuid"].to_numpy() != "")
    out = pd.DataFrame({
        "row": np.arange(1, len(df) + 1), "seriesuid": col["seriesuid"].to_numpy(),
        "x": xyz[:, 0], "y": xyz[:, 1], "z": xyz[:, 2],
        "cls": np.where(ok_cls, np.nan_to_num(cls_f), -1).astype(np.int64),
        "patient": (df[lower[PATIENT_COLUMN]].astype(str).str.strip().to_numpy() if PATIENT_COLUMN in lower
                    else np.full(len(df), "", dtype=object)),
        "problem": np.where(ok, "", "invalid_row"),
    })
    return out


def negative_sample(is_negative: np.ndarray, n_positive: int, neg_per_pos: float | None, seed: int) -> np.ndarray:
    """Which of the usable candidates to keep: every positive and ``min(n, round(neg_per_pos * n_positive))``
    negatives drawn uniformly without replacement (seeded; ``neg_per_pos`` None keeps all)."""
    keep = np.ones(len(is_negative), dtype=bool)
    if neg_per_pos is None:
        return keep
    neg = np.flatnonzero(is_negative)
    n_keep = min(len(neg), int(round(neg_per_pos * n_positive)))
    chosen = np.zeros(len(neg), dtype=bool)
    chosen[np.random.default_rng(seed).choice(len(neg), size=n_keep, replace=False)] = True
    keep[neg[~chosen]] = False
    return keep


# ----------------------------------------------------------------------------- geometry of patches

def random_rotation(rng: np.random.Generator) -> np.ndarray:
    """A uniformly random 3-D rotation (QR of a Gaussian matrix, signs fixed so it is Haar-distributed)."""
    q, r = np.linalg.qr(rng.normal(size=(3, 3)))
    q = q * np.sign(np.diag(r))[None, :]
    if np.linalg.det(q) < 0:
        q[:, 0] = -q[:, 0]
    return q


def plane_axes(mode: str, n_random: int = 3, rng: np.random.Generator | None = None) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """``(name, column direction, row direction)`` of each patch of a candidate (unit LPS vectors)."""
    if mode == "axial":
        names = ["axial"]
    elif mode == "three":
        names = ["axial", "coronal", "sagittal"]
    elif mode == "random":
        u0, v0 = (np.asarray(a) for a in FIXED_PLANES["axial"])
        out = []
        for m in range(n_random):
            rot = random_rotation(rng)
            out.append((f"random{m}", rot @ u0, rot @ v0))
        return out
    else:
        raise ValueError(mode)
    return [(n, np.asarray(FIXED_PLANES[n][0]), np.asarray(FIXED_PLANES[n][1])) for n in names]


def plane_points(center, u, v, size: int, spacing: float) -> np.ndarray:
    """World points [size, size, 3] of a patch: pixel (r, c) at ``center + (c - m) s u + (r - m) s v``,
    ``m = (size - 1) / 2``, ``s = spacing``."""
    t = (np.arange(size, dtype=np.float64) - (size - 1) / 2.0) * float(spacing)
    return (np.asarray(center, np.float64)[None, None, :] + t[None, :, None] * np.asarray(u, np.float64)
            + t[:, None, None] * np.asarray(v, np.float64))


def sample_plane(volume, center, u, v, size: int, spacing: float, fill: float = AIR_HU) -> tuple[np.ndarray, int]:
    """``(HU patch float32 [size, size], pixels outside the volume)``: trilinear samples of ``volume``
    (a :class:`radpretrain.data.volumes.Volume`) on :func:`plane_points`; outside pixels get ``fill``.

    Only the block of voxels around the patch is read.
    """
    from scipy import ndimage  # heavy (scipy): only when patches are cut

    geom = volume.geometry
    idx = geom.world_to_index(plane_points(center, u, v, size, spacing))
    inside = geom.inside(idx)
    out = np.full((size, size), fill, dtype=np.float32)
    n_out = int(inside.size - np.count_nonzero(inside))
    if not inside.any():
        return out, n_out
    pts = idx[inside]
    shape = np.asarray(geom.shape)
    lo = np.maximum(np.floor(pts.min(axis=0)).astype(np.int64) - 1, 0)
    hi = np.minimum(np.ceil(pts.max(axis=0)).astype(np.int64) + 2, shape)
    block = volume.block(lo, hi)
    out[inside] = ndimage.map_coordinates(block, (pts - lo).T, order=1, mode="nearest")
    return out, n_out


# ----------------------------------------------------------------------------- the store

def _check_out(out: Path, sources) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"{out}: exists and is not an empty folder; choose a new --out")
    check_store_location(out, sources, "volumes folder")


def _scan_identity(vs, uid: str, patient_value: str, pseudo, body_part: str | None) -> dict:
    """Pseudonyms and facts shared by every patch of one scan (``vs`` None: no volume for ``uid``)."""
    facts = vs.facts if vs is not None and vs.kind == "dicom" else {}
    if patient_value:
        pid, pid_source = pseudo.patient(patient_value), "csv"
    elif facts.get("patient_id"):
        pid, pid_source = pseudo.patient(facts["patient_id"]), "dicom"
    else:
        pid, pid_source = pseudo.token("patient", f"\x00scan:{uid}"), "per-scan"
    return {
        "patient_id": pid, "_pid_source": pid_source,
        "study_id": pseudo.study(facts["study_uid"]) if facts.get("study_uid") else pseudo.study(f"scan:{uid}"),
        "series_id": pseudo.series(uid),
        "modality": "CT",
        "body_part": facts.get("body_part") if facts.get("body_part") not in (None, "unknown") else (body_part or "unknown"),
        "view": "unknown", "sex": facts.get("sex", "unknown"), "age_years": float(facts.get("age_years", float("nan"))),
        "source": pseudo.path(vs.rel) if vs is not None else "",
        "source_format": vs.kind if vs is not None else "unknown",
    }


def _row(ident: dict, image_id: str, cand) -> dict:
    row = {"image_id": image_id, **ident}
    row.update({"height": 0, "width": 0, "orig_height": 0, "orig_width": 0, "content_hash": "",
                "status": "quarantined", "reason": "", "shard": "", "offset": -1})
    row[LABEL_COLUMN] = int(cand.cls) if cand.cls >= 0 else None
    row[SCAN_COLUMN] = ident["series_id"]
    return row


def make_patch_store(sources, candidates, out, *, size: int = 64, planes: str = "axial", random_planes: int = 3,
                     spacing: float | None = None, neg_per_pos: float | None = None, seed: int = 0,
                     ct_window=I.CT_WINDOW, body_part: str | None = None, key: bytes | None = None,
                     progress: bool = True) -> dict:
    """Write the patch store ``out`` (see the module docstring); returns the QC summary."""
    out = Path(out)
    if not 8 <= int(size) <= 1024:
        raise UserError(f"--size {size}: choose 8 to 1024 pixels")
    if planes not in PLANE_MODES:
        raise UserError(f"--planes {planes}: choose from {', '.join(PLANE_MODES)}")
    if random_planes < 1:
        raise UserError(f"--random-planes {random_planes}: must be at least 1")
    if spacing is not None and not (spacing > 0 and math.isfinite(spacing)):
        raise UserError(f"--spacing {spacing}: must be a positive number of millimetres")
    if neg_per_pos is not None and not (neg_per_pos > 0 and math.isfinite(neg_per_pos)):
        raise UserError(f"--neg-per-pos {neg_per_pos}: must be a positive number")
    lo_hu, hi_hu = (float(v) for v in ct_window)
    if not hi_hu > lo_hu:
        raise UserError(f"--ct-window {lo_hu:g} {hi_hu:g}: the upper end must be above the lower one")
    _check_out(out, sources)
    cands = read_candidates(candidates)
    pseudo = Pseudonymizer(key)
    volumes, vcounts = find_volumes(sources)
    if not volumes:
        raise UserError(f"{', '.join(map(str, sources))}: no CT volumes found (MetaImage .mhd/.mha, NIfTI "
                        ".nii/.nii.gz named after their series UID, or DICOM series)")

    # one patient value per scan (CSV column), checked for consistency
    scan_patient: dict[str, str] = {}
    for r in cands[cands["patient"] != ""].itertuples(index=False):
        if r.patient:
            prev = scan_patient.setdefault(r.seriesuid, r.patient)
            if prev != r.patient:
                raise InputFileError(candidates, f"row {r.row} gives another {PATIENT_COLUMN} than an earlier "
                                     "row of the same series")

    # pass 1: which candidates can become patches (volume headers only)
    geoms, vol_errors = {}, {}
    for uid in sorted(set(cands["seriesuid"]) & set(volumes)):
        try:
            geoms[uid] = volumes[uid].geometry()
        except VolumeError as e:
            vol_errors[uid] = e.reason
    reason = cands["problem"].to_numpy(dtype=object).copy()
    detail = np.full(len(cands), "", dtype=object)
    uids = cands["seriesuid"].to_numpy(dtype=object)
    xyz = cands[["x", "y", "z"]].to_numpy(np.float64)
    open_rows = reason == ""
    reason[open_rows & ~pd.Series(uids).isin(volumes.keys()).to_numpy()] = "unknown_series"
    for uid, rows_of_uid in pd.Series(np.arange(len(cands))[reason == ""]).groupby(uids[reason == ""]):
        rows_of_uid = rows_of_uid.to_numpy()
        if uid in vol_errors:
            reason[rows_of_uid], detail[rows_of_uid] = "unreadable_volume", vol_errors[uid]
        else:
            g = geoms[uid]
            outside = ~g.inside(g.world_to_index(xyz[rows_of_uid]))
            reason[rows_of_uid[outside]] = "outside_volume"
    usable = reason == ""
    cls = cands["cls"].to_numpy()
    n_pos, n_neg = int((usable & (cls > 0)).sum()), int((usable & (cls == 0)).sum())
    if neg_per_pos is not None and n_pos == 0:
        raise InputFileError(candidates, "no usable positive candidate (class > 0), so --neg-per-pos would keep "
                             "no negatives")
    keep = np.zeros(len(cands), dtype=bool)
    keep[usable] = negative_sample(cls[usable] == 0, n_pos, neg_per_pos, seed)

    # pass 2: patches, one volume (and one shard) at a time
    recs = list(cands.itertuples(index=False))  # plain tuples: row access without pandas' per-row cost
    out.mkdir(parents=True, exist_ok=True)
    (out / SHARD_DIR).mkdir(exist_ok=True)
    rows: list[tuple[tuple[int, int], dict]] = []
    idents = {}
    padded = 0
    by_scan = {}
    for i in np.flatnonzero(keep):
        by_scan.setdefault(uids[i], []).append(i)
    scan_bar = tqdm(sorted(by_scan), unit="scan", desc="patches", disable=None if progress else True)
    for n_scan, uid in enumerate(scan_bar):
        vs = volumes[uid]
        ident = idents[uid] = _scan_identity(vs, uid, scan_patient.get(uid, ""), pseudo, body_part)
        shard = f"scan-{n_scan:06d}.bin"
        done: list[tuple[tuple[int, int], dict]] = []
        n_padded = 0
        try:
            vol = vs.open()
            sp = float(spacing) if spacing is not None else float(vol.geometry.spacing.min())
            with ShardWriter(out / SHARD_DIR / shard) as writer:
                for i in by_scan[uid]:
                    cand = recs[i]
                    center = np.array([cand.x, cand.y, cand.z])
                    rng = np.random.default_rng([int(seed), int(cand.row)])
                    for p, (name, u, v) in enumerate(plane_axes(planes, random_planes, rng)):
                        hu, n_out = sample_plane(vol, center, u, v, int(size), sp)
                        n_padded += n_out > 0
                        small = I.to_stored(I.ct_window(hu, lo_hu, hi_hu))
                        row = _row(ident, pseudo.image(f"candidate:{uid}#{int(cand.row)}", name), cand)
                        row.update({"height": int(size), "width": int(size), "orig_height": int(size),
                                    "orig_width": int(size), "content_hash": content_hash(small),
                                    "status": "ingested", "shard": shard, "offset": int(writer.append(small))})
                        row[CANDIDATE_COLUMN] = pseudo.token("candidate", f"{uid}#{int(cand.row)}")
                        row[PLANE_COLUMN] = name
                        done.append(((int(cand.row), p), row))
        except VolumeError as e:  # the header was fine, the voxels are not: every candidate of the scan is listed
            (out / SHARD_DIR / shard).unlink(missing_ok=True)
            for i in by_scan[uid]:
                reason[i], detail[i] = "unreadable_volume", e.reason
                keep[i] = False
            log.warning("scan %d of %d: voxels unreadable (%s); its candidates are listed in %s", n_scan + 1,
                        len(by_scan), e.reason, REJECTS_FILE)
            continue
        rows.extend(done)
        padded += n_padded

    # counts after the voxels were read: a scan whose voxels failed is no longer usable
    usable = reason == ""
    n_pos, n_neg = int((usable & (cls > 0)).sum()), int((usable & (cls == 0)).sum())
    scans_usable = sorted(set(cands["seriesuid"][usable]))
    subsampled_out = int((usable & ~keep).sum())

    # rejected candidates: one quarantined row each
    for i in np.flatnonzero(reason != ""):
        cand = recs[i]
        uid = cand.seriesuid
        if uid not in idents:
            idents[uid] = _scan_identity(volumes.get(uid), uid, scan_patient.get(uid, ""), pseudo, body_part)
        row = _row(idents[uid], pseudo.image(f"candidate:{uid}#{int(cand.row)}", "rejected"), cand)
        row["reason"] = reason[i]
        row[CANDIDATE_COLUMN] = pseudo.token("candidate", f"{uid}#{int(cand.row)}")
        row[PLANE_COLUMN] = ""
        rows.append(((int(cand.row), -1), row))
    rows.sort(key=lambda t: t[0])
    df = pd.DataFrame([r for _, r in rows])
    pid_sources = df.loc[df["status"] == "ingested", "_pid_source"].value_counts().to_dict() if len(df) else {}
    df = df.drop(columns=["_pid_source"])
    df = cast_columns(df[MANIFEST_COLUMNS + EXTRA_COLUMNS])
    df[LABEL_COLUMN] = df[LABEL_COLUMN].astype("Int64")
    write_manifest(out, df)

    rejected = pd.DataFrame({"row": cands["row"], "class": np.where(cls >= 0, cls, -1), "reason": reason,
                             "detail": detail})
    rejected = rejected[rejected["reason"] != ""]
    rejected["class"] = rejected["class"].map(lambda c: "" if c < 0 else str(int(c)))
    rejected.to_csv(out / REJECTS_FILE, index=False)

    pid_source = ("per-scan" if "per-scan" in pid_sources else "csv" if "csv" in pid_sources
                  else "dicom" if pid_sources else "per-scan")
    kept_cls = cls[keep]
    scans_kept = sorted(set(cands["seriesuid"][keep]))
    counts = {
        "rows": int(len(cands)),
        "by_class": {str(k): int(v) for k, v in sorted(pd.Series(cls[cls >= 0]).value_counts().items())},
        "rejected": {r: int((reason == r).sum()) for r in CANDIDATE_REASONS if (reason == r).any()},
        "rejected_detail": {str(k): int(v) for k, v in sorted(pd.Series(detail[detail != ""]).value_counts().items())},
        "usable": {"positives": n_pos, "negatives": n_neg},
        "kept": {"positives": int((kept_cls > 0).sum()), "negatives": int((kept_cls == 0).sum())},
        "negatives_subsampled_out": subsampled_out,
        "neg_per_pos": neg_per_pos, "seed": int(seed),
        "scans_with_usable_candidates": len(scans_usable), "scans_with_kept_candidates": len(scans_kept),
        "patches": int((df["status"] == "ingested").sum()), "patches_partly_outside": int(padded),
    }
    vol_counts = {
        "found": len(volumes), "with_candidates": len(set(cands["seriesuid"]) & set(volumes)),
        "without_candidates": len(set(volumes) - set(cands["seriesuid"])),
        "unreadable": {str(k): int(v) for k, v in sorted(pd.Series(
            [e for u, e in vol_errors.items()] + [detail[i] for i in np.flatnonzero(reason == "unreadable_volume")
                                                  if uids[i] not in vol_errors]).value_counts().items())}
        if vol_errors or (reason == "unreadable_volume").any() else {},
        **{k: int(v) for k, v in vcounts.items()},
    }
    summary = qc_summary(df, 0)
    summary["patient_id_source"] = pid_source
    summary["patient_id_sources"] = {k: int(v) for k, v in pid_sources.items()}
    summary["candidates"] = counts
    summary["volumes"] = vol_counts
    write_json(out / "qc_summary.json", summary)
    options = {"size": int(size), "planes": planes, "random_planes": int(random_planes) if planes == "random" else None,
               "spacing_mm": spacing, "neg_per_pos": neg_per_pos, "seed": int(seed), "ct_window": [lo_hu, hi_hu],
               "body_part": body_part, "fill_hu": AIR_HU, "interpolation": "trilinear"}
    write_store_meta(out, dtype="uint8", max_size=int(size), kind=STORE_KIND, patient_id_source=pid_source,
                     n_inputs=summary["inputs"], n_images=summary["ingested"], n_patients=summary["patients"],
                     intensity=I.INTENSITY_VERSION, resize=None, content_hash=CONTENT_HASH,
                     key_fingerprint=pseudo.fingerprint(), label_columns=EXTRA_COLUMNS, id_columns=ID_COLUMNS,
                     keep_paths=False, patches=options, candidates=counts)
    return summary


def fp_weight(meta: dict) -> float:
    """How many false positives of the *full* candidate list one kept negative stands for, per scan kept.

    ``--neg-per-pos`` keeps each usable negative with probability ``kept / usable``; a kept false
    positive then estimates ``usable / kept`` of them (Horvitz-Thompson), and scans whose every
    candidate was left out still count in the denominator (``scans_usable / scans_kept``).  1.0
    for a store made without subsampling, or for stores of other kinds.
    """
    c = meta.get("candidates") or {}
    try:
        neg = float(c["usable"]["negatives"]) / float(c["kept"]["negatives"])
        scans = float(c["scans_with_kept_candidates"]) / float(c["scans_with_usable_candidates"])
    except (KeyError, TypeError, ZeroDivisionError):
        return 1.0
    w = neg * scans
    return w if math.isfinite(w) and w > 0 else 1.0


def print_summary(s: dict, out) -> None:
    c = s["candidates"]
    q = s["quarantined"]
    print(f"patches: {c['rows']} candidates -> {c['patches']} patches of {c['kept']['positives'] + c['kept']['negatives']} "
          f"candidates ({c['kept']['positives']} positive, {c['kept']['negatives']} negative) from "
          f"{c['scans_with_kept_candidates']} scans; {s['patients']} patients (patient ids from: {s['patient_id_source']})")
    if c["neg_per_pos"] is not None:
        print(f"  --neg-per-pos {c['neg_per_pos']:g} (seed {c['seed']}): {c['negatives_subsampled_out']} of "
              f"{c['usable']['negatives']} usable negatives left out")
    for reason, n in q.items():
        print(f"  rejected {reason}: {n}")
    if c["patches_partly_outside"]:
        print(f"  {c['patches_partly_outside']} patches reach outside their volume (filled with air, {AIR_HU:g} HU)")
    v = s["volumes"]
    print(f"  volumes: {v['found']} found, {v['with_candidates']} with candidates, {v['without_candidates']} without")
    written = [Path(out) / n for n in ("manifest.parquet", "qc_summary.json")]
    if sum(q.values()):
        written.append(Path(out) / REJECTS_FILE)
    print("  written: " + ", ".join(map(str, written)))


# ----------------------------------------------------------------------------- CLI

def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("volumes", nargs="+", metavar="VOLUMES",
                   help="folders or files with CT volumes: <seriesuid>.mhd/.mha (+ .raw), <seriesuid>.nii[.gz], "
                        "or DICOM series (recursive)")
    p.add_argument("--candidates", required=True, metavar="CSV",
                   help="candidates CSV: seriesuid, coordX, coordY, coordZ (world mm, LPS), class "
                        f"(0 = negative); optional {PATIENT_COLUMN}")
    p.add_argument("--out", required=True, metavar="STORE", help="dataset store folder to create")
    p.add_argument("--size", type=int, default=64, help="patch side in pixels (default 64)")
    p.add_argument("--planes", choices=PLANE_MODES, default="axial",
                   help="axial: one axial patch per candidate; three: axial, coronal and sagittal; "
                        "random: --random-planes planes of random orientation (default axial)")
    p.add_argument("--random-planes", type=int, default=3, metavar="K", help="patches per candidate with --planes random")
    p.add_argument("--spacing", type=float, default=None, metavar="MM",
                   help="pixel spacing of the patches in mm (default: each volume's smallest voxel spacing)")
    p.add_argument("--neg-per-pos", type=float, default=None, metavar="N",
                   help="keep N negatives per positive candidate, chosen at random with --seed (default: all)")
    p.add_argument("--seed", type=int, default=0, help="seed of the negative subsample and the random planes")
    p.add_argument("--ct-window", type=float, nargs=2, default=list(I.CT_WINDOW), metavar=("LO", "HI"),
                   help="HU window, as ingest's (default -1000 1400)")
    p.add_argument("--body-part", choices=BODY_PARTS, default=None, metavar="PART",
                   help="body part recorded for volumes without a DICOM header, e.g. chest (default unknown)")


def run(args) -> int:
    summary = make_patch_store(args.volumes, args.candidates, args.out, size=args.size, planes=args.planes,
                               random_planes=args.random_planes, spacing=args.spacing, neg_per_pos=args.neg_per_pos,
                               seed=args.seed, ct_window=args.ct_window, body_part=args.body_part)
    print_summary(summary, args.out)
    return 0

