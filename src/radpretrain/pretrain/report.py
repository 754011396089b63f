"""The run report: ``RUN/report.html``, one self-contained page about a pretraining run.

``radpretrain pretrain`` writes it at the end of a run (finished or interrupted); ``radpretrain
report RUN`` writes it again for any run folder, also one still training or killed (it reads only
files, never checkpoints).  It shows

- the run at a glance: method, encoder, status, steps, images seen, wall time, device;
- the loss curves (training per step with a running mean, validation), the learning rate and
  other values the method logs, from ``logs/csv/metrics.csv``;
- throughput: ``train/images_per_s`` over the run (the engine's compute meter);
- the method's previews from ``previews/`` (the first and the latest of each kind: MAE
  reconstructions, SimCLR / DINO views, Genesis restorations, DeepCluster cluster galleries);
- DeepCluster: NMI between consecutive assignments and cluster sizes per epoch
  (``clusters.jsonl``);
- compute (``compute.json``), the data summary (``data_summary.json``: counts by modality, body
  part and view; no ids, no paths), the encoder (``encoder.json``), the resolved config with paths
  removed (the model card's :func:`radpretrain.export.card.redact_config`) and the package versions.

Like evaluate's report the page opens offline: figures and previews are embedded PNGs, the style
sheet is inline (:mod:`radpretrain.htmlpage`), no script.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import numpy as np
import pandas as pd
import yaml

from radpretrain.errors import UserError
from radpretrain.export.card import redact_config
from radpretrain.htmlpage import count, duration, esc, fmt, html_table, img, kv_table, page, png_bytes, png_width
from radpretrain.utils import COMPUTE_FILE, get_logger, read_json

log = get_logger("pretrain")

REPORT_FILE = "report.html"
DATA_SUMMARY_FILE = "data_summary.json"
CLUSTERS_FILE = "clusters.jsonl"
METRICS_CSV = Path("logs") / "csv" / "metrics.csv"
PREVIEW_PATTERN = re.compile(r"^(?P<kind>.+)_step(?P<step>\d+)\.png$")
# what the rows of each method's preview grid are (methods' save_previews)
PREVIEW_CAPTIONS = {
    "mae_reconstruction": "MAE: rows = input, visible patches, reconstruction",
    "simclr_views": "SimCLR: rows = input, view 1, view 2",
    "dino_views": "DINO: rows = input, a global view, a local view (shown at the input's size)",
    "genesis_restore": "Models Genesis: rows = input, corrupted, restored",
    "clusters": "DeepCluster: one row per cluster (the 8 largest), up to 8 images each",
    "metadata_inputs": "metadata-supervised: the inputs the heads see",
}
PREVIEW_MIN_WIDTH = 480  # preview grids narrower than this are enlarged (at most 4x)
# columns of metrics.csv that the report draws in their own figures
OWN_FIGURES = ("epoch", "step", "train/loss", "val/loss", "train/images_per_s")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run", help="a pretraining run folder (finished, interrupted or still training)")


def run(args) -> int:
    path = write_run_report(args.run)
    print(path)
    return 0


# -- reading the run folder ---------------------------------------------------------------

def read_metrics(run_dir: Path) -> pd.DataFrame | None:
    """``logs/csv/metrics.csv`` as one row per step (Lightning writes sparse rows; a resumed run repeats
    steps: the later value wins), or None when there is none yet."""
    path = run_dir / METRICS_CSV
    if not path.is_file():
        return None
    try:
        df = pd.read_csv(path)
    except (pd.errors.EmptyDataError, pd.errors.ParserError, OSError) as e:
        log.warning("%s: unreadable (%s); the report has no curves", path, e)
        return None
    if "step" not in df.columns or not len(df):
        return None
    df = df.dropna(subset=["step"])
    df["step"] = df["step"].astype(int)
    return df.groupby("step", sort=True).last()  # per column: the last non-empty value of each step


def _read_json(path: Path):
    if not path.is_file():
        return None
    try:
        return read_json(path)
    except (OSError, ValueError) as e:
        log.warning("%s: unreadable (%s); left out of the report", path, e)
        return None


def read_clusters(run_dir: Path) -> list[dict]:
    """DeepCluster's records (one per re-clustering); the latest record of an epoch wins (resumed runs)."""
    path = run_dir / CLUSTERS_FILE
    if not path.is_file():
        return []
    by_epoch: dict[int, dict] = {}
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
            by_epoch[int(rec["epoch"])] = rec
        except (ValueError, KeyError, TypeError):
            continue  # a line cut by a kill
    return [by_epoch[e] for e in sorted(by_epoch)]


