"""The manifest (``manifest.parquet``): its columns and the operations on a whole manifest.

One row per input (file, frame, NIfTI slice, NPZ entry or CT candidate patch), the columns
:data:`MANIFEST_COLUMNS` (docs/architecture.md says what each holds) followed by label columns.
``ingest`` (finalisation), ``ingest --merge`` of stores and ``patches`` build their manifests with
the functions here, so the three agree on types, duplicates and the QC summary:

* :func:`typed` -- label columns typed (:func:`type_labels`: numbers become Int64/float, empty
  text becomes null), integer and float columns cast;
* :func:`mark_duplicates` -- later copies of the same stored pixels become ``duplicate``;
* :func:`qc_summary` -- the counts of ``qc_summary.json``;
* :func:`weakest_patient_id_source` -- the store's ``patient_id_source``.

Reading and writing the file is :mod:`.store`'s job (``write_manifest``, ``Store.manifest``).
"""

from __future__ import annotations

import numpy as np
import pandas as pd

# Columns every manifest has (label columns come after these).
MANIFEST_COLUMNS = [
    "image_id", "patient_id", "study_id", "series_id", "modality", "body_part", "view",
    "age_years", "sex", "height", "width", "orig_height", "orig_width", "source",
    "source_format", "content_hash", "status", "reason", "shard", "offset",
]
STATUSES = ("ingested", "duplicate", "quarantined")
CONTENT_HASH = "xxh3-128-of-stored-pixels"  # manifest content_hash: readers.content_hash of the stored uint8 image
INT_COLUMNS = ("height", "width", "orig_height", "orig_width", "offset")
# where an image's patient id came from, strongest first; a store records the weakest any image has
PATIENT_ID_SOURCES = ("dicom", "regex", "per-file")


def label_columns(df: pd.DataFrame) -> list[str]:
    """The label columns of a manifest (every column that is not a manifest column), sorted."""
    return sorted(c for c in df.columns if c not in MANIFEST_COLUMNS)


def type_labels(df: pd.DataFrame) -> pd.DataFrame:
    """Label columns of text typed in place: all-integer text -> Int64, other numbers -> float, else text
    (empty text -> null).  Columns already typed are left alone."""
    for col in [c for c in df.columns if c not in MANIFEST_COLUMNS]:
        s = df[col]
        if s.dtype == object or pd.api.types.is_string_dtype(s):
            vals = s.dropna().astype(str)
            vals = vals[vals != ""]
            num = pd.to_numeric(vals, errors="coerce")
            if len(vals) and num.notna().all():
                full = pd.to_numeric(s.replace("", None), errors="coerce")
                if (num == num.round()).all():
                    df[col] = full.round().astype("Int64")
                else:
                    df[col] = full.astype(float)
            else:
                df[col] = s.where(s.notna() & (s.astype(str) != ""), None)
    return df


def labels_as_text(df: pd.DataFrame, labels: list[str]) -> pd.DataFrame:
    """Label columns as text (None when missing), so that manifests whose columns got different types
    (Int64 here, strings there) concatenate; :func:`type_labels` types them again."""
    for c in labels:
        s = df[c]
        if pd.api.types.is_integer_dtype(s) or pd.api.types.is_float_dtype(s) or pd.api.types.is_bool_dtype(s):
            integral = pd.api.types.is_integer_dtype(s) or pd.api.types.is_bool_dtype(s)
            vals = [None if pd.isna(v) else (str(int(v)) if integral else repr(float(v))) for v in s.tolist()]
        else:
            vals = [None if v is None or (pd.api.types.is_scalar(v) and pd.isna(v)) else str(v) for v in s.tolist()]
        df[c] = pd.Series(vals, index=df.index, dtype=object)
    return df


def cast_columns(df: pd.DataFrame) -> pd.DataFrame:
    """The manifest columns that are numbers, cast in place: sizes and offsets int64, age float."""
    for c in INT_COLUMNS:
        df[c] = df[c].astype("int64")
    df["age_years"] = df["age_years"].astype(float)
    return df


def typed(df: pd.DataFrame, labels: list[str]) -> pd.DataFrame:
    """A new frame of the manifest columns then ``labels``, labels typed (:func:`type_labels`) and the
    numeric columns cast (:func:`cast_columns`): what ingest and the merge of stores write."""
    return cast_columns(type_labels(df[MANIFEST_COLUMNS + labels].copy()))


def mark_duplicates(df: pd.DataFrame) -> pd.DataFrame:
    """Later copies (in row order) of the same stored pixels become ``duplicate``; the first is kept."""
    ok = (df["status"] == "ingested").to_numpy(dtype=bool)
    dup = np.zeros(len(df), dtype=bool)
    dup[ok] = df["content_hash"][ok].duplicated(keep="first").to_numpy(dtype=bool)
    if not dup.any():
        return df
    first = df[ok & ~dup]
    keep_id = dict(zip(first["content_hash"].tolist(), first["image_id"].tolist()))
    df.loc[dup, "status"] = "duplicate"
    df.loc[dup, "reason"] = "duplicate_of:" + df.loc[dup, "content_hash"].map(keep_id)
    df.loc[dup, "shard"] = ""
    df.loc[dup, "offset"] = -1
    return df


def qc_summary(df: pd.DataFrame, sidecars: int) -> dict:
    """The counts of ``qc_summary.json`` (``inputs = ingested + duplicates + sum(quarantined)``)."""
    ing = df[df["status"] == "ingested"]
    q = df[df["status"] == "quarantined"]
    return {
        "inputs": int(len(df)),
        "ingested": int(len(ing)),
        "duplicates": int((df["status"] == "duplicate").sum()),
        "quarantined": {str(k): int(v) for k, v in sorted(q["reason"].value_counts().items())},
        "sidecar_skipped": int(sidecars),
        "patients": int(ing["patient_id"].nunique()),
        "by_modality": {str(k): int(v) for k, v in sorted(ing["modality"].value_counts().items())},
        "by_body_part": {str(k): int(v) for k, v in sorted(ing["body_part"].value_counts().items())},
        "by_format": {str(k): int(v) for k, v in sorted(df["source_format"].value_counts().items())},
    }


def weakest_patient_id_source(sources) -> str:
    """The weakest of ``sources`` (:data:`PATIENT_ID_SOURCES`; an unknown one counts as ``per-file``);
    ``dicom`` when there are none."""
    rank = max((PATIENT_ID_SOURCES.index(s) if s in PATIENT_ID_SOURCES else len(PATIENT_ID_SOURCES) - 1
                for s in sources), default=0)
    return PATIENT_ID_SOURCES[rank]
