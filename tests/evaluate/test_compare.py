"""``radpretrain compare``: label efficiency against pretraining compute, from tiny real runs of two lengths."""

import json
import re

import numpy as np
import pandas as pd
import pytest
import timm
from safetensors.torch import save_file

import radpretrain.evaluate as E
from radpretrain.cli import main
from radpretrain.pretrain import pretrain
from radpretrain.synthetic.toy import make_toy_store

FAST = ["trainer.enable_progress_bar=false", "data.num_workers=0", "trainer.cpu_threads=1", "data.batch_size=8",
        "trainer.log_every_n_steps=1", "data.image_size=32", "model.backbone=test_efficientnet",
        "model.pretrained=none", "previews.every_n_epochs=0"]
SMALL = dict(backbone="test_efficientnet", image_size=32, label_fractions=[0.5, 1.0], folds=2,
             overrides=["n_boot=100"], device="cpu")


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    """Two recipe lengths (3 and 9 steps) x two seeds, each length evaluated as an init group, plus ImageNet."""
    root = tmp_path_factory.mktemp("study")
    ds = make_toy_store(root / "ds", n_patients=16, images_per_patient=2, size=(36, 36))
    weights = root / "weights"  # stand-in ImageNet weights for the test backbone (offline)
    weights.mkdir()
    state = timm.create_model("test_efficientnet", pretrained=False).state_dict()
    save_file({k: v.contiguous() for k, v in state.items()}, str(weights / "test_efficientnet.safetensors"))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("RADPRETRAIN_WEIGHTS_DIR", str(weights))
        evals = []
        for steps in (3, 9):
            runs = []
            for seed in (0, 1):
                run = root / "runs" / f"s{steps}_seed{seed}"
                pretrain("simclr", ds, run, overrides=FAST + [f"trainer.max_steps={steps}", f"seed={seed}"])
                runs.append(str(run))
            ev = root / "eval" / f"steps{steps}"
            E.evaluate(ds, "body_part==knee", ["scratch", "imagenet", f"r{steps}=" + ",".join(runs)], out=ev,
                       protocols=["linear"], **SMALL)
            evals.append(ev)
        # a single run (not a group) of the long recipe, evaluated on its own
        E.evaluate(ds, "body_part==knee", ["scratch", runs[0]], out=root / "eval" / "single", protocols=["linear"],
                   report=False, **SMALL)
    return root, ds, evals


def test_compare_writes_the_view_csv_and_one_json_line(study, capsys):
    root, ds, evals = study
    out = root / "cmp"
    assert main(["compare", *map(str, evals), str(root / "eval" / "single"), "--out", str(out)]) == 0
    printed = capsys.readouterr().out.strip().splitlines()
    assert len(printed) == 1
    res = json.loads(printed[0])
    assert res["evaluations"] == 3 and res["runs"] == 5 and res["groups"] == 2 and res["metric"] == "auc"
    assert res["missing_compute"] == [] and res["x"] == "minutes"
    df = pd.read_csv(out / "compare.csv")
    runs = df[df["kind"] == "run"]
    assert len(runs) == 5 * 2  # 5 run inits x 2 label fractions, one protocol
    assert (runs["images_seen"] == runs["steps"] * 8).all() and set(runs["steps"]) == {3, 9}
    assert (runs["minutes"] > 0).all() and (runs["minutes"] == runs["wall_seconds"] / 60).all()
    assert set(runs["compute_source"]) == {"summary.json"}
    assert set(runs["series"]) == {"simclr · test_efficientnet · 32 px"}
    groups = df[df["kind"] == "group"]
    assert set(groups["init"]) == {"r3", "r9"} and (groups["members"] == 2).all()
    for _, g in groups.iterrows():  # a group point: the seeds' mean, their range, their mean compute
        seeds = runs[(runs["group"] == g["init"]) & (runs["fraction"] == g["fraction"])
                     & (runs["evaluation"] == g["evaluation"])]
        assert g["value"] == pytest.approx(seeds["value"].mean()) and g["spread_low"] == seeds["value"].min()
        assert g["steps"] == seeds["steps"].mean() and np.isfinite(g["delta_vs_imagenet"])
    base = df[df["kind"] == "baseline"]
    assert set(base["series"]) == {"scratch", "imagenet"} and base["value"].notna().all()

    html = (out / "compare.html").read_text()
    assert re.findall(r"<h2>(.*?)</h2>", html) == ["Least vs most compute, per recipe", "AUC vs pretraining compute",
                                                    "Every point", "Evaluations", "Setup"]
    assert html.count("data:image/png;base64,") == 1 and (out / "compare.png").stat().st_size > 1000
    assert "<script" not in html and "http" not in html.replace("href", "")
    assert str(ds) not in html and str(root) not in html  # relative names only
    hrefs = re.findall(r"<a href='([^']+)'>", html)
    assert hrefs and all((out / h).resolve().is_file() for h in hrefs)  # the evaluations' reports, relative
    trend = html[html.index("Least vs most compute"):html.index("AUC vs pretraining compute")]
    assert trend.count("<tr>") == 1 + 2  # header + (one recipe x one protocol x two fractions)


def test_compute_axis_choices_and_fallback_to_the_run_folder(study, tmp_path, capsys):
    root, _, evals = study
    ev = tmp_path / "old"  # an evaluation from before evaluate recorded compute: read from the run folder
    ev.mkdir()
    for f in evals[1].iterdir():
        if f.is_file():
            (ev / f.name).write_bytes(f.read_bytes())
    s = json.loads((ev / "summary.json").read_text())
    for meta in s["inits"].values():
        meta.pop("compute", None)
        if "run" in meta:  # the run folder relative to the copied evaluation
            meta["run"] = str((evals[1] / meta["run"]).resolve())
    (ev / "summary.json").write_text(json.dumps(s))
    assert main(["compare", str(ev), "--out", str(tmp_path / "c"), "--x", "steps"]) == 0
    df = pd.read_csv(tmp_path / "c" / "compare.csv")
    runs = df[df["kind"] == "run"]
    assert set(runs["compute_source"]) == {"compute.json"} and set(runs["steps"]) == {9}
    capsys.readouterr()
    # no compute.json either: steps from encoder.json and the batch size from config.yaml, wall time unknown
    run_dir = evals[1] / s["inits"]["r9-1"]["run"]
    moved = run_dir / "compute.json.bak"
    (run_dir / "compute.json").rename(moved)
    try:
        assert main(["compare", str(ev), "--out", str(tmp_path / "d"), "--x", "images"]) == 0
    finally:
        moved.rename(run_dir / "compute.json")
    df = pd.read_csv(tmp_path / "d" / "compare.csv")
    est = df[(df["kind"] == "run") & (df["init"] == "r9-1")]
    assert est["compute_source"].str.startswith("estimated").all() and (est["images_seen"] == 72).all()
    assert est["minutes"].isna().all()


def test_compare_refuses_different_tasks_and_folders_that_are_not_evaluations(study, tmp_path, capsys):
    root, ds, evals = study
    other = tmp_path / "other"
    E.evaluate(ds, "body_part==hand", ["scratch"], out=other, protocols=["linear"], report=False, **SMALL)
    assert main(["compare", str(evals[0]), str(other), "--out", str(tmp_path / "x")]) == 2
    assert "different tasks" in capsys.readouterr().err
    assert main(["compare", str(other), "--out", str(tmp_path / "x")]) == 2
    assert "no pretrained run" in capsys.readouterr().err
    assert main(["compare", str(tmp_path), "--out", str(tmp_path / "x")]) == 2
    assert "not an evaluate output folder" in capsys.readouterr().err
