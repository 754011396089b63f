"""Readers: recognition by content, the DICOM intensity pipeline, PNG/TIFF/NIfTI/NPZ, vocabularies."""

import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

from radpretrain.data import readers as R
from radpretrain.data import vocab as V


def make_dicom(arr, path=None, *, modality="DX", photometric="MONOCHROME2", bits=12, slope=None, intercept=None,
               window=None, preamble=True, **extra):
    ds = Dataset()
    ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.SOPInstanceUID = generate_uid()
    ds.Modality = modality
    ds.PatientID = "PHI-TEST-1"
    ds.PatientName = "DOE^JANE"
    arr = np.asarray(arr)
    ds.Rows, ds.Columns = arr.shape[:2]
    ds.SamplesPerPixel = 1 if arr.ndim == 2 else 3
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated = 8 if arr.dtype.itemsize == 1 else 16
    ds.BitsStored, ds.HighBit = bits, bits - 1
    ds.PixelRepresentation = 1 if arr.dtype.kind == "i" else 0
    if arr.ndim == 3:
        ds.PlanarConfiguration = 0
    if slope is not None:
        ds.RescaleSlope, ds.RescaleIntercept = slope, intercept
    if window is not None:
        ds.WindowCenter, ds.WindowWidth = window
    for k, v in extra.items():
        setattr(ds, k, v)
    ds.PixelData = np.ascontiguousarray(arr).tobytes()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    if path is None:
        return ds
    if preamble:
        ds.save_as(path, enforce_file_format=True)
    else:
        del ds.file_meta
        ds.save_as(path, implicit_vr=True, little_endian=True, enforce_file_format=False)
    return path


def ramp(h=64, w=80, top=4095, dtype=np.uint16):
    return (np.linspace(0, top, h * w).reshape(h, w)).astype(dtype)


def test_sniff_by_content(tmp_path):
    make_dicom(ramp(), tmp_path / "IM0001")                             # no extension
    b = make_dicom(ramp(), tmp_path / "raw.bin", preamble=False)      # no preamble, no meta
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "x.dat", format="PNG")
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "y.jpg")
    Image.fromarray(np.zeros((8, 8), np.uint16)).save(tmp_path / "z.tif")
    (tmp_path / "notes.txt").write_text("PatientName: DOE^JANE")
    (tmp_path / "page.dcm").write_text("<html>504 Gateway Time-out</html>")
    (tmp_path / "zero").write_bytes(b"")
    kinds = {p.name: R.sniff(p) for p in tmp_path.iterdir()}
    assert kinds == {"IM0001": "dicom", "raw.bin": "dicom", "x.dat": "png", "y.jpg": "jpeg", "z.tif": "tiff",
                     "notes.txt": "sidecar", "page.dcm": "unknown", "zero": "empty"}
    img, meta = R.load_image(b)   # decodable without file meta
    assert img.shape == (64, 80) and meta["source_format"] == "dicom"


def test_dicom_rescale_window_and_monochrome1():
    arr = ramp(top=4000)
    img, meta = R.load_image(make_dicom(arr, slope=2.0, intercept=-1000.0, window=(3000.0, 2000.0)))
    x = arr.astype(np.float64) * 2 - 1000  # modality LUT; then window 2000..4000
    expected = np.clip((x - 2000) / 2000, 0, 1)
    assert np.abs(img - expected).max() < 0.01
    mono2, _ = R.load_image(make_dicom(arr))
    mono1, m1 = R.load_image(make_dicom(arr, photometric="MONOCHROME1"))
    np.testing.assert_allclose(mono1, 1 - mono2, atol=1e-6)  # inverted: high raw values are dark
    assert m1["photometric"] == "MONOCHROME1" and m1["patient_id"] == "PHI-TEST-1"


