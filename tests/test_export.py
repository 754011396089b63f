"""Tests for ``radpretrain export`` and ``radpretrain.load_encoder``."""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import timm
import torch
import yaml

from radpretrain.cli import main as cli_main
from radpretrain.data.store import Store, write_manifest
from radpretrain.synthetic.toy import make_toy_store
from radpretrain.errors import UserError
from radpretrain.encoder import load_encoder
from radpretrain.export import EXPORT_FILES, export_encoder
from radpretrain.models.weights import save_encoder

SIZE = 64
MEAN, STD = 0.31, 0.22


def make_run(run_dir: Path, store: Path | None = None, arch: str = "resnet18", seed: int = 0,
             extra_cfg: dict | None = None, method: str = "simclr") -> torch.nn.Module:
    """A run folder as the engine writes it: encoder.safetensors + encoder.json (+ config.yaml)."""
    torch.manual_seed(seed)
    model = timm.create_model(arch, in_chans=1, num_classes=0).eval()
    with torch.no_grad():  # make BN statistics non-trivial so a wrong load would show
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    meta = {"arch": arch, "model_kwargs": {"in_chans": 1}, "image_size": SIZE, "resize": "letterbox",
            "method": method,
            "preprocessing": {"mean": MEAN, "std": STD, "image_size": SIZE, "resize": "letterbox",
                              "intensity": "radpretrain-ingest-v1"}}
    save_encoder(model, meta, run_dir)
    cfg = {"method": method, "seed": 0,
           "data": {"root": str(store) if store else None, "image_size": SIZE, "mean": MEAN, "std": STD},
           "optim": {"name": "adamw", "lr": 0.001}, "trainer": {"max_steps": 10}}
    cfg.update(extra_cfg or {})
    (run_dir / "config.yaml").write_text(yaml.safe_dump(cfg))
    return model


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("exported")
    store = make_toy_store(tmp_path / "store", n_patients=6, images_per_patient=2)
    model = make_run(tmp_path / "run", store)
    out = export_encoder(tmp_path / "run", tmp_path / "export")
    return model, out, store


def _front_matter(readme: str) -> dict:
    assert readme.startswith("---\n")
    return yaml.safe_load(readme.split("---\n")[1])


def test_export_layout_and_identical_features(exported):
    model, out, store = exported
    assert sorted(p.name for p in out.iterdir()) == sorted(EXPORT_FILES)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["architecture"] == "resnet18" and cfg["num_classes"] == 0 and cfg["num_features"] == 512
    assert cfg["pretrained_cfg"]["input_size"] == [1, SIZE, SIZE]
    assert cfg["pretrained_cfg"]["mean"] == [MEAN] and cfg["pretrained_cfg"]["std"] == [STD]
    assert cfg["model_args"]["in_chans"] == 1
    pre = cfg["preprocessing"]
    assert pre["resize"] == "letterbox" and pre["image_size"] == SIZE
    assert "-1000" in pre["intensity_rules"]["dicom"]["CT"] and "MONOCHROME1" in pre["intensity_rules"]["dicom"]["photometric"]
    fm = _front_matter((out / "README.md").read_text())
    assert fm["library_name"] == "timm" and fm["license"] == "apache-2.0" and "radpretrain" in fm["tags"]

    loaded, preprocess = load_encoder(out)
    assert not loaded.training
    s = Store(store)
    x = preprocess([s.read(0), s.read(3)])
    assert x.shape == (2, 1, SIZE, SIZE)
    # the input is exactly what training saw: StoreDataset's letterbox + the encoder's normalisation
    from radpretrain.data.dataset import StoreDataset

    ds = StoreDataset(store, image_size=SIZE)
    assert torch.allclose(x[1], (ds[3]["image"] - MEAN) / STD, atol=1e-6)
    with torch.no_grad():
        ref = model(x)
        assert torch.equal(loaded(x), ref)
        # plain timm, file overlay: same features, first conv loaded unchanged (not summed/adapted)
        t1 = timm.create_model("resnet18", pretrained=True, in_chans=1, num_classes=0,
                               pretrained_cfg_overlay=dict(file=str(out / "model.safetensors"),
                                                           input_size=(1, SIZE, SIZE), num_classes=0)).eval()
        assert torch.equal(t1.conv1.weight, model.conv1.weight)
        assert torch.equal(t1(x), ref)
        # plain timm, the whole folder (reads config.json like a hub repository)
        t2 = timm.create_model(f"local-dir:{out}", pretrained=True).eval()
        assert t2.num_classes == 0 and tuple(t2.pretrained_cfg["mean"]) == (MEAN,)
        assert torch.equal(t2(x), ref)


