"""``radpretrain export``: a run's encoder as a shareable model folder, and :func:`load_encoder`.

An export folder is laid out like a Hugging Face Hub model repository::

    OUT/model.safetensors   encoder weights only, plain timm key names
    OUT/config.json         timm's hub keys (architecture, num_classes, num_features,
                            model_args, pretrained_cfg) + radpretrain's keys (arch,
                            model_kwargs, image_size, resize, method, preprocessing)
    OUT/README.md           model card with YAML front matter (library_name: timm)

It loads three ways, all giving the same features:

- ``model, preprocess = radpretrain.load_encoder(OUT)`` (preprocessing included);
- ``timm.create_model(f"local-dir:{OUT}", pretrained=True)``;
- ``timm.create_model(arch, pretrained=True, in_chans=1, num_classes=0,
  pretrained_cfg_overlay=dict(file=OUT/"model.safetensors", input_size=(1, S, S), num_classes=0))``.

timm adapts a first convolution to ``in_chans`` only when the file's tensor shape
differs from the model's; our 1-channel stem matches a 1-channel model, so it is
loaded unchanged (declaring ``input_size=(1, S, S)`` in the overlay just avoids a
warning).  Nothing here unpickles objects: weights are read with
:func:`radpretrain.models.weights.read_state_dict` (safetensors, or torch files
with ``weights_only=True``).

Privacy: the model card and config are built only from the encoder description,
the training config (with path-like values redacted), aggregate counts by
modality / body part / view from the training store, and an evaluation summary.
No manifest identifiers, no ``source`` column, no paths.
"""

from __future__ import annotations

import math
import os
import re
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from radpretrain.config import get as cfg_get
from radpretrain.errors import UserError
from radpretrain.utils import get_logger, read_json, write_json

log = get_logger("export")

EXPORT_FILES = ("model.safetensors", "config.json", "README.md")
DEFAULT_LICENSE = "apache-2.0"

# Methods -> (human name, paper).  Unknown methods are described by name only.
METHOD_PAPERS = {
    "mae": ("Masked autoencoder (MAE)",
            "He et al., Masked Autoencoders Are Scalable Vision Learners, CVPR 2022 (arXiv:2111.06377)"),
    "deepcluster": ("DeepCluster",
                    "Caron et al., Deep Clustering for Unsupervised Learning of Visual Features, ECCV 2018 (arXiv:1807.05520)"),
    "genesis": ("Models Genesis (image restoration)",
                "Zhou et al., Models Genesis: Generic Autodidactic Models for 3D Medical Image Analysis, MICCAI 2019 (arXiv:1908.06912)"),
    "dino": ("DINO (self-distillation, teacher exported)",
             "Caron et al., Emerging Properties in Self-Supervised Vision Transformers, ICCV 2021 (arXiv:2104.14294)"),
    "simclr": ("SimCLR (contrastive)",
               "Chen et al., A Simple Framework for Contrastive Learning of Visual Representations, ICML 2020 (arXiv:2002.05709)"),
    "metadata": ("Supervised pretraining on routine metadata (body part, view, age)",
                 "weak labels taken from the archive's DICOM headers"),
}

# The intensity pipeline of ``radpretrain ingest`` (radpretrain.data.readers.load_image,
# constants from radpretrain.data.intensity), written down so that someone without
# radpretrain can reproduce the model's input.
def intensity_rules() -> dict:
    from radpretrain.data import intensity as I

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


_PATHY_WORDS = {"root", "path", "paths", "dir", "folder", "file", "files", "out", "output", "data", "store",
                "dataset", "source", "resume", "ckpt", "checkpoint", "url"}


def _pathy_key(key) -> bool:
    """A config key whose string values may name files or folders (``data.root``, ``out_dir`` ...)."""
    return any(t in _PATHY_WORDS for t in re.split(r"[^a-z0-9]+", str(key).lower()) if t)


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
    from radpretrain.models.weights import find_encoder_files, load_run_encoder, read_state_dict

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

    store = _find_store(run_dir, cfg, meta, data)
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
    from safetensors.torch import save_file

    clean = {k: v.detach().cpu().contiguous() for k, v in state.items()}
    tmp = path.with_name(f".{path.name}.tmp")
    save_file(clean, str(tmp), metadata={"format": "pt", "arch": str(arch)})
    os.replace(tmp, path)


