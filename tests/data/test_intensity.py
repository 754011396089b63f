"""Intensity rules: windows, CT/MR, bit depth, colour, resizing, blank detection."""

import numpy as np
import pytest

from radpretrain.data import intensity as I


def test_window_maps_and_clips():
    x = np.array([-10, 0, 50, 100, 200], dtype=np.int16)
    np.testing.assert_allclose(I.window(x, 0, 100), [0, 0, 0.5, 1, 1])
    assert I.window(x, 5, 5).max() == 0  # degenerate window -> zeros, no division by zero


def test_percentile_window_ignores_outliers():
    rng = np.random.default_rng(0)
    x = rng.uniform(1000, 2000, size=(200, 200))
    x[0, :5] = 60000  # burnt-in text / marker
    out = I.percentile_window(x)
    assert out.dtype == np.float32 and out.min() == 0 and out.max() == 1
    assert 0.4 < float(np.median(out)) < 0.6    # the outliers did not squash the image


def test_ct_window_and_mr():
    hu = np.array([-2000, -1000, 200, 1400, 3000], dtype=np.float32)
    np.testing.assert_allclose(I.ct_window(hu), [0, 0, 0.5, 1, 1])
    mr = np.linspace(0, 1000, 10001).reshape(1, -1)
    out = I.mr_normalise(mr, 99.5)
    assert out.max() == 1.0 and abs(float(out[0, 5000]) - 0.5 / 0.995) < 1e-3


def test_scale_by_depth():
    np.testing.assert_allclose(I.scale_by_depth(np.array([0, 255], np.uint8)), [0, 1])
    twelve = np.array([0, 4095, 2048], np.uint16)
    np.testing.assert_allclose(I.scale_by_depth(twelve), [0, 1, 2048 / 4095], rtol=1e-6)
    sixteen = np.array([0, 65535], np.uint16)
    np.testing.assert_allclose(I.scale_by_depth(sixteen), [0, 1])
    assert I.integer_bits(np.array([300], np.uint16)) == 9


def test_to_grey_luma():
    rgb = np.zeros((2, 2, 3), np.uint8)
    rgb[..., 1] = 255
    np.testing.assert_allclose(I.to_grey(rgb), 0.587 * 255, rtol=1e-5)


def test_resize_keeps_aspect_and_averages():
    img = np.zeros((1000, 400), np.float32)
    img[::2, :] = 1.0  # one-pixel stripes: aliasing would give 0 or 1, area averaging ~0.5
    out = I.resize_max(img, 250)
    assert out.shape == (250, 100)
    assert abs(float(out.mean()) - 0.5) < 0.02 and float(out.std()) < 0.05
    small = np.ones((40, 30), np.float32)
    assert I.resize_max(small, 512).shape == (40, 30)  # never enlarged


def test_is_blank():
    assert I.is_blank(np.full((50, 50), 0.3, np.float32))
    x = np.full((50, 50), 0.3, np.float32)
    x[10, 10] = 0.9
    assert not I.is_blank(x)


def test_resize_is_identical_to_a_copied_pil_image():
    """resize_max maps the float array into PIL without a copy: same pixels as Image.frombuffer's copy."""
    from PIL import Image

    rng = np.random.default_rng(3)
    for shape, size in (((2560, 2048), 512), ((333, 517), 77), ((90, 31), 40)):
        img = rng.random(shape, dtype=np.float32)
        h, w = shape
        out = I.resize_max(img, size)
        im = Image.frombuffer("F", (w, h), img, "raw", "F", 0, 1)
        ref = np.clip(np.asarray(im.resize(out.shape[::-1], resample=Image.Resampling.BOX), dtype=np.float32), 0, 1)
        assert out.dtype == np.float32 and np.array_equal(out, ref)
    assert np.array_equal(I._float_image(img, w, h), img)  # the mapped image holds the array's values
