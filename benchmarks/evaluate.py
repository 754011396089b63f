"""Evaluate speed: frozen-feature extraction and one fine-tuning epoch, in images/s, per backbone.

    python benchmarks/evaluate.py [--device auto|cpu|cuda|cuda:N] [--quick] [--archs resnet50,...]
                                  [--image-size 224] [--feature-batch 64] [--finetune-batch 32]

Runs ``evaluate``'s own code paths (``radpretrain.evaluate``: :class:`Runtime`, :class:`ImageFeeder`,
:func:`extract_features`, :func:`finetune`): on a GPU bf16 autocast, channels_last for CNNs,
fused AdamW, the images as ``uint8`` on the device (or pinned host buffers), augmentation on the
device.  Random weights and random ``uint8`` images: speed depends on neither.

- ``features``: images/s of :func:`extract_features` over ``--n-features`` images, after one
  untimed warm-up batch (kernel selection, allocator);
- ``finetune``: images/s of the training batches of one :func:`finetune` epoch (forward,
  backward, AdamW step, augmentation and feeding), timed from the end of the first
  ``--warmup-batches`` batches to the end of the last (the device is synchronised at those two
  points only), so validation and model building are not counted.

Targets (issue 17), on an H100/H200-class GPU, ResNet-50 at 224 px, bf16: features >= 10,000
images/s, fine-tuning >= 3,000 images/s.  ``--quick`` is a smoke test of this script (64 px, a few
images per backbone; on a CPU about a minute with 2 cores); its figures are not measurements.  Batch
sizes default to ``evaluate``'s (``batch_size=64`` for features, ``finetune.batch_size=32``).
Prints one JSON line last.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import time

import numpy as np
import torch

from radpretrain.evaluate.device import ImageFeeder, Runtime, resolve_device
from radpretrain.evaluate.features import extract_features
from radpretrain.evaluate.inits import InitEncoder
from radpretrain.evaluate.options import option_defaults
from radpretrain.evaluate.protocols import finetune
from radpretrain.models.backbones import create_backbone, is_vit, prefers_channels_last, resolve_arch

ARCHS = ("resnet50", "tf_efficientnet_lite0", "vit_base_patch16_224")
TARGETS = {"resnet50": {"features_images_per_s": 10_000, "finetune_images_per_s": 3_000}}


class EpochClock:
    """A progress stand-in for :func:`finetune`: times its training batches (``update`` per batch)."""

    def __init__(self, device: torch.device, skip: int, total: int):
        self.device, self.skip, self.total = device, int(skip), int(total)
        self.batches = 0
        self.t0 = self.t1 = None

    def _now(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    def update(self, n: int = 1) -> None:
        before = self.batches
        self.batches += n
        if before < self.skip <= self.batches:
            self.t0 = self._now()
        if before < self.total <= self.batches:
            self.t1 = self._now()

    def set_postfix(self, *args, **kwargs) -> None:
        pass

    def seconds(self) -> float:
        return float(self.t1 - self.t0)


def make_encoder(arch: str, image_size: int) -> InitEncoder:
    name = resolve_arch(arch)
    model = create_backbone(name, in_chans=1, pretrained=None, img_size=image_size if is_vit(name) else None)
    return InitEncoder(model, [0.5], [0.25])


def bench_arch(arch: str, rt: Runtime, image_size: int = 224, n_features: int = 2048, n_train: int = 1024,
               feature_batch: int = 64, finetune_batch: int = 32, warmup_batches: int = 2, seed: int = 0,
               feed: str | None = None) -> dict:
    """Feature extraction and one fine-tuning epoch of ``arch`` on ``rt``: images/s and what ran.

    ``feed``: the images' way to the device (``device``, ``pinned``; None: as evaluate decides)."""
    if n_train < (warmup_batches + 1) * finetune_batch:
        raise ValueError(f"n_train={n_train}: need at least {(warmup_batches + 1) * finetune_batch} "
                         "(warm-up batches + one timed batch)")
    g = torch.Generator().manual_seed(seed)
    n = max(n_features, n_train + finetune_batch)
    images = torch.randint(0, 256, (n, 1, image_size, image_size), generator=g, dtype=torch.uint8)
    feeder = ImageFeeder(images, rt.device, mode=feed)
    torch.manual_seed(seed)
    enc = make_encoder(arch, image_size)
    n_params = sum(p.numel() for p in enc.parameters())
    # features: one warm-up batch, then every image (the feeders are made before the clock starts)
    warm = ImageFeeder(images[:feature_batch], rt.device, mode=feed)
    timed_feeder = ImageFeeder(images[:n_features], rt.device, mode=feed) if n_features < n else feeder
    extract_features(enc, warm, batch_size=feature_batch, runtime=rt)
    t = time.perf_counter()
    X = extract_features(enc, timed_feeder, batch_size=feature_batch, runtime=rt)  # ends with a host copy: synchronised
    feat_s = time.perf_counter() - t
    del warm, timed_feeder
    channels_last = prefers_channels_last(enc.model, rt.device.type)
    del enc
    # fine-tuning: one epoch of n_train images (labels random, both classes), one batch to validate/test
    y = (np.arange(n) % 2).astype(int)
    tr = np.arange(n_train)
    va = te = np.arange(n_train, n_train + finetune_batch)
    steps = n_train // finetune_batch
    clock = EpochClock(rt.device, warmup_batches, steps)
    opts = {"epochs": 1, "batch_size": finetune_batch, "patience": None}
    res = finetune(lambda: make_encoder(arch, image_size), "binary", 2, feeder, y, tr, va, te, opts, seed=seed,
                   runtime=rt, progress=clock)
    timed = (steps - warmup_batches) * finetune_batch
    return {"features_images_per_s": round(n_features / feat_s, 1), "features_seconds": round(feat_s, 3),
            "finetune_images_per_s": round(timed / clock.seconds(), 1), "finetune_timed_images": timed,
            "finetune_seconds_timed": round(clock.seconds(), 3), "finetune_cell_seconds": round(res.seconds, 2),
            "n_features": n_features, "n_train": n_train, "feature_batch": feature_batch,
            "finetune_batch": finetune_batch, "feature_dim": int(X.shape[1]), "channels_last": channels_last,
            "params_million": round(n_params / 1e6, 2), "images_fed": feeder.mode}


