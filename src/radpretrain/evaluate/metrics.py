"""Metrics, patient-level bootstrap confidence intervals and paired comparisons.

Conventions used across :mod:`radpretrain.evaluate`:

- ``task`` is ``"binary"``, ``"multiclass"`` or ``"regression"``.
- ``y_true``: class index (0..C-1) for classification, a float for regression.
- ``y_score``: binary -> probability of the positive class, shape [N];
  multiclass -> class probabilities, shape [N, C]; regression -> prediction [N].
- ``groups``: the patient id of every prediction.  Every interval and paired
  test resamples *patients* (with all their images), never single images, so
  correlated images of one patient do not make intervals look narrower than
  they are.

Metrics follow scikit-learn's definitions (NumPy implementations, checked against
scikit-learn in the tests, fast enough for thousands of bootstrap replicates);
DeLong's test is implemented here (midrank algorithm of Sun & Xu, 2014).
"""

from __future__ import annotations

from typing import Callable

import numpy as np
from scipy import stats

TASKS = ("binary", "multiclass", "regression")
# Metrics per task; the first one is the task's headline metric.
TASK_METRICS = {
    "binary": ("auc", "balanced_accuracy", "accuracy"),
    "multiclass": ("balanced_accuracy", "accuracy", "auc"),
    "regression": ("mae", "r2"),
}
HIGHER_IS_BETTER = {"auc": True, "balanced_accuracy": True, "accuracy": True, "mae": False, "r2": True}
METRIC_LABELS = {"auc": "AUC", "balanced_accuracy": "balanced accuracy", "accuracy": "accuracy",
                 "mae": "MAE", "r2": "R²"}


def primary_metric(task: str) -> str:
    return TASK_METRICS[task][0]


def predicted_labels(task: str, y_score: np.ndarray, threshold: float = 0.5) -> np.ndarray:
    """Hard predictions from scores (binary: ``score >= threshold``; multiclass: argmax)."""
    y_score = np.asarray(y_score)
    if task == "binary":
        return (y_score >= threshold).astype(int)
    if task == "multiclass":
        return np.argmax(y_score, axis=1)
    return y_score


def binary_auc(y_true, score) -> float:
    """ROC AUC by the Mann-Whitney rank statistic (ties count one half); NaN with one class."""
    y = np.asarray(y_true).astype(bool)
    m = int(y.sum())
    n = len(y) - m
    if m == 0 or n == 0:
        return float("nan")
    r = stats.rankdata(np.asarray(score, dtype=float))
    return float((r[y].sum() - m * (m + 1) / 2) / (m * n))


def metric_value(name: str, task: str, y_true: np.ndarray, y_score: np.ndarray) -> float:
    """One metric; NaN when undefined (e.g. AUC with a single class present).

    The definitions are scikit-learn's (``roc_auc_score``, macro one-vs-rest for
    multiclass over the classes present; ``balanced_accuracy_score``; ``accuracy_score``;
    ``mean_absolute_error``; ``r2_score``), computed with NumPy because the patient
    bootstrap calls this thousands of times; the tests check both agree.
    """
    y_true = np.asarray(y_true)
    y_score = np.asarray(y_score)
    if len(y_true) == 0:
        return float("nan")
    if name == "auc":
        if task == "binary":
            return binary_auc(y_true, y_score)
        present = np.unique(y_true).astype(int)
        if len(present) < 2:
            return float("nan")
        p = y_score[:, present]
        p = p / np.clip(p.sum(axis=1, keepdims=True), 1e-12, None)
        if len(present) == 2:
            return binary_auc(y_true == present[1], p[:, 1])
        return float(np.mean([binary_auc(y_true == c, p[:, j]) for j, c in enumerate(present)]))
    if name == "accuracy":
        return float(np.mean(predicted_labels(task, y_score) == y_true))
    if name == "balanced_accuracy":
        pred = predicted_labels(task, y_score)
        present = np.unique(y_true)
        return float(np.mean([np.mean(pred[y_true == c] == c) for c in present]))
    if name == "mae":
        return float(np.mean(np.abs(y_true.astype(float) - y_score.astype(float))))
    if name == "r2":
        yt = y_true.astype(float)
        ss_tot = float(np.sum((yt - yt.mean()) ** 2))
        if len(yt) < 2 or ss_tot == 0:
            return float("nan")
        return float(1 - np.sum((yt - y_score.astype(float)) ** 2) / ss_tot)
    raise ValueError(f"unknown metric {name!r}")


