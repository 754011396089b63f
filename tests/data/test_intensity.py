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


def test_pil_resize_is_identical_to_a_copied_pil_image():
    """The float array is mapped into PIL without a copy: same pixels as Image.frombuffer's copy."""
    from PIL import Image

    rng = np.random.default_rng(3)
    for shape, size in (((2560, 2048), (512, 410)), ((333, 517), (49, 77)), ((90, 31), (40, 14))):
        img = rng.random(shape, dtype=np.float32)
        h, w = shape
        for resample in (Image.Resampling.BOX, Image.Resampling.BILINEAR):
            out = I._pil_resize(img, *size, resample)
            im = Image.frombuffer("F", (w, h), img, "raw", "F", 0, 1)
            ref = np.clip(np.asarray(im.resize(size[::-1], resample=resample), dtype=np.float32), 0, 1)
            assert out.dtype == np.float32 and np.array_equal(out, ref)
    assert np.array_equal(I._float_image(img, w, h), img)  # the mapped image holds the array's values


def _block_mean_reference(x, f):
    h, w = x.shape
    out = np.zeros((-(-h // f), -(-w // f)))
    for i in range(out.shape[0]):
        for j in range(out.shape[1]):
            out[i, j] = x[i * f:(i + 1) * f, j * f:(j + 1) * f].astype(np.float64).mean()  # partial blocks too
    return out


@pytest.mark.parametrize("dtype,lo,hi", [(np.uint16, 0, 65536), (np.uint16, 0, 4096), (np.int16, -32768, 32768),
                                         (np.int16, -100, 100), (np.uint8, 0, 256), (np.float32, 0, 1),
                                         (np.int32, -10 ** 6, 10 ** 6), (np.bool_, 0, 2)])
def test_block_mean_is_the_mean_of_each_block(dtype, lo, hi):
    rng = np.random.default_rng(0)
    for shape, f in (((23, 17), 5), ((20, 15), 5), ((7, 9), 3), ((40, 33), 2), ((30, 30), 30), ((64, 64), 7)):
        x = (rng.random(shape) if dtype == np.float32 else rng.integers(lo, hi, shape)).astype(dtype)
        ref = _block_mean_reference(x, f)
        for value_range in (None, (int(x.min()), int(x.max())) if x.dtype.kind in "uib" else None):
            got = I.block_mean(x, f, value_range)
            assert got.dtype == np.float32 and got.shape == ref.shape
            assert np.abs(got - ref).max() <= 1e-6 * max(1.0, float(np.abs(ref).max())), (shape, f, value_range)


def test_percentiles_equal_numpy():
    rng = np.random.default_rng(1)
    for n in (1, 2, 5, 100, 1001, 65536):
        for x in (rng.integers(0, 4096, n).astype(np.uint16), rng.normal(0, 1, n).astype(np.float32),
                  rng.integers(-3000, 3000, n).astype(np.int16)):
            q = [0.5, 50, 99.5]
            assert np.allclose(I.percentiles(x, q), np.percentile(x, q), rtol=1e-6, atol=1e-6)  # numpy: float32 steps


def test_sample_reads_a_grid_and_keeps_small_images_whole():
    small = np.arange(200 * 300).reshape(200, 300)
    assert np.array_equal(I._sample(small), small.ravel())
    big = np.arange(1000 * 700).reshape(1000, 700)
    s = I._sample(big)
    assert 0.25 * I.SAMPLE_PIXELS < s.size <= I.SAMPLE_PIXELS
    assert np.array_equal(s, big[::4, ::4].ravel())  # ceil(sqrt(700000 / 65536)) = 4


def test_two_step_resize_sizes_and_closeness():
    """Images >= twice the target: block means then the exact size; the shape is that of one resize, and the
    pixels those of one BOX resize up to the different averaging (tiny on smooth images)."""
    from PIL import Image

    yy, xx = np.mgrid[0:1300, 0:900]
    img = (0.5 + 0.4 * np.sin(yy / 60.0) * np.cos(xx / 45.0)).astype(np.float32)
    for size in (512, 300, 97, 450):
        out = I.resize_max(img, size)
        nh, nw = I.target_size(1300, 900, size)
        assert out.shape == (nh, nw) and max(out.shape) == size and out.dtype == np.float32
        one = I._pil_resize(img, nh, nw, Image.Resampling.BOX)
        assert float(np.abs(out - one).mean()) < 1 / 255, size  # under one stored grey level
        assert out.min() >= 0 and out.max() <= 1
    assert I.shrink_factor(1300, 900, 512) == 2 and I.shrink_factor(1300, 900, 700) == 1
    assert I.shrink_factor(100, 90, 512) == 1


def test_window_on_block_means_equals_the_window_first_when_nothing_is_clipped():
    """resize_max_window averages raw values before the window: the same as windowing first wherever the
    window does not clip (the window is affine there)."""
    rng = np.random.default_rng(2)
    raw = (1000 + rng.integers(0, 2000, (1100, 830))).astype(np.uint16)
    a, b = 1.0 / 4000.0, -0.1  # 1000..3000 -> 0.15..0.65: nothing clipped
    got = I.resize_max_window(raw, a, b, 256, (int(raw.min()), int(raw.max())))
    want = I.resize_max(I.affine_clip(raw, a, b), 256)
    assert got.shape == want.shape == I.target_size(1100, 830, 256)
    assert float(np.abs(got - want).max()) < 1e-5
    assert np.array_equal(I.resize_max_window(raw[:200, :150], a, b, 256), I.affine_clip(raw[:200, :150], a, b))
