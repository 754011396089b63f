"""``radpretrain evaluate``: compare encoder inits on a labelled task, with CIs and paired tests.

Example::

    radpretrain evaluate --data DATASET --target lesion --init scratch --init imagenet \\
        --init runs/mae1 --protocol linear --protocol finetune --label-fractions 0.01,0.1,1 \\
        --out eval/lesion finetune.epochs=5

Writes into ``--out``: ``results.csv`` (tidy: init, protocol, fraction, fold, metric,
value, ci_low, ci_high), ``comparisons.csv`` (paired tests), ``summary.json``,
``predictions.parquet``, ``splits_used.parquet``, ``finetune_history.json``,
``report.html`` (self-contained) and ``report.md``.  See docs/report.md.
"""

from __future__ import annotations

import argparse
import json
import re
import time
from pathlib import Path

import numpy as np
import pandas as pd

from radpretrain.errors import UserError
from radpretrain.evaluate.options import parse_options
from radpretrain.utils import get_logger

log = get_logger("evaluate")

PROTOCOLS = ("linear", "knn", "finetune")
FORBIDDEN_TARGETS = {"source", "image_id", "patient_id", "study_id", "series_id", "content_hash", "shard",
                     "offset", "status", "reason", "candidate_id", "scan_id"}
MISSING_STRINGS = {"", "unknown", "nan", "none", "na", "n/a"}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", required=True, help="dataset store folder (radpretrain ingest)")
    p.add_argument("--target", required=True,
                   help="label column or manifest field (body_part, age_years, sex, view); "
                        "a threshold such as 'label>=2' makes a binary target")
    p.add_argument("--init", action="append", required=True, metavar="INIT",
                   help="scratch | imagenet | RUN_OR_EXPORT folder | state_dict:PATH[:ARCH]; repeat to compare")
    p.add_argument("--protocol", action="append", choices=PROTOCOLS, help="linear | knn | finetune; repeatable "
                   "(default: linear)")
    p.add_argument("--label-fractions", default="0.01,0.1,1.0", help="comma-separated fractions of labelled patients")
    p.add_argument("--folds", type=int, default=None,
                   help="cross-validation folds (default: those of splits.parquet, else 5); fewer than the "
                        "file has evaluates only the first ones")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--backbone", default="tf_efficientnet_lite0", help="timm backbone for scratch/imagenet/state_dict")
    p.add_argument("--image-size", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--task", choices=("auto", "binary", "multiclass", "regression"), default="auto")
    p.add_argument("--positive", default=None, help="the positive class of a binary target (default: the larger value)")
    p.add_argument("--balance", choices=("none", "weights", "sampler"), default="none",
                   help="class imbalance: class-weighted loss, or balanced sampling (finetune)")
    p.add_argument("--quiet-report", action="store_true", help="skip report.html / report.md")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="options, e.g. finetune.epochs=5 finetune.lr_sweep=[1e-3,1e-4] finetune.warmup_epochs=2 "
                        "linear.pool=[mean,cls,flat] knn.k=[5,20] val_fraction=full grey=replicate n_boot=2000 "
                        "state_dict.strip_prefix=module. state_dict.rename='^stem=>conv_stem'")


# -- target ---------------------------------------------------------------------------

_THRESH = re.compile(r"^\s*([A-Za-z_][A-Za-z0-9_]*)\s*(>=|<=|==|!=|>|<)\s*(.+?)\s*$")


