"""Metadata-supervised pretraining: vocabularies from the store, unknowns masked out of the loss."""

import numpy as np
import pandas as pd
import pytest
import torch

from radpretrain.data.dataset import StoreDataset
from radpretrain.data.store import Store
from radpretrain.synthetic.toy import make_toy_store
from radpretrain.errors import UserError
from radpretrain.methods.metadata import MetadataSupervised, build_vocabularies

CFG = {"seed": 0, "data": {"image_size": 32, "mean": 0.3, "std": 0.2},
       "model": {"backbone": "resnet18", "pretrained": "none"},
       "metadata": {"heads": ["body_part", "age", "sex", "view"]}, "augment": {"enabled": False}}


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return Store(make_toy_store(tmp_path_factory.mktemp("toy"), n_patients=12, images_per_patient=2))


def test_vocabularies_mask_unknown_and_drop_constant_fields():
    df = pd.DataFrame({"body_part": ["hand", "knee", "unknown", "hand", ""],
                       "age_years": [1.0, np.nan, 30.0, 70.0, 15.0],
                       "sex": ["M", "F", "unknown", "M", "F"],
                       "view": ["AP", "AP", "unknown", "AP", "AP"]})
    vocab, lab = build_vocabularies(df, ["body_part", "age", "sex", "view"])
    assert vocab["body_part"] == ["hand", "knee"] and "view" not in vocab  # one known value only
    assert lab[:, 0].tolist() == [0, 1, -1, 0, -1]
    assert lab[:, 1].tolist() == [0, -1, 3, 5, 2]   # bins 0-2, 2-12, 12-18, 18-40, 40-65, 65-200
    assert lab[2, 2] == -1
    with pytest.raises(UserError, match="no such column"):
        build_vocabularies(df, ["laterality"])


def test_unknown_labels_do_not_contribute(store):
    torch.manual_seed(0)
    m = MetadataSupervised(CFG, store).eval()  # per-image outputs (BatchNorm on running statistics)
    ds = StoreDataset(store, image_size=32)
    b = torch.utils.data.default_collate([ds[i] for i in range(6)])
    full = m.compute_loss(b, 0)["loss"]
    m.labels[b["index"][:3]] = -1                    # make half the batch unknown in every head
    half = m.compute_loss(b, 0)
    b2 = {**b, "index": b["index"][3:], "image": b["image"][3:]}
    only_known = m.compute_loss(b2, 0)["loss"]
    assert torch.allclose(half["loss"], only_known, atol=1e-5)
    assert not torch.allclose(full, half["loss"])
    m.labels[b["index"]] = -1                        # nothing known: zero loss, still differentiable
    none = m.compute_loss(b, 0)["loss"]
    assert float(none.detach()) == 0.0 and none.requires_grad


def test_loss_decreases_on_toy_store(store):
    torch.manual_seed(0)
    m = MetadataSupervised(CFG, store)
    ds = StoreDataset(store, image_size=32)
    b = torch.utils.data.default_collate([ds[i] for i in range(16)])
    opt = torch.optim.AdamW(m.parameters(), lr=1e-3)
    with torch.no_grad():
        before = float(m.compute_loss(b, 0)["loss"])
    for i in range(10):
        out = m.compute_loss(b, i)
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
    with torch.no_grad():
        after = m.compute_loss(b, 0)
    assert float(after["loss"]) < 0.7 * before, (before, float(after["loss"]))
    assert float(after["acc_body_part"]) > 0.5
    meta = m.encoder_meta()
    assert meta["metadata"]["heads"]["body_part"] == ["chest", "hand", "knee"]
