"""Recipe study on real radiographs (issue 19): which pretraining recipe beats the ImageNet start?

Needs the shared real-radiograph folder (``--data``, default ``../shared/data`` beside the
repository: ``knee-kl/`` and ``pneumonia-kermany/``, see its README); it is never copied into the
repository, and the script stops with a clear message when it is missing.  Everything goes through
the ``radpretrain`` CLI (``ingest``, ``split``, ``pretrain``, ``evaluate``) in subprocesses, whose
CPU seconds (``getrusage`` of the children) and wall seconds are written to ``WORK/ledger.jsonl``
with the exact command line.

Design (see docs/benchmarks.md, "Recipe study"):

* **Tasks.** Knee osteoarthritis (KL >= 2, binary AUC; the 5-class grade as balanced accuracy)
  and paediatric chest pneumonia (NORMAL vs PNEUMONIA, AUC).  Chest files with identical stored
  pixels (ingest marks them ``duplicate``) are kept once, before anything is partitioned; no
  patient id survives in those file names, so each chest image is its own patient.
* **Partition** (``prepare``).  Per task, patients are split once (seeded, stratified by the
  patient's label) into a DEVELOPMENT half and a TEST half, each ingested as its own store with
  its own 5 patient-grouped label-stratified folds (``radpretrain split``).  Every recipe choice is
  made on the development stores' cross-validated results; the test stores are only evaluated
  for the finalists and reported.
* **Pretraining corpus.** One mixed knee + chest archive without labels: ``corpus-nt`` = the
  development halves of both tasks (non-transductive: no test image is ever pretrained on);
  ``corpus-tr`` = all images of both tasks (transductive, as a hospital archive holds the study's
  own images).  Note: development evaluations use encoders whose corpus held the development
  images (unlabelled), i.e. they are transductive for the development half.
* **Compute.** A recipe's budget is given in minutes of an idle 2-core machine with
  ``trainer.cpu_threads=2``.  ``calibrate`` measures each recipe's seconds per step (a short run,
  median step time from the run's log) and ``pretrain`` turns a budget into
  ``trainer.max_steps``; the CPU seconds and wall seconds each run really took are recorded.
* **Evaluation.** ``radpretrain evaluate`` (linear probe, label fractions 1 / 10 / 100 %, 5
  folds, ``linear.C`` in {1e-3, 1e-2, 1e-1, 1}, patient bootstrap CIs, paired differences to
  ImageNet); the ImageNet baseline of each backbone is evaluated once per store and run
  encoders are compared with it on the same fold plan (same images, same labelled subsets).
  Seeds of one recipe are summarised as mean and spread of the per-seed differences plus a
  patient-bootstrap CI of the seed-mean difference.  Fine-tuning for the finalists only.

Usage (each stage skips what is already done, so a stopped study continues where it was)::

    python benchmarks/recipes.py --work /tmp/study prepare
    python benchmarks/recipes.py --work /tmp/study calibrate simclr_cpu dino_cpu
    python benchmarks/recipes.py --work /tmp/study run RECIPE --minutes 5 --seeds 0 [--corpus nt] [--parts dev]
    python benchmarks/recipes.py --work /tmp/study seeds fbn --minutes 15 --seeds 0 1 2 --parts test
    python benchmarks/recipes.py --work /tmp/study seeds fbn --minutes 15 --parts test --protocol finetune --fractions 0.01,0.1
    python benchmarks/recipes.py --work /tmp/study table             # every evaluated run, one JSON line

Prints one JSON line last.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO.parent / "shared" / "data"
KNEE_PATIENT = "([0-9]{7})[LR]"
IMAGE_SIZE = 128
FRACTIONS = "0.01,0.1,1.0"
LINEAR_C = "linear.C=[0.001,0.01,0.1,1.0]"

# task -> (store prefix, evaluate target, extra evaluate args, headline metric)
TASKS = {
    "knee": ("knee", "label>=2", [], "auc"),
    "knee5": ("knee", "label", ["--task", "multiclass"], "balanced_accuracy"),
    "chest": ("chest", "label", ["--positive", "PNEUMONIA"], "auc"),
}

# -- recipes -------------------------------------------------------------------------------
# name -> method, preset, overrides (on top of the preset; data.image_size and the thread count
# are added by the driver).  Backbone = the preset's unless an override names one.
R = {}


PRESET_BEFORE = {"simclr_cpu": ("model.freeze_bn_stats=false",),
                 "dino_cpu": ("model.freeze_bn_stats=false", "dino.freeze_last_layer=1")}


def recipe(name, method, config, *over, note="", cost_as=None, eval_extra=()):
    """``cost_as``: a recipe with the same cost per step (its calibration is used); ``eval_extra``:
    evaluate options for its encoders (e.g. the token poolings of a ViT)."""
    # presets this study changed: a recipe that does not set such a key runs with the value the preset
    # had when the study ran it
    said = {o.lstrip("+").split("=", 1)[0] for o in over}
    over = (*(o for o in PRESET_BEFORE.get(config, ()) if o.split("=", 1)[0] not in said), *over)
    R[name] = {"method": method, "config": config, "over": list(over), "note": note, "cost_as": cost_as,
               "eval_extra": list(eval_extra)}


recipe("simclr_cpu", "simclr", "simclr_cpu", note="preset as is (global views 0.35-1, blur)")
recipe("dino_cpu", "dino", "dino_cpu", note="preset as is (2 global + 4 local views)")
recipe("mae_cpu", "mae", "mae_cpu", "model.patch_size=16", note="preset, ViT-Ti/16 at 128 px from random init",
       eval_extra=["linear.pool=[default,cls,mean]"])
recipe("deepcluster_cpu", "deepcluster", "deepcluster_cpu", note="preset as is")
recipe("metadata_cpu", "metadata", "metadata_cpu", note="preset; this archive knows only the body part")
recipe("genesis_cpu", "genesis", "genesis_cpu", note="preset as is")
# SimCLR variants (screen): same cost per step as simclr_cpu unless the views or backbone change
recipe("simclr_frozenbn", "simclr", "simclr_cpu", "model.freeze_bn_stats=true", cost_as="simclr_cpu",
       note="BatchNorm keeps the ImageNet statistics")
recipe("simclr_last", "simclr", "simclr_cpu", "export.weights=last", cost_as="simclr_cpu",
       note="export the last weights, not the lowest val-loss epoch")
recipe("simclr_px64", "simclr", "simclr_cpu", "data.image_size=64", note="pretrain at 64 px (4x cheaper steps)")
recipe("simclr_view64", "simclr", "simclr_cpu", "augment.view_size=64",
       note="128-px images, 64-px views (crops at full detail, 4x cheaper steps)")
recipe("simclr_crop20", "simclr", "simclr_cpu", "augment.crop_scale=[0.2,1.0]", cost_as="simclr_cpu",
       note="stronger crops")
recipe("simclr_noblur", "simclr", "simclr_cpu", "augment.blur_p=0.0", cost_as="simclr_cpu", note="no blur")
recipe("simclr_lr1e3", "simclr", "simclr_cpu", "optim.lr=1.0e-3", cost_as="simclr_cpu", note="lr 1e-3")
recipe("simclr_t02", "simclr", "simclr_cpu", "simclr.temperature=0.2", cost_as="simclr_cpu", note="temperature 0.2")
recipe("simclr_geo", "simclr", "simclr_cpu", "augment.brightness=0.0", "augment.contrast=0.0", "augment.gamma=[1.0,1.0]",
       "augment.blur_p=0.0", cost_as="simclr_cpu",
       note="geometric views only: crops, flips, rotation, noise; no intensity changes, no blur")
recipe("simclr_lr1e4", "simclr", "simclr_cpu", "optim.lr=1.0e-4", cost_as="simclr_cpu", note="lr 1e-4")
recipe("simclr_lite1", "simclr", "simclr_cpu", "model.backbone=tf_efficientnet_lite1", note="lite1 ImageNet start")
recipe("simclr_lite2", "simclr", "simclr_cpu", "model.backbone=tf_efficientnet_lite2", note="lite2 ImageNet start")
# frozen-BatchNorm SimCLR family (after screen 1: simclr_frozenbn was the first recipe clearly above ImageNet on
# the development knee folds); screened at simclr_cpu's step count, so the comparisons are at equal steps
FBN = ("model.freeze_bn_stats=true",)
META = ("metadata_heads.weight=0.5", "metadata_heads.heads=[body_part]")  # the body-part head (all this archive knows)
GEO = ("augment.brightness=0.0", "augment.contrast=0.0", "augment.gamma=[1.0,1.0]", "augment.blur_p=0.0")
# the same settings with their own cost per step (frozen statistics make a step ~30 % cheaper): for the
# 15-minute runs, so a budget is what the recipe itself can do in it
recipe("fbn", "simclr", "simclr_cpu", *FBN, note="simclr_cpu + frozen BatchNorm statistics, own calibration")
recipe("fbn_lite1", "simclr", "simclr_cpu", *FBN, "model.backbone=tf_efficientnet_lite1",
       note="fbn from the lite1 ImageNet start, own calibration")
recipe("fbn_lr1e4", "simclr", "simclr_cpu", *FBN, "optim.lr=1.0e-4", cost_as="fbn",
       note="simclr_cpu + frozen BatchNorm statistics + lr 1e-4, own calibration")
recipe("fbn_meta", "simclr", "simclr_cpu", *FBN, *META,
       cost_as="fbn", note="fbn + the metadata heads (this archive knows only the body part), weight 0.5")
recipe("sf_geo", "simclr", "simclr_cpu", *FBN, *GEO, cost_as="simclr_cpu", note="frozen BN + geometric views only")
recipe("sf_lr1e3", "simclr", "simclr_cpu", *FBN, "optim.lr=1.0e-3", cost_as="simclr_cpu", note="frozen BN + lr 1e-3")
recipe("sf_lr1e4", "simclr", "simclr_cpu", *FBN, "optim.lr=1.0e-4", cost_as="simclr_cpu", note="frozen BN + lr 1e-4")
recipe("sf_view64", "simclr", "simclr_cpu", *FBN, "augment.view_size=64", note="frozen BN + 64-px views of 128-px images")
recipe("sf_crop20", "simclr", "simclr_cpu", *FBN, "augment.crop_scale=[0.2,1.0]", cost_as="simclr_cpu",
       note="frozen BN + crops 0.2-1")
recipe("sf_warm20", "simclr", "simclr_cpu", *FBN, "optim.warmup_fraction=0.2", cost_as="simclr_cpu",
       note="frozen BN + 20 % linear warm-up (5 % in the preset)")
recipe("sf_t02", "simclr", "simclr_cpu", *FBN, "simclr.temperature=0.2", cost_as="simclr_cpu",
       note="frozen BN + temperature 0.2")

# controls: only the BatchNorm running statistics change (lr 0), on augmented views or on plain images
recipe("bn_views", "simclr", "simclr_cpu", "optim.lr=0.0", cost_as="simclr_cpu",
       note="control: lr 0, BatchNorm statistics re-estimated on SimCLR's augmented views")
recipe("bn_plain", "simclr", "simclr_cpu", "optim.lr=0.0", "augment.crop_scale=[1.0,1.0]", "+augment.crop_ratio=[1.0,1.0]",
       "augment.rotation=0.0", "augment.hflip=0.0", "augment.brightness=0.0", "augment.contrast=0.0",
       "augment.gamma=[1.0,1.0]", "augment.blur_p=0.0", "augment.noise_p=0.0", cost_as="simclr_cpu",
       note="control: lr 0, BatchNorm statistics re-estimated on plain corpus images (AdaBN)")
recipe("dino_frozenbn", "dino", "dino_cpu", "model.freeze_bn_stats=true", cost_as="dino_cpu",
       note="DINO, BatchNorm keeps the ImageNet statistics")
recipe("dino_fix", "dino", "dino_cpu", "model.freeze_bn_stats=true", "dino.freeze_last_layer=0", cost_as="dino_cpu",
       note="DINO, frozen BN statistics, student head's last layer trains from step 0 (preset: 1 epoch = 184 steps here)")
recipe("dino_meta", "dino", "dino_cpu", "model.freeze_bn_stats=true", "dino.freeze_last_layer=0", *META,
       cost_as="dino_cpu",
       note="dino_fix + the metadata heads (body part), weight 0.5, as in fbn_meta")


def backbone_of(name: str) -> str:
    for o in R[name]["over"]:
        if o.startswith("model.backbone="):
            return o.split("=", 1)[1]
    import yaml

    from radpretrain.config import preset_text

    cfg = yaml.safe_load(preset_text(R[name]["config"]))
    return str(cfg["model"]["backbone"])


# -- plumbing ------------------------------------------------------------------------------
def say(msg: str) -> None:
    print(f"[recipes {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def load_avg() -> float:
    try:
        return float(Path("/proc/loadavg").read_text().split()[0])
    except OSError:
        return float("nan")


def radpretrain(args: list[str], work: Path, kind: str, name: str, log: Path, **extra) -> dict:
    """Run ``radpretrain ARGS`` (same interpreter); ledger entry with CPU and wall seconds."""
    cmd = [sys.executable, "-m", "radpretrain.cli", *args]
    shown = "radpretrain " + " ".join(a if " " not in a else repr(a) for a in args)
    say(shown)
    log.parent.mkdir(parents=True, exist_ok=True)
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    la = load_avg()
    threads = 2 if kind == "calibrate" else THREADS
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    t0 = time.time()
    with open(log, "a") as f:
        f.write(f"\n+ {shown}\n")
        f.flush()
        r = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=env)
    wall = time.time() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    entry = {"kind": kind, "name": name, "command": shown, "rc": r.returncode, "threads": threads, "cpu_s": round(cpu, 1),
             "wall_s": round(wall, 1), "load_before": la, "load_after": load_avg(),
             "started": time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t0)), **extra}
    with open(work / "ledger.jsonl", "a") as f:
        f.write(json.dumps(entry) + "\n")
    if r.returncode != 0:
        tail = "\n".join(log.read_text().splitlines()[-15:])
        sys.exit(f"recipes: step failed (exit {r.returncode}): {shown}\n{tail}")
    return entry


# -- prepare: partition, ingest, split ------------------------------------------------------------
def _rank(seed: int, key: str) -> str:
    return hashlib.sha256(f"{seed}:{key}".encode()).hexdigest()


def _halves(units: dict[str, str], seed: int) -> dict[str, str]:
    """unit -> 'dev' | 'test': per stratum, units in a seeded order alternate between the halves."""
    out = {}
    for stratum in sorted(set(units.values())):
        members = sorted((u for u, s in units.items() if s == stratum), key=lambda u: _rank(seed, u))
        for i, u in enumerate(members):
            out[u] = "test" if i % 2 else "dev"
    return out


def _link(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    if not dst.is_symlink():
        dst.symlink_to(src)


def prepare(data: Path, work: Path, seed: int) -> dict:
    knee, chest = data / "knee-kl", data / "pneumonia-kermany"
    for d in (knee, chest):
        if not d.is_dir():
            sys.exit(f"recipes: {d}: data folder not found; this benchmark needs the shared real radiographs "
                     "(knee-kl/ and pneumonia-kermany/, see ../shared/data/README.md) or --data PATH")
    src, stores = work / "src", work / "stores"
    log = work / "logs" / "prepare.log"
    done = work / "prepare.json"
    if done.is_file():
        return json.loads(done.read_text())
    # knee: patients (OAI subject ids), stratum = the patient's highest KL grade
    files = sorted(knee.glob("*/*/*.jpg"))
    grade = {f: f.parent.name for f in files}
    pid = {f: f.stem[:7] for f in files}
    pat_stratum: dict[str, str] = {}
    for f in files:
        pat_stratum[pid[f]] = max(pat_stratum.get(pid[f], "0"), grade[f])
    half = _halves(pat_stratum, seed)
    for f in files:
        _link(f, src / f"knee-{half[pid[f]]}" / grade[f] / f.name)
    # chest: drop pixel duplicates first (ingest's content hash), then each image is its own patient
    probe = work / "probe-chest"
    if not (probe / "manifest.parquet").is_file():
        radpretrain(["ingest", str(chest), "--out", str(probe), "--keep-paths", "--max-size", "224",
                     "--label-from-folder", "yes", "--body-part", "chest"], work, "ingest", "probe-chest", log)
    import pandas as pd

    m = pd.read_parquet(probe / "manifest.parquet")
    conflicts = int((m[m["status"].isin(["ingested", "duplicate"])].groupby("content_hash")["label"].nunique() > 1).sum())
    kept = m[m["status"] == "ingested"]
    chalf = _halves({r.source: r.label for r in kept.itertuples()}, seed)
    for rel, h in chalf.items():
        _link(chest / rel, src / f"chest-{h}" / Path(rel).parent.name / Path(rel).name)
    # task stores (labels from folders) and the two unlabelled corpora
    for task in ("knee", "chest"):
        for part in ("dev", "test"):
            out = stores / f"{task}-{part}"
            if not (out / "manifest.parquet").is_file():
                extra = ["--patient-id", KNEE_PATIENT] if task == "knee" else []
                radpretrain(["ingest", str(src / f"{task}-{part}"), "--out", str(out), "--max-size", "224",
                             "--label-from-folder", "yes", "--body-part", task, *extra], work, "ingest", out.name, log)
            if not (out / "splits.parquet").is_file():
                radpretrain(["split", str(out), "--folds", "5", "--stratify", "label", "--seed", str(seed)],
                            work, "split", out.name, log)
    for corpus, parts in (("nt", ("dev",)), ("tr", ("dev", "test"))):
        root = src / f"corpus-{corpus}"
        for task in ("knee", "chest"):
            for part in parts:
                _link(src / f"{task}-{part}", root / task / part)
        out = stores / f"corpus-{corpus}"
        if not (out / "manifest.parquet").is_file():
            radpretrain(["ingest", str(root), "--out", str(out), "--max-size", "224", "--label-from-folder", "no",
                         "--patient-id", KNEE_PATIENT], work, "ingest", out.name, log)
    counts = {}
    for s in sorted(stores.iterdir()):
        mm = pd.read_parquet(s / "manifest.parquet")
        mm = mm[mm["status"] == "ingested"]
        counts[s.name] = {"images": int(len(mm)), "patients": int(mm["patient_id"].nunique()),
                          "body_part": mm["body_part"].value_counts().to_dict()}
        if "label" in mm.columns:
            counts[s.name]["label"] = {str(k): int(v) for k, v in mm["label"].value_counts().sort_index().items()}
    info = {"seed": seed, "chest_inputs": int(len(m)), "chest_duplicates_dropped": int((m["status"] == "duplicate").sum()),
            "chest_duplicate_label_conflicts": conflicts, "stores": counts}
    done.write_text(json.dumps(info, indent=1))
    return info



# -- pretraining ---------------------------------------------------------------------------------
THREADS = 2  # --threads: intra-op threads of pretraining and evaluation runs (calibration always uses 2)


def run_overrides(name: str, steps: int, seed: int, extra=(), threads: int | None = None) -> list[str]:
    return [f"data.image_size={IMAGE_SIZE}", f"trainer.cpu_threads={threads or THREADS}", f"trainer.max_steps={steps}",
            "trainer.max_epochs=1000", f"seed={seed}", "trainer.checkpoint_every_n_steps=0",
            "previews.every_n_epochs=0", "trainer.enable_progress_bar=false", *R[name]["over"], *extra]


def pretrain_cmd(name: str, corpus: Path, out: Path, steps: int, seed: int, extra=(), threads=None) -> list[str]:
    return ["pretrain", "--method", R[name]["method"], "--config", R[name]["config"], "--data", str(corpus),
            "--out", str(out), *run_overrides(name, steps, seed, extra, threads)]


def _merge_json(path: Path, key: str, value: dict) -> None:
    """Add ``key`` to a JSON object file under an exclusive lock (several job runners share the files)."""
    import fcntl

    with open(path.with_suffix(".lock"), "w") as lk:
        fcntl.flock(lk, fcntl.LOCK_EX)
        cur = json.loads(path.read_text()) if path.is_file() else {}
        cur[key] = value
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(cur, indent=1))
        tmp.replace(path)


def wait_idle(min_idle: float = 1.5, max_wait_s: float = 3600) -> float | None:
    """Wait (up to ``max_wait_s``, then go on) until ``min_idle`` cores were idle for 3 s; the idle cores seen."""
    from radpretrain.utils import idle_cpus

    t0 = time.time()
    idle = idle_cpus(3.0)
    while idle is not None and idle < min_idle and time.time() - t0 < max_wait_s:
        time.sleep(20)
        idle = idle_cpus(3.0)
    return idle


def calibrate(work: Path, name: str, short: int = 10, long: int = 40) -> dict:
    """Seconds per step of a recipe: two runs (``short`` and ``long`` steps), the difference of their times.

    The machine is shared: each of the two runs starts only when ~2 cores are idle (``wait_idle``),
    and the idle cores seen before each are recorded.
    """
    cal_path = work / "calibration.json"
    cal = json.loads(cal_path.read_text()) if cal_path.is_file() else {}
    if name in cal:
        return cal[name]
    corpus = work / "stores" / "corpus-nt"
    res = {}
    flag = work / "calibrating"  # tells a second job runner of the study not to start anything now
    flag.write_text(name)
    for n in (short, long):
        idle = wait_idle()
        out = work / "calib" / f"{name}-{n}"
        shutil.rmtree(out, ignore_errors=True)
        res[n] = radpretrain(pretrain_cmd(name, corpus, out, n, 0, threads=2), work, "calibrate", name,
                             work / "logs" / "calibrate.log", steps=n, idle_cores_before=idle)
        shutil.rmtree(out, ignore_errors=True)
    flag.unlink(missing_ok=True)
    d = long - short
    cal[name] = {"s_per_step_wall": round((res[long]["wall_s"] - res[short]["wall_s"]) / d, 3),
                 "s_per_step_cpu": round((res[long]["cpu_s"] - res[short]["cpu_s"]) / d, 3),
                 "fixed_wall_s": round(res[short]["wall_s"] - short * (res[long]["wall_s"] - res[short]["wall_s"]) / d, 1),
                 "load_before": [res[short]["load_before"], res[long]["load_before"]],
                 "idle_cores_before": [res[short].get("idle_cores_before"), res[long].get("idle_cores_before")],
                 "measured": res[long]["started"], "steps": [short, long]}
    _merge_json(cal_path, name, cal[name])
    return cal[name]


def calibrate_cpu(work: Path, name: str, short: int = 10, long: int = 40) -> dict:
    """CPU seconds per step of a recipe run on ONE thread: the difference of a ``short`` and a ``long`` run.

    One thread's CPU time per step hardly depends on what else runs on the machine (no thread waits
    on another), so this can be measured on the busy shared machine, unlike wall time.
    """
    cal_path = work / "calibration_cpu1.json"
    cal = json.loads(cal_path.read_text()) if cal_path.is_file() else {}
    if name in cal:
        return cal[name]
    corpus = work / "stores" / "corpus-nt"
    res = {}
    for n in (short, long):
        out = work / "calib" / f"{name}-cpu1-{n}"
        shutil.rmtree(out, ignore_errors=True)
        res[n] = radpretrain(pretrain_cmd(name, corpus, out, n, 0, threads=1), work, "calibrate_cpu1", name,
                             work / "logs" / "calibrate.log", steps=n)
        shutil.rmtree(out, ignore_errors=True)
    d = long - short
    cal[name] = {"cpu1_s_per_step": round((res[long]["cpu_s"] - res[short]["cpu_s"]) / d, 3),
                 "wall_s_per_step_as_measured": round((res[long]["wall_s"] - res[short]["wall_s"]) / d, 3),
                 "load_before": [res[short]["load_before"], res[long]["load_before"]],
                 "measured": res[long]["started"], "steps": [short, long]}
    _merge_json(cal_path, name, cal[name])
    return cal[name]


REFERENCE = "simclr_cpu"  # budgets are minutes of this recipe on an idle 2-core machine


def steps_for(work: Path, name: str, minutes: float) -> int:
    """Steps of ``name`` that cost as many one-thread CPU seconds as ``minutes`` of the reference recipe
    (simclr_cpu at 128 px) take on an idle 2-core machine with 2 threads (its idle calibration)."""
    ref_wall = calibrate(work, REFERENCE)["s_per_step_wall"]
    ref_cpu1 = calibrate_cpu(work, REFERENCE)["cpu1_s_per_step"]
    own_cpu1 = calibrate_cpu(work, R[name].get("cost_as") or name)["cpu1_s_per_step"]
    return max(10, int(round(minutes * 60 / ref_wall * ref_cpu1 / own_cpu1)))


def run_name(name: str, minutes: float, seed: int) -> str:
    return f"{name}-m{minutes:g}-s{seed}"


def pretrain_run(work: Path, name: str, minutes: float, seed: int, corpus: str = "nt", steps: int | None = None) -> Path:
    out = work / "runs" / corpus / run_name(name, minutes, seed)
    if (out / "encoder.safetensors").is_file():
        return out
    if out.exists():  # a run stopped before its end: start it again (runs are short)
        shutil.rmtree(out)
    steps = steps or steps_for(work, name, minutes)
    radpretrain(pretrain_cmd(name, work / "stores" / f"corpus-{corpus}", out, steps, seed), work, "pretrain",
                out.name, work / "logs" / "pretrain.log", recipe=name, minutes=minutes, seed=seed, corpus=corpus,
                steps=steps)
    for ck in (out / "checkpoints").glob("*.ckpt"):  # the encoder is exported; checkpoints only cost disk
        ck.unlink()
    return out



def bn_recalibrate(run: Path, n_images: int = 1024, batch: int = 64, seed: int = 0) -> Path:
    """A copy of a run's encoder whose BatchNorm running statistics are re-estimated (cumulative
    average, no weight change) on ``n_images`` plain, un-augmented images of the run's own corpus:
    a study probe of the BatchNorm question; written beside the run as ``RUN-bnplain``."""
    import torch

    from radpretrain.data.dataset import StoreDataset
    from radpretrain.data.store import Store
    from radpretrain.models.weights import load_run_encoder, save_encoder

    out = run.parent / f"{run.name}-bnplain"
    if (out / "encoder.safetensors").is_file():
        return out
    t0, c0 = time.time(), time.process_time()
    model, meta = load_run_encoder(run)
    cfg = _run_config(run)
    store = Store(cfg["data"]["root"])
    rng = np.random.default_rng(seed)
    rows = np.sort(rng.choice(len(store.images), size=min(n_images, len(store.images)), replace=False))
    ds = StoreDataset(store, rows, image_size=int(cfg["data"]["image_size"]), resize="letterbox")
    mean, std = float(meta["preprocessing"]["mean"]), float(meta["preprocessing"]["std"])
    bns = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative average over all batches
    model.eval()
    for m in bns:
        m.train()
    with torch.no_grad():
        for s in range(0, len(ds), batch):
            x = torch.stack([ds[i]["image"] for i in range(s, min(s + batch, len(ds)))])
            model((x - mean) / std)
    for m in bns:
        m.momentum = 0.1
    meta = {**meta, "bn_recalibrated": {"images": int(len(rows)), "source": "plain corpus images"}}
    save_encoder(model, meta, out)
    shutil.copy(run / "config.yaml", out / "config.yaml")
    entry = {"kind": "bn_recalibrate", "name": out.name, "command": f"recipes.bn_recalibrate({run.name})",
             "rc": 0, "cpu_s": round(time.process_time() - c0, 1), "wall_s": round(time.time() - t0, 1),
             "corpus": run.parent.name, "started": time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t0))}
    with open(WORK / "ledger.jsonl", "a") as f:
        f.write(json.dumps(entry) + "\n")
    return out


# -- evaluation ----------------------------------------------------------------------------------
def eval_args(task: str, part: str, inits: list[str], out: Path, backbone: str = "tf_efficientnet_lite0",
              protocols=("linear",), fractions: str = FRACTIONS, n_boot: int = 1000, extra=()) -> list[str]:
    prefix, target, targs, _ = TASKS[task]
    args = ["evaluate", "--data", str(WORK / "stores" / f"{prefix}-{part}"), "--target", target, *targs]
    for i in inits:
        args += ["--init", i]
    for pr in protocols:
        args += ["--protocol", pr]
    return [*args, "--label-fractions", fractions, "--folds", "5", "--backbone", backbone, "--image-size",
            str(IMAGE_SIZE), "--seed", "0", "--quiet-report", "--out", str(out), LINEAR_C, f"n_boot={n_boot}", *extra]


WORK = Path(".")  # set by main()


def evaluate(task: str, part: str, inits: list[str], tag: str, n_boot: int, **kw) -> Path:
    out = WORK / "evals" / part / task / tag
    if (out / "summary.json").is_file():
        return out
    radpretrain(eval_args(task, part, inits, out, n_boot=n_boot, **kw), WORK, "evaluate", f"{part}/{task}/{tag}",
                WORK / "logs" / "evaluate.log", task=task, part=part, inits=inits)
    return out


def baseline(task: str, part: str, backbone: str, n_boot: int) -> Path:
    """scratch (lite0 only) and the backbone's ImageNet start, once per store and backbone."""
    inits = (["scratch"] if backbone == "tf_efficientnet_lite0" else []) + ["imagenet"]
    return evaluate(task, part, inits, f"base-{backbone}", n_boot, backbone=backbone)


