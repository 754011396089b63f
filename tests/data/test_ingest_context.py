"""Ingest hands its workers an explicit context (no module globals): forked and spawned pools give the
same store as one process, a chunk is sent only its own labels, and the key never shows in a repr."""

from __future__ import annotations

import multiprocessing as mp
import os
import pickle

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from radpretrain.data import ingest as G
from radpretrain.data.deid import Pseudonymizer

pytestmark = pytest.mark.usefixtures("deid_key")


def _tree(root, n=10):
    for k in range(n):
        p = root / f"sub{k % 3}" / f"{1000000 + k}_knee.png"
        p.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.random.default_rng(k).integers(0, 256, (40, 36), dtype=np.uint8)).save(p)
    rows = [f"sub{k % 3}/{1000000 + k}_knee.png,{k % 4},{k / 3:.2f}" for k in range(n)]
    rows += [f"elsewhere/other{k}.png,1,0.5" for k in range(200)]  # rows of files not in the archive
    (root.parent / "labels.csv").write_text("path,grade,score\n" + "\n".join(rows) + "\n")


def _run(src, out, workers):
    G.ingest([src], out, labels=src.parent / "labels.csv", patient_id=r"(\d{7})", workers=workers,
             chunk_size=3, progress=False)
    files = sorted(p.relative_to(out) for p in out.rglob("*") if p.is_file())
    return {str(p): (out / p).read_bytes() for p in files if p.suffix in (".bin", ".parquet", ".json")}


@pytest.mark.parametrize("start", ["fork", "spawn"])
def test_pool_workers_get_the_context_whatever_the_start_method(tmp_path, monkeypatch, start):
    if start not in mp.get_all_start_methods():
        pytest.skip(f"no {start} start method here")
    src = tmp_path / "archive"
    _tree(src)
    ref = _run(src, tmp_path / "one", workers=1)
    monkeypatch.setattr(G.mp, "get_all_start_methods", lambda: [start])  # the pool's start method
    got = _run(src, tmp_path / start, workers=2)
    assert got.keys() == ref.keys() and all(got[k] == ref[k] for k in ref)  # every shard and manifest, byte for byte
    df = pd.read_parquet(tmp_path / start / "manifest.parquet")
    assert df["grade"].tolist() == [k % 4 for k in sorted(range(10), key=lambda k: f"sub{k % 3}/{1000000 + k}")]
    assert df["patient_id"].nunique() == 10


def test_a_chunk_job_carries_only_its_own_labels_and_no_visible_key(tmp_path):
    src = tmp_path / "archive"
    _tree(src)
    files, root_rels = G.scan_sources([src])
    labels = G.load_labels(src.parent / "labels.csv")
    key = os.environ["RADPRETRAIN_DEID_KEY"]  # set by the deid_key fixture
    pseudo = Pseudonymizer(bytes.fromhex(key))
    ctx = G.IngestContext(out=tmp_path / "ds", pseudo=pseudo, max_size=512, min_size=8, keep_paths=False,
                          modality="XR", body_part="", ct_window=(-1000.0, 1400.0), mr_percentile=99.5,
                          nifti_slices=5, nifti_max_per_patient=50, patient_pattern=None, label_from_folder=False,
                          label_columns=("grade", "score"), labels=labels)
    jobs = G.chunk_jobs(ctx, files, root_rels, range(4), 3)
    assert [len(j.files) for j in jobs] == [3, 3, 3, 1]
    for job in jobs:
        assert set(job.ctx.labels) == {rel for _, rel in job.files}  # not the CSV's other 207 rows
        back = pickle.loads(pickle.dumps(job))
        assert back.ctx.labels == job.ctx.labels and back.ctx.pseudo.fingerprint() == pseudo.fingerprint()
    for text in (repr(ctx), repr(jobs[0])):
        assert key not in text and key.upper() not in text
        assert "sub0" not in text and "elsewhere" not in text  # no paths (they can be PHI), no labels


def test_no_module_global_holds_the_key_after_an_ingest(tmp_path):
    src = tmp_path / "archive"
    _tree(src, n=4)
    G.ingest([src], tmp_path / "ds", workers=1, chunk_size=2, progress=False)
    key = bytes.fromhex(os.environ["RADPRETRAIN_DEID_KEY"])
    for name, value in vars(G).items():
        assert not isinstance(value, Pseudonymizer), name
        if isinstance(value, (list, tuple, dict)):
            assert key not in (value.values() if isinstance(value, dict) else value), name