def test_dicom_percentile_without_window_and_ct_mr():
    arr = ramp()
    img, _ = R.load_image(make_dicom(arr))
    assert img.min() == 0 and img.max() == 1
    hu = np.full((40, 40), 200, np.int16)
    hu[:20] = -1000
    ct, meta = R.load_image(make_dicom((hu + 1024).astype(np.uint16), modality="CT", slope=1.0, intercept=-1024.0))
    assert meta["modality"] == "CT"
    assert ct[0, 0] == pytest.approx(0.0) and ct[-1, 0] == pytest.approx(0.5)
    mr, meta = R.load_image(make_dicom(ramp(top=1000), modality="MR"))
    assert meta["modality"] == "MR" and mr.max() == 1.0


def test_rgb_and_multiframe_dicom():
    rgb = np.zeros((32, 32, 3), np.uint8)
    rgb[..., 0] = 255
    img, _ = R.load_image(make_dicom(rgb, photometric="RGB", bits=8, modality="OT"))
    assert img.shape == (32, 32) and img.mean() == pytest.approx(0.299, abs=0.01)
    frames = np.stack([ramp(32, 32), ramp(32, 32)[::-1]])
    ds = make_dicom(frames[0])
    ds.NumberOfFrames = 2
    ds.PixelData = frames.tobytes()
    first, meta = R.load_image(ds)
    np.testing.assert_array_equal(first, R.load_image(make_dicom(frames[0]))[0])
    assert meta["n_frames"] == 2


def test_png_8_and_16_bit(tmp_path):
    Image.fromarray(np.array([[0, 255], [51, 102]], np.uint8)).save(tmp_path / "a.png")
    img, meta = R.load_image(tmp_path / "a.png")
    np.testing.assert_allclose(img, [[0, 1], [0.2, 0.4]], atol=1e-6)
    assert meta["source_format"] == "png"
    Image.fromarray(np.array([[0, 4095], [1000, 2000]], np.uint16)).save(tmp_path / "b.png")
    img, _ = R.load_image(tmp_path / "b.png")
    np.testing.assert_allclose(img, np.array([[0, 4095], [1000, 2000]]) / 4095, atol=1e-6)
    Image.fromarray(np.full((4, 4, 3), (0, 0, 255), np.uint8)).save(tmp_path / "c.png")
    img, _ = R.load_image(tmp_path / "c.png")
    assert img.mean() == pytest.approx(0.114, abs=0.01)


def test_pydicom_data_monochrome1_radiograph_bone_bright():
    from pydicom.data import get_testdata_file

    path = get_testdata_file("RG3_UNCI.dcm")  # CR, MONOCHROME1: high stored values are dark
    raw = pydicom.dcmread(path).pixel_array.astype(np.float64)
    img, meta = R.load_image(path)
    assert meta["photometric"] == "MONOCHROME1" and meta["modality"] == "CR"
    inverted = raw.max() - raw
    assert np.corrcoef(img.ravel()[::7], inverted.ravel()[::7])[0, 1] > 0.9
    # bone (the brightest decile of the inverted raw image) is bright in ours
    order = np.argsort(inverted.ravel(), kind="stable")
    tenth = order.size // 10
    flat = img.ravel()
    assert flat[order[-tenth:]].mean() > flat[order[:tenth]].mean() + 0.3


@pytest.mark.parametrize("name,reason", [
    ("rtplan.dcm", "no_pixel_data"),
    ("MR_truncated.dcm", "decode_error"),
    ("JPEG-lossy.dcm", "unsupported_transfer_syntax"),
])
def test_pydicom_data_broken_files(name, reason):
    from pydicom.data import get_testdata_file

    with pytest.raises(R.ReadError) as e:
        R.load_image(get_testdata_file(name))
    assert e.value.reason == reason


@pytest.mark.parametrize("name", ["JPEG2000.dcm", "MR_small_RLE.dcm", "emri_small_jpeg_ls_lossless.dcm",
                                  "MR_small_bigendian.dcm", "SC_rgb_rle.dcm", "JPGExtended.dcm"])
def test_pydicom_data_transfer_syntaxes_decode(name):
    from pydicom.data import get_testdata_file

    img, _ = R.load_image(get_testdata_file(name))
    assert img.ndim == 2 and img.dtype == np.float32 and 0 <= img.min() and img.max() <= 1 and img.std() > 0.01


