"""``radpretrain split``: patient-grouped, stratified train/val/test, K folds and nested fractions.

Everything is decided per *patient* (all images of a patient share split, fold
and ``frac_rank``), so no patient can be on two sides.  A patient's stratum is
the majority value of the stratification column over its images (ties: the
smallest value; a numeric column with more than 10 distinct values is cut into
5 quantile bins of the patient medians; no value at all: ``"<missing>"``).

``DATASET/splits.parquet`` has one row per ingested image, in ``Store.images``
order, with columns ``image_id, patient_id, split, fold, frac_rank, keep,
stratum``:

- ``split``: train / val / test, stratified by systematic sampling over the
  patients ordered by (stratum, random), so every stratum and the whole set get
  the requested fractions up to rounding;
- ``fold``: 0..K-1 over *all* patients (independent of ``split``), stratified
  and balanced to +-1 patient;
- ``frac_rank``: in [0, 1), ``(r + 0.5) / n`` for the patient's random rank
  ``r`` among the ``n`` patients of its stratum, so ``frac_rank < f`` is a
  stratified subset and subsets are nested (1 % inside 10 % inside 100 %);
- ``keep``: False for images above ``--max-per-patient`` (a seeded random
  choice per patient); :func:`select` drops them unless ``respect_keep=False``.

Small fractions: :func:`select` applies a fraction *inside the selected pool*
(e.g. the train split, or the training folds): in every stratum of the pool
it keeps the ``max(1, round(f * n))`` patients with the lowest ``frac_rank``.
So each class present in the pool keeps at least one patient even at 1 %, and
the subsets stay nested as ``f`` grows.

``splits.json`` records the seed, folds, fractions, stratification column and
counts.  The result is a pure function of (store, options, seed).
"""

from __future__ import annotations

import argparse
import hashlib
from pathlib import Path

import numpy as np
import pandas as pd

from radpretrain.data.info import per_file_note
from radpretrain.data.store import SPLITS, Store
from radpretrain.errors import UserError
from radpretrain.utils import read_json, write_json

SPLITS_JSON = "splits.json"
SPLIT_NAMES = ("train", "val", "test")
COLUMNS = ["image_id", "patient_id", "split", "fold", "frac_rank", "keep", "stratum"]
REPORT_FRACTIONS = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0)
MISSING = "<missing>"
_GOLDEN = (5 ** 0.5 - 1) / 2  # low-discrepancy step for systematic sampling


# -- building ----------------------------------------------------------------
def _patient_strata(images: pd.DataFrame, column: str | None) -> pd.Series:
    """Stratum (string) per patient_id."""
    pids = images["patient_id"].astype(str)
    if column is None:
        return pd.Series("all", index=pd.Index(sorted(pids.unique()), name="patient_id"))
    col = images[column]
    if pd.api.types.is_numeric_dtype(col) and not pd.api.types.is_bool_dtype(col) and col.nunique() > 10:
        med = col.groupby(pids).median()
        known = med.dropna()
        bins = pd.qcut(known.rank(method="first"), q=min(5, len(known)), labels=False) if len(known) else known
        out = pd.Series(MISSING, index=med.index, dtype=object)
        out[known.index] = [f"q{int(b)}" for b in bins]
        return out.sort_index()

    def norm(v):
        if pd.isna(v):
            return None
        if isinstance(v, float) and v.is_integer():
            v = int(v)
        return str(v)

    vals = pd.Series([norm(v) for v in col], index=images.index)
    out = {}
    for pid, group in vals.groupby(pids):
        counts = group.dropna().value_counts()
        if counts.empty:
            out[pid] = MISSING
        else:
            top = counts[counts == counts.max()].index
            out[pid] = sorted(top)[0]
    return pd.Series(out, dtype=object).rename_axis("patient_id").sort_index()


def default_stratify_column(store: Store) -> str | None:
    labels = store.label_columns
    return labels[0] if labels else None