def preview_files(run_dir: Path) -> dict[str, list[tuple[int, Path]]]:
    """``{kind: [(step, file), ...]}`` of ``previews/KIND_stepNNNNNNN.png``, steps ascending."""
    out: dict[str, list[tuple[int, Path]]] = {}
    d = run_dir / "previews"
    if not d.is_dir():
        return out
    for f in d.glob("*.png"):
        m = PREVIEW_PATTERN.match(f.name)
        if m:
            out.setdefault(m.group("kind"), []).append((int(m.group("step")), f))
    return {k: sorted(v) for k, v in sorted(out.items())}


def run_status(run_dir: Path, compute: dict | None, metrics: pd.DataFrame | None) -> str:
    if (run_dir / "encoder.safetensors").is_file() and (compute is None or compute.get("finished", True)):
        return "finished (encoder written)"
    if compute is not None and not compute.get("finished", True):
        return "interrupted (continue it with --resume)"
    return "running or stopped without an encoder" + (" (no steps logged yet)" if metrics is None else "")


# -- figures ------------------------------------------------------------------------------

def _running_mean(v: np.ndarray, n: int) -> np.ndarray:
    if len(v) < 3 or n <= 1:
        return v
    n = min(n, len(v))
    c = np.cumsum(np.insert(v, 0, 0.0))
    out = np.empty_like(v, dtype=float)
    for i in range(len(v)):  # trailing mean over up to n values
        lo = max(0, i + 1 - n)
        out[i] = (c[i + 1] - c[lo]) / (i + 1 - lo)
    return out


