"""Metrics agree with scikit-learn; patient bootstrap CIs and paired tests behave; DeLong is right."""

import numpy as np
import pytest
from sklearn import metrics as skm

from radpretrain.evaluate.metrics import (
    TASK_METRICS, bootstrap_ci, delong_test, delong_variance, metric_value, metric_with_ci, paired_bootstrap,
    weighted_metric_values,
)


def _binary(n, rng, signal=1.5):
    y = rng.integers(0, 2, n)
    s = 1 / (1 + np.exp(-(signal * (2 * y - 1) + rng.normal(0, 1, n))))
    return y, s


def test_metrics_match_sklearn():
    rng = np.random.default_rng(0)
    y, s = _binary(300, rng)
    s[:20] = 0.5  # ties
    assert metric_value("auc", "binary", y, s) == pytest.approx(skm.roc_auc_score(y, s), abs=1e-12)
    assert metric_value("accuracy", "binary", y, s) == pytest.approx(skm.accuracy_score(y, s >= 0.5))
    assert metric_value("balanced_accuracy", "binary", y, s) == pytest.approx(
        skm.balanced_accuracy_score(y, s >= 0.5))
    # multiclass: macro one-vs-rest
    yc = rng.integers(0, 4, 400)
    logits = rng.normal(0, 1, (400, 4))
    logits[np.arange(400), yc] += 1.0
    p = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    assert metric_value("auc", "multiclass", yc, p) == pytest.approx(
        skm.roc_auc_score(yc, p, multi_class="ovr", average="macro"), abs=1e-12)
    assert metric_value("balanced_accuracy", "multiclass", yc, p) == pytest.approx(
        skm.balanced_accuracy_score(yc, p.argmax(1)))
    # regression
    t = rng.normal(50, 10, 100)
    pr = t + rng.normal(0, 5, 100)
    assert metric_value("mae", "regression", t, pr) == pytest.approx(skm.mean_absolute_error(t, pr))
    assert metric_value("r2", "regression", t, pr) == pytest.approx(skm.r2_score(t, pr))
    # undefined -> NaN, not an exception
    assert np.isnan(metric_value("auc", "binary", np.ones(5), np.linspace(0, 1, 5)))


def test_ci_contains_estimate_and_narrows_with_more_patients():
    rng = np.random.default_rng(1)
    widths = []
    for n_pat in (40, 400):
        groups = np.repeat(np.arange(n_pat), 2)
        y = np.repeat(rng.integers(0, 2, n_pat), 2)  # label constant per patient
        s = 1 / (1 + np.exp(-(1.0 * (2 * y - 1) + rng.normal(0, 1, len(y)))))
        v, lo, hi = metric_with_ci("auc", "binary", y, s, groups, n_boot=400, seed=0)
        assert lo <= v <= hi
        widths.append(hi - lo)
    assert widths[1] < widths[0] * 0.6


def test_bootstrap_resamples_patients_not_images():
    # 10 patients with 50 identical images each: resampling images would give a tiny CI,
    # resampling patients gives the spread of 10 values.
    vals = np.repeat(np.arange(10, dtype=float), 50)
    groups = np.repeat(np.arange(10), 50)
    lo, hi, reps = bootstrap_ci(lambda r: vals[r].mean(), len(vals), groups, n_boot=500, seed=0)
    assert hi - lo > 2.0
    lo_i, hi_i, _ = bootstrap_ci(lambda r: vals[r].mean(), len(vals), None, n_boot=500, seed=0)
    assert hi_i - lo_i < 1.0


def test_paired_bootstrap_detects_a_real_difference_and_not_a_fake_one():
    rng = np.random.default_rng(2)
    y, good = _binary(300, rng, signal=2.0)
    bad = rng.random(300)
    groups = np.arange(300) // 2
    r = paired_bootstrap("auc", "binary", y, good, bad, groups, n_boot=500)
    assert r["delta"] > 0.3 and r["ci_low"] > 0 and r["p"] < 0.01
    same = paired_bootstrap("auc", "binary", y, good, good + 1e-9 * rng.random(300), groups, n_boot=300)
    assert abs(same["delta"]) < 1e-3 and same["p"] > 0.5
    rev = paired_bootstrap("auc", "binary", y, bad, good, groups, n_boot=500)
    assert rev["delta"] == pytest.approx(-r["delta"]) and rev["ci_high"] < 0


def test_delong_hand_computed_case():
    y = np.array([1, 1, 0, 0])
    a = np.array([0.9, 0.4, 0.5, 0.1])
    # pairs (pos, neg): 0.9>0.5, 0.9>0.1, 0.4<0.5, 0.4>0.1 -> AUC 3/4
    # placements: positives V10 = [1, 0.5], negatives V01 = [0.5, 1]
    # var = var(V10)/2 + var(V01)/2 = 0.125/2 + 0.125/2
    auc, var = delong_variance(y, a)
    assert auc == pytest.approx(0.75)
    assert var == pytest.approx(0.125)
    b = np.array([0.8, 0.7, 0.2, 0.3])  # perfect: placements all 1, zero variance
    d = delong_test(y, a, b)
    assert d["auc_a"] == pytest.approx(0.75) and d["auc_b"] == pytest.approx(1.0)
    # var(a - b) = var(a) here because b's placements are constant
    assert d["se"] == pytest.approx(np.sqrt(0.125))


