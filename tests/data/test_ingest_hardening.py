"""Ingest against hostile or unlucky inputs: wrong DICOM pixel lengths, FIFOs and sockets, non-UTF-8 file
names, inconsistent labels CSVs, a full disk."""

import errno
import json
import os
import signal
import socket
import subprocess
import sys
import threading

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from radpretrain import cli
from radpretrain.data import store as S
from radpretrain.data.ingest import ingest
from radpretrain.errors import UserError

from .test_readers import dicom_with_rows, make_dicom

pytestmark = pytest.mark.usefixtures("deid_key")


def _pngs(root, names):
    for k, rel in enumerate(names):
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.random.default_rng(k).integers(0, 256, (40, 48), dtype=np.uint8)).save(p)


def _run(argv, capfd):
    rc = cli.main(list(map(str, argv)))
    out, err = capfd.readouterr()
    return rc, out, err


# ----------------------------------------------------------------------------- DICOM pixel length

def test_ingest_quarantines_pixel_length(tmp_path, capfd):
    src = tmp_path / "src"
    src.mkdir()
    arr = np.random.default_rng(2).integers(0, 4096, (64, 80)).astype(np.uint16)
    dicom_with_rows(src / "halved.dcm", arr, 32)
    make_dicom(arr[::-1].copy(), src / "fine.dcm")
    out = tmp_path / "ds"
    rc, stdout, _ = _run(["ingest", src, "--out", out, "--workers", "1", "--keep-paths"], capfd)
    assert rc == 0 and "quarantined pixel_length: 1" in stdout
    df = pd.read_parquet(out / "manifest.parquet").set_index("source")
    assert df.loc["halved.dcm", ["status", "reason", "shard"]].tolist() == ["quarantined", "pixel_length", ""]
    assert df.loc["fine.dcm", "status"] == "ingested"


# ----------------------------------------------------------------------------- only regular files