def _write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def _read_run_config(run_dir: Path) -> dict:
    path = run_dir / "config.yaml"
    if not path.is_file():
        return {}
    import yaml

    try:
        cfg = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise UserError(f"{path}: not valid YAML ({e})") from None
    return cfg if isinstance(cfg, dict) else {}


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
    mean, std = _scalar(pre["mean"]), _scalar(pre["std"])
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
    from radpretrain import __version__

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
            out[k] = "<local file>" if _looks_like_path(v) else v
    return out


def _init_text(training: dict, cfg: dict, arch: str) -> str:
    from radpretrain.models.backbones import is_random_init

    src = training.get("pretrained_from", cfg_get(cfg, "model.pretrained"))
    if is_random_init(src):
        return "random (trained from scratch)"
    if src == "imagenet":
        return f"ImageNet weights of timm `{arch}`, first convolution reduced to one channel"
    if src == "<local file>" or _looks_like_path(str(src)):
        return "a local checkpoint"
    return str(src)


def _scalar(v) -> float:
    if isinstance(v, (list, tuple)):
        v = float(np.mean([float(x) for x in v]))
    return float(v)


def _resize_details(resize: str, size: int) -> str:
    if resize == "bucket":
        return (f"trained on aspect-ratio buckets around {size} px; at inference letterbox to {size}x{size} "
                "(longest side fitted, centred, zero padding) unless you feed your own bucket shapes")
    if resize == "stretch":
        return f"resized to {size}x{size} ignoring the aspect ratio (bilinear, antialiased)"
    return (f"letterbox to {size}x{size}: longest side scaled to {size} (bilinear, antialiased), "
            "image centred, the rest padded with 0")


# --------------------------------------------------------------------------- model card
def _find_store(run_dir: Path, cfg: dict, meta: dict, data=None):
    """The run's training store if it can be opened, else None (only counts are read from it)."""
    from radpretrain.data.store import Store

    cands = []
    if data:
        cands.append(data)
    for key in ("data.root", "data.store", "data.path", "data.dataset", "data.data", "dataset", "data_dir", "store"):
        v = cfg_get(cfg, key)
        if isinstance(v, str) and v:
            cands.append(v)
    if isinstance(cfg.get("data"), str):
        cands.append(cfg["data"])
    for key in ("dataset", "data", "store"):
        if isinstance(meta.get(key), str):
            cands.append(meta[key])
    for c in cands:
        for p in (Path(c), run_dir / c):
            if (p / "store.json").is_file():
                try:
                    return Store(p)
                except UserError:
                    continue
    if data:
        raise UserError(f"{data}: not a readable dataset store (no store.json)")
    return None


def summarize_store(store) -> dict:
    """Aggregate, non-identifying counts of a store's ingested images."""
    df = store.images
    out: dict[str, Any] = {"images": int(len(df))}
    if "patient_id" in df.columns:
        out["patients"] = int(df["patient_id"].nunique())
    if "study_id" in df.columns:
        out["studies"] = int(df["study_id"].nunique())
    for col in ("modality", "body_part", "view", "source_format"):
        if col in df.columns:
            counts = df[col].fillna("unknown").astype(str).value_counts()
            out[col] = {str(k): int(v) for k, v in counts.items()}
    if {"modality", "body_part"} <= set(df.columns):
        ct = df.groupby([df["modality"].fillna("unknown").astype(str),
                         df["body_part"].fillna("unknown").astype(str)]).size()
        out["modality_x_body_part"] = {f"{m} / {b}": int(n) for (m, b), n in ct.sort_values(ascending=False).items()}
    return out


