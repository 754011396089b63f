"""The engine's data: which store images a run trains on, input statistics, samplers, the data module.

- :func:`select_images`: the (train, val) rows of ``Store.images`` (patient-grouped validation
  part, per-patient caps, ``splits.parquet``'s ``keep`` and excluded splits); :func:`data_summary`
  counts them (``RUN/data_summary.json``);
- :func:`input_stats`: ``data.mean`` / ``data.std`` (start weights' statistics or measured);
- :func:`balance_weights`: per-image weights for ``data.balance``;
- :class:`EpochBatchSampler` / :class:`SkippingBatchSampler`: seeded per epoch, sharded over DDP
  ranks, resumable mid-epoch;
- :class:`StoreData`: the ``LightningDataModule`` the Trainer fits on; with
  :func:`resize_on_device` its workers send the stored pixels and the batch is letterboxed on the
  training device (:mod:`radpretrain.data.geometry`) before the method sees it.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import lightning as L
import numpy as np
import torch

from radpretrain.config import get
from radpretrain.data.buckets import BucketBatchSampler
from radpretrain.data.dataset import StoreDataset
from radpretrain.data.geometry import finish_batch
from radpretrain.data.splits import load_splits
from radpretrain.errors import UserError
from radpretrain.models.backbones import grey_stats, is_random_init
from radpretrain.models.weights import find_encoder_files
from radpretrain.utils import get_logger

log = get_logger("pretrain")


def select_images(store, cfg: dict) -> tuple[np.ndarray, np.ndarray]:
    """(train, val) rows of ``store.images`` for pretraining; patient-grouped, deterministic for ``seed``."""
    images = store.images
    n = len(images)
    if n == 0:
        raise UserError(f"{store.root}: the store has no ingested images")
    keep = np.ones(n, dtype=bool)
    d = cfg["data"]
    splits_path = Path(store.root) / "splits.parquet"
    if splits_path.is_file() and (d.get("respect_keep") or d.get("exclude_split")):
        sp = load_splits(store.root).set_index("image_id")
        ids = images["image_id"].astype(str)
        if not ids.isin(sp.index).all():
            raise UserError(f"{splits_path}: does not match the store's images; re-run 'radpretrain split'")
        sp = sp.loc[ids]
        if d.get("respect_keep") and "keep" in sp.columns:
            keep &= sp["keep"].astype(bool).to_numpy()
        ex = d.get("exclude_split")
        if ex:
            ex = [ex] if isinstance(ex, str) else list(ex)
            keep &= ~sp["split"].isin(ex).to_numpy()
    elif d.get("exclude_split"):
        raise UserError(f"data.exclude_split={d['exclude_split']!r} needs {splits_path}; run 'radpretrain split' first")
    rng = np.random.default_rng(int(cfg.get("seed", 0) or 0))
    cap = d.get("max_per_patient")
    pids = images["patient_id"].astype(str).to_numpy()
    if cap:
        cap = int(cap)
        order = rng.permutation(n)
        seen: dict[str, int] = {}
        capped = np.zeros(n, dtype=bool)
        for i in order:
            if keep[i]:
                c = seen.get(pids[i], 0)
                if c < cap:
                    capped[i] = True
                    seen[pids[i]] = c + 1
        keep = capped
    rows = np.flatnonzero(keep)
    if len(rows) == 0:
        raise UserError(f"{store.root}: no images left for pretraining after data.exclude_split / caps")
    vf = float(d.get("val_fraction") or 0)
    val_rows = np.array([], dtype=np.int64)
    if vf > 0:
        patients = np.unique(pids[rows])
        if len(patients) >= 2:
            perm = np.random.default_rng([int(cfg.get("seed", 0) or 0), 7]).permutation(patients)
            n_val = min(len(patients) - 1, max(1, int(round(vf * len(patients)))))
            val_p = set(perm[:n_val].tolist())
            is_val = np.array([p in val_p for p in pids[rows]])
            val_rows, rows = rows[is_val], rows[~is_val]
    return rows.astype(np.int64), val_rows.astype(np.int64)


SUMMARY_COLUMNS = ("modality", "body_part", "view")


def data_summary(store, train_rows: np.ndarray, val_rows: np.ndarray, cfg: dict) -> dict:
    """What a run trains on, in counts only (``RUN/data_summary.json``, shown in the run report).

    Images and patients of the training and validation parts, and their counts by modality, body
    part, view and modality x body part; the selection settings that made them.  No image or
    patient id, no path.
    """
    images = store.images

    def counts(rows: np.ndarray) -> dict:
        sub = images.iloc[rows]
        out: dict = {"images": int(len(sub)),
                     "patients": int(sub["patient_id"].nunique()) if "patient_id" in sub.columns else None}
        for col in SUMMARY_COLUMNS:
            if col in sub.columns:
                vc = sub[col].fillna("unknown").astype(str).value_counts()
                out[col] = {str(k): int(v) for k, v in vc.items()}
        if {"modality", "body_part"} <= set(sub.columns) and len(sub):
            both = sub["modality"].fillna("unknown").astype(str) + " / " + sub["body_part"].fillna("unknown").astype(str)
            out["modality_body_part"] = {str(k): int(v) for k, v in both.value_counts().items()}
        return out

    d = cfg["data"]
    return {"store_images": int(len(images)), "train": counts(train_rows), "val": counts(val_rows),
            "left_out": int(len(images) - len(train_rows) - len(val_rows)),
            "selection": {k: d.get(k) for k in ("exclude_split", "respect_keep", "max_per_patient", "val_fraction",
                                                 "balance")}}


def start_weight_stats(cfg: dict) -> tuple[float, float, str] | None:
    """Input mean/std that the start weights (``model.pretrained``) were trained with, if known.

    ImageNet weights: the grey equivalent of their timm ``pretrained_cfg`` (mean of the three
    channel values).  A radpretrain encoder file: the ``preprocessing`` of the ``.json`` beside it.
    ``None`` for random init or weights without recorded statistics.
    """
    pre = get(cfg, "model.pretrained")
    if is_random_init(pre):
        return None
    if str(pre).lower() == "imagenet":
        try:
            m, s = grey_stats(get(cfg, "model.backbone"))
        except UserError:
            return None
        return m, s, "weights (ImageNet pretrained_cfg, grey)"
    try:
        _, meta = find_encoder_files(pre)
        p = json.loads(meta.read_text()).get("preprocessing", {})
        return float(p["mean"]), float(p["std"]), f"weights ({meta.name})"
    except (UserError, ValueError, KeyError, TypeError):
        return None


def input_stats(cfg: dict, store, rows: np.ndarray, seed: int) -> tuple[float, float, str]:
    """``(mean, std, source)`` normalising the pretraining input, following ``data.stats``.

    ``auto`` (default): a run that continues from pretrained weights keeps the input statistics
    those weights were trained with — renormalising changes every activation the weights produce
    (measured: ImageNet lite0 features on the synthetic lesion task (validation archive) lost 0.10 AUC when
    fed images normalised by the dataset's mean/std instead of its own 0.5/0.5); a run from
    random init uses statistics measured on the training images.  ``dataset`` always measures;
    ``weights`` requires known start-weight statistics.
    """
    mode = str(get(cfg, "data.stats", "auto") or "auto").lower()
    if mode not in ("auto", "dataset", "weights"):
        raise UserError(f"data.stats={mode!r}: choose auto, dataset or weights")
    if mode in ("auto", "weights"):
        found = start_weight_stats(cfg)
        if found is not None:
            return found
        if mode == "weights":
            raise UserError(f"data.stats=weights but model.pretrained={get(cfg, 'model.pretrained')!r} "
                            "records no input statistics; set data.mean/data.std or data.stats=dataset")
    d = cfg["data"]
    m, s = measure_stats(store, rows, int(d["image_size"]), int(d.get("stats_sample") or 256), seed)
    return m, s, "dataset"


def measure_stats(store, rows: np.ndarray, image_size: int, n: int = 256, seed: int = 0) -> tuple[float, float]:
    """Mean and std of the letterboxed [0, 1] images (image pixels only, not padding) of a sample of ``rows``."""
    rng = np.random.default_rng(seed)
    pick = rows if len(rows) <= n else np.sort(rng.choice(rows, size=n, replace=False))
    ds = StoreDataset(store, pick, image_size=image_size, resize="letterbox")
    s = s2 = cnt = 0.0
    for i in range(len(ds)):
        item = ds[i]
        v = item["image"][item["valid"]].double()
        s += float(v.sum())
        s2 += float((v * v).sum())
        cnt += v.numel()
    mean = s / max(cnt, 1)
    std = math.sqrt(max(s2 / max(cnt, 1) - mean * mean, 1e-12))
    return float(mean), float(max(std, 1e-3))


def balance_weights(images, rows: np.ndarray, by: str) -> np.ndarray | None:
    """Per-image weights giving each group (modality / body part) the same total weight."""
    if by in (None, "none"):
        return None
    cols = {"modality": ["modality"], "body_part": ["body_part"], "modality_body_part": ["modality", "body_part"]}[by]
    sub = images.iloc[rows]
    key = sub[cols].astype(str).agg("|".join, axis=1)
    counts = key.map(key.value_counts())
    return (1.0 / counts.to_numpy(dtype=np.float64))


# -- samplers ---------------------------------------------------------------------------
class _EpochProxy:
    """Lightning calls ``set_epoch`` on ``loader.batch_sampler.sampler``; forward it to the batch sampler."""

    def __init__(self, owner):
        self._owner = owner

    def set_epoch(self, epoch: int) -> None:
        self._owner.set_epoch(epoch)

    def __iter__(self):  # pragma: no cover - never iterated, only a hook target
        return iter(())


class EpochBatchSampler(torch.utils.data.Sampler):
    """Batches of dataset positions, deterministic for ``(seed, epoch)``, sharded over DDP ranks, resumable.

    The epoch's global order is a seeded permutation (``shuffle``), a seeded weighted draw with
    replacement (``weights``: class balancing), or the order of a method's own sampler
    (``base_sampler``, e.g. DeepCluster's).  Rank ``r`` of ``R`` takes positions ``r, r + R, ...``,
    so one process with batch ``R*b`` sees the same global batches as ``R`` processes with batch
    ``b``.  Incomplete batches are dropped (constant batch size).  :meth:`skip_batches` makes the
    first iteration of an epoch start after the batches a killed run had already trained on.
    """

    def __init__(self, n: int, batch_size: int, seed: int = 0, shuffle: bool = True, weights=None,
                 base_sampler=None, rank: int = 0, world: int = 1):
        self.n, self.batch_size, self.seed, self.shuffle = int(n), int(batch_size), int(seed), bool(shuffle)
        self.weights = None if weights is None else torch.as_tensor(np.asarray(weights), dtype=torch.float64)
        self.base_sampler = base_sampler
        self.rank, self.world = int(rank), int(world)
        self.epoch = 0
        self._skip: tuple[int, int] | None = None
        self.sampler = _EpochProxy(self)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)
        if self.base_sampler is not None and hasattr(self.base_sampler, "set_epoch"):
            self.base_sampler.set_epoch(epoch)

    def skip_batches(self, epoch: int, n_batches: int) -> None:
        self._skip = (int(epoch), int(n_batches)) if n_batches > 0 else None

    def global_order(self) -> list[int]:
        if self.base_sampler is not None:
            return [int(i) for i in self.base_sampler]
        g = torch.Generator()
        g.manual_seed(self.seed * 100_003 + self.epoch)
        if self.weights is not None:
            return torch.multinomial(self.weights, self.n, replacement=True, generator=g).tolist()
        if self.shuffle:
            return torch.randperm(self.n, generator=g).tolist()
        return list(range(self.n))

    def _per_rank(self, order_len: int) -> int:
        return (order_len // self.world) // self.batch_size

    def __iter__(self):
        order = self.global_order()
        mine = order[self.rank :: self.world][: self._per_rank(len(order)) * self.batch_size]
        start = 0
        if self._skip is not None and self._skip[0] == self.epoch:
            start = self._skip[1]
            self._skip = None
        for b in range(start, len(mine) // self.batch_size):
            yield mine[b * self.batch_size : (b + 1) * self.batch_size]

    def __len__(self) -> int:
        n = len(self.base_sampler) if self.base_sampler is not None else self.n
        return self._per_rank(n)


class SkippingBatchSampler(torch.utils.data.Sampler):
    """Wrap a batch sampler with ``set_epoch`` (e.g. ``BucketBatchSampler``) so a resumed epoch skips done batches."""

    def __init__(self, inner):
        self.inner = inner
        self._skip: tuple[int, int] | None = None
        self.epoch = 0
        self.sampler = _EpochProxy(self)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)
        self.inner.set_epoch(epoch)

    def skip_batches(self, epoch: int, n_batches: int) -> None:
        self._skip = (int(epoch), int(n_batches)) if n_batches > 0 else None

    def __iter__(self):
        start = 0
        if self._skip is not None and self._skip[0] == self.epoch:
            start = self._skip[1]
            self._skip = None
        for i, b in enumerate(self.inner):
            if i >= start:
                yield b

    def __len__(self) -> int:
        return len(self.inner)


# -- the Lightning data module ------------------------------------------------------------
def resize_on_device(cfg: dict, method, device_type: str) -> bool:
    """``data.resize_on``: whether batches are letterboxed on the training device instead of in the workers.

    ``auto``: on a GPU, unless the method transforms samples in the workers (``sample_transform``,
    which needs resized images); ``device`` insists (a :class:`UserError` for such a method);
    ``loader``: the CPU path.
    """
    mode = str(get(cfg, "data.resize_on", "auto") or "auto")
    per_sample = method.sample_transform() is not None
    if mode == "loader":
        return False
    if mode == "device":
        if per_sample:
            raise UserError(f"data.resize_on=device: method {method.method_name!r} transforms each sample in the "
                            "loader workers, which needs resized images; use data.resize_on=auto or loader")
        return True
    return device_type == "cuda" and not per_sample


class StoreData(L.LightningDataModule):
    """Train/val loaders over the store; built lazily inside each (DDP) process.

    With ``defer_resize`` (see :func:`resize_on_device`) the loaders' items carry the stored pixels,
    and :meth:`transfer_batch_to_device` letterboxes each batch once it is on the device.
    """

    def __init__(self, store, cfg: dict, method, train_rows, val_rows, resuming: bool, defer_resize: bool = False):
        super().__init__()
        self.store, self.cfg, self.method = store, cfg, method
        self.train_rows, self.val_rows = train_rows, val_rows
        self.resuming = resuming
        self.defer_resize = bool(defer_resize)
        self._skipped = False

    def _dataset(self, rows, resize):
        d = self.cfg["data"]
        return StoreDataset(self.store, rows, image_size=int(d["image_size"]), resize=resize,
                            fields=tuple(self.method.fields), transform=self.method.sample_transform(),
                            defer_resize=self.defer_resize)

    def transfer_batch_to_device(self, batch, device, dataloader_idx):
        # the method's own on_after_batch_transfer (device-side augmentation) then sees the finished batch
        return finish_batch(super().transfer_batch_to_device(batch, device, dataloader_idx))

    def _loader_kw(self):
        d = self.cfg["data"]
        nw = int(d.get("num_workers") or 0)
        kw = {"num_workers": nw, "pin_memory": torch.cuda.is_available()}
        if nw > 0:
            kw["persistent_workers"] = not self.method.reload_dataloaders_every_epoch
            kw["prefetch_factor"] = 4
        return kw

    def train_loader(self, rank: int = 0, world: int = 1, epoch: int = 0):
        """The training ``DataLoader`` of DDP rank ``rank`` of ``world`` for ``epoch`` (also used by
        benchmarks/gpu.py to time the loader alone): dataset, batch sampler, collate and workers."""
        d = self.cfg["data"]
        seed = int(self.cfg.get("seed", 0) or 0)
        ds = self._dataset(self.train_rows, d["resize"])
        if d["resize"] == "bucket":
            multiple = int(get(self.cfg, "model.patch_size", 16) or 16) if "vit" in str(get(self.cfg, "model.backbone", "")) else 32
            bs = SkippingBatchSampler(BucketBatchSampler(ds, int(d["batch_size"]), image_size=int(d["image_size"]),
                                                         multiple=multiple, shuffle=bool(d.get("shuffle", True)),
                                                         seed=seed, drop_last=True, num_replicas=world, rank=rank))
        else:
            base = self.method.train_sampler(ds)
            weights = balance_weights(self.store.images, self.train_rows, d.get("balance")) if base is None else None
            bs = EpochBatchSampler(len(ds), int(d["batch_size"]), seed=seed, shuffle=bool(d.get("shuffle", True)),
                                   weights=weights, base_sampler=base, rank=rank, world=world)
        if len(bs) == 0:
            raise UserError(f"{self.store.root}: {len(ds)} training images give no full batch of "
                            f"{d['batch_size']} per process; lower data.batch_size")
        bs.set_epoch(epoch)
        return torch.utils.data.DataLoader(ds, batch_sampler=bs, collate_fn=ds.collate, **self._loader_kw())

    def train_dataloader(self):
        trainer = self.trainer
        epoch = trainer.current_epoch
        loader = self.train_loader(trainer.global_rank, trainer.world_size, epoch)
        bs = loader.batch_sampler
        if self.resuming and not self._skipped:
            # called after the checkpoint was restored (the engine gives the optimizer its step
            # count, so Lightning does not load data early): skip what the killed run trained on
            done = int(trainer.fit_loop.epoch_loop.batch_progress.current.processed)
            if 0 < done < len(bs):
                bs.skip_batches(epoch, done)
                log.info("resuming epoch %d after batch %d of %d", epoch, done, len(bs))
            self._skipped = True
        return loader

    def val_dataloader(self):
        d = self.cfg["data"]
        trainer = self.trainer
        rows = self.val_rows[trainer.global_rank :: trainer.world_size]
        if len(rows) == 0:  # every rank must run validation (the epoch-end all-reduce of val/loss)
            rows = self.val_rows[:1]
        ds = self._dataset(rows, "letterbox")
        return torch.utils.data.DataLoader(ds, batch_size=int(d["batch_size"]), shuffle=False, collate_fn=ds.collate,
                                           **self._loader_kw())


def preview_batch(store, cfg, model, rows):
    n = min(int(get(cfg, "previews.n", 8) or 0), len(rows))
    if n <= 0:
        return None
    ds = StoreDataset(store, rows[:n], image_size=int(cfg["data"]["image_size"]), resize="letterbox",
                      fields=tuple(model.fields))
    return torch.utils.data.default_collate([ds[i] for i in range(n)])

