"""The evaluation report: ``report.html`` (self-contained) and ``report.md``.

:func:`write_report` reads an ``evaluate`` output folder (``summary.json``,
``results.csv``, ``comparisons.csv``, ``predictions.parquet``,
``finetune_history.json``) and writes

- ``report.html``: opens offline; every figure is an embedded base64 PNG, the style
  sheet is inline, there is no script (the page helpers of :mod:`radpretrain.htmlpage`); the
  only links are relative ones to the compared runs' own ``report.html``;
- ``report.md`` + ``figures/*.png``: the same content for a repository or a paper draft.

Contents: a verdict in words, the headline table (metric with 95 % CI, delta vs
scratch and vs ImageNet with paired-bootstrap CI and p, DeLong p for AUC), init groups
(several pretraining seeds of one recipe: mean, spread, seed-mean delta with CI), the
pretraining runs compared (compute, links to their run reports), label-efficiency curves, ROC curves, confusion matrices, fine-tuning loss curves,
per-fold values and the setup (data counts, splits, leakage check, seeds,
versions).  See docs/report.md for how to read it.
"""

from __future__ import annotations

import html
import json
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from radpretrain.evaluate.metrics import HIGHER_IS_BETTER, METRIC_LABELS, froc_curve, primary_metric
from radpretrain.htmlpage import count, duration, fmt, fmt_p, html_table, img, kv_table, link, md_table, page, png_bytes
from radpretrain.utils import read_json

if TYPE_CHECKING:
    from matplotlib.figure import Figure

COLORS = {"scratch": "#7f7f7f", "imagenet": "#1f77b4"}
PALETTE = ["#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#17becf", "#bcbd22"]


def _color(init: str, inits: list[str]) -> str:
    if init in COLORS:
        return COLORS[init]
    others = [i for i in inits if i not in COLORS]
    return PALETTE[others.index(init) % len(PALETTE)] if init in others else "#000"


def _figure(**kw) -> "Figure":
    """A matplotlib figure (no pyplot, no display)."""
    from matplotlib.figure import Figure  # heavy: loaded only when a report is drawn

    return Figure(**kw)


def _frac(f) -> str:
    return f"{float(f) * 100:g} %"


# -- figures ---------------------------------------------------------------------------

def fig_label_efficiency(results: pd.DataFrame, metric: str, inits: list[str],
                         groups: dict[str, list[str]] | None = None) -> Figure | None:
    """Metric vs labelled share, one line per init (CI band); an init group: its seeds as thin lines, the
    seed mean as a bold line with the seeds' min-max as its band."""
    pooled = results[(results["fold"] == "pooled") & (results["metric"] == metric)]
    protos = list(dict.fromkeys(pooled["protocol"]))
    if not protos:
        return None
    groups = groups or {}
    member = {m: g for g, ms in groups.items() for m in ms}
    names = [i for i in inits if i not in member] + list(groups)  # one colour per single init and per group
    fig = _figure(figsize=(4.2 * len(protos), 3.4), layout="constrained")
    axes = fig.subplots(1, len(protos), squeeze=False)[0]
    for ax, proto in zip(axes, protos):
        g = pooled[pooled["protocol"] == proto]
        for init in inits:
            d = g[g["init"] == init].sort_values("fraction")
            if not len(d):
                continue
            x = d["fraction"].to_numpy(float) * 100
            if init in member:  # a seed of a group: thin, no band (the group's line carries the spread)
                ax.plot(x, d["value"], marker=".", color=_color(member[init], names), lw=0.8, alpha=0.5)
                continue
            c = _color(init, names)
            ax.plot(x, d["value"], marker="o", color=c, label=init)
            ax.fill_between(x, d["ci_low"], d["ci_high"], color=c, alpha=0.15, linewidth=0)
        for gname, ms in groups.items():
            d = g[g["init"].isin(ms)].groupby("fraction")["value"].agg(["mean", "min", "max", "size"]).reset_index()
            if not len(d):
                continue
            x = d["fraction"].to_numpy(float) * 100
            c = _color(gname, names)
            ax.plot(x, d["mean"], marker="o", color=c, lw=2.2, label=f"{gname} (mean of {int(d['size'].max())} seeds)")
            ax.fill_between(x, d["min"], d["max"], color=c, alpha=0.15, linewidth=0)
        fr = sorted(g["fraction"].unique())
        if len(fr) > 1 and fr[-1] / fr[0] >= 5:
            ax.set_xscale("log")
        ax.set_xticks([f * 100 for f in fr], [f"{f * 100:g}" for f in fr])
        ax.minorticks_off()
        ax.set_xlabel("labelled patients (%)")
        ax.set_ylabel(METRIC_LABELS.get(metric, metric))
        ax.set_title(proto)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle("Label efficiency (pooled out-of-fold, 95 % CI by patient bootstrap"
                 + ("; groups: seed mean, band = min-max over seeds)" if groups else ")"), fontsize=10)
    return fig