def read_evaluation(report_dir) -> dict | None:
    """Read an evaluate output folder defensively: ``summary.json`` and ``results.csv`` when present."""
    report_dir = Path(report_dir)
    if not report_dir.is_dir():
        raise UserError(f"{report_dir}: evaluation folder not found (--report expects an evaluate output folder)")
    out: dict[str, Any] = {}
    summary_path = report_dir / "summary.json"
    if summary_path.is_file():
        try:
            out["summary"] = read_json(summary_path)
        except (OSError, ValueError) as e:
            log.warning("%s: unreadable, left out of the model card (%s)", summary_path, e)
    results_path = report_dir / "results.csv"
    if results_path.is_file():
        import pandas as pd

        try:
            out["results"] = pd.read_csv(results_path)
        except Exception as e:  # pandas raises many types for malformed CSV
            log.warning("%s: unreadable, left out of the model card (%s)", results_path, e)
    headline = report_dir / "headline.md"
    if headline.is_file():
        out["headline"] = headline.read_text(errors="replace")[:4000]
    if not out:
        log.warning("%s: no summary.json or results.csv; the model card has no evaluation", report_dir)
        return None
    return out


def _looks_like_path(v) -> bool:
    return isinstance(v, str) and ("/" in v or "\\" in v or re.match(r"^[A-Za-z]:", v) is not None
                                   or v.startswith("~"))