def resolve_target(images: pd.DataFrame, target: str, task: str, positive: str | None):
    """Return ``(mask, y, classes, task, info)`` for the labelled images.

    ``y`` holds class indices (``classes[y]`` is the original value) or floats.
    """
    m = _THRESH.match(target)
    column = m.group(1) if m else target.strip()
    if column in FORBIDDEN_TARGETS:
        raise UserError(f"--target {target}: {column!r} is an identifier/bookkeeping column, not a label")
    if column not in images.columns:
        label_cols = [c for c in images.columns if c not in FORBIDDEN_TARGETS]
        raise UserError(f"--target {target}: the manifest has no column {column!r} (usable: {', '.join(label_cols)})")
    col = images[column]
    if pd.api.types.is_numeric_dtype(col) and not pd.api.types.is_bool_dtype(col):
        mask = col.notna().to_numpy()
    else:
        mask = ~col.astype(str).str.strip().str.lower().isin(MISSING_STRINGS).to_numpy() & col.notna().to_numpy()
    vals = col[mask]
    info = {"column": column, "expression": target}
    if m:
        op, rhs = m.group(2), m.group(3)
        try:
            thr = float(rhs)
            v = pd.to_numeric(vals, errors="raise").to_numpy(float)
        except (ValueError, TypeError):
            if op not in ("==", "!="):
                raise UserError(f"--target {target}: {column} is not numeric; only == and != work on text") from None
            thr, v = rhs.strip("'\""), vals.astype(str).to_numpy()
        ops = {">=": np.greater_equal, "<=": np.less_equal, ">": np.greater, "<": np.less,
               "==": np.equal, "!=": np.not_equal}
        yb = ops[op](v, thr).astype(int)
        if task not in ("auto", "binary"):
            raise UserError(f"--target {target}: a threshold target is binary, not {task}")
        return mask, yb, [f"not {target}", target], "binary", info
    numeric = pd.api.types.is_numeric_dtype(col) and not pd.api.types.is_bool_dtype(col)
    uniq = pd.unique(vals)
    if task == "auto":
        if numeric and (len(uniq) > 10 or not np.allclose(vals.to_numpy(float), np.round(vals.to_numpy(float)))):
            task = "regression"
        elif len(uniq) == 2:
            task = "binary"
        elif len(uniq) < 2:
            raise UserError(f"--target {target}: only one value ({uniq[0] if len(uniq) else 'none'}) among labelled images")
        else:
            task = "multiclass"
        info["task_detected"] = task
    if task == "regression":
        if not numeric:
            raise UserError(f"--target {target}: regression needs a numeric column")
        return mask, vals.to_numpy(float), [], task, info
    classes = sorted(uniq.tolist(), key=lambda x: (str(type(x)), x))
    if task == "binary":
        if len(classes) != 2:
            raise UserError(f"--target {target}: binary task but {len(classes)} values {classes[:6]}; "
                            "use a threshold such as 'label>=2' or --task multiclass")
        if positive is not None:
            hits = [c for c in classes if str(c) == str(positive)]
            if not hits:
                raise UserError(f"--positive {positive}: not one of {classes}")
            classes = [c for c in classes if c is not hits[0]] + hits
    if len(classes) > 50:
        raise UserError(f"--target {target}: {len(classes)} classes; a numeric target may need --task regression")
    lookup = {c: i for i, c in enumerate(classes)}
    y = np.array([lookup[v] for v in vals.tolist()], dtype=int)
    return mask, y, [str(c) for c in classes], task, info


# -- options ----------------------------------------------------------------------------

def _pools(v) -> list[str]:
    if isinstance(v, (list, tuple)):
        return [str(x) for x in v]
    return [p.strip() for p in str(v).split(",") if p.strip()]


def _fractions(text: str) -> list[float]:
    try:
        fr = sorted({float(x) for x in str(text).split(",") if x.strip()})
    except ValueError:
        raise UserError(f"--label-fractions {text}: expected numbers such as 0.01,0.1,1.0") from None
    if not fr or any(f <= 0 or f > 1 for f in fr):
        raise UserError(f"--label-fractions {text}: fractions must lie in (0, 1]")
    return fr


def load_images(store, rows: np.ndarray, image_size: int):
    """Letterboxed ``uint8`` images [N, 1, S, S] of store rows (one pass, kept in memory)."""
    import torch
    from radpretrain.data.dataset import StoreDataset

    ds = StoreDataset(store, indices=rows, image_size=image_size, resize="letterbox")
    out = torch.empty((len(ds), 1, image_size, image_size), dtype=torch.uint8)
    for i in range(len(ds)):
        out[i] = (ds[i]["image"] * 255).round_().to(torch.uint8)
    return out


# -- main -------------------------------------------------------------------------------