def make_splits(
    images: pd.DataFrame,
    folds: int = 5,
    seed: int = 0,
    stratify: str | None = None,
    val: float = 0.1,
    test: float = 0.2,
    max_per_patient: int | None = None,
    name: str = "dataset",
) -> pd.DataFrame:
    """The splits table for ``images`` (rows of ``Store.images``); see the module docstring."""
    if len(images) == 0:
        raise UserError(f"{name}: no ingested images to split")
    if not (0 <= val < 1 and 0 <= test < 1 and val + test < 1):
        raise UserError(f"{name}: --val {val} and --test {test} must be in [0, 1) with val + test < 1")
    if stratify is not None and stratify not in images.columns:
        raise UserError(f"{name}: cannot stratify by {stratify!r}: no such manifest column")
    if max_per_patient is not None and max_per_patient < 1:
        raise UserError(f"{name}: --max-per-patient must be >= 1, got {max_per_patient}")
    strata = _patient_strata(images, stratify)
    n_pat = len(strata)
    if folds < 2 or folds > n_pat:
        raise UserError(f"{name}: --folds {folds} must be between 2 and the number of patients ({n_pat})")
    pids = strata.index.to_numpy()
    codes = pd.Categorical(strata.to_numpy(), categories=sorted(strata.unique())).codes

    def grouped_order(rng: np.random.Generator) -> np.ndarray:
        # patients ordered by (stratum, random) -> positions into pids
        return np.lexsort((rng.permutation(n_pat), codes))

    # split: Weyl sequence over the (stratum, random) order
    rng = np.random.default_rng([seed, 1])
    order = grouped_order(rng)
    u = np.empty(n_pat)
    u[order] = (rng.random() + np.arange(n_pat) * _GOLDEN) % 1.0
    split = np.where(u < test, "test", np.where(u < test + val, "val", "train"))

    # folds: round robin over the (stratum, random) order
    rng = np.random.default_rng([seed, 2])
    order = grouped_order(rng)
    fold = np.empty(n_pat, dtype=np.int64)
    fold[order] = (np.arange(n_pat) + int(rng.integers(folds))) % folds

    # frac_rank: evenly spread within each stratum
    rng = np.random.default_rng([seed, 3])
    order = grouped_order(rng)
    frac = np.empty(n_pat)
    sorted_codes = codes[order]
    start = 0
    for c in np.unique(sorted_codes):
        n = int((sorted_codes == c).sum())
        frac[order[start : start + n]] = (np.arange(n) + 0.5) / n
        start += n

    per_patient = pd.DataFrame({"split": split, "fold": fold, "frac_rank": frac, "stratum": strata.to_numpy()}, index=pids)
    img_pids = images["patient_id"].astype(str).to_numpy()
    out = pd.DataFrame({"image_id": images["image_id"].astype(str).to_numpy(), "patient_id": img_pids})
    out = out.join(per_patient, on="patient_id")
    out["keep"] = True
    if max_per_patient is not None:
        rng = np.random.default_rng([seed, 4])
        order = np.lexsort((out["image_id"].to_numpy(), img_pids))  # deterministic, independent of row order
        keep = np.ones(len(out), dtype=bool)
        sorted_pids = img_pids[order]
        bounds = np.flatnonzero(np.r_[True, sorted_pids[1:] != sorted_pids[:-1], True])
        for a, b in zip(bounds[:-1], bounds[1:]):
            if b - a > max_per_patient:
                drop = rng.permutation(np.arange(a, b))[max_per_patient:]
                keep[order[drop]] = False
        out["keep"] = keep
    out["fold"] = out["fold"].astype("int64")
    return out[COLUMNS]


