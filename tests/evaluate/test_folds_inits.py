"""Cross-validation plan (patient-grouped, nested, leak-free), target parsing and init loading."""

import numpy as np
import pandas as pd
import pytest
import torch

from radpretrain.data.store import Store
from radpretrain.errors import UserError
from radpretrain.evaluate import folds as F
from radpretrain.evaluate.target import resolve_target
from radpretrain.evaluate.inits import build_init, map_keys, parse_init


def _store(tmp_path, n_pat=40, per=2):
    from radpretrain.synthetic.toy import make_toy_store

    return Store(make_toy_store(tmp_path / "s", n_patients=n_pat, images_per_patient=per, size=(24, 24)))


def _table(store):
    t = store.images[["image_id", "patient_id"]].copy()
    t["y"] = store.images["lesion"].to_numpy()
    return t


def test_folds_are_patient_grouped_nested_and_stratified(tmp_path):
    store = _store(tmp_path)
    t = _table(store)
    splits, info = F.load_or_make_splits(store, "lesion", 4, seed=0)
    assert info["folds"] == 4 and info["source"].startswith("computed")
    sets = F.fold_sets(t, splits, [0.1, 0.5, 1.0], 4, val=0.2)
    assert F.leakage_check(t, sets)["ok"]
    by = {(s.fold, s.fraction): s for s in sets}
    ys = t["y"].to_numpy()
    for k in range(4):
        small, mid, full = (set(by[(k, f)].train) for f in (0.1, 0.5, 1.0))
        assert small < mid < full                                   # nested subsets
        assert set(ys[list(small)]) == {0, 1}                       # stratified: every class even at 10 %
        assert set(by[(k, 0.1)].test) == set(by[(k, 1.0)].test)    # the test set never shrinks
        assert len(by[(k, 0.1)].val) < len(by[(k, 1.0)].val)        # val_fraction=same
        assert not set(by[(k, 1.0)].val) & full
    tested = np.concatenate([s.test for s in sets if s.fraction == 1.0])
    assert sorted(tested) == list(range(len(t)))                    # each image tested once
    full_val = F.fold_sets(t, splits, [0.1, 1.0], 1, val=0.2, val_fraction="full")
    assert set(full_val[0].val) == set(full_val[1].val)


def test_store_splits_file_is_used_and_leakage_is_refused(tmp_path):
    from radpretrain.data.splits import write_splits

    store = _store(tmp_path, 15, 2)
    write_splits(store.root, folds=3, seed=0)
    splits, info = F.load_or_make_splits(store, "lesion", None)
    assert info["source"] == "splits.parquet" and info["folds"] == 3
    with pytest.raises(UserError, match="3 folds"):
        F.load_or_make_splits(store, "lesion", 5)
    t = _table(store)
    bad = splits.copy()
    first = bad["patient_id"] == bad["patient_id"].iloc[0]
    bad.loc[first.idxmax(), "fold"] = (bad.loc[first.idxmax(), "fold"] + 1) % 3  # split one patient over two folds
    with pytest.raises(UserError, match="leakage"):
        F.leakage_check(t, F.fold_sets(t, bad, [1.0], 3))


def test_resolve_target_kinds():
    df = pd.DataFrame({"label": [0, 1, 2, 3, 4, 2], "sex": ["M", "F", "unknown", "F", "M", "M"],
                       "age_years": [10.5, 20.1, np.nan, 40.0, 55.5, 61.2], "source": ["x"] * 6,
                       "body_part": ["knee"] * 6})
    mask, y, classes, task, _ = resolve_target(df, "label>=2", "auto", None)
    assert task == "binary" and y.tolist() == [0, 0, 1, 1, 1, 1]
    mask, y, classes, task, _ = resolve_target(df, "label", "auto", None)
    assert task == "multiclass" and classes == ["0", "1", "2", "3", "4"]
    mask, y, classes, task, _ = resolve_target(df, "sex", "auto", "M")
    assert task == "binary" and mask.sum() == 5 and classes[1] == "M" and y.tolist() == [1, 0, 0, 1, 1]
    mask, y, classes, task, _ = resolve_target(df, "age_years", "auto", None)
    assert task == "regression" and mask.sum() == 5
    with pytest.raises(UserError, match="identifier"):
        resolve_target(df, "source", "auto", None)
    with pytest.raises(UserError, match="no column"):
        resolve_target(df, "lesionx", "auto", None)
    with pytest.raises(UserError, match="one value"):
        resolve_target(df, "body_part", "auto", None)


