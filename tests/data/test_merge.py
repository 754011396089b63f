"""``radpretrain ingest --merge`` of finished stores made from different file lists (data/merge.py)."""

import json
import shutil

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from radpretrain import cli
from radpretrain.data import merge as M
from radpretrain.data.deid import _parse_key
from radpretrain.data.ingest import ingest
from radpretrain.data.store import MANIFEST_COLUMNS, Store
from radpretrain.errors import UserError

from .conftest import TEST_KEY

pytestmark = pytest.mark.usefixtures("deid_key")
KEY = _parse_key(TEST_KEY)


def _cli(argv, capfd):
    rc = cli.main(["ingest", *map(str, argv)])
    out, err = capfd.readouterr()
    return rc, out, err


def _ingest(src, out, **kw):
    ingest([src], out, workers=1, progress=False, key=KEY, **kw)
    return out


def _png_tree(root, files, size=(48, 40)):
    for rel, seed in files.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.random.default_rng(seed).integers(0, 256, size=size, dtype=np.uint8)).save(p)
    return root


@pytest.fixture(scope="module")
def two_stores(tmp_path_factory):
    """Two small synthetic archives (different seeds) ingested separately with the same key; the second
    archive also holds a copy of one of the first archive's DICOM files (at another path)."""
    synth = pytest.importorskip("radpretrain.synthetic.archive")
    root = tmp_path_factory.mktemp("merge")
    a, b = root / "archive_a", root / "archive_b"
    synth.generate_archive(a, n_patients=3, seed=1, workers=1)
    synth.generate_archive(b, n_patients=3, seed=2, workers=1)
    truth = pd.read_csv(a / ".synth/truth.csv")
    copied = truth.loc[(truth.kind == "radiograph") & (truth.expected_status == "ingested"), "path"].iloc[0]
    (b / "zz_copied").mkdir()
    shutil.copyfile(a / copied, b / "zz_copied" / "IM0001.dcm")
    sa = _ingest(a, root / "store_a")
    sb = _ingest(b, root / "store_b", labels=b / "labels.csv")
    return sa, sb, a / copied


@pytest.fixture(scope="module")
def merged(two_stores, tmp_path_factory):
    sa, sb, _ = two_stores
    out = tmp_path_factory.mktemp("merged") / "ds"
    M.merge_stores([sa, sb], out)
    return out


def test_merge_keeps_every_row_and_pixel(two_stores, merged):
    sa, sb, _ = two_stores
    a, b, m = Store(sa), Store(sb), Store(merged)
    ma, mb, mm = a.manifest, b.manifest, m.manifest
    assert len(mm) == len(ma) + len(mb)
    assert mm["image_id"].tolist() == ma["image_id"].tolist() + mb["image_id"].tolist()   # input order
    assert list(mm.columns[: len(MANIFEST_COLUMNS)]) == MANIFEST_COLUMNS
    same = ["image_id", "patient_id", "study_id", "source", "content_hash", "height", "width"]
    pd.testing.assert_frame_equal(mm[same], pd.concat([ma[same], mb[same]], ignore_index=True))
    # one cross-store copy: one more duplicate, one fewer image
    assert len(m) == len(a) + len(b) - 1
    assert (mm.status == "duplicate").sum() == (ma.status == "duplicate").sum() + (mb.status == "duplicate").sum() + 1
    assert m.images["image_id"].is_unique and m.images["content_hash"].is_unique
    # every ingested image reads back byte-equal to its source store's pixels
    for i, row in m.images.iterrows():
        src = a if i < len(a) else b
        got = m.read(i)
        want = src.read(src.index_of(row["image_id"]))
        assert got.dtype == want.dtype and np.array_equal(got, want)
    # shards linked under names that cannot collide (both stores have a chunk-000000.bin)
    shards = sorted(m.images["shard"].unique())
    assert len(shards) == 2 and all(s.startswith("ingest-") and s.endswith("/chunk-000000.bin") for s in shards)
    assert not list(merged.rglob("*.tmp"))
    # label columns: the union, missing -> null, typed as one ingest types them
    assert str(mm["lesion"].dtype) == "Int64"
    assert mm["lesion"].iloc[: len(ma)].isna().all()
    pd.testing.assert_series_equal(mm["lesion"].iloc[len(ma):].reset_index(drop=True), mb["lesion"], check_names=False)


