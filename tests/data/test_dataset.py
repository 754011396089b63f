"""StoreDataset and letterbox: shapes, values, masks, fields, pickling, DataLoader."""

import math
import pickle

import numpy as np
import pandas as pd
import pytest
import torch

from radpretrain.data.dataset import StoreDataset, fit_size, letterbox, stretch
from radpretrain.data.store import MANIFEST_COLUMNS, SHARD_DIR, ShardWriter, Store, write_manifest, write_store_meta
from radpretrain.synthetic.toy import make_toy_store
from radpretrain.errors import UserError


def write_sized_store(root, sizes, extra=None):
    """A store whose images have the given (h, w) sizes, all pixels 200 (so padding is easy to see)."""
    rows = []
    with ShardWriter(root / SHARD_DIR / "s-00000.bin") as wr:
        for k, (h, w) in enumerate(sizes):
            off = wr.append(np.full((h, w), 200, dtype=np.uint8))
            row = {c: "" for c in MANIFEST_COLUMNS}
            row.update(image_id=f"{k:016x}", patient_id=f"p{k:015x}", modality="DX", body_part="hand",
                       view="AP", age_years=float("nan") if k % 2 else 40.0, sex="F", height=h, width=w,
                       orig_height=h, orig_width=w, status="ingested", shard="s-00000.bin", offset=off)
            if extra:
                row.update({key: vals[k] for key, vals in extra.items()})
            rows.append(row)
    write_manifest(root, pd.DataFrame(rows))
    write_store_meta(root)
    return root


def test_letterbox_wide_image_geometry_and_values():
    img = np.full((50, 100), 255, dtype=np.uint8)
    out, valid = letterbox(img, 64)
    assert out.shape == (64, 64) and out.dtype == np.float32 and valid.dtype == bool
    # 2:1 image -> 64 x 32 content, centred vertically
    assert valid.sum() == 64 * 32
    rows = np.flatnonzero(valid.any(axis=1))
    assert rows[0] == 16 and rows[-1] == 47
    assert np.all(out[~valid] == 0)
    assert np.allclose(out[valid], 1.0)
    assert out.min() >= 0 and out.max() <= 1


def test_letterbox_float_and_tall_and_target_shape():
    img = np.linspace(0, 1, 120 * 40, dtype=np.float32).reshape(120, 40)
    out, valid = letterbox(img[None], (48, 32))  # leading channel axis allowed
    nh, nw, top, left = fit_size(120, 40, (48, 32))
    assert (nh, nw) == (48, 16) and (top, left) == (0, 8)
    assert out.shape == (48, 32) and valid.sum() == 48 * 16
    assert out[valid].min() >= 0 and out[valid].max() <= 1
    # intensity ramp top->bottom is preserved
    col = out[:, 16]
    assert col[-1] > col[0]
    s, sv = stretch(img, 32)
    assert s.shape == (32, 32) and sv.all()


def test_dataset_items_from_toy_store(tmp_path):
    root = make_toy_store(tmp_path / "toy", n_patients=6, images_per_patient=2)
    ds = StoreDataset(root, image_size=32, fields=("body_part", "lesion", "age_years", "patient_id"))
    store = Store(root)
    assert len(ds) == len(store.images) == 12
    for i in (0, 5, 11):
        s = ds[i]
        assert s["image"].shape == (1, 32, 32) and s["image"].dtype == torch.float32
        assert s["valid"].shape == (1, 32, 32) and s["valid"].dtype == torch.bool
        assert s["index"] == i
        row = store.images.iloc[i]
        h, w = int(row["height"]), int(row["width"])
        nh, nw, _, _ = fit_size(h, w, 32)
        assert int(s["valid"].sum()) == nh * nw
        assert abs(nw / nh - w / h) < 0.1  # valid area keeps the aspect ratio
        assert float(s["image"][~s["valid"]].abs().sum()) == 0.0
        assert 0 <= float(s["image"].min()) and float(s["image"].max()) <= 1
        assert s["body_part"] == row["body_part"] and isinstance(s["body_part"], str)
        assert s["patient_id"] == row["patient_id"]
        assert s["lesion"].dtype == torch.int64 and int(s["lesion"]) == int(row["lesion"])
        assert s["age_years"].dtype == torch.float32 and float(s["age_years"]) == pytest.approx(row["age_years"])
    # the public letterbox() (used by export preprocessing) gives exactly the training pixels
    for i in range(len(ds)):
        ref_img, ref_valid = letterbox(store.read(i), 32)
        assert torch.equal(ds[i]["image"][0], torch.from_numpy(ref_img))
        assert torch.equal(ds[i]["valid"][0], torch.from_numpy(ref_valid))
    # mean intensity of the resized image close to the stored image's mean over the valid area
    s = ds[3]
    ref = store.read_float(3).mean()
    assert float(s["image"][s["valid"]].mean()) == pytest.approx(ref, abs=0.03)


