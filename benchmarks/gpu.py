"""Pretraining at the GPU's speed: per method with its GPU preset, end to end vs compute vs loader, MFU, memory.

    python benchmarks/gpu.py [--methods simclr,mae,...] [--workers 16] [--store-images 4096]
                             [--cluster-images 100000] [--compile] [--peak-tflops X]
    python benchmarks/gpu.py --smoke          # CPU, tiny sizes, CI time (< 2 min on 2 cores)
    python benchmarks/gpu.py --memory-estimate [--methods ...]   # CPU: estimated GPU memory per preset
    python benchmarks/gpu.py --loader-only --device cpu --workers 2 [--override data.resize_on=device]

For every method, with its GPU preset (``GPU_PRESETS``), random init, the preset's image size and
batch (issue 18's table, measured the same way):

- ``e2e_img_s``: images/s through the engine (``radpretrain.pretrain.pretrain`` with the preset:
  loader workers, device-side letterbox when ``data.resize_on`` picks it, the Trainer, bf16-mixed on
  a GPU), over the steps after ``--warmup`` (mean, data stalls included; ``e2e_median_step_img_s``
  without them);
- ``compute_img_s``: one fixed batch already on the device, the method's ``compute_loss`` + backward
  + optimiser step (+ DINO's teacher update) under bf16 autocast on a GPU (fp32 on a CPU), with the
  engine's channels_last and, with ``--compile``, ``trainer.compile=default``;
- ``loader_img_s``: the engine's training DataLoader (``StoreData.train_loader``: the method's
  ``sample_transform``, its workers, pinned memory) plus the transfer and, when deferred, the
  device letterbox; ``loader_img_s_per_worker`` for extrapolating to other core counts;
- ``e2e_over_compute``, ``loader_over_compute``; ``peak_mem_gb`` (compute-only, GPU);
- ``gflop_per_img`` counted by ``torch.utils.flop_counter.FlopCounterMode`` on one forward + backward
  (eager), and ``mfu`` = gflop_per_img x compute_img_s / the GPU's peak dense bf16 FLOP/s from
  ``PEAK_BF16_TFLOPS`` (null on CPUs and unknown GPUs; ``--peak-tflops`` overrides);
- DeepCluster re-clustering (``recluster``): features of ``--cluster-images`` images (rows of the
  store repeated) extracted by the method (bf16 on a GPU), then PCA + k-means into the preset's
  clusters on the device (faiss GPU or torch) or on the CPU (faiss-cpu; the torch k-means timed
  too), and the DeepCluster end-to-end rate including re-clustering once per epoch of
  ``--cluster-images`` images (derived from the two measurements).

The store is written to a temporary folder: ``--store-images`` images of about 512 x 448 px (a real
store's ``max_size=512``), or ``--data STORE``.  Prints one JSON line last.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import lightning as L
import numpy as np
import pandas as pd
import torch
from torch.utils.flop_counter import FlopCounterMode

from radpretrain.config import get
from radpretrain.data.dataset import StoreDataset
from radpretrain.data.geometry import finish_batch
from radpretrain.data.store import MANIFEST_COLUMNS, SHARD_DIR, ShardWriter, Store, to_stored, write_manifest, write_store_meta
from radpretrain.synthetic.toy import TOY_BODY_PARTS, toy_image
from radpretrain.methods import get_method
from radpretrain.pretrain import pretrain, resolve_config
from radpretrain.pretrain.data import StoreData, resize_on_device, select_images
from radpretrain.pretrain.trainer import compile_model, use_channels_last

GPU_PRESETS = {"simclr": "simclr_gpu", "mae": "mae_pilot", "metadata": "metadata_gpu", "genesis": "genesis_thesis",
               "dino": "dino_gpu", "deepcluster": "deepcluster_sarcoma"}

# Dense (no sparsity) bf16 tensor-core peak per GPU, TFLOP/s, from NVIDIA's data sheets (the sheets
# print the sparse figure, twice these): H100 SXM5 / H200 SXM 989.4 ("1,979 teraFLOPS*", * with
# sparsity; H100 and H200 data sheets), H100 PCIe 756, H100 NVL / H200 NVL 835.5, A100 312 (A100 data
# sheet), L40S 362.05, L4 121, A10 125.  First match of the device name wins (more specific first).
PEAK_BF16_TFLOPS = (("H200 NVL", 835.5), ("H200", 989.4), ("H100 PCIe", 756.0), ("H100 NVL", 835.5),
                    ("H100", 989.4), ("A100", 312.0), ("L40S", 362.05), ("L4", 121.0), ("A10", 125.0))
PEAK_SOURCE = "NVIDIA data sheets, dense bf16 tensor core (half the 'with sparsity' figure)"

SMOKE_OVERRIDES = {  # timm's test_resnet (0.4 M parameters) and a one-block vit_tiny at 32 px
    "*": ["data.image_size=32", "data.batch_size=8", "model.pretrained=none", "trainer.sync_batchnorm=false"],
    "simclr": ["model.backbone=test_resnet", "simclr.hidden_dim=64", "simclr.output_dim=32"],
    "mae": ["model.backbone=vit_tiny", "model.patch_size=8", "model.kwargs={depth: 1}", "mae.decoder_dim=32",
            "mae.decoder_depth=1", "mae.decoder_heads=2"],
    "metadata": ["model.backbone=test_resnet"],
    "genesis": ["model.backbone=test_resnet", "genesis.local_blocks=20"],
    "dino": ["model.backbone=vit_tiny", "model.patch_size=8", "model.kwargs={depth: 1}", "dino.local_size=16",
             "dino.n_local=2", "dino.output_dim=256", "dino.hidden_dim=64", "dino.bottleneck_dim=32"],
    "deepcluster": ["model.backbone=test_resnet", "deepcluster.num_clusters=4", "deepcluster.pca_dim=8",
                    "deepcluster.extract_batch_size=32"],
}


def peak_tflops(device_name: str | None, override: float | None = None) -> tuple[float | None, str | None]:
    """Peak dense bf16 TFLOP/s of a GPU by name (``torch.cuda.get_device_name``) and where it is from;
    ``(None, None)`` for a CPU (``device_name`` None) or a GPU not in :data:`PEAK_BF16_TFLOPS`."""
    if override:
        return float(override), "--peak-tflops"
    for key, tf in PEAK_BF16_TFLOPS if device_name else ():
        if key in device_name:
            return tf, f"{PEAK_SOURCE}: {key}"
    return None, None


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# -- the store --------------------------------------------------------------------------------
def make_bench_store(root: Path, n: int, size=(512, 448), seed: int = 0) -> Path:
    """``n`` toy radiographs of about ``size`` (16 base images per body part, cut at random offsets so
    sizes vary by up to 16 px), 2 images per patient, with body part / view / sex / age for metadata."""
    rng = np.random.default_rng(seed)
    base = {bp: [toy_image(rng, size[0] + 8, size[1] + 8, bp, bool(i % 2)) for i in range(16)] for bp in TOY_BODY_PARTS}
    rows = []
    with ShardWriter(root / SHARD_DIR / "bench-00000.bin") as writer:
        for k in range(n):
            p = k // 2
            bp = TOY_BODY_PARTS[p % len(TOY_BODY_PARTS)]
            img = base[bp][int(rng.integers(16))]
            h, w = size[0] - 8 + int(rng.integers(0, 17)), size[1] - 8 + int(rng.integers(0, 17))
            top, left = int(rng.integers(0, img.shape[0] - h + 1)), int(rng.integers(0, img.shape[1] - w + 1))
            off = writer.append(to_stored(img[top : top + h, left : left + w]))
            rows.append({"image_id": f"{k:016x}", "patient_id": f"p{p:015x}", "study_id": f"s{k:015x}",
                         "series_id": f"r{k:015x}", "modality": "DX", "body_part": bp,
                         "view": "AP" if k % 2 == 0 else "LAT", "age_years": float(5 + p % 85),
                         "sex": "F" if p % 3 else "M", "height": h, "width": w, "orig_height": h, "orig_width": w,
                         "source": f"bench{k:012x}", "source_format": "png", "content_hash": f"{k:032x}",
                         "status": "ingested", "reason": "", "shard": "bench-00000.bin", "offset": off})
    write_manifest(root, pd.DataFrame(rows, columns=MANIFEST_COLUMNS))
    write_store_meta(root, dtype="uint8", max_size=max(size) + 8, bench=True)
    return root


# -- one method ---------------------------------------------------------------------------------
def method_config(method: str, store_root: Path, args) -> dict:
    over = ["model.pretrained=none", "data.val_fraction=0", f"data.num_workers={args.workers}",
            "data.mean=0.3", "data.std=0.2"]
    if args.smoke:
        over += SMOKE_OVERRIDES["*"] + SMOKE_OVERRIDES.get(method, [])
    return resolve_config(method, GPU_PRESETS[method], over + list(args.override), str(store_root))


def build_method(method: str, cfg: dict, store, device: torch.device):
    L.seed_everything(0, verbose=False)
    m = get_method(method)(cfg, store)
    m.total_steps_hint = 1000
    m.to(device)
    if use_channels_last(cfg, m, device.type):
        m.to(memory_format=torch.channels_last)
    return m


def fixed_batch(m, cfg: dict, store, rows: np.ndarray, device: torch.device) -> dict:
    """One training batch (the loader's CPU path), on the device; a method's own corruptions and views run in its step."""
    bs = int(cfg["data"]["batch_size"])
    ds = StoreDataset(store, np.resize(rows, bs), image_size=int(cfg["data"]["image_size"]), resize="letterbox",
                      fields=tuple(m.fields), transform=m.sample_transform())
    batch = torch.utils.data.default_collate([ds[i] for i in range(bs)])
    if getattr(m, "method_name", "") == "deepcluster":  # pseudo-labels for every store row
        g = torch.Generator().manual_seed(0)
        m.row_label = torch.randint(0, m.num_clusters, (len(store),), generator=g).to(device)
    return {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}


def train_step(m, opt, batch, device: torch.device):
    bf16 = device.type == "cuda"
    it = [0]

    def step(backward_only: bool = False):
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            out = m.compute_loss(batch, it[0])
        loss = out["loss"] if isinstance(out, dict) else out
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if not backward_only:
            opt.step()
            if hasattr(m, "update_teacher"):
                m.update_teacher(0.996)
        it[0] += 1

    return step


def compute_only(m, cfg: dict, store, rows, device: torch.device, args) -> dict:
    batch = fixed_batch(m, cfg, store, rows, device)
    opt = m.configure_optimizers()
    opt = opt["optimizer"] if isinstance(opt, dict) else opt
    m.train()
    step = train_step(m, opt, batch, device)
    step()  # allocations, cuDNN autotuning
    with FlopCounterMode(display=False) as fc:  # eager: forward + backward of one step
        step(backward_only=True)
    flops = fc.get_total_flops()
    compiled = bool(compile_model({**cfg, "trainer": {**cfg["trainer"], "compile": "default"}}, m, device.type)) \
        if args.compile else False
    for _ in range(args.compute_warmup):
        step()
    sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for _ in range(args.compute_steps):
        t0 = time.perf_counter()
        step()
        sync(device)
        times.append(time.perf_counter() - t0)
    bs = int(cfg["data"]["batch_size"])
    out = {"compute_img_s": round(bs / statistics.median(times), 1), "batch": bs,
           "gflop_per_img": round(flops / bs / 1e9, 3), "compiled": compiled}
    if device.type == "cuda":
        out["peak_mem_gb"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
    return out


def loader_only(m, cfg: dict, store, rows, device: torch.device, args) -> dict:
    defer = resize_on_device(cfg, m, device.type)
    dm = StoreData(store, cfg, m, rows, np.array([], dtype=np.int64), resuming=False, defer_resize=defer)

    def rate(finish: bool) -> float:
        dl = dm.train_loader()
        n, t0, k = 0, None, 0
        for batch in dl:
            if finish:
                batch = dm.transfer_batch_to_device(batch, device, 0)
            if t0 is None:  # worker start-up not counted
                sync(device)
                t0 = time.perf_counter()
                continue
            n += int(batch["index"].shape[0])
            k += 1
            if k >= args.loader_batches:
                break
        sync(device)
        return n / max(time.perf_counter() - t0, 1e-9) if t0 is not None else 0.0

    workers = int(cfg["data"]["num_workers"] or 0)
    full = rate(True)
    out = {"loader_img_s": round(full, 1), "workers": workers, "resize_on": "device" if defer else "loader",
           "loader_img_s_per_worker": round(full / max(workers, 1), 1)}
    if args.loader_only:  # the workers alone (no transfer, no device letterbox): what more cores multiply
        w = rate(False)
        out.update({"workers_img_s": round(w, 1), "workers_img_s_per_worker": round(w / max(workers, 1), 1)})
    dl = dm.train_loader()
    if defer:  # the device letterbox alone, on one batch already on the device
        ds = dl.dataset
        items = ds.collate([ds[i] for i in range(int(cfg["data"]["batch_size"]))])
        items = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in items.items()}
        finish_batch(items)
        sync(device)
        t = time.perf_counter()
        for _ in range(3):
            finish_batch(items)
        sync(device)
        out["device_letterbox_ms_per_batch"] = round((time.perf_counter() - t) / 3 * 1000, 2)
    return out


class StepTimer(L.Callback):
    def __init__(self):
        self.t: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        sync(pl_module.device)
        self.t.append(time.perf_counter())


def end_to_end(method: str, store_root: Path, out_dir: Path, args) -> dict:
    steps = args.e2e_warmup + args.e2e_steps
    over = ["model.pretrained=none", "data.val_fraction=0", f"data.num_workers={args.workers}",
            f"trainer.max_steps={steps}", "trainer.max_epochs=-1", "trainer.checkpoint_every_n_steps=0",
            "previews.every_n_epochs=0", "trainer.enable_progress_bar=false", "trainer.log_every_n_steps=50",
            "data.mean=0.3", "data.std=0.2"]
    if args.smoke:
        over += SMOKE_OVERRIDES["*"] + SMOKE_OVERRIDES.get(method, [])
    over += ["trainer.compile=default"] if args.compile else []
    timer = StepTimer()
    res = pretrain(method, store_root, out_dir, config=GPU_PRESETS[method], overrides=over + list(args.override),
                   callbacks=[timer])
    cfg = resolve_config(method, GPU_PRESETS[method], over + list(args.override), str(store_root))
    bs = int(cfg["data"]["batch_size"])
    t = timer.t[args.e2e_warmup - 1 :]
    dts = np.diff(t)
    return {"e2e_img_s": round(bs * len(dts) / max(t[-1] - t[0], 1e-9), 1),
            "e2e_median_step_img_s": round(bs / float(np.median(dts)), 1), "e2e_steps_timed": int(len(dts)),
            "global_step": int(res["global_step"])}


def recluster(cfg: dict, store, rows, device: torch.device, args) -> dict:
    """DeepCluster's re-clustering of ``--cluster-images`` images: feature extraction, then PCA + k-means."""
    from radpretrain import clustering

    m = build_method("deepcluster", cfg, store, device)
    defer = resize_on_device(cfg, m, device.type)
    n = int(args.cluster_images)
    ds = StoreDataset(store, np.resize(rows, n), image_size=int(cfg["data"]["image_size"]), defer_resize=defer)
    on_device = m.cluster_on_device()
    sync(device)
    t0 = time.perf_counter()
    feats, _ = m.extract_features(ds, as_tensor=on_device)
    sync(device)
    t1 = time.perf_counter()
    res = m.cluster(feats, 0)
    sync(device)
    t2 = time.perf_counter()
    out = {"images": n, "clusters": m.num_clusters, "pca_dim": int(res["pca_dim"]), "backend": res["backend"],
           "seconds_features": round(t1 - t0, 2), "seconds_pca_kmeans": round(t2 - t1, 2),
           "seconds_total": round(t2 - t0, 2), "features_img_s": round(n / max(t1 - t0, 1e-9), 1),
           "n_empty_fixed": int(res["n_empty_fixed"])}
    if not on_device:  # the torch k-means on this CPU too, on the same whitened features
        x = clustering.pca_whiten_l2(torch.as_tensor(feats), m.pca_dim)
        km = clustering.kmeans(x, m.num_clusters, m.kmeans_iters, m.kmeans_redo, seed=0)
        out["seconds_torch_kmeans_cpu"] = round(km["seconds"], 2)
    return out


def saved_activation_bytes(m, cfg: dict, store, rows, batch_size: int) -> int:
    """Bytes autograd saves for backward in one training step at ``batch_size`` (bf16 autocast, on the CPU)."""
    cfg = {**cfg, "data": {**cfg["data"], "batch_size": batch_size}}
    batch = fixed_batch(m, cfg, store, rows, torch.device("cpu"))
    seen: dict = {}

    def pack(t):
        if isinstance(t, torch.Tensor) and t.device.type == "cpu":
            st = t.untyped_storage()
            seen[st.data_ptr()] = st.nbytes()
        return t

    m.train()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = m.compute_loss(batch, 0)
    loss = out["loss"] if isinstance(out, dict) else out
    loss.backward()
    m.zero_grad(set_to_none=True)
    params = {p.untyped_storage().data_ptr() for p in m.parameters()}
    return int(sum(v for k, v in seen.items() if k not in params))


def memory_estimate(method: str, store_root: Path, args) -> dict:
    """Estimated GPU memory of the preset at its batch, computed on the CPU (not measured on a GPU).

    fp32 weights (4 bytes per parameter), gradients (4 per trainable one) and optimiser state
    (AdamW 8, SGD with momentum 4 per trainable one), plus the activations autograd saves for
    backward under bf16 autocast, counted at batch 2 and 4 on the CPU (``saved_tensors_hooks``) and
    extrapolated linearly to the preset's batch; x 1.15 for the allocator and backward's transients,
    + 1.5 GB for the CUDA context and cuDNN workspaces.  ``max_batch_24gb``: the batch that fits 22 GB.
    """
    over = ["model.pretrained=none", "data.mean=0.3", "data.std=0.2", "data.val_fraction=0"] + list(args.override)
    cfg = resolve_config(method, GPU_PRESETS[method], over, str(store_root))
    store = Store(store_root)
    rows, _ = select_images(store, cfg)
    torch.manual_seed(0)
    m = get_method(method)(cfg, store)
    n_all = sum(p.numel() for p in m.parameters())
    n_train = sum(p.numel() for p in m.parameters() if p.requires_grad)
    opt_bytes = 8 if str(get(cfg, "optim.name", "adamw")) == "adamw" else 4
    state = 4 * n_all + (4 + opt_bytes) * n_train
    a2, a4 = (saved_activation_bytes(m, cfg, store, rows, b) for b in (2, 4))
    per_img = max(a4 - a2, 0) / 2
    base = max(a2 - 2 * per_img, 0)
    bs = int(cfg["data"]["batch_size"])
    total = 1.15 * (state + base + per_img * bs) + 1.5 * 2**30
    fit = int((22 * 2**30 / 1.15 - state - base - 1.5 * 2**30 / 1.15) // max(per_img, 1))
    return {"preset": GPU_PRESETS[method], "batch": bs, "image_size": int(cfg["data"]["image_size"]),
            "params_m": round(n_all / 1e6, 1), "trainable_m": round(n_train / 1e6, 1),
            "weights_grads_optimizer_gb": round(state / 2**30, 2), "activations_mb_per_img": round(per_img / 2**20, 1),
            "estimated_gb": round(total / 2**30, 1), "max_batch_24gb": max(0, fit)}


def run_benchmark(args) -> dict:
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() and not args.smoke else "cpu"))
    if args.threads:
        torch.set_num_threads(args.threads)
    methods = [s for s in args.methods.split(",") if s] if args.methods else list(GPU_PRESETS)
    tmp = tempfile.TemporaryDirectory(prefix="radpretrain-gpu-bench-")
    t_start = time.perf_counter()
    try:
        if args.data:
            root = Path(args.data)
        else:
            root = make_bench_store(Path(tmp.name) / "store", args.store_images,
                                    size=(96, 80) if args.smoke else (512, 448))
        store = Store(root)
        peak, peak_src = peak_tflops(torch.cuda.get_device_name(device) if device.type == "cuda" else None,
                                     args.peak_tflops)
        results: dict = {}
        for method in methods:
            r: dict = {"preset": GPU_PRESETS[method]}
            t0 = time.perf_counter()
            cfg = method_config(method, root, args)
            rows, _ = select_images(store, cfg)
            m = build_method(method, cfg, store, device)
            if args.loader_only:  # the input pipeline alone (what a CPU can measure of a GPU preset)
                r.update(loader_only(m, cfg, store, rows, device, args))
                r["seconds"] = round(time.perf_counter() - t0, 1)
                results[method] = r
                print(f"{method:12s} " + " ".join(f"{k}={v}" for k, v in r.items()), file=sys.stderr)
                continue
            r.update(compute_only(m, cfg, store, rows, device, args))
            r.update(loader_only(m, cfg, store, rows, device, args))
            del m
            if device.type == "cuda":
                torch.cuda.empty_cache()
            if not args.skip_e2e:
                r.update(end_to_end(method, root, Path(tmp.name) / f"run-{method}", args))
                r["e2e_over_compute"] = round(r["e2e_img_s"] / r["compute_img_s"], 3)
            r["loader_over_compute"] = round(r["loader_img_s"] / r["compute_img_s"], 3)
            r["mfu"] = None if peak is None else round(r["gflop_per_img"] * 1e9 * r["compute_img_s"] / (peak * 1e12), 4)
            if method == "deepcluster" and not args.skip_recluster:
                rc = recluster(cfg, store, rows, device, args)
                r["recluster"] = rc
                if "e2e_median_step_img_s" in r:  # one re-clustering per epoch of --cluster-images images
                    step = r["e2e_median_step_img_s"]
                    r["e2e_incl_recluster_img_s_derived"] = round(rc["images"] / (rc["images"] / step + rc["seconds_total"]), 1)
            r["seconds"] = round(time.perf_counter() - t0, 1)
            results[method] = r
            print(f"{method:12s} " + " ".join(f"{k}={v}" for k, v in r.items() if k != "recluster"), file=sys.stderr)
            if "recluster" in r:
                print(f"{'':12s} recluster: {r['recluster']}", file=sys.stderr)
    finally:
        tmp.cleanup()
    return {
        "benchmark": "gpu", "smoke": bool(args.smoke), "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "peak_bf16_tflops": peak, "peak_source": peak_src, "torch": torch.__version__,
        "threads": torch.get_num_threads(), "workers": args.workers, "store_images": len(store),
        "compile": bool(args.compile), "loadavg_1min": round(os.getloadavg()[0], 2),
        "seconds": round(time.perf_counter() - t_start, 1), "methods": results,
        "targets_img_s": {"metadata": 6000, "simclr": 3500, "mae": 4000, "genesis": 2000,
                          "deepcluster_incl_recluster": 3000, "e2e_over_compute_min": 0.9,
                          "loader_over_fastest_compute_min": 1.5, "recluster_1e5_into_1000_s_max": 30},
    }


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true", help="CPU, tiny images and models, a few steps (CI)")
    ap.add_argument("--memory-estimate", action="store_true", help="estimate each preset's GPU memory on the CPU")
    ap.add_argument("--methods", default="", help="comma-separated subset of " + ",".join(GPU_PRESETS))
    ap.add_argument("--data", default=None, help="a dataset store (default: a temporary one)")
    ap.add_argument("--store-images", type=int, default=None, help="images of the temporary store (4096; smoke 48)")
    ap.add_argument("--workers", type=int, default=None, help="loader workers per method (16; smoke 1)")
    ap.add_argument("--compute-steps", type=int, default=None)
    ap.add_argument("--compute-warmup", type=int, default=None)
    ap.add_argument("--loader-batches", type=int, default=None)
    ap.add_argument("--e2e-steps", type=int, default=None)
    ap.add_argument("--e2e-warmup", type=int, default=None)
    ap.add_argument("--cluster-images", type=int, default=None, help="images DeepCluster re-clusters (1e5; smoke 256)")
    ap.add_argument("--skip-e2e", action="store_true")
    ap.add_argument("--loader-only", action="store_true", help="only the loaders, at the presets' sizes (CPU-friendly)")
    ap.add_argument("--skip-recluster", action="store_true")
    ap.add_argument("--compile", action="store_true", help="trainer.compile=default for compute-only and e2e")
    ap.add_argument("--peak-tflops", type=float, default=None, help="peak dense bf16 TFLOP/s of an unlisted GPU")
    ap.add_argument("--device", default=None)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--override", action="append", default=[], help="extra key=value for every preset (repeatable)")
    args = ap.parse_args(argv)
    smoke = {"store_images": 48, "workers": 1, "compute_steps": 2, "compute_warmup": 1, "loader_batches": 3,
             "e2e_steps": 2, "e2e_warmup": 2, "cluster_images": 256}
    full = {"store_images": 4096, "workers": 16, "compute_steps": 20, "compute_warmup": 5, "loader_batches": 30,
            "e2e_steps": 30, "e2e_warmup": 10, "cluster_images": 100_000}
    for k, v in (smoke if args.smoke else full).items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.memory_estimate:
        methods = [s for s in args.methods.split(",") if s] if args.methods else list(GPU_PRESETS)
        with tempfile.TemporaryDirectory(prefix="radpretrain-gpu-mem-") as tmp:
            root = make_bench_store(Path(tmp) / "store", 16)
            result = {"benchmark": "gpu-memory-estimate", "estimated": True, "method": memory_estimate.__doc__.split("\n")[0],
                      "methods": {}}
            for m in methods:
                result["methods"][m] = r = memory_estimate(m, root, args)
                print(f"{m:12s} " + " ".join(f"{k}={v}" for k, v in r.items()), file=sys.stderr)
    else:
        result = run_benchmark(args)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    with contextlib.suppress(BrokenPipeError):
        sys.exit(main())
