"""End-to-end ingest: synthetic PACS archive (PHI, truth), kill/resume, labels, ImageFolder, NIfTI, NPZ."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from radpretrain import cli
from radpretrain.data.ingest import ingest
from radpretrain.data.store import MANIFEST_COLUMNS, Store
from radpretrain.errors import UserError

pytestmark = pytest.mark.usefixtures("deid_key")


def _ingest_cli(argv, capfd):
    rc = cli.main(["ingest", *map(str, argv)])
    out, err = capfd.readouterr()
    return rc, out, err


@pytest.fixture(scope="module")
def synth_store(synth_archive, tmp_path_factory):
    """The archive ingested once with default options (no paths kept), plus the console output."""
    from _pytest.monkeypatch import MonkeyPatch

    from .conftest import TEST_KEY

    mp = MonkeyPatch()
    mp.setenv("RADPRETRAIN_DEID_KEY", TEST_KEY)
    out = tmp_path_factory.mktemp("ds") / "store"
    log = tmp_path_factory.mktemp("log") / "console.txt"
    try:
        with open(log, "w") as f:  # a real process: its own stdout/stderr and workers
            proc = subprocess.run([sys.executable, "-m", "radpretrain.cli", "ingest", str(synth_archive), "--out", str(out),
                                   "--labels", str(synth_archive / "labels.csv"), "--workers", "2", "--chunk-size", "4"],
                                  stdout=f, stderr=subprocess.STDOUT, env={**os.environ, "RADPRETRAIN_LOGLEVEL": "DEBUG"})
    finally:
        mp.undo()
    assert proc.returncode == 0, log.read_text()
    return out, log


def test_synth_archive_no_phi_anywhere(synth_archive, synth_store):
    out, log = synth_store
    phi = json.loads((synth_archive / ".synth/planted_phi.json").read_text())
    strings = phi if isinstance(phi, list) else [s for v in phi.values() for s in (v if isinstance(v, list) else [v])]
    strings = sorted({str(s) for s in strings if len(str(s)) >= 4})
    assert len(strings) > 20
    blobs = [p.read_bytes() for p in Path(out).rglob("*") if p.is_file()]
    blobs.append(log.read_bytes())
    names = "\n".join(str(p.relative_to(out)) for p in Path(out).rglob("*")).encode()
    blobs.append(names)
    assert len(blobs) > 5
    hits = [s for s in strings for b in blobs if s.encode() in b or s.upper().encode() in b]
    assert hits == []
    assert b"ingest:" in log.read_bytes()  # the summary was printed into the captured console


def test_synth_counts_reconcile_with_truth(synth_archive, synth_store):
    out, _ = synth_store
    truth = pd.read_csv(synth_archive / ".synth/truth.csv")
    s = Store(out)
    df = s.manifest
    qc = json.loads((out / "qc_summary.json").read_text())
    assert qc["inputs"] == len(df) == qc["ingested"] + qc["duplicates"] + sum(qc["quarantined"].values())
    assert len(df) == len(truth)
    for status, key in (("ingested", "ingested"), ("duplicate", "duplicates")):
        assert qc[key] == (truth["expected_status"] == status).sum() == (df["status"] == status).sum()
    assert sum(qc["quarantined"].values()) == (truth["expected_status"] == "quarantined").sum()
    assert qc["sidecar_skipped"] >= 1  # labels.csv
    assert set(qc) >= {"inputs", "ingested", "duplicates", "quarantined", "sidecar_skipped", "by_modality", "by_body_part"}
    assert list(df.columns[: len(MANIFEST_COLUMNS)]) == MANIFEST_COLUMNS
    meta = json.loads((out / "store.json").read_text())
    assert meta["dtype"] == "uint8" and meta["max_size"] == 512 and meta["patient_id_source"] in ("dicom", "per-file")
    ing = s.images
    assert (ing[["height", "width"]].max(axis=1) <= 512).all()
    img = s.read(0)
    assert img.shape == (ing.loc[0, "height"], ing.loc[0, "width"]) and img.std() > 5
    assert df["image_id"].is_unique and df["image_id"].str.fullmatch(r"[0-9a-f]{16}").all()
    assert set(df.loc[df.status == "ingested", "body_part"]) <= set(pd.Series(truth["body_part"]).dropna()) | {"other", "unknown"}


def test_keep_paths_statuses_and_labels_join(synth_archive, tmp_path, capfd):
    out = tmp_path / "kp"
    rc, stdout, _ = _ingest_cli([synth_archive, "--out", out, "--labels", synth_archive / "labels.csv",
                                 "--keep-paths", "--workers", "1", "--patient-id", r"^exports/(PHI\d+)_"], capfd)
    assert rc == 0
    assert json.loads((out / "store.json").read_text())["patient_id_source"] == "regex"
    df = pd.read_parquet(out / "manifest.parquet").set_index("source")
    truth = pd.read_csv(synth_archive / ".synth/truth.csv").set_index("path")
    assert sorted(df.index) == sorted(truth.index)
    assert (df.loc[truth.index, "status"] == truth["expected_status"]).all()
    labels = pd.read_csv(synth_archive / "labels.csv").set_index("path")["lesion"]
    ing = df[df.status == "ingested"]
    joined = ing.loc[ing.index.intersection(labels.index), "lesion"]
    assert len(joined) == len(ing) and (joined.astype(int) == labels.loc[joined.index]).all()
    assert str(df["lesion"].dtype) == "Int64"
    # an export named after its PatientID joins that patient's DICOM images (same pseudonym)
    exports = ing[ing.source_format != "dicom"]
    assert len(exports) >= 1 and exports["patient_id"].isin(ing.loc[ing.source_format == "dicom", "patient_id"]).all()
    # exact duplicate: the copy later in sorted order is the one marked duplicate
    dup = df[df.status == "duplicate"]
    for src, row in dup.iterrows():
        kept = df[(df.image_id == row["reason"].split(":")[1])]
        assert len(kept) == 1 and kept.index[0] < src and kept["content_hash"].iloc[0] == row["content_hash"]


def test_kill_and_resume_gives_the_same_manifest(synth_archive, synth_store, tmp_path):
    ref, _ = synth_store
    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "radpretrain.cli", "ingest", str(synth_archive), "--out", str(out),
           "--labels", str(synth_archive / "labels.csv"), "--workers", "2", "--chunk-size", "4"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    chunks = out / ".ingest" / "chunks"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if chunks.is_dir() and len(list(chunks.glob("*.parquet"))) >= 2:
            break
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)   # the whole job, workers included
    proc.wait()
    assert not (out / "manifest.parquet").exists(), "the run finished before it could be killed"
    n_done = len(list(chunks.glob("*.parquet")))
    assert n_done < 12
    rc = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL).returncode
    assert rc == 0
    a = pd.read_parquet(ref / "manifest.parquet")
    b = pd.read_parquet(out / "manifest.parquet")
    pd.testing.assert_frame_equal(a, b)
    sa, sb = Store(ref), Store(out)
    for i in range(len(sa)):
        np.testing.assert_array_equal(sa.read(i), sb.read(i))
    assert not list(out.rglob("*.tmp"))


def _png_tree(root, files):
    for rel, value in files.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        rng = np.random.default_rng(value)
        Image.fromarray(rng.integers(0, 256, size=(48, 40), dtype=np.uint8)).save(p)


def test_image_folder_and_patient_regex(tmp_path, capfd):
    src = tmp_path / "knees"
    _png_tree(src, {"train/0/1234567L.jpg": 1, "train/0/1234567R.jpg": 2, "train/2/7654321L.jpg": 3,
                    "val/4/5555555R.jpg": 4, "val/0/5555555L.jpg": 5})
    (src / "README.md").write_text("notes")
    out = tmp_path / "ds"
    rc, stdout, _ = _ingest_cli([src, "--out", out, "--patient-id", r"([0-9]{7})[LR]", "--workers", "2",
                                 "--chunk-size", "2"], capfd)
    assert rc == 0
    df = pd.read_parquet(out / "manifest.parquet")
    assert len(df) == 5 and (df.status == "ingested").all()
    assert sorted(df["label"].tolist()) == [0, 0, 0, 2, 4] and str(df["label"].dtype) == "Int64"
    assert df["patient_id"].nunique() == 3
    assert df.groupby("patient_id")["label"].size().sort_values().tolist() == [1, 2, 2]
    meta = json.loads((out / "store.json").read_text())
    assert meta["patient_id_source"] == "regex"
    assert json.loads((out / "qc_summary.json").read_text())["sidecar_skipped"] == 1
    assert "1234567" not in (out / "manifest.parquet").read_bytes().decode("latin1")
    # without the regex each file is its own patient, and store.json says so
    out2 = tmp_path / "ds2"
    rc, stdout, _ = _ingest_cli([src, "--out", out2, "--workers", "1", "--label-from-folder", "no"], capfd)
    df2 = pd.read_parquet(out2 / "manifest.parquet")
    assert df2["patient_id"].nunique() == 5 and "label" not in df2.columns
    assert json.loads((out2 / "store.json").read_text())["patient_id_source"] == "per-file"
    assert "warning" in stdout


def test_duplicates_partitions_merge_equal_single_run(tmp_path, capfd):
    src = tmp_path / "flat"
    _png_tree(src, {f"img{k:02d}.png": k % 5 for k in range(9)})   # img05..img08 copy img00..img03
    Image.fromarray(np.full((40, 40), 7, np.uint8)).save(src / "img09.png")     # blank
    Image.fromarray(np.zeros((10, 40), np.uint8) + np.arange(40, dtype=np.uint8)).save(src / "img10.png")  # too small
    (src / "img11.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    full = tmp_path / "full"
    assert _ingest_cli([src, "--out", full, "--workers", "1", "--chunk-size", "3"], capfd)[0] == 0
    df = pd.read_parquet(full / "manifest.parquet")
    assert df["status"].tolist() == ["ingested"] * 5 + ["duplicate"] * 4 + ["quarantined"] * 3
    assert df["reason"].tolist()[-3:] == ["blank", "too_small", "decode_error"]
    parts = []
    for i in (1, 2):
        p = tmp_path / f"part{i}"
        assert _ingest_cli([src, "--out", p, "--workers", "1", "--chunk-size", "3", "--partition", f"{i}/2"], capfd)[0] == 0
        parts.append(p)
    merged = tmp_path / "merged"
    assert _ingest_cli(["--merge", *parts, "--out", merged], capfd)[0] == 0
    pd.testing.assert_frame_equal(df, pd.read_parquet(merged / "manifest.parquet"))
    assert len(Store(merged)) == 5 and Store(merged).read(4).shape == (48, 40)
    # a different option on the same --out is refused, not mixed in
    with pytest.raises(UserError, match="other files, options"):
        ingest([src], full, max_size=64, workers=1, chunk_size=3, progress=False)


def test_nifti_and_npz_inputs(tmp_path, capfd):
    import nibabel as nib

    src = tmp_path / "vols"
    src.mkdir()
    for seed, name in enumerate(("sub01_a.nii.gz", "sub01_b.nii.gz", "sub02_a.nii")):
        vol = (np.random.default_rng(seed).normal(300, 50, size=(40, 36, 12))).astype(np.int16)
        vol[:5] = -1000
        nib.save(nib.Nifti1Image(vol, np.eye(4)), src / name)
    np.savez(src / "organmnist.npz", train_images=np.random.default_rng(1).integers(0, 255, (4, 28, 28), dtype=np.uint8),
             train_labels=np.array([[0], [1], [2], [1]]), test_images=np.random.default_rng(2).integers(0, 255, (2, 28, 28), dtype=np.uint8),
             test_labels=np.array([[3], [0]]))
    out = tmp_path / "ds"
    rc, _, _ = _ingest_cli([src, "--out", out, "--patient-id", r"(sub\d+)_", "--nifti-slices", "4",
                            "--nifti-max-per-patient", "6", "--min-size", "8", "--workers", "1"], capfd)
    assert rc == 0
    df = pd.read_parquet(out / "manifest.parquet")
    nii = df[df.source_format == "nifti"]
    assert (nii.status == "ingested").sum() == 4 + 2 + 4       # sub01 capped at 6 slices
    assert (nii.modality == "CT").all()
    assert nii[nii.status == "ingested"]["patient_id"].nunique() == 2
    npz = df[df.source_format == "npz"]
    assert len(npz) == 6 and (npz.status == "ingested").all()
    assert sorted(npz["label"].astype(int).tolist()) == [0, 0, 1, 1, 2, 3]
    assert Store(out).images.loc[lambda d: d.source_format == "npz", ["height", "width"]].eq(28).all().all()


def test_npz_labels_beside_folder_labels(tmp_path, capfd):
    """An NPZ inside an ImageFolder tree: its integer labels and the folder names share one column."""
    src = tmp_path / "tree"
    for cls in ("a", "b"):
        (src / cls).mkdir(parents=True)
        for i in range(2):
            rng = np.random.default_rng(10 * i + (cls == "b"))
            Image.fromarray(rng.integers(0, 255, (40, 40), dtype=np.uint8)).save(src / cls / f"{i}.png")
    np.savez(src / "a" / "mnist.npz", train_images=np.random.default_rng(0).integers(0, 255, (3, 28, 28), dtype=np.uint8),
             train_labels=np.array([[0], [1], [1]]))
    out = tmp_path / "ds"
    rc, _, _ = _ingest_cli([src, "--out", out, "--label-from-folder", "yes", "--min-size", "8", "--workers", "1"], capfd)
    assert rc == 0
    df = pd.read_parquet(out / "manifest.parquet")
    assert len(df) == 7 and (df.status == "ingested").all()
    assert sorted(df.loc[df.source_format == "npz", "label"]) == ["0", "1", "1"]
    assert sorted(df.loc[df.source_format != "npz", "label"]) == ["a", "a", "b", "b"]


def test_user_errors_are_clear(tmp_path, monkeypatch):
    src = tmp_path / "src"
    _png_tree(src, {"a.png": 1})
    bad = tmp_path / "labels.csv"
    bad.write_text("file,lesion\na.png,1\n")
    with pytest.raises(UserError, match="'path' column"):
        ingest([src], tmp_path / "o1", labels=bad, workers=1, progress=False)
    bad.write_text("path,PatientName,lesion\na.png,DOE^JANE,1\n")
    with pytest.raises(UserError, match="look identifying") as e:
        ingest([src], tmp_path / "o1", labels=bad, workers=1, progress=False)
    assert "DOE" not in str(e.value)
    with pytest.raises(UserError, match="no such file"):
        ingest([tmp_path / "nope"], tmp_path / "o2", workers=1, progress=False)
    with pytest.raises(UserError, match="i/N"):
        ingest([src], tmp_path / "o3", partition="3/2", workers=1, progress=False)
    out = tmp_path / "o4"
    monkeypatch.delenv("RADPRETRAIN_DEID_KEY")
    monkeypatch.setenv("RADPRETRAIN_DEID_KEY_FILE", str(out / "deid.key"))
    out.mkdir()
    (out / "deid.key").write_text("ab" * 32)
    with pytest.raises(UserError, match="key file must not be inside the dataset"):
        ingest([src], out, workers=1, progress=False)


PYDICOM_FILES = {  # name -> expected status / reason
    "RG3_UNCI.dcm": ("ingested", ""), "MR_small_jp2klossless.dcm": ("duplicate", "MR_small_RLE.dcm"), "CT_small.dcm": ("ingested", ""),
    "MR_small_RLE.dcm": ("ingested", ""), "SC_rgb_rle.dcm": ("ingested", ""), "JPEG2000.dcm": ("ingested", ""),
    "rtplan.dcm": ("quarantined", "no_pixel_data"), "MR_truncated.dcm": ("quarantined", "decode_error"),
    "JPEG-lossy.dcm": ("quarantined", "unsupported_transfer_syntax"), "test-SR.dcm": ("quarantined", "no_pixel_data"),
    "rtplan.dump": ("quarantined", "not_dicom_or_image"), "test1.json": (None, None),
}


def test_pydicom_data_files_ingest(tmp_path, capfd):
    import shutil

    import pydicom
    from pydicom.data import get_testdata_file

    src = tmp_path / "pd"
    src.mkdir()
    for name in PYDICOM_FILES:
        shutil.copy(get_testdata_file(name), src / name)
    out = tmp_path / "ds"
    rc, _, _ = _ingest_cli([src, "--out", out, "--keep-paths", "--workers", "2", "--chunk-size", "3"], capfd)
    assert rc == 0
    df = pd.read_parquet(out / "manifest.parquet").set_index("source")
    expected = {k: v for k, v in PYDICOM_FILES.items() if v[0]}
    assert sorted(df.index) == sorted(expected)
    for name, (status, reason) in expected.items():
        if status == "duplicate":  # same decoded pixels in another transfer syntax: the first by path is kept
            reason = "duplicate_of:" + df.loc[reason, "image_id"]
        assert (df.loc[name, "status"], df.loc[name, "reason"]) == (status, reason), name
    qc = json.loads((out / "qc_summary.json").read_text())
    assert qc["sidecar_skipped"] == 1 and qc["quarantined"]["no_pixel_data"] == 2
    # the MONOCHROME1 CR is stored bone-bright: it matches the inverted raw pixels, downsampled
    s = Store(out)
    i = s.index_of(df.loc["RG3_UNCI.dcm", "image_id"])
    stored = s.read(i).astype(np.float64)
    raw = pydicom.dcmread(src / "RG3_UNCI.dcm").pixel_array.astype(np.float32)
    h, w = stored.shape
    inverted = np.asarray(Image.fromarray(raw.max() - raw).resize((w, h), Image.Resampling.BOX))
    assert max(h, w) == 512 and df.loc["RG3_UNCI.dcm", "orig_height"] == raw.shape[0]
    assert np.corrcoef(stored.ravel(), inverted.ravel())[0, 1] > 0.9


def test_label_from_folder_auto_rule():
    from radpretrain.data.ingest import decide_label_from_folder as rule

    assert rule("auto", ["train/0/a.jpg", "val/4/b.jpg", "README.md"], False)
    assert rule("auto", ["NORMAL/a.jpeg", "PNEUMONIA/b.jpeg"], False)
    assert not rule("auto", ["NORMAL/a.jpeg", "PNEUMONIA/b.jpeg"], True)           # labels CSV given
    assert not rule("auto", ["a.png", "b.png"], False)                            # no class folders
    assert not rule("auto", ["x/a.png", "x/b.png"], False)                        # one folder name
    assert not rule("auto", ["x/a.png", "y/IM0001"], False)                       # not only images
    assert not rule("auto", ["PHI000123_SMITH/a.png", "PHI000456_DOE/b.png"], False)   # id-like folders
    assert not rule("auto", ["DOE^JANE/a.png", "ROE^RICHARD/b.png"], False)
    assert rule("yes", ["DOE^JANE/a.png"], False) and not rule("no", ["0/a.png", "1/b.png"], False)


def test_a_crashing_decoder_only_quarantines_its_file(tmp_path, capfd, monkeypatch, caplog):
    from radpretrain.data import readers

    src = tmp_path / "src"
    _png_tree(src, {f"img{k}.png": k for k in range(6)})
    real = readers.read_pil
    img3 = np.random.default_rng(3).integers(0, 256, size=(48, 40), dtype=np.uint8)  # _png_tree's img3.png

    def crashing(src, kind=None):  # a decoder that kills its process on one file (like a segfault)
        arr = real(src, kind)
        if np.array_equal(arr, img3):
            os._exit(139)
        return arr

    monkeypatch.setattr(readers, "read_pil", crashing)   # inherited by the forked workers
    out = tmp_path / "ds"
    rc, _, err = _ingest_cli([src, "--out", out, "--workers", "2", "--chunk-size", "2"], capfd)
    assert rc == 0 and "worker process died" in caplog.text and "img3" not in caplog.text + err
    df = pd.read_parquet(out / "manifest.parquet")
    assert df["status"].tolist() == ["ingested"] * 3 + ["quarantined"] + ["ingested"] * 2
    assert df["reason"].iloc[3] == "worker_crash"
    assert len(Store(out)) == 5 and Store(out).read(4).shape == (48, 40)
    assert not list(out.rglob("*.tmp"))  # the dead worker's temporaries are removed


def _radiograph_dicom(path, arr, transfer_syntax=None, **extra):
    """A 12-bit DX file; ``transfer_syntax``: compress the same pixels (e.g. RLE Lossless)."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    ds = Dataset()
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"
    ds.SOPInstanceUID, ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid(), generate_uid()
    ds.PatientID, ds.Modality = "PAT-1", "DX"
    ds.Rows, ds.Columns = arr.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    for k, v in extra.items():
        setattr(ds, k, v)
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID, ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPClassUID, ds.SOPInstanceUID
    if transfer_syntax is None:
        ds.PixelData = arr.astype(np.uint16).tobytes()
    else:
        ds.compress(transfer_syntax, arr.astype(np.uint16))
    ds.save_as(path, enforce_file_format=True)
    return path