def fig_roc(preds: pd.DataFrame, inits: list[str]) -> Figure | None:
    from sklearn.metrics import roc_curve  # heavy: more than a second to import

    protos = list(dict.fromkeys(preds["protocol"]))
    fracs = sorted(preds["fraction"].unique())
    show = [fracs[0]] + ([fracs[-1]] if len(fracs) > 1 else [])
    fig = _figure(figsize=(3.6 * len(show), 3.4 * len(protos)), layout="constrained")
    axes = fig.subplots(len(protos), len(show), squeeze=False)
    for i, proto in enumerate(protos):
        for j, fr in enumerate(show):
            ax = axes[i][j]
            for init in inits:
                d = preds[(preds["protocol"] == proto) & (preds["fraction"] == fr) & (preds["init"] == init)]
                if len(d) and d["y_true"].nunique() == 2:
                    fpr, tpr, _ = roc_curve(d["y_true"], d["y_score"])
                    ax.plot(fpr, tpr, color=_color(init, inits), label=init)
            ax.plot([0, 1], [0, 1], ls=":", color="#aaa")
            ax.set_title(f"{proto}, {_frac(fr)} labels", fontsize=9)
            ax.set_xlabel("1 - specificity")
            ax.set_ylabel("sensitivity")
            ax.set_aspect("equal")
    axes[0][0].legend(fontsize=8, loc="lower right")
    return fig


def fig_confusion(preds: pd.DataFrame, task: str, classes: list[str], inits: list[str]) -> Figure | None:
    from sklearn.metrics import confusion_matrix  # heavy: more than a second to import

    protos = list(dict.fromkeys(preds["protocol"]))
    fracs = sorted(preds["fraction"].unique())
    fr = fracs[0]
    n = len(classes)
    fig = _figure(figsize=(2.6 * len(inits) + 0.5, 2.6 * len(protos) + 0.4), layout="constrained")
    axes = fig.subplots(len(protos), len(inits), squeeze=False)
    for i, proto in enumerate(protos):
        for j, init in enumerate(inits):
            ax = axes[i][j]
            d = preds[(preds["protocol"] == proto) & (preds["fraction"] == fr) & (preds["init"] == init)]
            if not len(d):
                ax.axis("off")
                continue
            cm = confusion_matrix(d["y_true"], d["y_pred"].astype(int), labels=list(range(n)))
            rown = cm / np.maximum(cm.sum(axis=1, keepdims=True), 1)
            ax.imshow(rown, cmap="Blues", vmin=0, vmax=1)
            for a in range(n):
                for b in range(n):
                    ax.text(b, a, str(cm[a, b]), ha="center", va="center", fontsize=7,
                            color="white" if rown[a, b] > 0.6 else "black")
            ticks = [c[:10] for c in classes]
            ax.set_xticks(range(n), ticks, fontsize=6, rotation=45)
            ax.set_yticks(range(n), ticks, fontsize=6)
            ax.set_title(f"{init} / {proto}", fontsize=8)
            ax.set_xlabel("predicted", fontsize=7)
            ax.set_ylabel("true", fontsize=7)
    fig.suptitle(f"Confusion matrices at {_frac(fr)} labels (counts; colour = row share)", fontsize=9)
    return fig


