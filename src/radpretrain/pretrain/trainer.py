"""The engine's Lightning ``Trainer``: callbacks, loggers, precision, devices and nodes, channels_last, compile.

:func:`build_trainer` turns the ``trainer:`` section into a ``lightning.Trainer`` with the run
folder's loggers (CSV, TensorBoard), the periodic / last / best checkpoints written through
:class:`~radpretrain.pretrain.checkpoints.RunCheckpointIO`, early stopping, the
:class:`Previews` callback and the :class:`ComputeMeter` (wall seconds, images seen, throughput;
:func:`compute_record` is ``RUN/compute.json``).  Devices and nodes follow torchrun and SLURM (see docs/scaling.md).
"""

from __future__ import annotations

import importlib.util
import math
import os
import shutil
import time
from collections import deque
from pathlib import Path

import lightning as L
import torch
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.callbacks import EarlyStopping, LearningRateMonitor, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

from radpretrain.config import get
from radpretrain.errors import UserError
from radpretrain.models.backbones import prefers_channels_last
from radpretrain.pretrain.checkpoints import RunCheckpointIO, StepCheckpoint
from radpretrain.pretrain.data import preview_batch
from radpretrain.utils import cpu_name, get_logger

log = get_logger("pretrain")


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


class ComputeMeter(L.Callback):
    """The compute a run spends: wall seconds of fitting and images seen, and its throughput.

    ``seconds`` / ``images`` go into every checkpoint (``state_dict``), so a resumed run adds to
    what the interrupted one had spent up to the checkpoint it continues from.  Images count every
    training batch on every process (the per-process batch times the world size).  Each training
    batch logs ``train/images_per_s``: images over wall time of the last ``window`` batches,
    loading and the step included, validation left out.
    """

    def __init__(self, window: int = 10, batch_size: int = 1, batches_per_step: int = 1):
        self.batch_size, self.batches_per_step = int(batch_size), max(1, int(batches_per_step))
        self.seconds = 0.0        # spent before this session's start (from the checkpoint resumed from)
        self.images = 0
        self.restored = False     # the checkpoint resumed from held a record
        self.unrecorded = False   # resumed from a checkpoint without one (images estimated, seconds unknown)
        self.window = max(1, int(window))
        self._recent: deque = deque(maxlen=self.window)  # (seconds, images) of the latest batches
        self._start: float | None = None
        self._last: float | None = None
        self._paused: float | None = None

    @property
    def state_key(self) -> str:
        return "ComputeMeter"

    def total_seconds(self) -> float:
        return self.seconds + (time.perf_counter() - self._start if self._start is not None else 0.0)

    def state_dict(self) -> dict:
        return {"seconds": float(self.total_seconds()), "images": int(self.images)}

    def load_state_dict(self, state: dict) -> None:
        self.seconds, self.images = float(state.get("seconds", 0.0)), int(state.get("images", 0))
        self.restored = True

    def on_fit_start(self, trainer, pl_module):  # before the method's own on_fit_start (DeepCluster clusters there)
        self._start = time.perf_counter()

    def on_train_start(self, trainer, pl_module):  # the resumed step is known from here on
        if trainer.global_step > 0 and not self.restored:  # resumed from a checkpoint written before this meter
            self.unrecorded = True
            self.images = int(trainer.global_step) * self.batches_per_step * self.batch_size * int(trainer.world_size)

    def on_fit_end(self, trainer, pl_module):
        if self._start is not None:
            self.seconds, self._start = self.total_seconds(), None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if self._last is None:
            self._last = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        now = time.perf_counter()
        n = _batch_images(batch) * int(trainer.world_size)
        self.images += n
        self._recent.append((now - self._last, n))
        self._last = now
        spent = sum(t for t, _ in self._recent)
        if spent > 0:
            pl_module.log("train/images_per_s", sum(k for _, k in self._recent) / spent, on_step=True,
                          on_epoch=False, rank_zero_only=True)

    def on_validation_start(self, trainer, pl_module):
        self._paused = time.perf_counter()

    def on_validation_end(self, trainer, pl_module):
        if self._paused is not None and self._last is not None:
            self._last += time.perf_counter() - self._paused  # validation is not training throughput
        self._paused = None


def _batch_images(batch) -> int:
    """Images in one training batch (the engine's batches are dicts with ``index``)."""
    if isinstance(batch, dict):
        for key in ("index", "image", "pixels"):
            v = batch.get(key)
            if v is not None and hasattr(v, "__len__"):
                return len(v)
    return 0


