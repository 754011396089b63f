"""Models Genesis: corruption on the device in the step, deterministic validation, the restoration loss
goes down.  The corruptions themselves are tested in tests/test_transforms.py."""

import types

import lightning as L
import numpy as np
import torch

from radpretrain.data.dataset import StoreDataset
from radpretrain.synthetic.toy import make_toy_store
from radpretrain.methods import get_method
from radpretrain.methods.genesis import masked_mse


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
    assert method.sample_transform() is None  # nothing left for the loader workers
    ds = StoreDataset(root, image_size=32)
    fixed = method.corrupt_batch(next(iter(torch.utils.data.DataLoader(ds, batch_size=16))),
                                 torch.Generator().manual_seed(1))

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


def _method(seed=3):
    return get_method("genesis")({"seed": seed, "model": {"backbone": "resnet18", "pretrained": None},
                                  "genesis": {"local_blocks": 10}})


def _batch():
    rng = np.random.default_rng(0)
    valid = torch.ones(4, 1, 32, 32, dtype=torch.bool)
    valid[:, :, :6] = False  # letterbox padding on top
    return {"image": torch.from_numpy(rng.random((4, 1, 32, 32), dtype=np.float32)), "valid": valid,
            "index": torch.tensor([5, 9, 2, 7])}


def _in_loop(method, training: bool, epoch: int = 0):
    method._trainer = types.SimpleNamespace(training=training, current_epoch=epoch, global_rank=0)


def test_validation_batches_are_corrupted_deterministically():
    method = _method()
    batch = _batch()
    try:
        _in_loop(method, training=False, epoch=0)
        a = method.corrupt_batch(batch, method.corruption_generator(batch, 0))
        _in_loop(method, training=False, epoch=4)  # a later check, another batch position
        b = method.corrupt_batch(batch, method.corruption_generator(batch, 3))
        other = method.corrupt_batch(dict(batch, index=torch.tensor([6, 9, 2, 7])),
                                     method.corruption_generator(dict(batch, index=torch.tensor([6])), 0))
        _in_loop(method, training=True, epoch=4)
        t3 = method.corrupt_batch(batch, method.corruption_generator(batch, 3))
        t4 = method.corrupt_batch(batch, method.corruption_generator(batch, 4))
        again = method.corrupt_batch(batch, method.step_generator(3))
    finally:
        method._trainer = None
    for k in ("corrupted", "image", "valid"):
        assert torch.equal(a[k], b[k])
    assert not torch.equal(a["corrupted"], other["corrupted"])  # seeded by the batch's first image
    # training: the step's generator, different per step, repeated exactly on resume
    assert not torch.equal(t3["corrupted"], t4["corrupted"])
    assert torch.equal(t3["corrupted"], again["corrupted"])
    assert not torch.equal(t3["corrupted"], a["corrupted"])


def test_step_corrupts_the_batch_and_scores_valid_pixels_only():
    method = _method()
    method.eval()
    batch = _batch()
    with torch.no_grad():
        loss = method.compute_loss(batch, 0)
        assert torch.equal(loss, method.compute_loss(batch, 0))  # same step, same corruption
        c = method.corrupt_batch(batch, method.step_generator(0))
        assert torch.equal(loss, masked_mse(method.restore(c["corrupted"]), c["image"], c["valid"]))
    # the target and the mask are flipped with the input: the flipped mask marks padding of the flipped target
    assert int(c["valid"].sum()) == int(batch["valid"].sum())
    for i in range(4):
        flips = [batch["image"][i], batch["image"][i].flip(-2), batch["image"][i].flip(-1), batch["image"][i].flip(-2, -1)]
        masks = [batch["valid"][i], batch["valid"][i].flip(-2), batch["valid"][i].flip(-1), batch["valid"][i].flip(-2, -1)]
        k = next(k for k, f in enumerate(flips) if torch.equal(f, c["image"][i]))
        assert torch.equal(c["valid"][i], masks[k])
    assert "corrupted" not in batch  # the caller's batch is left alone


def test_loader_samples_are_not_corrupted(tmp_path):
    root = make_toy_store(tmp_path / "ds", n_patients=3, images_per_patient=1)
    method = _method()
    ds = StoreDataset(root, image_size=32, transform=method.sample_transform())
    s = ds[0]
    assert set(s) >= {"image", "valid"} and "corrupted" not in s