def compute_metrics(task: str, y_true, y_score) -> dict[str, float]:
    """All metrics of ``task`` as ``{name: value}``."""
    return {m: metric_value(m, task, y_true, y_score) for m in TASK_METRICS[task]}


# -- bootstrap over patients ---------------------------------------------------

def _group_index(groups) -> tuple[list[np.ndarray], int]:
    """Row indices of every group (patient)."""
    groups = np.asarray(groups)
    _, inv = np.unique(groups, return_inverse=True)
    order = np.argsort(inv, kind="stable")
    counts = np.bincount(inv)
    split = np.split(order, np.cumsum(counts)[:-1])
    return split, len(split)


def _resample(members: list[np.ndarray], rng: np.random.Generator) -> np.ndarray:
    pick = rng.integers(0, len(members), size=len(members))
    return np.concatenate([members[i] for i in pick])


def bootstrap_ci(
    metric: Callable[[np.ndarray], float],
    n: int,
    groups,
    n_boot: int = 1000,
    alpha: float = 0.05,
    seed: int = 0,
) -> tuple[float, float, np.ndarray]:
    """Percentile CI of ``metric(rows)`` resampling groups (patients) with replacement.

    ``metric`` takes an index array into the ``n`` predictions.  Returns
    ``(low, high, replicates)``; replicates where the metric is undefined
    (NaN, e.g. one class only) are dropped.
    """
    members, k = _group_index(groups if groups is not None else np.arange(n))
    rng = np.random.default_rng(seed)
    reps = np.array([metric(_resample(members, rng)) for _ in range(int(n_boot))], dtype=float)
    reps = reps[np.isfinite(reps)]
    if len(reps) == 0:
        return float("nan"), float("nan"), reps
    lo, hi = np.quantile(reps, [alpha / 2, 1 - alpha / 2])
    return float(lo), float(hi), reps


def metric_with_ci(name: str, task: str, y_true, y_score, groups, n_boot: int = 1000,
                   seed: int = 0) -> tuple[float, float, float]:
    """``(value, ci_low, ci_high)`` of one metric with a patient bootstrap."""
    y_true = np.asarray(y_true)
    y_score = np.asarray(y_score)
    value = metric_value(name, task, y_true, y_score)
    if not np.isfinite(value) or n_boot <= 0:
        return value, float("nan"), float("nan")
    lo, hi, _ = bootstrap_ci(lambda r: metric_value(name, task, y_true[r], y_score[r]), len(y_true), groups,
                             n_boot=n_boot, seed=seed)
    return value, lo, hi


def paired_bootstrap(
    name: str,
    task: str,
    y_true,
    score_a,
    score_b,
    groups,
    n_boot: int = 1000,
    seed: int = 0,
) -> dict:
    """Compare two inits predicting the same images: ``delta = metric(a) - metric(b)``.

    Patients are resampled once per replicate and both inits are scored on the
    same resample (paired).  The two-sided p-value is the bootstrap estimate of
    ``2 * min(P(delta* <= 0), P(delta* >= 0))`` with the +1 correction, i.e.
    never exactly 0.  ``better`` says whether a positive delta means ``a`` is better.
    """
    y_true = np.asarray(y_true)
    score_a = np.asarray(score_a)
    score_b = np.asarray(score_b)
    a = metric_value(name, task, y_true, score_a)
    b = metric_value(name, task, y_true, score_b)
    members, _ = _group_index(groups)
    rng = np.random.default_rng(seed)
    deltas = []
    for _ in range(int(n_boot)):
        r = _resample(members, rng)
        d = metric_value(name, task, y_true[r], score_a[r]) - metric_value(name, task, y_true[r], score_b[r])
        if np.isfinite(d):
            deltas.append(d)
    deltas = np.asarray(deltas)
    if len(deltas) == 0:
        lo = hi = p = float("nan")
    else:
        lo, hi = (float(q) for q in np.quantile(deltas, [0.025, 0.975]))
        m = len(deltas)
        p = min(1.0, 2 * min((np.sum(deltas <= 0) + 1) / (m + 1), (np.sum(deltas >= 0) + 1) / (m + 1)))
    return {"metric": name, "a": a, "b": b, "delta": a - b, "ci_low": lo, "ci_high": hi, "p": float(p),
            "n_boot": int(len(deltas)), "higher_is_better": HIGHER_IS_BETTER[name]}