def fig_loss_lr(metrics: pd.DataFrame):
    """Loss (training per step + running mean, validation) and the learning rate(s), side by side."""
    from matplotlib.figure import Figure  # heavy: only when a report is drawn

    lr_cols = [c for c in metrics.columns if c.startswith("lr-")]
    has_loss = any(c in metrics.columns for c in ("train/loss", "val/loss"))
    if not has_loss and not lr_cols:
        return None
    fig = Figure(figsize=(9.5, 3.3), layout="constrained")
    ax_loss, ax_lr = fig.subplots(1, 2)
    for col, style, label in (("train/loss", "-", "training"), ("val/loss", "o--", "validation")):
        if col not in metrics.columns:
            continue
        s = metrics[col].dropna()
        if not len(s):
            continue
        if col == "train/loss":
            ax_loss.plot(s.index, s.to_numpy(), color="#1f77b4", alpha=0.3, lw=0.8, label="training (per step)")
            ax_loss.plot(s.index, _running_mean(s.to_numpy(float), max(3, len(s) // 25)), color="#1f77b4",
                         label="training (running mean)")
        else:
            ax_loss.plot(s.index, s.to_numpy(), style, color="#d62728", ms=4, label=label)
    ax_loss.set_xlabel("step")
    ax_loss.set_ylabel("loss")
    ax_loss.set_title("loss", fontsize=10)
    ax_loss.grid(alpha=0.3)
    if ax_loss.lines:
        ax_loss.legend(fontsize=8)
    for col in lr_cols:
        s = metrics[col].dropna()
        ax_lr.plot(s.index, s.to_numpy(), label=col[3:])
    ax_lr.set_xlabel("step")
    ax_lr.set_ylabel("learning rate")
    ax_lr.set_title("learning rate (per parameter group)", fontsize=10)
    ax_lr.grid(alpha=0.3)
    if len(lr_cols) > 1:
        ax_lr.legend(fontsize=8)
    return fig


def fig_throughput(metrics: pd.DataFrame):
    from matplotlib.figure import Figure  # heavy: only when a report is drawn

    if "train/images_per_s" not in metrics.columns:
        return None
    s = metrics["train/images_per_s"].dropna()
    if not len(s):
        return None
    fig = Figure(figsize=(6.0, 2.8), layout="constrained")
    ax = fig.subplots()
    ax.plot(s.index, s.to_numpy(), color="#2ca02c")
    ax.axhline(float(s.median()), color="#2ca02c", ls=":", lw=1)
    ax.set_xlabel("step")
    ax.set_ylabel("images / s")
    ax.set_ylim(bottom=0)
    ax.set_title(f"training throughput (median {s.median():.1f} images/s; dotted)", fontsize=10)
    ax.grid(alpha=0.3)
    return fig


def fig_other_metrics(metrics: pd.DataFrame, skip_prefixes: tuple[str, ...] = ()):
    """Every other value the method logs (accuracy, masked share, ...), one small panel each; columns starting
    with ``skip_prefixes`` have their own section."""
    from matplotlib.figure import Figure  # heavy: only when a report is drawn

    cols = [c for c in metrics.columns if c not in OWN_FIGURES and not c.startswith(("lr-", *skip_prefixes))
            and pd.api.types.is_numeric_dtype(metrics[c]) and metrics[c].notna().sum() > 0]
    if not cols:
        return None
    cols = cols[:12]
    ncol = min(4, len(cols))
    nrow = (len(cols) + ncol - 1) // ncol
    fig = Figure(figsize=(3.0 * ncol, 2.4 * nrow), layout="constrained")
    axes = np.atleast_1d(fig.subplots(nrow, ncol, squeeze=False)).ravel()
    for ax, col in zip(axes, cols):
        s = metrics[col].dropna()
        ax.plot(s.index, s.to_numpy(), "-" if len(s) > 1 else "o", color="#9467bd", ms=4)
        ax.set_title(col, fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
    for ax in axes[len(cols):]:
        ax.axis("off")
    return fig


def fig_clusters(records: list[dict]):
    """DeepCluster: NMI between consecutive assignments, and cluster-size quantiles, per epoch."""
    from matplotlib.figure import Figure  # heavy: only when a report is drawn
    from matplotlib.ticker import MaxNLocator  # heavy: only when a report is drawn

    if not records:
        return None
    ep = [r["epoch"] for r in records]
    fig = Figure(figsize=(9.5, 3.0), layout="constrained")
    ax_nmi, ax_size = fig.subplots(1, 2)
    nmi = [(r["epoch"], r["nmi_prev"]) for r in records if r.get("nmi_prev") is not None]
    if nmi:
        ax_nmi.plot(*zip(*nmi), "o-", color="#1f77b4")
    ax_nmi.set_ylim(0, 1.02)
    ax_nmi.set_xlabel("epoch")
    ax_nmi.set_ylabel("NMI")
    ax_nmi.set_title("NMI of each assignment with the previous one", fontsize=10)
    ax_nmi.grid(alpha=0.3)
    sizes = [r.get("sizes") or {} for r in records]
    if all(k in s for s in sizes for k in ("min", "q1", "median", "q3", "max")):
        ax_size.fill_between(ep, [s["min"] for s in sizes], [s["max"] for s in sizes], color="#ff7f0e", alpha=0.15,
                             lw=0, label="min-max")
        ax_size.fill_between(ep, [s["q1"] for s in sizes], [s["q3"] for s in sizes], color="#ff7f0e", alpha=0.35,
                             lw=0, label="quartiles")
        ax_size.plot(ep, [s["median"] for s in sizes], "o-", color="#ff7f0e", label="median")
        ax_size.legend(fontsize=8)
    ax_size.set_xlabel("epoch")
    ax_size.set_ylabel("images per cluster")
    ax_size.set_title("cluster sizes", fontsize=10)
    ax_size.grid(alpha=0.3)
    for ax in (ax_nmi, ax_size):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    return fig


# -- tables ---------------------------------------------------------------------------------

def glance_items(run_dir: Path, cfg: dict, encoder: dict | None, compute: dict | None,
                 metrics: pd.DataFrame | None) -> list[tuple[str, str]]:
    model = cfg.get("model") or {}
    data = cfg.get("data") or {}
    steps = compute.get("steps") if compute else (int(metrics.index.max()) + 1 if metrics is not None else None)
    items = [("method", str(cfg.get("method", "?"))),
             ("encoder", f"{(encoder or {}).get('arch') or model.get('backbone', '?')}, "
                         f"{data.get('image_size', '?')} px letterbox, start weights: "
                         f"{redact_config(str(model.get('pretrained')), 'pretrained')}"),
             ("status", run_status(run_dir, compute, metrics)),
             ("steps", count(steps))]
    if compute:
        dev = compute.get("device") or {}
        items += [("images seen", count(compute.get("images_seen"))),
                  ("wall time", duration(compute.get("wall_seconds"))
                   + (" (this session only: resumed from a checkpoint without a record)"
                      if compute.get("partial_record") else "")),
                  ("device", f"{dev.get('type', '?')} ({dev.get('name', '?')})"
                             + (f" x {dev['processes']} processes" if int(dev.get("processes", 1) or 1) > 1 else "")
                             + f", {compute.get('precision', '?')}, {compute.get('torch_threads', '?')} CPU threads"),
                  ("throughput", f"{fmt(compute.get('images_per_s'), 1)} images/s over the run")]
    training = (encoder or {}).get("training") or {}
    if training:
        items.append(("exported weights", f"{training.get('weights', '?')} (step {training.get('global_step', '?')}"
                      + (f", best validation loss {fmt(training['best_val_loss'], 4)}"
                         if training.get("best_val_loss") is not None else "") + ")"))
    return items


def data_tables(summary: dict) -> list[str]:
    """HTML tables of the data summary: per field, images of the training and validation parts."""
    parts = [kv_table([
        ("training images", f"{count(summary['train'].get('images'))} of {count(summary['train'].get('patients'))} "
                            "patients"),
        ("validation images", f"{count(summary['val'].get('images'))} of {count(summary['val'].get('patients'))} "
                              "patients"),
        ("left out", f"{count(summary.get('left_out'))} of the store's {count(summary.get('store_images'))} ingested "
                     "images (excluded split, per-patient cap, keep=False)"),
        ("selection", ", ".join(f"data.{k}={v}" for k, v in (summary.get("selection") or {}).items())),
    ])]
    for field, title in (("modality_body_part", "modality / body part"), ("body_part", "body part"),
                         ("modality", "modality"), ("view", "view")):
        tr, va = summary["train"].get(field) or {}, summary["val"].get(field) or {}
        if not tr and not va:
            continue
        keys = sorted(set(tr) | set(va), key=lambda k: -(tr.get(k, 0) + va.get(k, 0)))
        rows = [[k, count(tr.get(k, 0)), count(va.get(k, 0))] for k in keys[:40]]
        parts.append(f"<h3>by {esc(title)}</h3>" + html_table(["value", "training", "validation"], rows, left=1))
    return parts


def compute_items(compute: dict) -> list[tuple[str, str]]:
    """compute.json as table rows (the device dict on one row)."""
    items = []
    for k, v in compute.items():
        if isinstance(v, dict):
            v = ", ".join(f"{a}: {b}" for a, b in v.items())
        elif k == "wall_seconds" and v is not None:
            v = f"{v} ({duration(v)})"
        items.append((k, str(v)))
    return items


def cluster_table(records: list[dict]) -> str:
    head = ["epoch", "images", "clusters", "NMI vs previous", "smallest", "median", "largest", "empty re-seeded",
            "seconds"]
    rows = []
    for r in records:
        s = r.get("sizes") or {}
        rows.append([str(r["epoch"]), count(r.get("n_images")), count(r.get("k")), fmt(r.get("nmi_prev")),
                     count(s.get("min")), fmt(s.get("median"), 0), count(s.get("max")), count(r.get("n_empty_fixed")),
                     fmt(r.get("seconds"), 1)])
    return html_table(head, rows, left=1)


# -- the page -------------------------------------------------------------------------------

def write_run_report(run_dir: str | Path) -> Path:
    """Write ``RUN/report.html`` from the run folder's files; returns its path."""
    run_dir = Path(run_dir)
    cfg_path = run_dir / "config.yaml"
    if not cfg_path.is_file():
        raise UserError(f"{run_dir}: no config.yaml; not a pretraining run folder")
    try:
        cfg = yaml.safe_load(cfg_path.read_text()) or {}
    except yaml.YAMLError as e:
        raise UserError(f"{cfg_path}: not readable YAML ({str(e).splitlines()[0]})") from None
    metrics = read_metrics(run_dir)
    compute = _read_json(run_dir / COMPUTE_FILE)
    encoder = _read_json(run_dir / "encoder.json")
    data = _read_json(run_dir / DATA_SUMMARY_FILE)
    versions = _read_json(run_dir / "versions.json") or {}
    clusters = read_clusters(run_dir)
    previews = preview_files(run_dir)

    title = f"radpretrain pretrain: {run_dir.resolve().name}"
    parts = ["<p class='small'>A pretraining run: its curves, throughput, the method's previews, compute, the "
             "data it trained on (counts only), the encoder and the resolved config (paths removed). Written by "
             "<code>radpretrain pretrain</code> at the end of the run; <code>radpretrain report RUN</code> writes it "
             "again.</p>",
             "<div class='verdict'>" + kv_table(glance_items(run_dir, cfg, encoder, compute, metrics)) + "</div>"]

    figures = []
    if metrics is not None:
        figures = [("Loss and learning rate", fig_loss_lr(metrics), "Training loss of every logged step (light) and "
                    "its running mean; validation loss where the run holds images out (and the method has one)."),
                   ("Throughput", fig_throughput(metrics), "Training images per second (all processes), over the "
                    "last logged batches: loading and the step included, validation left out."),
                   ("Other logged values",
                    fig_other_metrics(metrics, ("deepcluster/",) if clusters else ()), "")]
    else:
        parts.append("<h2>Loss and learning rate</h2><p>No logs/csv/metrics.csv yet.</p>")
    for name, fig, note in figures:
        if fig is None:
            continue
        parts.append(f"<h2>{esc(name)}</h2>" + (f"<p class='small'>{esc(note)}</p>" if note else "")
                     + img(png_bytes(fig), name))

    if clusters:
        parts.append("<h2>DeepCluster: assignments per epoch</h2><p class='small'>Normalised mutual information "
                     "between an epoch's k-means assignment and the previous one (near 1: the clusters have settled), "
                     "and the cluster sizes (from clusters.jsonl).</p>")
        fig = fig_clusters(clusters)
        if fig is not None:
            parts.append(img(png_bytes(fig), "clusters per epoch"))
        parts.append(cluster_table(clusters))

    parts.append("<h2>Previews</h2>")
    if previews:
        parts.append("<p class='small'>What the method sees and produces, drawn from a fixed batch (validation "
                     "images when the run holds some out): the first and the latest preview of each kind.</p>")
        for kind, files in previews.items():
            shown = [files[0], files[-1]] if len(files) > 1 else files
            parts.append(f"<h3>{esc(PREVIEW_CAPTIONS.get(kind, kind))}</h3>")
            for step, f in shown:
                png = f.read_bytes()
                w = png_width(png)  # small grids (64-px thumbnails) are shown enlarged, pixel for pixel
                shown_w = w * max(1, min(4, PREVIEW_MIN_WIDTH // w)) if w else None
                parts.append(f"<p class='small'>step {step} ({esc(f.name)})</p>"
                             + img(png, f"{kind} step {step}", css_class="preview", width=shown_w))
    else:
        parts.append("<p>No previews (the method writes none, or previews.n=0).</p>")

    parts.append("<h2>Data</h2>")
    if data:
        parts += data_tables(data)
    else:
        parts.append("<p>No data_summary.json (a run from before it was written).</p>")

    if compute:
        parts.append("<h2>Compute (compute.json)</h2>" + kv_table(compute_items(compute)))
    if encoder:
        parts.append("<h2>Encoder (encoder.json)</h2><pre>"
                     + esc(json.dumps(redact_config(encoder), indent=2)) + "</pre>")
    parts.append("<h2>Resolved config (config.yaml, paths removed)</h2><pre>"
                 + esc(yaml.safe_dump(redact_config(cfg), sort_keys=False).strip()) + "</pre>")
    if versions:
        parts.append("<h2>Versions</h2>" + kv_table([(k, v) for k, v in versions.items() if v != "not installed"]))
    out = run_dir / REPORT_FILE
    tmp = out.with_name(f".{out.name}.tmp")
    tmp.write_text(page(title, parts), encoding="utf-8")
    tmp.replace(out)  # never half a page: a browser may be showing the previous one
    return out
