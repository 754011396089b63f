"""``radpretrain export``: a run's encoder as a shareable model folder.

An export folder is laid out like a Hugging Face Hub model repository::

    OUT/model.safetensors   encoder weights only, plain timm key names
    OUT/config.json         timm's hub keys (architecture, num_classes, num_features,
                            model_args, pretrained_cfg) + radpretrain's keys (arch,
                            model_kwargs, image_size, resize, method, preprocessing)
    OUT/README.md           model card with YAML front matter (library_name: timm)

It loads three ways, all giving the same features:

- ``model, preprocess = radpretrain.load_encoder(OUT)`` (preprocessing included;
  :mod:`radpretrain.encoder`);
- ``timm.create_model(f"local-dir:{OUT}", pretrained=True)``;
- ``timm.create_model(arch, pretrained=True, in_chans=1, num_classes=0,
  pretrained_cfg_overlay=dict(file=OUT/"model.safetensors", input_size=(1, S, S), num_classes=0))``.

timm adapts a first convolution to ``in_chans`` only when the file's tensor shape
differs from the model's; our 1-channel stem matches a 1-channel model, so it is
loaded unchanged (declaring ``input_size=(1, S, S)`` in the overlay just avoids a
warning).  Nothing here unpickles objects: weights are read with
:func:`radpretrain.models.weights.read_state_dict` (safetensors, or torch files
with ``weights_only=True``).

This module: the command, :func:`export_encoder` and ``config.json`` (:func:`build_config`);
the model card and its privacy rules are in :mod:`radpretrain.export.card`.
"""

from __future__ import annotations

import os
from pathlib import Path

import safetensors.torch
import torch
import yaml

from radpretrain import __version__
from radpretrain.config import get as cfg_get
from radpretrain.data import intensity as I
from radpretrain.encoder import scalar_stat
from radpretrain.errors import UserError
from radpretrain.export.card import (
    DEFAULT_LICENSE, find_store, looks_like_path, read_evaluation, redact_config, render_model_card, summarize_store)
from radpretrain.models.weights import find_encoder_files, load_run_encoder, read_state_dict
from radpretrain.utils import get_logger, write_json

log = get_logger("export")

EXPORT_FILES = ("model.safetensors", "config.json", "README.md")

__all__ = ["DEFAULT_LICENSE", "EXPORT_FILES", "add_arguments", "build_config", "export_encoder", "intensity_rules",
           "read_evaluation", "redact_config", "render_model_card", "run", "summarize_store"]


# The intensity pipeline of ``radpretrain ingest`` (radpretrain.data.readers.load_image,
# constants from radpretrain.data.intensity), written down so that someone without
# radpretrain can reproduce the model's input.
def intensity_rules() -> dict:
    lo, hi = I.PERCENTILES
    ct_lo, ct_hi = I.CT_WINDOW
    return {
        "name": I.INTENSITY_VERSION,
        "implementation": "radpretrain.data.readers.load_image",
        "output": "2-D float image in [0, 1], bone bright",
        "dicom": {
            "modality_lut": "Modality LUT Sequence or RescaleSlope/RescaleIntercept applied first",
            "radiographs (CR, DX, XR, MG, ...)": f"VOI LUT or WindowCenter/WindowWidth from the header when present, "
                                                 f"else a percentile window ({lo} % .. {hi} %)",
            "CT": f"Hounsfield units windowed to {ct_lo:g} .. {ct_hi:g}",
            "MR": f"divided by the image's {I.MR_PERCENTILE} th percentile, negatives clipped",
            "photometric": "MONOCHROME1 inverted after windowing so bone is bright; colour (RGB, YBR, palette) "
                           "to grey with ITU-R BT.601 luma",
        },
        "png/jpeg/tiff": "8-bit /255; 16-bit divided by 2^bits - 1 with bits the smallest of 8..16 holding the "
                         "image maximum; float images percentile window; colour to BT.601 luma",
        "numpy array (load_encoder only)": f"uint8 /255; float already in [0, 1] as is; anything else percentile "
                                           f"window ({lo} % .. {hi} %)",
        "store": "longest side shrunk to store_max_size by area averaging (images at least twice that size: "
                 "means of f x f blocks with f = longest // store_max_size, taken on the raw values before a "
                 "window, then an antialiased resize to the exact size), then quantised to uint8 (x255, rounded); "
                 "radpretrain.data.readers.load_stored",
    }