def run(args) -> int:
    import torch

    from radpretrain.data.store import Store
    from radpretrain.evaluate import folds as F
    from radpretrain.evaluate import inits as I
    from radpretrain.evaluate import protocols as P
    from radpretrain.evaluate.results import froc_outputs, summarise
    from radpretrain.utils import package_versions, write_json

    t_start = time.time()
    opts = parse_options(args.overrides or [])
    fractions = _fractions(args.label_fractions)
    protocols = list(dict.fromkeys(args.protocol or ["linear"]))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.image_size < 16:
        raise UserError(f"--image-size {args.image_size}: too small (at least 16)")

    store = Store(args.data)
    images = store.images
    mask, y, classes, task, tinfo = resolve_target(images, args.target, args.task, args.positive)
    rows = np.flatnonzero(mask)
    if len(rows) < 10:
        raise UserError(f"{args.data}: only {len(rows)} images have a value for {args.target}; need at least 10")
    table = images.iloc[rows][["image_id", "patient_id"]].reset_index(drop=True)
    table["row"] = rows
    table["y"] = y
    splits_df, sinfo = F.load_or_make_splits(store, tinfo["column"], args.folds, args.seed)
    if sinfo["source"] != "splits.parquet":
        splits_df.to_parquet(out / "splits_computed.parquet", index=False)
    n_folds = sinfo["folds"]
    n_eval = min(args.folds or n_folds, n_folds)
    y = table["y"].to_numpy()
    sets = F.fold_sets(table, splits_df, fractions, n_eval, sinfo["val"], opts["val_fraction"])
    if not sets:
        raise UserError(f"{args.data}: no labelled image has a fold in splits.parquet; rerun 'radpretrain split'")
    tested = np.unique(np.concatenate([s.test for s in sets]))
    sinfo["labelled_images_not_tested"] = int(len(table) - len(tested)) if n_eval == n_folds else None
    leak = F.leakage_check(table, sets)
    used = F.splits_table(table, sets)
    used.to_parquet(out / "splits_used.parquet", index=False)

    inits = I.unique_names([I.parse_init(s) for s in args.init])
    log.info("task %s on %s: %d labelled images, %d patients, %d folds (evaluating %d), fractions %s, inits %s",
             task, args.target, len(table), table["patient_id"].nunique(), n_folds, n_eval, fractions,
             [s.name for s in inits])

    torch.manual_seed(args.seed)
    imgs = load_images(store, table["row"].to_numpy(), args.image_size)
    f = imgs.float() / 255
    store_stats = (float(f.mean()), float(f.std()))
    del f
    n_classes = len(classes) if task != "regression" else 0
    init_opts = {"grey": opts["grey"], "seed": args.seed,
                 **{f"state_dict.{k}": v for k, v in opts["state_dict"].items() if v is not None}}

    # protocol variants: linear/knn with each requested token pooling
    variants = []
    for proto in protocols:
        if proto == "finetune":
            variants.append(("finetune", "finetune", None))
        else:
            pools = _pools(opts[proto]["pool"])
            for pool in pools:
                name = proto if pool == "default" and len(pools) == 1 else f"{proto}-{pool}"
                variants.append((name, proto, pool))

    pred_frames, fold_info, histories, init_meta = [], [], {}, {}
    feat_dir = out / "features"
    for spec in inits:
        built = I.build_init(spec, args.backbone, args.image_size, store_stats, init_opts)
        init_meta[spec.name] = {"kind": spec.kind, **{k: v for k, v in built.meta.items()}}
        feats = {}
        for name, proto, pool in variants:
            t0 = time.time()
            if proto in ("linear", "knn") and pool not in feats:
                ident = {"kind": spec.kind, "path": spec.path, "arch": spec.arch, "backbone": args.backbone,
                         "grey": opts["grey"], "seed": args.seed, "mtime": _mtime(spec.path),
                         "mean": built.meta.get("mean"), "std": built.meta.get("std")}
                feats[pool] = _cached_features(feat_dir, spec.name, pool, built.encoder, imgs, table,
                                               args.image_size, opts["batch_size"], ident)
            for s in sets:
                yt = y[s.train]
                if task != "regression" and len(np.unique(yt)) < 2:
                    log.warning("skip %s/%s fold %d fraction %g: the labelled training subset has one class",
                                spec.name, name, s.fold, s.fraction)
                    fold_info.append({"init": spec.name, "protocol": name, "fold": s.fold, "fraction": s.fraction,
                                      "skipped": "single class in train", "n_train": len(s.train)})
                    continue
                if proto == "finetune":
                    def make_encoder(spec=spec):
                        return I.build_init(spec, args.backbone, args.image_size, store_stats, init_opts).encoder
                    res = P.finetune(make_encoder, task, n_classes, imgs, y, s.train, s.val, s.test,
                                     opts["finetune"], args.balance, args.seed)
                    histories.setdefault(spec.name, {})[f"{s.fraction:g}/{s.fold}"] = res.chosen["tried"]
                    chosen = {k: v for k, v in res.chosen.items() if k != "tried"}
                else:
                    X = feats[pool]
                    fn = P.linear_probe if proto == "linear" else P.knn_probe
                    res = fn(task, n_classes, X[s.train], y[s.train], X[s.val], y[s.val], X[s.test],
                             {k: v for k, v in opts[proto].items() if k != "pool"}, args.balance, args.seed)
                    chosen = res.chosen
                pred_frames.append(_pred_frame(table, s, spec.name, name, task, res.test_scores))
                fold_info.append({"init": spec.name, "protocol": name, "fold": s.fold, "fraction": s.fraction,
                                  "n_train": len(s.train), "n_val": len(s.val), "n_test": len(s.test),
                                  "seconds": round(res.seconds, 2), **{f"chosen_{k}": v for k, v in chosen.items()}})
            log.info("%s / %s done in %.1f s", spec.name, name, time.time() - t0)
        del built
    if not pred_frames:
        raise UserError("no fold could be evaluated (every labelled training subset had a single class); "
                        "use larger --label-fractions")
    preds = pd.concat(pred_frames, ignore_index=True)
    preds.to_parquet(out / "predictions.parquet", index=False)
    pd.DataFrame(fold_info).to_csv(out / "folds.csv", index=False)
    write_json(out / "finetune_history.json", histories)

    results, comparisons = summarise(preds, task, n_boot=int(opts["n_boot"]), seed=args.seed)
    results.to_csv(out / "results.csv", index=False)
    comparisons.to_csv(out / "comparisons.csv", index=False)
    froc = froc_outputs(out, preds, images, store.meta, task, n_boot=int(opts["n_boot"]), seed=args.seed)
    counts = {"images": int(len(table)), "patients": int(table["patient_id"].nunique()),
              "images_in_store": int(len(images)), "unlabelled_images_skipped": int((~mask).sum())}
    if task != "regression":
        counts["per_class"] = {classes[i]: int((y == i).sum()) for i in range(len(classes))}
    summary = {
        "command": "radpretrain evaluate",
        "target": tinfo, "task": task, "classes": classes, "counts": counts,
        "splits": {**sinfo, "evaluated_folds": n_eval, "fractions": fractions, "val_fraction": opts["val_fraction"],
                   "leakage_check": leak, "sizes": _sizes(sets)},
        "inits": init_meta, "protocols": [v[0] for v in variants], "backbone": args.backbone,
        "image_size": args.image_size, "seed": args.seed, "balance": args.balance, "options": opts,
        "store_stats": {"mean": store_stats[0], "std": store_stats[1]},
        "headline": _headline(results, comparisons, task),
        "versions": package_versions(), "seconds": round(time.time() - t_start, 1),
        # the summation order (and so the last digits, which can tip a probe) depends on it
        "torch_threads": torch.get_num_threads(),
    }
    if froc is not None:  # a candidate-patch store (radpretrain patches): sensitivity at FPs per scan
        summary["froc"] = froc
    write_json(out / "summary.json", summary)
    if not args.quiet_report:
        from radpretrain.evaluate.report import write_report

        paths = write_report(out)
        log.info("report: %s", paths[0])
    printed = {"out": str(out), "task": task, "headline": summary["headline"]}
    if froc is not None:
        printed["froc"] = [{k: r[k] for k in ("init", "protocol", "fraction", "cpm", "cpm_ci", "sensitivity")}
                           for r in froc["rows"]]
    print(json.dumps(printed, default=float))
    return 0


