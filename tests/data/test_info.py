"""``radpretrain info``: JSON counts match the manifest; table; sample grid PNG."""

import json

import pandas as pd

from radpretrain.cli import main
from radpretrain.data.info import collect
from radpretrain.data.store import MANIFEST, Store, write_manifest, write_store_meta
from radpretrain.synthetic.toy import make_toy_store
from radpretrain.utils import write_json


def toy_with_rejects(tmp_path, **kw):
    """A toy store plus three non-ingested manifest rows (1 duplicate, 2 quarantined)."""
    root = make_toy_store(tmp_path / "toy", **kw)
    man = pd.read_parquet(root / MANIFEST)
    extra = man.iloc[:3].copy()
    extra["image_id"] = ["a" * 16, "b" * 16, "c" * 16]
    extra["status"] = ["duplicate", "quarantined", "quarantined"]
    extra["reason"] = ["duplicate of another image", "unreadable", "unreadable"]
    extra["shard"], extra["offset"] = "", -1
    extra["modality"] = "CT"
    write_manifest(root, pd.concat([man, extra], ignore_index=True))
    return root


def test_info_json_matches_manifest(tmp_path, capsys):
    root = toy_with_rejects(tmp_path, n_patients=9, images_per_patient=2)
    assert main(["info", str(root), "--json"]) == 0
    out = capsys.readouterr().out
    info = json.loads(out)  # nothing but one JSON object on stdout
    for key in ("inputs", "ingested", "duplicates", "quarantined", "by_modality", "by_body_part", "by_label", "by_split"):
        assert key in info
    img = Store(root).images
    assert info["inputs"] == 21 and info["ingested"] == 18 and info["duplicates"] == 1
    assert info["quarantined"] == {"unreadable": 2}
    assert info["by_modality"] == {"DX": 18}  # ingested images only
    assert info["by_body_part"] == {k: int(v) for k, v in img["body_part"].value_counts().items()}
    assert info["by_label"]["lesion"] == {str(k): int(v) for k, v in img["lesion"].value_counts().sort_index().items()}
    assert info["by_split"] == {}
    assert info["patients"] == 9
    assert info["age_years"]["known"] == 18 and info["age_years"]["min"] == img["age_years"].min()
    assert not list(root.glob("*.png"))  # --json draws nothing

    assert main(["split", str(root), "--folds", "3"]) == 0
    capsys.readouterr()
    info = collect(root)
    assert sum(info["by_split"].values()) == 18 and set(info["by_split"]) <= {"train", "val", "test"}
    assert sum(info["patients_by_split"].values()) == 9


def test_info_uses_qc_summary_and_per_file_note(tmp_path, capsys):
    root = make_toy_store(tmp_path / "toy", n_patients=3, images_per_patient=1)
    write_json(root / "qc_summary.json", {"inputs": 10, "ingested": 3, "duplicates": 2,
                                          "quarantined": {"no pixel data": 4, "encrypted": 1}, "sidecar_skipped": 5})
    write_store_meta(root, patient_id_source="per-file")
    info = collect(root)
    assert info["inputs"] == 10 and info["quarantined"] == {"no pixel data": 4, "encrypted": 1}
    assert info["sidecar_skipped"] == 5 and info["patient_id_source"] == "per-file"
    grid = tmp_path / "out" / "grid.png"
    assert main(["info", str(root), "--grid", str(grid)]) == 0
    out = capsys.readouterr().out
    assert "own patient" in out and "image-level" in out
    assert "no pixel data" in out and f"sample grid: {grid}" in out
    assert grid.is_file() and grid.stat().st_size > 1000


def test_sample_grid_default_path_has_no_ids(tmp_path, capsys):
    root = make_toy_store(tmp_path / "toy", n_patients=6, images_per_patient=2)
    assert main(["info", str(root)]) == 0
    out = capsys.readouterr().out
    grid = root / "sample_grid.png"
    assert grid.is_file() and f"sample grid: {grid}" in out
    assert grid.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    ids = set(Store(root).images[["image_id", "patient_id", "study_id"]].to_numpy().ravel())
    assert not any(i in grid.name for i in ids)
    assert not any(i in out for i in ids)  # the table shows no ids either
    assert "hand" in out and "lesion" in out
