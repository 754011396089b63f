"""FROC (sensitivity at fixed false positives per scan, LUNA16's CPM) on hand-made scores with
known answers, and its patient bootstrap."""

import numpy as np
import pytest

from radpretrain.evaluate.metrics import froc_curve, froc_sensitivities, froc_with_ci


def test_froc_on_a_hand_made_ranking():
    # 2 scans, 3 positives.  Descending: P .9, N .8, N .7, P .6, P .5, N .4, N .3, N .2
    # operating points (FP/scan, sens): (0,0) (0,1/3) (.5,1/3) (1,1/3) (1,2/3) (1,1) (1.5,1) (2,1) (2.5,1)
    y = [1, 0, 0, 1, 1, 0, 0, 0]
    s = [0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2]
    scans = ["A", "A", "B", "A", "B", "B", "A", "B"]
    fps, sens = froc_curve(y, s, scans)
    np.testing.assert_allclose(fps, [0, 0, 0.5, 1, 1, 1, 1.5, 2, 2.5])
    np.testing.assert_allclose(sens, [0, 1 / 3, 1 / 3, 1 / 3, 2 / 3, 1, 1, 1, 1])
    # 1/8, 1/4, 1/2: a third; at exactly 1 FP/scan the highest sensitivity reached there
    np.testing.assert_allclose(froc_sensitivities(y, s, scans), [1 / 3, 1 / 3, 1 / 3, 1, 1, 1, 1], atol=1e-12)
    # the order of the rows does not matter
    perm = [7, 2, 5, 0, 3, 6, 1, 4]
    np.testing.assert_allclose(froc_sensitivities(np.take(y, perm), np.take(s, perm), np.take(scans, perm)),
                               [1 / 3, 1 / 3, 1 / 3, 1, 1, 1, 1], atol=1e-12)


def test_froc_interpolates_through_ties_and_weights_false_positives():
    # 4 scans.  P .9 first, then a tie at .5 of 1 P and 2 N, then N .1:
    # points (0,0) (0,.5) (.5,1) (.75,1); the tie enters along the line from (0,.5) to (.5,1)
    y = [1, 1, 0, 0, 0]
    s = [0.9, 0.5, 0.5, 0.5, 0.1]
    scans = ["a", "b", "c", "d", "a"]
    got = froc_sensitivities(y, s, scans)
    np.testing.assert_allclose(got, [0.5 + 0.5 * 0.125 / 0.5, 0.5 + 0.5 * 0.25 / 0.5, 1, 1, 1, 1, 1], atol=1e-12)
    assert np.mean(got) == pytest.approx((0.625 + 0.75 + 5) / 7)
    # each false positive counted twice: the curve is stretched along the FP axis by 2
    np.testing.assert_allclose(froc_sensitivities(y, s, scans, points=[0.25, 0.5, 1.0], fp_weight=2.0),
                               froc_sensitivities(y, s, scans, points=[0.125, 0.25, 0.5]), atol=1e-12)


def test_froc_edge_cases():
    assert np.all(froc_sensitivities([1, 1], [0.2, 0.9], ["a", "b"]) == 1.0)  # no negatives
    assert np.all(np.isnan(froc_sensitivities([0, 0], [0.2, 0.9], ["a", "b"])))  # no positives
    # a positive ranked below 16 negatives of one scan is found only beyond 8 FPs/scan
    y = [0] * 16 + [1]
    s = list(np.linspace(1, 0.5, 16)) + [0.1]
    got = froc_sensitivities(y, s, ["x"] * 17)
    np.testing.assert_allclose(got, [0, 0, 0, 0, 0, 0, 0], atol=1e-12)
    got = froc_sensitivities(y, s, ["x"] * 17, points=[16.0, 20.0])
    np.testing.assert_allclose(got, [1.0, 1.0])
    with pytest.raises(ValueError, match="more than one patient"):
        froc_with_ci([1, 0], [0.5, 0.4], ["a", "a"], ["p1", "p2"])  # one scan, two patients


def test_froc_bootstrap_matches_resampling_patients():
    rng = np.random.default_rng(3)
    n_pat = 9
    scans = np.array([f"s{p}-{k}" for p in range(n_pat) for k in range(1 + p % 2) for _ in range(6)])
    patients = np.array([sc.split("-")[0] for sc in scans])
    y = (rng.random(len(scans)) < 0.25).astype(int)
    y[0] = 1
    score = np.round(y * 0.6 + rng.random(len(scans)), 2)  # rounded: ties
    res = froc_with_ci(y, score, scans, patients, n_boot=60, seed=11)
    np.testing.assert_allclose(res["sensitivity"], froc_sensitivities(y, score, scans), atol=1e-12)
    # the same draws, done by hand: a patient drawn twice brings its scans twice (as distinct scans)
    uniq = np.unique(patients)
    members = [np.flatnonzero(patients == p) for p in uniq]
    draws = np.random.default_rng(11)
    reps = []
    for _ in range(60):
        pick = draws.integers(0, len(uniq), size=len(uniq))
        rows = np.concatenate([members[i] for i in pick])
        tags = np.concatenate([np.full(len(members[i]), d) for d, i in enumerate(pick)])
        v = froc_sensitivities(y[rows], score[rows], np.char.add(scans[rows], "#" + tags.astype(str)))
        if np.all(np.isfinite(v)):
            reps.append(v)
    reps = np.array(reps)
    assert res["n_boot"] == len(reps)
    lo, hi = np.quantile(reps, [0.025, 0.975], axis=0)
    np.testing.assert_allclose(res["ci_low"], lo, atol=1e-12)
    np.testing.assert_allclose(res["ci_high"], hi, atol=1e-12)
    cpm_lo, cpm_hi = np.quantile(reps.mean(axis=1), [0.025, 0.975])
    assert res["cpm_ci_low"] == pytest.approx(cpm_lo) and res["cpm_ci_high"] == pytest.approx(cpm_hi)
    assert res["cpm_ci_low"] <= res["cpm"] <= res["cpm_ci_high"]
    assert res["n_scans"] == len(np.unique(scans)) and res["n_patients"] == n_pat