def fig_regression(preds: pd.DataFrame, inits: list[str]) -> Figure | None:
    protos = list(dict.fromkeys(preds["protocol"]))
    fr = sorted(preds["fraction"].unique())[-1]
    fig = _figure(figsize=(3.4 * len(protos), 3.4), layout="constrained")
    axes = fig.subplots(1, len(protos), squeeze=False)[0]
    for ax, proto in zip(axes, protos):
        for init in inits:
            d = preds[(preds["protocol"] == proto) & (preds["fraction"] == fr) & (preds["init"] == init)]
            ax.scatter(d["y_true"], d["y_score"], s=6, alpha=0.5, color=_color(init, inits), label=init)
        lo, hi = preds["y_true"].min(), preds["y_true"].max()
        ax.plot([lo, hi], [lo, hi], ls=":", color="#888")
        ax.set_xlabel("true")
        ax.set_ylabel("predicted")
        ax.set_title(f"{proto}, {_frac(fr)} labels", fontsize=9)
    axes[0].legend(fontsize=8)
    return fig


def fig_losses(histories: dict, inits: list[str]) -> Figure | None:
    if not histories:
        return None
    fracs = sorted({k.split("/")[0] for h in histories.values() for k in h}, key=float)
    fig = _figure(figsize=(3.8 * len(fracs), 3.2), layout="constrained")
    axes = fig.subplots(1, len(fracs), squeeze=False)[0]
    for ax, fr in zip(axes, fracs):
        for init in inits:
            runs = histories.get(init, {})
            key = next((k for k in sorted(runs) if k.split("/")[0] == fr), None)
            if key is None:
                continue
            tried = runs[key]
            best = max(tried, key=lambda t: t["val_score"] if np.isfinite(t["val_score"]) else -np.inf)
            h = best["history"]
            ep = [r["epoch"] for r in h]
            c = _color(init, inits)
            ax.plot(ep, [r["train_loss"] for r in h], color=c, label=f"{init} train")
            ax.plot(ep, [r["val_loss"] for r in h], color=c, ls="--", label=f"{init} val")
            ax.axvline(best["best_epoch"], color=c, ls=":", alpha=0.6)
        ax.set_title(f"fine-tune, {_frac(fr)} labels (fold {key.split('/')[1] if key else '?'})", fontsize=9)
        ax.set_xlabel("epoch")
        ax.set_ylabel("loss")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    return fig


def fig_froc(cands: pd.DataFrame, inits: list[str], points, fp_weight: float = 1.0) -> Figure | None:
    """FROC curves (candidate level) of the largest label fraction, one panel per protocol."""
    if cands is None or not len(cands):
        return None
    protos = list(dict.fromkeys(cands["protocol"]))
    fr = sorted(cands["fraction"].unique())[-1]
    lo, hi = min(points) / 2, max(points) * 2
    fig = _figure(figsize=(4.2 * len(protos), 3.4), layout="constrained")
    axes = fig.subplots(1, len(protos), squeeze=False)[0]
    for ax, proto in zip(axes, protos):
        for init in inits:
            d = cands[(cands["protocol"] == proto) & (cands["fraction"] == fr) & (cands["init"] == init)]
            if not len(d) or not d["y_true"].astype(bool).any():
                continue
            fps, sens = froc_curve(d["y_true"].to_numpy(), d["score"].to_numpy(float), d["scan_id"].to_numpy(),
                                   fp_weight)
            fine = np.geomspace(lo, hi, 200)
            ax.plot(fine, [_froc_at(fps, sens, v) for v in fine], color=_color(init, inits), label=init)
            ax.plot(points, [_froc_at(fps, sens, v) for v in points], "o", ms=3, color=_color(init, inits))
        ax.set_xscale("log", base=2)
        ax.set_xlim(lo, hi)
        ax.set_ylim(0, 1.02)
        ax.set_xticks(list(points), [_fps_label(p) for p in points])
        ax.minorticks_off()
        ax.set_xlabel("false positives per scan")
        ax.set_ylabel("sensitivity")
        ax.set_title(f"{proto}, {_frac(fr)} labels", fontsize=9)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8, loc="lower right")
    return fig


