"""``radpretrain.evaluate.evaluate(...)``: the whole comparison, callable from Python.

``radpretrain evaluate`` (:mod:`~radpretrain.evaluate.cli`) only maps its flags onto this
function.  One call:

1. resolves the target (:mod:`~.target`), the patient-grouped folds and nested label fractions
   (:mod:`~.folds`, leakage check), and writes ``splits_used.parquet``;
2. reads the labelled images once (:func:`~.features.load_images`) and serves them to the device
   (:class:`~.device.ImageFeeder`);
3. for every init (:mod:`~.inits`): frozen features per token pooling (cached in ``features/``),
   then every cell protocol x fold x fraction through the protocol registry
   (:data:`~.protocols.PROTOCOLS`, one :class:`~.protocols.FoldData` per cell), with a progress
   bar and one log line per cell (:mod:`~.progress`);
4. pools the out-of-fold predictions into results, paired comparisons, FROC for patch stores
   (:mod:`~.results`), ``summary.json`` and the report (:mod:`~.report`).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd
import torch

from radpretrain.data.store import Store
from radpretrain.errors import UserError
from radpretrain.evaluate.folds import FoldSet, fold_sets, leakage_check, load_or_make_splits, splits_table
from radpretrain.evaluate.inits import BuiltInit, InitSpec, build_init, init_groups, parse_inits, unique_names
from radpretrain.evaluate.device import ImageFeeder, Runtime, resolve_device
from radpretrain.evaluate.features import cached_features, load_images, weights_mtime
from radpretrain.evaluate.metrics import metric_value, primary_metric
from radpretrain.evaluate.options import parse_options
from radpretrain.evaluate.progress import bar, cell_progress
from radpretrain.evaluate.protocols import FoldData, Protocol, get_protocol
from radpretrain.evaluate.report import write_report
from radpretrain.evaluate.results import GROUPS_FILE, froc_outputs, group_records, group_summary, summarise
from radpretrain.evaluate.target import parse_fractions, resolve_target
from radpretrain.utils import COMPUTE_FILE, get_logger, package_versions, read_json, write_json

log = get_logger("evaluate")

TASKS = ("auto", "binary", "multiclass", "regression")
BALANCE = ("none", "weights", "sampler")


@dataclass
class LabelledTask:
    """The labelled images of one call and the cross-validation plan every init shares."""

    table: pd.DataFrame      # image_id, patient_id, row (of Store.images), y
    mask: np.ndarray         # Store.images rows with a value for the target
    y: np.ndarray
    classes: list[str]
    task: str
    info: dict               # the target (column, expression, detected task)
    sets: list[FoldSet]
    splits: dict             # where the folds came from, their number, val share, ...
    n_eval: int
    leak: dict

    @property
    def n_classes(self) -> int:
        return len(self.classes) if self.task != "regression" else 0

    @property
    def groups(self) -> np.ndarray:
        return self.table["patient_id"].to_numpy()


@dataclass(frozen=True)
class Variant:
    """A protocol as run: ``linear`` / ``knn`` once per requested token pooling."""

    name: str                   # the row label in results (linear, linear-mean, finetune, ...)
    protocol: type[Protocol]
    pool: str | None            # token pooling of feature protocols


def _pools(v) -> list[str]:
    if isinstance(v, (list, tuple)):
        return [str(x) for x in v]
    return [p.strip() for p in str(v).split(",") if p.strip()]


def protocol_variants(names: Sequence[str], opts: dict) -> list[Variant]:
    """One variant per protocol, and per token pooling (``linear.pool=[mean,cls]``) for feature protocols."""
    out = []
    for name in names:
        cls = get_protocol(name)
        if not cls.uses_features:
            out.append(Variant(name, cls, None))
            continue
        pools = _pools(opts[name]["pool"])
        for pool in pools:
            out.append(Variant(name if pool == "default" and len(pools) == 1 else f"{name}-{pool}", cls, pool))
    return out


def prepare_task(store: Store, target: str, task: str, positive, folds: int | None, fractions: list[float],
                 seed: int, val_fraction: str, out: Path) -> LabelledTask:
    """Target, folds and label fractions, leakage check; writes the splits files into ``out``."""
    images = store.images
    mask, y, classes, task, tinfo = resolve_target(images, target, task, positive)
    rows = np.flatnonzero(mask)
    if len(rows) < 10:
        raise UserError(f"{store.root}: only {len(rows)} images have a value for {target}; need at least 10")
    table = images.iloc[rows][["image_id", "patient_id"]].reset_index(drop=True)
    table["row"] = rows
    table["y"] = y
    splits_df, sinfo = load_or_make_splits(store, tinfo["column"], folds, seed)
    if sinfo["source"] != "splits.parquet":
        splits_df.to_parquet(out / "splits_computed.parquet", index=False)
    n_folds = sinfo["folds"]
    n_eval = min(folds or n_folds, n_folds)
    sets = fold_sets(table, splits_df, fractions, n_eval, sinfo["val"], val_fraction)
    if not sets:
        raise UserError(f"{store.root}: no labelled image has a fold in splits.parquet; rerun 'radpretrain split'")
    tested = np.unique(np.concatenate([s.test for s in sets]))
    sinfo["labelled_images_not_tested"] = int(len(table) - len(tested)) if n_eval == n_folds else None
    leak = leakage_check(table, sets)
    splits_table(table, sets).to_parquet(out / "splits_used.parquet", index=False)
    return LabelledTask(table, mask, table["y"].to_numpy(), classes, task, tinfo, sets, sinfo, n_eval, leak)


def _check_arguments(image_size: int, task: str, balance: str) -> None:
    if image_size < 16:
        raise UserError(f"--image-size {image_size}: too small (at least 16)")
    if task not in TASKS:
        raise UserError(f"--task {task}: choose one of {', '.join(TASKS)}")
    if balance not in BALANCE:
        raise UserError(f"--balance {balance}: choose one of {', '.join(BALANCE)}")


def evaluate(data: str | Path, target: str, inits: Sequence[str | InitSpec], *, out: str | Path,
             protocols: Sequence[str] = ("linear",), label_fractions: str | Sequence[float] = (0.01, 0.1, 1.0),
             folds: int | None = None, backbone: str = "tf_efficientnet_lite0", image_size: int = 128, seed: int = 0,
             task: str = "auto", positive: str | None = None, balance: str = "none", overrides: Sequence[str] = (),
             device: str = "auto", report: bool = True, progress_file=None) -> dict:
    """Compare encoder inits on a labelled task of the store ``data``; returns the summary.

    Arguments mirror ``radpretrain evaluate``'s flags (``inits``: ``scratch``, ``imagenet``, a run
    or export folder, ``state_dict:PATH[:ARCH]``; ``overrides``: ``key=value`` options such as
    ``finetune.epochs=5``; ``device``: ``auto`` | ``cpu`` | ``cuda`` | ``cuda:N``).  Writes every
    output file into ``out`` (docs/report.md) and returns what ``summary.json`` holds.
    ``progress_file``: where progress bars go (default stderr; bars only show on a terminal).
    """
    t_start = time.time()
    opts = parse_options(list(overrides or []))
    fractions = parse_fractions(label_fractions)
    names = list(dict.fromkeys(protocols or ["linear"]))
    variants = protocol_variants(names, opts)
    _check_arguments(image_size, task, balance)
    if not inits:
        raise UserError("--init: give at least one init (scratch, imagenet, a run folder, state_dict:PATH)")
    dev, device_note = resolve_device(device)
    rt = Runtime.for_device(dev)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    log.info(device_note)

    store = Store(data)
    lt = prepare_task(store, target, task, positive, folds, fractions, seed, opts["val_fraction"], out)
    specs = unique_names(parse_inits(inits))
    groups = init_groups(specs)
    log.info("task %s on %s: %d labelled images, %d patients, %d folds (evaluating %d), fractions %s, inits %s",
             lt.task, target, len(lt.table), lt.table["patient_id"].nunique(), lt.splits["folds"], lt.n_eval,
             fractions, [s.name for s in specs])

    torch.manual_seed(seed)
    imgs = load_images(store, lt.table["row"].to_numpy(), image_size)
    f = imgs.float() / 255
    store_stats = (float(f.mean()), float(f.std()))
    del f
    feeder = ImageFeeder(imgs, rt.device)
    log.info("computing on %s (%s), %s; images %s, %.0f MB", rt.device, rt.name, rt.precision, feeder.describe(),
             imgs.numel() / 2**20)

    run = _Run(lt, rt, feeder, store_stats, backbone, image_size, seed, balance, opts, out / "features", out)
    with cell_progress(len(specs) * len(variants) * len(lt.sets), file=progress_file) as prog:
        for spec in specs:
            run.evaluate_init(spec, variants, prog)
    if not run.pred_frames:
        raise UserError("no fold could be evaluated (every labelled training subset had a single class); "
                        "use larger --label-fractions")
    preds = pd.concat(run.pred_frames, ignore_index=True)
    preds.to_parquet(out / "predictions.parquet", index=False)
    pd.DataFrame(run.fold_info).to_csv(out / "folds.csv", index=False)
    write_json(out / "finetune_history.json", run.histories)

    n_boot = int(opts["n_boot"])
    results, comparisons = summarise(preds, lt.task, n_boot=n_boot, seed=seed)
    results.to_csv(out / "results.csv", index=False)
    comparisons.to_csv(out / "comparisons.csv", index=False)
    images = store.images
    froc = froc_outputs(out, preds, images, store.meta, lt.task, n_boot=n_boot, seed=seed)
    y, mask, classes = lt.y, lt.mask, lt.classes
    counts = {"images": int(len(lt.table)), "patients": int(lt.table["patient_id"].nunique()),
              "images_in_store": int(len(images)), "unlabelled_images_skipped": int((~mask).sum())}
    if lt.task != "regression":
        counts["per_class"] = {classes[i]: int((y == i).sum()) for i in range(len(classes))}
    summary = {
        "command": "radpretrain evaluate",
        "target": lt.info, "task": lt.task, "classes": classes, "counts": counts,
        "splits": {**lt.splits, "evaluated_folds": lt.n_eval, "fractions": fractions,
                   "val_fraction": opts["val_fraction"], "leakage_check": lt.leak, "sizes": _sizes(lt.sets)},
        "inits": run.init_meta, "protocols": [v.name for v in variants], "backbone": backbone,
        "image_size": image_size, "seed": seed, "balance": balance, "options": opts,
        "store_stats": {"mean": store_stats[0], "std": store_stats[1]},
        "headline": _headline(results, comparisons, lt.task),
        "versions": package_versions(), "seconds": round(time.time() - t_start, 1),
        # the summation order (and so the last digits, which can tip a probe) depends on it
        "torch_threads": torch.get_num_threads(),
        "device": {**rt.describe(feed=feeder.mode), "requested": str(device)},
    }
    if froc is not None:  # a candidate-patch store (radpretrain patches): sensitivity at FPs per scan
        summary["froc"] = froc
    if groups:  # several pretraining seeds of one recipe: their mean, spread and seed-mean differences
        table = group_summary(preds, results, lt.task, groups, n_boot=n_boot, seed=seed)
        table.to_csv(out / GROUPS_FILE, index=False)
        summary["groups"] = {"members": groups, "rows": group_records(table, results, groups)}
    write_json(out / "summary.json", summary)
    if report:  # matplotlib is loaded only when a report is written (--quiet-report skips it)
        paths = write_report(out)
        log.info("report: %s", paths[0])
    return summary


class _Run:
    """State of one :func:`evaluate` call across inits: predictions, per-fold rows, histories."""

    def __init__(self, lt: LabelledTask, rt: Runtime, feeder: ImageFeeder, store_stats, backbone: str,
                 image_size: int, seed: int, balance: str, opts: dict, feat_dir: Path, out: Path):
        self.lt, self.rt, self.feeder, self.out = lt, rt, feeder, out
        self.store_stats, self.backbone, self.image_size = store_stats, backbone, image_size
        self.seed, self.balance, self.opts, self.feat_dir = seed, balance, opts, feat_dir
        self.init_opts = {"grey": opts["grey"], "seed": seed,
                          **{f"state_dict.{k}": v for k, v in opts["state_dict"].items() if v is not None}}
        self.pred_frames: list[pd.DataFrame] = []
        self.fold_info: list[dict] = []
        self.histories: dict = {}
        self.init_meta: dict = {}

    def build(self, spec: InitSpec) -> BuiltInit:
        return build_init(spec, self.backbone, self.image_size, self.store_stats, self.init_opts)

    def features(self, spec: InitSpec, built: BuiltInit, pools: list[str]) -> dict[str, np.ndarray]:
        """Frozen features of every labelled image, per token pooling (cached in ``features/``)."""
        feats = {}
        for pool in pools:
            ident = {"kind": spec.kind, "path": spec.path, "arch": spec.arch, "backbone": self.backbone,
                     "grey": self.opts["grey"], "seed": self.seed, "mtime": weights_mtime(spec.path),
                     "mean": built.meta.get("mean"), "std": built.meta.get("std")}
            pbar = bar(len(self.lt.table), f"features {spec.name}/{pool}", unit="img")
            try:
                feats[pool] = cached_features(self.feat_dir, spec.name, pool, built.encoder, self.feeder, self.lt.table,
                                              self.image_size, self.opts["batch_size"], ident, runtime=self.rt,
                                              progress=pbar)
            finally:
                pbar.close()
        return feats

    def evaluate_init(self, spec: InitSpec, variants: list[Variant], prog) -> None:
        lt = self.lt
        built = self.build(spec)
        self.init_meta[spec.name] = {"kind": spec.kind, **built.meta, **run_links(spec, self.out)}
        trained = built.meta.get("pretrain_image_size")
        if trained and int(trained) != int(self.image_size):
            log.warning("init %s was pretrained at %s px, evaluated at %s px", spec.name, trained, self.image_size)
        pools = list(dict.fromkeys(v.pool for v in variants if v.protocol.uses_features))
        feats = self.features(spec, built, pools)
        del built  # frees the device memory of the feature encoder before fine-tuning

        def make_encoder():
            return self.build(spec).encoder

        for v in variants:
            t0 = time.time()
            proto = v.protocol(self.opts[v.protocol.name])
            for s in lt.sets:
                data = FoldData(fold=s.fold, fraction=s.fraction, train=s.train, val=s.val, test=s.test, y=lt.y,
                                task=lt.task, n_classes=lt.n_classes, groups=lt.groups, balance=self.balance,
                                seed=self.seed, features=feats.get(v.pool) if v.protocol.uses_features else None,
                                images=self.feeder, make_encoder=make_encoder, runtime=self.rt)
                self._cell(spec.name, v, proto, s, data, prog)
            log.info("%s / %s done in %.1f s", spec.name, v.name, time.time() - t0)

    def _cell(self, init: str, v: Variant, proto: Protocol, s: FoldSet, data: FoldData, prog) -> None:
        label = f"{init} / {v.name} fold {s.fold} fraction {s.fraction:g}"
        if data.single_class:
            log.warning("skip %s/%s fold %d fraction %g: the labelled training subset has one class",
                        init, v.name, s.fold, s.fraction)
            self.fold_info.append({"init": init, "protocol": v.name, "fold": s.fold, "fraction": s.fraction,
                                   "skipped": "single class in train", "n_train": len(s.train)})
            prog.finished(label, 0.0, "skipped (single class in train)")
            return
        steps = proto.steps(data)
        inner = prog.inner(steps, label, unit="batch") if steps else None
        try:
            res = proto.run(replace(data, progress=inner))
        finally:
            if inner is not None:
                inner.close()
        tried = res.chosen.get("tried")
        if tried is not None:  # fine-tuning: the loss history of every learning rate tried
            self.histories.setdefault(init, {})[f"{s.fraction:g}/{s.fold}"] = tried
        chosen = {k: val for k, val in res.chosen.items() if k != "tried"}
        self.pred_frames.append(_pred_frame(self.lt.table, s, init, v.name, self.lt.task, res.test_scores))
        self.fold_info.append({"init": init, "protocol": v.name, "fold": s.fold, "fraction": s.fraction,
                               "n_train": len(s.train), "n_val": len(s.val), "n_test": len(s.test),
                               "seconds": round(res.seconds, 2), **{f"chosen_{k}": val for k, val in chosen.items()}})
        prog.finished(label, res.seconds, _cell_note(self.lt, s, res.val_scores, chosen))


def run_links(spec: InitSpec, out: Path) -> dict:
    """What the summary records of a run init besides its weights: its group, the run folder relative to
    the evaluate output (for the report's link and ``radpretrain compare``), the relative link to the
    run's ``report.html`` when it has one, and its ``compute.json`` (pretraining compute spent)."""
    meta: dict = {}
    if spec.group is not None:
        meta["group"] = spec.group
    if spec.kind != "run" or spec.path is None:
        return meta
    folder = Path(spec.path) if Path(spec.path).is_dir() else Path(spec.path).parent
    meta["run_name"] = folder.name
    try:
        rel = Path(os.path.relpath(folder.resolve(), out.resolve()))
    except ValueError:  # another drive (Windows): no relative link
        return meta
    meta["run"] = rel.as_posix()
    if (folder / "report.html").is_file():
        meta["run_report"] = (rel / "report.html").as_posix()
    compute = folder / COMPUTE_FILE
    if compute.is_file():
        try:
            meta["compute"] = read_json(compute)
        except (OSError, ValueError) as e:
            log.warning("%s: unreadable (%s); its compute is not recorded", compute, e)
    return meta


def _cell_note(lt: LabelledTask, s: FoldSet, val_scores, chosen: dict) -> str:
    parts = []
    if len(s.val):
        m = primary_metric(lt.task)
        parts.append(f"val {m} {metric_value(m, lt.task, lt.y[s.val], np.asarray(val_scores)):.3f}")
    parts += [f"{k}={val:g}" if isinstance(val, float) else f"{k}={val}" for k, val in chosen.items()]
    return ", ".join(parts)


def _sizes(sets) -> list[dict]:
    return [{"fold": s.fold, "fraction": s.fraction, "train": int(len(s.train)), "val": int(len(s.val)),
             "test": int(len(s.test))} for s in sets]


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