# --------------------------------------------------------------------------- CLI
def add_arguments(p) -> None:
    p.add_argument("run", help="a finished pretraining run folder (encoder.safetensors + encoder.json)")
    p.add_argument("--out", required=True, help="export folder to write (Hugging Face Hub layout)")
    p.add_argument("--report", default=None,
                   help="an evaluate output folder (summary.json / results.csv) to put in the model card")
    p.add_argument("--license", default=DEFAULT_LICENSE, help=f"licence id for the model card (default {DEFAULT_LICENSE})")
    p.add_argument("--name", default=None, help="model name for the card (default: derived from method and backbone)")
    p.add_argument("--data", default=None,
                   help="the training dataset store, when the run's config does not point at a reachable one "
                        "(only aggregate counts are used)")


def run(args) -> int:
    out = export_encoder(args.run, args.out, report_dir=args.report, license=args.license,
                         name=args.name, data=args.data)
    print(f"exported to {out}")
    print(f"load with:  model, preprocess = radpretrain.load_encoder({str(out)!r})")
    return 0


# --------------------------------------------------------------------------- export
def export_encoder(run_dir, out_dir, report_dir=None, license: str = DEFAULT_LICENSE,
                   name: str | None = None, data=None) -> Path:
    """Write ``model.safetensors``, ``config.json`` and ``README.md`` into ``out_dir``; returns it."""
    run_dir = Path(run_dir)
    out_dir = Path(out_dir)
    if not run_dir.exists():
        raise UserError(f"{run_dir}: no such run folder")
    weights_path, meta_path = find_encoder_files(run_dir)
    if out_dir.resolve() == run_dir.resolve():
        raise UserError(f"{out_dir}: the export folder must differ from the run folder")
    if out_dir.exists():
        extra = [p.name for p in out_dir.iterdir() if p.name not in EXPORT_FILES and not p.name.startswith(".")]
        if extra:
            raise UserError(f"{out_dir}: folder exists and holds other files ({', '.join(sorted(extra)[:5])}); "
                            "choose an empty or new folder")
    cfg = _read_run_config(run_dir)
    # Building the model checks that the weights fit the architecture before anything is written.
    model, meta = load_run_encoder(run_dir)
    state = read_state_dict(weights_path)

    store = find_store(run_dir, cfg, meta, data)
    store_summary = summarize_store(store) if store is not None else None
    config = build_config(model, meta, cfg, store_max_size=store.meta.get("max_size") if store is not None else None)
    evaluation = read_evaluation(report_dir) if report_dir else None
    card = render_model_card(config, cfg, store_summary, evaluation, license=license, name=name, run_dir=run_dir)

    out_dir.mkdir(parents=True, exist_ok=True)
    # Weights last: a folder with model.safetensors is complete (the demo relies on that).
    (out_dir / "model.safetensors").unlink(missing_ok=True)
    write_json(out_dir / "config.json", config)
    _write_text(out_dir / "README.md", card)
    _save_weights(state, out_dir / "model.safetensors", config["architecture"])
    log.info("exported %s (%s, %d tensors) to %s", config["architecture"], meta.get("method", "?"), len(state), out_dir)
    return out_dir


def _save_weights(state: dict, path: Path, arch: str) -> None:
    clean = {k: v.detach().cpu().contiguous() for k, v in state.items()}
    tmp = path.with_name(f".{path.name}.tmp")
    safetensors.torch.save_file(clean, str(tmp), metadata={"format": "pt", "arch": str(arch)})
    os.replace(tmp, path)


def _write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def _read_run_config(run_dir: Path) -> dict:
    path = run_dir / "config.yaml"
    if not path.is_file():
        return {}
    try:
        cfg = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise UserError(f"{path}: not valid YAML ({e})") from None
    return cfg if isinstance(cfg, dict) else {}


