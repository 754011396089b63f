"""The labelled images of a task and the frozen features of each init.

- :func:`load_images`: letterboxed ``uint8`` images [N, 1, S, S], read once per task and shared by
  every init, protocol and fold.
- :func:`extract_features`: frozen features of every image, batched on the runtime's device
  (bf16 autocast and channels_last on a GPU, see :mod:`~radpretrain.evaluate.device`).
- :func:`cached_features`: the same, kept in ``OUT/features/INIT-POOL.npy`` with a key file, so a
  rerun (or another protocol) reuses them; a cache that does not match is recomputed, never
  unpickled.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from radpretrain.data.dataset import StoreDataset
from radpretrain.errors import UserError
from radpretrain.evaluate.device import ImageFeeder, Runtime
from radpretrain.evaluate.progress import bar
from radpretrain.utils import get_logger, read_json, write_json

log = get_logger("evaluate")

POOLS = ("default", "mean", "cls", "flat")


def load_images(store, rows: np.ndarray, image_size: int, progress=None) -> torch.Tensor:
    """Letterboxed ``uint8`` images [N, 1, S, S] of store rows (one pass, kept in memory).

    ``progress``: a tqdm-like bar updated per image (None: one made here, quiet without a terminal).
    """
    ds = StoreDataset(store, indices=rows, image_size=image_size, resize="letterbox")
    out = torch.empty((len(ds), 1, image_size, image_size), dtype=torch.uint8)
    own = progress is None
    pbar = bar(len(ds), "images", unit="img") if own else progress
    try:
        for i in range(len(ds)):
            out[i] = (ds[i]["image"] * 255).round_().to(torch.uint8)
            pbar.update(1)
    finally:
        if own:
            pbar.close()
    return out


@torch.no_grad()
def extract_features(encoder, images, pool: str = "default", batch_size: int = 64, runtime: Runtime | None = None,
                     progress=None) -> np.ndarray:
    """Frozen features of every image: ``[N, D]`` float32.

    ``images``: ``uint8`` [N, 1, S, S] or an :class:`~radpretrain.evaluate.device.ImageFeeder`.
    ``pool``: ``default`` (the model's own pooled output) or, for ViTs, ``mean`` (patch tokens
    averaged), ``cls`` (the class token) or ``flat`` (all patch tokens concatenated), the three
    aggregations the MAE pilot study compared (Bühler, *Pilot Study For Large-Scale Radiograph
    Pre-training*, TU München).  ``runtime`` (default: the CPU in float32) says where
    and in which precision; the encoder is moved there.
    """
    if pool not in POOLS:
        raise UserError(f"pool={pool!r}: choose one of {', '.join(POOLS)}")
    if pool != "default" and not encoder.is_vit:
        raise UserError(f"pool={pool}: token aggregation needs a ViT backbone (this one pools itself); use pool=default")
    rt = runtime or Runtime.cpu()
    feeder = images if isinstance(images, ImageFeeder) else ImageFeeder(images, rt.device)
    rt.place(encoder)
    encoder.eval()
    out = []
    for b in feeder.batches(None, batch_size):
        with rt.autocast():
            if pool == "default":
                f = encoder(b.x)
            else:
                t = encoder.tokens(b.x)
                npt = int(getattr(encoder.model, "num_prefix_tokens", 1))
                if pool == "cls":
                    if npt < 1:
                        raise UserError("pool=cls: this ViT has no class token")
                    f = t[:, 0]
                elif pool == "mean":
                    f = t[:, npt:].mean(dim=1)
                else:
                    f = t[:, npt:].flatten(1)
        out.append(f.float().cpu().numpy())
        if progress is not None:
            progress.update(len(b.index))
    return np.concatenate(out) if out else np.zeros((0, encoder.num_features), np.float32)


def ids_hash(ids) -> str:
    return hashlib.sha256("\n".join(map(str, ids)).encode()).hexdigest()[:16]


def weights_mtime(path) -> float | None:
    """Modification time of an init's weights (so a retrained run never reuses stale features)."""
    if not path:
        return None
    p = Path(path)
    files = [p] if p.is_file() else [q for q in (p / "encoder.safetensors", p / "model.safetensors") if q.is_file()]
    return max((q.stat().st_mtime for q in files), default=None)


def cached_features(feat_dir: Path, init: str, pool: str, encoder, images, table: pd.DataFrame, image_size: int,
                    batch_size: int, ident: dict | None = None, runtime: Runtime | None = None,
                    progress=None) -> np.ndarray:
    """Features of every labelled image for one init, computed once and kept in ``features/``.

    ``ident`` identifies the init (kind, weights, statistics, ...); features computed on a GPU
    add its precision to the key, so float32 CPU features and bf16 GPU features never mix.
    """
    rt = runtime or Runtime.cpu()
    feat_dir = Path(feat_dir)
    feat_dir.mkdir(parents=True, exist_ok=True)
    path = feat_dir / f"{init}-{pool}.npy"
    key_path = path.with_suffix(".json")
    ident = dict(ident or {})
    if not rt.is_cpu:  # the CPU key is the one evaluate always wrote (old caches stay valid)
        ident["compute"] = f"{rt.device.type} {rt.precision}"
    key = {"n": int(len(table)), "image_size": int(image_size), "ids_head": table["image_id"].head(5).tolist(),
           "ids_hash": ids_hash(table["image_id"]), "init": json.loads(json.dumps(ident, default=str))}
    if path.is_file() and key_path.is_file() and read_json(key_path) == key:
        try:  # never unpickled (allow_pickle=False): an object array or a damaged file is recomputed
            X = np.load(path, allow_pickle=False)
            if X.ndim == 2 and len(X) == len(table) and X.dtype.kind == "f":
                log.info("features %s/%s: reused %s", init, pool, path.name)
                return X
            log.warning("%s: not a features array for these images; recomputing", path)
        except (ValueError, OSError, EOFError) as e:
            log.warning("%s: unreadable features cache (%s); recomputing", path, str(e).splitlines()[0][:120])
    t0 = time.time()
    pbar = progress if progress is not None else bar(len(table), f"features {init}/{pool}", unit="img")
    try:
        X = extract_features(encoder, images, pool=pool, batch_size=batch_size, runtime=rt, progress=pbar)
    finally:
        if progress is None:
            pbar.close()
    np.save(path, X)
    write_json(key_path, key)
    log.info("features %s/%s: %s in %.1f s (%.0f images/s)", init, pool, X.shape, time.time() - t0,
             len(X) / max(time.time() - t0, 1e-9))
    return X
