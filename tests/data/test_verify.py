"""Store integrity: ``radpretrain verify``, one-line errors on opening a damaged store, repair by rerunning ingest."""

import json
import os

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from radpretrain import cli
from radpretrain.data.dataset import StoreDataset
from radpretrain.data.ingest import ingest
from radpretrain.data.store import Store
from radpretrain.data.verify import verify_store
from radpretrain.errors import UserError

pytestmark = pytest.mark.usefixtures("deid_key")

N_FILES, CHUNK = 9, 3


def _src(tmp_path):
    src = tmp_path / "src"
    src.mkdir(exist_ok=True)
    for k in range(N_FILES):
        pix = np.random.default_rng(k).integers(0, 256, (40 + k, 48), dtype=np.uint8)
        Image.fromarray(pix).save(src / f"img{k}.png")
    return src


def _ingest(src, out, **kw):
    return ingest([src], out, workers=1, progress=False, chunk_size=CHUNK, **kw)


def _run(argv, capfd):
    rc = cli.main(list(map(str, argv)))
    out, err = capfd.readouterr()
    return rc, out, err


def _truncate(path, keep):
    with open(path, "r+b") as f:
        f.truncate(keep)


def _flip(path, at):
    with open(path, "r+b") as f:
        f.seek(at)
        b = f.read(1)
        f.seek(at)
        f.write(bytes([b[0] ^ 0xFF]))


@pytest.fixture
def store(tmp_path):
    src = _src(tmp_path)
    out = tmp_path / "ds"
    _ingest(src, out)
    return src, out


def test_damaged_shard_or_manifest_is_a_one_line_error_naming_the_file(store, capfd):
    src, out = store
    shard = out / "shards" / "chunk-000001.bin"
    _truncate(shard, 100)
    with pytest.raises(UserError, match=r"chunk-000001\.bin: shard truncated \(100 bytes, its images need \d+\)"):
        Store(out)
    for argv in (["info", out], ["info", out, "--json"], ["split", out]):
        rc, stdout, stderr = _run(argv, capfd)
        assert rc == 2 and "Traceback" not in stderr and len(stderr.strip().splitlines()) == 1, argv
        assert str(shard) in stderr and "radpretrain verify" in stderr
    shard.unlink()
    with pytest.raises(UserError, match=r"chunk-000001\.bin: shard missing"):
        Store(out)
    (out / "manifest.parquet").write_bytes(b"PAR1 this is not a parquet file PAR1")
    with pytest.raises(UserError, match=r"manifest\.parquet: not a readable manifest") as e:
        Store(out)
    assert "\n" not in str(e.value)
    (out / "store.json").write_text("{ not json")
    with pytest.raises(UserError, match=r"store\.json: cannot be read"):
        Store(out)


def test_a_shard_cut_after_opening_is_a_one_line_error_when_read(store):
    _, out = store
    s = Store(out)
    ds = StoreDataset(out, image_size=32)
    _truncate(out / "shards" / "chunk-000002.bin", 10)
    last = len(s) - 1
    with pytest.raises(UserError, match="chunk-000002.bin: shard truncated"):
        s.read(last)
    with pytest.raises(UserError, match="chunk-000002.bin: shard truncated"):
        ds[last]


def test_verify_reports_every_damage_and_exit_status(store, capfd):
    _, out = store
    rc, stdout, _ = _run(["verify", out], capfd)
    assert rc == 0 and f"3 shards, {N_FILES} ingested images" in stdout and "OK" in stdout
    img = Store(out).images
    _flip(out / "shards" / "chunk-000000.bin", int(img.loc[1, "offset"]) + 5)  # one image's pixels changed
    _truncate(out / "shards" / "chunk-000002.bin", int(img.loc[7, "offset"]) + 3)  # images 7 and 8 cut
    rc, stdout, _ = _run(["verify", out], capfd)
    assert rc == 1 and "DAMAGED" in stdout
    assert "truncated shards: 1 (chunk-000002.bin:" in stdout
    assert "damaged images: 3" in stdout and img.loc[1, "image_id"] in stdout
    report = verify_store(out)
    assert not report["ok"] and report["damaged_images"] == 3 and report["hash_checked"]
    assert sorted(report["damaged_image_ids"]) == sorted(img.loc[[1, 7, 8], "image_id"])
    assert report["damaged_shards"] == ["chunk-000000.bin", "chunk-000002.bin"]
    (out / "shards" / "chunk-000001.bin").unlink()
    rc, stdout, _ = _run(["verify", out, "--json"], capfd)
    assert rc == 1 and json.loads(stdout)["missing_shards"] == ["chunk-000001.bin"]