def _dicom(arr: np.ndarray, photometric: str = "MONOCHROME2", modality: str = "DX"):
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"
    ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
    ds.Modality = modality
    ds.Rows, ds.Columns = arr.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.PixelData = arr.astype(np.uint16).tobytes()
    return ds


def test_preprocess_accepts_arrays_files_and_dicom(exported, tmp_path):
    import radpretrain

    _, out, _ = exported
    _, pre = radpretrain.load_encoder(out)  # the public entry point forwards to encoder.load_encoder
    rng = np.random.default_rng(0)
    u8 = rng.integers(0, 256, (70, 50), dtype=np.uint8)
    a = pre(u8)
    assert a.shape == (1, 1, SIZE, SIZE)
    # float in [0, 1] is taken as is (same as uint8 / 255)
    assert torch.equal(pre(u8.astype(np.float32) / 255), a)
    # a PNG file goes through the ingest reader and gives the same input
    from PIL import Image

    Image.fromarray(u8).save(tmp_path / "x.png")
    assert torch.equal(pre(str(tmp_path / "x.png")), a)
    # raw integers -> percentile window: an affine change of the raw values changes nothing
    raw = rng.integers(0, 4096, (60, 60)).astype(np.uint16)
    assert torch.allclose(pre(raw), pre((raw.astype(np.int32) * 3 + 100)), atol=1e-5)
    # DICOM: MONOCHROME1 is inverted (bone bright), so it equals the inverted MONOCHROME2 image
    m2 = pre(_dicom(raw, "MONOCHROME2"))
    m1 = pre(_dicom(4095 - raw, "MONOCHROME1"))
    assert torch.allclose(m1, m2, atol=2.1 / 255 / STD)
    ds = _dicom(raw)
    ds.save_as(tmp_path / "x.dcm", enforce_file_format=True)
    assert torch.equal(pre(tmp_path / "x.dcm"), m2)
    # letterbox keeps the aspect ratio: padding rows are exactly zero in [0, 1] space
    wide = pre(np.full((20, 80), 255, np.uint8))[0, 0] * STD + MEAN
    assert torch.allclose(wide[0], torch.zeros(SIZE), atol=1e-6) and torch.allclose(wide[SIZE // 2], torch.ones(SIZE), atol=1e-6)
    with pytest.raises(UserError, match="2-D"):
        pre(np.zeros((3, 4, 5)))
    with pytest.raises(UserError, match="no such image file"):
        pre(tmp_path / "missing.png")
    (tmp_path / "junk.png").write_bytes(b"not an image at all")
    with pytest.raises(UserError, match="junk.png"):
        pre(tmp_path / "junk.png")


def _plant_phi_in_store(store: Path, phi: list[str]) -> None:
    """Put identifying strings in every manifest column that must never be exported."""
    s = Store(store)
    df = s.manifest.copy()
    n = len(df)
    df["source"] = [phi[i % len(phi)] for i in range(n)]
    df["reason"] = ""
    df["referring_physician"] = [phi[(i + 1) % len(phi)] for i in range(n)]  # a free-text label column
    write_manifest(store, df)


def _write_eval(eval_dir: Path, run_dir: Path, phi_path: str) -> None:
    eval_dir.mkdir()
    rows = []
    for init in ("scratch", "imagenet", str(run_dir)):
        for fold, val in (("0", 0.7), ("pooled", 0.8123 if init == str(run_dir) else 0.6)):
            rows.append({"init": init, "protocol": "linear",  # ours given as a path: must not leak
                         "fraction": 0.1, "fold": fold, "metric": "auroc", "value": val,
                         "ci_low": val - 0.05, "ci_high": val + 0.05})
    pd.DataFrame(rows).to_csv(eval_dir / "results.csv", index=False)
    summary = {"task": "binary", "target": {"column": "lesion"}, "classes": ["0", "1"],
               "counts": {"images": 12, "patients": 6},
               "inits": [{"name": "run", "path": phi_path}], "versions": {"platform": "x"},
               "headline": [{"init": run_dir.name, "protocol": "linear", "fraction": 0.1, "metric": "auroc",
                             "value": 0.8123, "ci_low": 0.7623, "ci_high": 0.8623, "delta_vs_scratch": 0.2123,
                             "p_vs_scratch": 0.01}]}
    (eval_dir / "summary.json").write_text(json.dumps(summary))


def _all_bytes(folder: Path) -> bytes:
    return b"".join(p.name.encode() + p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file())


def test_model_card_has_counts_evaluation_and_no_phi(tmp_path):
    phi = ["DOE^JANE", "19570312", "ACC99887766", "St Elsewhere Hospital", "Dr. Hibbert"]
    phi_dir = tmp_path / "DOE^JANE_19570312"  # the store's own path is identifying too
    store = make_toy_store(phi_dir / "store", n_patients=6)
    _plant_phi_in_store(store, phi)
    run = tmp_path / "run"
    make_run(run, store, extra_cfg={"notes_dir": str(phi_dir / "notes")})
    _write_eval(tmp_path / "eval", run, str(phi_dir / "run"))
    rc = cli_main(["export", str(run), "--out", str(tmp_path / "export"), "--report", str(tmp_path / "eval"),
                   "--license", "cc-by-nc-4.0", "--name", "knee-simclr"])
    assert rc == 0
    readme = (tmp_path / "export" / "README.md").read_text()
    fm = _front_matter(readme)
    assert fm["license"] == "cc-by-nc-4.0" and fm["library_name"] == "timm"
    assert "# knee-simclr" in readme
    assert "| hand | 4 |" in readme and "| DX | 12 |" in readme          # counts from the store
    assert "0.8123 [0.7623, 0.8623]" in readme and "run (this encoder)" in readme  # evaluation
    assert "| this encoder | linear | 0.1 | pooled | auroc | 0.8123 |" in readme
    assert "Chen et al." in readme and "Intended use" in readme and "Limitations" in readme
    blob = _all_bytes(tmp_path / "export")
    manifest = Store(store).manifest
    forbidden = phi + [str(tmp_path), "referring_physician"] + manifest["patient_id"].tolist()
    for s in forbidden:
        assert s.encode() not in blob, f"{s!r} leaked into the export"


@pytest.mark.parametrize("method", ["metadata", "dino", "an_uninstalled_method"])
def test_the_card_describes_the_method_from_its_class(tmp_path, method):
    from radpretrain.methods import find_method

    make_run(tmp_path / "run", method=method)
    readme = (export_encoder(tmp_path / "run", tmp_path / "export") / "README.md").read_text()
    tags = _front_matter(readme)["tags"]
    cls = find_method(method)
    if cls is None:  # a run made by a method that is not installed here: described by its name
        assert f"- Method: {method} (`{method}`)" in readme and "see the radpretrain documentation" in readme
        return
    assert f"- Method: {cls.display_name} (`{method}`)" in readme
    assert f"- Reference: {cls.paper.reference()}" in readme and cls.supervision.hub_tag in tags
    if method == "metadata":  # weak labels, and the source it follows is the fast.ai forum thread
        assert "weakly-supervised-learning" in tags and "self-supervised-learning" not in tags
        assert "Transfer Learning for Medical Radiography, fast.ai forums" in readme
    else:
        assert "self-supervised-learning" in tags and "Caron et al., Emerging Properties" in readme


@pytest.fixture(scope="module")
def archive(tmp_path_factory):
    """A tiny synthetic PACS export (real DICOM/PNG/JPEG files with planted PHI)."""
    synth = pytest.importorskip("radpretrain.synthetic.archive")
    out = tmp_path_factory.mktemp("synth") / "archive"
    synth.generate_archive(out, n_patients=3, seed=3)
    return out


def test_export_of_ingested_synthetic_archive_leaks_no_planted_phi(tmp_path, monkeypatch, archive):
    ingest_mod = pytest.importorskip("radpretrain.data.ingest")
    monkeypatch.setenv("RADPRETRAIN_DEID_KEY", "test-key-export")
    ingest_mod.ingest([archive], tmp_path / "store", labels=archive / "labels.csv", workers=1, progress=False)
    run = tmp_path / "run"
    make_run(run, tmp_path / "store")
    out = export_encoder(run, tmp_path / "export")
    readme = (out / "README.md").read_text()
    assert "## Training data" in readme and "de-identified images from" in readme
    planted = json.loads((archive / ".synth" / "planted_phi.json").read_text())["all"]
    assert planted
    blob = _all_bytes(out)
    leaked = [s for s in planted if s.encode() in blob]
    assert not leaked, f"planted PHI in the export: {leaked}"


def test_preprocess_of_a_file_reproduces_the_ingested_pixels(tmp_path, monkeypatch, archive):
    """load_encoder's preprocessing of a raw DICOM/PNG/JPEG file == what ingest stored for it (CR, DX, CT, MR ...)."""
    ingest_mod = pytest.importorskip("radpretrain.data.ingest")
    from radpretrain.encoder import Preprocess

    monkeypatch.setenv("RADPRETRAIN_DEID_KEY", "test-key-export")
    ingest_mod.ingest([archive], tmp_path / "store", workers=1, progress=False, keep_paths=True, max_size=96)
    store = Store(tmp_path / "store")
    pre = Preprocess(SIZE, MEAN, STD, store_max_size=96)
    checked = set()
    for i, row in store.images.iterrows():
        path = archive / str(row["source"]).split("#")[0]
        if row["source_format"] not in ("dicom", "png", "jpeg") or not path.is_file():
            continue
        got = pre.to_stored(path)
        assert got.shape == store.read(i).shape, row["source"]
        assert np.array_equal(got, store.read(i)), row["source"]  # bit-identical
        checked.add(row["modality"])
    assert {"CT", "MR", "XR"} <= checked and checked & {"CR", "DX"}


def test_truncated_weights_are_refused(tmp_path, capsys):
    run = tmp_path / "run"
    make_run(run)
    w = run / "encoder.safetensors"
    w.write_bytes(w.read_bytes()[: w.stat().st_size // 2])
    with pytest.raises(UserError, match="encoder.safetensors: not a valid safetensors file"):
        export_encoder(run, tmp_path / "export")
    assert not (tmp_path / "export" / "model.safetensors").exists()
    assert cli_main(["export", str(run), "--out", str(tmp_path / "export")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "encoder.safetensors" in err and "Traceback" not in err
    # an exported folder with a truncated file is refused by load_encoder too
    good = tmp_path / "run2"
    make_run(good)
    out = export_encoder(good, tmp_path / "export2")
    (out / "model.safetensors").write_bytes((out / "model.safetensors").read_bytes()[:100])
    with pytest.raises(UserError, match="model.safetensors: not a valid safetensors file"):
        load_encoder(out)


class _Evil:
    """Pickling this runs ``os.mkdir(marker)`` on load, if anything ever unpickles it."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


@pytest.mark.parametrize("suffix", [".pth", ".bin"])
def test_pickle_bearing_weight_file_is_refused(tmp_path, suffix):
    marker = tmp_path / "pwned"
    path = tmp_path / f"encoder{suffix}"
    payload = {"conv1.weight": torch.zeros(64, 1, 7, 7), "evil": _Evil(marker)}
    if suffix == ".pth":
        torch.save(payload, path)
    else:  # a bare pickle, as old .bin checkpoints are
        with open(path, "wb") as f:
            pickle.dump(payload, f, protocol=2)
    (tmp_path / "encoder.json").write_text(json.dumps({"arch": "resnet18", "model_kwargs": {"in_chans": 1},
                                                       "preprocessing": {"mean": 0.5, "std": 0.25}}))
    with pytest.raises(UserError, match="refused or unreadable weight file"):
        load_encoder(path)
    assert not marker.exists()


def test_export_refuses_a_busy_out_folder_and_missing_run(tmp_path):
    make_run(tmp_path / "run")
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match="holds other files"):
        export_encoder(tmp_path / "run", busy)
    with pytest.raises(UserError, match="no such run folder"):
        export_encoder(tmp_path / "nope", tmp_path / "e")
    # re-exporting into the same export folder is fine (files are replaced)
    export_encoder(tmp_path / "run", tmp_path / "e")
    export_encoder(tmp_path / "run", tmp_path / "e")
    assert sorted(p.name for p in (tmp_path / "e").iterdir()) == sorted(EXPORT_FILES)
