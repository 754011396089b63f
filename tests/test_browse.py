"""Tests for ``radpretrain embed | neighbors | clusters``."""

from __future__ import annotations

import base64
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import timm
import torch

import radpretrain.browse as browse
from radpretrain.cli import main as cli_main
from radpretrain.data.store import SHARD_DIR, ShardWriter, Store, write_manifest
from radpretrain.synthetic.toy import make_toy_store
from radpretrain.errors import UserError
from radpretrain.export import export_encoder
from radpretrain.models.weights import save_encoder

SIZE = 64
DUP_ID = "ffff000000000005"
PHI = "SMITH^JOHN_ACC12345"


def _encoder(tmp: Path) -> Path:
    torch.manual_seed(0)
    model = timm.create_model("resnet18", in_chans=1, num_classes=0).eval()
    meta = {"arch": "resnet18", "model_kwargs": {"in_chans": 1}, "image_size": SIZE, "method": "simclr",
            "preprocessing": {"mean": 0.3, "std": 0.2, "image_size": SIZE, "resize": "letterbox"}}
    save_encoder(model, meta, tmp / "run")
    return export_encoder(tmp / "run", tmp / "encoder")


def _add_near_duplicate(store: Path, of: int = 5) -> None:
    """Append a copy of image ``of`` with tiny noise as a new ingested image; plant PHI in ``source``."""
    s = Store(store)
    rng = np.random.default_rng(1)
    img = s.read(of).astype(np.int16) + rng.integers(-2, 3, s.read(of).shape)
    with ShardWriter(store / SHARD_DIR / "dup-00000.bin") as w:
        off = w.append(np.clip(img, 0, 255).astype(np.uint8))
    df = s.manifest.copy()
    row = df.iloc[of].copy()
    row["image_id"], row["shard"], row["offset"] = DUP_ID, "dup-00000.bin", off
    row["content_hash"] = "f" * 64
    df = pd.concat([df, row.to_frame().T], ignore_index=True).astype(df.dtypes.to_dict())
    df["source"] = PHI
    write_manifest(store, df)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("browse")
    store = make_toy_store(tmp / "store", n_patients=9, images_per_patient=2)
    _add_near_duplicate(store)
    enc = _encoder(tmp)
    emb = browse.embed_store(store, enc, tmp / "emb.parquet", batch_size=8, device="cpu")
    return tmp, store, enc, emb


def test_embed_writes_each_image_once_in_store_order(setup, rel_err):
    tmp, store, enc, emb = setup
    ids, X = browse.read_embeddings(emb)
    assert list(ids) == Store(store).images["image_id"].tolist() and len(ids) == 19
    assert X.shape == (19, 512) and np.isfinite(X).all()
    assert pq.read_schema(emb).names == ["image_id", "embedding"]
    assert not emb.with_name(emb.name + ".parts").exists()
    # same features as the encoder applied through load_encoder's preprocessing
    from radpretrain.encoder import load_encoder

    model, pre = load_encoder(enc)
    with torch.no_grad():
        ref = model(pre(Store(store).read(7))).numpy()[0]
    assert rel_err(X[7], ref) < 1e-4  # batch of 4 vs one image: other kernel blocking
    meta_blob = str(pq.read_schema(emb).metadata)
    assert str(tmp) not in meta_blob and PHI not in meta_blob


def test_embed_resumes_after_an_interruption(setup, monkeypatch, rel_err):
    tmp, store, enc, emb_full = setup
    out = tmp / "resume" / "emb.parquet"
    browse.embed_store(store, enc, out, batch_size=4, part_size=5, device="cpu", max_parts=2)  # "killed"
    parts = out.with_name(out.name + ".parts")
    assert not out.exists() and sorted(p.name for p in parts.glob("part-*")) == ["part-00000.parquet", "part-00001.parquet"]
    (parts / "part-00002.parquet.tmp").write_bytes(b"half a part")   # a write cut short
    (parts / "part-00003.parquet").write_bytes(b"garbage")           # a damaged part
    written = []
    real = browse._write_part
    monkeypatch.setattr(browse, "_write_part", lambda d, p, ids, X: (written.append(p), real(d, p, ids, X)))
    browse.embed_store(store, enc, out, batch_size=4, part_size=5, device="cpu")
    assert written == [2, 3]  # finished parts were skipped, the damaged one redone
    ids, X = browse.read_embeddings(out)
    ids_full, X_full = browse.read_embeddings(emb_full)
    assert list(ids) == list(ids_full) and len(set(ids)) == len(ids)
    assert max(rel_err(X[i], X_full[i]) for i in range(len(X))) < 1e-4
    assert not parts.exists()
    # a rerun with nothing to do leaves the file alone
    written.clear()
    mtime = out.stat().st_mtime_ns
    assert cli_main(["embed", str(store), "--encoder", str(enc), "--out", str(out), "--device", "cpu"]) == 0
    assert written == [] and out.stat().st_mtime_ns == mtime