def test_merged_qc_and_store_json_reconcile(two_stores, merged):
    sa, sb, _ = two_stores
    qa, qb, qm = (json.loads((p / "qc_summary.json").read_text()) for p in (sa, sb, merged))
    mm = pd.read_parquet(merged / "manifest.parquet")
    assert qm["inputs"] == qa["inputs"] + qb["inputs"] == len(mm)
    assert qm["inputs"] == qm["ingested"] + qm["duplicates"] + sum(qm["quarantined"].values())
    assert qm["ingested"] == qa["ingested"] + qb["ingested"] - 1 == (mm.status == "ingested").sum()
    assert qm["duplicates"] == qa["duplicates"] + qb["duplicates"] + 1
    for reason in set(qa["quarantined"]) | set(qb["quarantined"]):
        assert qm["quarantined"][reason] == qa["quarantined"].get(reason, 0) + qb["quarantined"].get(reason, 0)
    assert qm["sidecar_skipped"] == qa["sidecar_skipped"] + qb["sidecar_skipped"]
    for k in set(qa["patient_id_sources"]) | set(qb["patient_id_sources"]):
        assert qm["patient_id_sources"][k] == qa["patient_id_sources"].get(k, 0) + qb["patient_id_sources"].get(k, 0)
    assert qm["patients"] == mm.loc[mm.status == "ingested", "patient_id"].nunique()
    assert sum(qm["by_format"].values()) == len(mm) and qm["merged_stores"] == 2
    meta, ma = (json.loads((p / "store.json").read_text()) for p in (merged, sa))
    assert (meta["n_inputs"], meta["n_images"], meta["n_patients"]) == (qm["inputs"], qm["ingested"], qm["patients"])
    for k in ("key_fingerprint", "max_size", "min_size", "resize", "intensity", "content_hash", "dtype", "keep_paths"):
        assert meta[k] == ma[k]
    assert meta["label_columns"] == ["lesion"] and meta["patient_id_source"] == "per-file"
    from radpretrain.data.info import collect

    info = collect(merged)
    assert (info["inputs"], info["images"], info["by_status"]["duplicate"]) == (len(mm), qm["ingested"], qm["duplicates"])


def test_a_file_in_both_archives_is_ingested_once(two_stores, merged):
    _, _, copied = two_stores
    from radpretrain.data import readers as R

    mm = pd.read_parquet(merged / "manifest.parquet")
    h = R.content_hash(R.load_stored(copied, 512)[0])
    rows = mm[mm.content_hash == h]
    assert rows["status"].tolist() == ["ingested", "duplicate"]   # the first store's copy is kept
    assert rows["reason"].iloc[1] == "duplicate_of:" + rows["image_id"].iloc[0] and rows["shard"].iloc[1] == ""
    # every duplicate points at an ingested image of the same content
    ing = mm[mm.status == "ingested"].set_index("image_id")
    for _, r in mm[mm.status == "duplicate"].iterrows():
        assert ing.loc[r["reason"].split(":", 1)[1], "content_hash"] == r["content_hash"]


def test_merge_no_phi_in_outputs(two_stores, merged, capfd):
    _, _, copied = two_stores
    phi = json.loads((copied.parents[3] / ".synth/planted_phi.json").read_text())
    strings = phi if isinstance(phi, list) else [s for v in phi.values() for s in (v if isinstance(v, list) else [v])]
    strings = sorted({str(s) for s in strings if len(str(s)) >= 4})
    assert strings
    blobs = [p.read_bytes() for p in merged.rglob("*") if p.is_file() and p.suffix != ".bin"]
    blobs.append("\n".join(str(p.relative_to(merged)) for p in merged.rglob("*")).encode())
    assert not [s for s in strings for b in blobs if s.encode() in b]


def test_rerun_on_a_finished_merge_gives_the_same_store(two_stores, merged, tmp_path, capfd):
    sa, sb, _ = two_stores
    out = tmp_path / "again"
    shutil.copytree(merged, out, copy_function=shutil.copy2)
    before = pd.read_parquet(out / "manifest.parquet")
    rc, stdout, _ = _cli(["--merge", sa, sb, "--out", out], capfd)
    assert rc == 0 and "merged from 2 stores" in stdout
    pd.testing.assert_frame_equal(before, pd.read_parquet(out / "manifest.parquet"))
    assert (out / "store.json").read_text() == (merged / "store.json").read_text()
    # the same stores in another order, into the same folder: another merge, refused
    rc, _, err = _cli(["--merge", sb, sa, "--out", out], capfd)
    assert rc == 2 and "holds another ingest or merge" in err