def check_leakage(df: pd.DataFrame, source: str = "splits") -> None:
    """Raise a :class:`UserError` when a patient lies on two sides of ``split`` or of ``fold``."""
    for col in ("image_id", "patient_id"):
        if col not in df.columns:
            raise UserError(f"{source}: no {col!r} column; cannot check for patient leakage")
    dup = df["image_id"][df["image_id"].duplicated()]
    if len(dup):
        raise UserError(f"{source}: image {dup.iloc[0]} appears {int((df['image_id'] == dup.iloc[0]).sum())} times")
    for col in ("split", "fold"):
        if col not in df.columns:
            continue
        nun = df.groupby("patient_id")[col].nunique()
        bad = nun[nun > 1]
        if len(bad):
            pid = bad.index[0]
            sides = sorted(str(v) for v in df.loc[df["patient_id"] == pid, col].unique())
            raise UserError(
                f"{source}: PATIENT LEAKAGE: patient {pid} has images on {len(sides)} sides of {col!r} "
                f"({' and '.join(sides)}); {len(bad)} patient(s) leak in total. Re-run 'radpretrain split'."
            )


# -- reading and selecting ----------------------------------------------------
def load_splits(root: str | Path) -> pd.DataFrame:
    """Read ``DATASET/splits.parquet`` (a clear error when it is missing)."""
    path = Path(root) / SPLITS
    if not path.is_file():
        raise UserError(f"{root}: no {SPLITS}; run 'radpretrain split {root}' first")
    df = pd.read_parquet(path)
    missing = [c for c in COLUMNS if c not in df.columns]
    if missing:
        raise UserError(f"{path}: missing column(s) {', '.join(missing)}; re-run 'radpretrain split {root}'")
    return df


def _as_set(v):
    return set(v) if isinstance(v, (list, tuple, set, frozenset, np.ndarray)) else {v}


def _fraction_patients(pool: pd.DataFrame, fraction: float, lowest: bool = True) -> set:
    """Patients kept by ``fraction`` inside ``pool``: per stratum the max(1, round(f n)) lowest frac_rank."""
    pat = pool.groupby("patient_id", sort=True).agg(frac_rank=("frac_rank", "first"), stratum=("stratum", "first"))
    keep = set()
    for _, g in pat.groupby("stratum", sort=True):
        g = g.sort_values("frac_rank", ascending=lowest, kind="stable")
        k = min(len(g), max(1, int(round(fraction * len(g)))))
        keep.update(g.index[:k])
    return keep


def select(df: pd.DataFrame, split=None, fold=None, exclude_fold=None, fraction=None, respect_keep: bool = True) -> pd.DataFrame:
    """Rows of a splits table: by split name(s), fold(s), excluded fold(s), then a nested label fraction.

    ``fraction`` (0, 1] keeps, within every stratum of the rows selected so
    far, the ``max(1, round(fraction * n_patients))`` patients with the lowest
    ``frac_rank`` (nested, stratified, at least one patient per class present).
    Rows with ``keep == False`` (per-patient caps) are dropped unless
    ``respect_keep=False``.
    """
    sub = df
    if respect_keep and "keep" in sub.columns:
        sub = sub[sub["keep"].astype(bool)]
    if split is not None:
        names = _as_set(split)
        unknown = names - set(SPLIT_NAMES)
        if unknown:
            raise UserError(f"unknown split name(s) {sorted(unknown)}; choose from {', '.join(SPLIT_NAMES)}")
        sub = sub[sub["split"].isin(names)]
    if fold is not None:
        sub = sub[sub["fold"].isin(_as_set(fold))]
    if exclude_fold is not None:
        sub = sub[~sub["fold"].isin(_as_set(exclude_fold))]
    if fraction is not None:
        f = float(fraction)
        if not 0 < f <= 1:
            raise UserError(f"fraction {fraction} must be in (0, 1]")
        if f < 1 and len(sub):
            sub = sub[sub["patient_id"].isin(_fraction_patients(sub, f))]
    return sub


def _rows_of(store: Store, df: pd.DataFrame, image_ids) -> np.ndarray:
    ids = store.images["image_id"].astype(str).to_numpy()
    pos = pd.Series(np.arange(len(ids)), index=ids)
    wanted = pd.Index(pd.Series(image_ids).astype(str))
    missing = ~wanted.isin(pos.index)
    if missing.any() or len(df) != len(ids):
        raise UserError(f"{store.root}: {SPLITS} does not match the store's images (the store changed); re-run 'radpretrain split {store.root}'")
    return np.sort(pos.loc[wanted].to_numpy().astype(np.int64))