def test_nifti_and_npz(tmp_path):
    import nibabel as nib

    vol = np.zeros((30, 20, 10), np.int16) - 1000
    vol[10:20, 5:15, :] = 400
    nib.save(nib.Nifti1Image(vol, np.eye(4)), tmp_path / "v.nii.gz")
    assert R.sniff(tmp_path / "v.nii.gz") == "nifti"
    img, meta = R.load_image(tmp_path / "v.nii.gz", index=3)
    assert meta["modality"] == "CT" and img.shape == (20, 30)   # rotated: rows = y
    assert img.max() == pytest.approx((400 + 1000) / 2400)
    assert R.nifti_slice_indices(10, 3) == [2, 5, 7]
    assert R.nifti_slice_indices(2, 5) == [0, 1]
    np.savez(tmp_path / "m.npz", train_images=np.zeros((3, 28, 28), np.uint8), train_labels=np.ones((3, 1)),
             val_images=np.full((2, 28, 28), 255, np.uint8))
    assert R.sniff(tmp_path / "m.npz") == "npz"
    assert R.npz_image_keys(tmp_path / "m.npz") == [("train_images", 3, "train_labels"), ("val_images", 2, None)]


@pytest.mark.parametrize("bpe,descs,expected", [
    ("KNEE", (), "knee"), ("L SPINE", (), "spine"), ("Schulter li", (), "shoulder"), ("", ("XR CHEST PA",), "chest"),
    ("LEG", ("CT FEMUR SMITH",), "femur"), ("LEG", ("",), "leg"), ("EXTREMITY", (), "other"), (None, (None,), "unknown"),
    ("LOWER LIMB", ("AX femur",), "femur"), ("MANO", (), "hand"),
])
def test_body_part_vocabulary(bpe, descs, expected):
    assert V.normalise_body_part(bpe, *descs) == expected
    assert expected in V.BODY_PARTS


def test_view_vocabulary():
    assert V.normalise_view("AP") == "AP"
    assert V.normalise_view("LL") == "LAT"
    assert V.normalise_view("RAO") == "OBL"
    assert V.normalise_view("XYZ") == "other"
    assert V.normalise_view("", "knee lateral") == "LAT"
    assert V.normalise_view(None) == "unknown"


@pytest.mark.parametrize("kw", [dict(), dict(photometric="MONOCHROME1", window=(2000.0, 3000.0)),
                                dict(modality="CT", slope=1.0, intercept=-1024.0), dict(modality="MR")])
def test_lookup_table_path_equals_direct_transfer(kw):
    arr = ramp(400, 300, top=4095)          # > 65536 pixels: the lookup-table path
    ds = make_dicom(arr, **kw)
    img, _ = R.load_image(ds)
    direct = R.grey_transfer(arr, ds)(arr)
    np.testing.assert_allclose(img, direct, atol=1e-6)
    assert img.min() >= 0 and img.max() <= 1 and img.std() > 0.1


def test_lookup_table_path_signed_pixels():
    arr = (ramp(400, 300, top=4000).astype(np.int32) - 2000).astype(np.int16)   # negative values too
    ds = make_dicom(arr, modality="CT", slope=1.0, intercept=0.0)
    img, _ = R.load_image(ds)
    np.testing.assert_allclose(img, np.clip((arr.astype(np.float64) + 1000) / 2400, 0, 1), atol=1e-5)
    ds = make_dicom(arr)   # percentile window, lookup table over the int16 range
    img, _ = R.load_image(ds)
    np.testing.assert_allclose(img, R.grey_transfer(arr, ds)(arr), atol=1e-6)


def _direct_stored(img01, max_size):
    """The store's image by one BOX resize of the full-size [0, 1] image (the reference for quality)."""
    from radpretrain.data import intensity as I
    from radpretrain.data.intensity import to_stored

    nh, nw = I.target_size(*img01.shape, max_size)
    return to_stored(I._pil_resize(img01, nh, nw, Image.Resampling.BOX))


