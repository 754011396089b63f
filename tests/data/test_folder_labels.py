"""Folder names as labels (``--label-from-folder``): class vocabularies are accepted, identities never."""

import json

import numpy as np
import pandas as pd
import pytest
from pydicom.dataset import Dataset
from PIL import Image

from radpretrain import cli
from radpretrain.data.deid import folder_name_in_header, folder_name_looks_identifying, header_identity_tokens
from radpretrain.data.ingest import decide_label_from_folder, folder_label_decision

from .test_readers import make_dicom

pytestmark = pytest.mark.usefixtures("deid_key")

PATIENT_NAMES = ["DOE JOHN", "SMITH ANNA", "Roe Richard", "MUSTERMANN_ERIKA"]


def _images(root, folders, per_folder=3, ext="png"):
    for f, name in enumerate(folders):
        d = root / name
        d.mkdir(parents=True, exist_ok=True)
        for i in range(per_folder):
            pix = np.random.default_rng(100 * f + i).integers(0, 256, (40, 48), dtype=np.uint8)
            Image.fromarray(pix).save(d / f"img{i}.{ext}")


def _run(argv, capfd):
    rc = cli.main(list(map(str, argv)))
    out, err = capfd.readouterr()
    return rc, out + err


@pytest.mark.parametrize("name", [
    "0", "4", "KL0", "KL3", "NORMAL", "PNEUMONIA", "fracture", "no_fracture", "Viral Pneumonia", "Lung_Opacity",
    "COVID-19", "NO FINDING", "Pleural Effusion", "grade 2", "Grade II", "class_10", "XR_ELBOW", "benign", "c0",
])
def test_class_names_are_not_identifying(name):
    assert not folder_name_looks_identifying(name)


@pytest.mark.parametrize("name", [
    "DOE JOHN", "SMITH ANNA", "Anna Smith", "DOE_J", "van der Berg Jan", "Roe, Richard", "DOE^JANE", "O'Brien",
    "Müller Hans", "PHI000123_SMITH", "2021-03-04", "20210304", "03.04.21", "Mar 2021", "P001", "0042", "sub-01",
    "patient7", "case_12", "12345", "A" * 33,
])
def test_names_dates_and_ids_are_identifying(name):
    assert folder_name_looks_identifying(name)


def test_folder_names_found_in_a_dicom_header():
    ds = Dataset()
    ds.PatientName, ds.PatientID, ds.AccessionNumber = "ROE^RICHARD", "PHI-123456", "A998877"
    ds.InstitutionName, ds.StudyDate = "St Elsewhere Hospital", "20210304"
    ids = header_identity_tokens(ds)
    for name in ("Roe", "ROE RICHARD", "richard_x", "123456", "A998877", "Elsewhere", "20210304"):
        assert folder_name_in_header(name, ids), name
    for name in ("NORMAL", "0", "KL3", "fracture", "R"):
        assert not folder_name_in_header(name, ids), name


def test_auto_accepts_class_layouts_and_refuses_identity_layouts():
    assert decide_label_from_folder("auto", ["train/0/a.jpg", "val/4/b.jpg", "README.md"], False)
    assert decide_label_from_folder("auto", ["NORMAL/a.jpeg", "PNEUMONIA/b.jpeg"], False)
    assert decide_label_from_folder("auto", [f"train/{c}/{i}.png" for c in ("fracture", "no_fracture")
                                             for i in range(3)], False)
    assert decide_label_from_folder("auto", [f"KL{k}/{i}.png" for k in range(5) for i in range(2)], False)
    # patient folders: names, and many single words with few images each (a vocabulary too large)
    use, why = folder_label_decision("auto", [f"{n}/{i}.png" for n in PATIENT_NAMES for i in range(3)], False)
    assert not use and "4 of 4 parent folder names look like" in why
    assert not any(n.split()[0] in why for n in PATIENT_NAMES)  # counts, never names
    words = "ALPHA BRAVO CHARLIE DELTA ECHO FOXTROT GOLF HOTEL INDIA JULIET KILO LIMA".split()
    use, why = folder_label_decision("auto", [f"{w}/{i}.png" for w in words for i in range(3)], False)
    assert not use and "12 distinct parent folder names for 36 images" in why
    assert decide_label_from_folder("auto", [f"{w}/{i}.png" for w in words for i in range(10)], False)  # 10 each
    # the user's word decides
    assert decide_label_from_folder("yes", ["DOE JOHN/a.png"], False)
    assert not decide_label_from_folder("no", ["0/a.png", "1/b.png"], False)
    assert folder_label_decision("auto", ["a.png", "b.png"], False) == (False, None)  # not a layout: no warning