def test_large_images_stored_as_load_stored_and_duplicates_are_equal_stored_pixels(tmp_path):
    """Large radiographs are shrunk raw-first (block means, then the window): the store holds exactly
    readers.load_stored's pixels.  content_hash is the hash of those stored pixels, so the same image in
    another encoding is a duplicate, a one-pixel change that shows in the stored image is not, and one that
    vanishes in it (a background pixel, clipped by the window, one raw unit brighter) is."""
    from pydicom.uid import RLELossless

    from radpretrain.data import readers as R

    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:1300, 0:1000]
    raw = 1200 + 900 * (((yy - 750) / 450.0) ** 2 + ((xx - 500) / 350.0) ** 2 < 1) + rng.normal(0, 30, yy.shape)
    raw[:200] = 100  # a flat background band: the window's lower end, clipped to black
    raw = raw.clip(0, 4095).astype(np.uint16)
    shows, vanishes = raw.copy(), raw.copy()
    shows[700, 500] = 4095
    vanishes[100, 333] += 1
    src = tmp_path / "src"
    src.mkdir()
    files = {"a.dcm": _radiograph_dicom(src / "a.dcm", raw), "b_rle.dcm": _radiograph_dicom(src / "b_rle.dcm", raw, RLELossless),
             "c_pixel.dcm": _radiograph_dicom(src / "c_pixel.dcm", shows),
             "d_invisible.dcm": _radiograph_dicom(src / "d_invisible.dcm", vanishes),
             "e_window.dcm": _radiograph_dicom(src / "e_window.dcm", raw, WindowCenter=1600, WindowWidth=2000)}
    stored = {name: R.load_stored(p, 256)[0] for name, p in files.items()}
    assert np.array_equal(stored["a.dcm"], stored["d_invisible.dcm"])  # the premise of the last case
    assert not np.array_equal(stored["a.dcm"], stored["c_pixel.dcm"])
    out = tmp_path / "ds"
    ingest([src], out, workers=1, progress=False, keep_paths=True, max_size=256)
    s = Store(out)
    df = s.manifest.set_index("source")
    a_id = df.loc["a.dcm", "image_id"]
    assert df.loc["b_rle.dcm", ["status", "reason"]].tolist() == ["duplicate", f"duplicate_of:{a_id}"]
    assert df.loc["d_invisible.dcm", ["status", "reason"]].tolist() == ["duplicate", f"duplicate_of:{a_id}"]
    assert df.loc["c_pixel.dcm", "status"] == "ingested" and df.loc["e_window.dcm", "status"] == "ingested"
    for i, row in s.images.iterrows():
        img = s.read(i)
        assert np.array_equal(img, stored[row["source"]]) and img.shape == (256, 197)
        assert row["content_hash"] == R.content_hash(img)  # checkable from the store itself
    assert (df.loc[["a.dcm"], ["orig_height", "orig_width"]].to_numpy() == [[1300, 1000]]).all()
    meta = json.loads((out / "store.json").read_text())
    assert meta["content_hash"] == "xxh3-128-of-stored-pixels" and meta["resize"]


