"""The GPU code path of evaluate (device choice, autocast, fused AdamW, image feeder, device-side
augmentation) run on CPU tensors, so CI covers its logic without a GPU."""

import io

import numpy as np
import pytest
import torch
from torch import nn

from radpretrain.errors import UserError
from radpretrain.evaluate.device import ImageFeeder, Runtime, choose_feed, resolve_device
from radpretrain.evaluate.features import extract_features
from radpretrain.evaluate.metrics import metric_value
from radpretrain.evaluate.protocols import finetune
from radpretrain.transforms import finetune_augment

GPU_LIKE = Runtime(torch.device("cpu"), torch.bfloat16, True, "cpu standing in for a GPU")


# -- device choice ------------------------------------------------------------------------------

@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the messages of a machine without CUDA")
def test_device_choice_without_cuda():
    dev, note = resolve_device("auto")
    assert dev.type == "cpu" and "running on the CPU" in note
    assert resolve_device("cpu")[0] == torch.device("cpu")
    for spec in ("cuda", "cuda:1"):
        with pytest.raises(UserError, match=r"CUDA is not available") as e:
            resolve_device(spec)
        assert "\n" not in str(e.value) and f"--device {spec}" in str(e.value)
    with pytest.raises(UserError, match="choose auto"):
        resolve_device("gpu")


