"""``radpretrain pretrain``: the Lightning engine that turns a dataset store into an encoder.

::

    radpretrain pretrain [--method mae] [--config PRESET_OR_FILE] --data DATASET --out RUN [--resume] [key=value ...]

The config is the packaged preset ``<method>_cpu`` unless ``--config`` names another preset
(e.g. ``mae_pilot``, which names its method, so ``--method`` may be left out) or a YAML file;
:data:`DEFAULTS` fills every engine key a config leaves out, and ``key=value`` overrides any
key (``trainer.max_steps=30 data.image_size=64``).  Files and overrides are checked against
the schema in :mod:`radpretrain.pretrain.config` before anything is written.

The engine owns data loading (``StoreDataset``, a resumable epoch-seeded batch
sampler, optional class balancing, aspect-ratio buckets, patient-grouped
validation split), the Lightning ``Trainer`` (CPU, one GPU, DDP under torchrun
or SLURM), loggers (CSV, TensorBoard, a text log), checkpoints (periodic +
``last.ckpt`` + best on validation loss), early stopping, previews and the final
``encoder.safetensors`` + ``encoder.json``.  Methods plug in through the hooks of
:class:`radpretrain.methods.base.PretrainMethod` (``fields``, ``sample_transform``,
``train_sampler``, ``reload_dataloaders_every_epoch``, ``on_train_epoch_start``,
``save_previews``, ``encoder_meta``).

Run folder::

    RUN/config.yaml        resolved config (incl. measured data.mean / data.std)
    RUN/versions.json      package versions
    RUN/logs/              csv/metrics.csv, tensorboard/, pretrain.log
    RUN/checkpoints/       step*.ckpt (every trainer.checkpoint_every_n_steps, newest trainer.keep_checkpoints
                           kept), last.ckpt, best.ckpt: written atomically, read only after their pickle
                           was checked (see write_checkpoint / read_checkpoint)
    RUN/previews/          PNGs from the method (MAE reconstructions, SimCLR views, ...)
    RUN/encoder.safetensors, RUN/encoder.json   at the end (see docs/architecture.md)
"""

from __future__ import annotations

import argparse
import collections
import errno
import json
import math
import os
import re
import shutil
import time
import warnings
import zipfile
from pathlib import Path

import numpy as np
import torch

from radpretrain.config import get, load_config_with_source, save_config
from radpretrain.errors import UserError
from radpretrain.models.weights import torch_file_globals
from radpretrain.pretrain.config import DEFAULTS, check_run_config, resolve_config, resume_config  # noqa: F401
from radpretrain.utils import add_file_log, get_logger, package_versions, write_json

log = get_logger("pretrain")

# Everything a pretraining checkpoint's pickle references (measured: every method, with validation,
# early stopping and DeepCluster's assignment, at every precision): ordered dicts, and tensors of
# the dtypes a run can hold.  Lightning's own entries (loops, callbacks, optimizer and scheduler
# states) are plain dicts, lists, numbers and strings.  A checkpoint that references anything else
# was not written by radpretrain and is refused without being unpickled (see read_checkpoint).
CHECKPOINT_SAFE_GLOBALS: tuple = (
    collections.OrderedDict, torch._utils._rebuild_tensor_v2,
    torch.FloatStorage, torch.DoubleStorage, torch.HalfStorage, torch.BFloat16Storage, torch.LongStorage,
    torch.IntStorage, torch.ShortStorage, torch.CharStorage, torch.ByteStorage, torch.BoolStorage,
)
_CHECKPOINT_GLOBAL_NAMES = frozenset(f"{g.__module__}.{g.__qualname__}" for g in CHECKPOINT_SAFE_GLOBALS)
# what a checkpoint needs to continue a run (a weights-only checkpoint has only state_dict)
_RESUME_KEYS = ("state_dict", "optimizer_states", "loops", "global_step")
_DISK_FULL = (errno.ENOSPC, errno.EDQUOT)


# -- data selection -------------------------------------------------------------------
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
        from radpretrain.data.splits import load_splits

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