def test_shard_writer_gathers_images_and_copies_what_the_caller_may_change(tmp_path):
    from radpretrain.data.store import ShardWriter, commit_file

    img = np.asarray(Image.fromarray(np.arange(120, dtype=np.uint8).reshape(10, 12)))  # over a bytes object
    assert not img.flags.writeable
    w = ShardWriter(tmp_path / "s.bin")
    w.BUFFER = 300  # several writes
    buf, want = np.zeros((5, 7), np.uint8), []
    for k in range(9):
        buf[:] = k  # the caller reuses its array: what was appended must not change
        assert w.append(buf) == sum(a.nbytes for a in want)
        want.append(buf.copy())
        w.append(img)
        want.append(img)
    w.close(commit=False)  # written, not yet committed
    assert not (tmp_path / "s.bin").exists() and w.tmp.is_file()
    commit_file(w.tmp, w.path)
    got = np.fromfile(tmp_path / "s.bin", np.uint8)
    assert np.array_equal(got, np.concatenate([a.reshape(-1) for a in want])) and not w.tmp.exists()
    with pytest.raises(ValueError):
        ShardWriter(tmp_path / "t.bin").append(np.zeros((2, 2), np.uint16))


def test_path_helpers_match_their_definitions():
    from radpretrain.data import ingest as G
    from radpretrain.data import vocab as V

    rng = np.random.default_rng(0)
    parts = ["a", "b", ".", "/", "..", "png", "KNEE", "lat", "x.nii", "AP", "9", ".gz"]
    for _ in range(2000):
        rel = "".join(rng.choice(parts, size=rng.integers(0, 7)))
        assert G._ext(rel) == os.path.splitext(rel)[1].lower()
        view = V.normalise_view(None, rel)
        assert G._path_facts(rel) == (V.body_part_from_text(rel), None if view == "unknown" else view)


