"""``radpretrain ingest --merge`` of finished stores made from different file lists.

Partitions of one ingest plan are joined chunk by chunk (:func:`ingest.merge_partitions`,
identical to a single-machine run).  Stores made from *different* file lists (last year's
store and a store of this month's new files, each made by a plain ``radpretrain ingest``)
are joined here, by :func:`merge_stores`:

* allowed only when every store was made with the same de-identification key (key
  fingerprint) and the same options that decide the stored pixels or the ids
  (:data:`SAME_OPTIONS`); otherwise a one-line :class:`UserError` names the two stores and
  the option;
* the merged manifest holds every row of every store, in the order the stores are given;
* shards are hard-linked (copied where links are impossible) under ``shards/ingest-<plan
  fingerprint>/``, so two stores' ``chunk-000000.bin`` never collide; the ``shard`` column
  is rewritten to that relative path (a store that is itself a merge keeps its names);
* duplicates are marked again over all rows with :func:`manifest.mark_duplicates`' rule: the
  first store's copy stays ``ingested``, a later one with the same ``content_hash`` becomes
  ``duplicate`` (``reason = duplicate_of:<image_id of the kept copy>``);
* an ``image_id`` held by two stores (the same relative path) must have the same content
  there (then the later copy is a duplicate, so no id names two ingested images);
  otherwise the merge is refused, naming the id token, never a path;
* label columns are the union (missing values null, typed as a single ingest types them);
* ``qc_summary.json`` and ``store.json`` are recomputed from the merged manifest; the input
  counts add up.  Splits are not carried over.

Crash safety: ``OUT/.ingest/plan.json`` records a fingerprint of the inputs (their plan
fingerprints and manifest digests) first; shards are linked through temporary names; the
manifest is written last.  Running the same command again (after a kill, or on a finished
merge) redoes the merge and ends with the same manifest; an ``--out`` holding anything else
is refused.
"""

from __future__ import annotations

import filecmp
import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from radpretrain.data.manifest import (
    MANIFEST_COLUMNS, label_columns, labels_as_text, mark_duplicates, qc_summary, typed, weakest_patient_id_source,
)
from radpretrain.data.store import MANIFEST, SHARD_DIR, SPLITS, WORK_DIR, commit_file, write_manifest, write_store_meta
from radpretrain.errors import UserError
from radpretrain.utils import get_logger, read_json, write_json

log = get_logger("radpretrain.data.merge")

PLAN_KIND = "merge-of-stores"

# options that decide the stored pixels or the ids: stores must agree on all of them
SAME_OPTIONS = {
    "key_fingerprint": "de-identification key (key fingerprint)",
    "dtype": "pixel dtype",
    "max_size": "--max-size",
    "min_size": "--min-size",
    "resize": "resize rule",
    "intensity": "intensity rules",
    "content_hash": "content_hash scheme",
    "keep_paths": "--keep-paths",
    "ct_window": "--ct-window",
    "mr_percentile": "--mr-percentile",
}
_STORE_COL = "_merge_store_index"  # internal column: which input a row comes from (dropped before writing)


@dataclass
class _Input:
    root: Path
    meta: dict      # store.json
    plan: dict      # .ingest/plan.json
    qc: dict        # qc_summary.json ({} when absent)
    options: dict   # SAME_OPTIONS values
    ident: dict     # what the merge fingerprint is made of
    has_splits: bool


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def _open_input(root: Path) -> _Input:
    if not root.is_dir():
        raise UserError(f"{root}: no such store folder")
    if not (root / MANIFEST).is_file() or not (root / "store.json").is_file():
        if (root / WORK_DIR / "plan.json").is_file():
            raise UserError(f"{root}: unfinished store (no {MANIFEST} or store.json); run its ingest command "
                            "again to finish it, then merge")
        raise UserError(f"{root}: not a dataset store made by 'radpretrain ingest' (no {MANIFEST})")
    plan_path = root / WORK_DIR / "plan.json"
    if not plan_path.is_file():
        raise UserError(f"{root}: no {WORK_DIR}/plan.json, so the options it was made with cannot be checked; "
                        "only stores made by 'radpretrain ingest' (with their .ingest folder) can be merged")
    meta, plan = read_json(root / "store.json"), read_json(plan_path)
    opts = plan.get("options", {})
    options = {"key_fingerprint": meta.get("key_fingerprint", plan.get("key_fingerprint")),
               "dtype": meta.get("dtype", "uint8")}
    for k in SAME_OPTIONS:
        if k not in options:
            v = opts.get(k, meta.get(k))
            options[k] = [float(x) for x in v] if k == "ct_window" and v is not None else v
    qc_path = root / "qc_summary.json"
    return _Input(root=root, meta=meta, plan=plan, qc=read_json(qc_path) if qc_path.is_file() else {},
                  options=options, has_splits=(root / SPLITS).is_file(),
                  ident={"plan": plan.get("fingerprint"), "manifest_sha256": _file_sha256(root / MANIFEST)})