def eval_run(run: Path, task: str, part: str, n_boot: int, protocols=("linear",), fractions=FRACTIONS, extra=()) -> Path:
    tag = f"{run.parent.name}-{run.name}" + ("" if protocols == ("linear",) else "-" + "+".join(protocols))
    return evaluate(task, part, [str(run)], tag, n_boot, protocols=protocols, fractions=fractions, extra=extra)


def predictions(ev: Path):
    import pandas as pd

    return pd.read_parquet(ev / "predictions.parquet")


def _scores(df, task):
    from radpretrain.evaluate.results import scores_of

    return scores_of(df, "multiclass" if task == "knee5" else "binary")


def paired(task: str, ours_df, ref_df, n_boot: int, seed: int = 0) -> dict:
    """evaluate's own paired patient bootstrap (``metrics.paired_bootstrap``) on the images both predicted."""
    from radpretrain.evaluate.metrics import paired_bootstrap

    j = ours_df.merge(ref_df, on=["image_id", "fold"], suffixes=("", "_ref"))
    sr = (np.stack([np.asarray(p, float) for p in j["proba_ref"]]) if task == "knee5" else j["y_score_ref"].to_numpy(float))
    r = paired_bootstrap(TASKS[task][3], "multiclass" if task == "knee5" else "binary", j["y_true"].to_numpy(),
                         _scores(j, task), sr, j["patient_id"].to_numpy(), n_boot=n_boot, seed=seed)
    return {"value": r["a"], "ref": r["b"], "delta": r["delta"], "ci": [r["ci_low"], r["ci_high"]], "p": r["p"]}