def compute_record(meter: ComputeMeter, trainer, cfg: dict, finished: bool) -> dict:
    """``RUN/compute.json``: what the run spent (wall seconds, steps, images seen) and where it ran."""
    dev = trainer.strategy.root_device
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else cpu_name()
    return {"wall_seconds": round(meter.total_seconds(), 2), "steps": int(trainer.global_step),
            "epochs": int(trainer.current_epoch), "images_seen": int(meter.images),
            "images_per_s": round(meter.images / meter.total_seconds(), 3) if meter.total_seconds() > 0 else None,
            "device": {"type": dev.type, "name": name, "processes": int(trainer.world_size)},
            "precision": str(trainer.precision), "torch_threads": int(torch.get_num_threads()),
            "method": cfg.get("method"), "backbone": get(cfg, "model.backbone"),
            "image_size": int(get(cfg, "data.image_size")), "batch_size": int(get(cfg, "data.batch_size")),
            "seed": cfg.get("seed"), "finished": bool(finished),
            # resumed from a checkpoint that held no record: seconds of this session only, images estimated
            "partial_record": bool(meter.unrecorded)}


# -- distributed environment -------------------------------------------------------------
def env_rank() -> int:
    for var in ("RANK", "SLURM_PROCID", "LOCAL_RANK"):
        if os.environ.get(var, "").isdigit():
            return int(os.environ[var])
    return 0


def devices_and_nodes(t: dict) -> tuple:
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


def resolve_precision(p) -> str:
    """``trainer.precision``: ``auto`` is bf16-mixed on GPUs that support it, else 32-true."""
    if p in (None, "auto"):
        if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
            return "bf16-mixed"
        return "32-true"
    return str(p)


def use_channels_last(cfg: dict, model, device_type: str) -> bool:
    """``trainer.channels_last``: true / false, or auto (:func:`~radpretrain.models.backbones.prefers_channels_last`)."""
    v = get(cfg, "trainer.channels_last", "auto")
    if isinstance(v, bool):
        return v
    return model.encoder is not None and prefers_channels_last(model.encoder, device_type)


# -- trainer.compile -----------------------------------------------------------------------------
def compile_mode(cfg: dict) -> str:
    """``trainer.compile`` as ``off`` / ``default`` / ``max-autotune`` (YAML reads ``off`` as false, ``on`` as true)."""
    v = get(cfg, "trainer.compile", "off")
    if v is False or v is None:
        return "off"
    if v is True:
        return "default"
    return str(v)


def compile_unavailable(device_type: str) -> str | None:
    """Why ``torch.compile``'s inductor backend cannot work here, or None (checked before compiling)."""
    cc = [c for c in (os.environ.get("CXX"), os.environ.get("CC"), "c++", "g++", "gcc", "clang", "cc") if c]
    if not any(shutil.which(c) for c in cc):
        return "no C/C++ compiler found (inductor builds its kernels with one; install gcc or set CXX)"
    if device_type == "cuda":
        if importlib.util.find_spec("triton") is None:  # optional: inductor's GPU kernels
            return "triton is not installed (inductor's GPU kernels need it)"
    return None


class CompiledForward:
    """A module's ``forward`` run through ``torch.compile``, falling back to eager for good at the first failure.

    Compilation happens at the first call (and again for new input shapes); an unsupported op, a
    failing compiler or a backend error then logs one warning line and the module runs eagerly from
    then on.  Out-of-memory and interrupts are not swallowed.  Installed as the module's instance
    attribute ``forward``: parameters, buffers and state-dict keys stay those of the plain module.
    """

    def __init__(self, module: torch.nn.Module, mode: str, name: str):
        self.eager = module.forward
        self.compiled = torch.compile(module.forward, mode=None if mode == "default" else mode)
        self.name, self.mode = name, mode
        self.failed: str | None = None
        self.calls = 0  # calls that ran compiled

    def __call__(self, *args, **kwargs):
        if self.failed is None:
            try:
                out = self.compiled(*args, **kwargs)
                self.calls += 1
                return out
            except (torch.OutOfMemoryError, KeyboardInterrupt):
                raise
            except Exception as e:  # a compile-time failure: before anything of this call ran
                first = str(e).strip().splitlines()[0][:200] if str(e).strip() else ""
                self.failed = f"{type(e).__name__}: {first}"
                log.warning("trainer.compile=%s: %s not compiled (%s); it runs eagerly", self.mode, self.name,
                            self.failed)
        return self.eager(*args, **kwargs)