def test_a_pending_chunk_is_done_only_once_committed(tmp_path, monkeypatch):
    """Pool workers leave shard and chunk manifest under temporary names; the parent commits them (shard synced
    first, manifest last); a chunk left pending is redone by the next run."""
    from radpretrain.data import ingest as G

    src = tmp_path / "src"
    _png_tree(src, {f"c{k % 2}/img{k}.png": k for k in range(6)})
    ref = tmp_path / "ref"
    ingest([src], ref, workers=1, progress=False, chunk_size=4)
    seen = {}

    def run_pending(jobs, *a, **kw):  # what a pool worker does, without the parent's commit
        for job in jobs:
            seen[job.k] = G.process_chunk(job, commit=False)
        return {}

    real_run_chunks = G._run_chunks
    monkeypatch.setattr(G, "_run_chunks", run_pending)
    out = tmp_path / "ds"
    with pytest.raises(UserError, match="chunk 0 is missing"):
        ingest([src], out, workers=1, progress=False, chunk_size=4)
    assert not list((out / ".ingest" / "chunks").glob("*.parquet")) and not list((out / "shards").glob("*.bin"))
    G.commit_chunk(seen[0]["pending"])  # chunk 0 committed, chunk 1 left pending (as if the parent died)
    assert (out / "shards" / "chunk-000000.bin").is_file() and G._chunk_paths(out, 0)[1].is_file()
    monkeypatch.setattr(G, "_run_chunks", real_run_chunks)
    ingest([src], out, workers=2, progress=False, chunk_size=4)  # resumes: chunk 1 redone, temporaries removed
    pd.testing.assert_frame_equal(pd.read_parquet(ref / "manifest.parquet"), pd.read_parquet(out / "manifest.parquet"))
    assert not list(out.rglob("*.tmp"))
    for a, b in zip(sorted((ref / "shards").iterdir()), sorted((out / "shards").iterdir())):
        assert a.read_bytes() == b.read_bytes()