def seed_mean_delta(task: str, ours: list, ref_df, n_boot: int, seed: int = 0) -> dict:
    """Mean over pretraining seeds of (ours - reference), with a patient-bootstrap CI of that mean.

    Each replicate resamples patients once (with replacement) and scores every seed's and the
    reference's predictions on the same resample, so the CI holds the label-sampling noise of
    the test patients; the spread across seeds is reported beside it.
    """
    from radpretrain.evaluate.metrics import metric_value

    metric, kind = TASKS[task][3], ("multiclass" if task == "knee5" else "binary")
    keys = ["image_id", "fold"]
    base = ref_df[keys + ["patient_id", "y_true"]].copy()
    cols = []
    for i, df in enumerate(ours):
        base = base.merge(df[keys].assign(**{f"_r{i}": np.arange(len(df))}), on=keys)
        cols.append(f"_r{i}")
    base = base.merge(ref_df[keys].assign(_ref=np.arange(len(ref_df))), on=keys)
    y = base["y_true"].to_numpy()
    sc = [_scores(df, task)[base[c].to_numpy()] for df, c in zip(ours, cols)]
    sr = _scores(ref_df, task)[base["_ref"].to_numpy()]
    point = [metric_value(metric, kind, y, s) - metric_value(metric, kind, y, sr) for s in sc]
    pats, inv = np.unique(base["patient_id"].to_numpy(), return_inverse=True)
    members = [np.flatnonzero(inv == k) for k in range(len(pats))]
    rng = np.random.default_rng(seed)
    reps = []
    for _ in range(n_boot):
        idx = np.concatenate([members[k] for k in rng.integers(0, len(pats), len(pats))])
        yb = y[idx]
        rb = metric_value(metric, kind, yb, sr[idx])
        d = np.mean([metric_value(metric, kind, yb, s[idx]) - rb for s in sc])
        if np.isfinite(d):
            reps.append(d)
    lo, hi = np.percentile(reps, [2.5, 97.5]) if reps else (np.nan, np.nan)
    return {"mean_delta": float(np.mean(point)), "per_seed": [round(float(x), 4) for x in point],
            "sd_seeds": float(np.std(point, ddof=1)) if len(point) > 1 else None,
            "range_seeds": [float(min(point)), float(max(point))], "ci_mean": [float(lo), float(hi)], "n_boot": len(reps)}


