"""Init groups (``--init NAME=RUN1,RUN2,...``: several pretraining seeds of one recipe) and the links from
evaluate's report to the compared runs' own reports."""

import json
import os
import re

import numpy as np
import pandas as pd
import pytest
import torch

import radpretrain.evaluate as E
from radpretrain.cli import main
from radpretrain.errors import UserError
from radpretrain.evaluate.inits import init_groups, parse_inits
from radpretrain.evaluate.metrics import (
    _group_index, _resample, metric_value, paired_bootstrap, paired_bootstrap_mean,
)
from radpretrain.synthetic.toy import make_toy_store

SMALL = dict(backbone="test_efficientnet", image_size=32, label_fractions=[0.5, 1.0], folds=2)


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    return make_toy_store(tmp_path_factory.mktemp("toy") / "store", n_patients=16, images_per_patient=2, size=(36, 36))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Three 'seeds' of one recipe (differently initialised encoders); the first has a report.html."""
    from radpretrain.models.backbones import backbone_spec, create_backbone
    from radpretrain.models.weights import save_encoder

    root = tmp_path_factory.mktemp("runs")
    out = []
    for seed in range(3):
        torch.manual_seed(seed)
        m = create_backbone("test_efficientnet")
        arch, kw = backbone_spec(m)
        d = root / f"recipe_seed{seed}"
        save_encoder(m, {"arch": arch, "model_kwargs": kw, "method": "fake",
                         "preprocessing": {"mean": 0.3, "std": 0.2, "image_size": 32}}, d)
        out.append(d)
    (out[0] / "report.html").write_text("<!DOCTYPE html><title>run</title>")
    (out[0] / "compute.json").write_text(json.dumps({"wall_seconds": 12.5, "steps": 30, "images_seen": 240}))
    return out


@pytest.fixture(scope="module")
def evaluated(toy, runs, tmp_path_factory):
    out = tmp_path_factory.mktemp("eval") / "grouped"
    rc = main(["evaluate", "--data", str(toy), "--target", "body_part==knee", "--init", "scratch",
               "--init", str(runs[2]), "--init", "recipe=" + ",".join(str(r) for r in runs), "--protocol", "linear",
               "--label-fractions", "0.5,1", "--folds", "2", "--backbone", "test_efficientnet", "--image-size", "32",
               "--out", str(out), "n_boot=200"])
    assert rc == 0
    return out


def test_parse_inits_expands_groups_and_keeps_every_other_form(runs, tmp_path):
    a, b, c = (str(r) for r in runs)
    specs = parse_inits(["scratch", "imagenet", a, f"recipe={a},{b}, {c}"])
    assert [(s.name, s.kind, s.group) for s in specs] == [
        ("scratch", "scratch", None), ("imagenet", "imagenet", None), ("recipe_seed0", "run", None),
        ("recipe-1", "run", "recipe"), ("recipe-2", "run", "recipe"), ("recipe-3", "run", "recipe")]
    assert specs[4].path == b and init_groups(specs) == {"recipe": ["recipe-1", "recipe-2", "recipe-3"]}
    with pytest.raises(UserError, match="at least two runs"):
        parse_inits([f"recipe={a}"])
    with pytest.raises(UserError, match="not a run, export or state_dict"):
        parse_inits([f"recipe={a},scratch"])
    with pytest.raises(UserError, match="reserved"):
        parse_inits([f"imagenet={a},{b}"])
    with pytest.raises(UserError, match="given twice"):
        parse_inits([f"r={a},{b}", f"r={b},{c}"])
    with pytest.raises(UserError, match="names both a group and a single init"):
        parse_inits([a, f"recipe_seed0={b},{c}"])
    with pytest.raises(UserError, match="not 'scratch'"):
        parse_inits([f"recipe={a},{tmp_path / 'missing'}"])
    odd = tmp_path / "lr=0.1"  # an existing folder whose name holds '=' stays one init
    odd.mkdir()
    assert [(s.kind, s.group) for s in parse_inits([str(odd)])] == [("run", None)]


def test_seed_mean_bootstrap_shares_the_resamples_of_every_seed():
    rng = np.random.default_rng(3)
    n = 60
    y = rng.integers(0, 2, n)
    groups = np.repeat(np.arange(30), 2)
    seeds = [np.clip(y * 0.3 + rng.normal(0.4, 0.25, n), 0, 1) for _ in range(3)]
    ref = np.clip(y * 0.1 + rng.normal(0.45, 0.25, n), 0, 1)
    # one seed: exactly the paired bootstrap of that seed
    one = paired_bootstrap_mean("auc", "binary", y, seeds[:1], ref, groups, n_boot=300, seed=5)
    pb = paired_bootstrap("auc", "binary", y, seeds[0], ref, groups, n_boot=300, seed=5)
    assert one["delta"] == pytest.approx(pb["delta"]) and one["p"] == pytest.approx(pb["p"])
    assert (one["ci_low"], one["ci_high"]) == pytest.approx((pb["ci_low"], pb["ci_high"]))
    # three seeds: Δ is the mean of the seeds' deltas, the CI that of the per-resample averages on common resamples
    r = paired_bootstrap_mean("auc", "binary", y, seeds, ref, groups, n_boot=300, seed=5)
    singles = [paired_bootstrap("auc", "binary", y, s, ref, groups, n_boot=300, seed=5)["delta"] for s in seeds]
    assert r["delta"] == pytest.approx(np.mean(singles)) and r["per_seed_delta"] == pytest.approx(singles)
    members, _ = _group_index(groups)
    g = np.random.default_rng(5)
    loop = []
    for _ in range(300):
        idx = _resample(members, g)
        b = metric_value("auc", "binary", y[idx], ref[idx])
        loop.append(np.mean([metric_value("auc", "binary", y[idx], s[idx]) - b for s in seeds]))
    assert (r["ci_low"], r["ci_high"]) == pytest.approx(tuple(np.quantile(loop, [0.025, 0.975])), abs=1e-9)
    # averaging over seeds on shared resamples: never wider than the widest single-seed interval
    widths = [paired_bootstrap("auc", "binary", y, s, ref, groups, n_boot=300, seed=5) for s in seeds]
    assert r["ci_high"] - r["ci_low"] <= max(w["ci_high"] - w["ci_low"] for w in widths) + 1e-12


def test_group_summary_table_and_report(evaluated, runs):
    s = json.loads((evaluated / "summary.json").read_text())
    assert list(s["inits"]) == ["scratch", "recipe_seed2", "recipe-1", "recipe-2", "recipe-3"]
    assert s["groups"]["members"] == {"recipe": ["recipe-1", "recipe-2", "recipe-3"]}
    assert s["inits"]["recipe-3"]["group"] == "recipe" and "group" not in s["inits"]["recipe_seed2"]
    res = pd.read_csv(evaluated / "results.csv", dtype={"fold": str})
    comp = pd.read_csv(evaluated / "comparisons.csv")
    table = pd.read_csv(evaluated / "groups.csv")
    assert len(table) == 2 and set(table["reference"]) == {"scratch"}
    for _, row in table.iterrows():
        pooled = res[(res["fold"] == "pooled") & (res["metric"] == "auc") & (res["fraction"] == row["fraction"])]
        vals = pooled.set_index("init").loc[["recipe-1", "recipe-2", "recipe-3"], "value"].to_numpy()
        assert row["n_seeds"] == 3 and row["mean"] == pytest.approx(vals.mean())
        assert row["sd"] == pytest.approx(vals.std(ddof=1)) and row["min"] == vals.min() and row["max"] == vals.max()
        d = comp[(comp["metric"] == "auc") & (comp["reference"] == "scratch") & (comp["fraction"] == row["fraction"])]
        deltas = d.set_index("init").loc[["recipe-1", "recipe-2", "recipe-3"], "delta"].to_numpy()
        assert row["delta_mean"] == pytest.approx(deltas.mean())
        assert row["ci_low"] <= row["delta_mean"] <= row["ci_high"] and 0 < row["p"] <= 1
    # the third seed is the run also given on its own: same predictions, so the same numbers
    same = res[(res["fold"] == "pooled")].pivot_table(index=["fraction", "metric"], columns="init", values="value")
    assert np.allclose(same["recipe-3"], same["recipe_seed2"])
    rows = s["groups"]["rows"]
    assert [r["n_seeds"] for r in rows] == [3, 3] and set(rows[0]["vs"]) == {"scratch"}
    assert [x["init"] for x in rows[0]["seeds"]] == ["recipe-1", "recipe-2", "recipe-3"]
    html = (evaluated / "report.html").read_text()
    assert "Init groups: several pretraining seeds of one recipe" in html and "seed-mean Δ vs scratch" in html
    assert "recipe (3 seeds) / linear / 50 % labels: AUC mean" in html
    md = (evaluated / "report.md").read_text()
    assert "## Init groups" in md and "groups.csv" in html


def test_report_links_the_runs_reports_relatively(evaluated, runs):
    s = json.loads((evaluated / "summary.json").read_text())
    meta = s["inits"]["recipe-1"]
    assert meta["run_name"] == "recipe_seed0" and meta["run_report"] == meta["run"] + "/report.html"
    assert not os.path.isabs(meta["run"]) and "run_report" not in s["inits"]["recipe-2"]  # seed 1 has no report
    assert meta["compute"] == {"wall_seconds": 12.5, "steps": 30, "images_seen": 240}
    html = (evaluated / "report.html").read_text()
    hrefs = re.findall(r"<a href='([^']+)'>report.html</a>", html)
    assert hrefs == [meta["run_report"]]
    assert (evaluated / hrefs[0]).resolve() == (runs[0] / "report.html").resolve()
    section = html[html.index("Pretraining runs compared"):html.index("Label-efficiency curves")]
    assert "12 s" in section and "240" in section and section.count("<tr>") == 1 + 4  # header + 4 run inits
    assert f"[report.html]({meta['run_report']})" in (evaluated / "report.md").read_text()
    assert str(runs[0].resolve()) not in html  # relative only


def test_programmatic_groups_without_references(toy, runs, tmp_path):
    s = E.evaluate(toy, "body_part==knee", [f"r={runs[0]},{runs[1]}"], out=tmp_path / "ev", protocols=["knn"],
                   overrides=["n_boot=50"], device="cpu", report=False, **SMALL)
    assert [r["vs"] for r in s["groups"]["rows"]] == [{}, {}]
    t = pd.read_csv(tmp_path / "ev" / "groups.csv")
    assert t["reference"].isna().all() and (t["n_seeds"] == 2).all()