def _froc_at(fps: np.ndarray, sens: np.ndarray, r: float) -> float:
    """The FROC line at ``r`` FPs per scan (as :mod:`~radpretrain.evaluate.metrics` reads its points)."""
    i = int(np.sum(fps <= r)) - 1
    if i + 1 >= len(fps) or fps[i + 1] <= fps[i]:
        return float(sens[i])
    return float(sens[i] + (sens[i + 1] - sens[i]) * (r - fps[i]) / (fps[i + 1] - fps[i]))


def _fps_label(p: float) -> str:
    return f"1/{round(1 / p)}" if p < 1 else f"{p:g}"


def froc_table(froc: dict) -> tuple[list[str], list[list[str]]]:
    pts = froc["fps_per_scan"]
    head = ["protocol", "labels", "init", "CPM [95 % CI]"] + [f"{_fps_label(p)} FP/scan" for p in pts]
    rows = []
    for r in froc["rows"]:
        row = [r["protocol"], _frac(r["fraction"]), r["init"], f"{fmt(r['cpm'])} [{fmt(r['cpm_ci'][0])}, "
               f"{fmt(r['cpm_ci'][1])}]"]
        row += [f"{fmt(v, 2)} [{fmt(lo, 2)}, {fmt(hi, 2)}]"
                for v, lo, hi in zip(r["sensitivity"], r["ci_low"], r["ci_high"])]
        rows.append(row)
    return head, rows


def froc_note(froc: dict) -> str:
    r = froc["rows"][0] if froc["rows"] else {}
    return (f"Sensitivity at fixed false positives per scan (FROC, as LUNA16 reports it), {froc['level']}; "
            f"{r.get('n_candidates', 0)} candidates ({r.get('n_positives', 0)} positive) in {r.get('n_scans', 0)} "
            f"scans; CPM = mean of the seven points; 95 % CIs by bootstrap over patients. "
            f"{froc['fp_rule'][0].upper() + froc['fp_rule'][1:]} (fp_weight {froc['fp_weight']:.4g}).")


# -- text ---------------------------------------------------------------------------------

def verdicts(summary: dict) -> list[str]:
    """One sentence per (pretrained init, protocol, fraction) against scratch and ImageNet."""
    out = []
    metric = primary_metric(summary["task"])
    hib = HIGHER_IS_BETTER[metric]
    for r in summary.get("headline", []):
        if r["init"] in ("scratch", "imagenet") and r["init"] != "imagenet":
            continue
        parts = []
        for ref in ("scratch", "imagenet"):
            if r["init"] == ref or f"delta_vs_{ref}" not in r:
                continue
            d, (lo, hi), p = r[f"delta_vs_{ref}"], r[f"delta_vs_{ref}_ci"], r[f"p_vs_{ref}"]
            if not (np.isfinite(lo) and np.isfinite(hi)):
                word = "could not be compared with"
            elif (lo > 0) == hib and (lo > 0 or hi < 0):
                word = "was better than"
            elif lo > 0 or hi < 0:
                word = "was worse than"
            else:
                word = "was not distinguishable from"
            parts.append(f"{word} {ref} (Δ {d:+.3f}, 95 % CI {lo:+.3f} to {hi:+.3f}, p {fmt_p(p)})")
        if parts:
            out.append(f"{r['init']} / {r['protocol']} / {_frac(r['fraction'])} labels: "
                       f"{METRIC_LABELS.get(metric, metric)} {r['value']:.3f}; " + "; ".join(parts) + ".")
    return out


def _significance(lo, hi, hib: bool) -> str:
    if np.isfinite(lo) and np.isfinite(hi) and (lo > 0 or hi < 0):
        return "better" if (lo > 0) == hib else "worse"
    return ""