def _decoded_cases(tmp_path):
    rng = np.random.default_rng(7)
    u8 = rng.integers(0, 256, (90, 70), dtype=np.uint8)
    big8 = rng.integers(10, 240, (700, 300), dtype=np.uint8)
    Image.fromarray(u8).save(tmp_path / "a.png")
    Image.fromarray(big8).save(tmp_path / "b.jpg", quality=90)
    Image.fromarray(ramp(60, 50, top=4000)).save(tmp_path / "c16.png")
    Image.fromarray(np.stack([u8] * 3, -1)).save(tmp_path / "rgb.png")
    arr = ramp(400, 300, top=4095)  # > 65536 pixels: the window path
    noisy = np.clip(arr.astype(np.int32) + rng.integers(-30, 30, arr.shape), 0, 4095).astype(np.uint16)
    return [
        u8, big8, np.full((64, 64), 17, np.uint8), np.zeros((0, 0), np.uint8), ramp(40, 40, top=4095),
        tmp_path / "a.png", tmp_path / "b.jpg", tmp_path / "c16.png", tmp_path / "rgb.png",
        make_dicom(noisy), make_dicom(noisy, photometric="MONOCHROME1", window=(2000.0, 3000.0)),
        make_dicom(noisy, modality="CT", slope=1.0, intercept=-1024.0), make_dicom(noisy, modality="MR"),
        make_dicom((ramp(400, 300, top=4000).astype(np.int32) - 2000).astype(np.int16)),
        make_dicom(np.full((300, 300), 1000, np.uint16)), make_dicom(np.full((300, 300), 1000, np.uint16),
                                                                      window=(3000.0, 10.0)),
        make_dicom(noisy, VOILUTFunction="SIGMOID", window=(2000.0, 1500.0)),  # not a window: lookup table
    ]


@pytest.mark.parametrize("max_size", [512, 96, 37])
def test_decoded_equals_load_image_and_stores_load_stored(tmp_path, max_size):
    """What ingest uses (Decoded): load_image's image, meta and blank test; its stored pixels are load_stored's,
    to_stored(img01) without resizing, and close to one BOX resize of img01 with it."""
    from radpretrain.data import intensity as I
    from radpretrain.data.intensity import to_stored

    for case in _decoded_cases(tmp_path):
        try:
            img, meta = R.load_image(case, with_hash=True)
        except R.ReadError:
            continue
        dec = R.load_image(case, with_hash=True, decoded=True)
        assert dec.meta == meta or (np.isnan(meta["age_years"]) and
                                    {k: v for k, v in dec.meta.items() if k != "age_years"} ==
                                    {k: v for k, v in meta.items() if k != "age_years"})
        assert dec.shape == img.shape
        assert np.array_equal(dec.img01(), img) and dec.img01().dtype == np.float32
        assert dec.is_blank() == I.is_blank(img)
        if not img.size:
            continue
        got = dec.stored(max_size)
        stored, _ = R.load_stored(case, max_size)
        assert got.dtype == np.uint8 and np.array_equal(got, stored)
        assert got.shape == I.target_size(*img.shape, max_size)
        if max(img.shape) <= max_size:
            assert np.array_equal(got, to_stored(img))
        else:  # shrunk in two steps (block means, then BOX): close to one BOX resize of the full image
            direct = _direct_stored(img, max_size)
            assert abs(float(got.mean()) - float(direct.mean())) < 1.0
            if float(np.abs(np.diff(img, axis=1)).mean()) < 0.05:  # images, not pure noise (averaged differently)
                assert np.abs(got.astype(int) - direct).mean() < 1.0, (type(case), max_size)


