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

import numpy as np
import pandas as pd

from radpretrain.evaluate.metrics import (
    TASK_METRICS, delong_test, metric_value, metric_with_ci, paired_bootstrap,
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