# --------------------------------------------------------------------------- config.json
def build_config(model: torch.nn.Module, meta: dict, cfg: dict | None = None,
                 store_max_size: int | None = None) -> dict:
    """``config.json`` content: timm's hub keys plus radpretrain's encoder description."""
    cfg = cfg or {}
    pre = dict(meta.get("preprocessing") or {})
    kwargs = dict(meta.get("model_kwargs") or {})
    kwargs.setdefault("in_chans", 1)
    kwargs.pop("num_classes", None)
    kwargs.pop("pretrained", None)
    size = int(pre.get("image_size") or meta.get("image_size") or kwargs.get("img_size")
               or cfg_get(cfg, "data.image_size") or 224)
    if "mean" not in pre or "std" not in pre:
        mean, std = cfg_get(cfg, "data.mean"), cfg_get(cfg, "data.std")
        if mean is None or std is None:
            raise UserError(f"encoder.json: no preprocessing mean/std recorded for {meta.get('arch')}; "
                            "cannot export an encoder whose input normalisation is unknown")
        pre.setdefault("mean", mean)
        pre.setdefault("std", std)
    mean, std = scalar_stat(pre["mean"]), scalar_stat(pre["std"])
    resize = str(pre.get("resize") or meta.get("resize") or cfg_get(cfg, "data.resize") or "letterbox")
    in_chans = int(kwargs["in_chans"])
    preprocessing = {
        "mean": mean,
        "std": std,
        "image_size": size,
        "resize": resize,
        "resize_details": _resize_details(resize, size),
        "intensity": pre.get("intensity", "radpretrain-ingest-v1"),
        "intensity_rules": intensity_rules(),
        "store_max_size": int(pre.get("store_max_size") or store_max_size or 512),
        "formula": "x = (letterbox(img01, image_size) - mean) / std, one channel",
    }
    for k, v in pre.items():  # keep anything else the engine recorded (e.g. store dtype)
        preprocessing.setdefault(k, v)
    num_features = int(getattr(model, "num_features", 0) or 0)
    pcfg = {
        "input_size": [in_chans, size, size],
        "mean": [mean] * in_chans,
        "std": [std] * in_chans,
        "interpolation": "bilinear",
        "crop_pct": 1.0,
        "crop_mode": "center",
        "num_classes": 0,
        "fixed_input_size": bool(getattr(model, "pretrained_cfg", {}).get("fixed_input_size", False)),
    }
    first_conv = getattr(model, "pretrained_cfg", {}).get("first_conv")
    if first_conv:
        pcfg["first_conv"] = first_conv
    config = {
        # timm / Hugging Face Hub keys
        "architecture": meta["arch"],
        "num_classes": 0,
        "num_features": num_features,
        "model_args": kwargs,
        "pretrained_cfg": pcfg,
        # radpretrain keys (radpretrain.models.weights.load_run_encoder reads these)
        "arch": meta["arch"],
        "model_kwargs": kwargs,
        "image_size": size,
        "resize": resize,
        "method": meta.get("method", "unknown"),
        "preprocessing": preprocessing,
        "training": _public_training_info(meta.get("training")),
        "radpretrain_version": __version__,
        "format": "radpretrain-export",
        "format_version": 1,
    }
    return config


def _public_training_info(training) -> dict:
    """The engine's ``encoder.json["training"]`` without anything path-like."""
    if not isinstance(training, dict):
        return {}
    out = {}
    for k, v in training.items():
        if isinstance(v, (int, float, bool)) or v is None:
            out[k] = v
        elif isinstance(v, str):
            out[k] = "<local file>" if looks_like_path(v) else v
    return out


def _resize_details(resize: str, size: int) -> str:
    if resize == "bucket":
        return (f"trained on aspect-ratio buckets around {size} px; at inference letterbox to {size}x{size} "
                "(longest side fitted, centred, zero padding) unless you feed your own bucket shapes")
    if resize == "stretch":
        return f"resized to {size}x{size} ignoring the aspect ratio (bilinear, antialiased)"
    return (f"letterbox to {size}x{size}: longest side scaled to {size} (bilinear, antialiased), "
            "image centred, the rest padded with 0")