def compile_model(cfg: dict, model, device_type: str) -> list[CompiledForward]:
    """Apply ``trainer.compile`` to ``model.compile_modules()``; returns the installed wrappers (none when off
    or unavailable, which is logged on one line)."""
    mode = compile_mode(cfg)
    if mode == "off":
        return []
    why = compile_unavailable(device_type)
    if why is not None:
        log.warning("trainer.compile=%s: not compiled, %s; training runs eagerly", mode, why)
        return []
    names = {id(m): n for n, m in model.named_modules()}
    wrappers = []
    for m in model.compile_modules():
        w = CompiledForward(m, mode, names.get(id(m), type(m).__name__) or type(m).__name__)
        m.forward = w
        wrappers.append(w)
    log.info("trainer.compile=%s: torch.compile of %s (compiled at the first steps)", mode,
             ", ".join(w.name for w in wrappers))
    return wrappers


def total_steps(cfg: dict, n_train: int, world: int) -> int:
    """Optimizer steps of the whole run (for the LR schedule): max_steps, else epochs x steps per epoch."""
    t, d = cfg["trainer"], cfg["data"]
    per_rank = (n_train // max(1, world)) // int(d["batch_size"])
    per_epoch = max(1, math.ceil(per_rank / int(t.get("accumulate_grad_batches", 1) or 1)))
    by_epochs = per_epoch * int(t["max_epochs"]) if t.get("max_epochs") not in (None, -1) else None
    max_steps = int(t["max_steps"]) if t.get("max_steps") not in (None, -1) else None
    return min(x for x in (by_epochs, max_steps) if x is not None)


def build_trainer(cfg, run_dir: Path, model, use_val: bool, extra_callbacks, store, train_rows, val_rows):
    """The run's ``lightning.Trainer``; settings Lightning refuses here are a :class:`UserError`."""
    t = cfg["trainer"]
    ck_dir = run_dir / "checkpoints"
    every = int(t.get("checkpoint_every_n_steps") or 0) or None
    callbacks = [
        # the newest keep_checkpoints step files (what --resume falls back to) + last.ckpt; a file of
        # the same name is replaced (no -v1 copies), atomically (see write_checkpoint)
        StepCheckpoint(dirpath=ck_dir, filename="step{step:07d}", auto_insert_metric_name=False,
                       every_n_train_steps=every, save_top_k=int(t.get("keep_checkpoints", 3)),
                       monitor="step", mode="max", save_last=True, save_on_train_epoch_end=False,
                       enable_version_counter=False),
        LearningRateMonitor(logging_interval="step"),
        ComputeMeter(window=int(t.get("log_every_n_steps", 10) or 10), batch_size=int(cfg["data"]["batch_size"]),
                     batches_per_step=int(t.get("accumulate_grad_batches", 1) or 1)),
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
    previews = preview_batch(store, cfg, model, val_rows if len(val_rows) else train_rows)
    callbacks.append(Previews(previews, run_dir / "previews", get(cfg, "previews.every_n_epochs", 1)))
    callbacks.extend(extra_callbacks)
    devices, nodes = devices_and_nodes(t)
    loggers = [CSVLogger(save_dir=run_dir, name="logs", version="csv"),
               TensorBoardLogger(save_dir=run_dir, name="logs", version="tensorboard", default_hp_metric=False)]
    kw = dict(
        default_root_dir=run_dir, max_epochs=t.get("max_epochs"), max_steps=int(t.get("max_steps") if t.get("max_steps") is not None else -1),
        accelerator=t.get("accelerator", "auto"), devices=devices, num_nodes=nodes, strategy=t.get("strategy", "auto"),
        precision=resolve_precision(t.get("precision")), accumulate_grad_batches=int(t.get("accumulate_grad_batches", 1)),
        gradient_clip_val=t.get("gradient_clip_val"), check_val_every_n_epoch=t.get("check_val_every_n_epoch", 1),
        val_check_interval=t.get("val_check_interval"), limit_val_batches=t.get("limit_val_batches", 1.0),
        log_every_n_steps=int(t.get("log_every_n_steps", 10)), enable_progress_bar=bool(t.get("enable_progress_bar", True)),
        sync_batchnorm=bool(t.get("sync_batchnorm", False)), deterministic=bool(t.get("deterministic", False)),
        use_distributed_sampler=False, callbacks=callbacks, logger=loggers, plugins=[RunCheckpointIO()],
        reload_dataloaders_every_n_epochs=1 if model.reload_dataloaders_every_epoch else 0,
        num_sanity_val_steps=0,
    )
    if not use_val:
        kw["limit_val_batches"] = 0
    try:
        return L.Trainer(**kw)
    except (MisconfigurationException, ValueError, RuntimeError, TypeError, ImportError) as e:
        raise UserError(f"trainer settings are not usable here: {e}") from None

