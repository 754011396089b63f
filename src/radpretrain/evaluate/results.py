"""Turn out-of-fold predictions into tidy results and paired comparisons.

``predictions`` (one row per test image, fold, fraction, init, protocol) ->

- ``results``: ``init, protocol, fraction, fold, metric, value, ci_low, ci_high, n``
  with ``fold`` = ``0..K-1`` (that fold's test set, no CI) and ``"pooled"`` (all
  out-of-fold predictions together, 95 % CI by bootstrap over patients);
- ``comparisons``: every init against ``scratch`` and ``imagenet`` (when they were
  evaluated) on the same images: ``delta`` of each metric with its paired patient
  bootstrap CI and p-value, plus DeLong's test for a binary AUC.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from radpretrain.data.patches import CANDIDATE_COLUMN, SCAN_COLUMN, fp_weight
from radpretrain.evaluate.metrics import (
    FROC_FPS, TASK_METRICS, delong_test, froc_with_ci, metric_value, metric_with_ci, paired_bootstrap,
    paired_bootstrap_mean, primary_metric,
)

REFERENCES = ("scratch", "imagenet")


def scores_of(df: pd.DataFrame, task: str) -> np.ndarray:
    """The score array a metric needs (class probabilities [N, C] for multiclass)."""
    if task == "multiclass":
        return np.stack([np.asarray(p, dtype=float) for p in df["proba"]])
    return df["y_score"].to_numpy(float)


def summarise(preds: pd.DataFrame, task: str, n_boot: int = 1000, seed: int = 0) -> tuple[pd.DataFrame, pd.DataFrame]:
    metrics = TASK_METRICS[task]
    rows = []
    for (init, proto, frac), g in preds.groupby(["init", "protocol", "fraction"], sort=False):
        for fold, gf in g.groupby("fold"):
            yt, sc = gf["y_true"].to_numpy(), scores_of(gf, task)
            for m in metrics:
                rows.append({"init": init, "protocol": proto, "fraction": frac, "fold": str(fold), "metric": m,
                             "value": metric_value(m, task, yt, sc), "ci_low": np.nan, "ci_high": np.nan,
                             "n": len(gf)})
        yt, sc, grp = g["y_true"].to_numpy(), scores_of(g, task), g["patient_id"].to_numpy()
        for m in metrics:
            v, lo, hi = metric_with_ci(m, task, yt, sc, grp, n_boot=n_boot, seed=seed)
            rows.append({"init": init, "protocol": proto, "fraction": frac, "fold": "pooled", "metric": m,
                         "value": v, "ci_low": lo, "ci_high": hi, "n": len(g)})
    results = pd.DataFrame(rows)
    comparisons = compare(preds, task, n_boot=n_boot, seed=seed)
    return results, comparisons


def compare(preds: pd.DataFrame, task: str, n_boot: int = 1000, seed: int = 0) -> pd.DataFrame:
    """Paired comparisons of every init with each reference init present."""
    cols = ["init", "reference", "protocol", "fraction", "metric", "value", "reference_value", "delta",
            "ci_low", "ci_high", "p", "n", "n_patients", "delong_p", "delong_ci_low", "delong_ci_high"]
    rows = []
    inits = list(dict.fromkeys(preds["init"]))
    for (proto, frac), g in preds.groupby(["protocol", "fraction"], sort=False):
        for ref in REFERENCES:
            if ref not in inits:
                continue
            gr = g[g["init"] == ref]
            for init in inits:
                if init == ref:
                    continue
                ga = g[g["init"] == init]
                if not len(ga) or not len(gr):
                    continue
                j = ga.merge(gr, on=["image_id", "fold"], suffixes=("", "_ref"))
                if not len(j):
                    continue
                yt = j["y_true"].to_numpy()
                sa = scores_of(j, task)
                sr = (np.stack([np.asarray(p, float) for p in j["proba_ref"]]) if task == "multiclass"
                      else j["y_score_ref"].to_numpy(float))
                grp = j["patient_id"].to_numpy()
                for m in TASK_METRICS[task]:
                    r = paired_bootstrap(m, task, yt, sa, sr, grp, n_boot=n_boot, seed=seed)
                    row = {"init": init, "reference": ref, "protocol": proto, "fraction": frac, "metric": m,
                           "value": r["a"], "reference_value": r["b"], "delta": r["delta"], "ci_low": r["ci_low"],
                           "ci_high": r["ci_high"], "p": r["p"], "n": len(j), "n_patients": len(np.unique(grp)),
                           "delong_p": np.nan, "delong_ci_low": np.nan, "delong_ci_high": np.nan}
                    if m == "auc" and task == "binary":
                        d = delong_test(yt, sa, sr)
                        row.update(delong_p=d["p"], delong_ci_low=d["ci_low"], delong_ci_high=d["ci_high"])
                    rows.append(row)
    return pd.DataFrame(rows, columns=cols)


# -- init groups: several pretraining seeds of one recipe ---------------------------------

GROUPS_FILE = "groups.csv"
GROUP_COLUMNS = ["group", "protocol", "fraction", "metric", "n_seeds", "mean", "sd", "min", "max", "seeds",
                 "reference", "reference_value", "delta_mean", "ci_low", "ci_high", "p", "n", "n_patients"]


def group_summary(preds: pd.DataFrame, results: pd.DataFrame, task: str, groups: dict[str, list[str]],
                  n_boot: int = 1000, seed: int = 0) -> pd.DataFrame:
    """Per init group, protocol and label fraction: the seeds' headline metric and the seed-mean Δ vs references.

    The seed statistics are over the seeds' pooled out-of-fold values (``results``): mean, SD
    (n - 1), min and max; ``seeds`` lists ``init=value [ci_low, ci_high]`` (each seed's own
    patient-bootstrap CI).  For every reference init present (scratch, imagenet), ``delta_mean``
    is the mean over the seeds of the paired difference, on the images every seed and the
    reference predicted; its CI and p come from one patient bootstrap shared by all seeds
    (:func:`~radpretrain.evaluate.metrics.paired_bootstrap_mean`).  One row per reference (one
    row with an empty reference when none was evaluated).
    """
    m = primary_metric(task)
    pooled = results[(results["fold"] == "pooled") & (results["metric"] == m)]
    inits = set(preds["init"])
    rows = []
    for group, members in groups.items():
        members = [x for x in members if x in inits]
        if not members:
            continue
        for (proto, frac), g in preds[preds["init"].isin(members)].groupby(["protocol", "fraction"], sort=False):
            res = pooled[(pooled["protocol"] == proto) & (pooled["fraction"] == frac)].set_index("init")
            have = [x for x in members if x in res.index]
            vals = np.array([float(res.loc[x, "value"]) for x in have])
            ok = vals[np.isfinite(vals)]
            base = {"group": group, "protocol": proto, "fraction": frac, "metric": m, "n_seeds": len(have),
                    "mean": float(ok.mean()) if len(ok) else np.nan,
                    "sd": float(ok.std(ddof=1)) if len(ok) > 1 else np.nan,
                    "min": float(ok.min()) if len(ok) else np.nan, "max": float(ok.max()) if len(ok) else np.nan,
                    "seeds": "; ".join(f"{x}={res.loc[x, 'value']:.4f} [{res.loc[x, 'ci_low']:.4f}, "
                                       f"{res.loc[x, 'ci_high']:.4f}]" for x in have)}
            refs = [r for r in REFERENCES if r in inits]
            if not refs:
                rows.append({**base, "reference": ""})
            for ref in refs:
                gp = preds[(preds["protocol"] == proto) & (preds["fraction"] == frac)]
                joined = gp[gp["init"] == ref][["image_id", "fold", "patient_id", "y_true", "y_score"]
                                               + (["proba"] if task == "multiclass" else [])]
                joined = joined.rename(columns={"y_score": "y_score_ref", "proba": "proba_ref"})
                for i, x in enumerate(have):
                    part = gp[gp["init"] == x][["image_id", "fold", "y_score"]
                                               + (["proba"] if task == "multiclass" else [])]
                    joined = joined.merge(part.rename(columns={"y_score": f"y_score_{i}", "proba": f"proba_{i}"}),
                                          on=["image_id", "fold"])
                if not len(joined) or not have:
                    continue

                def col(name):
                    if task == "multiclass":
                        return np.stack([np.asarray(p, float) for p in joined[name.replace("y_score", "proba")]])
                    return joined[name].to_numpy(float)

                grp = joined["patient_id"].to_numpy()
                r = paired_bootstrap_mean(m, task, joined["y_true"].to_numpy(), [col(f"y_score_{i}") for i in
                                                                                 range(len(have))],
                                          col("y_score_ref"), grp, n_boot=n_boot, seed=seed)
                rows.append({**base, "reference": ref, "reference_value": r["reference"], "delta_mean": r["delta"],
                             "ci_low": r["ci_low"], "ci_high": r["ci_high"], "p": r["p"], "n": len(joined),
                             "n_patients": len(np.unique(grp))})
    return pd.DataFrame(rows, columns=GROUP_COLUMNS)


def group_records(table: pd.DataFrame, results: pd.DataFrame, groups: dict[str, list[str]]) -> list[dict]:
    """``summary.json``'s ``groups`` rows: one per (group, protocol, fraction) with its seeds and Δ per reference."""
    out: dict[tuple, dict] = {}
    pooled = results[results["fold"] == "pooled"]
    for _, r in table.iterrows():
        key = (r["group"], r["protocol"], float(r["fraction"]))
        if key not in out:
            res = pooled[(pooled["protocol"] == r["protocol"]) & (pooled["fraction"] == r["fraction"])
                         & (pooled["metric"] == r["metric"])].set_index("init")
            seeds = [{"init": x, "value": float(res.loc[x, "value"]), "ci_low": float(res.loc[x, "ci_low"]),
                      "ci_high": float(res.loc[x, "ci_high"])} for x in groups[r["group"]] if x in res.index]
            out[key] = {"group": r["group"], "protocol": r["protocol"], "fraction": float(r["fraction"]),
                        "metric": r["metric"], "n_seeds": int(r["n_seeds"]), "mean": r["mean"], "sd": r["sd"],
                        "min": r["min"], "max": r["max"], "seeds": seeds, "vs": {}}
        if r["reference"]:
            out[key]["vs"][r["reference"]] = {"reference_value": r["reference_value"], "delta": r["delta_mean"],
                                              "ci": [r["ci_low"], r["ci_high"]], "p": r["p"],
                                              "n": int(r["n"]), "n_patients": int(r["n_patients"])}
    return list(out.values())