def _delong_bruteforce(y, a, b):
    """Direct O(m n) DeLong from the definition psi(x, y) = 1[x > y] + 0.5 * 1[x == y]."""
    pos, neg = y == 1, y == 0
    v10, v01, aucs = [], [], []
    for s in (a, b):
        psi = (s[pos][:, None] > s[neg][None, :]) + 0.5 * (s[pos][:, None] == s[neg][None, :])
        aucs.append(psi.mean())
        v10.append(psi.mean(1))
        v01.append(psi.mean(0))
    cov = np.cov(np.vstack(v10)) / pos.sum() + np.cov(np.vstack(v01)) / neg.sum()
    var = cov[0, 0] + cov[1, 1] - 2 * cov[0, 1]
    return aucs[0] - aucs[1], np.sqrt(var)


def test_delong_matches_definition_and_agrees_with_bootstrap():
    rng = np.random.default_rng(3)
    y, a = _binary(400, rng, signal=1.0)
    b = np.clip(a + rng.normal(0, 0.25, 400), 0, 1)
    a = np.round(a, 2)  # ties
    d = delong_test(y, a, b)
    delta, se = _delong_bruteforce(y, a, b)
    assert d["delta"] == pytest.approx(delta, abs=1e-12)
    assert d["se"] == pytest.approx(se, rel=1e-9)
    # one image per patient: the bootstrap SE of the difference is close to DeLong's
    r = paired_bootstrap("auc", "binary", y, a, b, np.arange(400), n_boot=800, seed=1)
    boot_se = (r["ci_high"] - r["ci_low"]) / (2 * 1.96)
    assert boot_se == pytest.approx(d["se"], rel=0.25)


# -- fast (weighted) patient bootstrap -------------------------------------------

ALL_TASK_METRICS = [(t, m) for t in ("binary", "multiclass", "regression") for m in TASK_METRICS[t]]


def _toy(task, n, rng, n_classes=4):
    """Small predictions with many tied scores (and tied targets for regression)."""
    if task == "binary":
        y = rng.integers(0, 2, n)
        s = np.round(1 / (1 + np.exp(-((2 * y - 1) + rng.normal(0, 1, n)))), 1)  # ~10 distinct values
        s[:3] = 0.5  # ties exactly at the threshold
        return y, s
    if task == "multiclass":
        y = rng.integers(0, n_classes, n)
        z = rng.normal(0, 1, (n, n_classes))
        z[np.arange(n), y] += 1.0
        p = np.round(np.exp(z) / np.exp(z).sum(1, keepdims=True), 1)  # coarse: ties, some all-zero rows
        p[:4] = 1.0 / n_classes  # argmax ties
        return y, p
    y = rng.integers(0, 6, n).astype(float)  # tied targets
    return y, np.round(y + rng.normal(0, 1.5, n))


@pytest.mark.parametrize("task,name", ALL_TASK_METRICS)
def test_weighted_metric_equals_metric_on_repeated_images(task, name):
    rng = np.random.default_rng(10)
    y, s = _toy(task, 40, rng)
    w = rng.integers(0, 4, (30, 40))
    w[0] = 1  # plain data
    w[1] = 0
    w[1, :5] = 2  # only a few images
    w[2] = 0  # nothing: undefined
    if task == "multiclass":
        w[3] = np.where(y == 3, 0, w[3])  # a class absent -> AUC renormalises over 3 classes
        w[4] = np.where(y >= 2, 0, w[4])  # two classes left
    if task == "binary":
        w[3] = np.where(y == 1, 0, w[3])  # one class: AUC undefined
    if task == "regression":
        w[3] = np.where(y == y[0], 2, 0)  # constant target: R² undefined
    got = weighted_metric_values(name, task, y, s, w)
    for row, wr in zip(got, w):
        idx = np.repeat(np.arange(len(y)), wr)
        want = metric_value(name, task, y[idx], s[idx])
        if np.isnan(want):
            assert np.isnan(row)
        else:
            assert row == pytest.approx(want, rel=1e-12, abs=1e-12)
    assert weighted_metric_values(name, task, y, s, w[5]) == pytest.approx(got[5], rel=1e-12, abs=1e-12)


def test_weighted_auc_with_real_and_large_weights_matches_pairwise_definition():
    rng = np.random.default_rng(11)
    y, s = _toy("binary", 60, rng)
    w = rng.random(60) * (rng.random(60) < 0.8)
    pos, neg = y == 1, y == 0
    psi = (s[pos][:, None] > s[neg][None, :]) + 0.5 * (s[pos][:, None] == s[neg][None, :])
    want = (w[pos][:, None] * w[neg][None, :] * psi).sum() / (w[pos].sum() * w[neg].sum())
    assert weighted_metric_values("auc", "binary", y, s, w) == pytest.approx(want, rel=1e-12)
    # integer weights with a total too large for the float32 shortcut: scale-free, same value
    wi = rng.integers(0, 4, 60)
    big = wi * 10**6
    assert weighted_metric_values("auc", "binary", y, s, big) == pytest.approx(
        weighted_metric_values("auc", "binary", y, s, wi), rel=1e-12)