def headline(ev: Path) -> dict:
    """{protocol: {fraction: {init: [value, lo, hi]}}} from evaluate's summary.json."""
    s = json.loads((ev / "summary.json").read_text())
    out: dict = {}
    for r in s["headline"]:
        out.setdefault(r["protocol"], {}).setdefault(f"{r['fraction']:g}", {})[r["init"]] = [
            round(r["value"], 4), round(r["ci_low"], 4), round(r["ci_high"], 4)]
    return out



# -- a run's results ---------------------------------------------------------------------------
def result_of(run: Path, task: str, part: str, n_boot: int, protocols=("linear",), fractions=FRACTIONS) -> dict:
    """Evaluate one run on one store; its paired differences to its own ImageNet start (and to lite0's)."""
    from radpretrain.models.backbones import is_vit, resolve_arch

    cfg = _run_config(run)
    backbone = resolve_arch(cfg["model"]["backbone"])
    extra = R.get(_recipe_of(run), {}).get("eval_extra", [])
    ev = eval_run(run, task, part, n_boot, protocols=protocols, fractions=fractions, extra=extra)
    ours = predictions(ev)
    refs = {}
    if not is_vit(backbone):  # no ImageNet ViT weights ship with radpretrain
        refs["imagenet"] = baseline(task, part, backbone, n_boot)
    if backbone != "tf_efficientnet_lite0":
        refs["imagenet_lite0"] = baseline(task, part, "tf_efficientnet_lite0", n_boot)
    out = {"run": run.name, "corpus": run.parent.name, "task": task, "part": part, "metric": TASKS[task][3],
           "backbone": backbone, "steps": cfg["trainer"]["max_steps"], "rows": []}
    for (proto, frac), g in ours.groupby(["protocol", "fraction"]):
        row = {"protocol": proto, "fraction": float(frac)}
        for ref_name, ref_ev in refs.items():
            rp = predictions(ref_ev)
            ref_proto = proto.split("-")[0]  # linear-mean of a ViT against the CNN's linear
            rg = rp[(rp["init"] == "imagenet") & (rp["protocol"] == ref_proto) & (rp["fraction"] == frac)]
            if len(rg):
                row[ref_name] = paired(task, g, rg, n_boot)
        out["rows"].append(row)
    return out