def group_verdicts(summary: dict) -> list[str]:
    """One sentence per init group, protocol and fraction: seed mean and spread, seed-mean Δ vs the references."""
    metric = primary_metric(summary["task"])
    hib = HIGHER_IS_BETTER[metric]
    words = {"better": "better than", "worse": "worse than", "": "not distinguishable from"}
    out = []
    for r in (summary.get("groups") or {}).get("rows", []):
        parts = []
        for ref, v in r["vs"].items():
            lo, hi = v["ci"]
            word = words[_significance(lo, hi, hib)] if np.isfinite(lo) else "could not be compared with"
            parts.append(f"seed mean {word} {ref} (Δ {v['delta']:+.3f}, 95 % CI {lo:+.3f} to {hi:+.3f}, "
                         f"p {fmt_p(v['p'])})")
        out.append(f"{r['group']} ({r['n_seeds']} seeds) / {r['protocol']} / {_frac(r['fraction'])} labels: "
                   f"{METRIC_LABELS.get(metric, metric)} mean {fmt(r['mean'])} (SD {fmt(r['sd'])}, "
                   f"range {fmt(r['min'])}–{fmt(r['max'])})" + ("; " + "; ".join(parts) if parts else "") + ".")
    return out


def group_table(summary: dict) -> tuple[list[str], list[list]] | None:
    """The init groups: seeds' mean, SD, min-max and own CIs, and the seed-mean Δ vs each reference."""
    g = summary.get("groups")
    if not g:
        return None
    metric = primary_metric(summary["task"])
    hib = HIGHER_IS_BETTER[metric]
    label = METRIC_LABELS.get(metric, metric)
    refs = [r for r in ("scratch", "imagenet") if r in summary.get("inits", {})]
    names = {"scratch": "scratch", "imagenet": "ImageNet"}
    head = ["protocol", "labels", "group", "seeds", f"{label} mean", "SD", "min–max", "each seed [95 % CI]"]
    for ref in refs:
        head += [f"seed-mean Δ vs {names[ref]} [CI]", "p"]
    rows = []
    for r in g["rows"]:
        row = [r["protocol"], _frac(r["fraction"]), r["group"], str(r["n_seeds"]), fmt(r["mean"]), fmt(r["sd"]),
               f"{fmt(r['min'])}–{fmt(r['max'])}",
               "; ".join(f"{fmt(x['value'])} [{fmt(x['ci_low'])}, {fmt(x['ci_high'])}]" for x in r["seeds"])]
        for ref in refs:
            v = r["vs"].get(ref)
            if v is None:
                row += ["–", "–"]
                continue
            lo, hi = v["ci"]
            row += [(_significance(lo, hi, hib), f"{v['delta']:+.3f} [{lo:+.3f}, {hi:+.3f}]"), fmt_p(v["p"])]
        rows.append(row)
    return head, rows


GROUP_NOTE = ("Several pretraining runs of one recipe (seeds), each evaluated as its own init on the same folds. "
              "Mean, SD and min–max are over the seeds' pooled out-of-fold values, beside each seed's own 95 % CI "
              "(patient bootstrap). The seed-mean Δ averages the seeds' paired differences with the reference; its "
              "95 % CI and p come from one patient bootstrap shared by every seed and the reference (each resample "
              "scores all of them), so it carries the test-set uncertainty of the average, not the spread between "
              "seeds: read it beside the SD and the range.")


def runs_table(summary: dict, markdown: bool = False) -> tuple[list[str], list[list]] | None:
    """The pretraining runs compared: method, compute spent and a relative link to the run's ``report.html``."""
    head = ["init", "group", "method", "steps", "images seen", "pretraining time", "device", "run report"]
    rows = []
    for name, v in summary.get("inits", {}).items():
        if v.get("kind") != "run":
            continue
        c = v.get("compute") or {}
        rep = v.get("run_report")
        if rep:
            rep = f"[report.html]({rep})" if markdown else link(rep, "report.html")
        rows.append([name, v.get("group") or "–", v.get("method") or "–", count(c.get("steps")),
                     count(c.get("images_seen")), duration(c.get("wall_seconds")),
                     (c.get("device") or {}).get("name", "–"), rep or "–"])
    return (head, rows) if rows else None


