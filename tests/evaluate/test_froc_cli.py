"""``evaluate`` on a candidate-patch store (``radpretrain patches``): candidate-level FROC with CIs
in summary.json, froc.csv and the report."""

import json

import numpy as np
import pandas as pd
import pytest

from radpretrain.evaluate.metrics import FROC_FPS


def test_candidate_scores_average_their_patches():
    from radpretrain.evaluate.results import candidate_predictions, froc_results

    images = pd.DataFrame({"image_id": list("abcdef"), "candidate_id": ["c1", "c1", "c2", "c2", "c3", "c3"],
                           "scan_id": ["s1"] * 4 + ["s2"] * 2})
    preds = pd.DataFrame({"image_id": list("abcdef"), "patient_id": ["p1"] * 4 + ["p2"] * 2, "fold": 0,
                          "fraction": 1.0, "init": "scratch", "protocol": "linear", "y_true": [1, 1, 0, 0, 0, 0],
                          "y_score": [0.2, 0.6, 0.9, 0.1, 0.3, 0.3]})
    c = candidate_predictions(preds, images).set_index("candidate_id")
    assert c.loc["c1", "score"] == pytest.approx(0.4) and c.loc["c2", "score"] == pytest.approx(0.5)
    assert c.loc["c1", "n_patches"] == 2 and c.loc["c3", "scan_id"] == "s2" and c.loc["c1", "y_true"] == 1
    res = froc_results(c.reset_index(), n_boot=20)
    # c2 (.5) outranks c1 (.4): one FP in 2 scans before the positive -> 0 below 1/2 FP/scan, 1 from there
    assert list(res["point"]) == ["0.125", "0.25", "0.5", "1", "2", "4", "8", "cpm"]
    np.testing.assert_allclose(res["value"].to_numpy()[:7], [0, 0, 1, 1, 1, 1, 1])


@pytest.fixture(scope="module")
def patch_store(tmp_path_factory):
    from radpretrain.data.patches import make_patch_store
    from radpretrain.synthetic.ct import write_luna_like

    from ..data.conftest import TEST_KEY

    root = tmp_path_factory.mktemp("luna")
    write_luna_like(root / "luna", n_scans=4, seed=1, shape=(96, 96, 32), n_nodules=3, n_negatives=24, clear_mm=14.0)
    store = root / "store"
    make_patch_store([root / "luna" / "subset0"], root / "luna" / "candidates.csv", store, size=16, planes="three",
                     neg_per_pos=4, seed=0, key=bytes.fromhex(TEST_KEY), progress=False)
    return store


def test_evaluate_reports_froc_on_a_patch_store(patch_store, tmp_path, capsys):
    from radpretrain.cli import main

    out = tmp_path / "eval"
    assert main(["evaluate", "--data", str(patch_store), "--target", "label", "--init", "scratch", "--protocol",
                 "linear", "--label-fractions", "1", "--folds", "4", "--out", str(out), "--backbone",
                 "test_efficientnet", "--image-size", "32", "n_boot=50"]) == 0
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    s = json.loads((out / "summary.json").read_text())
    froc = s["froc"]
    assert froc["fps_per_scan"] == list(FROC_FPS)
    meta = json.loads((patch_store / "store.json").read_text())["candidates"]
    assert froc["fp_weight"] == pytest.approx(meta["usable"]["negatives"] / meta["kept"]["negatives"])
    (row,) = froc["rows"]
    assert row["n_candidates"] == meta["kept"]["positives"] + meta["kept"]["negatives"] and row["n_scans"] == 4
    assert len(row["sensitivity"]) == 7 and row["cpm"] == pytest.approx(np.mean(row["sensitivity"]))
    assert all(lo <= v <= hi for v, lo, hi in zip(row["sensitivity"], row["ci_low"], row["ci_high"]))
    assert printed["froc"][0]["cpm"] == pytest.approx(row["cpm"])
    res = pd.read_csv(out / "froc.csv")
    assert len(res) == 8 and set(res["n_scans"]) == {4}
    cands = pd.read_parquet(out / "froc_predictions.parquet")
    assert len(cands) == row["n_candidates"] and (cands["n_patches"] == 3).all()
    html = (out / "report.html").read_text()
    assert "FROC: sensitivity at fixed false positives per scan" in html and "alt='froc'" in html
    assert (out / "figures" / "froc.png").is_file() and "1/8 FP/scan" in (out / "report.md").read_text()
    # the headline AUC is still there, per patch
    assert s["headline"][0]["metric"] == "auc" and 0.5 < s["headline"][0]["value"] <= 1.0


def test_evaluate_without_scans_has_no_froc(patch_store, tmp_path, capsys):
    from radpretrain.cli import main

    out = tmp_path / "plane"
    assert main(["evaluate", "--data", str(patch_store), "--target", "plane", "--init", "scratch",
                 "--label-fractions", "1", "--folds", "2", "--out", str(out), "--backbone", "test_efficientnet",
                 "--image-size", "32", "n_boot=20", "--quiet-report"]) == 0
    assert "froc" not in json.loads((out / "summary.json").read_text()) and not (out / "froc.csv").exists()
    assert main(["evaluate", "--data", str(patch_store), "--target", "scan_id", "--init", "scratch", "--out",
                 str(out)]) == 2
    assert "identifier" in capsys.readouterr().err