def _run_config(run: Path) -> dict:
    import yaml

    return yaml.safe_load((run / "config.yaml").read_text())


def _recipe_of(run: Path) -> str:
    return run.name.rsplit("-m", 1)[0]


def record(rec: dict) -> None:
    with open(WORK / "results.jsonl", "a") as f:
        f.write(json.dumps(rec) + "\n")


def run_compute(run: Path) -> dict:
    """CPU and wall seconds of the run's pretrain command, from the ledger."""
    for line in reversed((WORK / "ledger.jsonl").read_text().splitlines()):
        e = json.loads(line)
        if e["kind"] == "pretrain" and e["name"] == run.name and e.get("corpus") == run.parent.name:
            return {"cpu_s": e["cpu_s"], "wall_s": e["wall_s"], "load_before": e["load_before"], "steps": e.get("steps"),
                    "threads": e.get("threads", 2)}
    return {}


def do_run(name: str, minutes: float, seeds, corpus: str, parts, tasks, n_boot: int, protocols=("linear",),
           fractions=FRACTIONS, steps: int | None = None) -> list[dict]:
    recs = []
    for seed in seeds:
        run = pretrain_run(WORK, name, minutes, seed, corpus, steps=steps)
        for part in parts:
            for task in tasks:
                rec = result_of(run, task, part, n_boot, protocols, fractions)
                rec.update(recipe=name, minutes=minutes, seed=seed, compute=run_compute(run))
                record(rec)
                recs.append(rec)
                say(brief(rec))
    return recs