def _reference_draws(groups, n_boot, seed):
    """The plain patient bootstrap: draw patients with replacement, take all their images."""
    ids, inv = np.unique(groups, return_inverse=True)
    members = [np.flatnonzero(inv == g) for g in range(len(ids))]
    rng = np.random.default_rng(seed)
    for _ in range(n_boot):
        pick = rng.integers(0, len(members), size=len(members))
        yield np.concatenate([members[i] for i in pick])


def _clustered(task, rng, n_pat=70):
    sizes = rng.integers(1, 4, n_pat)  # 1-3 images per patient
    groups = np.repeat([f"pat{i:03d}" for i in range(n_pat)], sizes)
    y, s = _toy(task, len(groups), rng)
    if task == "multiclass":  # class 3 only in two patients: often absent from a replicate
        y = np.where(y == 3, 0, y)
        rare = np.isin(groups, ["pat005", "pat040"])
        y[rare] = 3
    return y, s, groups


@pytest.mark.parametrize("task,name", ALL_TASK_METRICS)
def test_fast_bootstrap_equals_reference_loop_with_the_same_draws(task, name):
    rng = np.random.default_rng(12)
    y, a, groups = _clustered(task, rng)
    _, b = _toy(task, len(y), rng)
    n_boot, seed = 300, 7

    reps = np.array([metric_value(name, task, y[r], a[r]) for r in _reference_draws(groups, n_boot, seed)])
    reps = reps[np.isfinite(reps)]
    v, lo, hi = metric_with_ci(name, task, y, a, groups, n_boot=n_boot, seed=seed)
    assert v == metric_value(name, task, y, a)  # point estimate untouched
    assert lo == pytest.approx(np.quantile(reps, 0.025), rel=1e-12, abs=1e-12)
    assert hi == pytest.approx(np.quantile(reps, 0.975), rel=1e-12, abs=1e-12)
    # the general slow form with the same seed gives the same interval
    lo2, hi2, _ = bootstrap_ci(lambda r: metric_value(name, task, y[r], a[r]), len(y), groups, n_boot=n_boot,
                               seed=seed)
    assert (lo, hi) == pytest.approx((lo2, hi2), rel=1e-12, abs=1e-12)

    deltas = np.array([metric_value(name, task, y[r], a[r]) - metric_value(name, task, y[r], b[r])
                       for r in _reference_draws(groups, n_boot, seed)])
    deltas = deltas[np.isfinite(deltas)]
    m = len(deltas)
    p = min(1.0, 2 * min((np.sum(deltas <= 0) + 1) / (m + 1), (np.sum(deltas >= 0) + 1) / (m + 1)))
    r = paired_bootstrap(name, task, y, a, b, groups, n_boot=n_boot, seed=seed)
    assert r["n_boot"] == m
    assert r["delta"] == metric_value(name, task, y, a) - metric_value(name, task, y, b)
    assert r["ci_low"] == pytest.approx(np.quantile(deltas, 0.025), rel=1e-12, abs=1e-12)
    assert r["ci_high"] == pytest.approx(np.quantile(deltas, 0.975), rel=1e-12, abs=1e-12)
    assert r["p"] == pytest.approx(p, rel=1e-12)


@pytest.mark.parametrize("task,name", ALL_TASK_METRICS)
def test_fast_bootstrap_ci_contains_estimate_identical_scores_and_determinism(task, name):
    rng = np.random.default_rng(13)
    y, s, groups = _clustered(task, rng, n_pat=150)
    v, lo, hi = metric_with_ci(name, task, y, s, groups, n_boot=400, seed=3)
    assert lo <= v <= hi and lo < hi
    assert metric_with_ci(name, task, y, s, groups, n_boot=400, seed=3) == (v, lo, hi)
    assert metric_with_ci(name, task, y, s, groups, n_boot=400, seed=4) != (v, lo, hi)
    same = paired_bootstrap(name, task, y, s, s.copy(), groups, n_boot=200, seed=3)
    assert same["delta"] == 0 and same["ci_low"] == 0 and same["ci_high"] == 0
    assert same["p"] == 1.0 and same["n_boot"] == 200
    assert np.isnan(metric_with_ci(name, task, y, s, groups, n_boot=0)[1])


def test_bootstrap_falls_back_to_resampling_for_nan_scores():
    rng = np.random.default_rng(14)
    y, a = _binary(120, rng)
    b = a.copy()
    b[7] = np.nan
    groups = np.arange(120) // 3
    r = paired_bootstrap("auc", "binary", y, a, b, groups, n_boot=200, seed=0)
    deltas = []
    for rows in _reference_draws(groups, 200, 0):
        d = metric_value("auc", "binary", y[rows], a[rows]) - metric_value("auc", "binary", y[rows], b[rows])
        if np.isfinite(d):
            deltas.append(d)
    assert r["n_boot"] == len(deltas)
    assert r["ci_low"] == pytest.approx(np.quantile(deltas, 0.025))
