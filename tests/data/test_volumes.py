"""CT volume readers: world <-> voxel geometry of MetaImage, NIfTI and DICOM series, checked on
headers written by hand (the expected world points are computed in the tests, not by the code)."""

import zlib

import numpy as np
import pytest

from radpretrain.data.volumes import (
    Geometry, VolumeError, find_volumes, open_dicom_series, open_mhd, open_nifti,
)


def _mhd(path, fields: dict, data: bytes | None = None, raw_name: str | None = None):
    lines = [f"{k} = {v}" for k, v in fields.items()]
    text = "\n".join(lines) + "\n"
    if raw_name is None:  # LOCAL: the data follows the header
        path.write_bytes(text.encode() + (data or b""))
    else:
        path.write_text(text)
        (path.parent / raw_name).write_bytes(data or b"")


def _volume_kji(shape_ijk, bright_ijk, value=1000, dtype="<i2"):
    """File-order array (k, j, i): x fastest, as MetaImage stores it."""
    ni, nj, nk = shape_ijk
    a = np.zeros((nk, nj, ni), dtype=dtype)
    i, j, k = bright_ijk
    a[k, j, i] = value
    return a


BASE = {"ObjectType": "Image", "NDims": 3, "BinaryData": "True", "BinaryDataByteOrderMSB": "False",
        "CompressedData": "False", "TransformMatrix": "0 1 0 -1 0 0 0 0 1", "Offset": "10 20 30",
        "ElementSpacing": "0.5 2 3", "DimSize": "4 5 6", "ElementType": "MET_SHORT"}


def test_mhd_transform_matrix_rows_are_the_axes_directions(tmp_path):
    # TransformMatrix lists the direction of axis 0 (0 1 0), then axis 1 (-1 0 0), then axis 2 (0 0 1).
    # Voxel (1, 3, 2): world = (10, 20, 30) + 0.5*1*(0,1,0) + 2*3*(-1,0,0) + 3*2*(0,0,1) = (4, 20.5, 36)
    a = _volume_kji((4, 5, 6), (1, 3, 2))
    _mhd(tmp_path / "s.mhd", {**BASE, "ElementDataFile": "s.raw"}, a.tobytes(), "s.raw")
    vol = open_mhd(tmp_path / "s.mhd")
    g = vol.geometry
    assert g.shape == (4, 5, 6)
    np.testing.assert_allclose(g.world_to_index([4.0, 20.5, 36.0]), [1, 3, 2], atol=1e-9)
    np.testing.assert_allclose(g.index_to_world([1, 3, 2]), [4.0, 20.5, 36.0], atol=1e-9)
    assert vol.block((1, 3, 2), (2, 4, 3))[0, 0, 0] == 1000
    assert float(vol.block((0, 0, 0), (4, 5, 6)).sum()) == 1000
    assert g.inside([3.49, -0.49, 5.4]) and not g.inside([3.6, 0, 0]) and not g.inside([0, -0.6, 0])


def test_mhd_local_big_endian_compressed_and_header_size(tmp_path):
    a = _volume_kji((4, 5, 6), (2, 0, 5), value=-700, dtype=">i2")
    _mhd(tmp_path / "big.mha", {**BASE, "ElementByteOrderMSB": "True", "ElementDataFile": "LOCAL"}, a.tobytes())
    assert open_mhd(tmp_path / "big.mha").block((2, 0, 5), (3, 1, 6))[0, 0, 0] == -700
    b = _volume_kji((4, 5, 6), (3, 4, 0), value=77)
    _mhd(tmp_path / "z.mhd", {**BASE, "CompressedData": "True", "ElementDataFile": "z.zraw"}, zlib.compress(b.tobytes()),
         "z.zraw")
    assert open_mhd(tmp_path / "z.mhd").block((3, 4, 0), (4, 5, 1))[0, 0, 0] == 77
    _mhd(tmp_path / "h.mhd", {**BASE, "HeaderSize": "-1", "ElementDataFile": "h.raw"}, b"JUNKHEADER" + b.tobytes(),
         "h.raw")
    assert open_mhd(tmp_path / "h.mhd").block((3, 4, 0), (4, 5, 1))[0, 0, 0] == 77


@pytest.mark.parametrize("change, reason", [
    ({"ElementDataFile": "t.raw", "_data": b"\0" * 100}, "truncated"),
    ({"ElementDataFile": "missing.raw", "_nofile": True}, "unreadable"),
    ({"NDims": 2, "DimSize": "4 5", "ElementDataFile": "t.raw"}, "unsupported"),
    ({"ElementType": "MET_STRANGE", "ElementDataFile": "t.raw"}, "unsupported"),
    ({"ElementNumberOfChannels": 3, "ElementDataFile": "t.raw"}, "unsupported"),
])
def test_mhd_problems_are_reason_codes(tmp_path, change, reason):
    change = dict(change)
    data = change.pop("_data", b"\0" * (4 * 5 * 6 * 2))
    nofile = change.pop("_nofile", False)
    fields = {**BASE, **change}
    (tmp_path / "t.mhd").write_text("\n".join(f"{k} = {v}" for k, v in fields.items()) + "\n")
    if not nofile:
        (tmp_path / "t.raw").write_bytes(data)
    with pytest.raises(VolumeError) as e:
        open_mhd(tmp_path / "t.mhd")
    assert e.value.reason == reason
    assert str(tmp_path) not in str(e.value)