def brief(rec: dict) -> str:
    parts = []
    for r in rec["rows"]:
        im = r.get("imagenet") or r.get("imagenet_lite0")
        if im:
            parts.append(f"{r['protocol']}@{r['fraction']:g} {im['value']:.3f} ({im['delta']:+.3f} "
                         f"[{im['ci'][0]:+.3f},{im['ci'][1]:+.3f}])")
    return f"{rec['part']}/{rec['task']} {rec['run']} ({rec['corpus']}): " + "; ".join(parts)



def _threads_of(rec: dict) -> int:
    """Pretraining threads of a result's run (the ledger's; records made before it was stored: from its log)."""
    t = rec.get("compute", {}).get("threads")
    if t:
        return int(t)
    for line in (WORK / "ledger.jsonl").read_text().splitlines():
        e = json.loads(line)
        if e["kind"] == "pretrain" and e["name"] == rec["run"].replace("-bnplain", "") and e.get("corpus") == rec["corpus"]:
            return int(e.get("threads", 2))
    return 2


def table(filter_part: str | None = None) -> list[dict]:
    """The latest record of every (run, corpus, part, task), compact."""
    latest = {}
    path = WORK / "results.jsonl"
    for line in (path.read_text().splitlines() if path.is_file() else []):
        r = json.loads(line)
        latest[(r["run"], r["corpus"], r["part"], r["task"])] = r
    rows = []
    for (run, corpus, part, task), r in latest.items():
        if filter_part and part != filter_part:
            continue
        row = {"run": run, "corpus": corpus, "part": part, "task": task, "steps": r.get("steps"),
               "threads": _threads_of(r),
               "cpu_s": r.get("compute", {}).get("cpu_s"), "wall_s": r.get("compute", {}).get("wall_s")}
        for x in r["rows"]:
            ref = "imagenet" if "imagenet" in x else "imagenet_lite0"
            if ref in x:
                d = x[ref]
                row[f"{x['protocol']}@{x['fraction']:g}"] = [round(d["value"], 3), round(d["delta"], 3),
                                                            round(d["ci"][0], 3), round(d["ci"][1], 3)]
            if "imagenet_lite0" in x and ref != "imagenet_lite0":
                row[f"{x['protocol']}@{x['fraction']:g}_vs_lite0"] = round(x["imagenet_lite0"]["delta"], 3)
        rows.append(row)
    return rows