def start_weight_stats(cfg: dict) -> tuple[float, float, str] | None:
    """Input mean/std that the start weights (``model.pretrained``) were trained with, if known.

    ImageNet weights: the grey equivalent of their timm ``pretrained_cfg`` (mean of the three
    channel values).  A radpretrain encoder file: the ``preprocessing`` of the ``.json`` beside it.
    ``None`` for random init or weights without recorded statistics.
    """
    from radpretrain.models.backbones import grey_stats, is_random_init
    from radpretrain.models.weights import find_encoder_files

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
    from radpretrain.data.dataset import StoreDataset

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
def _data_module_class():
    import lightning as L

    class StoreData(L.LightningDataModule):
        """Train/val loaders over the store; built lazily inside each (DDP) process."""

        def __init__(self, store, cfg: dict, method, train_rows, val_rows, resuming: bool):
            super().__init__()
            self.store, self.cfg, self.method = store, cfg, method
            self.train_rows, self.val_rows = train_rows, val_rows
            self.resuming = resuming
            self._skipped = False

        def _dataset(self, rows, resize):
            from radpretrain.data.dataset import StoreDataset

            d = self.cfg["data"]
            return StoreDataset(self.store, rows, image_size=int(d["image_size"]), resize=resize,
                                fields=tuple(self.method.fields), transform=self.method.sample_transform())

        def _loader_kw(self):
            d = self.cfg["data"]
            nw = int(d.get("num_workers") or 0)
            kw = {"num_workers": nw, "pin_memory": torch.cuda.is_available()}
            if nw > 0:
                kw["persistent_workers"] = not self.method.reload_dataloaders_every_epoch
                kw["prefetch_factor"] = 4
            return kw

        def train_dataloader(self):
            d = self.cfg["data"]
            trainer = self.trainer
            rank, world = trainer.global_rank, trainer.world_size
            seed = int(self.cfg.get("seed", 0) or 0)
            ds = self._dataset(self.train_rows, d["resize"])
            if d["resize"] == "bucket":
                from radpretrain.data.buckets import BucketBatchSampler

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
            epoch = trainer.current_epoch
            bs.set_epoch(epoch)
            if self.resuming and not self._skipped:
                # called after the checkpoint was restored (the engine gives the optimizer its step
                # count, so Lightning does not load data early): skip what the killed run trained on
                done = int(trainer.fit_loop.epoch_loop.batch_progress.current.processed)
                if 0 < done < len(bs):
                    bs.skip_batches(epoch, done)
                    log.info("resuming epoch %d after batch %d of %d", epoch, done, len(bs))
                self._skipped = True
            return torch.utils.data.DataLoader(ds, batch_sampler=bs, **self._loader_kw())

        def val_dataloader(self):
            d = self.cfg["data"]
            trainer = self.trainer
            rows = self.val_rows[trainer.global_rank :: trainer.world_size]
            if len(rows) == 0:  # every rank must run validation (the epoch-end all-reduce of val/loss)
                rows = self.val_rows[:1]
            ds = self._dataset(rows, "letterbox")
            return torch.utils.data.DataLoader(ds, batch_size=int(d["batch_size"]), shuffle=False, **self._loader_kw())

    return StoreData


def _preview_callback_class():
    import lightning as L

    class Previews(L.Callback):
        """Ask the method for preview images on rank 0 every few epochs and at the end."""

        def __init__(self, batch, out_dir: Path, every: int):
            self.batch, self.out_dir, self.every = batch, out_dir, max(0, int(every or 0))

        def _save(self, pl_module):
            if self.batch is None:
                return
            try:
                paths = pl_module.save_previews(self.batch, self.out_dir) or []
                for p in paths:
                    log.info("preview: %s", p)
            except Exception as e:  # previews never stop a run
                log.warning("previews failed: %s: %s", type(e).__name__, e)

        def on_train_epoch_end(self, trainer, pl_module):
            if trainer.is_global_zero and self.every and (trainer.current_epoch + 1) % self.every == 0:
                self._save(pl_module)

        def on_train_end(self, trainer, pl_module):
            if trainer.is_global_zero:
                self._save(pl_module)

    return Previews


# -- distributed environment -------------------------------------------------------------
def _env_rank() -> int:
    for var in ("RANK", "SLURM_PROCID", "LOCAL_RANK"):
        if os.environ.get(var, "").isdigit():
            return int(os.environ[var])
    return 0