def test_nifti_ras_affine_is_converted_to_lps(tmp_path):
    import nibabel as nib

    affine = np.array([[-0.7, 0, 0, 100], [0, 0, 2.5, -50], [0, -0.7, 0, 20], [0, 0, 0, 1]], float)
    data = np.zeros((6, 5, 7), np.int16)
    data[3, 1, 4] = 500
    img = nib.Nifti1Image(data, affine)
    img.header.set_slope_inter(2.0, -1000.0)  # HU = 2 * stored - 1000
    nib.save(img, str(tmp_path / "v.nii.gz"))
    vol = open_nifti(tmp_path / "v.nii.gz")
    # RAS of voxel (3, 1, 4) = (-0.7*3 + 100, 2.5*4 - 50, -0.7*1 + 20) = (97.9, -40, 19.3); LPS flips x and y
    np.testing.assert_allclose(vol.geometry.world_to_index([-97.9, 40.0, 19.3]), [3, 1, 4], atol=1e-6)
    assert vol.block((3, 1, 4), (4, 2, 5))[0, 0, 0] == pytest.approx(2 * 500 - 1000)
    assert vol.block((0, 0, 0), (1, 1, 1))[0, 0, 0] == pytest.approx(-1000)


def _dicom_slice(path, pos, pixels, iop=(0, 1, 0, 0, 0, -1), spacing=(0.5, 0.8), uid="1.2.3.4"):
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
    meta.MediaStorageSOPInstanceUID = f"{uid}.{abs(hash(str(path))) % 10**6}"
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Modality, ds.PatientID, ds.SeriesInstanceUID, ds.StudyInstanceUID = "CT", "PAT-1", uid, uid + ".9"
    ds.ImagePositionPatient, ds.ImageOrientationPatient = list(pos), list(iop)
    ds.PixelSpacing = list(spacing)
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.RescaleIntercept, ds.RescaleSlope = -1024, 1
    ds.PixelData = pixels.astype(np.uint16).tobytes()
    ds.save_as(path, enforce_file_format=True)


def test_dicom_series_sorted_along_the_normal(tmp_path):
    # sagittal slices: rows along +y, columns along -z; the normal row x col = (-1, 0, 0) so the slice at
    # x = -17 comes first.  Pixel (row 2, column 3) of the slice at IPP (-18.5, 10, 40):
    # world = IPP + 3 * 0.8 * (0, 1, 0) + 2 * 0.5 * (0, 0, -1) = (-18.5, 12.4, 39.0)
    folder = tmp_path / "series"
    folder.mkdir()
    for n, name in zip(range(3), ("IM3", "IM1", "IM2")):  # file names out of order
        px = np.full((4, 5), 1024 - 800, np.uint16)
        if n == 1:
            px[2, 3] = 1024 + 300
        _dicom_slice(folder / name, (-20 + 1.5 * n, 10, 40), px)
    found, counts = find_volumes([tmp_path])
    assert counts["dicom_series"] == 1 and list(found) == ["1.2.3.4"]
    vs = found["1.2.3.4"]
    assert vs.facts["patient_id"] == "PAT-1"  # in memory only
    vol = open_dicom_series(vs.slices)
    g = vol.geometry
    assert g.shape == (5, 4, 3)
    ijk = g.world_to_index([-18.5, 12.4, 39.0])
    np.testing.assert_allclose(ijk, np.round(ijk), atol=1e-6)
    i, j, k = (int(v) for v in np.round(ijk))
    assert vol.block((i, j, k), (i + 1, j + 1, k + 1))[0, 0, 0] == 300
    assert float(vol.block((0, 0, 0), g.shape).max()) == 300 and float(vol.block((0, 0, 0), g.shape).min()) == -800


def test_dicom_uneven_slices_are_refused(tmp_path):
    for n, x in enumerate((0.0, 1.0, 3.5)):
        _dicom_slice(tmp_path / f"IM{n}", (x, 0, 0), np.zeros((4, 4), np.uint16))
    found, _ = find_volumes([tmp_path])
    with pytest.raises(VolumeError) as e:
        found["1.2.3.4"].geometry()
    assert e.value.reason == "irregular_slices"


def test_geometry_round_trip_and_ras_affine():
    rot = np.array([[np.cos(0.5), -np.sin(0.5), 0], [np.sin(0.5), np.cos(0.5), 0], [0, 0, 1]])
    g = Geometry((7, 8, 9), (0.7, 0.9, 2.5), (-100.5, 33.25, -250.0), rot @ np.diag([1, -1, -1]))
    pts = np.random.default_rng(0).uniform(-1, 9, (20, 3))
    np.testing.assert_allclose(g.world_to_index(g.index_to_world(pts)), pts, atol=1e-9)
    back = Geometry.from_ras_affine(g.shape, g.ras_affine())
    np.testing.assert_allclose(back.index_to_world(pts), g.index_to_world(pts), atol=1e-9)
    with pytest.raises(VolumeError):
        Geometry((2, 2, 2), (1, 0, 1), (0, 0, 0), np.eye(3))


def test_find_volumes_names_files_by_uid(tmp_path):
    a = _volume_kji((4, 5, 6), (0, 0, 0))
    (tmp_path / "sub").mkdir()
    _mhd(tmp_path / "sub" / "1.2.840.9.mhd", {**BASE, "ElementDataFile": "1.2.840.9.raw"}, a.tobytes(), "1.2.840.9.raw")
    import nibabel as nib

    nib.save(nib.Nifti1Image(np.zeros((3, 3, 3), np.int16), np.eye(4)), str(tmp_path / "1.2.840.7.nii.gz"))
    (tmp_path / "notes.txt").write_text("hello")
    found, counts = find_volumes([tmp_path])
    assert sorted(found) == ["1.2.840.7", "1.2.840.9"]
    assert found["1.2.840.9"].kind == "mhd" and found["1.2.840.7"].kind == "nifti"
    assert counts["mhd"] == 1 and counts["nifti"] == 1 and counts["dicom_series"] == 0
