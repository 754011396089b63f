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
    m.heads.labels[b["index"][:3]] = -1                    # make half the batch unknown in every head
    half = m.compute_loss(b, 0)
    b2 = {**b, "index": b["index"][3:], "image": b["image"][3:]}
    only_known = m.compute_loss(b2, 0)["loss"]
    assert torch.allclose(half["loss"], only_known, atol=1e-5)
    assert not torch.allclose(full, half["loss"])
    m.heads.labels[b["index"]] = -1                        # nothing known: zero loss, still differentiable
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


# -- the metadata heads as an extra objective of another method (metadata_heads.weight > 0) --------------

SIMCLR = {"seed": 0, "data": {"image_size": 32, "mean": 0.3, "std": 0.2},
          "model": {"backbone": "resnet18", "pretrained": "none"},
          "simclr": {"temperature": 0.2, "hidden_dim": 32, "output_dim": 16}}
DINO_CFG = {**SIMCLR, "dino": {"output_dim": 32, "hidden_dim": 32, "bottleneck_dim": 16, "n_local": 1,
                               "local_size": 16}}


def _batch(store, n=12):
    ds = StoreDataset(store, image_size=32)
    return torch.utils.data.default_collate([ds[i] for i in range(n)])


@pytest.mark.parametrize("method", ["simclr", "dino"])
def test_metadata_heads_join_the_methods_own_loss(store, method):
    from radpretrain.methods.dino import DINO
    from radpretrain.methods.simclr import SimCLR

    cls, cfg = (SimCLR, SIMCLR) if method == "simclr" else (DINO, DINO_CFG)
    b = _batch(store)
    torch.manual_seed(0)
    plain = cls(cfg, store)
    assert plain.metadata_heads is None and "metadata" not in plain.encoder_meta()
    assert torch.is_tensor(plain.compute_loss(b, 0))  # weight 0 (default): the method's loss alone
    torch.manual_seed(0)
    both = cls({**cfg, "metadata_heads": {"weight": 0.5, "heads": ["body_part", "sex"]}}, store)
    out = both.compute_loss(b, 0)
    assert set(both.metadata_heads.head_names) == {"body_part", "sex"}
    assert {"own_loss", "metadata_loss", "metadata_loss_body_part", "metadata_acc_sex"} <= set(out)
    assert torch.allclose(out["loss"], out["own_loss"] + 0.5 * out["metadata_loss"])
    out["loss"].backward()
    assert both.metadata_heads["body_part"].weight.grad.abs().sum() > 0  # the heads train
    meta = both.encoder_meta()["metadata"]
    assert meta["weight"] == 0.5 and meta["heads"]["body_part"] == ["chest", "hand", "knee"]


def test_metadata_heads_learn_the_body_part_beside_simclr(store, loss_before_after):
    # the same start and views, with the heads' loss weighted 1 or 1e-6: only the first learns them
    from radpretrain.methods.simclr import SimCLR

    b = _batch(store, 16)
    after = {}
    for w in (1.0, 1e-6):
        torch.manual_seed(0)
        m = SimCLR({**SIMCLR, "metadata_heads": {"weight": w, "heads": ["body_part"]}}, store)
        opt = torch.optim.AdamW(m.parameters(), lr=3e-3)

        def head_loss():
            with torch.no_grad():
                return float(m.metadata_heads.loss(m.encoder(m.normalize(b["image"])), b["index"])["loss"])

        before, after[w] = loss_before_after(m, opt, b, head_loss, 20)
        assert all(p.grad is not None for p in m.metadata_heads.parameters())
    assert after[1.0] < 0.5 * before and after[1.0] < 0.8 * after[1e-6], (before, after)


def test_metadata_heads_in_an_engine_run(store, tmp_path):
    import yaml

    from radpretrain.models.weights import load_run_encoder
    from radpretrain.pretrain import pretrain

    run = tmp_path / "run"
    pretrain("simclr", store.root, run, overrides=[
        "trainer.enable_progress_bar=false", "data.num_workers=0", "trainer.cpu_threads=1",
        "previews.every_n_epochs=0", "data.batch_size=8", "trainer.log_every_n_steps=1", "data.image_size=32",
        "model.backbone=resnet18", "model.pretrained=none", "simclr.hidden_dim=32", "trainer.max_steps=2",
        "metadata_heads.weight=0.25", "metadata_heads.heads=[body_part]"])
    assert yaml.safe_load((run / "config.yaml").read_text())["metadata_heads"]["weight"] == 0.25
    _, meta = load_run_encoder(run)
    assert meta["method"] == "simclr" and meta["metadata"]["heads"]["body_part"] == ["chest", "hand", "knee"]
    with pytest.raises(UserError, match="metadata_heads"):
        pretrain("simclr", store.root, tmp_path / "typo", overrides=["metadata_heads.wieght=1"])


def test_a_head_named_like_a_module_attribute_is_refused():
    df = pd.DataFrame({"loss": ["a", "b"], "body_part": ["knee", "hand"]})
    from radpretrain.methods.metadata import MetadataHeads

    with pytest.raises(UserError, match="clash"):
        MetadataHeads(df, 8, ["loss", "body_part"])


def test_metadata_heads_on_an_archive_without_metadata_are_left_out(store, caplog):
    # one body part, nothing else known: the extra objective is skipped with a warning, not an error
    from radpretrain.methods.simclr import SimCLR

    one_part = store.images.assign(body_part="knee", sex="unknown", view="unknown", age_years=np.nan)
    fake = type("S", (), {"images": one_part})()
    with caplog.at_level("WARNING"):
        m = SimCLR({**SIMCLR, "metadata_heads": {"weight": 0.5, "heads": ["body_part", "age"]}}, fake)
    assert m.metadata_heads is None and "training without them" in caplog.text
    assert torch.is_tensor(m.compute_loss(_batch(store), 0))
    with pytest.raises(UserError, match="none of the heads"):  # the metadata method itself needs them
        MetadataSupervised(CFG, fake)
