"""DeepCluster: clustering recovers known groups, no empty cluster, uniform sampling, training learns."""

import json

import lightning as L
import numpy as np
import pytest
import torch
from torch import nn

from radpretrain.data.dataset import StoreDataset
from radpretrain.synthetic.toy import make_toy_store
from radpretrain.errors import UserError
from radpretrain.methods import get_method
from radpretrain.methods.deepcluster import (
    ClusterUniformSampler, cluster_size_stats, fix_empty_clusters, nmi, pca_whiten_l2, run_kmeans,
    uniform_cluster_weights,
)
from radpretrain.transforms import random_resized_crop_flip


def blobs(n_per=40, k=8, d=64, seed=0, spread=0.3):
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(k, d)) * 3
    x = np.concatenate([c + spread * rng.normal(size=(n_per, d)) for c in centers]).astype(np.float32)
    return x, np.repeat(np.arange(k), n_per)


def test_pca_whitening_gives_unit_rows_and_decorrelated_components():
    x, _ = blobs(n_per=50, k=4, d=32)
    y = pca_whiten_l2(x, dim=8)
    assert y.shape == (200, 8)
    np.testing.assert_allclose(np.linalg.norm(y, axis=1), 1.0, rtol=1e-5)
    y_small = pca_whiten_l2(x[:5], dim=256)  # never more components than images - 1
    assert y_small.shape == (5, 4)


def test_kmeans_on_known_blobs_recovers_them():
    x, truth = blobs()
    y = pca_whiten_l2(x, dim=16)
    res = run_kmeans(y, 8, niter=20, nredo=3, seed=0)
    assert nmi(truth, res["labels"]) > 0.95
    assert np.bincount(res["labels"], minlength=8).min() > 0
    again = run_kmeans(y, 8, niter=20, nredo=3, seed=0)
    np.testing.assert_array_equal(res["labels"], again["labels"])  # seeded


def test_reassignment_between_consecutive_epochs_is_stable():
    x, truth = blobs(seed=1)
    a = run_kmeans(pca_whiten_l2(x, 16), 8, seed=1)["labels"]
    b = run_kmeans(pca_whiten_l2(x + 0.01 * np.random.default_rng(2).normal(size=x.shape), 16), 8, seed=2)["labels"]
    assert nmi(a, b) > 0.9  # label permutations do not matter for NMI


def test_empty_clusters_are_filled():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(30, 4)).astype(np.float32)
    labels = np.zeros(30, dtype=np.int64)
    labels[20:] = 1  # clusters 2..5 empty
    centroids = np.stack([x[:20].mean(0), x[20:].mean(0)] + [np.full(4, 100.0)] * 4).astype(np.float32)
    new, cents, n_fixed = fix_empty_clusters(x, labels, centroids, rng)
    sizes = np.bincount(new, minlength=6)
    assert n_fixed == 4 and sizes.min() >= 1 and sizes.sum() == 30
    # identical points cannot be split by a perturbation: they are shared at random
    same = np.ones((6, 3), dtype=np.float32)
    new, _, _ = fix_empty_clusters(same, np.zeros(6, dtype=np.int64), np.ones((3, 3), np.float32), rng)
    assert np.bincount(new, minlength=3).min() >= 1
    with pytest.raises(UserError, match="num_clusters"):
        run_kmeans(x[:3], 5)


def test_kmeans_with_more_clusters_than_groups_leaves_none_empty():
    x, _ = blobs(n_per=10, k=3, d=8, spread=0.0)  # 3 distinct points, 30 images, 10 clusters
    res = run_kmeans(x, 10, seed=0)
    assert np.bincount(res["labels"], minlength=10).min() >= 1
    stats = cluster_size_stats(res["labels"], 10)
    assert stats["empty"] == 0 and stats["min"] >= 1 and stats["max"] <= 28


def test_cluster_size_stats_quartiles():
    labels = np.repeat(np.arange(5), [2, 20, 46, 55, 135])
    s = cluster_size_stats(labels, 6)
    assert (s["min"], s["max"], s["median"], s["empty"]) == (0, 135, 33.0, 1)


