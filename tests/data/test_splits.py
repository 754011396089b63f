"""Patient-grouped splits: no leakage, stratification, nested fractions, folds, reproducibility."""

import json

import numpy as np
import pandas as pd
import pytest

from radpretrain.cli import main
from radpretrain.data.splits import (
    check_leakage, fold_indices, load_splits, make_splits, select, split_indices,
)
from radpretrain.data.store import Store
from radpretrain.synthetic.toy import make_toy_store
from radpretrain.errors import UserError


def fake_images(n_patients=200, seed=0, rate=0.3, max_imgs=4):
    """Manifest-like image table: patients with 1..max_imgs images and a patient-level label."""
    rng = np.random.default_rng(seed)
    rows = []
    for p in range(n_patients):
        lab = int(rng.random() < rate)
        for j in range(int(rng.integers(1, max_imgs + 1))):
            rows.append({"image_id": f"{p:08x}{j:08x}", "patient_id": f"p{p:07d}", "lesion": lab})
    return pd.DataFrame(rows)


def patient_sides(df, col):
    return df.groupby("patient_id")[col].nunique()


@pytest.mark.parametrize("seed", range(8))
def test_no_patient_on_two_sides_fuzz(seed):
    rng = np.random.default_rng(100 + seed)
    images = fake_images(int(rng.integers(20, 120)), seed=seed, rate=float(rng.uniform(0.05, 0.6)))
    df = make_splits(images, folds=int(rng.integers(2, 6)), seed=seed, stratify="lesion",
                     max_per_patient=int(rng.integers(1, 4)))
    assert len(df) == len(images) and list(df["image_id"]) == list(images["image_id"])
    assert patient_sides(df, "split").max() == 1
    assert patient_sides(df, "fold").max() == 1
    assert patient_sides(df, "frac_rank").max() == 1
    check_leakage(df)  # must not raise
    assert ((df["frac_rank"] >= 0) & (df["frac_rank"] < 1)).all()


def test_stratification_and_split_sizes():
    images = fake_images(400, rate=0.3)
    df = make_splits(images, folds=5, seed=1, stratify="lesion", val=0.1, test=0.2)
    pat = df.groupby("patient_id").first()
    n = len(pat)
    glob = (pat["stratum"] == "1").mean()
    for s, target in (("train", 0.7), ("val", 0.1), ("test", 0.2)):
        part = pat[pat["split"] == s]
        assert abs(len(part) / n - target) < 0.02
        assert abs((part["stratum"] == "1").mean() - glob) < 0.04
    sizes = pat["fold"].value_counts()
    assert sorted(sizes.index) == [0, 1, 2, 3, 4] and sizes.max() - sizes.min() <= 1
    for f in range(5):
        part = pat[pat["fold"] == f]
        assert abs((part["stratum"] == "1").mean() - glob) < 0.03
    # frac_rank < f over all patients is stratified
    sub = pat[pat["frac_rank"] < 0.1]
    assert abs(len(sub) - 0.1 * n) <= 2 and abs((sub["stratum"] == "1").mean() - glob) < 0.03


def test_nested_fractions_are_subsets_and_keep_every_class():
    images = fake_images(300, rate=0.1)
    df = make_splits(images, seed=3, stratify="lesion")
    prev = None
    for f in (0.01, 0.05, 0.1, 0.5, 1.0):
        pats = set(select(df, split="train", fraction=f)["patient_id"])
        if prev is not None:
            assert prev <= pats and len(pats) > len(prev)
        strata = set(df.loc[df["patient_id"].isin(pats), "stratum"])
        assert strata == {"0", "1"}  # the rare class survives even at 1 %
        prev = pats
    assert prev == set(df.loc[df["split"] == "train", "patient_id"])
    n1 = select(df, split="train", fraction=0.01)
    assert n1["patient_id"].nunique() == 3  # round(0.01 * n) -> 0 or 2, min 1 per class


def test_reproducible_and_seed_dependent():
    images = fake_images(100)
    a = make_splits(images, seed=7, stratify="lesion")
    b = make_splits(images.sample(frac=1, random_state=0).reset_index(drop=True), seed=7, stratify="lesion")
    pd.testing.assert_frame_equal(a, b.set_index("image_id").loc[a["image_id"]].reset_index()[a.columns])
    c = make_splits(images, seed=8, stratify="lesion")
    assert (a["split"] != c["split"]).any() and (a["fold"] != c["fold"]).any()


