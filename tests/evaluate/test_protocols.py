"""Linear probe, kNN and fine-tuning learn a learnable task and not a shuffled one."""

import numpy as np
import pytest
import torch

from radpretrain.evaluate.inits import InitEncoder
from radpretrain.evaluate.metrics import metric_value
from radpretrain.evaluate.features import extract_features
from radpretrain.evaluate.protocols import finetune, knn_probe, linear_probe
from radpretrain.transforms import finetune_augment


def _planted(n, d=32, seed=0, n_classes=2):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, n_classes, n)
    X = rng.normal(0, 1, (n, d))
    X[:, 0] += 3.0 * (y == 1)
    if n_classes > 2:
        X[:, 1] += 3.0 * (y == 2)
    return X.astype(np.float32), y


def _split(n):
    idx = np.arange(n)
    return idx[: n // 2], idx[n // 2 : 3 * n // 4], idx[3 * n // 4 :]


@pytest.mark.parametrize("probe", [linear_probe, knn_probe])
def test_probe_learns_planted_feature_and_not_shuffled_labels(probe):
    X, y = _planted(400)
    tr, va, te = _split(400)
    r = probe("binary", 2, X[tr], y[tr], X[va], y[va], X[te])
    assert metric_value("auc", "binary", y[te], r.test_scores) > 0.95
    assert r.chosen  # a hyper-parameter was chosen on val
    aucs = []
    for seed in range(3):
        ys = np.random.default_rng(seed).permutation(y)
        r = probe("binary", 2, X[tr], ys[tr], X[va], ys[va], X[te])
        aucs.append(metric_value("auc", "binary", ys[te], r.test_scores))
    assert abs(np.mean(aucs) - 0.5) < 0.12


def test_linear_probe_multiclass_and_regression():
    X, y = _planted(450, n_classes=3)
    tr, va, te = _split(450)
    r = linear_probe("multiclass", 3, X[tr], y[tr], X[va], y[va], X[te])
    assert r.test_scores.shape == (len(te), 3)
    assert metric_value("auc", "multiclass", y[te], r.test_scores) > 0.9
    t = X[:, 0] * 10 + 40
    r = linear_probe("regression", 0, X[tr], t[tr], X[va], t[va], X[te])
    assert metric_value("r2", "regression", t[te], r.test_scores) > 0.95


def test_probe_keeps_all_classes_when_train_misses_one():
    X, y = _planted(300, n_classes=3)
    tr, va, te = _split(300)
    tr = tr[y[tr] != 2]
    r = knn_probe("multiclass", 3, X[tr], y[tr], X[va], y[va], X[te], {"k": [3]})
    assert r.test_scores.shape == (len(te), 3) and np.all(r.test_scores[:, 2] == 0)


def test_finetune_learns_and_warmup_freezes_encoder(toys):
    torch.manual_seed(0)
    imgs, y = toys.images(160)
    tr, va, te = np.arange(0, 100), np.arange(100, 130), np.arange(130, 160)

    def make():
        torch.manual_seed(0)
        return toys.encoder([0.2], [0.3])

    opts = {"epochs": 6, "lr": 2e-2, "batch_size": 20, "patience": 3, "rotate": 0, "crop": 0}
    r = finetune(make, "binary", 2, imgs, y, tr, va, te, opts)
    assert metric_value("auc", "binary", y[te], r.test_scores) > 0.9
    hist = r.chosen["tried"][0]["history"]
    assert hist[-1]["train_loss"] < hist[0]["train_loss"]
    assert 1 <= r.chosen["best_epoch"] <= len(hist)

    # warm-up: with only head-only epochs the encoder's weights (and BN statistics) do not move
    enc = make()
    before = {k: v.clone() for k, v in enc.state_dict().items()}
    made = []

    def make_same():
        made.append(enc)
        return enc

    finetune(make_same, "binary", 2, imgs, y, tr, va, te, {**opts, "epochs": 1, "warmup_epochs": 1})
    after = enc.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_finetune_lr_sweep_is_chosen_on_validation(toys):
    imgs, y = toys.images(120, seed=1)
    tr, va, te = np.arange(0, 70), np.arange(70, 95), np.arange(95, 120)
    opts = {"epochs": 2, "lr_sweep": [1e-2, 1e-7], "batch_size": 24, "augment": False}
    r = finetune(lambda: toys.encoder([0.2], [0.3]), "binary", 2, imgs, y, tr, va, te, opts)
    tried = r.chosen["tried"]
    assert [t["lr"] for t in tried] == [1e-2, 1e-7]
    best = max(tried, key=lambda t: t["val_score"])
    assert r.chosen["lr"] == best["lr"]


def test_finetune_augment_keeps_range_and_shape():
    x = torch.rand(6, 1, 32, 32)
    g = torch.Generator().manual_seed(0)
    out = finetune_augment(x, {"flip": True, "rotate": 10, "crop": 0.1, "brightness": 0.1, "contrast": 0.1}, g)
    assert out.shape == x.shape and out.min() >= 0 and out.max() <= 1
    assert not torch.allclose(out, x)


def test_extract_features_shape_and_pool_check(toys):
    enc = toys.encoder([0.5], [0.25])
    imgs, _ = toys.images(10)
    f = extract_features(enc, imgs, batch_size=4)
    assert f.shape == (10, 8)
    from radpretrain.errors import UserError

    with pytest.raises(UserError):
        extract_features(enc, imgs, pool="cls")


def test_vit_token_pooling_mean_cls_flat(toys):
    import timm

    vit = timm.create_model("test_vit", pretrained=False, num_classes=0, in_chans=1, img_size=32, patch_size=8)
    enc = InitEncoder(vit, [0.5], [0.25])
    assert enc.is_vit
    imgs, _ = toys.images(3)
    imgs = torch.nn.functional.interpolate(imgs.float(), size=32).to(torch.uint8)
    d = vit.num_features
    n_tok = (32 // 8) ** 2
    assert extract_features(enc, imgs, pool="mean").shape == (3, d)
    assert extract_features(enc, imgs, pool="cls").shape == (3, d)
    assert extract_features(enc, imgs, pool="flat").shape == (3, d * n_tok)