def headline_table(summary: dict) -> tuple[list[str], list[list[str]]]:
    metric = primary_metric(summary["task"])
    hib = HIGHER_IS_BETTER[metric]
    refs = [r for r in ("scratch", "imagenet") if r in summary.get("inits", {})]
    names = {"scratch": "scratch", "imagenet": "ImageNet"}
    head = ["protocol", "labels", "init", f"{METRIC_LABELS.get(metric, metric)} [95 % CI]"]
    for ref in refs:
        head += [f"Δ vs {names[ref]} [CI]", "p"]
    if summary["task"] == "binary":
        head += [f"DeLong p vs {names[ref]}" for ref in refs]
    rows = []
    for r in summary.get("headline", []):
        row = [r["protocol"], _frac(r["fraction"]), r["init"],
               f"{fmt(r['value'])} [{fmt(r['ci_low'])}, {fmt(r['ci_high'])}]"]
        for ref in refs:
            if f"delta_vs_{ref}" in r:
                lo, hi = r[f"delta_vs_{ref}_ci"]
                sig = ""
                if np.isfinite(lo) and (lo > 0 or hi < 0):
                    sig = "better" if (lo > 0) == hib else "worse"
                row += [(sig, f"{r[f'delta_vs_{ref}']:+.3f} [{lo:+.3f}, {hi:+.3f}]"), fmt_p(r[f"p_vs_{ref}"])]
            else:
                row += ["–", "–"]
        if summary["task"] == "binary":
            row += [fmt_p(r.get(f"delong_p_vs_{ref}", np.nan)) for ref in refs]
        rows.append(row)
    return head, rows


def _device_text(d: dict | None) -> str:
    """The setup row of the device features and fine-tuning ran on (runs before it was recorded: the CPU)."""
    if not d:
        return "CPU (not recorded)"
    where = f"{d.get('type')}" + (f":{d['index']}" if d.get("index") is not None else "")
    text = f"{where} ({d.get('name')}), {d.get('precision')}, AdamW {d.get('adamw')}"
    if d.get("images"):
        text += f", images fed: {d['images']}"
    if d.get("requested") not in (None, where):
        text += f" (requested: --device {d['requested']})"
    return text


def setup_items(summary: dict) -> list[tuple[str, str]]:
    s = summary
    sp = s["splits"]
    c = s["counts"]
    items = [
        ("target", f"{s['target'].get('expression')} ({s['task']}; classes: {', '.join(s['classes']) or 'numeric'})"),
        ("data", f"{c['images']} labelled images of {c['patients']} patients "
                 f"({c['unlabelled_images_skipped']} images without a value skipped)"
                 + (f"; per class: {json.dumps(c['per_class'])}" if c.get("per_class") else "")),
        ("splits", f"{sp['folds']} patient-grouped folds from {sp['source']}; {sp['evaluated_folds']} evaluated; "
                   f"test = fold k, val = {sp.get('val', 0.1) * 100:g} % of the other folds' patients, train = the rest; "
                   f"label fractions "
                   f"{', '.join(_frac(f) for f in sp['fractions'])} of patients (nested, stratified), "
                   f"validation labels: {sp['val_fraction']}"),
        ("leakage check", ("passed: no patient in more than one of train/val/test in any of "
                           f"{sp['leakage_check']['checked_sets']} fold/fraction sets")
         if sp["leakage_check"].get("ok") else "FAILED"),
        ("backbone / input", f"{s['backbone']}, {s['image_size']} px letterbox, grey input ({s['options'].get('grey')})"),
        ("inits", "; ".join(f"{k}: {v.get('kind')} (mean {np.round(v.get('mean'), 4).tolist()}, "
                            f"std {np.round(v.get('std'), 4).tolist()} from {v.get('stats')})"
                            for k, v in s["inits"].items())),
        ("protocols", ", ".join(s["protocols"]) + "; hyper-parameters chosen on validation only"),
        ("statistics", f"95 % CIs: percentile bootstrap over patients ({s['options'].get('n_boot')} resamples); "
                       "Δ: paired bootstrap over patients; DeLong: image-level, binary AUC"),
        ("seed / class balance / CPU threads", f"{s['seed']} / {s['balance']} / {s.get('torch_threads', 'not recorded')}"),
        ("device", _device_text(s.get("device"))),
        ("versions", ", ".join(f"{k} {v}" for k, v in s["versions"].items() if v != "not installed")),
        ("run time", f"{s.get('seconds', 0):.0f} s"),
    ]
    return items


