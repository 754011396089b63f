"""Pretraining speed on this machine: per-method training images/s, MAE vs a full-token ViT, data loading.

    python benchmarks/pretrain.py [--quick] [--data STORE] [--threads N] [--workers N]

Measures (CPU unless --device cuda):

- ``methods``: training images/s (forward + backward + AdamW step) of MAE (vit_tiny, patch 8 at
  64 px / 16 at 128 px), SimCLR, metadata and Models Genesis (U-Net on tf_efficientnet_lite0,
  200 shuffled blocks as ``genesis_cpu``; its corruptions run in the step) at 64 and 128 px;
  SimCLR counts images, not views (two views per image);
- ``mae_vs_full``: MAE train step time / the same ViT's train step on all tokens
  (target <= 0.35 at mask ratio 0.75); the two are interleaved and medians compared, so a
  change of machine load affects both alike;
- ``loader``: StoreDataset + DataLoader images/s (letterbox resize of the stored pixels) against
  the fastest method's consumption at the same size (target >= 2x).

Without ``--data`` a toy store of 512 x 448 px images is written to a temporary folder (resize
cost like a real store's ``max_size=512``).  On a shared machine the numbers move with the
load; the JSON line records the load average.  Prints one JSON line last.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

import torch

from radpretrain.methods.base import make_optimizer
from radpretrain.models.backbones import prefers_channels_last


def _batch(ds, n):
    return torch.utils.data.default_collate([ds[i % len(ds)] for i in range(n)])


def time_steps(step, n_warm: int, n: int) -> float:
    for _ in range(n_warm):
        step()
    t = time.perf_counter()
    for _ in range(n):
        step()
    return (time.perf_counter() - t) / n


def method_step(m, batch, device):
    m.to(device)
    if prefers_channels_last(m.encoder, device.type):  # what the engine does with trainer.channels_last=auto
        m.to(memory_format=torch.channels_last)
    opt = make_optimizer([p for p in m.parameters() if p.requires_grad], {"lr": 1e-4})  # the engine's optimizer
    batch = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}
    m.train()
    it = [0]

    def step():
        out = m.compute_loss(batch, it[0])
        loss = out["loss"] if isinstance(out, dict) else out
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        it[0] += 1
        if device.type == "cuda":
            torch.cuda.synchronize()

    return step


def full_vit_step(m, batch, device):
    """The MAE's own encoder on all tokens (same patching path) + a linear pixel head: a full-token baseline."""
    enc = m.encoder
    head = torch.nn.Linear(enc.embed_dim, m.patch * m.patch).to(device)
    params = list(enc.parameters()) + list(head.parameters())
    opt = make_optimizer(params, {"lr": 1e-4})
    x = m.normalize(batch["image"].to(device))

    def step():
        tokens = m.encode_visible(x, None)
        loss = head(tokens).float().pow(2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if device.type == "cuda":
            torch.cuda.synchronize()

    return step


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer steps, 64 px only for the loader")
    ap.add_argument("--data", default=None, help="a dataset store (default: a temporary toy store)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--workers", type=int, default=2, help="DataLoader workers for the loader benchmark")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)

    from radpretrain.data.dataset import StoreDataset
    from radpretrain.data.store import Store
    from radpretrain.synthetic.toy import make_toy_store
    from radpretrain.methods.genesis import Genesis
    from radpretrain.methods.mae import MAE
    from radpretrain.methods.metadata import MetadataSupervised
    from radpretrain.methods.simclr import SimCLR

    tmp = None
    if args.data is None:
        tmp = tempfile.TemporaryDirectory(prefix="radpretrain-bench-")
        root = make_toy_store(os.path.join(tmp.name, "ds"), n_patients=48 if args.quick else 128,
                              images_per_patient=2, size=(512, 448))
    else:
        root = args.data
    store = Store(root)
    bs = args.batch_size
    n_warm, n = (1, 3) if args.quick else (2, 8)
    sizes = (64, 128)
    results = {"methods": {}, "mae_vs_full": {}, "loader": {}}
    for size in sizes:
        ds = StoreDataset(store, image_size=size)
        batch = _batch(ds, bs)
        patch = 8 if size == 64 else 16
        specs = {
            "mae": (MAE, {"model": {"backbone": "vit_tiny", "patch_size": patch}, "mae": {"mask_ratio": 0.75}}),
            "simclr": (SimCLR, {"model": {"backbone": "tf_efficientnet_lite0", "pretrained": "imagenet"},
                                "simclr": {"hidden_dim": 512}}),
            "metadata": (MetadataSupervised, {"model": {"backbone": "tf_efficientnet_lite0", "pretrained": "imagenet"},
                                              "augment": {"enabled": True}}),
            "genesis": (Genesis, {"model": {"backbone": "tf_efficientnet_lite0", "pretrained": "imagenet"},
                                  "genesis": {"local_blocks": 200}}),
        }
        for name, (cls, extra) in specs.items():
            cfg = {"seed": 0, "data": {"image_size": size, "mean": 0.3, "std": 0.2}, **extra}
            torch.manual_seed(0)
            m = cls(cfg, store)
            dt = time_steps(method_step(m, batch, device), n_warm, n)
            results["methods"].setdefault(name, {})[str(size)] = round(bs / dt, 1)
            print(f"{name:9s} {size:4d} px: {bs / dt:8.1f} img/s  ({dt * 1000:.0f} ms/step of {bs})", file=sys.stderr)
            if name == "mae":
                # interleave MAE and full-token steps and compare medians: robust to load changes
                mae_step, full_step = method_step(m, batch, device), full_vit_step(m, batch, device)
                full_step()
                tm, tf = [], []
                for _ in range(n + 2):
                    t0 = time.perf_counter()
                    mae_step()
                    t1 = time.perf_counter()
                    full_step()
                    tm.append(t1 - t0)
                    tf.append(time.perf_counter() - t1)
                dt, dt_full = statistics.median(tm), statistics.median(tf)
                ratio = dt / dt_full
                results["mae_vs_full"][str(size)] = {"mae_ms": round(dt * 1000, 1), "full_ms": round(dt_full * 1000, 1),
                                                     "ratio": round(ratio, 3)}
                print(f"mae/full-token ViT step at {size} px: {ratio:.3f} ({dt * 1000:.0f} vs {dt_full * 1000:.0f} ms)",
                      file=sys.stderr)
            del m
    for size in (sizes[:1] if args.quick else sizes):
        ds = StoreDataset(store, image_size=size)
        dl = torch.utils.data.DataLoader(ds, batch_size=bs, shuffle=True, num_workers=args.workers,
                                         persistent_workers=False, drop_last=True)
        it = iter(dl)
        next(it)  # worker start-up not counted
        t = time.perf_counter()
        k = 0
        for b in it:
            k += b["image"].shape[0]
            if k >= (256 if args.quick else 1024):
                break
        rate = k / (time.perf_counter() - t)
        fastest = max(v[str(size)] for v in results["methods"].values())
        results["loader"][str(size)] = {"images_per_s": round(rate, 1), "workers": args.workers,
                                        "fastest_method_images_per_s": fastest, "ratio": round(rate / fastest, 2)}
        print(f"loader {size} px, {args.workers} workers: {rate:.0f} img/s = {rate / fastest:.1f}x the fastest method",
              file=sys.stderr)
    results.update({
        "benchmark": "pretrain", "device": str(device), "threads": args.threads, "batch_size": bs,
        "quick": args.quick, "store_images": len(store), "loadavg_1min": round(os.getloadavg()[0], 2),
        "targets": {"mae_vs_full_ratio_max": 0.35, "loader_over_training_min": 2.0},
        "mae_vs_full_ok": all(v["ratio"] <= 0.35 for v in results["mae_vs_full"].values()),
        "loader_ok": all(v["ratio"] >= 2.0 for v in results["loader"].values()),
    })
    if tmp is not None:
        tmp.cleanup()
    print(json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