def test_killed_merge_resumes_to_the_same_manifest(tmp_path, monkeypatch):
    src1 = _png_tree(tmp_path / "jan", {f"img{k}.png": k for k in range(4)})
    src2 = _png_tree(tmp_path / "feb", {"new/x.png": 10, "new/y.png": 1})   # y.png == jan/img1.png
    a, b = _ingest(src1, tmp_path / "a"), _ingest(src2, tmp_path / "b")
    ref = tmp_path / "ref"
    M.merge_stores([a, b], ref)
    out = tmp_path / "out"

    def killed(*args, **kw):
        raise KeyboardInterrupt  # as if killed after the shards were linked, before the manifest

    monkeypatch.setattr(M, "write_manifest", killed)
    with pytest.raises(KeyboardInterrupt):
        M.merge_stores([a, b], out)
    assert not (out / "manifest.parquet").exists() and list((out / "shards").rglob("*.bin"))
    (out / "shards" / "stale.bin.123.tmp").write_bytes(b"x")  # a temp file left by the killed run
    monkeypatch.undo()
    with pytest.raises(UserError, match="unfinished store"):   # a half-done merge is not a store to merge
        M.merge_stores([out, a], tmp_path / "x")
    M.merge_stores([a, b], out)
    pd.testing.assert_frame_equal(pd.read_parquet(ref / "manifest.parquet"), pd.read_parquet(out / "manifest.parquet"))
    assert not list(out.rglob("*.tmp"))
    assert pd.read_parquet(out / "manifest.parquet")["status"].tolist() == ["ingested"] * 5 + ["duplicate"]


def test_same_image_id_same_content_is_a_duplicate_different_content_refused(tmp_path, capfd):
    jan = _png_tree(tmp_path / "jan" / "export", {"p1/img.png": 1, "p2/img.png": 2})
    same = _png_tree(tmp_path / "feb" / "export", {"p1/img.png": 1, "p3/img.png": 3})     # p1 re-exported
    a, b = _ingest(jan, tmp_path / "a"), _ingest(same, tmp_path / "b")
    out = tmp_path / "m"
    M.merge_stores([a, b], out)
    df = pd.read_parquet(out / "manifest.parquet")
    assert df["status"].tolist() == ["ingested", "ingested", "duplicate", "ingested"]
    assert df["image_id"].iloc[0] == df["image_id"].iloc[2] and df["reason"].iloc[2] == f"duplicate_of:{df['image_id'].iloc[0]}"
    assert Store(out).images["image_id"].is_unique
    # the same relative path with other pixels: two images would share one id -> refused, naming the token only
    other = _png_tree(tmp_path / "mar" / "export", {"p2/img.png": 99})
    c = _ingest(other, tmp_path / "c")
    tok = pd.read_parquet(c / "manifest.parquet")["image_id"].iloc[0]
    rc, _, err = _cli(["--merge", a, c, "--out", tmp_path / "m2"], capfd)
    assert rc == 2 and tok in err and "differently named folder" in err
    rest = err.replace(str(a), "").replace(str(c), "")
    assert "p2" not in rest and "img.png" not in rest and "export" not in rest
    assert not (tmp_path / "m2").exists()
    # ingested from a differently named folder, the same files get other ids and merge
    d = _ingest(tmp_path / "mar", tmp_path / "d")
    M.merge_stores([a, d], tmp_path / "m3")
    assert (pd.read_parquet(tmp_path / "m3" / "manifest.parquet")["status"] == "ingested").sum() == 3