def _sizes(sets) -> list[dict]:
    return [{"fold": s.fold, "fraction": s.fraction, "train": int(len(s.train)), "val": int(len(s.val)),
             "test": int(len(s.test))} for s in sets]


def _mtime(path) -> float | None:
    """Modification time of an init's weights (so a retrained run never reuses stale features)."""
    if not path:
        return None
    p = Path(path)
    files = [p] if p.is_file() else [q for q in (p / "encoder.safetensors", p / "model.safetensors") if q.is_file()]
    return max((q.stat().st_mtime for q in files), default=None)


def _cached_features(feat_dir: Path, init: str, pool: str, encoder, imgs, table, image_size: int, bs: int,
                     ident: dict | None = None):
    """Features of every labelled image for one init, computed once and kept in ``features/``."""
    from radpretrain.evaluate.protocols import extract_features
    from radpretrain.utils import read_json, write_json

    feat_dir.mkdir(parents=True, exist_ok=True)
    path = feat_dir / f"{init}-{pool}.npy"
    key_path = path.with_suffix(".json")
    key = {"n": int(len(table)), "image_size": int(image_size), "ids_head": table["image_id"].head(5).tolist(),
           "ids_hash": _ids_hash(table["image_id"]), "init": json.loads(json.dumps(ident or {}, default=str))}
    if path.is_file() and key_path.is_file() and read_json(key_path) == key:
        try:  # never unpickled (allow_pickle=False): an object array or a damaged file is recomputed
            X = np.load(path, allow_pickle=False)
            if X.ndim == 2 and len(X) == len(table) and X.dtype.kind == "f":
                return X
            log.warning("%s: not a features array for these images; recomputing", path)
        except (ValueError, OSError, EOFError) as e:
            log.warning("%s: unreadable features cache (%s); recomputing", path, str(e).splitlines()[0][:120])
    t0 = time.time()
    X = extract_features(encoder, imgs, pool=pool, batch_size=bs)
    np.save(path, X)
    write_json(key_path, key)
    log.info("features %s/%s: %s in %.1f s", init, pool, X.shape, time.time() - t0)
    return X


