"""Aspect-ratio buckets: one shape per batch, each image once, nearest bins, less padding."""

import numpy as np
import pandas as pd
import torch

from radpretrain.data.buckets import BucketBatchSampler, assign_buckets, bucket_shapes, padding_fraction
from radpretrain.data.dataset import StoreDataset
from radpretrain.data.store import MANIFEST_COLUMNS, SHARD_DIR, ShardWriter, write_manifest, write_store_meta


def varied_store(root, n=60, seed=0):
    """A store of images with aspect ratios (h / w) from 0.45 to 2.2."""
    rng = np.random.default_rng(seed)
    rows = []
    with ShardWriter(root / SHARD_DIR / "v.bin") as wr:
        for k in range(n):
            ar = float(np.exp(rng.uniform(np.log(0.45), np.log(2.2))))
            h = int(round(48 * min(1, ar))) if ar < 1 else 48
            w = 48 if ar < 1 else int(round(48 / ar))
            off = wr.append(np.full((h, w), 180, dtype=np.uint8))
            row = {c: "" for c in MANIFEST_COLUMNS}
            row.update(image_id=f"{k:016x}", patient_id=f"{k:016x}", height=h, width=w, status="ingested",
                       shard="v.bin", offset=off, age_years=30.0)
            rows.append(row)
    write_manifest(root, pd.DataFrame(rows))
    write_store_meta(root)
    return root


def test_bucket_shapes_and_assignment():
    shapes = bucket_shapes(224)
    assert shapes[0] == (224, 224)
    assert (224, 176) in shapes and (176, 224) in shapes and (224, 112) in shapes and (112, 224) in shapes
    assert all(h % 16 == 0 and w % 16 == 0 for h, w in shapes)
    which = assign_buckets([1.0, 1.3, 0.76, 2.5, 0.4, 1.1], shapes)
    assert [shapes[i] for i in which] == [(224, 224), (224, 176), (176, 224), (224, 112), (112, 224), (224, 224)]


def test_sampler_batches_single_shape_each_image_once(tmp_path):
    ds = StoreDataset(varied_store(tmp_path / "v"), image_size=64, resize="bucket")
    sampler = BucketBatchSampler(ds, batch_size=4, image_size=64, seed=1)
    batches = list(sampler)
    assert len(batches) == len(sampler)
    seen = [p for b in batches for p, _, _ in b]
    assert sorted(seen) == list(range(len(ds)))  # every image exactly once
    ars = ds.aspect_ratios()
    for b in batches:
        assert len({(h, w) for _, h, w in b}) == 1
        for p, h, w in b:  # the bin is the nearest one by log aspect ratio
            dists = [abs(np.log(ars[p]) - np.log(sh / sw)) for sh, sw in sampler.shapes]
            assert (h, w) == sampler.shapes[int(np.argmin(dists))]
    # a DataLoader with the batch sampler gives one tensor shape per batch
    dl = torch.utils.data.DataLoader(ds, batch_sampler=sampler)
    for batch, idx in zip(dl, batches):
        h, w = idx[0][1], idx[0][2]
        assert batch["image"].shape == (len(idx), 1, h, w)
    # padding: buckets beat square letterbox on varied aspect ratios
    sizes = ds.sizes()
    square = padding_fraction(sizes, [(64, 64)] * len(ds))
    bucket = padding_fraction(sizes, [sampler.shapes[b] for b in sampler.bucket_of])
    measured = float(np.mean([1 - ds[(p, h, w)]["valid"].float().mean() for b in batches for p, h, w in b]))
    assert bucket < 0.5 * square and abs(measured - bucket) < 0.02


def test_sampler_deterministic_per_epoch_drop_last_and_ddp():
    ars = np.exp(np.random.default_rng(0).uniform(-0.8, 0.8, size=103))
    a = BucketBatchSampler(ars, batch_size=8, image_size=64, seed=5)
    b = BucketBatchSampler(ars, batch_size=8, image_size=64, seed=5)
    assert list(a) == list(b)
    e0 = list(a)
    a.set_epoch(1)
    assert list(a) != e0 and sorted(p for bt in a for p, _, _ in bt) == list(range(103))
    d = BucketBatchSampler(ars, batch_size=8, image_size=64, drop_last=True)
    assert all(len(bt) == 8 for bt in d) and len(list(d)) == len(d)
    # DDP: ranks get the same number of batches, disjoint unless padded, covering everything
    ranks = [BucketBatchSampler(ars, batch_size=8, image_size=64, seed=2, num_replicas=3, rank=r) for r in range(3)]
    lists = [list(s) for s in ranks]
    assert len({len(x) for x in lists}) == 1 and len(lists[0]) == len(ranks[0])
    covered = {p for x in lists for bt in x for p, _, _ in bt}
    assert covered == set(range(103))
    single = BucketBatchSampler(ars, batch_size=8, image_size=64, seed=2)
    assert sum(len(x) for x in lists) - len(single) < 3  # at most R-1 repeated batches