def test_uniform_sampling_over_clusters():
    labels = np.array([0] * 90 + [1] * 9 + [2] * 1)
    w = uniform_cluster_weights(labels, 3)
    for c in range(3):
        assert np.isclose(w[labels == c].sum(), 1.0)

    class Holder:
        num_clusters, _trainer = 3, None

        def __init__(self):
            self.labels = labels

        def ensure_clusters(self):
            return self.labels

    s = ClusterUniformSampler(Holder(), len(labels), seed=0)
    s.set_epoch(0)
    draws = np.array(list(s) + [i for e in (1, 2, 3) for i in (s.set_epoch(e) or list(s))])
    frac = np.bincount(labels[draws], minlength=3) / len(draws)
    assert len(list(s)) == len(labels)
    np.testing.assert_allclose(frac, 1 / 3, atol=0.08)


def test_random_resized_crop_flip_geometry():
    x = torch.arange(16.0).reshape(1, 1, 4, 4).repeat(3, 1, 1, 1)
    valid = torch.ones_like(x, dtype=torch.bool)
    valid[..., :, :1] = False
    out, v = random_resized_crop_flip(x, valid, scale=(1.0, 1.0), ratio=(1.0, 1.0), hflip=1.0)
    torch.testing.assert_close(out, x.flip(-1))
    assert torch.equal(v, valid.flip(-1))
    out, _ = random_resized_crop_flip(x, None, scale=(0.25, 0.25), ratio=(1.0, 1.0), hflip=0.0,
                                      generator=torch.Generator().manual_seed(0))
    assert out.shape == x.shape and not torch.equal(out, x)


class OrientationFeatures(nn.Module):
    """A fixed 'encoder' that measures bar orientation: the toy body parts are its clusters."""

    num_features = 3

    def forward(self, x):
        gx = (x[..., :, 1:] - x[..., :, :-1]).abs().mean((1, 2, 3))
        gy = (x[..., 1:, :] - x[..., :-1, :]).abs().mean((1, 2, 3))
        gd = (x[..., 1:, 1:] - x[..., :-1, :-1]).abs().mean((1, 2, 3))
        return torch.stack([gx, gy, gd], 1) * 10


def _cfg(**dc):
    return {"seed": 0, "data": {"image_size": 32, "batch_size": 8},
            "model": {"backbone": "resnet18", "pretrained": None},
            "optim": {"name": "sgd", "lr": 0.02, "weight_decay": 0.0, "warmup_steps": 1},
            "deepcluster": {"num_clusters": 3, "pca_dim": 3, "kmeans_redo": 3, **dc}}


def test_method_clusters_toy_images_by_type(tmp_path):
    root = make_toy_store(tmp_path / "ds", n_patients=24, images_per_patient=2, lesion_rate=0.0)
    method = get_method("deepcluster")(_cfg())
    method.encoder = OrientationFeatures()
    ds = StoreDataset(root, indices=np.arange(4, 48), image_size=32)
    method.train_sampler(ds)
    labels = method.ensure_clusters()
    body = ds.store.images["body_part"].to_numpy()
    assert len(labels) == 44 and set(method.rows) == set(range(4, 48))
    assert nmi(body[method.rows], labels) > 0.9
    assert int(method.row_label[5]) == int(labels[list(method.rows).index(5)])
    assert int(method.row_label[0]) == -1  # not a training image
    # not a module buffer: DDP broadcasts buffers from rank 0 every step (8 bytes per archive image)
    assert "row_label" not in dict(method.named_buffers()) and "row_label" not in method.state_dict()


def test_training_run_reclusters_logs_and_learns(tmp_path):
    L.seed_everything(0)
    root = make_toy_store(tmp_path / "ds", n_patients=24, images_per_patient=2)
    method = get_method("deepcluster")(_cfg(num_clusters=4, pca_dim=8))
    ds = StoreDataset(root, image_size=32)
    sampler = method.train_sampler(ds)
    seen = []  # (epoch being trained, epoch of the assignment) each time the sampler is iterated
    iterate = sampler.__iter__

    class Spy(torch.utils.data.Sampler):
        def __len__(self):
            return len(sampler)

        def __iter__(self):
            out = list(iterate())
            seen.append((method.trainer.current_epoch, method._clustered_epoch))
            return iter(out)

    dl = torch.utils.data.DataLoader(ds, batch_size=8, sampler=Spy())
    run = tmp_path / "run"
    trainer = L.Trainer(max_epochs=3, accelerator="cpu", logger=L.pytorch.loggers.CSVLogger(run / "logs"),
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        default_root_dir=run, log_every_n_steps=1,
                        reload_dataloaders_every_n_epochs=int(method.reload_dataloaders_every_epoch))
    trainer.fit(method, dl)
    assert [e for e, _ in seen] == [0, 1, 2] and all(e == c for e, c in seen), seen
    records = [json.loads(line) for line in open(run / "clusters.jsonl")]
    assert [r["epoch"] for r in records] == [0, 1, 2]
    assert records[0]["nmi_prev"] is None and 0 <= records[1]["nmi_prev"] <= 1
    assert all(r["sizes"]["empty"] == 0 and r["sizes"]["min"] >= 1 for r in records)
    assert method.row_label.numel() == 48 and int(method.row_label.min()) >= 0
    import pandas as pd

    m = pd.read_csv(next((run / "logs").rglob("metrics.csv")))
    assert m["deepcluster/nmi"].notna().sum() == 2 and m["deepcluster/size_median"].notna().sum() == 3
    assert method.save_previews({}, tmp_path / "prev")[0].is_file()