# -- FROC of candidate-patch stores (radpretrain patches) ------------------------------

FROC_FILE = "froc.csv"
FROC_PREDICTIONS = "froc_predictions.parquet"


def candidate_predictions(preds: pd.DataFrame, images: pd.DataFrame) -> pd.DataFrame:
    """One row per candidate and (init, protocol, fraction): the mean score of its patches.

    ``images``: the store's images with the candidate and scan columns of a patch store.
    Columns: init, protocol, fraction, candidate_id, scan_id, patient_id, fold, y_true, score, n_patches.
    """
    ids = images[["image_id", CANDIDATE_COLUMN, SCAN_COLUMN]]
    j = preds[["image_id", "patient_id", "fold", "fraction", "init", "protocol", "y_true", "y_score"]].merge(
        ids, on="image_id", how="left")
    g = j.groupby(["init", "protocol", "fraction", CANDIDATE_COLUMN], sort=False)
    out = g.agg(scan_id=(SCAN_COLUMN, "first"), patient_id=("patient_id", "first"), fold=("fold", "first"),
                y_true=("y_true", "max"), score=("y_score", "mean"), n_patches=("image_id", "size")).reset_index()
    return out


def froc_results(cands: pd.DataFrame, fp_weight: float = 1.0, n_boot: int = 1000, seed: int = 0) -> pd.DataFrame:
    """Tidy FROC results: init, protocol, fraction, point (FPs per scan, or ``cpm``), value, ci_low,
    ci_high, n_candidates, n_positives, n_scans; 95 % CIs by the patient bootstrap."""
    rows = []
    for (init, proto, frac), g in cands.groupby(["init", "protocol", "fraction"], sort=False):
        r = froc_with_ci(g["y_true"].to_numpy(), g["score"].to_numpy(float), g["scan_id"].to_numpy(),
                         g["patient_id"].to_numpy(), FROC_FPS, fp_weight, n_boot=n_boot, seed=seed)
        base = {"init": init, "protocol": proto, "fraction": frac, "n_candidates": r["n_candidates"],
                "n_positives": r["n_positives"], "n_scans": r["n_scans"]}
        for p, v, lo, hi in zip(r["points"], r["sensitivity"], r["ci_low"], r["ci_high"]):
            rows.append({**base, "point": f"{p:g}", "value": v, "ci_low": lo, "ci_high": hi})
        rows.append({**base, "point": "cpm", "value": r["cpm"], "ci_low": r["cpm_ci_low"], "ci_high": r["cpm_ci_high"]})
    cols = ["init", "protocol", "fraction", "point", "value", "ci_low", "ci_high", "n_candidates", "n_positives",
            "n_scans"]
    return pd.DataFrame(rows, columns=cols)


