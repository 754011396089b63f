"""``radpretrain info``: what is in a dataset store, and a sample grid to look at.

Counts come from the manifest (every input) and, when present, ingest's
``qc_summary.json`` (``inputs``, ``ingested``, ``duplicates``, ``quarantined``
reason -> count, ``sidecar_skipped``) and ``store.json`` (``patient_id_source``).
Image-level counts (modality, body part, view, labels, sex, age, splits) are
over the *ingested* images.

``--json`` prints exactly one JSON object on stdout.  Otherwise a readable
table is printed and a grid of a few images per body part is drawn to
``DATASET/sample_grid.png`` (or ``--grid PATH``); its titles show body part and
modality only, never an id.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import numpy as np
import pandas as pd

from radpretrain.data.geometry import letterbox
from radpretrain.data.store import SPLITS, Store
from radpretrain.errors import UserError
from radpretrain.utils import read_json

GRID_NAME = "sample_grid.png"
PER_FILE_NOTE = ("every file was treated as its own patient (patient_id_source = per-file), "
                 "so patient-level splits are image-level splits: images of one person may land on both sides")


def _counts(series: pd.Series) -> dict[str, int]:
    s = series.astype(object).where(series.notna(), "<missing>").astype(str)
    vc = s.value_counts()
    return {str(k): int(v) for k, v in sorted(vc.items(), key=lambda kv: (-kv[1], kv[0]))}


def _label_key(v) -> str:
    if pd.isna(v):
        return "<missing>"
    if isinstance(v, (float, np.floating)) and float(v).is_integer():
        return str(int(v))
    return str(v)


def per_file_note(source: str | None, sources: dict | None, n_images: int) -> str | None:
    """The warning shown when some or all images got a per-file patient pseudonym (None when not)."""
    if source != "per-file":
        return None
    n_file = (sources or {}).get("per-file", n_images)
    if n_file < n_images:
        return (f"{n_file} of {n_images} images had no patient id; each such file was treated as its own "
                "patient, so for them patient-level splits are image-level splits")
    return PER_FILE_NOTE


def collect(root: str | Path) -> dict:
    """All the numbers ``info`` shows, as a JSON-ready dict."""
    store = Store(root)
    man = store.manifest
    img = store.images
    qc_path = store.root / "qc_summary.json"
    qc = read_json(qc_path) if qc_path.is_file() else {}
    status = man["status"].astype(str)
    quarantine_reasons = _counts(man.loc[status == "quarantined", "reason"])
    info: dict = {
        "inputs": int(qc.get("inputs", len(man))),
        "ingested": int(qc.get("ingested", int((status == "ingested").sum()))),
        "duplicates": int(qc.get("duplicates", int((status == "duplicate").sum()))),
        "quarantined": {str(k): int(v) for k, v in qc["quarantined"].items()}
        if isinstance(qc.get("quarantined"), dict) else quarantine_reasons,
        "sidecar_skipped": qc.get("sidecar_skipped"),
        "by_status": _counts(status),
        "images": int(len(img)),
        "patients": int(img["patient_id"].nunique()),
        "studies": int(img["study_id"].nunique()) if "study_id" in img else None,
        "patient_id_source": store.meta.get("patient_id_source"),
        "patient_id_sources": qc.get("patient_id_sources"),
        "by_modality": _counts(img["modality"]),
        "by_body_part": _counts(img["body_part"]),
        "by_view": _counts(img["view"]),
        "by_sex": _counts(img["sex"]),
        "by_label": {},
        "by_split": {},
        "patients_by_split": {},
    }
    id_columns = [c for c in store.meta.get("id_columns", []) if c in img.columns]  # e.g. a patch store's candidate ids
    if id_columns:
        info["id_columns"] = {c: int(img[c].nunique()) for c in id_columns}
    for col in store.label_columns:
        if col in id_columns:
            continue
        counts = pd.Series([_label_key(v) for v in img[col]], dtype=object).value_counts()
        info["by_label"][col] = {str(k): int(v) for k, v in sorted(counts.items())}
    age = pd.to_numeric(img["age_years"], errors="coerce")
    known = age.dropna()
    info["age_years"] = {
        "known": int(len(known)), "missing": int(age.isna().sum()),
        **({"min": float(known.min()), "median": float(known.median()), "mean": round(float(known.mean()), 2),
            "max": float(known.max())} if len(known) else {}),
    }
    if len(img):
        info["size"] = {"median_height": float(img["height"].median()), "median_width": float(img["width"].median()),
                        "median_orig_height": float(pd.to_numeric(img["orig_height"], errors="coerce").median()),
                        "median_orig_width": float(pd.to_numeric(img["orig_width"], errors="coerce").median())}
    if (store.root / SPLITS).is_file():
        sp = pd.read_parquet(store.root / SPLITS)
        info["by_split"] = {str(k): int(v) for k, v in sp["split"].value_counts().sort_index().items()}
        info["patients_by_split"] = {str(k): int(v) for k, v in sp.groupby("split")["patient_id"].nunique().sort_index().items()}
        if "fold" in sp:
            info["patients_by_fold"] = {str(k): int(v) for k, v in sp.groupby("fold")["patient_id"].nunique().sort_index().items()}
        if len(sp) != len(img):
            info["splits_stale"] = True
    info["store"] = {k: store.meta[k] for k in ("dtype", "max_size") if k in store.meta}
    return info


def format_table(info: dict) -> str:
    """The human-readable summary."""
    lines = []
    q = info["quarantined"]
    lines.append(f"inputs {info['inputs']}  ingested {info['ingested']}  duplicates {info['duplicates']}  "
                 f"quarantined {sum(q.values())}" + (f"  sidecars skipped {info['sidecar_skipped']}" if info.get("sidecar_skipped") else ""))
    if q:
        lines.append("quarantine reasons:")
        lines += [f"  {k:<40}{v:>8}" for k, v in q.items()]
    lines.append(f"ingested images {info['images']}  patients {info['patients']}" +
                 (f"  studies {info['studies']}" if info.get("studies") is not None else ""))
    note = per_file_note(info.get("patient_id_source"), info.get("patient_id_sources"), info["images"])
    if note:
        lines.append("NOTE: " + note)

    def block(title, d):
        if not d:
            return
        lines.append(f"{title}:")
        total = sum(d.values()) or 1
        lines.extend(f"  {k:<24}{v:>8}  {100 * v / total:5.1f} %" for k, v in d.items())

    block("modality", info["by_modality"])
    block("body part", info["by_body_part"])
    block("view", info["by_view"])
    block("sex", info["by_sex"])
    for col, d in info["by_label"].items():
        block(f"label {col}", d)
    if info.get("id_columns"):
        lines.append("id columns: " + ", ".join(f"{c} {n} distinct" for c, n in info["id_columns"].items()))
    a = info["age_years"]
    if a["known"]:
        lines.append(f"age (years): known {a['known']}, missing {a['missing']}, min {a['min']:.0f}, "
                     f"median {a['median']:.0f}, mean {a['mean']:.1f}, max {a['max']:.0f}")
    else:
        lines.append(f"age (years): unknown for all {a['missing']} images")
    if info["by_split"]:
        lines.append("split:")
        lines.extend(f"  {k:<24}{v:>8} images {info['patients_by_split'].get(k, 0):>6} patients" for k, v in info["by_split"].items())
        if info.get("splits_stale"):
            lines.append("  WARNING: splits.parquet does not match the store's images; re-run 'radpretrain split'")
    else:
        lines.append("split: none yet (run 'radpretrain split DATASET')")
    return "\n".join(lines)


def sample_grid(root: str | Path, path: str | Path | None = None, per_group: int = 4, max_groups: int = 8,
                size: int = 160, seed: int = 0) -> Path | None:
    """Draw ``per_group`` random images for each of up to ``max_groups`` body parts; returns the PNG path."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # heavy (matplotlib): only for sample grids
    from matplotlib.figure import Figure

    store = Store(root)
    img = store.images
    if len(img) == 0:
        return None
    out = Path(path) if path is not None else store.root / GRID_NAME
    rng = np.random.default_rng(seed)
    parts = list(img["body_part"].astype(str).value_counts().index[:max_groups])
    ncols = per_group
    fig = Figure(figsize=(2.0 * ncols, 2.2 * len(parts)), dpi=100)
    FigureCanvasAgg(fig)
    for r, bp in enumerate(parts):
        rows = np.flatnonzero(img["body_part"].astype(str).to_numpy() == bp)
        pick = rng.choice(rows, size=min(per_group, len(rows)), replace=False)
        for c in range(ncols):
            ax = fig.add_subplot(len(parts), ncols, r * ncols + c + 1)
            ax.axis("off")
            if c < len(pick):
                i = int(pick[c])
                pic, _ = letterbox(store.read(i), size)
                ax.imshow(pic, cmap="gray", vmin=0, vmax=1, interpolation="nearest")
                ax.set_title(f"{bp} / {img['modality'].iloc[i]}", fontsize=8)
    fig.subplots_adjust(left=0.02, right=0.98, bottom=0.02, top=0.95, wspace=0.05, hspace=0.25)
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        fig.savefig(out)
    except OSError as e:
        raise UserError(f"{out}: cannot write the sample grid ({e.strerror or e})") from None
    return out


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("dataset", help="dataset store folder (from 'radpretrain ingest')")
    parser.add_argument("--json", action="store_true", help="print one JSON object on stdout (no table, no grid)")
    parser.add_argument("--grid", default=None, help=f"where to write the sample grid PNG (default DATASET/{GRID_NAME})")


def run(args) -> int:
    info = collect(args.dataset)
    if args.json:
        print(json.dumps(info, default=_json_default))
        return 0
    print(format_table(info))
    grid = sample_grid(args.dataset, args.grid)
    print(f"sample grid: {grid}" if grid else "sample grid: no ingested images to show")
    return 0


def _json_default(o):
    if isinstance(o, np.integer):
        return int(o)
    if isinstance(o, np.floating):
        return None if math.isnan(o) else float(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")