def seed_summary(name: str, minutes: float, seeds, corpus: str, part: str, task: str, n_boot: int,
                 protocol: str = "linear", fractions=FRACTIONS) -> dict:
    """Per label fraction: each seed's value, the seed-mean difference to ImageNet with its CI, the seed spread."""
    from radpretrain.models.backbones import resolve_arch

    runs = [WORK / "runs" / corpus / run_name(name, minutes, s) for s in seeds]
    backbone = resolve_arch(_run_config(runs[0])["model"]["backbone"])
    protos = ("linear",) if protocol == "linear" else (protocol,)
    evs = [predictions(eval_run(r, task, part, n_boot, protocols=protos, fractions=fractions)) for r in runs]
    if protocol == "linear":
        ref = predictions(baseline(task, part, backbone, n_boot))
    else:
        ref = predictions(evaluate(task, part, ["imagenet"], f"base-{backbone}-{protocol}", n_boot, backbone=backbone,
                                   protocols=protos, fractions=fractions))
    out = {"recipe": name, "minutes": minutes, "seeds": list(seeds), "corpus": corpus, "part": part, "task": task,
           "protocol": protocol, "metric": TASKS[task][3], "fractions": {}}
    for frac in sorted(ref["fraction"].unique()):
        sel = lambda d: d[(d["protocol"] == protocol) & (d["fraction"] == frac)]  # noqa: E731
        r = sel(ref[ref["init"] == "imagenet"])
        ours = [sel(e) for e in evs]
        if not len(r) or any(not len(o) for o in ours):
            continue
        from radpretrain.evaluate.metrics import metric_value

        kind = "multiclass" if task == "knee5" else "binary"
        vals = [metric_value(TASKS[task][3], kind, o["y_true"].to_numpy(), _scores(o, task)) for o in ours]
        d = seed_mean_delta(task, ours, r, n_boot)
        out["fractions"][f"{frac:g}"] = {
            "imagenet": metric_value(TASKS[task][3], kind, r["y_true"].to_numpy(), _scores(r, task)),
            "per_seed": [round(v, 4) for v in vals], "mean": float(np.mean(vals)), **d}
    return out