def test_indices_stretch_nan_and_transform(tmp_path):
    root = write_sized_store(tmp_path / "st", [(40, 80), (80, 40), (60, 60)],
                             extra={"grade": ["a", None, "c"], "score": [1.5, float("nan"), 2.0]})
    ds = StoreDataset(root, indices=[2, 0], image_size=16, fields=("age_years", "grade", "score"),
                      transform=lambda s: {**s, "tag": s["index"] * 10})
    assert len(ds) == 2
    a, b = ds[0], ds[1]
    assert a["index"] == 2 and a["tag"] == 20 and b["index"] == 0
    assert int(b["valid"].sum()) == 16 * 8
    assert math.isnan(float(StoreDataset(root, indices=[1], fields=("age_years",))[0]["age_years"]))
    g = StoreDataset(root, image_size=8, fields=("grade", "score"))
    assert [g[i]["grade"] for i in range(3)] == ["a", "", "c"]
    assert math.isnan(float(g[1]["score"])) and float(g[2]["score"]) == 2.0
    st = StoreDataset(root, image_size=16, resize="stretch")
    assert bool(st[0]["valid"].all()) and torch.allclose(st[0]["image"], torch.full((1, 16, 16), 200 / 255))


def test_bucket_items(tmp_path):
    root = write_sized_store(tmp_path / "b", [(40, 80), (80, 60), (64, 64)])
    ds = StoreDataset(root, image_size=64, resize="bucket")
    assert ds[0]["image"].shape == (1, 32, 64)   # wide 1:2 -> 32 x 64 bucket, no padding
    assert bool(ds[0]["valid"].all())
    assert ds[1]["image"].shape == (1, 64, 48)
    assert ds[(2, 48, 64)]["image"].shape == (1, 48, 64)


def test_bad_input_raises_user_error(tmp_path):
    root = make_toy_store(tmp_path / "toy", n_patients=2, images_per_patient=1)
    with pytest.raises(UserError, match="no column 'nope'"):
        StoreDataset(root, fields=("nope",))
    with pytest.raises(UserError, match="out of range"):
        StoreDataset(root, indices=[5])
    with pytest.raises(UserError, match="resize"):
        StoreDataset(root, resize="crop")
    with pytest.raises(UserError, match="not a radpretrain dataset store"):
        StoreDataset(tmp_path / "missing")


def test_pickle_and_dataloader_workers(tmp_path):
    root = make_toy_store(tmp_path / "toy", n_patients=4, images_per_patient=2)
    ds = StoreDataset(root, image_size=24, fields=("body_part", "lesion"))
    first = ds[1]["image"]
    clone = pickle.loads(pickle.dumps(ds))
    assert clone._store is None and torch.equal(clone[1]["image"], first)
    dl = torch.utils.data.DataLoader(ds, batch_size=4, num_workers=1, shuffle=False)
    batches = list(dl)
    assert len(batches) == 2
    b = batches[0]
    assert b["image"].shape == (4, 1, 24, 24) and b["valid"].shape == (4, 1, 24, 24)
    assert b["index"].tolist() == [0, 1, 2, 3]
    assert len(b["body_part"]) == 4 and b["lesion"].dtype == torch.int64
    assert torch.equal(b["image"][1], first)