def _check_same_options(inputs: list[_Input]) -> None:
    for j, b in enumerate(inputs):
        for a in inputs[:j]:
            if a.ident == b.ident:
                raise UserError(f"{a.root} and {b.root}: the same store given twice; cannot merge")
    first = inputs[0]
    for other in inputs[1:]:
        for k, what in SAME_OPTIONS.items():
            a, b = first.options.get(k), other.options.get(k)
            if a != b:
                raise UserError(f"{first.root} and {other.root}: made with a different {what} "
                                f"({_show(a)} vs {_show(b)}); stores can be merged only when made with the same "
                                "key and pixel options")


def _show(v) -> str:
    return "not recorded" if v is None else json.dumps(v)


def _check_out(out: Path, inputs: list[_Input], fingerprint: str) -> None:
    o = out.resolve()
    for inp in inputs:
        r = inp.root.resolve()
        if o == r or r in o.parents or o in r.parents:
            raise UserError(f"{out}: --out must be a new folder, not one of the stores merged or inside one")
    plan_path = out / WORK_DIR / "plan.json"
    if plan_path.is_file():
        if read_json(plan_path).get("fingerprint") != fingerprint:
            raise UserError(f"{out}: holds another ingest or merge; choose another --out")
    elif out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"{out}: exists and is not empty; choose a new folder")


# ----------------------------------------------------------------------------- manifest

def _shard_names(inputs: list[_Input], frames: list[pd.DataFrame]) -> list[dict[str, str]]:
    """For each store, its shard names -> their names in the merged store (unique across stores).

    A plain store's ``chunk-000000.bin`` becomes ``ingest-<its plan fingerprint>/chunk-000000.bin``; a name
    that has a folder already (a merged store's) is kept; a name taken by an earlier store gets a suffix.
    """
    used: set[str] = set()
    out = []
    for inp, m in zip(inputs, frames):
        mapping = {}
        for name in sorted(set(m.loc[m["shard"].astype(str) != "", "shard"].astype(str))):
            new = name if "/" in name else f"ingest-{inp.ident['plan'] or 'store'}/{name}"
            if new in used:
                top, _, rest = new.partition("/")
                k = 2
                while f"{top}.{k}/{rest}" in used:
                    k += 1
                new = f"{top}.{k}/{rest}"
            used.add(new)
            mapping[name] = new
        out.append(mapping)
    return out


def _check_image_ids(df: pd.DataFrame, inputs: list[_Input]) -> None:
    """An image id held by two stores must name the same content in both (then the later is a duplicate)."""
    rep = df["image_id"].duplicated(keep=False).to_numpy()
    if not rep.any():
        return
    sub = df.loc[rep, ["image_id", "content_hash", _STORE_COL]]
    n_hashes = sub.groupby("image_id", sort=False)["content_hash"].nunique(dropna=False)
    bad = n_hashes[n_hashes > 1]
    if not len(bad):
        return
    tok = str(bad.index[0])
    rows = sub[sub["image_id"] == tok]
    first = rows.iloc[0]
    other = rows[rows["content_hash"] != first["content_hash"]].iloc[0]
    a, b = inputs[int(first[_STORE_COL])].root, inputs[int(other[_STORE_COL])].root
    more = f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""
    raise UserError(f"{a} and {b}: both hold image {tok} with different content{more}; image ids come from each "
                    "file's path relative to the folder given to ingest, so ingest the new files from a "
                    "differently named folder inside it (e.g. files in incoming/2024-06/, ingest incoming/) "
                    "and merge again")


