"""The device-side letterbox (batched torch) against the loader's (Pillow): same masks, pixels within 1/255.

Tolerance: Pillow rounds to 8 bits after each of its two passes (half a grey level each, and each
pass is a convex combination), the device kernel does not round, so every pixel may differ by up
to one grey level (1/255); the 1e-5 on top covers float32 rounding on any CPU.
"""

import numpy as np
import pytest
import torch

from radpretrain.data.dataset import StoreDataset
from radpretrain.data.geometry import (
    collate_deferred, finish_batch, fit_size, letterbox, letterbox_batch, prepare_for_device, reduce_factors, stretch)

TOL = 1 / 255 + 1e-5


def image(kind: int, h: int, w: int, rng) -> np.ndarray:
    if kind == 0:  # noise: every pixel differs from its neighbours, the hardest case for resampling
        return rng.integers(0, 256, (h, w)).astype(np.uint8)
    if kind == 1:  # smooth structure with edges
        yy, xx = np.mgrid[:h, :w]
        return ((np.sin(xx / 3.0) * np.cos(yy / 5.0) + 1) * 127.5).astype(np.uint8)
    img = np.zeros((h, w), dtype=np.uint8)  # a bright square on black: hard edges
    img[h // 4 : 3 * h // 4, w // 4 : 3 * w // 4] = 255
    return img


def device_letterbox(imgs, target, keep_aspect=True):
    items = []
    for i, img in enumerate(imgs):
        px, g = prepare_for_device(img, target, keep_aspect=keep_aspect)
        items.append({"pixels": torch.from_numpy(np.array(px))[None], "geometry": torch.from_numpy(g), "index": i})
    b = collate_deferred(items)
    return letterbox_batch(b["pixels"], b["geometry"])


@pytest.mark.parametrize("target", [32, 64, 224, (48, 80)])
def test_device_letterbox_matches_the_loader_letterbox(target):
    rng = np.random.default_rng(hash(str(target)) % 2**32)
    # downscaling by < 2 (no box reduction), by >= 4 (Pillow reduces first), upscaling, exact fit, extreme aspect
    sizes = [(512, 448), (700, 300), (300, 700), (257, 513), (40, 30), (224, 224), (64, 64), (1000, 37), (33, 650)]
    imgs = [image(k % 3, h, w, rng) for k, (h, w) in enumerate(sizes)]
    out, valid = device_letterbox(imgs, target)
    for k, img in enumerate(imgs):
        ref, rv = letterbox(img, target)
        assert out.shape[2:] == ref.shape and out.dtype == torch.float32 and valid.dtype == torch.bool
        np.testing.assert_array_equal(valid[k, 0].numpy(), rv, err_msg=f"mask of {img.shape}")
        diff = np.abs(out[k, 0].numpy() - ref)
        assert diff.max() <= TOL, (img.shape, target, diff.max() * 255)
        assert np.all(out[k, 0].numpy()[~rv] == 0)


def test_the_reduction_path_is_exercised_and_stretch_matches():
    assert fit_size(1000, 37, 64)[:2] == (64, 2) and reduce_factors(1000, 37, 64, 2) == (7, 9)
    rng = np.random.default_rng(1)
    imgs = [image(0, 600, 410, rng), image(1, 90, 300, rng)]
    out, valid = device_letterbox(imgs, (40, 56), keep_aspect=False)
    assert valid.all()
    for k, img in enumerate(imgs):
        ref, _ = stretch(img, (40, 56))
        assert np.abs(out[k, 0].numpy() - ref).max() <= TOL


def test_store_dataset_defers_the_resize_to_the_batch(tmp_path):
    from .test_dataset import write_sized_store

    sizes = [(120, 80), (60, 200), (512, 448), (30, 30)]
    root = write_sized_store(tmp_path / "ds", sizes)
    eager = StoreDataset(root, image_size=48, fields=("body_part",))
    lazy = StoreDataset(root, image_size=48, fields=("body_part",), defer_resize=True)
    item = lazy[2]
    # 512 x 448 into 48 px: Pillow box-reduces by 5 first, and so do the workers (less to send)
    assert "image" not in item and item["pixels"].dtype == torch.uint8 and item["pixels"].shape == (1, 103, 90)
    loader = torch.utils.data.DataLoader(lazy, batch_size=4, collate_fn=lazy.collate)
    (batch,) = list(loader)
    assert batch["pixels"].shape == (4, 1, 120, 100) and batch["geometry"].shape == (4, 10)  # padded to the largest
    done = finish_batch(batch)
    ref = eager.collate([eager[i] for i in range(4)])
    assert set(done) == set(ref) and done["body_part"] == ref["body_part"]
    assert torch.equal(done["index"], ref["index"]) and torch.equal(done["valid"], ref["valid"])
    assert (done["image"] - ref["image"]).abs().max() <= TOL
    with pytest.raises(ValueError, match="per-sample transform"):
        StoreDataset(root, image_size=48, transform=lambda s: s, defer_resize=True)


def test_one_output_shape_per_batch():
    rng = np.random.default_rng(2)
    a = prepare_for_device(image(0, 50, 60, rng), 32)
    b = prepare_for_device(image(0, 50, 60, rng), (32, 16))
    batch = collate_deferred([{"pixels": torch.from_numpy(np.array(p))[None], "geometry": torch.from_numpy(g)}
                              for p, g in (a, b)])
    with pytest.raises(ValueError, match="same output shape"):
        letterbox_batch(batch["pixels"], batch["geometry"])
