"""Metrics agree with scikit-learn; patient bootstrap CIs and paired tests behave; DeLong is right."""

import numpy as np
import pytest
from sklearn import metrics as skm

from radpretrain.evaluate.metrics import (
    bootstrap_ci, delong_test, delong_variance, metric_value, metric_with_ci, paired_bootstrap,
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