def test_store_path_of_a_large_radiograph_is_close_to_the_full_size_pipeline():
    """A 12-bit radiograph 5x the stored size: block means of the raw pixels, then the window (no full-size
    float image). Where the window cuts into noise the window now acts on the averaged pixels."""
    from radpretrain.data import intensity as I
    from radpretrain.data.intensity import to_stored

    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:1280, 0:1024]
    raw = 600 + 1500 * (((yy - 600) / 400.0) ** 2 + ((xx - 500) / 300.0) ** 2 < 1) + rng.normal(0, 40, yy.shape)
    raw = np.clip(raw, 0, 4095).astype(np.uint16)
    for kw in (dict(), dict(photometric="MONOCHROME1"), dict(window=(1400.0, 2400.0)), dict(window=(1400.0, 1600.0))):
        ds = make_dicom(raw, **kw)
        dec = R.load_image(ds, decoded=True)
        assert dec._raw is not None and dec._img is None  # the window path: no full-size float image made
        got = dec.stored(256)
        assert dec._img is None and got.shape == (256, 205)
        a, b = dec._affine
        if kw.get("window") == (1400.0, 1600.0):  # window 600..2200: the background noise straddles its end
            small_raw = Image.fromarray(raw.astype(np.float32)).resize((205, 256), Image.Resampling.BOX)
            want = to_stored(I.affine_clip(np.asarray(small_raw), a, b))  # resized first, then windowed
        else:  # windowing first, then one BOX resize of the full image: nearly the same pixels
            want = _direct_stored(dec.img01(), 256)
        diff = np.abs(got.astype(int) - want)
        assert diff.mean() < 1.0 and np.percentile(diff, 99) <= 12, (kw, diff.mean())


def test_native_pixels_are_read_without_a_copy_and_equal_pixel_array():
    """Uncompressed grey pixels: a read-only view of the pixel bytes, exactly pydicom's pixel_array
    (including its masking of bits above Bits Stored)."""
    from pydicom.pixels import pixel_array

    rng = np.random.default_rng(3)
    clean = rng.integers(0, 4096, (300, 260)).astype(np.uint16)
    dirty = clean | np.uint16(0x5000)                       # garbage above Bits Stored (12)
    signed = rng.integers(-2048, 2048, (300, 260)).astype(np.int16)
    signed_dirty = signed.copy()
    signed_dirty[0, :10] = 0x3000                           # positive garbage: sign-extends to negative
    for arr, bits in ((clean, 12), (dirty, 12), (signed, 12), (signed_dirty, 12), (clean, 16),
                      (rng.integers(0, 256, (300, 260)).astype(np.uint8), 8), (clean[:5, :7], 12)):
        ds = make_dicom(arr, bits=bits)
        stats = {}
        got = R._decode_frame(ds, 0, stats)
        want = pixel_array(ds, index=0)
        assert got.dtype == want.dtype and np.array_equal(got, want), (arr.dtype, bits)
        if arr is clean and bits == 12:
            assert not got.flags.writeable and stats["raw_max"] == clean.max()  # a view, no copy
        img, _ = R.load_image(ds)
        assert np.array_equal(img, R.dicom_to_unit(want, ds))


def test_blocked_window_pass_is_bit_identical():
    from radpretrain.data import intensity as I

    rng = np.random.default_rng(1)
    for dtype, lo, hi in ((np.uint16, 0, 4096), (np.int16, -3000, 3000)):
        x = rng.integers(lo, hi, (333, 517)).astype(dtype)
        for a, b in ((1 / 2047.3, -0.11), (-1 / 1500.0, 1.7)):
            ref = x.astype(np.float32)
            ref *= np.float32(a)
            ref += np.float32(b)
            np.clip(ref, 0.0, 1.0, out=ref)
            stats = {}
            out = I.affine_clip(x, a, b, stats=stats)
            assert np.array_equal(out, ref)
            assert (stats["raw_min"], stats["raw_max"]) == (x.min(), x.max())
            ends = I.affine_clip_values([x.min(), x.max()], a, b)
            assert (ends.min(), ends.max()) == (ref.min(), ref.max())