def test_classifier_learns_the_pseudo_labels(tmp_path):
    """One epoch (labels fixed): cross-entropy on the clustered images goes down from ~ln K."""
    L.seed_everything(0)
    root = make_toy_store(tmp_path / "ds", n_patients=24, images_per_patient=4)
    cfg = _cfg(num_clusters=4, pca_dim=8)
    cfg["optim"] = {"name": "adamw", "lr": 1e-3, "weight_decay": 0.0, "warmup_steps": 1}
    method = get_method("deepcluster")(cfg)
    ds = StoreDataset(root, image_size=32)
    dl = torch.utils.data.DataLoader(ds, batch_size=8, sampler=method.train_sampler(ds))
    labels = torch.as_tensor(method.ensure_clusters())
    full = next(iter(torch.utils.data.DataLoader(ds, batch_size=len(ds))))

    def ce():
        with torch.no_grad():  # train-mode batch statistics, no augmentation
            logits = method.head(method.encoder(method.normalize(full["image"])))
            return float(torch.nn.functional.cross_entropy(logits, labels))

    before = ce()
    assert abs(before - np.log(4)) < 0.1  # the head was just re-initialised
    trainer = L.Trainer(max_epochs=1, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path / "run")
    trainer.fit(method, dl)
    assert torch.equal(torch.as_tensor(method.labels), labels)  # epoch 0 was not clustered twice
    after = ce()
    assert after < 0.92 * before, (before, after)


def test_checkpoint_keeps_the_epoch_assignment(tmp_path):
    root = make_toy_store(tmp_path / "ds", n_patients=6, images_per_patient=2)
    method = get_method("deepcluster")(_cfg())
    method.encoder = OrientationFeatures()
    ds = StoreDataset(root, image_size=32)
    method.train_sampler(ds)
    labels = method.ensure_clusters().copy()
    ckpt = {}
    method.on_save_checkpoint(ckpt)
    fresh = get_method("deepcluster")(_cfg())
    fresh.on_load_checkpoint(ckpt)
    fresh.dataset = None  # would raise if it tried to cluster again
    np.testing.assert_array_equal(fresh.ensure_clusters(), labels)
    assert torch.equal(fresh.row_label, method.row_label.cpu())


def test_bucket_resize_is_refused():
    cfg = _cfg()
    cfg["data"]["resize"] = "bucket"
    with pytest.raises(UserError, match="letterbox"):
        get_method("deepcluster")(cfg)


def test_deepcluster_clusters_on_the_device_path(tmp_path):
    """deepcluster.cluster_on=device on a CPU: features as a tensor, torch PCA + k-means, the same groups."""
    root = make_toy_store(tmp_path / "ds", n_patients=24, images_per_patient=2, lesion_rate=0.0)
    body = None
    found = {}
    for where in ("cpu", "device"):
        method = get_method("deepcluster")(_cfg(cluster_on=where))
        method.encoder = OrientationFeatures()
        ds = StoreDataset(root, indices=np.arange(4, 48), image_size=32, defer_resize=where == "device")
        method.train_sampler(ds)
        assert method.cluster_on_device() == (where == "device")
        found[where] = method.ensure_clusters()
        body = ds.store.images["body_part"].to_numpy()[method.rows]
    assert nmi(body, found["device"]) > 0.9 and nmi(found["cpu"], found["device"]) > 0.9