def _all_metrics_table(results: pd.DataFrame) -> tuple[list[str], list[list[str]]]:
    pooled = results[results["fold"] == "pooled"]
    metrics = list(dict.fromkeys(pooled["metric"]))
    head = ["protocol", "labels", "init"] + [METRIC_LABELS.get(m, m) for m in metrics]
    rows = []
    for (proto, frac, init), g in pooled.groupby(["protocol", "fraction", "init"], sort=False):
        row = [proto, _frac(frac), init]
        for m in metrics:
            d = g[g["metric"] == m]
            row.append(f"{fmt(d['value'].iloc[0])} [{fmt(d['ci_low'].iloc[0])}, {fmt(d['ci_high'].iloc[0])}]"
                       if len(d) else "–")
        rows.append(row)
    return head, rows


def _fold_table(results: pd.DataFrame, metric: str) -> tuple[list[str], list[list[str]]]:
    d = results[(results["fold"] != "pooled") & (results["metric"] == metric)]
    folds = sorted(d["fold"].unique(), key=int)
    head = ["protocol", "labels", "init"] + [f"fold {f}" for f in folds] + ["mean ± sd"]
    rows = []
    for (proto, frac, init), g in d.groupby(["protocol", "fraction", "init"], sort=False):
        vals = [g[g["fold"] == f]["value"] for f in folds]
        vs = [float(v.iloc[0]) if len(v) else np.nan for v in vals]
        arr = np.array([v for v in vs if np.isfinite(v)])
        rows.append([proto, _frac(frac), init] + [fmt(v) for v in vs]
                    + [f"{arr.mean():.3f} ± {arr.std(ddof=1) if len(arr) > 1 else 0:.3f}" if len(arr) else "–"])
    return head, rows