def test_merge_refusals(tmp_path, capfd):
    src1 = _png_tree(tmp_path / "s1", {"a.png": 1, "b.png": 2})
    src2 = _png_tree(tmp_path / "s2", {"c.png": 3})
    a, b = _ingest(src1, tmp_path / "a"), _ingest(src2, tmp_path / "b")
    other_key = ingest([src2], tmp_path / "k", workers=1, progress=False, key=b"another key entirely")
    assert other_key["ingested"] == 1
    rc, _, err = _cli(["--merge", a, tmp_path / "k", "--out", tmp_path / "o"], capfd)
    assert rc == 2 and "de-identification key" in err and str(tmp_path / "k") in err and len(err.strip().splitlines()) == 1
    _ingest(src2, tmp_path / "small", max_size=32)
    with pytest.raises(UserError, match=r"different --max-size \(512 vs 32\)"):
        M.merge_stores([a, tmp_path / "small"], tmp_path / "o")
    _ingest(src2, tmp_path / "ct", ct_window=(-500, 500))
    with pytest.raises(UserError, match="different --ct-window"):
        M.merge_stores([a, tmp_path / "ct"], tmp_path / "o")
    # unfinished: killed before finalisation (no manifest)
    shutil.copytree(b, tmp_path / "unfinished")
    (tmp_path / "unfinished" / "manifest.parquet").unlink()
    rc, _, err = _cli(["--merge", a, tmp_path / "unfinished", "--out", tmp_path / "o"], capfd)
    assert rc == 2 and "unfinished store" in err
    # the same store twice, a partition, an --out holding something else
    shutil.copytree(a, tmp_path / "a_copy")
    with pytest.raises(UserError, match="same store given twice"):
        M.merge_stores([a, b, tmp_path / "a_copy"], tmp_path / "o")
    part = _ingest(src2, tmp_path / "p1", partition="1/2", chunk_size=1)
    with pytest.raises(UserError, match="merge its partitions first"):
        M.merge_stores([a, part], tmp_path / "o")
    # partitions of one archive made with other options are not one plan: the option is named
    other_part = _ingest(src2, tmp_path / "p2", partition="2/2", chunk_size=1, max_size=64)
    rc, _, err = _cli(["--merge", part, other_part, "--out", tmp_path / "o"], capfd)
    assert rc == 2 and "different --max-size (512 vs 64)" in err
    rc, _, err = _cli(["--merge", a, b, "--out", b], capfd)
    assert rc == 2 and "must be a new folder" in err
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("x")
    rc, _, err = _cli(["--merge", a, b, "--out", tmp_path / "busy"], capfd)
    assert rc == 2 and "not empty" in err
    rc, _, err = _cli(["--merge", a, b, "--out", tmp_path / "k"], capfd)   # another ingest's folder
    assert rc == 2 and "holds another ingest" in err
    assert not (tmp_path / "o").exists()


def test_merged_store_merges_again_and_splits_are_not_carried(tmp_path, capfd):
    src1 = _png_tree(tmp_path / "y2023", {"c0/a.png": 1, "c1/b.png": 2})
    src2 = _png_tree(tmp_path / "y2024", {"c0/c.png": 3, "c1/d.png": 4, "c1/e.png": 5})
    src3 = _png_tree(tmp_path / "y2025", {"c0/f.png": 6, "c1/b_again.png": 2})   # b_again == y2023's b.png
    a, b, c = (_ingest(s, tmp_path / f"s{k}") for k, s in enumerate((src1, src2, src3)))
    from radpretrain.data.splits import write_splits

    write_splits(a, folds=2, val=0.0, test=0.5)
    ab = tmp_path / "ab"
    rc, stdout, _ = _cli(["--merge", a, b, "--out", ab], capfd)
    assert rc == 0 and f"run 'radpretrain split {ab}'" in stdout and not (ab / "splits.parquet").exists()
    abc = tmp_path / "abc"
    rc, stdout, _ = _cli(["--merge", ab, c, "--out", abc], capfd)
    assert rc == 0 and "radpretrain split" not in stdout
    s = Store(abc)
    df = s.manifest
    assert len(df) == 7 and df["status"].tolist() == ["ingested"] * 6 + ["duplicate"]
    assert df["label"].tolist() == ["c0", "c1", "c0", "c1", "c1", "c0", "c1"]
    # the merged store's shard names are kept (no nesting), the new store's get its own folder
    ab_shards = set(pd.read_parquet(ab / "manifest.parquet")["shard"])
    assert ab_shards <= set(df["shard"]) and len(set(s.images["shard"])) == 3
    for i, row in s.images.iterrows():
        src = next(Store(x) for x in (a, b, c) if row["image_id"] in set(Store(x).images["image_id"]))
        assert np.array_equal(s.read(i), src.read(src.index_of(row["image_id"])))
    qc = json.loads((abc / "qc_summary.json").read_text())
    assert qc["label_from_folder"] and qc["n_folder_labels"] == 2 and qc["inputs"] == 7


def test_help_describes_merging_stores(capsys):
    with pytest.raises(SystemExit):
        cli.main(["ingest", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--merge STORE" in text and "same de-id key" in text and "partitions of one ingest" in text