def _ids_hash(ids) -> str:
    import hashlib

    return hashlib.sha256("\n".join(map(str, ids)).encode()).hexdigest()[:16]


def _pred_frame(table, s, init, protocol, task, scores) -> pd.DataFrame:
    te = s.test
    df = pd.DataFrame({"image_id": table["image_id"].to_numpy()[te], "patient_id": table["patient_id"].to_numpy()[te],
                       "fold": s.fold, "fraction": s.fraction, "init": init, "protocol": protocol,
                       "y_true": table["y"].to_numpy()[te]})
    scores = np.asarray(scores)
    if task == "multiclass":
        df["y_score"] = scores.max(axis=1)
        df["y_pred"] = scores.argmax(axis=1)
        df["proba"] = list(scores.astype(np.float32))
    else:
        df["y_score"] = scores.astype(float)
        df["y_pred"] = (scores >= 0.5).astype(int) if task == "binary" else scores.astype(float)
    return df


def _headline(results: pd.DataFrame, comparisons: pd.DataFrame, task: str) -> list[dict]:
    from radpretrain.evaluate.metrics import primary_metric

    m = primary_metric(task)
    pooled = results[(results["fold"] == "pooled") & (results["metric"] == m)]
    rows = []
    for _, r in pooled.iterrows():
        row = {"init": r["init"], "protocol": r["protocol"], "fraction": r["fraction"], "metric": m,
               "value": r["value"], "ci_low": r["ci_low"], "ci_high": r["ci_high"]}
        for ref in ("scratch", "imagenet"):
            c = comparisons[(comparisons["init"] == r["init"]) & (comparisons["reference"] == ref)
                            & (comparisons["protocol"] == r["protocol"]) & (comparisons["fraction"] == r["fraction"])
                            & (comparisons["metric"] == m)]
            if len(c):
                c = c.iloc[0]
                row[f"delta_vs_{ref}"] = c["delta"]
                row[f"delta_vs_{ref}_ci"] = [c["ci_low"], c["ci_high"]]
                row[f"p_vs_{ref}"] = c["p"]
                if "delong_p" in c and pd.notna(c["delong_p"]):
                    row[f"delong_p_vs_{ref}"] = c["delong_p"]
        rows.append(row)
    return rows