def test_linked_folders_are_scanned_once(tmp_path, caplog):
    """An archive assembled from folder links is ingested whole; a loop or a second link adds nothing."""
    from radpretrain.data.ingest import scan_sources

    elsewhere = tmp_path / "elsewhere" / "knee"
    elsewhere.mkdir(parents=True)
    for i in range(3):
        Image.fromarray(np.random.default_rng(i).integers(0, 256, (40, 48), dtype=np.uint8)).save(elsewhere / f"{i}.png")
    src = tmp_path / "archive"
    (src / "hand").mkdir(parents=True)
    Image.fromarray(np.random.default_rng(9).integers(0, 256, (40, 48), dtype=np.uint8)).save(src / "hand" / "h.png")
    os.symlink(elsewhere, src / "knee")                 # the linked folder: must be scanned
    os.symlink(elsewhere, src / "knee_again")           # a second link to it: not scanned twice
    os.symlink(src, src / "hand" / "loop")              # a loop back to the root: not followed
    with caplog.at_level("WARNING", logger="radpretrain.data.ingest"):
        files, _ = scan_sources([src])
    assert [rel for _, rel in files] == ["hand/h.png", "knee/0.png", "knee/1.png", "knee/2.png"]
    assert "2 linked folder(s) not scanned" in caplog.text and str(tmp_path) not in caplog.text  # no paths
    summary = ingest([src], tmp_path / "ds", workers=1, progress=False)
    assert summary["inputs"] == 4 and summary["ingested"] == 4


