"""Transfer benchmark on real knee radiographs: scratch vs ImageNet vs our own pretraining.

Needs the shared data folder ``../shared/data/knee-kl`` beside the checkout (Kellgren-Lawrence grades, OAI
images; see its README), which is *not* part of the repository: the script stops with a
clear message when it is missing (``--data`` points elsewhere).

Steps, all through the ``radpretrain`` CLI (what a user would type):

1. ``ingest`` the JPEGs (patient id = the 7-digit OAI subject id before ``L``/``R``, so both
   knees of a subject stay together; the grade folder becomes the ``label`` column);
2. ``split`` into patient-grouped, label-stratified folds with nested label fractions;
3. ``pretrain`` an encoder on the knee images *without* their labels (default: SimCLR from
   the ImageNet weights of tf_efficientnet_lite0, the ``simclr_cpu`` preset). Note: the
   pretraining sees every image of the store, the evaluation's test images included (not their
   labels), as an archive would;
4. ``evaluate`` two tasks, binary osteoarthritis (``label>=2``) and the 5-class grade, with
   scratch, ImageNet and the pretrained encoder, linear probe + kNN (``--finetune`` adds
   fine-tuning), label fractions 1 %, 10 %, 100 %, hyper-parameters chosen on validation folds only.

Prints one JSON line last: per task, protocol and fraction the headline metric of every init and
the paired differences (pretrained - ImageNet, pretrained - scratch) with p-values.
``--quick`` checks the whole chain in a few minutes on a stratified subset of 300 images.
Full run: about 40-60 min on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from _proc import shared_data_dir

DEFAULT_DATA = shared_data_dir() / "knee-kl"


def sh(args: list[str], log: Path) -> float:
    """Run ``radpretrain ARGS`` (same interpreter), append its output to ``log``; seconds taken."""
    t0 = time.time()
    cmd = [sys.executable, "-m", "radpretrain.cli", *args]
    print("+ radpretrain " + " ".join(args), file=sys.stderr, flush=True)
    with open(log, "a") as f:
        f.write("\n+ " + " ".join(cmd) + "\n")
        f.flush()
        r = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT)
    if r.returncode != 0:
        tail = log.read_text().splitlines()[-15:]
        sys.exit(f"transfer_knee: step failed (exit {r.returncode}): radpretrain {args[0]}\n" + "\n".join(tail))
    return time.time() - t0


def quick_subset(src: Path, dst: Path, per_grade: int) -> Path:
    """Symlink the first ``per_grade`` files of every split/grade folder (sorted) into ``dst``."""
    for split in ("train", "val"):
        for grade in sorted(p.name for p in (src / split).iterdir() if p.is_dir()):
            files = sorted((src / split / grade).glob("*.jpg"))[: per_grade if split == "train" else per_grade // 4]
            out = dst / split / grade
            out.mkdir(parents=True, exist_ok=True)
            for f in files:
                link = out / f.name
                if not link.exists():
                    link.symlink_to(f)
    return dst


def headline(eval_dir: Path) -> dict:
    """Compact numbers of one evaluation: {protocol: {fraction: {...}}}."""
    s = json.loads((eval_dir / "summary.json").read_text())
    out: dict = {}
    for r in s["headline"]:
        d = out.setdefault(r["protocol"], {}).setdefault(f"{r['fraction']:g}", {"metric": r["metric"]})
        d[r["init"]] = round(r["value"], 4)
        d[f"{r['init']}_ci"] = [round(r["ci_low"], 4), round(r["ci_high"], 4)]
        if r["init"] not in ("scratch", "imagenet"):
            for ref in ("scratch", "imagenet"):
                if f"delta_vs_{ref}" in r:
                    d[f"{r['init']}_minus_{ref}"] = round(r[f"delta_vs_{ref}"], 4)
                    d[f"{r['init']}_minus_{ref}_p"] = round(r[f"p_vs_{ref}"], 4)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", type=Path, default=DEFAULT_DATA, help="knee-kl folder ({train,val}/{0..4}/*.jpg)")
    p.add_argument("--work", type=Path, default=Path("runs/benchmarks/transfer_knee"),
                   help="working folder (default under runs/, which git ignores)")
    p.add_argument("--quick", action="store_true", help="a few minutes on a 300-image subset (checks the chain)")
    p.add_argument("--method", default="simclr", help="pretraining method (its <method>_cpu preset)")
    p.add_argument("--pretrain-steps", type=int, default=None, help="default: 600 (quick: 20)")
    p.add_argument("--image-size", type=int, default=None, help="pretraining and evaluation size (default 128, quick 64)")
    p.add_argument("--folds", type=int, default=None, help="default 5 (quick 3)")
    p.add_argument("--finetune", action="store_true", help="also fine-tune (slow on CPU)")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)

    if not a.data.is_dir():
        sys.exit(f"transfer_knee: {a.data}: knee-kl data folder not found; this benchmark needs the shared "
                 "real-radiograph data (../shared/data/README.md beside the checkout) or --data PATH")
    quick = a.quick
    size = a.image_size or (64 if quick else 128)
    steps = a.pretrain_steps or (20 if quick else 600)
    folds = a.folds or (3 if quick else 5)
    work = a.work / ("quick" if quick else "full")
    work.mkdir(parents=True, exist_ok=True)
    log = work / "steps.log"
    os.environ.setdefault("RADPRETRAIN_DEID_KEY", "transfer-knee-benchmark-key")  # pseudonyms only, local
    t0 = time.time()
    timings = {}

    src = quick_subset(a.data, work / "subset", 50) if quick else a.data
    store = work / "store"
    if not (store / "manifest.parquet").is_file():
        timings["ingest"] = sh(["ingest", str(src), "--out", str(store), "--patient-id", "([0-9]{7})[LR]",
                                "--label-from-folder", "yes", "--max-size", "224", "--body-part", "knee"], log)
    timings["split"] = sh(["split", str(store), "--folds", str(folds), "--stratify", "label", "--seed", str(a.seed)], log)

    run = work / f"run-{a.method}"
    if not (run / "encoder.safetensors").is_file():
        timings["pretrain"] = sh(["pretrain", "--method", a.method, "--data", str(store), "--out", str(run),
                                  f"trainer.max_steps={steps}", f"data.image_size={size}", f"seed={a.seed}"], log)
    inits = ["--init", "scratch", "--init", "imagenet", "--init", str(run)]
    protocols = ["--protocol", "linear", "--protocol", "knn"] + (["--protocol", "finetune"] if a.finetune else [])
    common = [*inits, *protocols, "--label-fractions", "0.01,0.1,1.0", "--folds", str(folds),
              "--backbone", "tf_efficientnet_lite0", "--image-size", str(size), "--seed", str(a.seed),
              "linear.C=[0.001,0.01,0.1,1.0]", f"n_boot={200 if quick else 1000}"]
    if a.finetune:
        common += ["finetune.epochs=2" if quick else "finetune.epochs=8", "finetune.warmup_epochs=1",
                   "finetune.batch_size=32"]
    results = {}
    for name, target in (("oa_kl_ge_2", "label>=2"), ("kl_grade_5class", "label")):
        out = work / f"eval-{name}"
        timings[f"evaluate_{name}"] = sh(["evaluate", "--data", str(store), "--target", target, *common,
                                          "--out", str(out)], log)
        results[name] = headline(out)
        results[name]["report"] = str(out / "report.html")

    summary = {"benchmark": "transfer_knee", "quick": quick, "image_size": size, "pretrain_method": a.method,
               "pretrain_steps": steps, "folds": folds, "fractions": [0.01, 0.1, 1.0],
               "seconds": round(time.time() - t0, 1), "timings_s": {k: round(v, 1) for k, v in timings.items()},
               "results": results}
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
