"""``radpretrain evaluate`` end to end on the toy store: outputs, pairing, report, sanity of numbers."""

import json

import numpy as np
import pandas as pd
import pytest

from radpretrain.cli import main
from radpretrain.data.store import Store, write_manifest
from radpretrain.synthetic.toy import make_toy_store

BACKBONE = ["--backbone", "test_efficientnet", "--image-size", "32"]


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    root = make_toy_store(tmp_path_factory.mktemp("toy") / "store", n_patients=24, images_per_patient=2, size=(36, 36))
    df = Store(root).manifest.copy()
    rng = np.random.default_rng(0)
    noise = dict(zip(df["patient_id"].unique(), rng.integers(0, 2, df["patient_id"].nunique())))
    df["noise"] = df["patient_id"].map(noise)  # a label unrelated to the images
    write_manifest(root, df)
    return root


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    from radpretrain.models.backbones import backbone_spec, create_backbone
    from radpretrain.models.weights import save_encoder

    m = create_backbone("test_efficientnet")
    arch, kw = backbone_spec(m)
    out = tmp_path_factory.mktemp("runs") / "mae-toy"
    save_encoder(m, {"arch": arch, "model_kwargs": kw, "method": "fake",
                     "preprocessing": {"mean": 0.3, "std": 0.2, "image_size": 32}}, out)
    return out


@pytest.fixture(scope="module")
def evaluated(toy, run_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("eval") / "knee"
    rc = main(["evaluate", "--data", str(toy), "--target", "body_part==knee", "--init", "scratch",
               "--init", str(run_dir), "--protocol", "linear", "--protocol", "knn", "--label-fractions", "0.5,1",
               "--folds", "3", "--out", str(out), *BACKBONE, "n_boot=100"])
    assert rc == 0
    return out


def test_outputs_and_tidy_results(evaluated):
    for name in ("results.csv", "comparisons.csv", "summary.json", "predictions.parquet", "splits_used.parquet",
                 "report.html", "report.md", "figures/label_efficiency.png", "figures/roc.png"):
        assert (evaluated / name).is_file(), name
    res = pd.read_csv(evaluated / "results.csv", dtype={"fold": str})
    assert {"init", "protocol", "fraction", "fold", "metric", "value"} <= set(res.columns)
    pooled = res[(res["fold"] == "pooled") & (res["metric"] == "auc")]
    assert len(pooled) == 2 * 2 * 2  # inits x protocols x fractions
    assert ((pooled["ci_low"] <= pooled["value"]) & (pooled["value"] <= pooled["ci_high"])).all()
    # body part decides the bone's orientation: learnable even from random conv features
    assert pooled["value"].max() > 0.8
    s = json.loads((evaluated / "summary.json").read_text())
    assert s["task"] == "binary" and s["splits"]["leakage_check"]["ok"]
    assert s["inits"]["mae-toy"]["mean"] == pytest.approx(0.3)
    assert isinstance(s["torch_threads"], int) and s["torch_threads"] >= 1  # the last digits depend on it
    comp = pd.read_csv(evaluated / "comparisons.csv")
    auc = comp[(comp["metric"] == "auc") & (comp["reference"] == "scratch")]
    assert len(auc) == 4 and auc["delong_p"].between(0, 1).all() and auc["p"].between(0, 1).all()


def test_folds_and_subsets_are_identical_across_inits(evaluated):
    p = pd.read_parquet(evaluated / "predictions.parquet")
    keys = {}
    for (init, proto, frac), g in p.groupby(["init", "protocol", "fraction"]):
        keys.setdefault((proto, frac), []).append(set(zip(g["image_id"], g["fold"])))
    for sets in keys.values():
        assert len(sets) == 2 and sets[0] == sets[1]
    used = pd.read_parquet(evaluated / "splits_used.parquet")
    for (fold, frac), g in used.groupby(["fold", "fraction"]):
        roles = {r: set(gg["patient_id"]) for r, gg in g.groupby("role")}
        assert not roles["train"] & roles["test"] and not roles["val"] & roles["test"]


def test_report_is_self_contained_and_has_no_source_paths(evaluated, toy):
    html = (evaluated / "report.html").read_text()
    assert html.count("data:image/png;base64,") >= 3
    assert "<table" in html and "Δ vs scratch" in html and "Leakage check".lower() in html.lower()
    assert "http://" not in html and "https://" not in html and "<script" not in html
    sources = set(Store(toy).manifest["source"])
    for f in evaluated.rglob("*"):
        if f.is_file() and f.suffix in (".html", ".md", ".json", ".csv"):
            text = f.read_text()
            assert not any(src in text for src in sources), f


def test_shuffled_labels_give_chance(toy, tmp_path):
    out = tmp_path / "noise"
    assert main(["evaluate", "--data", str(toy), "--target", "noise", "--init", "scratch", "--protocol", "linear",
                 "--label-fractions", "1", "--folds", "3", "--out", str(out), *BACKBONE, "n_boot=100",
                 "--quiet-report"]) == 0
    res = pd.read_csv(out / "results.csv", dtype={"fold": str})
    r = res[(res["fold"] == "pooled") & (res["metric"] == "auc")].iloc[0]
    assert abs(r["value"] - 0.5) < 0.25 and r["ci_low"] < 0.5 < r["ci_high"]


def test_finetune_protocol_writes_history_and_loss_plot(toy, run_dir, tmp_path):
    out = tmp_path / "ft"
    assert main(["evaluate", "--data", str(toy), "--target", "body_part", "--init", "scratch", "--init", str(run_dir),
                 "--protocol", "finetune", "--label-fractions", "1", "--folds", "2", "--out", str(out), *BACKBONE,
                 "n_boot=50", "finetune.epochs=2", "finetune.warmup_epochs=1", "finetune.batch_size=16",
                 "--balance", "weights"]) == 0
    hist = json.loads((out / "finetune_history.json").read_text())
    assert set(hist) == {"scratch", "mae-toy"}
    h = hist["scratch"]["1/0"][0]["history"]
    assert h[0]["head_only"] and not h[1]["head_only"]
    assert (out / "figures/finetune_loss.png").is_file() and (out / "figures/confusion.png").is_file()
    p = pd.read_parquet(out / "predictions.parquet")
    assert len(p["proba"].iloc[0]) == 3  # multiclass probabilities kept


def test_user_errors(toy, tmp_path, capsys):
    assert main(["evaluate", "--data", str(toy), "--target", "nope", "--init", "scratch", "--out", str(tmp_path / "x")]) == 2
    assert "no column 'nope'" in capsys.readouterr().err
    assert main(["evaluate", "--data", str(toy), "--target", "lesion", "--init", "scratch", "--out", str(tmp_path / "x"),
                 "finetune.epochz=3"]) == 2
    assert "unknown key" in capsys.readouterr().err