def _open(root_or_store) -> Store:
    return root_or_store if isinstance(root_or_store, Store) else Store(root_or_store)


def split_indices(root_or_store, fraction=None, splits: pd.DataFrame | None = None, respect_keep: bool = True) -> dict[str, np.ndarray]:
    """Rows of ``Store.images`` for the fixed train/val/test split; ``fraction`` applies to train only."""
    store = _open(root_or_store)
    df = load_splits(store.root) if splits is None else splits
    out = {}
    for name in SPLIT_NAMES:
        sub = select(df, split=name, fraction=fraction if name == "train" else None, respect_keep=respect_keep)
        out[name] = _rows_of(store, df, sub["image_id"])
    return out


def carve_val(rest: pd.DataFrame, val: float) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Split the non-test rows into (train, val), patient-grouped and stratified.

    In every stratum the ``round(val * n)`` patients with the *highest*
    ``frac_rank`` go to val (at least one patient overall when ``val > 0`` and
    there are two or more), so the nested label fractions, taken from the
    lowest ranks, never touch val.
    """
    val_pat: set = set()
    if val > 0 and len(rest):
        pat = rest.groupby("patient_id", sort=True).agg(frac_rank=("frac_rank", "first"), stratum=("stratum", "first"))
        for _, g in pat.groupby("stratum", sort=True):
            g = g.sort_values("frac_rank", ascending=False, kind="stable")
            val_pat.update(g.index[: int(round(val * len(g)))])
        if not val_pat and len(pat) >= 2:
            val_pat = {pat["frac_rank"].idxmax()}
    in_val = rest["patient_id"].isin(val_pat)
    return rest[~in_val], rest[in_val]


def fold_indices(root_or_store, fold: int, val: float | None = None, fraction=None,
                 splits: pd.DataFrame | None = None, respect_keep: bool = True) -> dict[str, np.ndarray]:
    """Cross-validation fold ``fold``: rows of ``Store.images`` for train, val and test.

    test = the patients of fold ``fold``; val = in every stratum of the other
    folds, the ``round(val * n)`` patients with the *highest* ``frac_rank``
    (at least one patient overall when ``val > 0``); train = the rest, reduced
    by the nested ``fraction`` (lowest ``frac_rank`` first, so it never
    touches val).  ``val`` defaults to the ``--val`` recorded in ``splits.json``.
    """
    store = _open(root_or_store)
    df = load_splits(store.root) if splits is None else splits
    folds = sorted(int(f) for f in df["fold"].unique())
    if int(fold) not in folds:
        raise UserError(f"{store.root}: fold {fold} does not exist (folds: {folds})")
    if val is None:
        meta = store.root / SPLITS_JSON
        val = float(read_json(meta).get("val", 0.1)) if meta.is_file() else 0.1
    test_df = select(df, fold=fold, respect_keep=respect_keep)
    rest = select(df, exclude_fold=fold, respect_keep=respect_keep)
    train_df, val_df = carve_val(rest, val)
    if fraction is not None:
        train_df = select(train_df, fraction=fraction, respect_keep=False)
    return {name: _rows_of(store, df, d["image_id"]) for name, d in (("train", train_df), ("val", val_df), ("test", test_df))}


# -- summary and CLI ------------------------------------------------------------
def summarize(df: pd.DataFrame) -> dict:
    """Counts per split, per fold and per nested fraction of the train split."""
    kept = df[df["keep"]]
    out = {"images": int(len(df)), "images_kept": int(len(kept)), "patients": int(df["patient_id"].nunique())}
    out["split"] = {
        s: {"images": int((kept["split"] == s).sum()), "patients": int(df.loc[df["split"] == s, "patient_id"].nunique()),
            "patients_by_stratum": {str(k): int(v) for k, v in df[df["split"] == s].groupby("stratum")["patient_id"].nunique().items()}}
        for s in SPLIT_NAMES
    }
    out["fold"] = {str(f): {"images": int((kept["fold"] == f).sum()), "patients": int(df.loc[df["fold"] == f, "patient_id"].nunique())}
                   for f in sorted(df["fold"].unique())}
    out["train_fraction_patients"] = {str(f): int(select(df, split="train", fraction=f)["patient_id"].nunique()) for f in REPORT_FRACTIONS}
    return out


def write_splits(root: str | Path, folds: int = 5, seed: int = 0, stratify: str | None = "auto", val: float = 0.1,
                 test: float = 0.2, max_per_patient: int | None = None) -> tuple[pd.DataFrame, dict]:
    """Compute, check and write ``splits.parquet`` + ``splits.json``; returns (table, json dict)."""
    store = Store(root)
    column = default_stratify_column(store) if stratify == "auto" else (None if stratify in (None, "none") else stratify)
    images = store.images
    df = make_splits(images, folds=folds, seed=seed, stratify=column, val=val, test=test,
                     max_per_patient=max_per_patient, name=str(store.root))
    check_leakage(df, source=str(store.root / SPLITS))
    meta = {
        "seed": int(seed), "folds": int(folds), "val": float(val), "test": float(test),
        "fractions": list(REPORT_FRACTIONS), "stratify": column, "max_per_patient": max_per_patient,
        "patient_id_source": store.meta.get("patient_id_source"),
        "patient_id_sources": _qc(store).get("patient_id_sources"),
        "fraction_rule": "per stratum of the pool: the max(1, round(f*n)) patients with the lowest frac_rank",
        "image_ids_sha256": hashlib.sha256("\n".join(df["image_id"]).encode()).hexdigest(),
        "counts": summarize(df),
    }
    path = store.root / SPLITS
    tmp = path.with_name(".splits.parquet.tmp")
    df.to_parquet(tmp, index=False)
    tmp.replace(path)
    write_json(store.root / SPLITS_JSON, meta)
    return df, meta


def _qc(store: Store) -> dict:
    path = store.root / "qc_summary.json"
    return read_json(path) if path.is_file() else {}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("dataset", help="dataset store folder (from 'radpretrain ingest')")
    parser.add_argument("--folds", type=int, default=5, help="number of cross-validation folds over all patients (default 5)")
    parser.add_argument("--seed", type=int, default=0, help="random seed; same seed, same splits (default 0)")
    parser.add_argument("--stratify", default="auto",
                        help="manifest column to stratify by; default: the first label column; 'none' to switch off")
    parser.add_argument("--val", type=float, default=0.1, help="fraction of patients in val (default 0.1)")
    parser.add_argument("--test", type=float, default=0.2, help="fraction of patients in test (default 0.2)")
    parser.add_argument("--max-per-patient", type=int, default=None,
                        help="keep at most N images per patient (seeded choice, stored in the 'keep' column)")


def run(args) -> int:
    df, meta = write_splits(args.dataset, folds=args.folds, seed=args.seed, stratify=args.stratify,
                            val=args.val, test=args.test, max_per_patient=args.max_per_patient)
    c = meta["counts"]
    print(f"wrote {Path(args.dataset) / SPLITS} ({c['images']} images, {c['patients']} patients, "
          f"stratified by {meta['stratify'] or 'nothing'}, seed {meta['seed']}); no patient leakage")
    note = per_file_note(meta["patient_id_source"], meta.get("patient_id_sources"), c["images"])
    if note:
        print("note: " + note)
    print(f"{'split':<8}{'patients':>10}{'images':>10}  patients by stratum")
    for s in SPLIT_NAMES:
        d = c["split"][s]
        strata = ", ".join(f"{k}: {v}" for k, v in d["patients_by_stratum"].items())
        print(f"{s:<8}{d['patients']:>10}{d['images']:>10}  {strata}")
    print("folds (patients): " + ", ".join(f"{k}: {v['patients']}" for k, v in c["fold"].items()))
    print("train patients at fraction: " + ", ".join(f"{k}: {v}" for k, v in c["train_fraction_patients"].items()))
    return 0
