"""Models Genesis: each corruption does what it says, and the restoration loss goes down."""

import lightning as L
import numpy as np
import pytest
import torch

from radpretrain.data.dataset import StoreDataset
from radpretrain.synthetic.toy import make_toy_store
from radpretrain.errors import UserError
from radpretrain.methods import get_method
from radpretrain.methods.genesis import (
    GenesisCorruption, GenesisTransform, in_painting, local_pixel_shuffle, masked_mse, nonlinear_transform,
    out_painting, random_bezier_mapping,
)


def _img(seed=0, h=64, w=48):
    return np.random.default_rng(1000 + seed).random((h, w)).astype(np.float32)


@pytest.mark.parametrize("decreasing", [False, True])
def test_bezier_mapping_is_monotone_onto_unit_interval(decreasing):
    grid = np.linspace(0, 1, 2001)
    for seed in range(50):
        xs, ys = random_bezier_mapping(np.random.default_rng(seed), decreasing=decreasing)
        y = np.interp(grid, xs, ys)
        d = np.diff(y)
        assert (d <= 1e-12).all() if decreasing else (d >= -1e-12).all()
        assert y.min() >= 0 and y.max() <= 1
        assert np.isclose(y[0], 1.0 if decreasing else 0.0) and np.isclose(y[-1], 0.0 if decreasing else 1.0)


def test_nonlinear_transform_keeps_intensity_order():
    img = _img()
    out = nonlinear_transform(img, np.random.default_rng(3), invert_rate=0.0)
    order = np.argsort(img, axis=None)
    assert (np.diff(out.reshape(-1)[order]) >= -1e-6).all()
    assert not np.allclose(out, img)
    inv = nonlinear_transform(img, np.random.default_rng(3), invert_rate=1.0)
    assert (np.diff(inv.reshape(-1)[order]) <= 1e-6).all()


def test_local_shuffle_permutes_within_blocks_only():
    img = _img(1)
    out, blocks = local_pixel_shuffle(img, np.random.default_rng(0), n_blocks=1)
    (y, x, h, w), = blocks
    inside = np.zeros(img.shape, bool)
    inside[y:y + h, x:x + w] = True
    np.testing.assert_array_equal(out[~inside], img[~inside])
    np.testing.assert_array_equal(np.sort(out[inside]), np.sort(img[inside]))
    assert h <= img.shape[0] // 10 and w <= img.shape[1] // 10

    out, blocks = local_pixel_shuffle(img, np.random.default_rng(0), n_blocks=200)
    touched = np.zeros(img.shape, bool)
    for y, x, h, w in blocks:
        touched[y:y + h, x:x + w] = True
    np.testing.assert_array_equal(out[~touched], img[~touched])
    np.testing.assert_array_equal(np.sort(out, axis=None), np.sort(img, axis=None))
    assert (out != img).mean() > 0.1
    again, _ = local_pixel_shuffle(img, np.random.default_rng(0), n_blocks=200)
    np.testing.assert_array_equal(out, again)  # deterministic given the generator


def test_in_painting_changes_only_its_boxes():
    img = _img(2)
    for seed in range(20):
        out, mask = in_painting(img, np.random.default_rng(seed))
        np.testing.assert_array_equal(out[~mask], img[~mask])
        if mask.any():
            assert (out[mask] != img[mask]).mean() > 0.99
            assert out[mask].min() >= 0 and out[mask].max() <= 1
    sizes = [in_painting(img, np.random.default_rng(s))[1].any() for s in range(20)]
    assert sum(sizes) >= 15  # 0.95 chance of at least one box


def test_out_painting_keeps_only_its_boxes():
    img = _img(3)
    for seed in range(20):
        out, keep = out_painting(img, np.random.default_rng(seed))
        assert keep.any()
        np.testing.assert_array_equal(out[keep], img[keep])
        assert (out[~keep] != img[~keep]).mean() > 0.99


def test_combined_corruption_defaults_and_determinism():
    c = GenesisCorruption()
    assert (c.nonlinear_rate, c.local_rate, c.paint_rate, c.inpaint_rate, c.flip_rate) == (0.9, 0.5, 0.9, 0.2, 0.4)
    img = _img(4)
    a = c(img, np.random.default_rng(7))
    b = c(img, np.random.default_rng(7))
    for u, v in zip(a, b):
        np.testing.assert_array_equal(u, v)
    ident = GenesisCorruption(flip_rate=0, local_rate=0, nonlinear_rate=0, paint_rate=0)
    cor, tgt, valid = ident(img, np.random.default_rng(0))
    np.testing.assert_array_equal(cor, img)
    np.testing.assert_array_equal(tgt, img)
    # a flip moves the target and the valid mask with the input
    flip = GenesisCorruption(flip_rate=1, local_rate=0, nonlinear_rate=0, paint_rate=0)
    v = np.zeros(img.shape, bool)
    v[:10] = True
    cor, tgt, valid = flip(img, np.random.default_rng(0), v)
    np.testing.assert_array_equal(cor, tgt)
    assert not np.array_equal(tgt, img) or np.array_equal(valid, v)
    assert valid.sum() == v.sum()