def test_pixels_mapped_from_the_file_equal_pixel_array(tmp_path):
    """read_dicom leaves large pixel data in the file; uncompressed frames are then mapped (no copy),
    with exactly pydicom's values, and a file too short for its pixels is still a decode_error."""
    from pydicom.pixels import pixel_array

    rng = np.random.default_rng(5)
    cases = {"u12": (rng.integers(0, 4096, (800, 700)).astype(np.uint16), 12),
             "dirty": (rng.integers(0, 4096, (800, 700)).astype(np.uint16) | np.uint16(0x8000), 12),
             "s12": (rng.integers(-2048, 2048, (800, 700)).astype(np.int16), 12),
             "u8": (rng.integers(0, 256, (1200, 1000)).astype(np.uint8), 8)}
    for name, (arr, bits) in cases.items():
        path = make_dicom(arr, tmp_path / f"{name}.dcm", bits=bits)
        ds = R.read_dicom(path)
        assert ds.get_item(0x7FE00010, keep_deferred=True).value is None  # left in the file
        got = R._decode_frame(ds, 0, {})
        want = pixel_array(pydicom.dcmread(path), index=0)
        assert got.dtype == want.dtype and np.array_equal(got, want), name
        if name == "u12":
            assert isinstance(got.base, np.ndarray) or not got.flags.owndata  # a view of the mapped file
            assert not got.flags.writeable
    deflated = pydicom.dcmread(tmp_path / "u12.dcm")  # deflate: the pixel data is not at a file offset
    deflated.file_meta.TransferSyntaxUID = pydicom.uid.DeflatedExplicitVRLittleEndian
    deflated.save_as(tmp_path / "deflated.dcm", enforce_file_format=True)
    got = R._decode_frame(R.read_dicom(tmp_path / "deflated.dcm"), 0, {})
    assert np.array_equal(got, cases["u12"][0])
    data = (tmp_path / "u12.dcm").read_bytes()
    (tmp_path / "cut.dcm").write_bytes(data[: len(data) - 100_000])
    with pytest.raises(R.ReadError) as e:
        R.load_image(tmp_path / "cut.dcm")
    assert e.value.reason == "decode_error"


@pytest.mark.parametrize("max_size", [512, 300, 150])
def test_stored_pixels_do_not_depend_on_the_decoder_preparing_them(tmp_path, max_size):
    """load_image(..., max_size) lets the decoder sum the first resize step on its pass over the pixels
    (block_mean_checked); the stored image is the same as without it, also with bits above Bits Stored."""
    from radpretrain.data import intensity as I

    rng = np.random.default_rng(6)
    yy, xx = np.mgrid[0:1500, 0:1100]
    base = (800 + 1200 * np.sin(yy / 90.0) ** 2 + rng.normal(0, 30, yy.shape)).clip(0, 4095)
    arrs = {"clean": base.astype(np.uint16), "MONOCHROME1": base.astype(np.uint16),
            "dirty": base.astype(np.uint16) | np.uint16(0x4000), "signed": (base - 2048).astype(np.int16)}
    for name, arr in arrs.items():
        path = make_dicom(arr, tmp_path / f"{name}.dcm",
                          photometric="MONOCHROME1" if name == "MONOCHROME1" else "MONOCHROME2")
        prepared = R.load_image(path, decoded=True, max_size=max_size)
        plain = R.load_image(path, decoded=True)
        if name != "dirty":  # garbage above Bits Stored: the fused pass stops, pydicom's correction is applied
            assert prepared._block_means is not None and prepared._block_means[0] == I.shrink_factor(1500, 1100, max_size)
            assert np.array_equal(prepared._block_means[1], I.block_mean(plain._raw, prepared._block_means[0]))
        got = prepared.stored(max_size)
        assert np.array_equal(got, plain.stored(max_size)) and np.array_equal(got, R.load_stored(path, max_size)[0])
        assert got.shape == I.target_size(1500, 1100, max_size)
        assert np.array_equal(prepared.img01(), plain.img01())


def test_text_facts_is_body_part_and_view_in_one_scan():
    rng = np.random.default_rng(0)
    words = ["knee", "AP", "lat", "x", "12345", "/", "_", ".", "hand", "PA", "oblique", "chest", "L", "png"]
    for _ in range(500):
        text = "".join(rng.choice(words, size=rng.integers(0, 8)))
        view = V.normalise_view(None, text)
        assert V.text_facts(text) == (V.body_part_from_text(text), None if view == "unknown" else view)