def _remark_duplicates(df: pd.DataFrame) -> pd.DataFrame:
    """:func:`manifest.mark_duplicates` over all stores, and every duplicate's reason pointing at the kept copy."""
    df = mark_duplicates(df)
    ing = df["status"] == "ingested"
    keep_id = dict(zip(df.loc[ing, "content_hash"].tolist(), df.loc[ing, "image_id"].tolist()))
    dup = (df["status"] == "duplicate").to_numpy()
    if dup.any():
        kept = df.loc[dup, "content_hash"].map(keep_id)
        df.loc[dup, "reason"] = ("duplicate_of:" + kept).where(kept.notna(), df.loc[dup, "reason"])
        df.loc[dup, "shard"] = ""
        df.loc[dup, "offset"] = -1
    return df


def _merged_manifest(inputs: list[_Input]) -> tuple[pd.DataFrame, list[dict[str, str]]]:
    frames = []
    for k, inp in enumerate(inputs):
        m = pd.read_parquet(inp.root / MANIFEST)
        missing = [c for c in MANIFEST_COLUMNS if c not in m.columns]
        if missing:
            raise UserError(f"{inp.root}: {MANIFEST} lacks the columns {', '.join(missing)}; cannot merge")
        m = labels_as_text(m, [c for c in m.columns if c not in MANIFEST_COLUMNS])
        m[_STORE_COL] = k
        frames.append(m)
    names = _shard_names(inputs, frames)
    for m, mapping in zip(frames, names):
        s = m["shard"].astype(str)
        m["shard"] = s.map(mapping).where(s != "", "")
    df = pd.concat(frames, ignore_index=True, sort=False) if frames else pd.DataFrame(columns=MANIFEST_COLUMNS)
    _check_image_ids(df, inputs)
    df = _remark_duplicates(df)
    stores = df[_STORE_COL].to_numpy()
    df = typed(df, [c for c in label_columns(df) if c != _STORE_COL])
    df[_STORE_COL] = stores  # dropped before writing
    return df, names


# ----------------------------------------------------------------------------- files

def _link(src: Path, dst: Path) -> None:
    """``dst`` becomes a hard link to (or, across file systems, a copy of) ``src``, through a temporary name."""
    if dst.is_file():
        try:
            if os.path.samefile(src, dst) or filecmp.cmp(src, dst, shallow=False):
                return  # linked (or copied and committed) by an earlier run of this merge
        except OSError:
            pass
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(f".{dst.name}.{os.getpid()}.tmp")
    tmp.unlink(missing_ok=True)
    try:
        os.link(src, tmp)
    except OSError:
        shutil.copyfile(src, tmp)
    commit_file(tmp, dst)


def _bytes_needed(rows: pd.DataFrame, itemsize: int) -> dict[tuple[int, str], int]:
    """(store index, merged shard name) -> the bytes its ingested images need in that shard."""
    sizes = rows["height"].to_numpy(np.int64) * rows["width"].to_numpy(np.int64) * itemsize
    ends = rows["offset"].to_numpy(np.int64) + sizes
    keys = zip(rows[_STORE_COL].tolist(), rows["shard"].astype(str).tolist())
    out: dict[tuple[int, str], int] = {}
    for key, end in zip(keys, ends.tolist()):
        out[key] = max(out.get(key, 0), end)
    return out


def _remove_tmp(out: Path) -> None:
    """Temporary files a killed merge (or ingest) left in ``out``."""
    for d in (out, out / WORK_DIR):
        if d.is_dir():
            for p in d.glob("*.tmp"):
                p.unlink(missing_ok=True)
    if (out / SHARD_DIR).is_dir():
        for p in (out / SHARD_DIR).rglob("*.tmp"):
            p.unlink(missing_ok=True)


# ----------------------------------------------------------------------------- merge