def froc_outputs(out, preds: pd.DataFrame, images: pd.DataFrame, store_meta: dict, task: str, n_boot: int = 1000,
                 seed: int = 0) -> dict | None:
    """FROC of a binary task on a candidate-patch store: writes ``froc.csv`` and
    ``froc_predictions.parquet`` into ``out`` and returns the ``froc`` block of ``summary.json``
    (None, and nothing written, for other tasks and stores)."""
    if task != "binary" or SCAN_COLUMN not in images.columns or CANDIDATE_COLUMN not in images.columns:
        return None
    cands = candidate_predictions(preds, images)
    w = fp_weight(store_meta)
    res = froc_results(cands, w, n_boot=n_boot, seed=seed)
    cands.to_parquet(Path(out) / FROC_PREDICTIONS, index=False)
    res.to_csv(Path(out) / FROC_FILE, index=False)
    rows = []
    for (init, proto, frac), g in res.groupby(["init", "protocol", "fraction"], sort=False):
        pts, cpm = g[g["point"] != "cpm"], g[g["point"] == "cpm"].iloc[0]
        rows.append({"init": init, "protocol": proto, "fraction": frac, "cpm": cpm["value"],
                     "cpm_ci": [cpm["ci_low"], cpm["ci_high"]], "sensitivity": pts["value"].tolist(),
                     "ci_low": pts["ci_low"].tolist(), "ci_high": pts["ci_high"].tolist(),
                     "n_candidates": int(cpm["n_candidates"]), "n_positives": int(cpm["n_positives"]),
                     "n_scans": int(cpm["n_scans"])})
    return {"fps_per_scan": list(FROC_FPS), "fp_weight": w,
            "level": "one score per candidate: the mean of its patches' scores",
            "fp_rule": ("false positives per scan estimated for the full candidate list: each kept negative "
                        "counts fp_weight times (usable/kept negatives x scans kept/scans usable)")
            if w != 1.0 else "false positives per scan over all candidates of the store",
            "rows": rows}
