"""``radpretrain evaluate``: compare encoder inits on a labelled task, with CIs and paired tests.

Example::

    radpretrain evaluate --data DATASET --target lesion --init scratch --init imagenet \\
        --init runs/mae1 --init recipe=runs/s1,runs/s2,runs/s3 --protocol linear --protocol finetune --label-fractions 0.01,0.1,1 \\
        --out eval/lesion finetune.epochs=5

Writes into ``--out``: ``results.csv`` (tidy: init, protocol, fraction, fold, metric,
value, ci_low, ci_high), ``comparisons.csv`` (paired tests), ``summary.json``,
``predictions.parquet``, ``splits_used.parquet``, ``finetune_history.json``,
``report.html`` (self-contained) and ``report.md``.  See docs/report.md.
"""

from __future__ import annotations

import argparse
import json

from radpretrain.evaluate.api import BALANCE, TASKS, evaluate
from radpretrain.evaluate.device import DEVICE_CHOICES
from radpretrain.evaluate.protocols import PROTOCOLS


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", required=True, help="dataset store folder (radpretrain ingest)")
    p.add_argument("--target", required=True,
                   help="label column or manifest field (body_part, age_years, sex, view); "
                        "a threshold such as 'label>=2' makes a binary target")
    p.add_argument("--init", action="append", required=True, metavar="INIT",
                   help="scratch | imagenet | RUN_OR_EXPORT folder | state_dict:PATH[:ARCH] | NAME=RUN1,RUN2,... "
                        "(an init group: several seeds of one recipe, reported as mean and spread); repeat to compare")
    p.add_argument("--protocol", action="append", choices=tuple(PROTOCOLS),
                   help=f"{' | '.join(PROTOCOLS)}; repeatable (default: linear)")
    p.add_argument("--label-fractions", default="0.01,0.1,1.0", help="comma-separated fractions of labelled patients")
    p.add_argument("--folds", type=int, default=None,
                   help="cross-validation folds (default: those of splits.parquet, else 5); fewer than the "
                        "file has evaluates only the first ones")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--backbone", default="tf_efficientnet_lite0", help="timm backbone for scratch/imagenet/state_dict")
    p.add_argument("--image-size", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--task", choices=TASKS, default="auto")
    p.add_argument("--positive", default=None, help="the positive class of a binary target (default: the larger value)")
    p.add_argument("--balance", choices=BALANCE, default="none",
                   help="class imbalance: class-weighted loss, or balanced sampling (finetune)")
    p.add_argument("--device", default="auto", metavar="DEVICE",
                   help=f"{DEVICE_CHOICES}: where features and fine-tuning are computed (default auto: the GPU "
                        "when one is visible, else the CPU; bf16 autocast on a GPU)")
    p.add_argument("--quiet-report", action="store_true", help="skip report.html / report.md")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="options, e.g. finetune.epochs=5 finetune.lr_sweep=[1e-3,1e-4] finetune.warmup_epochs=2 "
                        "linear.pool=[mean,cls,flat] knn.k=[5,20] val_fraction=full grey=replicate n_boot=2000 "
                        "state_dict.strip_prefix=module. state_dict.rename='^stem=>conv_stem'")


def run(args) -> int:
    summary = evaluate(args.data, args.target, args.init, out=args.out, protocols=args.protocol or ["linear"],
                       label_fractions=args.label_fractions, folds=args.folds, backbone=args.backbone,
                       image_size=args.image_size, seed=args.seed, task=args.task, positive=args.positive,
                       balance=args.balance, overrides=args.overrides or [], device=args.device,
                       report=not args.quiet_report)
    printed = {"out": str(args.out), "task": summary["task"], "headline": summary["headline"]}
    if "groups" in summary:
        printed["groups"] = [{k: r[k] for k in ("group", "protocol", "fraction", "n_seeds", "mean", "sd", "min", "max",
                                                 "vs")} for r in summary["groups"]["rows"]]
    if "froc" in summary:
        printed["froc"] = [{k: r[k] for k in ("init", "protocol", "fraction", "cpm", "cpm_ci", "sensitivity")}
                           for r in summary["froc"]["rows"]]
    print(json.dumps(printed, default=float))
    return 0