def merge_stores(stores, out) -> dict:
    """Join finished stores made from different file lists (same key and pixel options) into ``out``.

    Returns the QC summary of the merged store (plus ``splits_not_carried``: how many inputs had splits).
    """
    roots = [Path(p) for p in stores]
    if len(roots) < 2:
        raise UserError("--merge needs at least two stores")
    out = Path(out)
    inputs = [_open_input(r) for r in roots]
    _check_same_options(inputs)
    for inp in inputs:
        if inp.meta.get("partition"):
            raise UserError(f"{inp.root}: partition {inp.meta['partition']} of an ingest, and the stores given are not "
                            "all partitions of that one ingest (same files, options and key); merge its partitions "
                            "first ('radpretrain ingest --merge PART... --out DATASET'), then merge that store")
    fingerprint = hashlib.sha256(json.dumps([inp.ident for inp in inputs], sort_keys=True).encode()).hexdigest()[:16]
    _check_out(out, inputs, fingerprint)
    log.info("merging %d stores", len(inputs))
    df, names = _merged_manifest(inputs)

    first = inputs[0]
    common = {k: v for k, v in first.options.items() if k not in ("key_fingerprint", "dtype")}
    label_from_folder = any(bool(i.plan.get("options", {}).get("label_from_folder", i.meta.get("label_from_folder")))
                            for i in inputs)
    patient_regex = any(bool(i.meta.get("patient_regex")) for i in inputs)
    # folder labels: explicit when any store's were (--label-from-folder yes), else decided by 'auto'
    decision = "explicit" if any(i.plan.get("label_from_folder_mode") == "yes" for i in inputs) else "auto"
    (out / WORK_DIR).mkdir(parents=True, exist_ok=True)
    (out / SHARD_DIR).mkdir(parents=True, exist_ok=True)
    write_json(out / WORK_DIR / "plan.json", {
        "kind": PLAN_KIND, "fingerprint": fingerprint, "key_fingerprint": first.options["key_fingerprint"],
        "options": {**common, "label_from_folder": label_from_folder}, "inputs": [i.ident for i in inputs],
        "label_from_folder_mode": "yes" if decision == "explicit" else "auto"})
    _remove_tmp(out)

    # shards: only those that hold an image still ingested after the merge
    ing = df["status"] == "ingested"
    wanted = set(zip(df.loc[ing, _STORE_COL].tolist(), df.loc[ing, "shard"].astype(str).tolist()))
    needed = _bytes_needed(df[ing], np.dtype(first.options["dtype"] or "uint8").itemsize)
    reverse = [{new: old for old, new in mapping.items()} for mapping in names]
    for k, new in sorted(wanted):
        src = inputs[k].root / SHARD_DIR / reverse[k][new]
        if not src.is_file():
            raise UserError(f"{inputs[k].root}: shard {reverse[k][new]} is missing from the store; cannot merge")
        if src.stat().st_size < needed[(k, new)]:
            raise UserError(f"{src}: shard truncated ({src.stat().st_size} bytes, its images need "
                            f"{needed[(k, new)]}); repair {inputs[k].root} first (run its ingest command again), "
                            "then merge again")
        _link(src, out / SHARD_DIR / new)
    df = df.drop(columns=[_STORE_COL])

    # QC summary: recomputed from the merged rows; patient-id sources (counted by ingest over the images
    # stored before duplicates were marked, a set the merge does not change) add up
    sidecars = sum(int(i.qc.get("sidecar_skipped", 0)) for i in inputs)
    summary = qc_summary(df, sidecars)
    sources: dict[str, int] = {}
    for i in inputs:
        for k, v in (i.qc.get("patient_id_sources") or {}).items():
            sources[k] = sources.get(k, 0) + int(v)
    pid_source = weakest_patient_id_source(i.meta.get("patient_id_source") or "dicom" for i in inputs)
    summary["patient_id_source"] = pid_source
    summary["patient_id_sources"] = dict(sorted(sources.items()))
    labels = label_columns(df)
    if label_from_folder:
        summary["label_from_folder"] = True
        summary["label_from_folder_decision"] = decision
        summary["n_folder_labels"] = int(df["label"].nunique()) if "label" in df.columns else 0
    summary["merged_stores"] = len(inputs)
    write_json(out / "qc_summary.json", summary)
    meta = {
        "patient_id_source": pid_source, "n_inputs": summary["inputs"], "n_images": summary["ingested"],
        "n_patients": summary["patients"], "intensity": common["intensity"], "min_size": common["min_size"],
        "resize": common["resize"], "content_hash": common["content_hash"],
        "key_fingerprint": first.options["key_fingerprint"], "plan_fingerprint": fingerprint,
        "n_shards": len(wanted), "label_columns": labels, "keep_paths": bool(common["keep_paths"]),
        "label_from_folder": label_from_folder, "patient_regex": patient_regex, "merged_stores": len(inputs),
    }
    if label_from_folder:
        meta["label_from_folder_decision"] = decision
    write_store_meta(out, dtype=first.options["dtype"] or "uint8", max_size=common["max_size"], **meta)
    write_manifest(out, df)  # last: a manifest means the merge finished
    return {**summary, "splits_not_carried": sum(i.has_splits for i in inputs)}
