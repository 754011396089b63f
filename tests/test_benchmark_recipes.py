"""benchmarks/recipes.py: the study's partition and its seed-mean statistics (no data needed)."""

import numpy as np
import pandas as pd
import pytest


@pytest.fixture(scope="module")
def rec(load_benchmark):
    return load_benchmark("recipes")


def test_halves_split_each_stratum_evenly_and_reproducibly(rec):
    units = {f"p{i}": ("a" if i % 3 else "b") for i in range(101)}
    h = rec._halves(units, seed=0)
    assert h == rec._halves(units, seed=0) and h != rec._halves(units, seed=1)
    for stratum in ("a", "b"):
        sides = [h[u] for u, s in units.items() if s == stratum]
        assert abs(sides.count("dev") - sides.count("test")) <= 1


def test_recipes_before_the_batchnorm_change_still_train_the_statistics(rec):
    assert "model.freeze_bn_stats=false" in rec.R["simclr_cpu"]["over"]
    assert "model.freeze_bn_stats=true" in rec.R["fbn"]["over"]
    assert "model.freeze_bn_stats=false" not in rec.R["fbn"]["over"]
    assert {"model.freeze_bn_stats=false", "dino.freeze_last_layer=1"} <= set(rec.R["dino_cpu"]["over"])
    assert rec.R["dino_fix"]["over"] == ["model.freeze_bn_stats=true", "dino.freeze_last_layer=0"]


def _preds(y, score, patients):
    return pd.DataFrame({"image_id": np.arange(len(y)), "fold": 0, "patient_id": patients, "y_true": y,
                         "y_score": score})


def test_seed_mean_delta_is_the_mean_of_per_seed_differences_with_a_ci_around_it(rec):
    rng = np.random.default_rng(0)
    n = 400
    y = rng.integers(0, 2, n)
    patients = np.repeat(np.arange(n // 2), 2)
    ref = _preds(y, y + rng.normal(0, 1.5, n), patients)
    seeds = [_preds(y, y + rng.normal(0, s, n), patients) for s in (0.6, 0.8, 1.0)]
    d = rec.seed_mean_delta("knee", seeds, ref, n_boot=200)
    from sklearn.metrics import roc_auc_score

    want = [roc_auc_score(y, s["y_score"]) - roc_auc_score(y, ref["y_score"]) for s in seeds]
    assert d["per_seed"] == [round(w, 4) for w in want]
    assert d["mean_delta"] == pytest.approx(np.mean(want))
    assert d["ci_mean"][0] < d["mean_delta"] < d["ci_mean"][1] and d["ci_mean"][0] > 0  # clearly better here
    assert d["sd_seeds"] == pytest.approx(np.std(want, ddof=1))
    same = rec.seed_mean_delta("knee", [ref, ref], ref, n_boot=50)
    assert same["mean_delta"] == 0 and same["ci_mean"] == [0, 0]


def test_backbone_of_a_recipe_is_its_override_or_its_packaged_preset(rec):
    assert rec.backbone_of("simclr_cpu") == "tf_efficientnet_lite0"  # from the preset inside the package
    assert rec.backbone_of("fbn_lite1") == "tf_efficientnet_lite1"  # from the recipe's override
    assert rec.backbone_of("mae_cpu").startswith("vit")