def test_neighbors_finds_the_near_duplicate(setup, capsys):
    tmp, store, enc, emb = setup
    src_id = Store(store).images["image_id"].iloc[5]
    df = browse.nearest(emb, src_id, k=5, data=store)
    assert df["image_id"].iloc[0] == DUP_ID and df["similarity"].iloc[0] > 0.999
    assert src_id not in df["image_id"].tolist() and len(df) == 5
    assert (np.diff(df["similarity"].to_numpy()) <= 1e-6).all()
    assert list(df.columns) == ["rank", "image_id", "similarity", "modality", "body_part", "view"]
    assert cli_main(["neighbors", "--embeddings", str(emb), "--image", DUP_ID, "-k", "3", "--data", str(store)]) == 0
    printed = capsys.readouterr().out
    assert src_id in printed and "body_part" in printed and PHI not in printed
    with pytest.raises(UserError, match="no embedding for image id"):
        browse.nearest(emb, "not-an-image-id")


def test_kmeans_recovers_separated_groups():
    rng = np.random.default_rng(0)
    centres = np.eye(8, dtype=np.float32)[:3] * 10
    X = np.concatenate([c + rng.normal(0, 0.5, (n, 8)) for c, n in zip(centres, (30, 20, 10))]).astype(np.float32)
    labels, sims, cents = browse.kmeans(X, 3, seed=0)
    truth = np.repeat([0, 1, 2], [30, 20, 10])
    assert labels.tolist() == truth.tolist()  # renumbered by size: the largest group is cluster 0
    assert sims.min() > 0.9 and cents.shape == (3, 8)
    with pytest.raises(UserError, match="--k 100"):
        browse.kmeans(X, 100)


def test_clusters_gallery(setup):
    tmp, store, enc, emb = setup
    out = tmp / "clusters"
    assert cli_main(["clusters", "--embeddings", str(emb), "--data", str(store), "--k", "3", "--out", str(out),
                     "--per-cluster", "4", "--thumb-size", "32"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["clusters.parquet", "index.html"]
    cl = pd.read_parquet(out / "clusters.parquet")
    ids, _ = browse.read_embeddings(emb)
    assert sorted(cl["image_id"]) == sorted(ids) and set(cl["cluster"]) <= {0, 1, 2}
    sizes = cl["cluster"].value_counts().reindex(range(3), fill_value=0).tolist()
    assert sizes == sorted(sizes, reverse=True)
    page = (out / "index.html").read_text()
    for c, n in enumerate(sizes):
        if n:
            assert f"Cluster {c}: {n} images" in page
    pngs = re.findall(r"data:image/png;base64,([A-Za-z0-9+/=]+)", page)
    assert len(pngs) >= 1 + sum(1 for n in sizes if n)
    from PIL import Image
    import io

    mosaic = Image.open(io.BytesIO(base64.b64decode(pngs[-1])))
    assert mosaic.height >= 32
    assert "hand" in page and "DX" in page
    manifest = Store(store).manifest
    for s in [PHI, str(tmp)] + manifest["patient_id"].tolist() + manifest["study_id"].tolist():
        assert s not in page


def test_bad_embeddings_file_is_a_user_error(tmp_path):
    bad = tmp_path / "e.parquet"
    bad.write_bytes(b"PAR1 nope")
    with pytest.raises(UserError, match="e.parquet: not a readable parquet file"):
        browse.read_embeddings(bad)
    pd.DataFrame({"image_id": ["a"], "x": [1]}).to_parquet(bad)
    with pytest.raises(UserError, match="expected columns image_id and embedding"):
        browse.read_embeddings(bad)