def test_state_dict_init_with_prefix_rename_and_grey_stem(tmp_path):
    from radpretrain.models.backbones import create_backbone

    src = create_backbone("test_efficientnet", in_chans=3)
    state = {"module.net." + k.replace("conv_stem", "stem_conv"): v for k, v in src.state_dict().items()}
    state["module.net.classifier.weight"] = torch.zeros(10, 256)
    path = tmp_path / "other_group.pt"
    torch.save(state, path)
    spec = parse_init(f"state_dict:{path}:test_efficientnet")
    assert spec.kind == "state_dict" and spec.arch == "test_efficientnet"
    with pytest.raises(UserError, match="missing"):  # conv_stem renamed -> strict refusal
        build_init(spec, "resnet18", 32, (0.4, 0.2), {"state_dict.strip_prefix": "module.,net."})
    built = build_init(spec, "resnet18", 32, (0.4, 0.2),
                       {"state_dict.strip_prefix": "module.,net.", "state_dict.rename": "^stem_conv=>conv_stem"})
    assert built.meta["dropped_head_keys"] == 1 and built.meta["adapted_stem"] == ["conv_stem.weight"]
    w = built.encoder.model.state_dict()["conv_stem.weight"]
    assert torch.allclose(w, src.state_dict()["conv_stem.weight"].sum(1, keepdim=True))
    x = torch.rand(2, 1, 32, 32)
    assert built.encoder(x).shape == (2, 256)


def test_map_keys_auto_strips_only_when_it_helps():
    st = {"module.a": 1, "module.b": 2}
    assert set(map_keys(st, {"a", "b"})) == {"a", "b"}
    assert set(map_keys(st, {"module.a", "module.b"})) == {"module.a", "module.b"}


def test_run_init_uses_its_own_statistics(tmp_path):
    from radpretrain.models.backbones import backbone_spec, create_backbone
    from radpretrain.models.weights import save_encoder

    m = create_backbone("test_efficientnet")
    arch, kw = backbone_spec(m)
    save_encoder(m, {"arch": arch, "model_kwargs": kw, "method": "x", "preprocessing": {"mean": 0.31, "std": 0.17}},
                 tmp_path / "run")
    built = build_init(parse_init(str(tmp_path / "run")), "resnet18", 32, (0.5, 0.5))
    assert built.encoder.mean.item() == pytest.approx(0.31) and built.encoder.std.item() == pytest.approx(0.17)
    with pytest.raises(UserError):
        parse_init(str(tmp_path / "nope"))


def test_imagenet_init_uses_weights_own_grey_statistics_and_replicate_option():
    built = build_init(parse_init("imagenet"), "tf_efficientnet_lite0", 32, (0.9, 0.9))
    cfg = built.encoder.model.pretrained_cfg
    assert built.encoder.mean.item() == pytest.approx(sum(cfg["mean"]) / 3)
    assert built.encoder.std.item() == pytest.approx(sum(cfg["std"]) / 3)
    rep = build_init(parse_init("imagenet"), "tf_efficientnet_lite0", 32, (0.9, 0.9), {"grey": "replicate"})
    assert rep.encoder.channels == 3 and rep.encoder.mean.flatten().tolist() == pytest.approx(list(cfg["mean"]))
    x = torch.rand(2, 1, 32, 32)
    a, b = built.encoder.eval()(x), rep.encoder.eval()(x)
    # summing the RGB kernels ~ feeding the grey image three times (up to per-channel normalisation)
    assert torch.nn.functional.cosine_similarity(a, b).min() > 0.9