def test_config_rates_are_checked():
    with pytest.raises(UserError, match="genesis.paint_rate"):
        GenesisCorruption.from_cfg({"genesis": {"paint_rate": 1.5}})
    assert GenesisCorruption.from_cfg({"genesis": {"local_blocks": 7}}).local_blocks == 7


def test_transform_on_store_samples(tmp_path):
    root = make_toy_store(tmp_path / "ds", n_patients=3, images_per_patient=1)
    ds = StoreDataset(root, image_size=32, transform=GenesisTransform(GenesisCorruption(local_blocks=20)))
    s = ds[0]
    assert s["corrupted"].shape == s["image"].shape == s["valid"].shape == (1, 32, 32)
    assert s["corrupted"].dtype == torch.float32
    assert 0 <= float(s["corrupted"].min()) and float(s["corrupted"].max()) <= 1


def test_masked_mse_ignores_padding():
    pred, tgt = torch.zeros(1, 1, 4, 4), torch.zeros(1, 1, 4, 4)
    tgt[..., :2, :] = 1.0
    valid = torch.zeros(1, 1, 4, 4, dtype=torch.bool)
    valid[..., 2:, :] = True
    assert float(masked_mse(pred, tgt, valid)) == 0.0
    assert float(masked_mse(pred, tgt, None)) == 0.5


def test_restoration_loss_decreases_and_encoder_meta(tmp_path):
    L.seed_everything(0)
    root = make_toy_store(tmp_path / "ds", n_patients=12, images_per_patient=2)
    cfg = {"seed": 0, "data": {"image_size": 32, "batch_size": 8},
           "model": {"backbone": "resnet18", "pretrained": None, "decoder_norm": "batch",
                     "decoder_channels": [16, 16, 32, 32, 64]},
           "optim": {"name": "adamw", "lr": 3e-3, "weight_decay": 0.0, "warmup_steps": 1},
           "genesis": {"local_blocks": 30}}
    method = get_method("genesis")(cfg)
    ds = StoreDataset(root, image_size=32, transform=method.sample_transform())
    fixed = method.corrupt_batch(next(iter(torch.utils.data.DataLoader(
        StoreDataset(root, image_size=32), batch_size=16))), np.random.default_rng(1))

    def fixed_loss():
        method.eval()
        with torch.no_grad():
            return float(masked_mse(method.restore(fixed["corrupted"]), fixed["image"], fixed["valid"]))

    before = fixed_loss()
    method.train()
    dl = torch.utils.data.DataLoader(ds, batch_size=8, shuffle=True)
    trainer = L.Trainer(max_steps=20, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path)
    trainer.fit(method, dl)
    after = fixed_loss()
    assert after < 0.7 * before, (before, after)
    meta = method.encoder_meta()
    assert meta["arch"] == "resnet18" and meta["model_kwargs"]["in_chans"] == 1
    assert meta["genesis"]["decoder_norm"] == "batch"
    paths = method.save_previews(fixed, tmp_path / "previews")
    assert paths and paths[0].is_file() and paths[0].stat().st_size > 100


def test_validation_batches_are_corrupted_deterministically():
    import types

    method = get_method("genesis")({"seed": 3, "model": {"backbone": "resnet18", "pretrained": None},
                                    "genesis": {"local_blocks": 10}})
    rng = np.random.default_rng(0)
    batch = {"image": torch.from_numpy(rng.random((2, 1, 32, 32), dtype=np.float32)),
             "valid": torch.ones(2, 1, 32, 32, dtype=torch.bool), "index": torch.tensor([5, 9])}
    junk = dict(batch, corrupted=torch.zeros(2, 1, 32, 32))
    method._trainer = types.SimpleNamespace(training=False)
    try:
        a = method.on_before_batch_transfer(dict(junk))
        b = method.on_before_batch_transfer(dict(junk))
    finally:
        method._trainer = None
    assert torch.equal(a["corrupted"], b["corrupted"]) and not torch.equal(a["corrupted"], junk["corrupted"])
    train = method.on_before_batch_transfer(dict(junk))  # training: the loader's corruption is kept
    assert torch.equal(train["corrupted"], junk["corrupted"])
