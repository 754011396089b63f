"""``radpretrain compare``: label efficiency against pretraining compute, over several evaluate outputs.

::

    radpretrain compare eval/short eval/long eval/longer --out compare/ [--x minutes|images|steps]

Each ``EVAL_DIR`` is an ``evaluate`` output folder of one task (same target).  Every pretrained
run it evaluated becomes a point: its headline metric (pooled out-of-fold, 95 % CI as a bar) at
each label fraction and protocol, against the compute its pretraining spent: wall minutes,
images seen or optimiser steps, from the ``compute.json`` the engine writes at the end of a run
(recorded by ``evaluate`` in ``summary.json``; read from the run folder, or estimated from its
``encoder.json`` and ``config.yaml`` for runs from before that file).  An init group
(``--init NAME=RUN1,RUN2,...``) is one point at its seeds' mean compute and mean metric, the bar
spanning the seeds' min-max, with each seed as a small dot.  Points of one recipe (same method,
backbone and image size) are joined in order of compute; scratch and ImageNet are horizontal
lines with their CI as a band.  A user sees whether training longer helps and where it flattens.

Writes ``compare.html`` (self-contained), ``compare.png``, ``compare.csv`` (one row per point:
run, group or baseline) and prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import yaml

from radpretrain.errors import UserError
from radpretrain.evaluate.metrics import HIGHER_IS_BETTER, METRIC_LABELS, primary_metric
from radpretrain.htmlpage import count, duration, esc, fmt, html_table, img, kv_table, link, page, png_bytes
from radpretrain.utils import COMPUTE_FILE, get_logger, read_json

log = get_logger("compare")

X_AXES = {"minutes": "pretraining wall time (minutes)", "images": "images seen in pretraining",
          "steps": "pretraining steps"}
BASELINES = ("scratch", "imagenet")
BASELINE_COLORS = {"scratch": "#7f7f7f", "imagenet": "#1f77b4"}
PALETTE = ["#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#17becf", "#bcbd22"]
CSV_COLUMNS = ["evaluation", "kind", "init", "group", "members", "series", "protocol", "fraction", "metric", "value",
               "ci_low", "ci_high", "spread_low", "spread_high", "minutes", "wall_seconds", "steps", "images_seen",
               "device", "torch_threads", "compute_source", "delta_vs_imagenet", "delta_vs_imagenet_ci_low",
               "delta_vs_imagenet_ci_high", "delta_vs_scratch", "delta_vs_scratch_ci_low", "delta_vs_scratch_ci_high"]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("evals", nargs="+", metavar="EVAL_DIR", help="evaluate output folders of one task")
    p.add_argument("--out", required=True, help="folder for compare.html, compare.png and compare.csv")
    p.add_argument("--x", choices=tuple(X_AXES), default="minutes",
                   help="the compute axis: wall minutes of pretraining (default), images seen or steps")
    p.add_argument("--protocol", action="append", default=None,
                   help="only these protocols (default: every protocol the evaluations ran)")


def run(args) -> int:
    result = compare(args.evals, args.out, x=args.x, protocols=args.protocol)
    print(json.dumps(result, default=float))
    return 0


@dataclass
class Evaluation:
    """One evaluate output folder, as compare reads it."""

    label: str
    folder: Path
    summary: dict
    results: pd.DataFrame
    comparisons: pd.DataFrame
    compute: dict[str, dict] = field(default_factory=dict)   # run init -> its compute record


def read_evaluation(folder: Path, label: str) -> Evaluation:
    for name in ("summary.json", "results.csv"):
        if not (folder / name).is_file():
            raise UserError(f"{folder}: no {name}; not an evaluate output folder")
    try:
        summary = read_json(folder / "summary.json")
    except ValueError as e:
        raise UserError(f"{folder / 'summary.json'}: not readable JSON ({e})") from None
    if summary.get("command") != "radpretrain evaluate" or "inits" not in summary:
        raise UserError(f"{folder / 'summary.json'}: not written by radpretrain evaluate")
    results = pd.read_csv(folder / "results.csv", dtype={"fold": str})
    comp_path = folder / "comparisons.csv"
    comparisons = pd.read_csv(comp_path) if comp_path.is_file() else pd.DataFrame(
        columns=["init", "reference", "protocol", "fraction", "metric", "delta", "ci_low", "ci_high"])
    ev = Evaluation(label, folder, summary, results, comparisons)
    for name, meta in summary["inits"].items():
        if meta.get("kind") == "run":
            ev.compute[name] = run_compute(folder, meta)
    return ev


def run_compute(eval_dir: Path, meta: dict) -> dict:
    """A run init's compute: as evaluate recorded it, else the run folder's ``compute.json``, else an estimate
    from its ``encoder.json`` (steps) and ``config.yaml`` (batch size) with unknown wall time; ``{}`` if none."""
    if meta.get("compute"):
        return {**meta["compute"], "source": "summary.json"}
    rel = meta.get("run")
    if not rel:
        return {}
    folder = eval_dir / rel
    if (folder / COMPUTE_FILE).is_file():
        try:
            return {**read_json(folder / COMPUTE_FILE), "source": COMPUTE_FILE}
        except (OSError, ValueError):
            pass
    try:
        steps = int(read_json(folder / "encoder.json")["training"]["global_step"])
        cfg = yaml.safe_load((folder / "config.yaml").read_text()) or {}
        batch = int(cfg["data"]["batch_size"]) * int(cfg.get("trainer", {}).get("accumulate_grad_batches", 1) or 1)
    except (OSError, ValueError, KeyError, TypeError, yaml.YAMLError):
        return {}
    return {"steps": steps, "images_seen": steps * batch, "wall_seconds": None, "method": cfg.get("method"),
            "backbone": (cfg.get("model") or {}).get("backbone"), "image_size": (cfg.get("data") or {}).get("image_size"),
            "source": "estimated (encoder.json steps x batch size; one process)"}


def _x_value(c: dict, x: str) -> float:
    v = {"minutes": (c.get("wall_seconds") / 60) if c.get("wall_seconds") is not None else None,
         "images": c.get("images_seen"), "steps": c.get("steps")}[x]
    return float(v) if v is not None else float("nan")


def _series(c: dict, meta: dict) -> str:
    """Points of one recipe: same method, backbone and image size (joined by a line, in order of compute)."""
    method = c.get("method") or meta.get("method") or "?"
    arch = c.get("backbone") or meta.get("arch") or "?"
    size = c.get("image_size") or meta.get("pretrain_image_size")
    return f"{method} · {arch}" + (f" · {size} px" if size else "")


def _delta(ev: Evaluation, init: str, ref: str, proto: str, frac: float, metric: str) -> tuple[float, float, float]:
    c = ev.comparisons
    c = c[(c["init"] == init) & (c["reference"] == ref) & (c["protocol"] == proto)
          & np.isclose(c["fraction"].astype(float), frac) & (c["metric"] == metric)]
    if not len(c):
        return (np.nan, np.nan, np.nan)
    r = c.iloc[0]
    return float(r["delta"]), float(r["ci_low"]), float(r["ci_high"])


def collect_points(evals: list[Evaluation], metric: str, protocols: list[str] | None) -> pd.DataFrame:
    """One row per run, init group and baseline of every evaluation, protocol and label fraction."""
    rows = []
    for ev in evals:
        pooled = ev.results[(ev.results["fold"] == "pooled") & (ev.results["metric"] == metric)]
        if protocols:
            pooled = pooled[pooled["protocol"].isin(protocols)]
        inits = ev.summary["inits"]
        members = (ev.summary.get("groups") or {}).get("members", {})
        group_rows = {(r["group"], r["protocol"], float(r["fraction"])): r
                      for r in (ev.summary.get("groups") or {}).get("rows", [])}
        for _, r in pooled.iterrows():
            name, proto, frac = r["init"], r["protocol"], float(r["fraction"])
            meta = inits.get(name, {})
            base = {"evaluation": ev.label, "init": name, "protocol": proto, "fraction": frac, "metric": metric,
                    "value": r["value"], "ci_low": r["ci_low"], "ci_high": r["ci_high"]}
            if name in BASELINES:
                rows.append({**base, "kind": "baseline", "series": name})
                continue
            if meta.get("kind") != "run":
                continue
            c = ev.compute.get(name) or {}
            dev = c.get("device") or {}
            row = {**base, "kind": "run", "group": meta.get("group") or "", "series": _series(c, meta),
                   "minutes": _x_value(c, "minutes"), "wall_seconds": c.get("wall_seconds"), "steps": c.get("steps"),
                   "images_seen": c.get("images_seen"), "device": dev.get("name"),
                   "torch_threads": c.get("torch_threads"), "compute_source": c.get("source", "")}
            for ref in BASELINES:
                d, lo, hi = _delta(ev, name, ref, proto, frac, metric)
                row.update({f"delta_vs_{ref}": d, f"delta_vs_{ref}_ci_low": lo, f"delta_vs_{ref}_ci_high": hi})
            rows.append(row)
        runs = pd.DataFrame([r for r in rows if r["evaluation"] == ev.label and r["kind"] == "run"])
        for group, names in members.items():
            if not len(runs):
                break
            for (proto, frac), g in runs[runs["init"].isin(names)].groupby(["protocol", "fraction"], sort=False):
                vals = g["value"].to_numpy(float)
                row = {"evaluation": ev.label, "kind": "group", "init": group, "group": group,
                       "members": len(g), "series": g["series"].iloc[0], "protocol": proto, "fraction": frac,
                       "metric": metric, "value": float(np.nanmean(vals)), "spread_low": float(np.nanmin(vals)),
                       "spread_high": float(np.nanmax(vals)), "device": g["device"].iloc[0],
                       "torch_threads": g["torch_threads"].iloc[0], "compute_source": g["compute_source"].iloc[0]}
                for col in ("minutes", "wall_seconds", "steps", "images_seen"):
                    v = pd.to_numeric(g[col], errors="coerce")
                    row[col] = float(v.mean()) if v.notna().all() else np.nan
                rec = group_rows.get((group, proto, float(frac)))
                for ref in BASELINES:
                    vs = (rec or {}).get("vs", {}).get(ref)
                    if vs:
                        row.update({f"delta_vs_{ref}": vs["delta"], f"delta_vs_{ref}_ci_low": vs["ci"][0],
                                    f"delta_vs_{ref}_ci_high": vs["ci"][1]})
                rows.append(row)
    df = pd.DataFrame(rows)
    for col in CSV_COLUMNS:
        if col not in df.columns:
            df[col] = np.nan
    return df[CSV_COLUMNS]


def _x(df: pd.DataFrame, x: str) -> np.ndarray:
    col = {"minutes": "minutes", "images": "images_seen", "steps": "steps"}[x]
    return pd.to_numeric(df[col], errors="coerce").to_numpy(float)


def fig_compute(points: pd.DataFrame, metric: str, x: str):
    """One panel per protocol (rows) and label fraction (columns): metric vs compute, baselines as lines."""
    from matplotlib.figure import Figure  # heavy: only when the view is drawn

    protos = list(dict.fromkeys(points["protocol"]))
    fracs = sorted(points["fraction"].astype(float).unique())
    series = list(dict.fromkeys(points.loc[points["kind"] != "baseline", "series"]))
    colors = {s: PALETTE[i % len(PALETTE)] for i, s in enumerate(series)}
    fig = Figure(figsize=(3.9 * len(fracs) + 0.4, 3.3 * len(protos) + 0.5), layout="constrained")
    axes = fig.subplots(len(protos), len(fracs), squeeze=False)
    label = METRIC_LABELS.get(metric, metric)
    xs_all = _x(points[points["kind"] != "baseline"], x)
    xs_all = xs_all[np.isfinite(xs_all) & (xs_all > 0)]
    log_x = len(xs_all) > 1 and xs_all.max() / xs_all.min() >= 10
    for i, proto in enumerate(protos):
        for j, frac in enumerate(fracs):
            ax = axes[i][j]
            p = points[(points["protocol"] == proto) & np.isclose(points["fraction"].astype(float), frac)]
            base = p[p["kind"] == "baseline"].drop_duplicates(["series", "value"])
            for _, b in base.iterrows():
                c = BASELINE_COLORS.get(b["series"], "#444")
                ax.axhline(b["value"], color=c, ls="--", lw=1.2, label=b["series"])
                if np.isfinite(b["ci_low"]) and np.isfinite(b["ci_high"]):
                    ax.axhspan(b["ci_low"], b["ci_high"], color=c, alpha=0.08, lw=0)
            for s in series:
                ps = p[p["series"] == s]
                seeds = ps[(ps["kind"] == "run") & (ps["group"] != "")]
                ax.plot(_x(seeds, x), seeds["value"], ".", color=colors[s], alpha=0.45, ms=5)
                top = ps[(ps["kind"] == "group") | ((ps["kind"] == "run") & (ps["group"] == ""))]
                top = top.assign(_x=_x(top, x)).sort_values("_x")
                top = top[np.isfinite(top["_x"])]
                if not len(top):
                    continue
                lo = np.where(top["kind"] == "group", top["spread_low"], top["ci_low"]).astype(float)
                hi = np.where(top["kind"] == "group", top["spread_high"], top["ci_high"]).astype(float)
                yv = top["value"].to_numpy(float)
                yerr = np.vstack([np.clip(yv - lo, 0, None), np.clip(hi - yv, 0, None)])
                ax.errorbar(top["_x"], yv, yerr=np.nan_to_num(yerr), fmt="o-", color=colors[s], capsize=3, lw=1.6,
                            ms=5, label=s)
            if log_x:
                ax.set_xscale("log")
            ax.set_title(f"{proto}, {float(frac) * 100:g} % labels", fontsize=9)
            ax.set_xlabel(X_AXES[x], fontsize=8)
            ax.set_ylabel(label, fontsize=8)
            ax.tick_params(labelsize=7)
            ax.grid(alpha=0.3)
    handles, labels = axes[0][0].get_legend_handles_labels()
    if handles:
        axes[0][0].legend(handles, labels, fontsize=7)
    fig.suptitle(f"{label} vs pretraining compute (bars: 95 % CI of a run; seed min-max of a group, dots = its seeds; "
                 "dashed: baselines with their CI)", fontsize=9)
    return fig


def trend_rows(points: pd.DataFrame, x: str, metric: str) -> list[list]:
    """Per recipe, protocol and fraction with at least two compute levels: the least and the most compute."""
    hib = HIGHER_IS_BETTER[metric]
    rows = []
    top = points[(points["kind"] == "group") | ((points["kind"] == "run") & (points["group"].fillna("") == ""))]
    top = top.assign(_x=_x(top, x))
    top = top[np.isfinite(top["_x"])]
    for (s, proto, frac), g in top.groupby(["series", "protocol", "fraction"], sort=False):
        g = g.sort_values("_x")
        if g["_x"].nunique() < 2:
            continue
        a, b = g.iloc[0], g.iloc[-1]
        change = float(b["value"] - a["value"])
        better = change > 0 if hib else change < 0
        imagenet = points[(points["kind"] == "baseline") & (points["series"] == "imagenet")
                          & (points["protocol"] == proto) & np.isclose(points["fraction"].astype(float), frac)]
        vs = "–"
        if np.isfinite(b.get("delta_vs_imagenet_ci_low", np.nan)):
            lo, hi = b["delta_vs_imagenet_ci_low"], b["delta_vs_imagenet_ci_high"]
            vs = f"{b['delta_vs_imagenet']:+.3f} [{lo:+.3f}, {hi:+.3f}]"
        elif len(imagenet):
            vs = f"{b['value'] - imagenet['value'].iloc[0]:+.3f}"
        rows.append([s, proto, f"{float(frac) * 100:g} %", _x_text(a["_x"], x), fmt(a["value"]), _x_text(b["_x"], x),
                     fmt(b["value"]), ("better" if better and abs(change) > 0 else "", f"{change:+.3f}"), vs])
    return rows


def _x_text(v: float, x: str) -> str:
    if x == "minutes":
        return duration(v * 60)
    return count(v)


def points_table(points: pd.DataFrame, x: str) -> tuple[list[str], list[list]]:
    head = ["evaluation", "init / group", "recipe", "protocol", "labels", "pretraining time", "steps", "images seen",
            "value [95 % CI]", "Δ vs ImageNet [CI]", "Δ vs scratch [CI]"]
    rows = []
    for _, r in points.iterrows():
        if r["kind"] == "baseline":
            continue
        if r["kind"] == "group":
            val = f"{fmt(r['value'])} (seeds {fmt(r['spread_low'])}–{fmt(r['spread_high'])})"
            who = f"{r['init']} (mean of {int(r['members'])})"
        else:
            val = f"{fmt(r['value'])} [{fmt(r['ci_low'])}, {fmt(r['ci_high'])}]"
            who = r["init"]
        deltas = []
        for ref in ("imagenet", "scratch"):
            d = r[f"delta_vs_{ref}"]
            deltas.append("–" if not np.isfinite(d) else
                          f"{d:+.3f} [{r[f'delta_vs_{ref}_ci_low']:+.3f}, {r[f'delta_vs_{ref}_ci_high']:+.3f}]")
        rows.append([r["evaluation"], who, r["series"], r["protocol"], f"{float(r['fraction']) * 100:g} %",
                     duration(r["wall_seconds"]), count(r["steps"]), count(r["images_seen"]), val, *deltas])
    return head, rows


def compare(evals, out, x: str = "minutes", protocols=None) -> dict:
    """Read the evaluate outputs ``evals``, write ``compare.html`` / ``compare.png`` / ``compare.csv`` into ``out``."""
    if x not in X_AXES:
        raise UserError(f"--x {x}: choose one of {', '.join(X_AXES)}")
    folders = [Path(e) for e in evals]
    if not folders:
        raise UserError("compare: give at least one evaluate output folder")
    labels, seen = [], {}
    for f in folders:
        name = f.resolve().name
        seen[name] = seen.get(name, 0) + 1
        labels.append(name if seen[name] == 1 else f"{name}-{seen[name]}")
    loaded = [read_evaluation(f, lab) for f, lab in zip(folders, labels)]
    targets = {(e.summary["target"].get("expression"), e.summary["task"]) for e in loaded}
    if len(targets) > 1:
        raise UserError("compare: the evaluations are of different tasks ("
                        + "; ".join(f"{e.label}: {e.summary['target'].get('expression')} ({e.summary['task']})"
                                    for e in loaded) + "); compare one task at a time")
    task = loaded[0].summary["task"]
    metric = primary_metric(task)
    points = collect_points(loaded, metric, protocols)
    runs = points[points["kind"] == "run"]
    if not len(runs):
        raise UserError("compare: the evaluations hold no pretrained run (inits that are run or export folders)")
    missing = sorted(set(runs.loc[~np.isfinite(_x(runs, x)), "init"]))
    if missing:
        log.warning("no %s recorded for %s (no compute.json); left off the plot (try --x steps)", x,
                    ", ".join(missing))
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    points.to_csv(out / "compare.csv", index=False)
    fig = fig_compute(points, metric, x)
    png = png_bytes(fig)
    (out / "compare.png").write_bytes(png)

    devices = sorted({d for d in runs["device"].dropna()})
    label = METRIC_LABELS.get(metric, metric)
    target = loaded[0].summary["target"].get("expression")
    parts = [f"<p class='small'>{esc(task)} task <code>{esc(target)}</code>; headline metric {esc(label)} (pooled "
             f"out-of-fold, 95 % CI by patient bootstrap), against the compute each pretraining run spent "
             f"({esc(X_AXES[x])}). Does training longer help, and where does it flatten?</p>"]
    if x == "minutes" and len(devices) > 1:
        parts.append(f"<div class='verdict'>The runs trained on different devices ({esc(', '.join(devices))}): "
                     "their wall times are not comparable; <code>--x images</code> puts them on one scale.</div>")
    trend = trend_rows(points, x, metric)
    if trend:
        parts.append("<h2>Least vs most compute, per recipe</h2><p class='small'>Recipe = method · backbone · image "
                     "size. The change is between the shortest and the longest run (group means for init groups); "
                     "read it against the CIs and seed ranges in the table below. Δ vs ImageNet of the longest "
                     "run: paired bootstrap CI (seed-mean Δ for a group).</p>"
                     + html_table(["recipe", "protocol", "labels", "least compute", label, "most compute", label,
                                   "change", "Δ vs ImageNet (most compute)"], trend))
    parts.append(f"<h2>{esc(label)} vs pretraining compute</h2>" + img(png, "metric vs compute"))
    parts.append("<h2>Every point</h2>" + html_table(*points_table(points, x), left=5))
    ev_rows = []
    for e in loaded:
        n_runs = sum(1 for m in e.summary["inits"].values() if m.get("kind") == "run")
        rep = link(f"{Path(_rel(e.folder, out)).as_posix()}/report.html", "report.html") \
            if (e.folder / "report.html").is_file() and _rel(e.folder, out) else "–"
        ev_rows.append([e.label, ", ".join(e.summary["inits"]), str(n_runs), ", ".join(e.summary.get("protocols", [])),
                        ", ".join(f"{float(f) * 100:g} %" for f in e.summary["splits"]["fractions"]), rep])
    parts.append("<h2>Evaluations</h2>" + html_table(["evaluation", "inits", "runs", "protocols", "label fractions",
                                                      "report"], ev_rows, left=2))
    parts.append("<h2>Setup</h2>" + kv_table([
        ("task", f"{target} ({task})"), ("compute axis", X_AXES[x]),
        ("devices", ", ".join(devices) or "not recorded"),
        ("compute source", ", ".join(sorted({s for s in runs["compute_source"].dropna() if s})) or "–"),
        ("files", "compare.csv (every point), compare.png (the figure)")]))
    html_path = out / "compare.html"
    html_path.write_text(page(f"radpretrain compare: {target}", parts), encoding="utf-8")
    return {"out": str(out), "html": str(html_path), "csv": str(out / "compare.csv"), "x": x, "metric": metric,
            "evaluations": len(loaded), "runs": int(len(runs.drop_duplicates(["evaluation", "init"]))),
            "groups": int(len(points[points["kind"] == "group"].drop_duplicates(["evaluation", "init"]))),
            "missing_compute": missing}


def _rel(path: Path, start: Path) -> str | None:
    try:
        return os.path.relpath(path.resolve(), start.resolve())
    except ValueError:  # another drive (Windows)
        return None