def markdown(rows: list[dict]) -> str:
    """Markdown tables of ``table()`` rows, one per store and probe: value (difference to ImageNet [95 % CI])."""
    out = []
    groups: dict = {}
    for r in rows:
        for k in r:
            if isinstance(r[k], list) and "@" in k:
                groups.setdefault((r["part"], r["task"], k.split("@")[0]), []).append(r)
    for (part, task, proto), rs in sorted(groups.items()):
        fr = ["0.01", "0.1", "1"]
        out.append(f"\n**{part} / {task} / {proto}** ({TASKS[task][3]}; difference to the run's own ImageNet start "
                   "[95 % CI, paired patient bootstrap])\n")
        out.append("| run | corpus | steps | threads | CPU s | wall s | " + " | ".join(f"{float(f):.0%} labels" for f in fr) + " |")
        out.append("|---|---|---|---|---|---|" + "---|" * len(fr))
        seen = set()
        for r in rs:
            if (r["run"], r["corpus"]) in seen:
                continue
            seen.add((r["run"], r["corpus"]))
            cells = []
            for f in fr:
                v = r.get(f"{proto}@{f}")
                cells.append(f"{v[0]:.3f} ({v[1]:+.3f} [{v[2]:+.3f}, {v[3]:+.3f}])" if v else "")
            out.append(f"| {r['run']} | {r['corpus']} | {r['steps']} | {r['threads']} | {r['cpu_s']} | {r['wall_s']} | "
                       + " | ".join(cells) + " |")
    return "\n".join(out)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", type=Path, default=DEFAULT_DATA, help="folder with knee-kl/ and pneumonia-kermany/")
    p.add_argument("--work", type=Path, default=REPO / "runs" / "benchmarks" / "recipes",
                   help="working folder (default under runs/, which git ignores)")
    p.add_argument("--partition-seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2,
                   help="threads of pretraining and evaluation runs (budgets are calibrated with 2 on an idle machine)")
    sub = p.add_subparsers(dest="cmd", required=True)
    sub.add_parser("prepare", help="partition, ingest and split")
    c = sub.add_parser("calibrate", help="seconds per step of recipes")
    c.add_argument("recipes", nargs="+")
    cc = sub.add_parser("calibrate-cpu", help="one-thread CPU seconds per step of recipes (fine on a busy machine)")
    cc.add_argument("recipes", nargs="+")
    b = sub.add_parser("baseline", help="scratch and ImageNet on the task stores")
    b.add_argument("--parts", nargs="+", default=["dev"])
    b.add_argument("--tasks", nargs="+", default=["knee", "chest"])
    b.add_argument("--backbones", nargs="+", default=["tf_efficientnet_lite0"])
    b.add_argument("--n-boot", type=int, default=300)
    r = sub.add_parser("run", help="pretrain a recipe (per seed) and evaluate it")
    r.add_argument("recipe")
    r.add_argument("--minutes", type=float, required=True, help="budget in idle 2-core minutes")
    r.add_argument("--seeds", type=int, nargs="+", default=[0])
    r.add_argument("--corpus", choices=("nt", "tr"), default="nt")
    r.add_argument("--parts", nargs="+", default=["dev"])
    r.add_argument("--tasks", nargs="+", default=["knee", "chest"])
    r.add_argument("--protocols", nargs="+", default=["linear"])
    r.add_argument("--fractions", default=FRACTIONS)
    r.add_argument("--n-boot", type=int, default=300)
    r.add_argument("--steps", type=int, default=None, help="fixed step count instead of the budget's")
    rb = sub.add_parser("recal", help="evaluate a run after re-estimating its BatchNorm statistics on plain images")
    rb.add_argument("runs", nargs="+", help="run folder names under WORK/runs/CORPUS")
    rb.add_argument("--corpus", choices=("nt", "tr"), default="nt")
    rb.add_argument("--parts", nargs="+", default=["dev"])
    rb.add_argument("--tasks", nargs="+", default=["knee", "chest"])
    rb.add_argument("--n-boot", type=int, default=300)
    ss = sub.add_parser("seeds", help="seed-mean difference to ImageNet of one recipe's seeds (runs must exist)")
    ss.add_argument("recipe")
    ss.add_argument("--minutes", type=float, required=True)
    ss.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ss.add_argument("--corpus", choices=("nt", "tr"), default="nt")
    ss.add_argument("--parts", nargs="+", default=["test"])
    ss.add_argument("--tasks", nargs="+", default=["knee", "chest"])
    ss.add_argument("--protocol", default="linear")
    ss.add_argument("--fractions", default=FRACTIONS)
    ss.add_argument("--n-boot", type=int, default=1000)
    t = sub.add_parser("table", help="every evaluated run (latest record), value and difference to ImageNet")
    t.add_argument("--part", default=None)
    t.add_argument("--text", action="store_true", help="also print a readable table on stderr")
    t.add_argument("--markdown", action="store_true", help="also print Markdown tables (one per store) on stderr")
    a = p.parse_args(argv)
    a.work.mkdir(parents=True, exist_ok=True)
    global WORK, THREADS
    WORK = a.work.resolve()
    THREADS = a.threads
    os.environ.setdefault("RADPRETRAIN_DEID_KEY", "radpretrain-recipe-study")  # pseudonyms only, local
    os.environ.setdefault("PYTHONPATH", str(REPO / "src"))
    out = {"benchmark": "recipes", "cmd": a.cmd}
    if a.cmd == "prepare":
        out["prepare"] = prepare(a.data, a.work, a.partition_seed)
    elif a.cmd == "calibrate":
        out["calibration"] = {n: calibrate(a.work, n) for n in a.recipes}
    elif a.cmd == "calibrate-cpu":
        out["calibration_cpu1"] = {n: calibrate_cpu(a.work, n) for n in a.recipes}
    elif a.cmd == "baseline":
        out["baseline"] = {f"{part}/{task}/{bb}": headline(baseline(task, part, bb, a.n_boot))
                           for part in a.parts for task in a.tasks for bb in a.backbones}
    elif a.cmd == "run":
        if a.recipe not in R:
            sys.exit(f"recipes: unknown recipe {a.recipe!r} (known: {', '.join(R)})")
        recs = do_run(a.recipe, a.minutes, a.seeds, a.corpus, a.parts, a.tasks, a.n_boot, tuple(a.protocols),
                      a.fractions, a.steps)
        out["runs"] = [{k: v for k, v in x.items()} for x in recs]
    elif a.cmd == "recal":
        out["runs"] = []
        for name in a.runs:
            run = bn_recalibrate(WORK / "runs" / a.corpus / name)
            for part in a.parts:
                for task in a.tasks:
                    rec = result_of(run, task, part, a.n_boot)
                    rec.update(recipe=_recipe_of(run) + "+bnplain", minutes=None, seed=None,
                               compute=run_compute(WORK / "runs" / a.corpus / name))
                    record(rec)
                    say(brief(rec))
                    out["runs"].append(rec)
    elif a.cmd == "seeds":
        out["seeds"] = []
        for part in a.parts:
            for task in a.tasks:
                res = seed_summary(a.recipe, a.minutes, a.seeds, a.corpus, part, task, a.n_boot, a.protocol, a.fractions)
                with open(WORK / "seeds.jsonl", "a") as f:
                    f.write(json.dumps(res) + "\n")
                for fr, v in res["fractions"].items():
                    say(f"{part}/{task} {a.recipe} m{a.minutes:g} {a.corpus} {a.protocol}@{fr}: ImageNet {v['imagenet']:.3f}, "
                        f"seeds {v['per_seed']} -> mean diff {v['mean_delta']:+.3f} [{v['ci_mean'][0]:+.3f}, "
                        f"{v['ci_mean'][1]:+.3f}], per-seed sd {v['sd_seeds'] if v['sd_seeds'] is None else round(v['sd_seeds'], 3)}")
                out["seeds"].append(res)
    elif a.cmd == "table":
        out["table"] = table(a.part)
        if a.text:
            for row in out["table"]:
                cells = [f"{k}: {v[0]:.3f} ({v[1]:+.3f} [{v[2]:+.3f},{v[3]:+.3f}])" for k, v in row.items()
                         if isinstance(v, list)]
                print(f"{row['part']}/{row['task']:5s} {row['corpus']} {row['run']:28s} steps {row['steps']} "
                      f"cpu {row['cpu_s']} s | " + " | ".join(cells), file=sys.stderr)
        if a.markdown:
            print(markdown(out["table"]), file=sys.stderr)
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
