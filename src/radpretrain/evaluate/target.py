"""The evaluated target: which images have a label, the task it makes, and the label fractions.

``--target`` names a label column or manifest field (``lesion``, ``body_part``, ``age_years``);
a threshold such as ``label>=2`` makes a binary target from a grade.  Identifier and bookkeeping
columns are refused.  Values spelled as missing (``unknown``, empty, NaN) leave an image out.
"""

from __future__ import annotations

import re

import numpy as np
import pandas as pd

from radpretrain.errors import UserError

FORBIDDEN_TARGETS = {"source", "image_id", "patient_id", "study_id", "series_id", "content_hash", "shard",
                     "offset", "status", "reason", "candidate_id", "scan_id"}
MISSING_STRINGS = {"", "unknown", "nan", "none", "na", "n/a"}

_THRESH = re.compile(r"^\s*([A-Za-z_][A-Za-z0-9_]*)\s*(>=|<=|==|!=|>|<)\s*(.+?)\s*$")


def resolve_target(images: pd.DataFrame, target: str, task: str, positive: str | None):
    """Return ``(mask, y, classes, task, info)`` for the labelled images.

    ``y`` holds class indices (``classes[y]`` is the original value) or floats.
    """
    m = _THRESH.match(target)
    column = m.group(1) if m else target.strip()
    if column in FORBIDDEN_TARGETS:
        raise UserError(f"--target {target}: {column!r} is an identifier/bookkeeping column, not a label")
    if column not in images.columns:
        label_cols = [c for c in images.columns if c not in FORBIDDEN_TARGETS]
        raise UserError(f"--target {target}: the manifest has no column {column!r} (usable: {', '.join(label_cols)})")
    col = images[column]
    if pd.api.types.is_numeric_dtype(col) and not pd.api.types.is_bool_dtype(col):
        mask = col.notna().to_numpy()
    else:
        mask = ~col.astype(str).str.strip().str.lower().isin(MISSING_STRINGS).to_numpy() & col.notna().to_numpy()
    vals = col[mask]
    info = {"column": column, "expression": target}
    if m:
        op, rhs = m.group(2), m.group(3)
        try:
            thr = float(rhs)
            v = pd.to_numeric(vals, errors="raise").to_numpy(float)
        except (ValueError, TypeError):
            if op not in ("==", "!="):
                raise UserError(f"--target {target}: {column} is not numeric; only == and != work on text") from None
            thr, v = rhs.strip("'\""), vals.astype(str).to_numpy()
        ops = {">=": np.greater_equal, "<=": np.less_equal, ">": np.greater, "<": np.less,
               "==": np.equal, "!=": np.not_equal}
        yb = ops[op](v, thr).astype(int)
        if task not in ("auto", "binary"):
            raise UserError(f"--target {target}: a threshold target is binary, not {task}")
        return mask, yb, [f"not {target}", target], "binary", info
    numeric = pd.api.types.is_numeric_dtype(col) and not pd.api.types.is_bool_dtype(col)
    uniq = pd.unique(vals)
    if task == "auto":
        if numeric and (len(uniq) > 10 or not np.allclose(vals.to_numpy(float), np.round(vals.to_numpy(float)))):
            task = "regression"
        elif len(uniq) == 2:
            task = "binary"
        elif len(uniq) < 2:
            raise UserError(f"--target {target}: only one value ({uniq[0] if len(uniq) else 'none'}) among labelled images")
        else:
            task = "multiclass"
        info["task_detected"] = task
    if task == "regression":
        if not numeric:
            raise UserError(f"--target {target}: regression needs a numeric column")
        return mask, vals.to_numpy(float), [], task, info
    classes = sorted(uniq.tolist(), key=lambda x: (str(type(x)), x))
    if task == "binary":
        if len(classes) != 2:
            raise UserError(f"--target {target}: binary task but {len(classes)} values {classes[:6]}; "
                            "use a threshold such as 'label>=2' or --task multiclass")
        if positive is not None:
            hits = [c for c in classes if str(c) == str(positive)]
            if not hits:
                raise UserError(f"--positive {positive}: not one of {classes}")
            classes = [c for c in classes if c is not hits[0]] + hits
    if len(classes) > 50:
        raise UserError(f"--target {target}: {len(classes)} classes; a numeric target may need --task regression")
    lookup = {c: i for i, c in enumerate(classes)}
    y = np.array([lookup[v] for v in vals.tolist()], dtype=int)
    return mask, y, [str(c) for c in classes], task, info


def parse_fractions(fractions) -> list[float]:
    """Sorted distinct label fractions in (0, 1] from ``"0.01,0.1,1"`` or a sequence of numbers."""
    if isinstance(fractions, (int, float)):
        fractions = [fractions]
    text = fractions if isinstance(fractions, str) else ",".join(str(f) for f in fractions)
    try:
        fr = sorted({float(x) for x in str(text).split(",") if x.strip()})
    except ValueError:
        raise UserError(f"--label-fractions {text}: expected numbers such as 0.01,0.1,1.0") from None
    if not fr or any(f <= 0 or f > 1 for f in fr):
        raise UserError(f"--label-fractions {text}: fractions must lie in (0, 1]")
    return fr