def test_patient_name_folders_are_refused_and_never_printed(tmp_path, capfd):
    """An export organised as ROOT/<SURNAME FORENAME>/img.png: no label column, the names appear in no
    output (manifest, JSON files, console, info), and the warning gives the count."""
    src = tmp_path / "export"
    _images(src, PATIENT_NAMES)
    out = tmp_path / "ds"
    rc, console = _run(["ingest", src, "--out", out, "--workers", "1"], capfd)
    assert rc == 0
    df = pd.read_parquet(out / "manifest.parquet")
    assert len(df) == 12 and (df.status == "ingested").all() and "label" not in df.columns
    assert "4 of 4 parent folder names look like a person's name" in console and "--label-from-folder yes" in console
    rc, info = _run(["info", out], capfd)
    assert rc == 0
    blobs = [p.read_bytes() for p in out.rglob("*") if p.is_file()] + [console.encode(), info.encode()]
    for name in PATIENT_NAMES:
        for word in name.replace(",", " ").replace("_", " ").split():
            assert not any(word.encode() in b or word.upper().encode() in b for b in blobs), word
    assert json.loads((out / "store.json").read_text())["label_from_folder"] is False


def test_folders_named_in_dicom_headers_are_refused(tmp_path, capfd):
    """Single-word folder names cannot be told from class names, but a DICOM file inside (named as an image)
    whose header holds that name gives them away."""
    src = tmp_path / "export"
    for folder, patient in (("Roe", "ROE^RICHARD"), ("Poe", "POE^EDGAR")):
        (src / folder).mkdir(parents=True)
        for i in range(2):
            arr = np.random.default_rng(i + 10 * (folder == "Roe")).integers(0, 4096, (40, 48)).astype(np.uint16)
            make_dicom(arr, src / folder / f"im{i}.png", PatientName=patient)
    out = tmp_path / "ds"
    rc, console = _run(["ingest", src, "--out", out, "--workers", "1"], capfd)
    assert rc == 0 and "2 of 2 parent folder names match a name or id in their files' DICOM headers" in console
    df = pd.read_parquet(out / "manifest.parquet")
    assert (df.status == "ingested").sum() == 4 and "label" not in df.columns
    assert b"Roe" not in (out / "manifest.parquet").read_bytes() and "Roe" not in console
    assert decide_label_from_folder("auto", ["Roe/im0.png", "Roe/im1.png", "Poe/im0.png", "Poe/im1.png"], False)


def test_yes_is_the_users_decision_and_is_recorded(tmp_path, capfd):
    src = tmp_path / "export"
    _images(src, ["NORMAL", "PNEUMONIA"], per_folder=2)
    auto_out, yes_out = tmp_path / "auto", tmp_path / "yes"
    assert _run(["ingest", src, "--out", auto_out, "--workers", "1"], capfd)[0] == 0
    rc, console = _run(["ingest", src, "--out", yes_out, "--workers", "1", "--label-from-folder", "yes"], capfd)
    assert rc == 0 and "you vouched they are not identifying" in console
    for out, decision in ((auto_out, "auto"), (yes_out, "explicit")):
        meta = json.loads((out / "store.json").read_text())
        qc = json.loads((out / "qc_summary.json").read_text())
        assert meta["label_from_folder"] and meta["label_from_folder_decision"] == decision
        assert qc["label_from_folder_decision"] == decision
        assert sorted(pd.read_parquet(out / "manifest.parquet")["label"]) == ["NORMAL"] * 2 + ["PNEUMONIA"] * 2
