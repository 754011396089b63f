"""``radpretrain pretrain``: the run (:func:`pretrain`), the final encoder export and the CLI.

A run resolves and checks its config (:mod:`radpretrain.pretrain.config`) before anything is
written, selects the images and input statistics (:mod:`radpretrain.pretrain.data`), builds the
method and the Trainer (:mod:`radpretrain.pretrain.trainer`), fits (continuing from the newest
intact checkpoint with ``--resume``, :mod:`radpretrain.pretrain.checkpoints`) and writes
``RUN/encoder.safetensors`` + ``encoder.json``, ``RUN/compute.json`` (what the run spent) and
``RUN/report.html`` (:mod:`radpretrain.pretrain.report`; a report that fails is a warning).
"""

from __future__ import annotations

import argparse
import logging
import time
import warnings
from pathlib import Path

import lightning as L
import numpy as np
import torch

from radpretrain.config import get, load_config_with_source, save_config
from radpretrain.data.store import Store
from radpretrain.errors import UserError
from radpretrain.methods import discover, get_method
from radpretrain.models.weights import save_encoder
from radpretrain.pretrain.checkpoints import (
    clear_partial_writes, disk_full_error, disk_full_message, existing_run, find_resume_checkpoint, free_bytes,
    inspect_checkpoint, read_checkpoint)
from radpretrain.pretrain.config import resolve_config, resume_config
from radpretrain.pretrain.data import StoreData, data_summary, input_stats, resize_on_device, select_images
from radpretrain.pretrain.report import DATA_SUMMARY_FILE, write_run_report
from radpretrain.pretrain.trainer import (
    ComputeMeter, build_trainer, compile_model, compute_record, env_rank, total_steps, use_channels_last)
from radpretrain.utils import COMPUTE_FILE, add_file_log, auto_cpu_threads, get_logger, package_versions, write_json

log = get_logger("pretrain")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--method", default=None, choices=discover(),
                   help="pretraining method (may be left out when --config names a preset or file that names it; "
                        "with neither, the recommended recipe runs: preset recommended_cpu, or recommended_gpu "
                        "when CUDA is usable)")
    p.add_argument("--data", required=True, help="dataset store folder (from 'radpretrain ingest')")
    p.add_argument("--out", required=True, help="run folder to create (or to continue with --resume)")
    p.add_argument("--config", default=None,
                   help="packaged preset (e.g. mae_pilot; default: <method>_cpu) or a YAML config file")
    p.add_argument("--resume", action="store_true", help="continue a stopped run from RUN/checkpoints/last.ckpt")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="config overrides, e.g. trainer.max_steps=30 data.image_size=64 model.pretrained=imagenet")


def run(args) -> int:
    result = pretrain(args.method, args.data, args.out, config=args.config, overrides=args.overrides, resume=args.resume)
    print(result["encoder"])
    return 0


def pretrain(method: str | None, data: str | Path, out: str | Path, config: str | None = None, overrides=(),
             resume: bool = False, callbacks=()) -> dict:
    """Run pretraining; returns ``{"run": RUN, "encoder": path or None, "global_step": int, ...}``."""
    run_dir = Path(out)
    rank = env_rank()
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
    resize_on_device(cfg, model, "cpu")  # data.resize_on=device with a per-sample transform: said before writing
    file_log = None
    try:
        if rank == 0:  # other DDP ranks write nothing (and must not race rank 0's "already a run" check)
            run_dir.mkdir(parents=True, exist_ok=True)
            for sub in ("logs", "checkpoints", "previews"):
                (run_dir / sub).mkdir(exist_ok=True)
            notes = notes + clear_partial_writes(run_dir / "checkpoints")
            save_config(cfg, run_dir / "config.yaml")
            write_json(run_dir / "versions.json", package_versions())
            write_json(run_dir / DATA_SUMMARY_FILE, data_summary(store, train_rows, val_rows, cfg))
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
        trainer = build_trainer(cfg, run_dir, model, use_val, callbacks, store, train_rows, val_rows)
        model.total_steps_hint = total_steps(cfg, len(train_rows), trainer.world_size)
        if use_channels_last(cfg, model, trainer.strategy.root_device.type):
            model.to(memory_format=torch.channels_last)  # same values; faster kernels (see prefers_channels_last)
            log.info("channels_last memory format on (trainer.channels_last=%s)", get(cfg, "trainer.channels_last"))
        compile_model(cfg, model, trainer.strategy.root_device.type)
        device_type = trainer.strategy.root_device.type
        defer = resize_on_device(cfg, model, device_type)
        log.info("images resized to %d px %s (data.resize_on=%s)", int(d["image_size"]),
                 "on the device, in batches" if defer else "in the loader workers", get(cfg, "data.resize_on", "auto"))
        dm = StoreData(store, cfg, model, train_rows, val_rows if use_val else np.array([], dtype=np.int64),
                       resuming=ckpt_path is not None, defer_resize=defer)
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
        if trainer.is_global_zero:
            meter = next(c for c in trainer.callbacks if isinstance(c, ComputeMeter))
            write_json(run_dir / COMPUTE_FILE, compute_record(meter, trainer, cfg, finished=not trainer.interrupted))
        if trainer.interrupted:
            if trainer.is_global_zero:
                report_safely(run_dir)
            raise UserError(f"{run_dir}: interrupted at step {trainer.global_step}; continue with --resume")
        result = {"run": run_dir, "encoder": None, "global_step": int(trainer.global_step),
                  "epochs": int(trainer.current_epoch), "seconds": round(elapsed, 1), "report": None}
        if trainer.is_global_zero:
            result["encoder"] = export_encoder(model, trainer, cfg, run_dir)
            result["report"] = report_safely(run_dir)
        return result
    except UserError:
        raise
    except Exception as e:  # a full disk anywhere (logs, previews, encoder): one line, and --resume continues
        full = disk_full_error(e)
        if full is None:
            raise
        where = Path(full.filename) if full.filename else run_dir
        raise UserError(disk_full_message(where, None, free_bytes(where if where.is_dir() else where.parent))) from None
    finally:
        if file_log is not None:
            logging.getLogger("radpretrain").removeHandler(file_log)
            file_log.close()


def report_safely(run_dir: Path) -> Path | None:
    """``RUN/report.html``; a failure is one warning line, never the end of a run that has finished."""
    try:
        path = write_run_report(run_dir)
    except Exception as e:  # noqa: BLE001 - the weights are written; the report can be made again
        log.warning("run report not written (%s: %s); write it with 'radpretrain report %s'", type(e).__name__, e,
                    run_dir)
        return None
    log.info("run report: %s", path)
    return path


def export_encoder(model, trainer, cfg, run_dir: Path) -> Path:
    """Write RUN/encoder.safetensors + encoder.json (best val-loss weights when configured and available)."""
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