def test_device_choice_with_a_gpu(monkeypatch):
    """auto picks the current GPU and names it; a missing index is refused (CUDA faked: no kernel runs)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda d=None: "Fake GPU 141GB")
    dev, note = resolve_device("auto")
    assert dev == torch.device("cuda", 0) and "Fake GPU 141GB" in note
    assert resolve_device("cuda:1")[0] == torch.device("cuda", 1)
    with pytest.raises(UserError, match="only 2 CUDA device"):
        resolve_device("cuda:2")


def test_feed_mode_follows_free_memory():
    gpu = torch.device("cuda", 0)
    assert choose_feed(10**9, torch.device("cpu")) == "host"
    assert choose_feed(400 * 2**20, gpu, free_bytes=100 * 2**30) == "device"   # 8,192 images at 224 px
    assert choose_feed(60 * 2**30, gpu, free_bytes=100 * 2**30) == "pinned"     # too large: stream it


# -- feeder ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("mode", ["host", "device", "pinned"])
def test_feeder_modes_give_the_same_batches(mode, toys):
    imgs, _ = toys.images(23)
    order = np.random.default_rng(1).permutation(23)
    feeder = ImageFeeder(imgs, "cpu", mode=mode, pin=False)
    batches = list(feeder.batches(order, 5, min_size=2))  # 5+5+5+5+3; kept, so reused buffers would show
    assert [len(b.index) for b in batches] == [5, 5, 5, 5, 3]
    for k, b in enumerate(batches):
        expect = imgs[order[5 * k : 5 * k + 5]].float() / 255
        assert torch.allclose(b.x, expect, rtol=1e-6, atol=1e-7) and b.x.dtype == torch.float32
        assert np.array_equal(b.index_t.numpy(), b.index)
    # a last batch below min_size is skipped (BatchNorm cannot train on one sample)
    assert [len(b.index) for b in feeder.batches(order[:11], 5, min_size=2)] == [5, 5]
    assert len(list(feeder.batches(None, 10))) == 3


# -- the training step's pieces ---------------------------------------------------------------------

def test_finetune_augment_keeps_the_batch_on_its_device():
    """On a non-CPU device the augmented batch stays where it is (meta here: a CPU tensor mixed into
    it would have failed), draws come from the generator's device, and the shape is kept; the same
    generator state gives the same batch."""
    o = {"flip": True, "rotate": 10, "crop": 0.1, "brightness": 0.1, "contrast": 0.1}
    x = torch.rand(6, 1, 16, 16)
    out = finetune_augment(x.to("meta"), o, torch.Generator())
    assert out.device.type == "meta" and out.shape == x.shape
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    assert torch.equal(finetune_augment(x, o, g1), finetune_augment(x, o, g2))


def test_runtime_autocast_fused_adamw_and_generator():
    cpu = Runtime.cpu()
    assert cpu.amp_dtype is None and not cpu.fused_adamw and cpu.precision == "float32"
    p = [nn.Parameter(torch.zeros(3))]
    assert not cpu.adamw(p, 1e-3, 0.0).defaults["fused"]
    assert GPU_LIKE.adamw(p, 1e-3, 0.0).defaults["fused"] is True
    with GPU_LIKE.autocast():
        assert nn.Linear(4, 2)(torch.rand(3, 4)).dtype == torch.bfloat16
    g = torch.Generator()
    assert cpu.generator(0, g) is g  # the CPU keeps one generator: draws interleave as they always did
    d = GPU_LIKE.describe(feed="device")
    assert d["precision"] == "bfloat16 autocast" and d["adamw"] == "fused" and d["images"] == "device"


def test_bf16_features_match_float32_within_rounding(toys):
    imgs, _ = toys.images(40, size=24)
    f32 = extract_features(toys.encoder(seed=0), imgs, batch_size=16)
    bf16 = extract_features(toys.encoder(seed=0), ImageFeeder(imgs, "cpu", mode="pinned", pin=False), batch_size=16,
                            runtime=GPU_LIKE)
    assert bf16.dtype == np.float32 and bf16.shape == f32.shape
    rel = np.linalg.norm(bf16 - f32) / np.linalg.norm(f32)
    assert 0 < rel < 0.05  # bf16 rounding (8 bits of mantissa), not another computation


def test_finetune_on_the_gpu_path_learns(monkeypatch, toys):
    """bf16 autocast + fused AdamW + the pinned feeder, on CPU tensors: it trains, and it really used them."""
    imgs, y = toys.images(160)
    tr, va, te = np.arange(0, 100), np.arange(100, 130), np.arange(130, 160)
    opts = {"epochs": 6, "lr": 2e-2, "batch_size": 20, "patience": 3, "rotate": 0, "crop": 0}
    used = {"fused": [], "autocast": 0}
    adamw = torch.optim.AdamW

    def spy_adamw(params, **kw):
        used["fused"].append(kw.get("fused"))
        return adamw(params, **kw)

    monkeypatch.setattr(torch.optim, "AdamW", spy_adamw)
    real_autocast = Runtime.autocast

    def spy_autocast(self):
        used["autocast"] += 1
        return real_autocast(self)

    monkeypatch.setattr(Runtime, "autocast", spy_autocast)
    feeder = ImageFeeder(imgs, "cpu", mode="pinned", pin=False)
    r = finetune(lambda: toys.encoder(seed=0), "binary", 2, feeder, y, tr, va, te, opts, runtime=GPU_LIKE)
    assert metric_value("auc", "binary", y[te], r.test_scores) > 0.85
    assert used["fused"] and all(f is True for f in used["fused"]) and used["autocast"] > 10
    assert np.all(np.isfinite(r.test_scores)) and r.test_scores.dtype.kind == "f"


@pytest.mark.parametrize("mode", ["device", "pinned"])
def test_cpu_finetune_is_independent_of_the_feed_mode(mode, toys):
    """Feeding changes where bytes live, never the numbers: bit-identical to the plain CPU path."""
    imgs, y = toys.images(90, seed=2)
    tr, va, te = np.arange(0, 60), np.arange(60, 75), np.arange(75, 90)
    opts = {"epochs": 2, "lr": 1e-2, "batch_size": 16}
    ref = finetune(lambda: toys.encoder(seed=0), "binary", 2, imgs, y, tr, va, te, opts)
    got = finetune(lambda: toys.encoder(seed=0), "binary", 2, ImageFeeder(imgs, "cpu", mode=mode, pin=False), y,
                   tr, va, te, opts, runtime=Runtime.cpu())
    assert np.array_equal(ref.test_scores, got.test_scores)
    assert ref.chosen["tried"][0]["history"] == got.chosen["tried"][0]["history"]


def test_finetune_reports_progress_per_batch(toys):
    imgs, y = toys.images(70, seed=3)
    tr, va, te = np.arange(0, 41), np.arange(41, 55), np.arange(55, 70)

    class Bar:
        n = 0
        post = None

        def update(self, k=1):
            self.n += k

        def set_postfix(self, **kw):
            self.post = kw

    from radpretrain.evaluate.protocols import finetune_steps

    bar = Bar()
    opts = {"epochs": 3, "batch_size": 8, "patience": None}  # 41 = 5 x 8 + 1: the single last image is skipped
    finetune(lambda: toys.encoder(seed=0), "binary", 2, imgs, y, tr, va, te, opts, progress=bar)
    assert bar.n == finetune_steps(41, opts) == 15 and bar.post["epoch"] == 3
    bar = Bar()
    finetune(lambda: toys.encoder(seed=0), "binary", 2, imgs, y, tr, va, te,
             {**opts, "epochs": 20, "patience": 1, "lr": 1.0}, progress=bar)
    assert bar.n == finetune_steps(41, {**opts, "epochs": 20})  # early stop: the bar still completes


def test_progress_bar_on_a_terminal_and_quiet_without(caplog):
    from radpretrain.evaluate.progress import CellProgress

    class Tty(io.StringIO):
        def isatty(self):
            return True

    tty = Tty()
    p = CellProgress(3, file=tty)
    with caplog.at_level("INFO", logger="radpretrain"):
        line = p.finished("scratch / linear fold 0 fraction 1", 0.5, "val auc 0.9")
        p.finished("scratch / linear fold 1 fraction 1", 0.5)
    p.close()
    assert "[1/3] scratch / linear fold 0 fraction 1: val auc 0.9" in line and "left" in line
    assert "evaluate" in tty.getvalue() and "2/3" in tty.getvalue()
    assert "[2/3]" in caplog.text
    quiet = io.StringIO()  # not a terminal: no bar, the log lines remain
    p = CellProgress(2, file=quiet)
    p.finished("x", 0.1)
    p.close()
    assert quiet.getvalue() == ""


# -- on a real GPU (skipped without one; run them in a GPU session) -------------------------------

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@cuda
@pytest.mark.parametrize("mode", ["device", "pinned"])
def test_on_cuda_finetune_learns_with_every_feed_mode(mode, toys):
    rt = Runtime.for_device("cuda")
    assert rt.fused_adamw and rt.name
    imgs, y = toys.images(160)
    tr, va, te = np.arange(0, 100), np.arange(100, 130), np.arange(130, 160)
    opts = {"epochs": 6, "lr": 2e-2, "batch_size": 20, "patience": 3}  # augmentation on: a CUDA generator
    feeder = ImageFeeder(imgs, rt.device, mode=mode)
    assert feeder.mode == mode
    r = finetune(lambda: toys.encoder(seed=0), "binary", 2, feeder, y, tr, va, te, opts, runtime=rt)
    assert metric_value("auc", "binary", y[te], r.test_scores) > 0.85


@cuda
def test_on_cuda_features_match_the_cpu_within_bf16_rounding(toys):
    rt = Runtime.for_device("cuda")
    imgs, _ = toys.images(64, size=24)
    cpu = extract_features(toys.encoder(seed=0), imgs, batch_size=16)
    gpu = extract_features(toys.encoder(seed=0), ImageFeeder(imgs, rt.device), batch_size=16, runtime=rt)
    assert np.linalg.norm(gpu - cpu) / np.linalg.norm(cpu) < 0.05
    x = torch.rand(6, 1, 16, 16, device=rt.device)
    out = finetune_augment(x, {"rotate": 10, "crop": 0.1, "brightness": 0.1, "contrast": 0.1},
                           torch.Generator(device=rt.device).manual_seed(0))
    assert out.device == x.device and out.shape == x.shape and 0 <= float(out.min()) <= float(out.max()) <= 1