def test_fifos_and_sockets_are_skipped_with_a_count(tmp_path):
    """A FIFO named like a DICOM file used to block ingest forever; now it and a socket are skipped, counted,
    without their paths."""
    src = tmp_path / "PHI_DOE_JOHN"
    _pngs(src, ["a.png", "sub/b.png"])
    os.mkfifo(src / "x.dcm")
    os.mkfifo(src / "sub" / "y.png")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(str(src / "s.dcm"))
        out = tmp_path / "ds"
        proc = subprocess.Popen([sys.executable, "-m", "radpretrain.cli", "ingest", str(src), "--out", str(out),
                                 "--workers", "2"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                start_new_session=True, env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
        try:
            stdout, stderr = proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # the whole job, its blocked workers included
            proc.communicate()
            pytest.fail("ingest hung on a FIFO")
    finally:
        sock.close()
    assert proc.returncode == 0, stderr
    console = stdout + stderr
    assert "3 file(s) skipped: not regular files" in console and "PHI_DOE_JOHN" not in console
    qc = json.loads((out / "qc_summary.json").read_text())
    assert qc["inputs"] == qc["ingested"] == 2 and any("3 file(s) skipped" in w for w in qc["warnings"])


def test_a_file_replaced_by_a_fifo_after_the_scan_is_unreadable_not_a_hang(tmp_path):
    from radpretrain.data.ingest import _open_and_sniff

    fifo = tmp_path / "x.dcm"
    os.mkfifo(fifo)
    unblock = threading.Timer(10, lambda: open(fifo, "wb").close())  # ends a blocked open (the old code's hang)
    unblock.daemon = True
    unblock.start()
    try:
        assert _open_and_sniff(str(fifo)) == ("unreadable", None)
    finally:
        unblock.cancel()


# ----------------------------------------------------------------------------- non-UTF-8 file names

def test_non_utf8_names_are_stored_escaped_with_keep_paths(tmp_path):
    src = tmp_path / "src"
    _pngs(src, ["ok/a.png", "ok/b.png"])
    raw = os.fsencode(src)
    os.mkdir(raw + b"/cl\xe9")
    for seed, name in enumerate((b"/cl\xe9/caf\xe9.png", b"/ok/na\xefve.png")):
        Image.fromarray(np.random.default_rng(100 + seed).integers(0, 256, (40, 48), dtype=np.uint8)).save(
            os.fsdecode(raw + name), format="PNG")
    out = tmp_path / "ds"
    for _ in range(2):  # a rerun of the finished store gives the same store
        summary = ingest([src], out, workers=1, progress=False, keep_paths=True, label_from_folder="yes")
        assert summary["ingested"] == 4
        df = pd.read_parquet(out / "manifest.parquet")
        assert sorted(df["source"]) == ["cl\\xe9/caf\\xe9.png", "ok/a.png", "ok/b.png", "ok/na\\xefve.png"]
        assert sorted(df["label"]) == ["cl\\xe9", "ok", "ok", "ok"]
    # without --keep-paths the token hides the name, as before
    ingest([src], tmp_path / "tok", workers=2, progress=False)
    df2 = pd.read_parquet(tmp_path / "tok" / "manifest.parquet")
    assert df2["source"].str.fullmatch(r"[0-9a-f]{16}").all() and len(df2) == 4


# ----------------------------------------------------------------------------- labels CSV

def test_labels_csv_conflicts_are_an_error_and_identical_duplicates_fine(tmp_path):
    src = tmp_path / "src"
    _pngs(src, ["a.png", "b.png", "c.png"])
    csv = tmp_path / "labels.csv"
    csv.write_text("path,lesion\na.png,1\n./a.png,1\nb.png,0\nb.png,1\nc.png,0\nc.png,2\n")
    with pytest.raises(UserError, match=r"labels\.csv: 2 path\(s\) have several rows with different labels") as e:
        ingest([src], tmp_path / "o1", labels=csv, workers=1, progress=False)
    assert "b.png" not in str(e.value) and "\n" not in str(e.value)
    csv.write_text("path,lesion\na.png,1\n./a.png,1\nb.png,0\nc.png,2\n")
    ingest([src], tmp_path / "o2", labels=csv, workers=1, progress=False)
    df = pd.read_parquet(tmp_path / "o2" / "manifest.parquet")
    assert sorted(df["lesion"].tolist()) == [0, 1, 2]


def test_labels_csv_matching_no_file_is_warned_with_counts_and_a_hint(tmp_path, capfd):
    src = tmp_path / "src"
    _pngs(src, ["a.png", "b.png", "c.png"])
    csv = tmp_path / "labels.csv"
    csv.write_text("".join(["path,lesion\n"] + [f"{src}/{n},1\n" for n in ("a.png", "b.png", "c.png")]))
    rc, stdout, stderr = _run(["ingest", src, "--out", tmp_path / "o1", "--labels", csv, "--workers", "1"], capfd)
    assert rc == 0
    assert "labels CSV: 0 of its 3 paths match a file; 3 of its paths are absolute" in stdout + stderr
    assert str(src) not in stdout + stderr
    csv.write_text("path,lesion\nsrc/a.png,1\nsrc/b.png,0\nc.png,1\nd.png,0\ne.png,1\n")
    rc, stdout, stderr = _run(["ingest", src, "--out", tmp_path / "o2", "--labels", csv, "--workers", "1"], capfd)
    assert rc == 0 and "labels CSV: 1 of its 5 paths match a file; its paths seem to start with the source" in stdout
    csv.write_text("path,lesion\na.png,1\nb.png,0\n")  # a CSV covering part of the files: no warning
    rc, stdout, stderr = _run(["ingest", src, "--out", tmp_path / "o3", "--labels", csv, "--workers", "1"], capfd)
    assert rc == 0 and "labels CSV" not in stdout + stderr


# ----------------------------------------------------------------------------- disk full

def _disk_fills_after(mp, n_writes):
    """Shard writes fail with ENOSPC after ``n_writes`` successful ones (in this process and forked workers)."""
    real, calls = S._write_all, []

    def write_all(fd, views):
        calls.append(1)
        if len(calls) > n_writes:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(fd, views)

    mp.setattr(S, "_write_all", write_all)


@pytest.mark.parametrize("workers", [1, 2])
def test_disk_full_is_one_line_and_a_rerun_completes(tmp_path, monkeypatch, capfd, workers):
    src = tmp_path / "src"
    _pngs(src, [f"img{k:02d}.png" for k in range(12)])
    ref = tmp_path / "ref"
    ingest([src], ref, workers=1, progress=False, chunk_size=3)
    out = tmp_path / "ds"
    with monkeypatch.context() as mp:
        _disk_fills_after(mp, 1)  # the first chunk is written, the second finds the disk full
        rc, stdout, stderr = _run(["ingest", src, "--out", out, "--workers", workers, "--chunk-size", 3], capfd)
    assert rc == 2 and "Traceback" not in stderr
    line = stderr.strip().splitlines()[-1]
    assert line.startswith("radpretrain ingest: error: ") and "no space left on device" in line
    assert str(out / "shards" / "chunk-0000") in line and " free; this ingest needs " in line
    assert "run the same command again" in line
    assert not list(out.rglob("*.tmp"))  # the failed writes' temporaries are gone: the free space said is real
    rc, stdout, stderr = _run(["ingest", src, "--out", out, "--workers", workers, "--chunk-size", 3], capfd)
    assert rc == 0
    pd.testing.assert_frame_equal(pd.read_parquet(ref / "manifest.parquet"), pd.read_parquet(out / "manifest.parquet"))
    for a, b in zip(sorted((ref / "shards").iterdir()), sorted((out / "shards").iterdir())):
        assert a.name == b.name and a.read_bytes() == b.read_bytes()
    assert not list(out.rglob("*.tmp"))


def test_disk_full_while_writing_the_manifest(tmp_path, monkeypatch):
    from radpretrain.data import ingest as G

    src = tmp_path / "src"
    _pngs(src, ["a.png", "b.png"])
    real = G.write_manifest

    def full(root, df):
        raise OSError(errno.ENOSPC, "Error writing bytes to file. Detail: [errno 28] No space left on device")

    monkeypatch.setattr(G, "write_manifest", full)
    out = tmp_path / "ds"
    with pytest.raises(UserError, match="no space left on device .* free; this ingest needs about") as e:
        ingest([src], out, workers=1, progress=False)
    assert "\n" not in str(e.value)
    monkeypatch.setattr(G, "write_manifest", real)
    assert ingest([src], out, workers=1, progress=False)["ingested"] == 2
    assert len(S.Store(out)) == 2