def _devices_and_nodes(t: dict) -> tuple:
    devices, nodes = t.get("devices", "auto"), t.get("num_nodes", "auto")
    env = os.environ
    if devices in (None, "auto"):
        if "LOCAL_WORLD_SIZE" in env:          # torchrun
            devices = int(env["LOCAL_WORLD_SIZE"])
        elif "SLURM_NTASKS_PER_NODE" in env and env.get("SLURM_JOB_NAME") not in ("bash", "interactive"):
            devices = int(env["SLURM_NTASKS_PER_NODE"].split("(")[0])
        else:
            devices = "auto" if torch.cuda.is_available() else 1
    if nodes in (None, "auto"):
        if "LOCAL_WORLD_SIZE" in env and "WORLD_SIZE" in env:
            nodes = max(1, int(env["WORLD_SIZE"]) // int(env["LOCAL_WORLD_SIZE"]))
        elif "SLURM_NNODES" in env and env.get("SLURM_JOB_NAME") not in ("bash", "interactive"):
            nodes = int(env["SLURM_NNODES"])
        else:
            nodes = 1
    return devices, int(nodes)


def _precision(p) -> str:
    if p in (None, "auto"):
        if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
            return "bf16-mixed"
        return "32-true"
    return str(p)


# -- checkpoints -------------------------------------------------------------------------------
# Written through a temporary file and a rename (never partial); read only after the pickle was
# checked against CHECKPOINT_SAFE_GLOBALS, with torch's weights-only unpickler; a damaged file is
# skipped by --resume in favour of the newest intact one.
_STEP_CKPT = re.compile(r"^step(\d+)(-v\d+)?\.ckpt$")


def _short(e: BaseException) -> str:
    first = str(e).strip().splitlines()[0][:160] if str(e).strip() else ""
    return f"{type(e).__name__}: {first}" if first else type(e).__name__


def _mb(n: int | None) -> str:
    return "an unknown amount" if n is None else f"{n / 1e6:,.0f} MB"


def _free_bytes(folder: Path) -> int | None:
    try:
        return shutil.disk_usage(folder).free
    except OSError:
        return None


def _disk_full_error(e: BaseException | None) -> OSError | None:
    """The ENOSPC / EDQUOT ``OSError`` that ``e`` is or was raised from (torch.save wraps it), else None."""
    for _ in range(8):
        if e is None:
            return None
        if isinstance(e, OSError) and e.errno in _DISK_FULL:
            return e
        e = e.__cause__ or e.__context__
    return None


def _checkpoint_nbytes(checkpoint) -> int:
    """Bytes of tensor storage in a checkpoint dict: a lower bound of its file size (the pickle is small)."""
    storages: dict = {}
    todo = [checkpoint]
    while todo:
        o = todo.pop()
        if isinstance(o, torch.Tensor):
            st = o.untyped_storage()
            storages[(st.data_ptr(), str(o.device))] = st.nbytes()
        elif isinstance(o, dict):
            todo.extend(o.values())
        elif isinstance(o, (list, tuple)):
            todo.extend(o)
    return int(sum(storages.values()))


def _disk_full_message(path: Path, need: int | None, free: int | None) -> str:
    what = f"a checkpoint of about {_mb(need)} does not fit" if need else "the disk is full"
    return (f"{path}: disk full: {what} ({_mb(free)} free on that disk); free some space "
            "(or lower trainer.keep_checkpoints), then continue the run with --resume")


def write_checkpoint(checkpoint: dict, path: Path) -> None:
    """``torch.save`` to ``NAME.tmp`` beside ``path``, flushed to disk, then renamed over ``path``.

    ``path`` is therefore either the previous complete checkpoint or the new one, never a partial
    file (a kill or a full disk mid-write leaves at most the ``.tmp``, which is removed).  A disk
    without room for the checkpoint (its tensor bytes) is a :class:`UserError` before anything is
    written; ENOSPC / EDQUOT while writing is the same one-line error.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    need = _checkpoint_nbytes(checkpoint)
    free = _free_bytes(path.parent)
    if free is not None and free < need:
        raise UserError(_disk_full_message(path, need, free))
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as f:
            torch.save(checkpoint, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        if _disk_full_error(e) is not None:
            raise UserError(_disk_full_message(path, need, _free_bytes(path.parent))) from None
        raise


def _refuse_foreign(path: Path, found: set[str]) -> None:
    foreign = sorted(found - _CHECKPOINT_GLOBAL_NAMES)
    if foreign:
        more = f" and {len(foreign) - 3} more" if len(foreign) > 3 else ""
        raise UserError(f"{path}: refused, not loaded: its pickle references {', '.join(foreign[:3])}{more}, which no "
                        "radpretrain checkpoint holds (planted, or written by other code); "
                        "use a run folder you trust, or delete this file")


def _load_checkpoint(path: Path, map_location, mmap: bool = False) -> dict:
    """Unpickle a checkpoint whose globals were checked: weights-only, with the scoped allowlist."""
    with torch.serialization.safe_globals(list(CHECKPOINT_SAFE_GLOBALS)):
        ck = torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    if not isinstance(ck, dict):
        raise ValueError(f"holds a {type(ck).__name__}, not a checkpoint dict")
    return ck


def read_checkpoint(path: Path, map_location="cpu") -> dict:
    """A pretraining checkpoint, never unpickling anything but tensors and plain values.

    The pickle's globals are read first without unpickling (``torch_file_globals``); anything
    outside :data:`CHECKPOINT_SAFE_GLOBALS` is a one-line :class:`UserError` naming what was found.
    Then ``torch.load(weights_only=True)`` with that allowlist (scoped, not process-wide).  A
    damaged file is a one-line :class:`UserError` too.
    """
    path = Path(path)
    try:
        found = torch_file_globals(path)
    except Exception as e:  # OSError, BadZipFile, ValueError (truncated pickle) ...
        raise UserError(f"{path}: damaged checkpoint ({_short(e)})") from None
    _refuse_foreign(path, found)
    try:
        return _load_checkpoint(path, map_location)
    except Exception as e:
        raise UserError(f"{path}: unreadable checkpoint ({_short(e)})") from None


def _peek_checkpoint(path: Path) -> tuple[int, str | None]:
    """``(global_step, None)`` for a checkpoint that loads (memory-mapped: tensor bytes are not read)
    and holds a training state; ``(-1, why)`` otherwise.  Foreign content: :class:`UserError`."""
    try:
        found = torch_file_globals(path)
    except Exception as e:
        return -1, f"unreadable ({_short(e)})"
    _refuse_foreign(path, found)
    try:
        if not zipfile.is_zipfile(path):
            return -1, "not a complete checkpoint (truncated or overwritten)"
        ck = _load_checkpoint(path, "cpu", mmap=True)
    except Exception as e:
        return -1, f"damaged ({_short(e)})"
    missing = [k for k in _RESUME_KEYS if k not in ck]
    if missing:
        return -1, f"holds no training state (no {', '.join(missing)})"
    return int(ck["global_step"]), None


def _checksum_problem(path: Path) -> str | None:
    """Why the zip records of ``path`` fail their CRC-32 checks (a file damaged inside), or None."""
    try:
        with zipfile.ZipFile(path) as z:
            bad = z.testzip()
    except Exception as e:
        return f"damaged ({_short(e)})"
    return None if bad is None else f"damaged (record {bad} fails its checksum)"


def inspect_checkpoint(path: Path) -> str | None:
    """Why ``path`` cannot continue a run (damaged, truncated, no training state), or None when intact.

    Intact: it loads (weights only, see :func:`read_checkpoint`), holds a training state and every
    zip record passes its CRC-32 check.  Foreign content is not a "damage" to skip: it is a
    :class:`UserError`.
    """
    _, problem = _peek_checkpoint(path)
    return problem or _checksum_problem(path)


def checkpoint_candidates(ck_dir: Path) -> list[Path]:
    """Checkpoints a run can continue from, in the order preferred among equal steps: last.ckpt,
    step*.ckpt newest first, best.ckpt."""
    if not ck_dir.is_dir():
        return []
    steps = [(int(m.group(1)), p.name, p) for p in ck_dir.glob("step*.ckpt") if (m := _STEP_CKPT.match(p.name))]
    ordered = [ck_dir / "last.ckpt", *(p for _, _, p in sorted(steps, reverse=True)), ck_dir / "best.ckpt"]
    return [p for p in ordered if p.is_file()]


def _clear_partial_writes(ck_dir: Path) -> list[str]:
    """Remove ``*.ckpt.tmp`` left by a write that was killed (never a complete checkpoint)."""
    notes = []
    for tmp in sorted(ck_dir.glob("*.ckpt.tmp")) if ck_dir.is_dir() else []:
        tmp.unlink(missing_ok=True)
        notes.append(f"removed {tmp.name}, a checkpoint write that did not finish")
    return notes


def _set_aside(path: Path) -> Path:
    """Rename a damaged file to ``NAME.damaged`` (``.damaged1``, ... if taken); nothing is deleted."""
    for i in range(1000):
        target = path.with_name(f"{path.name}.damaged{i or ''}")
        if not target.exists():
            path.rename(target)
            return target
    raise UserError(f"{path}: damaged, and too many .damaged copies beside it; remove them")


def existing_run(run_dir: Path) -> tuple[str | None, list[str]]:
    """What in ``run_dir`` a new start would overwrite (a finished encoder, an intact checkpoint), or None.

    A folder left by a start that failed before training, or by a run that never completed a
    checkpoint (a full disk; a copy cut short), holds no run: its damaged checkpoints are renamed to
    ``NAME.damaged`` (kept, never deleted) and the notes say so.  A checkpoint with foreign content
    is a :class:`UserError`: such a folder is not taken over.  Returns ``(what, notes)``.
    """
    if (run_dir / "encoder.safetensors").exists():
        return "encoder.safetensors", []
    ck_dir = run_dir / "checkpoints"
    if not ck_dir.is_dir():
        return None, []
    notes = []
    cands = checkpoint_candidates(ck_dir)
    files = cands + sorted(p for p in ck_dir.glob("*.ckpt") if p not in cands)
    problems = {}
    for p in files:
        problem = inspect_checkpoint(p)
        if problem is None:
            return f"checkpoints/{p.name}", notes
        problems[p] = problem
    for p, problem in problems.items():
        aside = _set_aside(p)
        notes.append(f"{p}: {problem}; no intact checkpoint left, so a new run starts here (kept as {aside.name})")
    return None, notes


def _step_checkpoint_class():
    from lightning.pytorch.callbacks import ModelCheckpoint

    class StepCheckpoint(ModelCheckpoint):
        """The periodic ``step*.ckpt`` callback; on resume its bookkeeping follows the folder and the
        current ``trainer.keep_checkpoints``.

        Lightning restores the list of kept files as it was saved: files removed since (by hand, or
        after a full disk) stay in it, and a lower ``keep_checkpoints`` than the run started with
        makes its next comparison fail (KeyError) or never prune.  Here missing files are dropped,
        the newest ``keep_checkpoints`` are kept and the older ones removed when training starts.
        """

        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self._surplus: list[str] = []

        def load_state_dict(self, state_dict):
            super().load_state_dict(state_dict)
            kept = {p: v for p, v in self.best_k_models.items() if os.path.isfile(p)}
            order = sorted(kept, key=lambda p: float(kept[p]), reverse=self.mode == "max")  # best first
            if self.save_top_k >= 0:
                self._surplus = order[self.save_top_k:]
                order = order[: self.save_top_k]
            self.best_k_models = {p: kept[p] for p in order}
            if order and len(order) == self.save_top_k:  # full: the next save replaces the worst
                self.kth_best_model_path, self.kth_value = order[-1], kept[order[-1]]
            else:
                self.kth_best_model_path = ""

        def on_train_start(self, trainer, pl_module):
            super().on_train_start(trainer, pl_module)
            for p in self._surplus:
                trainer.strategy.remove_checkpoint(p)
                log.info("removed %s (trainer.keep_checkpoints=%s)", Path(p).name, self.save_top_k)
            self._surplus = []

    return StepCheckpoint


def _checkpoint_io():
    """The Lightning ``CheckpointIO`` plugin of the engine: :func:`write_checkpoint` / :func:`read_checkpoint`."""
    from lightning.pytorch.plugins.io import CheckpointIO

    class RunCheckpointIO(CheckpointIO):
        def save_checkpoint(self, checkpoint, path, storage_options=None):
            if storage_options is not None:
                raise TypeError("storage_options are not supported by radpretrain's checkpoint writer")
            write_checkpoint(checkpoint, Path(path))

        def load_checkpoint(self, path, map_location=None, weights_only=None):
            return read_checkpoint(Path(path), map_location="cpu" if map_location is None else map_location)

        def remove_checkpoint(self, path):
            Path(path).unlink(missing_ok=True)

    return RunCheckpointIO()


# -- the run ---------------------------------------------------------------------------------
def add_arguments(p: argparse.ArgumentParser) -> None:
    from radpretrain.methods import METHOD_MODULES

    p.add_argument("--method", default=None, choices=sorted(METHOD_MODULES),
                   help="pretraining method (may be left out when --config names a preset or file that names it)")
    p.add_argument("--data", required=True, help="dataset store folder (from 'radpretrain ingest')")
    p.add_argument("--out", required=True, help="run folder to create (or to continue with --resume)")
    p.add_argument("--config", default=None,
                   help="packaged preset (e.g. mae_pilot; default: <method>_cpu) or a YAML config file")
    p.add_argument("--resume", action="store_true", help="continue a stopped run from RUN/checkpoints/last.ckpt")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="config overrides, e.g. trainer.max_steps=30 data.image_size=64 model.pretrained=imagenet")


def find_resume_checkpoint(run: Path) -> tuple[Path, list[str]]:
    """The newest intact checkpoint of ``run`` to continue from, and notes for the log on what was skipped.

    Candidates: ``last.ckpt``, ``step*.ckpt`` and ``best.ckpt``, by the global step they hold (read
    memory-mapped), ``last.ckpt`` first among equals; a full disk can leave ``last.ckpt`` one save
    behind the step file written just before it.  A damaged one (truncated, garbage, failing its
    checksums) is skipped with a note.  Every checkpoint in the folder is first checked for foreign
    content (a :class:`UserError`; nothing is unpickled); none intact is a :class:`UserError`
    saying how to start over.
    """
    ck_dir = run / "checkpoints"
    for p in sorted(ck_dir.glob("*.ckpt")) if ck_dir.is_dir() else []:
        try:
            found = torch_file_globals(p)
        except Exception:  # damaged: the candidates loop below says so if it matters
            continue
        _refuse_foreign(p, found)
    cands = checkpoint_candidates(ck_dir)
    if not cands:
        raise UserError(f"{run}: nothing to resume (no checkpoints/last.ckpt); start the run without --resume")
    notes, loadable = [], []
    for i, p in enumerate(cands):
        step, problem = _peek_checkpoint(p)
        if problem is None:
            loadable.append((-step, i, p))
        else:
            notes.append(f"{p}: {problem}; skipped")
    for neg_step, _, p in sorted(loadable):  # newest step first; last.ckpt first among equals
        problem = _checksum_problem(p)
        if problem is None:
            if p != cands[0] or notes:
                notes.append(f"resuming from {p.name} (step {-neg_step}), the newest intact checkpoint")
            return p, notes
        notes.append(f"{p}: {problem}; skipped")
    first = notes[0].removesuffix("; skipped")
    raise UserError(f"{ck_dir}: no intact checkpoint to resume from ({len(cands)} damaged; {first}); start over: "
                    "run the same command without --resume (the damaged files are kept as *.damaged) or choose a new --out")


def run(args) -> int:
    result = pretrain(args.method, args.data, args.out, config=args.config, overrides=args.overrides, resume=args.resume)
    print(result["encoder"])
    return 0


def pretrain(method: str | None, data: str | Path, out: str | Path, config: str | None = None, overrides=(),
             resume: bool = False, callbacks=()) -> dict:
    """Run pretraining; returns ``{"run": RUN, "encoder": path or None, "global_step": int, ...}``."""
    import lightning as L

    from radpretrain.data.store import Store
    from radpretrain.methods import get_method

    run_dir = Path(out)
    rank = _env_rank()
    ckpt_path = None
    notes: list[str] = []  # about the run folder's checkpoints; logged once the run's log file is open
    if resume:
        if not (run_dir / "config.yaml").is_file():
            raise UserError(f"{run_dir}: no config.yaml; nothing to resume (start the run without --resume)")
        ckpt_path, notes = find_resume_checkpoint(run_dir)
        saved, source = load_config_with_source(run_dir / "config.yaml")
        if method is not None and saved.get("method") not in (None, method):
            raise UserError(f"{run_dir}: this run used --method {saved.get('method')}, not {method}")
        cfg = resume_config(saved, source, overrides)
        if data is not None and Path(data).resolve() != Path(cfg["data"]["root"] or data).resolve():
            log.warning("--data %s differs from the run's data.root %s; using --data", data, cfg["data"]["root"])
            cfg["data"]["root"] = str(Path(data).resolve())
    else:
        cfg = resolve_config(method, config, overrides, data)
        if rank == 0:  # a folder from a start that failed before training (or before its first intact checkpoint) is reused
            held, notes = existing_run(run_dir)
            if held:
                raise UserError(f"{run_dir}: already holds a run ({held}); use --resume to continue it or choose a new --out")
    method = cfg["method"]
    threads, threads_note = get(cfg, "trainer.cpu_threads"), None
    if threads == "auto":  # one thread per idle core, measured now (logged below, into the run's log)
        from radpretrain.utils import auto_cpu_threads

        threads, idle = auto_cpu_threads()
        cfg["trainer"]["cpu_threads"] = threads  # config.yaml records what ran: a rerun or --resume repeats it
        threads_note = (f"cpu threads: {threads} (trainer.cpu_threads=auto; "
                        f"{'unknown' if idle is None else f'{idle:.1f}'} cores idle)")
    if threads:
        torch.set_num_threads(int(threads))
    store = Store(cfg["data"]["root"])
    train_rows, val_rows = select_images(store, cfg)
    seed = int(cfg.get("seed", 0) or 0)
    d = cfg["data"]
    stats_source = "config"
    if d.get("mean") is None or d.get("std") is None:
        m, s, stats_source = input_stats(cfg, store, train_rows, seed)
        d["mean"] = d["mean"] if d.get("mean") is not None else round(m, 6)
        d["std"] = d["std"] if d.get("std") is not None else round(s, 6)
        d["stats_source"] = stats_source  # recorded in config.yaml: where mean/std came from

    L.seed_everything(seed, workers=True, verbose=False)
    model = get_method(method)(cfg, store)  # user errors (weights, backbone) before anything is written
    file_log = None
    try:
        if rank == 0:  # other DDP ranks write nothing (and must not race rank 0's "already a run" check)
            run_dir.mkdir(parents=True, exist_ok=True)
            for sub in ("logs", "checkpoints", "previews"):
                (run_dir / sub).mkdir(exist_ok=True)
            notes = notes + _clear_partial_writes(run_dir / "checkpoints")
            save_config(cfg, run_dir / "config.yaml")
            write_json(run_dir / "versions.json", package_versions())
            file_log = add_file_log(run_dir / "logs" / "pretrain.log")
            for note in notes:  # damaged checkpoints skipped or set aside, partial writes removed
                log.warning(note)
            if ckpt_path is not None:
                log.info("resuming from %s", ckpt_path)
        log.info("method %s, encoder %s %s, %d train / %d val images, input mean %.4f std %.4f (%s)",
                 method, model.arch, model.model_kwargs, len(train_rows), len(val_rows), d["mean"], d["std"],
                 stats_source)
        if threads_note:
            log.info(threads_note)
        use_val = len(val_rows) > 0 and model.has_val_loss
        trainer = _build_trainer(cfg, run_dir, model, use_val, callbacks, store, train_rows, val_rows)
        model.total_steps_hint = total_steps(cfg, len(train_rows), trainer.world_size)
        if use_channels_last(cfg, model, trainer.strategy.root_device.type):
            model.to(memory_format=torch.channels_last)  # same values; faster kernels (see prefers_channels_last)
            log.info("channels_last memory format on (trainer.channels_last=%s)", get(cfg, "trainer.channels_last"))
        dm = _data_module_class()(store, cfg, model, train_rows, val_rows if use_val else np.array([], dtype=np.int64),
                                  resuming=ckpt_path is not None)
        t0 = time.time()
        with warnings.catch_warnings():
            # our batch sampler skips the batches a resumed epoch already trained on (see
            # StoreData.train_dataloader), so Lightning's "dataloader is not resumable" does not apply
            warnings.filterwarnings("ignore", message=r"You're resuming from a checkpoint that ended before the epoch")
            # the checkpoint is read by the engine's CheckpointIO (read_checkpoint: vetted, weights only)
            trainer.fit(model, datamodule=dm, ckpt_path=str(ckpt_path) if ckpt_path else None, weights_only=True)
        elapsed = time.time() - t0
        # the full training state (weights_only=False here means "not only the weights": optimizer,
        # loops, callbacks -- all tensors and plain values), written atomically by write_checkpoint;
        # --resume of a finished run continues from it (e.g. with a larger trainer.max_steps)
        trainer.save_checkpoint(run_dir / "checkpoints" / "last.ckpt", weights_only=False)
        if trainer.interrupted:
            raise UserError(f"{run_dir}: interrupted at step {trainer.global_step}; continue with --resume")
        result = {"run": run_dir, "encoder": None, "global_step": int(trainer.global_step),
                  "epochs": int(trainer.current_epoch), "seconds": round(elapsed, 1)}
        if trainer.is_global_zero:
            result["encoder"] = export_encoder(model, trainer, cfg, run_dir)
        return result
    except UserError:
        raise
    except Exception as e:  # a full disk anywhere (logs, previews, encoder): one line, and --resume continues
        full = _disk_full_error(e)
        if full is None:
            raise
        where = Path(full.filename) if full.filename else run_dir
        raise UserError(_disk_full_message(where, None, _free_bytes(where if where.is_dir() else where.parent))) from None
    finally:
        if file_log is not None:
            import logging

            logging.getLogger("radpretrain").removeHandler(file_log)
            file_log.close()


def use_channels_last(cfg: dict, model, device_type: str) -> bool:
    """``trainer.channels_last``: true / false, or auto (:func:`~radpretrain.models.backbones.prefers_channels_last`)."""
    from radpretrain.models.backbones import prefers_channels_last

    v = get(cfg, "trainer.channels_last", "auto")
    if isinstance(v, bool):
        return v
    return model.encoder is not None and prefers_channels_last(model.encoder, device_type)


def total_steps(cfg: dict, n_train: int, world: int) -> int:
    """Optimizer steps of the whole run (for the LR schedule): max_steps, else epochs x steps per epoch."""
    t, d = cfg["trainer"], cfg["data"]
    per_rank = (n_train // max(1, world)) // int(d["batch_size"])
    per_epoch = max(1, math.ceil(per_rank / int(t.get("accumulate_grad_batches", 1) or 1)))
    by_epochs = per_epoch * int(t["max_epochs"]) if t.get("max_epochs") not in (None, -1) else None
    max_steps = int(t["max_steps"]) if t.get("max_steps") not in (None, -1) else None
    return min(x for x in (by_epochs, max_steps) if x is not None)


def _build_trainer(cfg, run_dir: Path, model, use_val: bool, extra_callbacks, store, train_rows, val_rows):
    import lightning as L
    from lightning.pytorch.callbacks import EarlyStopping, LearningRateMonitor, ModelCheckpoint
    from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

    t = cfg["trainer"]
    ck_dir = run_dir / "checkpoints"
    every = int(t.get("checkpoint_every_n_steps") or 0) or None
    callbacks = [
        # the newest keep_checkpoints step files (what --resume falls back to) + last.ckpt; a file of
        # the same name is replaced (no -v1 copies), atomically (see write_checkpoint)
        _step_checkpoint_class()(dirpath=ck_dir, filename="step{step:07d}", auto_insert_metric_name=False,
                                 every_n_train_steps=every, save_top_k=int(t.get("keep_checkpoints", 3)),
                                 monitor="step", mode="max", save_last=True, save_on_train_epoch_end=False,
                                 enable_version_counter=False),
        LearningRateMonitor(logging_interval="step"),
    ]
    if use_val:
        callbacks.append(ModelCheckpoint(dirpath=ck_dir, filename="best", monitor="val/loss", mode="min",
                                         save_top_k=1, auto_insert_metric_name=False, enable_version_counter=False,
                                         save_on_train_epoch_end=False))
        pat = get(cfg, "early_stopping.patience")
        if pat:
            callbacks.append(EarlyStopping(monitor="val/loss", mode="min", patience=int(pat),
                                           min_delta=float(get(cfg, "early_stopping.min_delta", 0.0) or 0.0),
                                           check_on_train_epoch_end=False))  # after validation only
    preview_batch = _preview_batch(store, cfg, model, val_rows if len(val_rows) else train_rows)
    callbacks.append(_preview_callback_class()(preview_batch, run_dir / "previews", get(cfg, "previews.every_n_epochs", 1)))
    callbacks.extend(extra_callbacks)
    devices, nodes = _devices_and_nodes(t)
    loggers = [CSVLogger(save_dir=run_dir, name="logs", version="csv"),
               TensorBoardLogger(save_dir=run_dir, name="logs", version="tensorboard", default_hp_metric=False)]
    kw = dict(
        default_root_dir=run_dir, max_epochs=t.get("max_epochs"), max_steps=int(t.get("max_steps") if t.get("max_steps") is not None else -1),
        accelerator=t.get("accelerator", "auto"), devices=devices, num_nodes=nodes, strategy=t.get("strategy", "auto"),
        precision=_precision(t.get("precision")), accumulate_grad_batches=int(t.get("accumulate_grad_batches", 1)),
        gradient_clip_val=t.get("gradient_clip_val"), check_val_every_n_epoch=t.get("check_val_every_n_epoch", 1),
        val_check_interval=t.get("val_check_interval"), limit_val_batches=t.get("limit_val_batches", 1.0),
        log_every_n_steps=int(t.get("log_every_n_steps", 10)), enable_progress_bar=bool(t.get("enable_progress_bar", True)),
        sync_batchnorm=bool(t.get("sync_batchnorm", False)), deterministic=bool(t.get("deterministic", False)),
        use_distributed_sampler=False, callbacks=callbacks, logger=loggers, plugins=[_checkpoint_io()],
        reload_dataloaders_every_n_epochs=1 if model.reload_dataloaders_every_epoch else 0,
        num_sanity_val_steps=0,
    )
    if not use_val:
        kw["limit_val_batches"] = 0
    from lightning.fabric.utilities.exceptions import MisconfigurationException

    try:
        return L.Trainer(**kw)
    except (MisconfigurationException, ValueError, RuntimeError, TypeError, ImportError) as e:
        raise UserError(f"trainer settings are not usable here: {e}") from None


def _preview_batch(store, cfg, model, rows):
    from radpretrain.data.dataset import StoreDataset

    n = min(int(get(cfg, "previews.n", 8) or 0), len(rows))
    if n <= 0:
        return None
    ds = StoreDataset(store, rows[:n], image_size=int(cfg["data"]["image_size"]), resize="letterbox",
                      fields=tuple(model.fields))
    return torch.utils.data.default_collate([ds[i] for i in range(n)])


def export_encoder(model, trainer, cfg, run_dir: Path) -> Path:
    """Write RUN/encoder.safetensors + encoder.json (best val-loss weights when configured and available)."""
    from radpretrain.models.weights import save_encoder

    which = str(get(cfg, "export.weights", "best"))
    used = "last"
    best = run_dir / "checkpoints" / "best.ckpt"
    if which == "best" and best.is_file():
        problem = inspect_checkpoint(best)  # foreign content: UserError, never unpickled
        if problem is None:
            state = read_checkpoint(best)["state_dict"]
            model.load_state_dict(state, strict=False)  # non-persistent buffers are not in the checkpoint
            used = "best"
        else:  # the end of a long run is no time to stop: the last weights are exported, and said so
            log.warning("%s: %s; exporting the last weights instead", best, problem)
    meta = model.encoder_meta()
    d = cfg["data"]
    meta["image_size"] = int(d["image_size"])
    meta["resize"] = "letterbox"
    meta.setdefault("preprocessing", {})
    meta["preprocessing"].update({"mean": float(d["mean"]), "std": float(d["std"]), "image_size": int(d["image_size"]),
                                  "resize": "letterbox", "intensity": "radpretrain-ingest-v1"})
    meta["training"] = {"global_step": int(trainer.global_step), "epochs": int(trainer.current_epoch),
                        "weights": used, "train_resize": d["resize"], "pretrained_from": str(get(cfg, "model.pretrained"))}
    for c in trainer.callbacks:
        if getattr(c, "monitor", None) == "val/loss" and getattr(c, "best_model_score", None) is not None:
            meta["training"]["best_val_loss"] = float(c.best_model_score)
    path = save_encoder(model.export_encoder_module(), meta, run_dir)  # after best.ckpt was loaded
    log.info("encoder written: %s", path)
    return path