def test_max_per_patient_caps_reproducibly():
    images = fake_images(50, max_imgs=6)
    df = make_splits(images, seed=0, max_per_patient=2)
    per = df[df["keep"]].groupby("patient_id").size()
    assert per.max() == 2 and len(per) == 50
    assert df.equals(make_splits(images, seed=0, max_per_patient=2))
    assert len(select(df)) == df["keep"].sum() and len(select(df, respect_keep=False)) == len(df)


def test_check_leakage_catches_planted_leak():
    df = make_splits(fake_images(30), seed=0, stratify="lesion")
    pid = df.loc[df["split"] == "train", "patient_id"].iloc[0]
    leaked = df.copy()
    rows = leaked.index[leaked["patient_id"] == pid]
    if len(rows) == 1:
        leaked = pd.concat([leaked, leaked.loc[rows].assign(image_id="ffffffffffffffff")], ignore_index=True)
        rows = leaked.index[leaked["patient_id"] == pid]
    leaked.loc[rows[-1], "split"] = "test"
    with pytest.raises(UserError, match=f"PATIENT LEAKAGE: patient {pid} .*test and train"):
        check_leakage(leaked)
    leaked2 = df.copy()
    rows = leaked2.index[leaked2["patient_id"] == pid]
    leaked2.loc[rows[-1], "fold"] = (leaked2.loc[rows[-1], "fold"] + 1) % 5
    if len(rows) > 1:
        with pytest.raises(UserError, match=f"patient {pid} .*'fold'"):
            check_leakage(leaked2)


def test_bad_options():
    images = fake_images(10)
    with pytest.raises(UserError, match="--folds"):
        make_splits(images, folds=50)
    with pytest.raises(UserError, match="val"):
        make_splits(images, val=0.5, test=0.6)
    with pytest.raises(UserError, match="no such manifest column"):
        make_splits(images, stratify="grade")


def test_split_command_and_fold_indices(tmp_path, capsys):
    root = make_toy_store(tmp_path / "toy", n_patients=30, images_per_patient=2)
    with pytest.raises(UserError, match="run 'radpretrain split"):
        load_splits(root)
    assert main(["split", str(root), "--folds", "3", "--seed", "4"]) == 0
    out = capsys.readouterr().out
    assert "no patient leakage" in out and "lesion" in out
    meta = json.loads((root / "splits.json").read_text())
    assert meta["seed"] == 4 and meta["folds"] == 3 and meta["stratify"] == "lesion"
    assert meta["counts"]["patients"] == 30
    df = load_splits(root)
    assert list(df.columns[:6]) == ["image_id", "patient_id", "split", "fold", "frac_rank", "keep"]
    store = Store(root)
    assert list(df["image_id"]) == list(store.images["image_id"])
    pid_of = store.images["patient_id"].to_numpy()
    for k in range(3):
        idx = fold_indices(root, k, val=0.2)
        sets = {n: set(pid_of[v]) for n, v in idx.items()}
        assert not (sets["train"] & sets["val"] or sets["train"] & sets["test"] or sets["val"] & sets["test"])
        assert sum(len(v) for v in idx.values()) == 60  # every image in exactly one part
        assert set(df.loc[idx["test"], "fold"]) == {k}
        small = fold_indices(root, k, val=0.2, fraction=0.1)
        assert set(small["train"]) < set(idx["train"]) and np.array_equal(small["val"], idx["val"])
        assert set(store.images.loc[small["train"], "lesion"]) == {0, 1}
    fixed = split_indices(root)
    assert sum(len(v) for v in fixed.values()) == 60
    assert set(df.loc[fixed["test"], "split"]) == {"test"}
    with pytest.raises(UserError, match="re-run 'radpretrain split"):
        fold_indices(root, 0, splits=df.iloc[:-2])  # stale splits (store changed) are refused
    with pytest.raises(UserError, match="fold 7 does not exist"):
        fold_indices(root, 7)
    # a second run with the same seed writes the same table
    assert main(["split", str(root), "--folds", "3", "--seed", "4"]) == 0
    assert load_splits(root).equals(df)


def test_numeric_column_is_binned_and_none_means_one_stratum(tmp_path):
    root = make_toy_store(tmp_path / "toy", n_patients=40, images_per_patient=1)
    images = Store(root).images
    assert images["age_years"].nunique() > 10
    df = make_splits(images, seed=0, stratify="age_years")
    assert sorted(df["stratum"].unique()) == ["q0", "q1", "q2", "q3", "q4"]
    assert df.groupby("stratum")["patient_id"].nunique().tolist() == [8] * 5
    assert main(["split", str(root), "--stratify", "none"]) == 0
    assert set(load_splits(root)["stratum"]) == {"all"}