def test_a_chunk_makes_image_rows_after_decoding_them_all_in_order(tmp_path, monkeypatch):
    """A chunk decodes and stores its PNG/JPEG files first and makes their rows after the loop: the
    manifest and shard equal the file-by-file path's (the isolated path), row for row, with DICOM files,
    a sidecar and every kind of failed image between them, and each failure keeps its own facts."""
    import functools

    from radpretrain.data import ingest as G
    from radpretrain.data import readers

    src = tmp_path / "src" / "knee_ap"
    _png_tree(src, {"a.png": 1, "f.png": 2, "i.jpg": 3})
    Image.fromarray(np.full((48, 40), 90, np.uint8)).save(src / "c_blank.png")
    Image.fromarray(np.zeros((10, 12), np.uint8) + np.arange(12, dtype=np.uint8)).save(src / "d_small.png")
    Image.fromarray(np.random.default_rng(5).integers(0, 256, (40, 50, 3), dtype=np.uint8)).save(src / "e_rgb.png")
    jpeg = (src / "i.jpg").read_bytes()
    (src / "b_cut.jpg").write_bytes(jpeg[: len(jpeg) // 3])  # truncated
    (src / "h_raises.png").write_bytes((src / "f.png").read_bytes()[:-1] + b"!")  # the decoder below raises on it
    _radiograph_dicom(src / "g.dcm", np.random.default_rng(6).integers(0, 4095, (64, 48)).astype(np.uint16))
    (src / "notes.txt").write_text("a sidecar")
    real = readers.read_pil

    def read_pil(f, kind=None):
        data = f.getvalue() if hasattr(f, "getvalue") else Path(f).read_bytes()
        if data.endswith(b"!"):
            raise RuntimeError("an unexpected decoder error")
        return real(f, kind)

    monkeypatch.setattr(readers, "read_pil", read_pil)
    runs = {}
    for name in ("batched", "file_by_file"):
        if name == "file_by_file":
            monkeypatch.setattr(G, "process_chunk", functools.partial(G.process_chunk, isolate=True))
        out = tmp_path / name
        ingest([tmp_path / "src"], out, workers=1, progress=False, keep_paths=True, chunk_size=100)
        runs[name] = (pd.read_parquet(out / "manifest.parquet"), (out / "shards" / "chunk-000000.bin").read_bytes())
    (df, shard), (df_ref, shard_ref) = runs["batched"], runs["file_by_file"]
    pd.testing.assert_frame_equal(df, df_ref)
    assert shard == shard_ref
    got = df.set_index("source")[["status", "reason", "modality", "body_part", "view", "offset"]]
    assert got.loc["knee_ap/b_cut.jpg", ["status", "reason", "modality"]].tolist() == ["quarantined", "decode_error", "OT"]
    assert got.loc["knee_ap/h_raises.png", ["status", "reason", "modality"]].tolist() == ["quarantined", "decode_error", "OT"]
    assert got.loc["knee_ap/c_blank.png", ["status", "reason", "modality", "body_part"]].tolist() == ["quarantined", "blank", "XR", "knee"]
    assert got.loc["knee_ap/d_small.png", ["status", "reason"]].tolist() == ["quarantined", "too_small"]
    assert got.loc["knee_ap/g.dcm", ["status", "modality"]].tolist() == ["ingested", "DX"]
    ok = got[got["status"] == "ingested"]
    assert ok.index.tolist() == ["knee_ap/a.png", "knee_ap/e_rgb.png", "knee_ap/f.png", "knee_ap/g.dcm", "knee_ap/i.jpg"]
    assert (ok.loc[ok.index != "knee_ap/g.dcm", ["modality", "body_part", "view"]] == ["XR", "knee", "AP"]).all().all()
    assert ok["offset"].tolist() == np.cumsum([0, 48 * 40, 40 * 50, 48 * 40, 64 * 48]).tolist()  # stored in file order
    assert len(df) == 9  # every input but the sidecar has a row