def write_report(out_dir: str | Path) -> tuple[Path, Path]:
    """Write ``report.html`` and ``report.md`` (+ ``figures/``) for an evaluate output folder."""
    out = Path(out_dir)
    summary = read_json(out / "summary.json")
    results = pd.read_csv(out / "results.csv", dtype={"fold": str})
    preds = pd.read_parquet(out / "predictions.parquet")
    hist_path = out / "finetune_history.json"
    histories = read_json(hist_path) if hist_path.is_file() else {}
    task, classes = summary["task"], summary["classes"]
    metric = primary_metric(task)
    inits = list(summary["inits"])

    groups = (summary.get("groups") or {}).get("members", {})

    figs: list[tuple[str, str, Figure | None]] = [
        ("label_efficiency", "Label-efficiency curves", fig_label_efficiency(results, metric, inits, groups))]
    if task == "binary":
        figs.append(("roc", "ROC curves (pooled out-of-fold)", fig_roc(preds, inits)))
    if task in ("binary", "multiclass"):
        figs.append(("confusion", "Confusion matrices", fig_confusion(preds, task, classes, inits)))
    else:
        figs.append(("regression", "Predicted vs true", fig_regression(preds, inits)))
    froc = summary.get("froc")
    if froc:
        froc_path = out / "froc_predictions.parquet"
        cands = pd.read_parquet(froc_path) if froc_path.is_file() else None
        figs.append(("froc", "FROC curves (candidate level, largest label fraction)",
                     fig_froc(cands, inits, froc["fps_per_scan"], froc["fp_weight"])))
    figs.append(("finetune_loss", "Fine-tuning loss curves (chosen learning rate; dotted: epoch kept)",
                 fig_losses(histories, inits)))
    fig_dir = out / "figures"
    fig_dir.mkdir(exist_ok=True)
    rendered = []
    for key, title, fig in figs:
        if fig is None:
            continue
        data = png_bytes(fig)
        (fig_dir / f"{key}.png").write_bytes(data)
        rendered.append((key, title, data))

    head, rows = headline_table(summary)
    ahead, arows = _all_metrics_table(results)
    fhead, frows = _fold_table(results, metric)
    verdict = verdicts(summary) + group_verdicts(summary)
    gtable = group_table(summary)
    title = f"radpretrain evaluate: {summary['target'].get('expression')}"

    parts = [f"<p class='small'>{html.escape(summary['task'])} task, {summary['counts']['images']} images of "
             f"{summary['counts']['patients']} patients, inits: {html.escape(', '.join(inits))}; "
             f"headline metric: {html.escape(METRIC_LABELS.get(metric, metric))}</p>"]
    if verdict:
        parts.append("<div class='verdict'><b>At a glance</b><ul>"
                     + "".join(f"<li>{html.escape(v)}</li>" for v in verdict) + "</ul></div>")
    parts.append("<h2>Headline results</h2><p class='small'>Pooled out-of-fold predictions. Green/red: the 95 % "
                 "CI of the difference excludes 0.</p>" + html_table(head, rows))
    if gtable:
        parts.append("<h2>Init groups: several pretraining seeds of one recipe</h2>"
                     f"<p class='small'>{html.escape(GROUP_NOTE)}</p>" + html_table(*gtable))
    runs = runs_table(summary)
    if runs:
        parts.append("<h2>Pretraining runs compared</h2><p class='small'>Compute spent as the run recorded it "
                     "(compute.json); each run's own report (loss curves, previews, config, data) is linked "
                     "where the run folder has one.</p>" + html_table(*runs, left=3))
    if froc:
        parts.append("<h2>FROC: sensitivity at fixed false positives per scan</h2>"
                     f"<p class='small'>{html.escape(froc_note(froc))}</p>" + html_table(*froc_table(froc)))
    for key, t, data in rendered:
        parts.append(f"<h2>{html.escape(t)}</h2>" + img(data, key))
    parts.append("<h2>All metrics</h2>" + html_table(ahead, arows))
    parts.append(f"<h2>Per fold ({html.escape(METRIC_LABELS.get(metric, metric))})</h2>" + html_table(fhead, frows))
    parts.append("<h2>Setup</h2>" + kv_table(setup_items(summary)))
    parts.append("<p class='small'>Exact image ids per fold and fraction: splits_used.parquet; predictions: "
                 "predictions.parquet; tidy numbers: results.csv, comparisons.csv"
                 + (", groups.csv" if gtable else "") + ".</p>")
    html_path = out / "report.html"
    html_path.write_text(page(title, parts), encoding="utf-8")

    md = [f"# {title}", ""]
    if verdict:
        md += ["**At a glance**", ""] + [f"- {v}" for v in verdict] + [""]
    md += ["## Headline results", "", md_table(head, rows), ""]
    if gtable:
        md += ["## Init groups: several pretraining seeds of one recipe", "", GROUP_NOTE, "", md_table(*gtable), ""]
    runs_md = runs_table(summary, markdown=True)
    if runs_md:
        md += ["## Pretraining runs compared", "", md_table(*runs_md), ""]
    if froc:
        md += ["## FROC: sensitivity at fixed false positives per scan", "", froc_note(froc), "",
               md_table(*froc_table(froc)), ""]
    for key, t, _ in rendered:
        md += [f"## {t}", "", f"![{key}](figures/{key}.png)", ""]
    md += ["## All metrics", "", md_table(ahead, arows), "", f"## Per fold ({METRIC_LABELS.get(metric, metric)})", "",
           md_table(fhead, frows), "", "## Setup", ""]
    md += [f"- **{k}**: {v}" for k, v in setup_items(summary)]
    md_path = out / "report.md"
    md_path.write_text("\n".join(md) + "\n", encoding="utf-8")
    return html_path, md_path
