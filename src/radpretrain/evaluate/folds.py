"""Cross-validation plan: which images train, tune and test in each fold and label fraction.

The plan is computed once per ``evaluate`` call and shared by every init and
protocol, so all comparisons are paired (same test images, same labelled
training subset).  Everything is grouped by patient and follows
:mod:`radpretrain.data.splits` (``fold_indices``)::

    test  = the patients of fold k
    val   = in every stratum of the other folds, the round(val * n) patients with the
            highest frac_rank (val from splits.json, default 0.1)
    train = the rest, reduced to the label fraction f: per stratum the
            max(1, round(f * n)) patients with the lowest frac_rank (splits.select)

so subsets are stratified and nested (1 % inside 10 % inside 100 %) and never
touch val.  With ``val_fraction=same`` (the default) the validation set is
reduced by the same fraction (a study with 1 % labels has no fully labelled
validation set either); ``val_fraction=full`` keeps all of it.  Only images
with a value for the target take part; fractions count labelled patients.

Folds come from the store's ``splits.parquet`` (``radpretrain split``) when it
exists; otherwise they are made here with :func:`radpretrain.data.splits.make_splits`
stratified by the target column (and saved in the output folder).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from radpretrain.data import splits as S
from radpretrain.errors import UserError
from radpretrain.utils import read_json


@dataclass
class FoldSet:
    fold: int
    fraction: float
    train: np.ndarray   # positions into the labelled table
    val: np.ndarray
    test: np.ndarray


def load_or_make_splits(store, target_column: str | None, n_folds: int | None, seed: int = 0) -> tuple[pd.DataFrame, dict]:
    """The splits table of the store (checked for leakage), or one made for this evaluation."""
    path = store.root / S.SPLITS
    if path.is_file():
        df = S.load_splits(store.root)
        S.check_leakage(df, source=str(path))
        meta_path = store.root / S.SPLITS_JSON
        meta = read_json(meta_path) if meta_path.is_file() else {}
        k = int(df["fold"].max()) + 1
        if n_folds is not None and n_folds > k:
            raise UserError(f"--folds {n_folds}: {path} has {k} folds; rerun 'radpretrain split --folds {n_folds}' "
                            f"or use --folds {k} or fewer")
        return df, {"source": "splits.parquet", "folds": k, "val": float(meta.get("val", 0.1)),
                    "stratify": meta.get("stratify"), "seed": meta.get("seed")}
    k = int(n_folds or 5)
    strat = target_column if target_column in store.images.columns else None
    df = S.make_splits(store.images, folds=k, seed=seed, stratify=strat, name=str(store.root))
    S.check_leakage(df, source="computed splits")
    return df, {"source": "computed by evaluate (no splits.parquet)", "folds": k, "val": 0.1, "stratify": strat,
                "seed": seed}


def fold_sets(table: pd.DataFrame, splits: pd.DataFrame, fractions: list[float], n_eval_folds: int,
              val: float = 0.1, val_fraction: str = "same") -> list[FoldSet]:
    """The train/val/test positions (into ``table``) of every (fold, fraction), in a fixed order."""
    pos = pd.Series(np.arange(len(table)), index=table["image_id"].astype(str).to_numpy())
    df = splits[splits["image_id"].astype(str).isin(pos.index)]
    if "keep" in df.columns:
        df = df[df["keep"].astype(bool)]

    def rows(d):
        return np.sort(pos.loc[d["image_id"].astype(str)].to_numpy())

    out = []
    for k in sorted(int(f) for f in df["fold"].unique())[:n_eval_folds]:
        test = S.select(df, fold=k, respect_keep=False)
        rest = S.select(df, exclude_fold=k, respect_keep=False)
        train_df, val_df = S.carve_val(rest, val)
        for f in fractions:
            tr = S.select(train_df, fraction=f, respect_keep=False)
            va = S.select(val_df, fraction=f, respect_keep=False) if val_fraction == "same" else val_df
            out.append(FoldSet(k, float(f), rows(tr), rows(va), rows(test)))
    return out


def leakage_check(table: pd.DataFrame, sets: list[FoldSet]) -> dict:
    """Patients shared between train/val/test of any fold (must be none); raises on leakage."""
    pid = table["patient_id"].to_numpy()
    worst = 0
    for s in sets:
        a, b, c = set(pid[s.train]), set(pid[s.val]), set(pid[s.test])
        shared = len(a & c) + len(b & c) + len(a & b)
        worst = max(worst, shared)
        if shared:
            raise UserError(f"leakage: fold {s.fold} fraction {s.fraction}: {shared} patients appear in more "
                            "than one of train/val/test; the splits are not patient-grouped (rerun 'radpretrain split')")
    # also test sets partition the data: every image is tested exactly once per fraction
    return {"patients_shared_train_test": 0, "patients_shared_val_test": 0, "patients_shared_train_val": 0,
            "checked_sets": len(sets), "ok": worst == 0}


def splits_table(table: pd.DataFrame, sets: list[FoldSet]) -> pd.DataFrame:
    """Long table of the exact image ids used: ``image_id, patient_id, fold, fraction, role``."""
    rows = []
    ids, pid = table["image_id"].to_numpy(), table["patient_id"].to_numpy()
    for s in sets:
        for role, idx in (("train", s.train), ("val", s.val), ("test", s.test)):
            rows.append(pd.DataFrame({"image_id": ids[idx], "patient_id": pid[idx], "fold": s.fold,
                                      "fraction": s.fraction, "role": role}))
    return pd.concat(rows, ignore_index=True) if rows else pd.DataFrame(
        columns=["image_id", "patient_id", "fold", "fraction", "role"])
