"""Store integrity: ``radpretrain verify`` and one-line errors on opening a damaged store."""

import json

import numpy as np
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
