"""Tests of the synthetic archive generator (``radpretrain synth``)."""

from __future__ import annotations

import csv
import json
import re
from collections import defaultdict
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.errors import InvalidDicomError
from pydicom.uid import JPEG2000Lossless, RLELossless

from radpretrain.cli import main
from radpretrain.data import vocab
from radpretrain.errors import UserError
from radpretrain.synthetic import anatomy
from radpretrain.synthetic import archive as synth

N_PATIENTS = 8


@pytest.fixture(scope="module")
def archive(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("synth") / "archive"
    synth.generate_archive(out, n_patients=N_PATIENTS, seed=0)
    return out


def _truth(root: Path) -> list[dict]:
    with open(root / ".synth" / "truth.csv") as f:
        return list(csv.DictReader(f))


def _labels(root: Path) -> list[dict]:
    with open(root / "labels.csv") as f:
        return list(csv.DictReader(f))


def _files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _by_kind(rows):
    out = defaultdict(list)
    for r in rows:
        out[r["kind"]].append(r)
    return out


def test_same_seed_same_bytes_other_seed_differs(archive, tmp_path):
    again = tmp_path / "again"
    synth.generate_archive(again, n_patients=N_PATIENTS, seed=0)
    a, b = _files(archive), _files(again)
    assert a.keys() == b.keys()
    assert all(a[k] == b[k] for k in a), [k for k in a if a[k] != b[k]][:3]
    synth.generate_archive(tmp_path / "other", n_patients=3, seed=1)
    other = _files(tmp_path / "other")
    dicom_a = {k for k in a if not k.startswith((".synth", "exports", "labels"))}
    dicom_o = {k for k in other if not k.startswith((".synth", "exports", "labels"))}
    assert dicom_a.isdisjoint(dicom_o)  # different patients, ids and dates -> different paths
    assert a["labels.csv"] != other["labels.csv"]


def test_truth_covers_every_file_and_paths_carry_phi(archive):
    truth = _truth(archive)
    files = {k for k in _files(archive) if not k.startswith(".synth/") and k != "labels.csv"}
    assert {r["path"] for r in truth} == files
    phi = json.loads((archive / ".synth" / "planted_phi.json").read_text())
    n_noext = 0
    for r in truth:
        parts = r["path"].split("/")
        if parts[0] == "exports":
            m = re.match(r"(PHI\d{6})_([a-z]+)_\d{2}\.(png|jpe?g)$", parts[1])
            assert m and m.group(1) == r["patient_key"], r["path"]
            continue
        assert len(parts) == 4, r["path"]
        pid, last = parts[0].split("_")
        assert pid == r["patient_key"] and pid in phi["patient_ids"] and last in phi["name_words"]
        date, acc = parts[1].split("_")
        assert date in phi["study_dates"] and acc in phi["accession_numbers"]
        assert re.fullmatch(r"\d+_[A-Z]{2}", parts[2])
        n_noext += "." not in parts[3]
    assert n_noext >= 1
    counts = json.loads((archive / ".synth" / "summary.json").read_text())["by_kind"]
    assert counts == {k: len(v) for k, v in _by_kind(truth).items()} | {k: 0 for k in synth.KINDS
                                                                        if k not in _by_kind(truth)}


def test_broken_files_behave_as_declared(archive):
    kinds = _by_kind(_truth(archive))
    assert set(synth.KINDS) <= set(kinds)
    assert {r["expected_status"] for r in kinds["truncated"] + kinds["zero_byte"] + kinds["no_pixels"]
            + kinds["not_dicom"] + kinds["blank"]} == {"quarantined"}
    assert (archive / kinds["zero_byte"][0]["path"]).stat().st_size == 0
    with pytest.raises(Exception):
        pydicom.dcmread(archive / kinds["truncated"][0]["path"]).pixel_array
    sr = pydicom.dcmread(archive / kinds["no_pixels"][0]["path"])
    assert "PixelData" not in sr and sr.SOPClassUID == synth.BASIC_TEXT_SR
    assert sr.ContentSequence[0].TextValue  # free text report with the patient's name
    nd = kinds["not_dicom"][0]["path"]
    assert nd.endswith(".dcm")
    with pytest.raises(InvalidDicomError):
        pydicom.dcmread(archive / nd)
    dup = kinds["exact_duplicate"][0]
    assert dup["expected_status"] == "duplicate" and dup["duplicate_of"] != dup["path"]
    assert (archive / dup["path"]).read_bytes() == (archive / dup["duplicate_of"]).read_bytes()
    assert dup["duplicate_of"] < dup["path"]  # the original sorts first
    blank = pydicom.dcmread(archive / kinds["blank"][0]["path"]).pixel_array
    assert blank.min() == blank.max()
    near = kinds["near_duplicate"]
    assert 2 <= len(near) <= 3
    for r in near:
        a = pydicom.dcmread(archive / r["path"])
        b = pydicom.dcmread(archive / r["duplicate_of"])
        assert a.SOPInstanceUID != b.SOPInstanceUID and a.PatientID == b.PatientID
        pa, pb = a.pixel_array.astype(float), b.pixel_array.astype(float)
        assert pa.shape == pb.shape and not np.array_equal(pa, pb)
        assert np.corrcoef(pa.ravel(), pb.ravel())[0, 1] > 0.8


def test_header_variety_and_decoding(archive):
    truth = _truth(archive)
    radios = [r for r in truth if r["kind"] == "radiograph"]
    assert {r["body_part"] for r in radios} >= {"hand", "knee", "chest", "foot", "pelvis", "spine", "shoulder"}
    assert {r["photometric"] for r in radios} == {"MONOCHROME1", "MONOCHROME2"}
    assert {int(r["bits_stored"]) for r in radios} == {8, 10, 12, 16}
    syntaxes = {r["transfer_syntax"] for r in radios}
    assert RLELossless in syntaxes and JPEG2000Lossless in syntaxes
    for r in radios:
        ds = pydicom.dcmread(archive / r["path"])
        assert ds.Modality in ("CR", "DX") and ds.SOPClassUID in (synth.CR_STORAGE, synth.DX_STORAGE)
        assert ds.PhotometricInterpretation == r["photometric"] and ds.BitsStored == int(r["bits_stored"])
        assert ds.file_meta.TransferSyntaxUID == r["transfer_syntax"]
        if r["transfer_syntax"] in (RLELossless, JPEG2000Lossless):
            arr = ds.pixel_array
            assert arr.shape == (ds.Rows, ds.Columns) and arr.max() < 2 ** ds.BitsStored
    longest = [max(int(r["rows"]), int(r["columns"])) for r in radios]
    assert min(longest) >= 500 and max(longest) <= 3000
    ct = [r for r in truth if r["kind"] == "ct"]
    assert ct and all(r["modality"] == "CT" for r in ct)
    ds = pydicom.dcmread(archive / ct[0]["path"])
    assert ds.SOPClassUID == synth.CT_STORAGE and float(ds.RescaleIntercept) == -1024
    hu = ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    assert hu.min() < -900 and hu.max() > 1000  # air and cortical bone
    mr = [r for r in truth if r["kind"] == "mr"]
    assert mr and pydicom.dcmread(archive / mr[0]["path"]).Modality == "MR"


def test_phi_planted_in_headers_and_listed(archive):
    phi = json.loads((archive / ".synth" / "planted_phi.json").read_text())
    every = set(phi["all"])
    for key in ("patient_names", "name_words", "patient_ids", "birth_dates", "accession_numbers",
                "institutions", "physicians", "study_dates"):
        assert phi[key] and set(phi[key]) <= every
    radios = [r for r in _truth(archive) if r["kind"] == "radiograph"]
    for r in radios[:6]:
        ds = pydicom.dcmread(archive / r["path"])
        assert str(ds.PatientName) in phi["patient_names"]
        last = str(ds.PatientName).split("^")[0]
        assert last.startswith("ZZ") and last in ds.StudyDescription
        assert ds.PatientID in phi["patient_ids"] and ds.PatientBirthDate in phi["birth_dates"]
        assert ds.AccessionNumber in phi["accession_numbers"] and ds.InstitutionName in phi["institutions"]
        assert str(ds.ReferringPhysicianName) in phi["physicians"] and ds.StudyDate in phi["study_dates"]


def test_labels_cover_every_image_and_are_per_patient(archive):
    truth = {r["path"]: r for r in _truth(archive)}
    labels = _labels(archive)
    image_paths = {p for p, r in truth.items() if r["kind"] in synth.LABELLED_KINDS}
    assert {r["path"] for r in labels} == image_paths and len(labels) == len(image_paths)
    per_patient = defaultdict(set)
    for r in labels:
        assert r["lesion"] in ("0", "1") and r["lesion"] == truth[r["path"]]["lesion"]
        per_patient[truth[r["path"]]["patient_key"]].add(r["lesion"])
    assert all(len(v) == 1 for v in per_patient.values())
    assert len(per_patient) == N_PATIENTS
    rate = sum("1" in v for v in per_patient.values()) / N_PATIENTS
    assert 0.3 <= rate <= 0.55


def _ring_means(img, cy, cx, r):
    yy, xx = np.mgrid[0:img.shape[0], 0:img.shape[1]]
    d = np.hypot(yy - cy, xx - cx)
    return img[d < 0.5 * r].mean(), img[(d > 1.08 * r) & (d < 1.3 * r)].mean()


def test_lesion_visible_in_raw_pixels_and_monochrome1_inverted(archive):
    """The lucency is darker than its sclerotic rim on display; MONOCHROME1 stores it the other way."""
    rows = [r for r in _truth(archive) if r["kind"] == "radiograph" and r["lesion"] == "1"]
    assert {r["photometric"] for r in rows} == {"MONOCHROME1", "MONOCHROME2"}
    assert all(r["lesion_row"] for r in rows)
    for r in rows:
        raw = pydicom.dcmread(archive / r["path"]).pixel_array.astype(float)
        core, rim = _ring_means(raw, float(r["lesion_row"]), float(r["lesion_col"]), float(r["lesion_radius"]))
        if r["photometric"] == "MONOCHROME1":
            assert core > rim, r["path"]  # bone (rim) dark in the raw values
        else:
            assert core < rim, r["path"]
    for r in _truth(archive):
        if r["lesion"] == "0":
            assert r["lesion_row"] == ""


def test_lesion_survives_resize_to_128(archive):
    rows = [r for r in _truth(archive) if r["kind"] in ("radiograph", "png", "jpeg") and r["lesion"] == "1"]
    for r in rows:
        h, w = int(r["rows"]), int(r["columns"])
        s = 128 / max(h, w)
        diam = 2 * float(r["lesion_radius"]) * s
        assert 4 <= diam <= 18, (r["path"], diam)
        if r["kind"] == "radiograph":
            ds = pydicom.dcmread(archive / r["path"])
            a = ds.pixel_array.astype(np.float32)
            if ds.PhotometricInterpretation == "MONOCHROME1":
                a = a.max() - a
            small = np.asarray(Image.fromarray(a).resize((max(1, round(w * s)), max(1, round(h * s))),
                                                         Image.BILINEAR))
            core, rim = _ring_means(small, float(r["lesion_row"]) * s, float(r["lesion_col"]) * s, diam / 2)
            assert rim - core > 0.02 * (a.max() - a.min()), r["path"]


def test_quantize_monochrome1_is_inverted():
    disp = np.linspace(0, 1, 100, dtype=np.float32).reshape(10, 10)
    prm = {"bits": 12, "lo": 100, "hi": 4000, "photometric": "MONOCHROME2"}
    m2 = synth._quantize(disp, prm).astype(int)
    m1 = synth._quantize(disp, {**prm, "photometric": "MONOCHROME1"}).astype(int)
    assert m2[0, 0] == 100 and m2[-1, -1] == 4000
    assert np.abs(m1 - (4095 - m2)).max() <= 1
    assert m2.dtype != np.uint8 and synth._quantize(disp, {**prm, "bits": 8, "hi": 255}).dtype == np.uint8


def test_cli_summary_without_phi(tmp_path, capsys):
    out = tmp_path / "cli"
    assert main(["synth", str(out), "--patients", "3", "--seed", "5"]) == 0
    text = capsys.readouterr().out
    assert "radiograph" in text and "files" in text
    phi = json.loads((out / ".synth" / "planted_phi.json").read_text())
    assert not [s for s in phi["all"] if s in text]
    assert main(["synth", str(out), "--patients", "3"]) == 2  # not empty
    assert "not empty" in capsys.readouterr().err
    assert main(["synth", str(out), "--patients", "3", "--seed", "6", "--overwrite"]) == 0
    other = tmp_path / "other"
    other.mkdir()
    (other / "keep.txt").write_text("x")
    assert main(["synth", str(other), "--patients", "3", "--overwrite"]) == 2  # not a synth folder
    assert (other / "keep.txt").exists()


def test_bad_arguments():
    with pytest.raises(UserError):
        synth.generate_archive("/nonexistent-never-created", n_patients=2)


def test_the_archive_draws_from_the_manifest_vocabularies():
    assert set(synth.PART_WEIGHTS) <= set(vocab.BODY_PARTS) and set(anatomy.RADIOGRAPH_PARTS) <= set(vocab.BODY_PARTS)
    assert set(synth.BODY_PART_TEXT) == set(synth.PART_WEIGHTS)
    for part, texts in synth.BODY_PART_TEXT.items():  # what ingest makes of each BodyPartExamined it writes
        assert {vocab.normalise_body_part(t) for t in texts} == {part}