@pytest.mark.parametrize("case", ["noisy", "constant", "two_levels", "one_level_in_middle_row", "thin", "large"])
def test_8bit_statistics_shortcut_gives_the_same_decoded_image(tmp_path, case):
    """8-bit grey files stored at full size skip the pass over all pixels when a few pixels already span two
    grey levels: blank/constant tests, the stored pixels and the [0, 1] image are those of the full pass."""
    rng = np.random.default_rng(1)
    arr = {"noisy": lambda: rng.integers(0, 256, (60, 50)),
           "constant": lambda: np.full((60, 50), 9),
           "two_levels": lambda: np.where(rng.random((60, 50)) < 0.5, 100, 101),
           "one_level_in_middle_row": lambda: np.pad(np.full((1, 50), 200), ((30, 29), (0, 0)), constant_values=199),
           "thin": lambda: rng.integers(0, 256, (60, 1)),
           "large": lambda: rng.integers(0, 256, (700, 300))}[case]().astype(np.uint8)
    path = tmp_path / "a.png"
    Image.fromarray(arr).save(path)
    data = path.read_bytes()
    import io

    quick = R.load_image(io.BytesIO(data), kind="png", decoded=True, max_size=512)
    full = R.load_image(io.BytesIO(data), kind="png", decoded=True, max_size=None)  # always the full pass
    assert quick.is_blank() == full.is_blank() == R.I.is_blank(full.img01())
    assert quick.meta["raw_constant"] == full.meta["raw_constant"] == bool(arr.min() == arr.max())
    assert np.array_equal(quick.stored(512), full.stored(512)) and np.array_equal(quick.img01(), full.img01())
    assert quick.meta == full.meta


def test_content_hash_is_xxh3_128_of_dtype_shape_and_bytes():
    import xxhash

    seen = set()
    for a in (np.arange(12, dtype=np.uint8).reshape(3, 4), np.arange(12, dtype=np.uint8).reshape(4, 3),
              np.arange(12, dtype=np.uint16).reshape(3, 4), np.arange(12, dtype=np.uint8).reshape(4, 3).T):
        want = xxhash.xxh3_128_hexdigest(f"{a.dtype.str}{a.shape}".encode() + np.ascontiguousarray(a).tobytes())
        assert R.content_hash(a) == want == R.content_hash(a.copy()) and len(want) == 32
        seen.add(want)
    assert len(seen) == 4  # same bytes in another shape or dtype, or another layout: another hash
    assert R.content_hash(np.zeros((3, 4), np.uint8)) != R.content_hash(np.zeros((4, 3), np.uint8))
    b = np.zeros((224, 224), np.uint8)
    c = b.copy()
    c[111, 37] = 1  # one pixel one grey level brighter
    assert R.content_hash(b) != R.content_hash(c)


def dicom_with_rows(path, arr, rows, tail=b""):
    """A DICOM of ``arr`` whose header says ``rows`` rows (its pixel data left as it is, plus ``tail``)."""
    ds = make_dicom(arr)
    ds.PixelData = arr.tobytes() + tail
    ds.Rows = rows
    ds.save_as(path, enforce_file_format=True)
    return path


@pytest.mark.parametrize("h,w", [(64, 80), (1200, 1000)])  # the second leaves its pixel data in the file (mapped)
def test_pixel_length_mismatch_is_quarantined_not_cut(tmp_path, h, w):
    arr = np.random.default_rng(1).integers(0, 4096, (h, w)).astype(np.uint16)
    halved = dicom_with_rows(tmp_path / "halved.dcm", arr, h // 2)            # pixel data twice Rows x Columns
    doubled = dicom_with_rows(tmp_path / "doubled.dcm", arr, h * 2)           # pixel data half of it
    padded = dicom_with_rows(tmp_path / "padded.dcm", arr, h, tail=bytes(128))  # zero padding: harmless
    for path in (halved, doubled):
        with pytest.raises(R.ReadError) as e:
            R.load_image(path)
        assert e.value.reason == "pixel_length"
    img, _ = R.load_image(padded)
    assert img.shape == (h, w)
    assert R.load_image(pydicom.data.get_testdata_file("MR_small_padded.dcm"))[0].shape == (64, 64)