# -- DeLong --------------------------------------------------------------------

def _midrank(x: np.ndarray) -> np.ndarray:
    """Mid-ranks (1-based, ties get the mean rank)."""
    return stats.rankdata(x, method="average")


def delong_test(y_true, score_a, score_b) -> dict:
    """DeLong's test for two correlated ROC AUCs on the same cases (binary).

    Returns ``{"auc_a", "auc_b", "delta", "se", "z", "p", "ci_low", "ci_high"}``
    (95 % CI of the difference from the DeLong variance).  Uses the structural
    components (placements) of DeLong et al. (1988), computed with mid-ranks.
    Note: it treats images as independent; with several images per patient the
    patient bootstrap (:func:`paired_bootstrap`) is the more honest test.
    """
    y = np.asarray(y_true).astype(bool)
    scores = np.vstack([np.asarray(score_a, float), np.asarray(score_b, float)])
    pos, neg = scores[:, y], scores[:, ~y]
    m, n = pos.shape[1], neg.shape[1]
    if m < 2 or n < 2:
        nan = float("nan")
        return {"auc_a": nan, "auc_b": nan, "delta": nan, "se": nan, "z": nan, "p": nan, "ci_low": nan, "ci_high": nan}
    aucs, v10, v01 = [], [], []
    for k in range(2):
        tx, ty = _midrank(pos[k]), _midrank(neg[k])
        tz = _midrank(np.concatenate([pos[k], neg[k]]))
        auc = (tz[:m].sum() - m * (m + 1) / 2) / (m * n)
        aucs.append(auc)
        v10.append((tz[:m] - tx) / n)          # placement of each positive
        v01.append(1.0 - (tz[m:] - ty) / m)    # placement of each negative
    s10 = np.cov(np.vstack(v10))
    s01 = np.cov(np.vstack(v01))
    cov = s10 / m + s01 / n
    var = cov[0, 0] + cov[1, 1] - 2 * cov[0, 1]
    delta = aucs[0] - aucs[1]
    se = float(np.sqrt(max(var, 0.0)))
    if se == 0:
        z = 0.0 if delta == 0 else np.sign(delta) * np.inf
        p = 1.0 if delta == 0 else 0.0
    else:
        z = delta / se
        p = float(2 * stats.norm.sf(abs(z)))
    return {"auc_a": float(aucs[0]), "auc_b": float(aucs[1]), "delta": float(delta), "se": se, "z": float(z),
            "p": p, "ci_low": float(delta - 1.959963985 * se), "ci_high": float(delta + 1.959963985 * se)}


def delong_variance(y_true, score) -> tuple[float, float]:
    """``(auc, variance)`` of a single AUC by DeLong (used by tests and the report)."""
    y = np.asarray(y_true).astype(bool)
    s = np.asarray(score, float)
    pos, neg = s[y], s[~y]
    m, n = len(pos), len(neg)
    tx, ty = _midrank(pos), _midrank(neg)
    tz = _midrank(np.concatenate([pos, neg]))
    auc = (tz[:m].sum() - m * (m + 1) / 2) / (m * n)
    v10 = (tz[:m] - tx) / n
    v01 = 1.0 - (tz[m:] - ty) / m
    return float(auc), float(np.var(v10, ddof=1) / m + np.var(v01, ddof=1) / n)