def redact_config(obj, key: str = ""):
    """A copy of a config with path-like values (and values of path-like keys) replaced."""
    if isinstance(obj, dict):
        return {k: redact_config(v, str(k)) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [redact_config(v, key) for v in obj]
    if isinstance(obj, str) and obj and (_looks_like_path(obj) or _pathy_key(key)):
        return "<path removed>"
    return obj


def _path_label(v: str, run_dir: Path | None) -> str:
    """A path in an evaluation table: 'this encoder' when it is the exported run, else a placeholder."""
    try:
        if run_dir is not None and Path(v).expanduser().resolve() == run_dir.resolve():
            return "this encoder"
    except (OSError, ValueError):
        pass
    return "<local run>"


def _scrub_text(text: str, run_dir: Path | None) -> str:
    """Free text from another stage with path-like tokens replaced."""
    def sub(m):
        tok = m.group(0)
        core = tok.strip("`'\"()[],;:")
        return tok.replace(core, _path_label(core, run_dir)) if _looks_like_path(core) else tok

    return re.sub(r"\S+", sub, text)


def _fmt(v) -> str:
    if isinstance(v, float):
        if math.isnan(v):
            return "n/a"
        return f"{v:.4g}"
    return str(v)


def _md_escape(s) -> str:
    return str(s).replace("|", "\\|").replace("\n", " ")


def _md_table(headers: Sequence[str], rows: Sequence[Sequence]) -> str:
    lines = ["| " + " | ".join(_md_escape(h) for h in headers) + " |",
             "|" + "|".join("---" for _ in headers) + "|"]
    for r in rows:
        lines.append("| " + " | ".join(_md_escape(_fmt(v)) for v in r) + " |")
    return "\n".join(lines)


def _counts_table(title: str, counts: dict, limit: int = 25) -> str:
    items = sorted(counts.items(), key=lambda kv: -kv[1])
    total = sum(counts.values()) or 1
    rows = [(k, v, f"{100 * v / total:.1f} %") for k, v in items[:limit]]
    if len(items) > limit:
        rest = sum(v for _, v in items[limit:])
        rows.append((f"({len(items) - limit} more)", rest, f"{100 * rest / total:.1f} %"))
    return _md_table([title, "images", "share"], rows)


EVAL_SETUP_KEYS = ("task", "target", "classes", "counts", "protocols", "backbone", "image_size", "seed")
HEADLINE_COLUMNS = ("init", "protocol", "fraction", "metric", "value", "delta_vs_scratch", "p_vs_scratch",
                    "delta_vs_imagenet", "p_vs_imagenet")


def _evaluation_section(ev: dict | None, run_dir: Path | None = None) -> str:
    """Markdown for an evaluate output folder (summary.json / results.csv), read defensively."""
    if not ev:
        return ("No evaluation was attached to this export. Run `radpretrain evaluate` and export with "
                "`--report EVAL_DIR` to include one.\n")
    this = run_dir.name if run_dir is not None else None

    def label(v):
        if _looks_like_path(v):
            return _path_label(v, run_dir)
        if this and isinstance(v, str) and v == this:
            return f"{v} (this encoder)"
        return v

    parts = []
    summary = ev.get("summary") if isinstance(ev.get("summary"), dict) else None
    if summary:
        setup = []
        for key in EVAL_SETUP_KEYS:
            if key in summary:
                setup += [(k, label(v)) for k, v in _flatten(summary[key], key)]
        if setup:
            parts.append("Setup (from the evaluation's `summary.json`):\n\n" + _md_table(["item", "value"], setup[:40]))
        head = summary.get("headline")
        if isinstance(head, list) and head and all(isinstance(r, dict) for r in head):
            cols = [c for c in HEADLINE_COLUMNS if any(c in r for r in head)]
            rows = []
            for r in head[:60]:
                row = []
                for c in cols:
                    v = r.get(c, "")
                    if c == "value" and "ci_low" in r and "ci_high" in r:
                        v = f"{_fmt(v)} [{_fmt(r['ci_low'])}, {_fmt(r['ci_high'])}]"
                    row.append(label(v))
                rows.append(row)
            parts.append("Headline (primary metric, pooled over folds, 95 % CI in brackets):\n\n"
                         + _md_table(["value (95 % CI)" if c == "value" else c for c in cols], rows))
        elif isinstance(head, str) and head.strip():
            parts.append(_scrub_text(head.strip(), run_dir))
    elif "headline" in ev:
        parts.append(_scrub_text(ev["headline"].strip(), run_dir))
    res = ev.get("results")
    if res is not None and len(res):
        import pandas as pd

        df = res.copy()
        if "fold" in df.columns:
            pooled = df[df["fold"].astype(str) == "pooled"]
            df = pooled if len(pooled) else df
        for c in df.columns:
            if not pd.api.types.is_numeric_dtype(df[c]):  # object or (pyarrow) string columns
                df[c] = df[c].map(label)
        parts.append("All pooled results (`results.csv`):\n\n"
                     + _md_table(list(map(str, df.columns)), list(df.head(80).itertuples(index=False)))
                     + ("\n\n(table truncated)" if len(df) > 80 else ""))
    return "\n\n".join(parts) + "\n" if parts else "The attached evaluation folder held no readable results.\n"


def _flatten(obj, prefix: str = "") -> list[tuple[str, Any]]:
    out = []
    if isinstance(obj, dict):
        for k, v in obj.items():
            out.extend(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
    elif isinstance(obj, list):
        if all(isinstance(x, (int, float, str, bool)) or x is None for x in obj) and len(obj) <= 8:
            out.append((prefix, ", ".join(_fmt(x) for x in obj)))
        else:
            for i, v in enumerate(obj[:20]):
                out.extend(_flatten(v, f"{prefix}[{i}]"))
    else:
        out.append((prefix, obj if obj is not None else "n/a"))
    return out


def render_model_card(config: dict, cfg: dict, summary: dict | None, evaluation: dict | None,
                      license: str = DEFAULT_LICENSE, name: str | None = None, run_dir=None) -> str:
    """The ``README.md`` model card (YAML front matter + Markdown)."""
    import yaml

    arch = config["architecture"]
    method = str(config.get("method", "unknown"))
    method_name, paper = METHOD_PAPERS.get(method, (method, "see the radpretrain documentation"))
    name = name or f"radpretrain-{method}-{arch}"
    pre = config["preprocessing"]
    size = config["image_size"]
    tags = ["timm", "image-feature-extraction", "radpretrain", "medical-imaging", "radiology", "x-ray",
            "self-supervised-learning" if method not in ("metadata",) else "weakly-supervised-learning", method]
    if summary:
        tags += [f"modality-{m.lower()}" for m in summary.get("modality", {})][:6]
    front = {"library_name": "timm", "license": str(license), "pipeline_tag": "image-feature-extraction",
             "tags": list(dict.fromkeys(tags)), "model_name": name}
    lines = ["---", yaml.safe_dump(front, sort_keys=False).strip(), "---", "", f"# {name}", ""]
    lines += [f"A single-channel `{arch}` image encoder for radiographs, pretrained with **{method_name}** "
              f"using radpretrain on one institution's archive. "
              f"It outputs a {config['num_features']}-dimensional feature vector per image (no classifier head).", ""]
    lines += ["## Use it", "", "```python", "import radpretrain",
              "model, preprocess = radpretrain.load_encoder(\"path/to/this/folder\")",
              "features = model(preprocess(\"image.dcm\"))  # DICOM/PNG/JPEG path, pydicom Dataset or 2-D array",
              "```", "", "Plain timm (the same weights, the same features):", "", "```python", "import timm",
              "model = timm.create_model(\"local-dir:path/to/this/folder\", pretrained=True).eval()",
              f"# or: timm.create_model(\"{arch}\", pretrained=True, in_chans=1, num_classes=0,",
              f"#       pretrained_cfg_overlay=dict(file=\"path/to/this/folder/model.safetensors\", input_size=(1, {size}, {size}), num_classes=0))",
              "```", "", "With plain timm you must reproduce the preprocessing below yourself.", ""]
    lines += ["## Preprocessing (exact)", "",
              f"1. **Intensity** (`{pre['intensity']}`, the rules of `radpretrain ingest`): "
              "Modality LUT (RescaleSlope/Intercept); MONOCHROME1 inverted so bone is bright; colour to grey; "
              "CR/DX/XR: the header's VOI LUT or window when present, else a 0.5-99.5 % percentile window; "
              "CT: fixed window -1000..1400 HU; MR: percentile window; result in [0, 1].",
              "2. **Size**: " + pre["resize_details"] + ".",
              f"3. **Normalise**: `x = (img01 - {pre['mean']:.6g}) / {pre['std']:.6g}`, one input channel "
              f"(tensor shape [N, 1, {size}, {size}]).", "",
              "`config.json` records all of this under `preprocessing`; `radpretrain.load_encoder` applies it.", ""]
    lines += ["## Method", "", f"- Method: {method_name} (`{method}`)", f"- Reference: {paper}",
              f"- Backbone: timm `{arch}`, `in_chans=1`, `num_classes=0` (pooled features)",
              f"- Initialisation: {_init_text(config.get('training') or {}, cfg, arch)}"]
    tr = config.get("training") or {}
    if "global_step" in tr:
        lines.append(f"- Training length: {tr['global_step']} optimiser steps"
                     + (f", {tr['epochs']} epochs" if "epochs" in tr else ""))
    if "train_resize" in tr:
        lines.append(f"- Training resize policy: {tr['train_resize']}")
    if tr.get("weights"):
        lines.append(f"- Exported weights: {tr['weights']}"
                     + (f" (validation loss {_fmt(float(tr['best_val_loss']))})" if tr.get("best_val_loss") is not None else ""))
    lines.append("")
    lines += ["## Training data", ""]
    if summary:
        lines += [f"{summary['images']} de-identified images"
                  + (f" from {summary['patients']} patients" if "patients" in summary else "")
                  + (f" ({summary['studies']} studies)" if "studies" in summary else "")
                  + ", from a single institution's archive, ingested with `radpretrain ingest` "
                    "(pseudonymised; no images or identifiers are distributed with this model).", ""]
        for key, title in (("modality", "modality"), ("body_part", "body part"), ("view", "view")):
            if summary.get(key):
                lines += [_counts_table(title, summary[key]), ""]
    else:
        lines += ["The training dataset store was not reachable at export time, so no counts are given.", ""]
    lines += ["## Training configuration", "", "```yaml",
              yaml.safe_dump(redact_config(cfg), sort_keys=False).strip() if cfg else "# config.yaml not found in the run folder",
              "```", ""]
    lines += ["## Evaluation", "", _evaluation_section(evaluation, Path(run_dir) if run_dir else None)]
    lines += ["## Intended use", "",
              "- A starting point (initialisation or frozen feature extractor) for research models on radiographs, "
              "e.g. fine-tuning on a small labelled study, linear probing, image retrieval and archive browsing.",
              "- Not a medical device; not for diagnosis or any clinical decision without a separate validation.", ""]
    lines += ["## Limitations", "",
              "- Trained on one institution's archive: scanners, protocols, populations and body-part mix "
              "(see the counts above) shape what it represents; expect a shift on other data.",
              "- Only single-channel images with the preprocessing above are in-distribution.",
              "- Self-supervised features may encode acquisition details (markers, collimation, scanner) as well as anatomy.",
              "- Pretraining data are not shared; membership inference on the weights cannot be excluded entirely.", ""]
    lines += ["## Licence", "", f"Weights are released under `{license}` (see the front matter). "
              "Check that your institution's data-use agreement allows sharing weights trained on its images.", ""]
    return "\n".join(lines)


# --------------------------------------------------------------------------- loading
class Preprocess:
    """Turn one radiograph into the encoder's input tensor ``[1, 1, S, S]`` (or a batch for a list).

    Accepts a ``pydicom.Dataset``, a file path (DICOM, PNG, JPEG, TIFF) or a numpy
    array / torch tensor (2-D).  Files and datasets go through
    :func:`radpretrain.data.readers.load_image` (the intensity rules of ingest).
    Arrays: ``uint8`` -> /255, float in [0, 1] -> as is, anything else (other
    integer types, floats outside [0, 1]) -> the 0.5-99.5 % percentile window.
    Then, like ingest, the longest side is shrunk to ``store_max_size`` and the
    image quantised to 8 bits; finally it is letterboxed to ``image_size`` and
    normalised with the encoder's mean/std.  Pixels read from the training
    store (``uint8``) therefore give exactly the training input.
    """

    def __init__(self, image_size: int, mean: float, std: float, resize: str = "letterbox",
                 store_max_size: int | None = 512):
        self.store_max_size = int(store_max_size) if store_max_size else None
        self.image_size = int(image_size)
        self.mean = float(mean)
        self.std = float(std)
        self.resize = resize

    def __repr__(self) -> str:
        return (f"Preprocess(image_size={self.image_size}, mean={self.mean:.4g}, std={self.std:.4g}, "
                f"resize={self.resize!r})")

    def __call__(self, x) -> torch.Tensor:
        if isinstance(x, (list, tuple)):
            if not x:
                raise UserError("preprocess: empty list of images")
            return torch.cat([self(item) for item in x], 0)
        return self.from_stored(self.to_stored(x))

    # Steps, usable on their own ------------------------------------------------
    def to_img01(self, x) -> np.ndarray:
        """Intensity handling only: a float32 2-D image in [0, 1]."""
        if isinstance(x, (str, os.PathLike)):
            return _read_file(Path(x))
        if _is_pydicom_dataset(x):
            return _load_with_readers(x, "pydicom dataset")
        if isinstance(x, torch.Tensor):
            x = x.detach().cpu().numpy()
        if isinstance(x, np.ndarray):
            return array_to01(x)
        raise UserError(f"preprocess: cannot read a {type(x).__name__}; pass a file path, a pydicom Dataset or a 2-D array")

    def to_stored(self, x) -> np.ndarray:
        """``uint8`` 2-D image as the training store holds it.

        Files and DICOM datasets: exactly what ``radpretrain ingest --max-size
        store_max_size`` stores (:func:`radpretrain.data.readers.load_stored`).
        """
        from radpretrain.data.intensity import resize_max, to_stored

        if isinstance(x, (str, os.PathLike)):
            return _read_file(Path(x), stored_max_size=self.store_max_size)
        if _is_pydicom_dataset(x):
            return _load_with_readers(x, "pydicom dataset", stored_max_size=self.store_max_size)
        img01 = self.to_img01(x)
        if self.store_max_size:
            img01 = resize_max(img01, self.store_max_size)
        return to_stored(img01)

    def from_stored(self, img) -> torch.Tensor:
        """Resize + normalise a stored (``uint8``) or [0, 1] 2-D image -> ``[1, 1, S, S]``."""
        img01 = _resize_policy(img, self.image_size, self.resize)
        t = torch.from_numpy(np.ascontiguousarray(img01, dtype=np.float32))
        return ((t - self.mean) / self.std)[None, None]


def _is_pydicom_dataset(x) -> bool:
    try:
        from pydicom.dataset import Dataset
    except ImportError:  # pragma: no cover
        return False
    return isinstance(x, Dataset)


def _as2d(a: np.ndarray) -> np.ndarray:
    a = np.asarray(a)
    while a.ndim > 2 and a.shape[0] == 1:
        a = a[0]
    if a.ndim != 2 or a.size == 0:
        raise UserError(f"preprocess: expected a 2-D grey image, got an array of shape {a.shape} "
                        "(pass a list for a batch)")
    return a


def array_to01(x: np.ndarray) -> np.ndarray:
    """The documented rule for arrays: uint8 /255, float in [0, 1] as is, else a percentile window."""
    a = _as2d(x)
    if a.dtype == np.bool_:
        return a.astype(np.float32)
    if a.dtype == np.uint8:
        return a.astype(np.float32) / np.float32(255)
    if np.issubdtype(a.dtype, np.floating):
        f = a.astype(np.float32)
        if np.isfinite(f).all() and f.min() >= 0.0 and f.max() <= 1.0:
            return f
    if not np.issubdtype(a.dtype, np.number):
        raise UserError(f"preprocess: unsupported array dtype {a.dtype}")
    from radpretrain.data.intensity import percentile_window

    return percentile_window(a)


_FULL = object()  # to_img01: the [0, 1] image at full size, not the stored one


def _read_file(path: Path, stored_max_size=_FULL) -> np.ndarray:
    if not path.is_file():
        raise UserError(f"{path}: no such image file")
    return _load_with_readers(path, str(path), stored_max_size)


def _load_with_readers(x, what: str, stored_max_size=_FULL) -> np.ndarray:
    """``load_image``'s [0, 1] image, or (``stored_max_size`` given, None: no resizing) ``load_stored``'s uint8 one."""
    from radpretrain.data.readers import ReadError, load_image, load_stored

    try:  # _meta may hold raw identifiers in memory: dropped here
        if stored_max_size is _FULL:
            img, _meta = load_image(x)
            return _as2d(np.asarray(img, dtype=np.float32))
        img, _meta = load_stored(x, stored_max_size)
    except ReadError as e:
        raise UserError(f"{what}: cannot read this image ({e})") from None
    return _as2d(np.asarray(img))


def _resize_policy(img, size: int, resize: str) -> np.ndarray:
    """The dataset's own resize (same pixels as training): letterbox, or stretch for stretch-trained encoders."""
    from radpretrain.data.dataset import letterbox, stretch

    return (stretch if resize == "stretch" else letterbox)(img, size)[0]


def preprocess_from_meta(meta: dict, image_size: int | None = None) -> Preprocess:
    """The :class:`Preprocess` of an encoder description (``encoder.json`` or export ``config.json``)."""
    pre = meta.get("preprocessing") or {}
    if "mean" not in pre or "std" not in pre:
        raise UserError(f"encoder {meta.get('arch', '?')}: no preprocessing mean/std recorded; cannot build its input")
    size = image_size or pre.get("image_size") or meta.get("image_size") or 224
    return Preprocess(int(size), _scalar(pre["mean"]), _scalar(pre["std"]),
                      str(pre.get("resize") or meta.get("resize") or "letterbox"),
                      store_max_size=pre.get("store_max_size", 512))


def load_encoder(path, device: str | torch.device = "cpu", image_size: int | None = None
                 ) -> tuple[torch.nn.Module, Callable[[Any], torch.Tensor]]:
    """Load an export (or run) folder; returns ``(model, preprocess)``, the model in eval mode.

    ``preprocess(x)`` takes a pydicom Dataset, a DICOM/PNG/JPEG path or a 2-D
    array and returns ``[1, 1, S, S]`` (a list gives ``[N, 1, S, S]``); move it
    to the model's device yourself.
    """
    from radpretrain.models.weights import load_run_encoder

    p = Path(path)
    if not p.exists():
        raise UserError(f"{p}: no such encoder folder")
    model, meta = load_run_encoder(p, device=device)
    return model.eval(), preprocess_from_meta(meta, image_size)