def run_benchmark(archs=ARCHS, device: str = "auto", image_size: int = 224, n_features: int = 2048,
                  n_train: int = 1024, feature_batch: int = 64, finetune_batch: int = 32, warmup_batches: int = 2,
                  quick: bool = False, feed: str | None = None) -> dict:
    dev, note = resolve_device(device)
    rt = Runtime.for_device(dev)
    results = {}
    for arch in archs:
        t = time.time()
        results[arch] = bench_arch(arch, rt, image_size, n_features, n_train, feature_batch, finetune_batch,
                                   warmup_batches, feed=feed)
        results[arch]["wall_seconds"] = round(time.time() - t, 1)
        print(f"{arch}: features {results[arch]['features_images_per_s']:.1f} images/s, "
              f"fine-tuning {results[arch]['finetune_images_per_s']:.1f} images/s", flush=True)
    out = {"benchmark": "evaluate", "device": rt.describe(), "device_note": note, "image_size": image_size,
           "quick": quick, "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
           "loadavg_1min": round(os.getloadavg()[0], 2),
           "date": datetime.datetime.now().isoformat(timespec="minutes"), "results": results}
    met = {}
    for arch, t in TARGETS.items():
        if arch in results and rt.device.type == "cuda" and not quick:
            met[arch] = {k: results[arch][k] >= v for k, v in t.items()}
    out["targets"] = {"definition": TARGETS, "met": met or "not applicable (targets are for a GPU, full run)"}
    return out


def main(argv=None) -> int:
    d = option_defaults()
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N (as evaluate --device)")
    ap.add_argument("--quick", action="store_true", help="smoke test: 64 px, a few images per backbone")
    ap.add_argument("--archs", default=",".join(ARCHS), help="comma-separated timm backbones")
    ap.add_argument("--image-size", type=int, default=None, help="default 224 (quick: 64)")
    ap.add_argument("--n-features", type=int, default=None, help="images for feature extraction (default 8192; quick 8)")
    ap.add_argument("--n-train", type=int, default=None,
                    help="training images of the timed epoch (default 4096; quick 3 batches)")
    ap.add_argument("--feature-batch", type=int, default=int(d["batch_size"]))
    ap.add_argument("--finetune-batch", type=int, default=int(d["finetune"]["batch_size"]))
    ap.add_argument("--warmup-batches", type=int, default=None, help="untimed first batches (default 2; quick 1)")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    ap.add_argument("--feed", choices=("auto", "device", "pinned"), default="auto",
                    help="how images reach a GPU (auto: as evaluate decides by free memory)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    fb, tb = args.feature_batch, args.finetune_batch
    if args.quick:
        fb, tb = min(fb, 4), min(tb, 2)
    size = args.image_size or (64 if args.quick else 224)
    warmup = args.warmup_batches if args.warmup_batches is not None else (1 if args.quick else 2)
    n_feat = args.n_features or (fb if args.quick else 8192)
    n_train = args.n_train or ((warmup + 2) * tb if args.quick else 4096)
    out = run_benchmark([a.strip() for a in args.archs.split(",") if a.strip()], args.device, size,
                        n_feat, n_train, fb, tb, warmup, quick=args.quick,
                        feed=None if args.feed == "auto" else args.feed)
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
