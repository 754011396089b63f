"""The model card (``README.md``) of an export folder, and the privacy rules it follows.

:func:`render_model_card` writes YAML front matter (``library_name: timm``, licence, tags) and
Markdown: how to load the encoder, its exact preprocessing, the method and its paper (read from
the method's class, :class:`radpretrain.methods.base.PretrainMethod`), the training data, the
training config, an evaluation from ``radpretrain evaluate``, intended use and limitations.

Privacy: the card is built only from the encoder description, the training config with path-like
values redacted (:func:`redact_config`), aggregate counts by modality / body part / view from the
training store (:func:`summarize_store`) and an evaluation summary (:func:`read_evaluation`).  No
manifest identifiers, no ``source`` column, no label columns, no paths.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any, Sequence

import pandas as pd
import yaml

from radpretrain.config import get as cfg_get
from radpretrain.data.store import Store
from radpretrain.errors import UserError
from radpretrain.models.backbones import is_random_init
from radpretrain.utils import get_logger, read_json

log = get_logger("export")

DEFAULT_LICENSE = "apache-2.0"


def method_description(method: str) -> tuple[str, str, str]:
    """``(display name, reference, Hub tag)`` of a method, from its class (``PretrainMethod``).

    A run made by a method that is not installed here is described by its name only.
    """
    from radpretrain.methods import find_method  # lazy: imports Lightning (~3 s), which `export --help` need not wait for

    cls = find_method(method)
    if cls is None:
        return method, "see the radpretrain documentation", "self-supervised-learning"
    return cls.display_name, cls.paper.reference(), cls.supervision.hub_tag


_PATHY_WORDS = {"root", "path", "paths", "dir", "folder", "file", "files", "out", "output", "data", "store",
                "dataset", "source", "resume", "ckpt", "checkpoint", "url"}


def _pathy_key(key) -> bool:
    """A config key whose string values may name files or folders (``data.root``, ``out_dir`` ...)."""
    return any(t in _PATHY_WORDS for t in re.split(r"[^a-z0-9]+", str(key).lower()) if t)


def looks_like_path(v) -> bool:
    return isinstance(v, str) and ("/" in v or "\\" in v or re.match(r"^[A-Za-z]:", v) is not None
                                   or v.startswith("~"))


def redact_config(obj, key: str = ""):
    """A copy of a config with path-like values (and values of path-like keys) replaced."""
    if isinstance(obj, dict):
        return {k: redact_config(v, str(k)) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [redact_config(v, key) for v in obj]
    if isinstance(obj, str) and obj and (looks_like_path(obj) or _pathy_key(key)):
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
        return tok.replace(core, _path_label(core, run_dir)) if looks_like_path(core) else tok

    return re.sub(r"\S+", sub, text)


# --------------------------------------------------------------------------- training data and evaluation
def find_store(run_dir: Path, cfg: dict, meta: dict, data=None):
    """The run's training store if it can be opened, else None (only counts are read from it)."""
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
        if looks_like_path(v):
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


# --------------------------------------------------------------------------- the card
def _init_text(training: dict, cfg: dict, arch: str) -> str:
    src = training.get("pretrained_from", cfg_get(cfg, "model.pretrained"))
    if is_random_init(src):
        return "random (trained from scratch)"
    if src == "imagenet":
        return f"ImageNet weights of timm `{arch}`, first convolution reduced to one channel"
    if src == "<local file>" or looks_like_path(str(src)):
        return "a local checkpoint"
    return str(src)


def render_model_card(config: dict, cfg: dict, summary: dict | None, evaluation: dict | None,
                      license: str = DEFAULT_LICENSE, name: str | None = None, run_dir=None) -> str:
    """The ``README.md`` model card (YAML front matter + Markdown)."""
    arch = config["architecture"]
    method = str(config.get("method", "unknown"))
    method_name, paper, supervision_tag = method_description(method)
    name = name or f"radpretrain-{method}-{arch}"
    pre = config["preprocessing"]
    size = config["image_size"]
    tags = ["timm", "image-feature-extraction", "radpretrain", "medical-imaging", "radiology", "x-ray",
            supervision_tag, method]
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