def test_rerunning_ingest_repairs_a_damaged_store(store, tmp_path, capfd, caplog):
    src, out = store
    ref = tmp_path / "ref"
    _ingest(src, ref)
    img = Store(out).images
    _flip(out / "shards" / "chunk-000000.bin", int(img.loc[1, "offset"]) + 5)  # same size, other pixels
    _truncate(out / "shards" / "chunk-000002.bin", 7)
    (out / "manifest.parquet").write_bytes(b"garbage")
    with caplog.at_level("WARNING", logger="radpretrain.data.ingest"):
        rc, stdout, stderr = _run(["ingest", src, "--out", out, "--workers", "1", "--chunk-size", CHUNK], capfd)
    assert rc == 0 and "repaired: 2 damaged chunk(s) replaced" in stdout
    assert "2 chunk(s) of the store are damaged (shards chunk-000000, chunk-000002)" in caplog.text
    assert verify_store(out)["ok"]
    pd.testing.assert_frame_equal(pd.read_parquet(ref / "manifest.parquet"), pd.read_parquet(out / "manifest.parquet"))
    for a, b in zip(sorted((ref / "shards").iterdir()), sorted((out / "shards").iterdir())):
        assert a.read_bytes() == b.read_bytes()
    # a garbage chunk manifest, or a resumed (unfinished) store with a cut shard, is redone too
    (out / ".ingest" / "chunks" / "chunk-000001.parquet").write_bytes(b"garbage")
    (out / "manifest.parquet").unlink()
    _truncate(out / "shards" / "chunk-000000.bin", 5)
    summary = _ingest(src, out)
    assert summary["repaired_chunks"] == 2 and verify_store(out)["ok"]
    pd.testing.assert_frame_equal(pd.read_parquet(ref / "manifest.parquet"), pd.read_parquet(out / "manifest.parquet"))


def test_a_store_that_cannot_be_repaired_in_place_says_how_to_rebuild(store):
    src, out = store
    (out / ".ingest" / "plan.json").write_text("garbage")
    with pytest.raises(UserError, match="plan.json: cannot be read, so this ingest cannot be resumed or repaired"):
        _ingest(src, out)
    os.remove(out / ".ingest" / "plan.json")
    with pytest.raises(UserError, match="without its .ingest folder, so it cannot be resumed or repaired in place; "
                                        "ingest into a new folder"):
        _ingest(src, out)


def test_merged_partitions_are_repaired_from_intact_partitions(tmp_path, capfd):
    src = _src(tmp_path)
    parts = [tmp_path / f"p{i}" for i in (1, 2)]
    for i, p in enumerate(parts, 1):
        _ingest(src, p, partition=f"{i}/2")
    merged = tmp_path / "merged"
    assert _run(["ingest", "--merge", *parts, "--out", merged], capfd)[0] == 0
    ref = pd.read_parquet(merged / "manifest.parquet")
    # merged shards are hard links of the partitions' shards: cut one, and both copies are cut
    _truncate(merged / "shards" / "chunk-000001.bin", 9)
    rc, _, stderr = _run(["ingest", "--merge", *parts, "--out", merged], capfd)
    assert rc == 2 and "chunk 1 (chunk-000001) is damaged in every partition that holds it" in stderr
    _ingest(src, parts[1], partition="2/2")  # the partition's own rerun repairs it
    rc, stdout, _ = _run(["ingest", "--merge", *parts, "--out", merged], capfd)
    assert rc == 0 and "repaired: 1 damaged chunk(s)" in stdout
    assert verify_store(merged)["ok"] and verify_store(parts[1])["ok"]
    pd.testing.assert_frame_equal(ref, pd.read_parquet(merged / "manifest.parquet"))


def test_merging_a_store_with_a_truncated_shard_is_refused(tmp_path, capfd):
    a, b = tmp_path / "a", tmp_path / "b"
    _ingest(_src(tmp_path), a)
    other = tmp_path / "other" / "new"
    other.mkdir(parents=True)
    Image.fromarray(np.random.default_rng(99).integers(0, 256, (40, 48), dtype=np.uint8)).save(other / "n.png")
    _ingest(tmp_path / "other", b)
    _truncate(a / "shards" / "chunk-000001.bin", 3)
    rc, _, stderr = _run(["ingest", "--merge", a, b, "--out", tmp_path / "m"], capfd)
    assert rc == 2 and "chunk-000001.bin: shard truncated (3 bytes" in stderr and "repair" in stderr
