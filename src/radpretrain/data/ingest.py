"""``radpretrain ingest``: a messy archive -> a de-identified, quality-checked dataset store.

Pipeline: recursive sorted scan (hidden files skipped) -> fixed-size chunks of
the sorted file list -> worker processes, each chunk decoded, QC'd, resized and
written to its own shard plus a chunk manifest (atomically, the manifest last)
-> finalisation: chunk manifests concatenated in order, duplicates marked
(first by sorted path kept), labels typed, ``manifest.parquet``,
``qc_summary.json`` and ``store.json`` written.

Resuming: ``DATASET/.ingest/plan.json`` holds a keyed fingerprint of the file
list and options (no paths).  A chunk whose manifest exists and whose shard is
intact (its size; on a finished store also its pixels' hashes) is done; anything
else is redone, so a run killed at any moment and started again ends with the
same manifest as an uninterrupted run, and a rerun repairs a damaged store.
A full disk is a one-line error (:func:`disk_full_error`); the rerun resumes.
``--partition i/N`` processes only chunks ``k`` with ``k % N == i - 1``;
``--merge PART... --out DATASET`` joins partition stores made from the same archive
and options, and finished stores made from different file lists with the same key
and pixel options (:mod:`.merge`).

Workers get what they need explicitly: each chunk is a :class:`ChunkJob` carrying its files and an
:class:`IngestContext` (the options, the pseudonymiser with the de-identification key, the labels
CSV's rows and the NIfTI slice plan of those files), in this process or a pool worker, forked or
spawned.  The module holds no state besides constants and a per-process cache of folder keywords.
Manifest operations (typing, duplicates, QC counts) are :mod:`.manifest`'s.

Nothing identifying is written or logged: ids are keyed pseudonyms, paths are
shown as their token unless ``--keep-paths``, and read errors are reason codes.
"""

from __future__ import annotations

import argparse
import errno
import functools
import gc
import hashlib
import io
import json
import math
import multiprocessing as mp
import os
import re
import shutil
import stat
import sys
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field, replace
from operator import itemgetter
from pathlib import Path
from typing import Iterator, Mapping, NamedTuple, Sequence

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image
from tqdm import tqdm

from radpretrain.data import intensity as I
from radpretrain.data import readers as R
from radpretrain.data import vocab as V
from radpretrain.data.deid import (
    Pseudonymizer, check_store_location, folder_name_in_header, folder_name_looks_identifying, header_identity_tokens,
)
from radpretrain.data.manifest import (
    CONTENT_HASH, MANIFEST_COLUMNS, label_columns, mark_duplicates, qc_summary, typed, weakest_patient_id_source,
)
from radpretrain.data.merge import merge_stores
from radpretrain.data.store import SHARD_DIR, WORK_DIR, ShardWriter, commit_file, write_manifest, write_store_meta
from radpretrain.data.verify import check_shard
from radpretrain.errors import UserError
from radpretrain.utils import get_logger, read_json, write_json

log = get_logger("radpretrain.data.ingest")

CHUNK_DIR = "chunks"
IMAGE_EXTS = {".png", ".jpg", ".jpeg", ".tif", ".tiff"}
NIFTI_EXTS = (".nii", ".nii.gz")
_INTERNAL = ["_file", "_item", "_pid_source"]
_OPEN_FLAGS = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0)  # inputs are opened without waiting (a FIFO would block)
MAX_AUTO_CLASSES = 50  # --label-from-folder auto: at most this many class names,
SMALL_VOCABULARY = 10  # and beyond this many,
MIN_IMAGES_PER_CLASS = 10  # at least this many images per class name on average
_PHI_COLUMN = re.compile(r"name|birth|\bdob\b|accession|\bmrn\b|address|phone|email|patient|physician", re.I)


# ----------------------------------------------------------------------------- CLI

def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("sources", nargs="*", metavar="SRC", help="folders or files to ingest (recursive)")
    p.add_argument("--out", required=True, metavar="DATASET", help="dataset store folder to create or resume")
    p.add_argument("--labels", metavar="CSV", help="CSV with a 'path' column (relative to the source root) and label columns")
    p.add_argument("--patient-id", metavar="REGEX", help="patient id of non-DICOM files from their relative path (first group)")
    p.add_argument("--label-from-folder", choices=("auto", "yes", "no"), default="auto",
                   help="parent folder name -> 'label' column (ImageFolder). auto: on when no --labels, every "
                        "input is a PNG/JPEG/TIFF inside a sub-folder and the folder names are a small class "
                        "vocabulary, none of which looks like a person's name, a date or an id (else a warning); "
                        "yes: your decision that they are not identifying (recorded in the store)")
    p.add_argument("--max-size", type=int, default=512, help="longest stored side in pixels (default 512)")
    p.add_argument("--min-size", type=int, default=32, help="images with a side shorter than this are quarantined (too_small)")
    p.add_argument("--workers", type=int, default=0, help="worker processes (default: all cores)")
    p.add_argument("--chunk-size", type=int, default=256, help="files per chunk/shard (default 256)")
    p.add_argument("--keep-paths", action="store_true", help="write relative paths in 'source' and messages (paths can be PHI)")
    p.add_argument("--partition", metavar="i/N", help="process only partition i of N (1 <= i <= N); join with --merge")
    p.add_argument("--merge", nargs="+", metavar="STORE",
                   help="merge stores into --out (no SRC): the partitions of one ingest (--partition i/N), or "
                        "finished stores of different files made with the same de-id key and pixel options "
                        "(e.g. last year's store and a store of this month's new files); rows are kept in the "
                        "order given, later copies of the same pixels become duplicates")
    p.add_argument("--nifti-slices", type=int, default=5, help="axial slices sampled per NIfTI volume (default 5)")
    p.add_argument("--nifti-max-per-patient", type=int, default=50, help="cap on NIfTI slices per patient (default 50)")
    p.add_argument("--ct-window", type=float, nargs=2, default=list(I.CT_WINDOW), metavar=("LO", "HI"), help="CT HU window")
    p.add_argument("--mr-percentile", type=float, default=I.MR_PERCENTILE, help="MR: divide by this percentile")
    p.add_argument("--modality", default="XR", choices=V.MODALITIES, help="modality recorded for non-DICOM 2-D images")
    p.add_argument("--body-part", default=None, choices=V.BODY_PARTS, help="body part of non-DICOM inputs without a keyword in their path")


def run(args) -> int:
    out = Path(args.out)
    if args.merge:
        if args.sources:
            raise UserError("--merge takes stores, not SRC folders")
        try:
            summary = merge_partitions([Path(p) for p in args.merge], out)
        except OSError as e:
            if not is_disk_full(e):
                raise
            raise UserError(f"{e.filename or out}: no space left on device ({_free(out)} free); free some space "
                            "and run the same command again: it resumes") from None
    else:
        if not args.sources:
            raise UserError("nothing to ingest: give at least one SRC folder or file")
        opts = {k: getattr(args, k) for k in (
            "labels", "patient_id", "label_from_folder", "max_size", "min_size", "workers", "chunk_size",
            "keep_paths", "partition", "nifti_slices", "nifti_max_per_patient", "ct_window", "mr_percentile",
            "modality", "body_part")}
        summary = ingest(args.sources, out, **opts)
    print_summary(summary, out)
    if summary.get("splits_not_carried"):
        print(f"  note: splits are not carried over from the merged stores; run 'radpretrain split {out}' on the merged store")
    return 0


# ----------------------------------------------------------------------------- scanning

def scan_sources(sources, counts: dict | None = None) -> tuple[list[tuple[str, str]], list[str]]:
    """Sorted (absolute path, relative path) of every non-hidden file, and each file's source-root-relative path.

    Linked folders are followed (each target once), so an archive assembled from links is scanned whole.
    Only regular files (and links to them) are inputs: FIFOs, sockets and devices are never opened (a
    FIFO would block the read forever); they are counted in a warning, without their paths, and in
    ``counts["not_regular"]``.  A dangling link stays an input (quarantined ``unreadable``).

    With several sources the relative path is prefixed by the source's name.
    """
    roots = [Path(s) for s in sources]
    for r in roots:
        if not r.exists():
            raise UserError(f"{r}: no such file or folder")
    names = [r.name for r in roots]
    if len(roots) > 1 and len(set(names)) != len(names):
        raise UserError("two sources share a folder name; give them distinct names or ingest them separately")
    files, repeated, special = [], 0, 0
    for r in roots:
        prefix = f"{r.name}/" if len(roots) > 1 else ""
        if r.is_file():
            files.append((os.path.abspath(r), prefix + r.name, r.name))
            continue
        if not r.is_dir():
            special += 1
            continue
        top = os.path.abspath(r)
        seen: set[tuple[int, int]] = set()  # (device, inode) of every folder walked: links are followed once
        for dirpath, dirnames, filenames, n_special in _walk(top):
            seen.add(_dir_key(dirpath))
            dirnames[:], n = _walk_into(dirpath, dirnames, seen)
            repeated += n
            special += n_special
            reldir = os.path.relpath(dirpath, top)
            reldir = "" if reldir == "." else reldir.replace(os.sep, "/") + "/"
            joined = dirpath if dirpath.endswith(os.sep) else dirpath + os.sep  # os.path.join(dirpath, fn)
            rel_prefix = prefix + reldir
            files.extend((joined + fn, rel_prefix + fn, reldir + fn) for fn in filenames)
    if repeated:  # no paths: they may carry PHI
        log.warning("%d linked folder(s) not scanned: each links to a folder scanned already (a loop, or a "
                    "second link to one folder)", repeated)
    if special:
        log.warning(NOT_REGULAR_WARNING, special)
    if counts is not None:
        counts["not_regular"] = special
    files.sort(key=itemgetter(1))
    return [(a, b) for a, b, _ in files], [c for _, _, c in files]


NOT_REGULAR_WARNING = "%d file(s) skipped: not regular files (FIFOs, sockets or devices are never read)"


def _walk(top: str):
    """``os.walk(top, followlinks=True)`` (top-down; the caller may prune ``dirnames``; folders that cannot be
    listed are skipped) that also tells regular files from other entries: yields (dirpath, dirnames,
    non-hidden regular files and dangling links, number of other non-hidden entries).

    Entry types come from the folder listing (no system call per file), except for links, which are followed.
    """
    stack = [top]
    while stack:
        dirpath = stack.pop()
        try:
            with os.scandir(dirpath) as it:
                entries = list(it)
        except OSError:
            continue
        dirnames, filenames, special = [], [], 0
        for e in entries:
            if _entry_is(e.is_dir):
                dirnames.append(e.name)
            elif e.name.startswith("."):
                continue
            elif _entry_is(e.is_file) or _dangling(e):
                filenames.append(e.name)
            else:
                special += 1
        yield dirpath, dirnames, filenames, special
        stack.extend(os.path.join(dirpath, d) for d in reversed(dirnames))


def _entry_is(test) -> bool:
    try:
        return test()
    except OSError:
        return False


def _dangling(entry) -> bool:
    """A link whose target does not exist (kept as an input: it is quarantined as unreadable)."""
    if not _entry_is(entry.is_symlink):
        return False
    try:
        os.stat(entry.path)
    except FileNotFoundError:
        return True
    except OSError:
        return False
    return False


def _dir_key(path: str) -> tuple[int, int]:
    st = os.stat(path)
    return st.st_dev, st.st_ino


def _walk_into(dirpath: str, dirnames: list[str], seen: set) -> tuple[list[str], int]:
    """(sub-folders of ``dirpath`` to walk: sorted, not hidden, (number of linked folders left out)).

    A linked folder is walked only when its target was not walked yet: a loop, or a second link to
    one folder, would list the same files again.
    """
    keep, repeated = [], 0
    for d in sorted(dirnames):
        if d.startswith("."):
            continue
        full = os.path.join(dirpath, d)
        if os.path.islink(full):
            try:
                key = _dir_key(full)
            except OSError:  # vanished meanwhile
                continue
            if key in seen:
                repeated += 1
                continue
            seen.add(key)  # a second link in this same folder is caught too
        keep.append(d)
    return keep, repeated


def _ext(rel: str) -> str:
    """``os.path.splitext(rel)[1].lower()`` of a '/'-separated path (a leading dot starts no extension)."""
    dot = rel.rfind(".")
    start = rel.rfind("/") + 1
    if dot > start and (rel[start] != "." or rel[start:dot].lstrip(".")):
        return rel[dot:].lower()
    return ""


def decide_label_from_folder(mode: str, rels: list[str], has_labels_csv: bool, exts=None) -> bool:
    """``exts``: ``_ext`` of each of ``rels`` when the caller has them.  The rule is
    :func:`folder_label_decision`'s, without reading the files' headers."""
    return folder_label_decision(mode, rels, has_labels_csv, exts)[0]


def folder_label_decision(mode: str, rels: list[str], has_labels_csv: bool, exts=None,
                          files=None) -> tuple[bool, str | None]:
    """(parent folder names become the ``label`` column?, why ``auto`` refused them: a warning, or None).

    ``yes``/``no`` are the user's decision.  ``auto`` accepts an ImageFolder layout (no labels CSV, every
    input a PNG/JPEG/TIFF by its name inside a sub-folder) whose parent folder names form a small class
    vocabulary shared by many images (:func:`_vocabulary_problem`) and none of which may be a person's name,
    a date or an identifier (:func:`deid.folder_name_looks_identifying`), nor, with ``files`` (the
    (path, relative path) pairs of ``rels``' files, as :func:`scan_sources` gives them), a name or id in
    the DICOM header of a file inside it (a DICOM file named as an image).  The warning gives counts,
    never a name.
    """
    if mode != "auto":
        return mode == "yes", None
    if has_labels_csv:
        return False, None
    classes = _folder_classes(rels, exts)
    if classes is None:  # not an ImageFolder layout: nothing to warn about
        return False, None
    why = _vocabulary_problem(classes)
    if why is None:
        n_bad = sum(folder_name_looks_identifying(c) for c in classes)
        if n_bad:
            why = (f"{n_bad} of {len(classes)} parent folder names look like a person's name, a date or an "
                   "identifier (exports are often organised by patient)")
    if why is None and files is not None:
        n_bad = _folders_named_in_headers(files, rels)
        if n_bad:
            why = f"{n_bad} of {len(classes)} parent folder names match a name or id in their files' DICOM headers"
    if why is None:
        return True, None
    return False, (f"parent folder names not used as labels: {why}; if they are class names, not identities, "
                   "pass --label-from-folder yes")


def _folder_classes(rels, exts) -> dict[str, int] | None:
    """Parent folder name -> number of inputs in such folders, when every input (non-sidecar) is a
    PNG/JPEG/TIFF by its name inside a sub-folder; else None."""
    classes: dict[str, int] = {}
    folder, name = None, ""
    for r, ext in zip(rels, exts if exts is not None else map(_ext, rels)):
        if ext in R.SIDECAR_EXTS:
            continue
        cut = r.rfind("/")
        if ext not in IMAGE_EXTS or cut < 0:
            return None
        if r[:cut] != folder:
            folder = r[:cut]
            name = folder[folder.rfind("/") + 1:]  # == r.rsplit("/", 2)[-2]
        classes[name] = classes.get(name, 0) + 1
    return classes or None


def _vocabulary_problem(classes: dict[str, int]) -> str | None:
    """Why the folder names are not a small vocabulary shared by many images (None when they are):
    2 to :data:`MAX_AUTO_CLASSES` names, and beyond :data:`SMALL_VOCABULARY` names at least
    :data:`MIN_IMAGES_PER_CLASS` images per name on average (per-patient folders are many, with few images)."""
    n, n_images = len(classes), sum(classes.values())
    if n < 2:
        return "only one parent folder name" if n else None
    if n > MAX_AUTO_CLASSES or (n > SMALL_VOCABULARY and n_images < MIN_IMAGES_PER_CLASS * n):
        return (f"{n} distinct parent folder names for {n_images} images are not a small class vocabulary "
                f"(at most {SMALL_VOCABULARY}, or at most {MAX_AUTO_CLASSES} with {MIN_IMAGES_PER_CLASS} "
                "images each on average)")
    return None


def _folders_named_in_headers(files, rels) -> int:
    """How many parent folder names name a file inside them that is DICOM by content and whose header's
    names or ids the folder's name carries (only the header is read; nothing is kept).

    Every file's first bytes are read (threads hide the latency of network storage): about 10 µs a
    file from the page cache, paid only when the names alone would have been accepted.
    """
    paths = [full for full, _ in files]
    batches = [range(i, min(i + HEAD_BATCH, len(paths))) for i in range(0, len(paths), HEAD_BATCH)]
    with ThreadPoolExecutor(min(HEAD_THREADS, max(1, len(batches)))) as pool:
        dicom = [i for found in pool.map(lambda b: [i for i in b if _is_dicom_file(paths[i])], batches)
                 for i in found]
    bad: set[str] = set()
    for i in dicom:
        rel = rels[i]
        folder = rel[:rel.rfind("/")]
        name = folder[folder.rfind("/") + 1:]
        if name in bad:
            continue
        try:
            ds = R.read_dicom(paths[i], stop_before_pixels=True)
        except R.ReadError:
            continue
        with R.quiet_pydicom():
            identities = header_identity_tokens(ds)
        if folder_name_in_header(name, identities):
            bad.add(name)
    return len(bad)


HEAD_BATCH = 4096  # files per task of the header check
HEAD_THREADS = 8


def _is_dicom_file(full: str) -> bool:
    """Whether a (regular) file is DICOM by content: its first bytes, read without waiting (no FIFO blocks)."""
    try:
        fd = os.open(full, _OPEN_FLAGS)
    except OSError:
        return False
    try:
        head = os.read(fd, R.SNIFF_BYTES)
    except OSError:
        return False
    finally:
        os.close(fd)
    if head[128:132] == b"DICM":
        return True
    if head.startswith((b"\x89PNG", b"\xff\xd8\xff", b"II*\x00", b"MM\x00*")):
        return False
    return R.sniff(full, head=head) == "dicom"


def load_labels(path) -> dict[str, dict]:
    p = Path(path)
    try:
        df = pd.read_csv(p, dtype=str, keep_default_na=False)
    except (OSError, ValueError, pd.errors.ParserError) as e:
        raise UserError(f"{p}: cannot read the labels CSV ({type(e).__name__})") from None
    if "path" not in df.columns:
        raise UserError(f"{p}: the labels CSV needs a 'path' column (file path relative to the source root)")
    bad = [c for c in df.columns if c in MANIFEST_COLUMNS]
    if bad:
        raise UserError(f"{p}: label columns clash with manifest columns: {', '.join(bad)}")
    phi = [c for c in df.columns if c != "path" and _PHI_COLUMN.search(c)]
    if phi:
        raise UserError(f"{p}: columns {', '.join(phi)} look identifying and would be copied into the dataset; "
                        "remove them from the labels CSV")
    df["path"] = df["path"].map(_norm_rel)
    df = df.drop_duplicates()  # the same row twice: harmless
    repeated = df["path"].duplicated(keep=False)
    if repeated.any():  # a path left with several rows has rows that differ
        n = int(df.loc[repeated, "path"].nunique())
        raise UserError(f"{p}: {n} path(s) have several rows with different labels; keep one row per path")
    out = {}
    for rec in df.to_dict("records"):
        out[rec.pop("path")] = rec
    return out


def labels_match_warning(label_map: dict, root_rels: list[str], rels) -> str | None:
    """A warning when the labels CSV's paths match no file, or far fewer files than it has rows (None
    otherwise), with the counts and a hint at the likely cause (never a path)."""
    n_rows = len(label_map)
    if not n_rows:
        return None
    names = set(root_rels)
    names.update(rels)
    matched = sum(k in names for k in label_map)
    if matched >= LABELS_MATCH_FRACTION * n_rows:
        return None
    n_abs = sum(k.startswith("/") or bool(_DRIVE.match(k)) for k in label_map)
    tails = {k.partition("/")[2] for k in label_map if "/" in k}
    if n_abs:
        hint = (f"{n_abs} of its paths are absolute; give each file's path relative to the source folder "
                "(e.g. 'sub/x.png' for SRC/sub/x.png)")
    elif tails and not tails.isdisjoint(names):
        hint = "its paths seem to start with the source folder's own name; give them relative to that folder"
    else:
        hint = ("its paths must be relative to the source folder given to ingest, with '/' separators "
                "(e.g. 'sub/x.png' for SRC/sub/x.png), and spelled as the file names are (case included)")
    return f"labels CSV: {matched} of its {n_rows} paths match a file; {hint}"


LABELS_MATCH_FRACTION = 0.5  # a labels CSV matching fewer of its rows than this is warned about
_DRIVE = re.compile(r"[A-Za-z]:/")


def _norm_rel(p: str) -> str:
    p = str(p).replace("\\", "/").strip()
    while p.startswith("./"):
        p = p[2:]
    return p


# ----------------------------------------------------------------------------- context

class InputFile(NamedTuple):
    """One input file: its index in the sorted file list, its path, and its relative paths (``rel`` as
    the manifest and messages see it, ``root_rel`` relative to its source root: labels CSV, regexes)."""
    i: int
    full: str
    rel: str
    root_rel: str


@dataclass(frozen=True)
class IngestContext:
    """What decoding a file needs besides the file: the options, the pseudonymiser (it holds the
    de-identification key), the labels CSV's rows and the NIfTI slice plan.

    Made once by :func:`ingest`; every chunk gets it explicitly (:class:`ChunkJob`), in this process or
    in a pool worker, whatever the start method (fork or spawn).  The key travels only to the pool's
    workers; the repr shows neither the key (the pseudonymiser's repr is its fingerprint) nor labels.
    """
    out: Path
    pseudo: Pseudonymizer
    max_size: int
    min_size: int
    keep_paths: bool
    modality: str  # of non-DICOM 2-D images
    body_part: str  # of non-DICOM inputs without a keyword in their path ('' when not given)
    ct_window: tuple[float, float]
    mr_percentile: float
    nifti_slices: int
    nifti_max_per_patient: int
    patient_pattern: re.Pattern | None  # --patient-id
    label_from_folder: bool
    label_columns: tuple[str, ...] = ()
    labels: Mapping[str, dict] | None = field(default=None, repr=False)  # labels CSV: relative path -> row
    nifti_plan: Mapping[int, list[int] | None] = field(default_factory=dict, repr=False)  # see plan_nifti

    def for_chunk(self, start: int, files, root_rels) -> IngestContext:
        """This context with the labels and the NIfTI plan of the files ``start, start + 1, ...`` only:
        what a chunk's worker is sent (not the whole labels CSV for every chunk)."""
        labels = self.labels
        if labels is not None:
            labels = {key: labels[key] for (_, rel), root_rel in zip(files, root_rels) for key in (root_rel, rel)
                      if key in labels}
        plan = self.nifti_plan
        if plan:
            plan = {i: plan[i] for i in range(start, start + len(files)) if i in plan}
        return replace(self, labels=labels, nifti_plan=plan)


@dataclass(frozen=True)
class ChunkJob:
    """Chunk ``k`` of the sorted file list: its files and the context they need (picklable, small)."""
    k: int
    start: int  # index of its first file in the sorted file list
    files: Sequence[tuple[str, str]] = field(repr=False)  # (path, relative path), as scan_sources gives them
    root_rels: Sequence[str] = field(repr=False)
    ctx: IngestContext = field(repr=False)

    def inputs(self) -> Iterator[InputFile]:
        for j, ((full, rel), root_rel) in enumerate(zip(self.files, self.root_rels)):
            yield InputFile(self.start + j, full, rel, root_rel)


def chunk_jobs(ctx: IngestContext, files, root_rels, chunks, chunk_size: int) -> list[ChunkJob]:
    """A :class:`ChunkJob` for each chunk of ``chunks``, its context cut down to its files."""
    jobs = []
    for k in chunks:
        start, stop = k * chunk_size, min((k + 1) * chunk_size, len(files))
        part, part_roots = files[start:stop], root_rels[start:stop]
        jobs.append(ChunkJob(k, start, part, part_roots, ctx.for_chunk(start, part, part_roots)))
    return jobs


class _Output(NamedTuple):
    """Where a chunk's images go: its shard writer (or :class:`_CollectWriter`) and the shard's file name."""
    writer: object
    shard_name: str


# ----------------------------------------------------------------------------- NIfTI plan

def plan_nifti(files, root_rels, ctx: IngestContext) -> dict[int, list[int] | None]:
    """Slice indices per NIfTI file (by index in the file list); capped per patient, deterministic."""
    plan, used = {}, {}
    if not _may_hold_nifti(files):
        return plan
    for i, ((full, rel), root_rel) in enumerate(zip(files, root_rels)):
        if not rel.lower().endswith(NIFTI_EXTS):
            continue
        try:
            shape = R.nifti_shape(full)
        except R.ReadError:
            continue  # the worker records it as unreadable
        n = shape[2] if len(shape) >= 3 else 1
        pid, _ = _patient_from_path(root_rel, rel, ctx)
        left = ctx.nifti_max_per_patient - used.get(pid, 0)
        idx = R.nifti_slice_indices(n, ctx.nifti_slices)[: max(0, left)]
        used[pid] = used.get(pid, 0) + len(idx)
        plan[i] = idx
    return plan


# ----------------------------------------------------------------------------- worker

_NAN = float("nan")


def _patient_from_path(root_rel: str, rel: str, ctx: IngestContext) -> tuple[str, str]:
    pseudo = ctx.pseudo
    pattern = ctx.patient_pattern
    if pattern is not None:
        m = pattern.search(root_rel)
        if m:
            value = m.group(1) if m.groups() else m.group(0)
            if value:
                return pseudo.patient(value), "regex"  # same pseudonym as a DICOM PatientID of that value
    return pseudo.token("patient", f"\x00file:{rel}"), "per-file"  # == pseudo.patient(...), used once: not memoised


def chunk_name(k: int) -> str:
    return f"chunk-{k:06d}"


def _chunk_paths(out: Path, k: int):
    name = chunk_name(k)
    return out / SHARD_DIR / f"{name}.bin", out / WORK_DIR / CHUNK_DIR / f"{name}.parquet", out / WORK_DIR / CHUNK_DIR / f"{name}.json"


class _CollectWriter:
    """Stands in for a ShardWriter in an isolated child process: keeps the images to send back."""

    def __init__(self):
        self.images = []

    def append(self, img) -> int:
        self.images.append(np.ascontiguousarray(img))
        return -1


def _isolated_child(conn, f: InputFile, ctx: IngestContext, shard_name: str) -> None:
    writer = _CollectWriter()
    rows, sidecar = _process_file(f, ctx, _Output(writer, shard_name))
    conn.send((rows, sidecar, writer.images))
    conn.close()


def _process_file_isolated(f: InputFile, ctx: IngestContext, out: _Output):
    """Like :func:`_process_file`, but decoded in a child process: a decoder crash only quarantines this file."""
    mpctx = mp.get_context("fork")
    recv, send = mpctx.Pipe(duplex=False)
    child = mpctx.Process(target=_isolated_child, args=(send, f, ctx, out.shard_name))
    child.start()
    send.close()
    try:
        rows, sidecar, images = recv.recv()
    except EOFError:  # the child died without an answer
        rows, sidecar, images = None, 0, []
    child.join()
    recv.close()
    if rows is None:
        kind = R.sniff(f.full)
        fmt = kind if kind in ("dicom", "png", "jpeg", "tiff", "nifti", "npz") else "unknown"
        row = _base_row(f, ctx, fmt, 0, (f.i, 0))
        row["reason"] = "worker_crash"
        return [row], 0
    it = iter(images)
    for row in rows:
        if row["status"] == "ingested":
            row["offset"] = int(out.writer.append(next(it)))
    return rows, sidecar


def process_chunk(job: ChunkJob, isolate: bool = False, commit: bool = True, parent_pid: int | None = None) -> dict:
    """Decode, QC and store one chunk of files; commit shard, stats and manifest atomically (manifest last).

    ``isolate``: decode every file in its own child process (used to redo a chunk whose worker died).
    ``commit=False`` (pool workers): the shard and the chunk manifest are left complete under their
    temporary names and returned as ``pending``; the caller commits them with :func:`commit_chunk`
    (shard synced to disk and renamed, then the manifest renamed), so a worker goes on with its next
    chunk instead of waiting for the disk.  Until then the chunk counts as not done.
    ``parent_pid`` (pool workers): the ingest process; a worker it left behind (killed) commits nothing.
    """
    ctx, k = job.ctx, job.k
    shard_path, parquet_path, stats_path = _chunk_paths(ctx.out, k)
    slots, sidecars = [], 0  # per file, in order: its rows, or an image file's facts to make its row from
    writer = ShardWriter(shard_path)
    out = _Output(writer, shard_path.name)
    try:
        for f in job.inputs():
            if parent_pid is not None and os.getppid() != parent_pid:  # orphaned by a killed parent: commit nothing
                raise SystemExit(1)
            if isolate:
                new_rows, is_sidecar = _process_file_isolated(f, ctx, out)
            else:
                kind, data = _open_and_sniff(f.full)
                if data is not None:  # PNG/JPEG/TIFF: decoded and stored now, its row made after the loop
                    slots.append((f, kind, _image_file_facts(kind, data, ctx, out)))
                    continue
                new_rows, is_sidecar = _process_file(f, ctx, out, sniffed=(kind, data))
            sidecars += is_sidecar
            slots.append(new_rows)
        writer.close(commit=commit)
    except BaseException:
        writer.abort()
        raise
    tmp = parquet_path.with_name(f".{parquet_path.name}.{os.getpid()}.tmp")
    n_files = len(job.files)
    try:
        rows = []
        for slot in slots:
            if isinstance(slot, list):
                rows.extend(slot)
            else:
                rows.append(_image_file_row_from(*slot, ctx))
        write_json(stats_path, {"chunk": k, "files": n_files, "sidecar_skipped": sidecars, "rows": len(rows)})
        table = _write_rows(rows, tmp)
    except BaseException:
        if not commit:
            writer.tmp.unlink(missing_ok=True)
        tmp.unlink(missing_ok=True)
        raise
    # the manifest table goes back to the caller too: equal to what reading the file gives, without the read
    res = {"chunk": k, "files": n_files, "sidecar_skipped": sidecars, "table": table, "pending": None}
    if commit:
        os.replace(tmp, parquet_path)
    else:
        res["pending"] = (str(writer.tmp), str(shard_path), str(tmp), str(parquet_path))
    return res


def commit_chunk(pending) -> None:
    """Commit what :func:`process_chunk` left pending: the shard synced and renamed, then the manifest renamed."""
    shard_tmp, shard_path, manifest_tmp, manifest_path = pending
    commit_file(shard_tmp, shard_path)
    os.replace(manifest_tmp, manifest_path)


def _write_rows(rows: list[dict], path: Path):
    """A chunk manifest: the rows as one Parquet table (straight from the dicts, no DataFrame); returns the table.

    Reading the file back gives the same table (schema and values: strings, int64, float64, all-null
    columns as null), so the caller can keep the table instead of reading the file.
    """
    table = pa.Table.from_pylist(rows) if rows else pa.table({})
    try:
        pq.write_table(table, path)
    except OSError as e:  # Arrow's errors name no file (e.g. disk full)
        raise OSError(e.errno, e.strerror or str(e), str(path)) from None
    return table


def _read_chunk_table(path):
    """A chunk manifest as written by :func:`_write_rows` (one file: no dataset discovery)."""
    return pq.ParquetFile(path).read()


def _base_row(f: InputFile, ctx: IngestContext, fmt, item_key, order) -> dict:
    rel, root_rel = f.rel, f.root_rel
    pid, pid_source = _patient_from_path(root_rel, rel, ctx)
    token = ctx.pseudo.token  # image/study/series/path pseudonyms, as pseudo.image(rel, item_key), pseudo.study(...), ...
    file_rel = f"file:{rel}"
    row = {
        "image_id": token("image", f"{rel}#{item_key}"), "patient_id": pid,
        "study_id": token("study", file_rel), "series_id": token("series", file_rel),
        "modality": "OT", "body_part": "unknown", "view": "unknown", "age_years": _NAN, "sex": "unknown",
        "height": 0, "width": 0, "orig_height": 0, "orig_width": 0,
        "source": storable_text(rel) if ctx.keep_paths else token("path", rel), "source_format": fmt,
        "content_hash": "", "status": "quarantined", "reason": "", "shard": "", "offset": -1,
        "_file": int(order[0]), "_item": int(order[1]), "_pid_source": pid_source,
    }
    if ctx.label_columns:  # a labels CSV with label columns (its rows: those of this chunk's files)
        labels = ctx.labels
        rec = labels.get(root_rel) or labels.get(rel)
        for col in ctx.label_columns:
            row[col] = rec.get(col) if rec else None
    if ctx.label_from_folder:
        row["label"] = storable_text(root_rel.rsplit("/", 2)[-2]) if "/" in root_rel else ""
    return row


def storable_text(text: str) -> str:
    """``text`` as the manifest (UTF-8) can hold it: the bytes of a file name that are not UTF-8 (which
    Python keeps as surrogate escapes) become ``\\xNN``, as ``ls -b`` shows them; other text is unchanged."""
    if text.isascii():
        return text
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def _fill_meta(row, meta, ctx: IngestContext, root_rel: str):
    fmt = meta["source_format"]
    if fmt == "dicom":
        pseudo = ctx.pseudo
        row["modality"] = meta["modality"]
        row["body_part"], row["view"] = meta["body_part"], meta["view"]
        row["sex"], row["age_years"] = meta["sex"], meta["age_years"]
        if meta["patient_id"]:
            row["patient_id"], row["_pid_source"] = pseudo.patient(meta["patient_id"]), "dicom"
        if meta["study_uid"]:
            row["study_id"] = pseudo.study(meta["study_uid"])
        if meta["series_uid"]:
            row["series_id"] = pseudo.series(meta["series_uid"])
    else:
        row["modality"] = meta["modality"] if fmt == "nifti" else ctx.modality
        body, view = _path_facts(root_rel)
        row["body_part"] = body or ctx.body_part or "unknown"
        row["view"] = view or "unknown"  # == V.normalise_view(None, root_rel)


@functools.lru_cache(maxsize=1 << 14)
def _cached_folder_facts(folder: str) -> tuple[str | None, str | None]:
    """``vocab.text_facts(folder)``, cached per process (the files of a folder come together)."""
    return V.text_facts(folder)


def _path_facts(root_rel: str) -> tuple[str | None, str | None]:
    """``vocab.text_facts(root_rel)`` (body part keyword, view word), the folder's part looked up once per folder.

    Words never span a '/', so the path's words are its folder's followed by its name's.
    """
    folder, _, name = root_rel.rpartition("/")
    facts = _cached_folder_facts(folder)
    if facts[0] is not None and facts[1] is not None:
        return facts
    body, view = V.text_facts(name)
    return (facts[0] if facts[0] is not None else body), (facts[1] if facts[1] is not None else view)


def _decode_into(row, load, f: InputFile, ctx: IngestContext, out: _Output, source_format=None) -> None:
    """One slice/array image of a multi-image input: decode, fill the row, store; a ReadError
    becomes the row's quarantine reason instead of stopping the file's other images."""
    try:
        dec = load()
        if source_format:
            dec.meta["source_format"] = source_format
        _fill_meta(row, dec.meta, ctx, f.root_rel)
        _store_image(row, dec, ctx, out)
    except R.ReadError as e:
        row["reason"] = e.reason


def _store_image(row, dec: R.Decoded, ctx: IngestContext, out: _Output):
    """QC and store one decoded image: ``dec.stored`` (== ``readers.load_stored``), hashed for duplicates."""
    meta = dec.meta
    row["orig_height"], row["orig_width"] = dec.shape
    if meta.get("raw_constant") or dec.is_blank():
        row["reason"] = "blank"
        return
    if min(dec.shape) < ctx.min_size:
        row["reason"] = "too_small"
        return
    small = dec.stored(ctx.max_size)
    row["content_hash"] = R.content_hash(small)  # duplicates: the same stored pixels
    row["offset"] = int(out.writer.append(small))
    row["shard"] = out.shard_name
    row["height"], row["width"] = int(small.shape[0]), int(small.shape[1])
    row["status"] = "ingested"


def _open_and_sniff(full: str) -> tuple[str, bytes | None]:
    """(kind by content, the whole file for PNG/JPEG/TIFF else None): one open for sniffing and decoding.

    Plain system calls (no file object): the head, then the whole file from its start up to its end
    (normally one read, so the bytes are not joined from pieces).  Only a regular file is read: the open
    does not wait (``O_NONBLOCK``: a FIFO that replaced a file since the scan would block it forever), and
    anything else is ``unreadable``.
    """
    try:
        fd = os.open(full, _OPEN_FLAGS)
    except OSError:
        return "unreadable", None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            return "unreadable", None
        head = os.read(fd, R.SNIFF_BYTES)
        kind = R.sniff(full, head=head)
        if kind not in R.IMAGE_KINDS:
            return kind, None
        size = st.st_size
        parts, off = [], 0
        while more := os.pread(fd, max(size + 1 - off, 1 << 16), off):  # whole file, normally in one read
            parts.append(more)
            off += len(more)
        return kind, (parts[0] if len(parts) == 1 else b"".join(parts))
    except OSError:
        return "unreadable", None
    finally:
        os.close(fd)


def _image_file_facts(kind, data, ctx: IngestContext, out: _Output) -> dict:
    """First half of a PNG/JPEG/TIFF file's row (``data``: its bytes): decode, QC and store it; the row
    fields this sets (``_decoded``: the decoder succeeded; ``_error``: an unexpected exception's type).

    Split from :func:`_image_file_row` so that a chunk can decode all its files in one tight loop and
    make their rows (pseudonyms, path facts) in another: alternating the two per file cost ~30 µs per
    file more, the decoder having pushed the row code out of the CPU caches each time.
    """
    facts: dict = {}
    try:
        dec = R.load_image(io.BytesIO(data), kind=kind, decoded=True, max_size=ctx.max_size)
        facts["_decoded"] = True
        _store_image(facts, dec, ctx, out)
    except R.ReadError as e:
        facts["reason"] = e.reason
    except MemoryError:
        facts["reason"] = "too_large"
    except Exception as e:  # one bad file never stops the run; no message text (it may quote header values)
        facts["reason"] = "decode_error"
        facts["_error"] = type(e).__name__
    return facts


def _image_file_row_from(f: InputFile, kind, facts, ctx: IngestContext) -> dict:
    """Second half: the manifest row of an image file from what :func:`_image_file_facts` found."""
    row = _base_row(f, ctx, kind, 0, (f.i, 0))
    if facts.pop("_decoded", False):
        row["modality"] = ctx.modality  # _fill_meta of a non-DICOM image
        body, view = _path_facts(f.root_rel)
        row["body_part"] = body or ctx.body_part or "unknown"
        row["view"] = view or "unknown"
    if error := facts.pop("_error", None):
        log.debug("file %s: unexpected %s", row["source"], error)
    row.update(facts)
    if row["status"] != "ingested":
        row["shard"], row["offset"], row["height"], row["width"] = "", -1, 0, 0
    return row


def _image_file_row(f: InputFile, kind, data, ctx: IngestContext, out: _Output) -> dict:
    """The row of one PNG/JPEG/TIFF file (``data``: its bytes): what :func:`_process_file`'s general
    path makes of it, with only the steps such a file needs."""
    return _image_file_row_from(f, kind, _image_file_facts(kind, data, ctx, out), ctx)


def _process_file(f: InputFile, ctx: IngestContext, out: _Output, sniffed=None):
    """All manifest rows of one file (one per image/frame/slice); (rows, 1 if sidecar else 0).

    ``sniffed``: what :func:`_open_and_sniff` gave for the file when the caller called it already.
    """
    i, full, rel, root_rel = f
    pseudo = ctx.pseudo
    kind, data = sniffed or _open_and_sniff(full)
    if data is not None:  # a PNG/JPEG/TIFF, read already: the short way
        return [_image_file_row(f, kind, data, ctx, out)], 0
    if kind == "sidecar":
        return [], 1
    fmt = kind if kind in ("dicom", "png", "jpeg", "tiff", "nifti", "npz") else "unknown"
    opts = {"ct_window": ctx.ct_window, "mr_percentile": ctx.mr_percentile, "decoded": True,
            "max_size": ctx.max_size}
    rows = []
    try:
        if kind == "nifti":
            idx = ctx.nifti_plan.get(i)
            if idx is None:
                raise R.ReadError("unreadable")
            if not idx:
                row = _base_row(f, ctx, fmt, "z", (i, 0))
                row["reason"] = "patient_slice_cap"
                return [row], 0
            for j, z in enumerate(idx):
                row = _base_row(f, ctx, fmt, f"z{z}", (i, j))
                _decode_into(row, lambda: R.load_image(full, index=z, kind="nifti", **opts), f, ctx, out)
                rows.append(row)
            return rows, 0
        if kind == "npz":
            keys = R.npz_image_keys(full)
            if not keys:
                raise R.ReadError("no_pixel_data")
            with np.load(full, allow_pickle=False) as z:
                for key, n, lab_key in keys:
                    arr = z[key]
                    labs = z[lab_key] if lab_key else None
                    for j in range(n):
                        row = _base_row(f, ctx, fmt, f"{key}/{j}", (i, len(rows)))
                        row["patient_id"] = pseudo.token("patient", f"\x00file:{rel}#{key}/{j}")
                        row["study_id"] = pseudo.study(f"file:{rel}#{key}/{j}")
                        row["series_id"] = pseudo.series(f"file:{rel}#{key}/{j}")
                        row["_pid_source"] = "per-file"
                        if labs is not None:
                            lv = np.asarray(labs[j]).reshape(-1)
                            # text like folder and CSV labels (typed once, at finalise): a chunk
                            # that mixes NPZ and folder labels must not hold ints and strings
                            row["label"] = ",".join(str(int(v)) for v in lv)
                        _decode_into(row, lambda: R.load_image(np.asarray(arr[j]), **opts), f, ctx, out,
                                     source_format="npz")
                        rows.append(row)
            return rows, 0
        row = _base_row(f, ctx, fmt, 0, (i, 0))
        rows.append(row)
        if kind == "dicom":
            ds = R.read_dicom(full)
            with R.quiet_pydicom():
                facts = R.dicom_meta(ds)
                _fill_meta(row, facts, ctx, root_rel)  # kept even if decoding fails
            dec = R.load_image(ds, index=0, dicom_facts=facts, **opts)
        elif kind in R.IMAGE_KINDS:
            dec = R.load_image(io.BytesIO(data), kind=kind, **opts)
        elif kind == "unreadable":
            raise R.ReadError("unreadable")
        elif kind == "empty":
            raise R.ReadError("empty_file")
        else:
            raise R.ReadError("not_dicom_or_image")
        _fill_meta(row, dec.meta, ctx, root_rel)
        _store_image(row, dec, ctx, out)
    except R.ReadError as e:
        if not rows:
            rows.append(_base_row(f, ctx, fmt, 0, (i, 0)))
        rows[-1]["reason"] = e.reason
    except MemoryError:
        if not rows:
            rows.append(_base_row(f, ctx, fmt, 0, (i, 0)))
        rows[-1]["reason"] = "too_large"
    except Exception as e:  # one bad file never stops the run; no message text (it may quote header values)
        if not rows:
            rows.append(_base_row(f, ctx, fmt, 0, (i, 0)))
        rows[-1]["reason"] = "decode_error"
        log.debug("file %s: unexpected %s", rows[-1]["source"], type(e).__name__)
    for r in rows:
        if r["status"] != "ingested":
            r["shard"], r["offset"], r["height"], r["width"] = "", -1, 0, 0
    return rows, 0


# ----------------------------------------------------------------------------- driver

def _fingerprint(pseudo, files, cfg_public) -> str:
    h = hashlib.sha256()
    if files:  # each relative path followed by NUL, in one piece
        h.update(("\x00".join(map(itemgetter(1), files)) + "\x00").encode("utf-8", "surrogateescape"))
    h.update(json.dumps(cfg_public, sort_keys=True).encode())
    return pseudo.token("plan", h.hexdigest())


def _parse_partition(text) -> tuple[int, int] | None:
    if not text:
        return None
    m = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", str(text))
    if not m or not (1 <= int(m.group(1)) <= int(m.group(2))):
        raise UserError(f"--partition {text!r}: expected i/N with 1 <= i <= N, e.g. 1/4")
    return int(m.group(1)), int(m.group(2))


def ingest(sources, out, *, labels=None, patient_id=None, label_from_folder="auto", max_size=512, min_size=32,
           workers=0, chunk_size=256, keep_paths=False, partition=None, nifti_slices=5,
           nifti_max_per_patient=50, ct_window=I.CT_WINDOW, mr_percentile=I.MR_PERCENTILE, modality="XR",
           body_part=None, key: bytes | None = None, progress: bool = True) -> dict:
    """Ingest ``sources`` into the store ``out`` (resuming a previous run); returns the QC summary."""
    out = Path(out)
    check_store_location(out, sources)
    part = _parse_partition(partition)
    if patient_id:
        try:
            re.compile(patient_id)
        except re.error as e:
            raise UserError(f"--patient-id {patient_id!r}: not a valid regular expression ({e})") from None
    if chunk_size < 1 or max_size < 8:
        raise UserError("--chunk-size must be >= 1 and --max-size >= 8")
    pseudo = Pseudonymizer(key)
    scanned: dict = {}
    files, root_rels = scan_sources(sources, scanned)
    if not files:
        raise UserError(f"{', '.join(map(str, sources))}: no files found (names starting with '.' are skipped)")
    label_map = load_labels(labels) if labels else None
    label_cols = sorted({c for rec in label_map.values() for c in rec}) if label_map else []
    exts = [_ext(r) for r in root_rels]  # a prefix (several sources) is a folder: same extensions as ``files``
    warnings = [NOT_REGULAR_WARNING % scanned["not_regular"]] if scanned.get("not_regular") else []
    lff, refused = folder_label_decision(label_from_folder, root_rels, bool(label_map), exts, files)
    for w in (refused, label_map and labels_match_warning(label_map, root_rels, map(itemgetter(1), files))):
        if w:
            log.warning("%s", w)
            warnings.append(w)
    public = {
        "max_size": max_size, "min_size": min_size, "chunk_size": chunk_size, "keep_paths": bool(keep_paths),
        "patient_regex": patient_id or "", "label_from_folder": lff, "nifti_slices": nifti_slices,
        "nifti_max_per_patient": nifti_max_per_patient, "ct_window": [float(v) for v in ct_window],
        "mr_percentile": float(mr_percentile), "modality": modality, "body_part": body_part or "",
        "labels_sha256": hashlib.sha256(Path(labels).read_bytes()).hexdigest() if labels else "",
        "intensity": I.INTENSITY_VERSION, "resize": I.RESIZE_VERSION, "content_hash": CONTENT_HASH,
    }
    fp = _fingerprint(pseudo, files, public)
    n_chunks = max(1, math.ceil(len(files) / chunk_size)) if files else 0
    work = out / WORK_DIR
    plan_path = work / "plan.json"
    _check_resumable(out, plan_path, fp)
    mine = [k for k in range(n_chunks) if part is None or k % part[1] == part[0] - 1]
    try:
        (work / CHUNK_DIR).mkdir(parents=True, exist_ok=True)
        (out / SHARD_DIR).mkdir(parents=True, exist_ok=True)
        write_json(plan_path, {"fingerprint": fp, "n_files": len(files), "n_chunks": n_chunks,
                               "chunk_size": chunk_size, "key_fingerprint": pseudo.fingerprint(), "options": public,
                               "label_from_folder_mode": label_from_folder, "warnings": warnings})
        _remove_tmp(out)
        # a finished store (its manifest written) is checked down to its pixels' hashes, a resumed one for sizes
        intact, damaged = check_chunks(out, mine, deep=(out / "manifest.parquet").is_file())
        todo = [k for k in mine if k not in intact]
        ctx = IngestContext(
            out=out, pseudo=pseudo, max_size=max_size, min_size=min_size, keep_paths=bool(keep_paths),
            modality=modality, body_part=body_part or "", ct_window=tuple(public["ct_window"]),
            mr_percentile=public["mr_percentile"], nifti_slices=nifti_slices,
            nifti_max_per_patient=nifti_max_per_patient, patient_pattern=re.compile(patient_id) if patient_id else None,
            label_from_folder=lff, label_columns=tuple(label_cols), labels=label_map)
        ctx = replace(ctx, nifti_plan=plan_nifti(files, root_rels, ctx))
        log.info("%d files, %d chunks (%d to do)%s", len(files), len(mine), len(todo),
                 f", partition {part[0]}/{part[1]}" if part else "")
        done = _run_chunks(chunk_jobs(ctx, files, root_rels, todo, chunk_size), workers, progress, files, exts)
        summary = finalise(out, mine, partition=part, done={**intact, **done})
    except OSError as e:
        if not is_disk_full(e):
            raise
        _remove_tmp_quietly(out)  # what the failed writes left: the free space said is then the real one
        raise disk_full_error(out, e, mine, len(files), max_size) from None
    if damaged:
        summary["repaired_chunks"] = len(damaged)
    return summary


def _check_resumable(out: Path, plan_path: Path, fp: str) -> None:
    """``out`` is new, empty, or an ingest of the same plan (resumed, or repaired when finished)."""
    if plan_path.is_file():
        try:
            old = read_json(plan_path)
        except (OSError, ValueError):
            raise UserError(f"{plan_path}: cannot be read, so this ingest cannot be resumed or repaired; "
                            "delete the folder and run the command again (or use another --out)") from None
        if not isinstance(old, dict) or old.get("fingerprint") != fp:
            raise UserError(f"{out}: holds an ingest of other files, options or de-id key; "
                            "use another --out (or delete it to start again)")
    elif (out / "store.json").is_file() or (out / "manifest.parquet").is_file():
        raise UserError(f"{out}: holds a store without its {WORK_DIR} folder, so it cannot be resumed or repaired "
                        "in place; ingest into a new folder (or delete this one and run again)")
    elif out.exists() and any(out.iterdir()):
        raise UserError(f"{out}: exists and is not an ingest in progress; choose an empty or new folder")


def check_chunks(out: Path, chunks, deep: bool = False, remove: bool = True) -> tuple[dict, list[int]]:
    """({chunk: (manifest table, sidecar count)} of the committed chunks that are intact, [damaged chunks]).

    A committed chunk is damaged when its manifest or stats cannot be read, or its shard is missing or not
    exactly as long as its images (``deep``: or an image's pixels lack their ``content_hash``).  It is
    warned about, with the count, and (``remove``) its files are removed, so it is redone like a chunk
    never done.
    """
    intact, damaged = {}, []
    for k in chunks:
        if not _chunk_paths(out, k)[1].is_file():
            continue
        state = chunk_state(out, k, deep)
        if state is None:
            damaged.append(k)
            for p in _chunk_paths(out, k) if remove else ():
                p.unlink(missing_ok=True)
        else:
            intact[k] = state
    if damaged:
        log.warning("%d chunk(s) of the store are damaged (shards %s); they are done again", len(damaged),
                    ", ".join(chunk_name(k) for k in damaged[:10]) + (", ..." if len(damaged) > 10 else ""))
    return intact, damaged


def chunk_state(out: Path, k: int, deep: bool = False) -> tuple | None:
    """(manifest table, sidecar count) of committed chunk ``k`` when intact (see :func:`check_chunks`), else None."""
    shard, manifest, stats_path = _chunk_paths(out, k)
    columns = ["status", "offset", "height", "width", "content_hash"]
    try:
        table = _read_chunk_table(manifest)
        n_sidecars = int(read_json(stats_path)["sidecar_skipped"]) if stats_path.is_file() else 0
        rows = table.select(columns).to_pandas() if table.num_rows else pd.DataFrame(columns=columns)
    except (OSError, ValueError, KeyError, TypeError, pa.ArrowException):
        return None
    rows = rows[rows["status"] == "ingested"]
    size, needed, bad = check_shard(shard, rows["offset"].to_numpy(), rows["height"].to_numpy(),
                                    rows["width"].to_numpy(), rows["content_hash"].to_numpy() if deep else None)
    if len(bad) or (size is not None and size != needed) or (size is None and needed):
        return None
    return table, n_sidecars


def is_disk_full(e: OSError) -> bool:
    return e.errno in (errno.ENOSPC, errno.EDQUOT) or "No space left on device" in str(e)


def disk_full_error(out: Path, e: OSError, chunks, n_files: int, max_size: int) -> UserError:
    """The one-line error for a full disk: the file being written, free space, and about how much more is needed."""
    where = e.filename or out
    free = _free(out)
    done, shards, manifests = 0, 0, 0
    for k in chunks:
        shard, manifest, _ = _chunk_paths(out, k)
        if manifest.is_file():
            done += 1
            manifests += manifest.stat().st_size
            shards += shard.stat().st_size if shard.is_file() else 0
    if done:  # the chunks left like those done, then the manifest (about all chunk manifests together)
        per_chunk = (shards + manifests) / done
        need = f"about {_size(per_chunk * (len(chunks) - done) + manifests / done * len(chunks))} more"
    else:
        need = f"up to {_size(n_files * max_size * max_size)} (images stored at most {max_size} x {max_size})"
    return UserError(f"{where}: no space left on device ({free} free; this ingest needs {need}); free some "
                     "space and run the same command again: it resumes where it stopped")


def _remove_tmp_quietly(out: Path) -> None:
    try:
        _remove_tmp(out)
    except OSError:
        pass


def _free(out: Path) -> str:
    try:
        return _size(shutil.disk_usage(out if out.exists() else out.parent).free)
    except OSError:
        return "unknown"


def _size(n: float) -> str:
    for unit in ("bytes", "KB", "MB", "GB"):
        if n < 1000:
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


def _remove_tmp(out: Path) -> None:
    for d in (out / SHARD_DIR, out / WORK_DIR / CHUNK_DIR, out / WORK_DIR, out):
        if d.is_dir():
            for p in d.iterdir():
                if p.name.endswith(".tmp"):
                    p.unlink(missing_ok=True)


def _preimport(files, exts=None) -> None:
    """Import the decoders the files may need once before forking, so each worker does not pay for it.

    pydicom is skipped when every file is named as a PNG/JPEG/TIFF and nibabel
    when none is named as NIfTI (a worker still imports them if a file needs them): both are heavy,
    hence imported here, in a function, and only when needed.
    """
    Image.init()
    if not all(e in IMAGE_EXTS for e in (exts if exts is not None else (_ext(rel) for _, rel in files))):
        import pydicom.pixels  # noqa: F401  (heavy: preloaded before forking)
    if _may_hold_nifti(files) and any(rel.lower().endswith(NIFTI_EXTS) for _, rel in files):
        import nibabel  # noqa: F401  (heavy, optional: preloaded before forking)


def _may_hold_nifti(files) -> bool:
    """False when no relative path contains '.nii' (a quick test for the whole list)."""
    return ".nii" in "\n".join(map(itemgetter(1), files)).lower()


def _run_chunks(jobs: list[ChunkJob], workers, progress, files, exts=None) -> dict:
    """Process the chunks of ``jobs`` (a pool of workers, or this process).

    Returns {chunk: (its manifest table, its sidecar count)} of the chunks done here, so that
    finalisation need not read them back from their files.

    Each job carries its context (:class:`IngestContext`, cut down to its files), so a worker needs
    nothing from the parent but the job: the pool has no initializer and the workers no globals.
    No thread limits are set (threadpoolctl): a worker runs nothing multi-threaded (colour-to-grey's
    matmul on an H x W x 3 image starts no BLAS thread: checked in a forked process up to 3000 x 4000
    and 100 x 20000), while setting OpenBLAS's thread count in a forked process starts a BLAS thread
    that spins for ~0.13 s of CPU before it sleeps (measured), per worker, or in the parent when its
    limit is restored after the pool: a cost a seconds-long ingest felt.
    """
    done: dict = {}
    if not jobs:
        return done
    n_workers = workers or os.cpu_count() or 1
    n_workers = max(1, min(n_workers, len(jobs)))
    total = sum(len(job.files) for job in jobs)
    bar = tqdm(total=total, unit="file", desc="ingest", file=sys.stderr, disable=None if progress else True)
    try:
        if n_workers == 1:
            for job in jobs:
                res = process_chunk(job)
                done[job.k] = (res["table"], res["sidecar_skipped"])
                bar.update(res["files"])
        else:
            _preimport(files, exts)
            mpctx = mp.get_context("fork") if "fork" in mp.get_all_start_methods() else mp.get_context("spawn")
            gc.freeze()  # the parent's objects stay out of the workers' collections: no copy-on-write of its heap
            try:
                with ProcessPoolExecutor(n_workers, mp_context=mpctx) as pool:
                    # workers leave each chunk pending; committing it (the disk sync) is this process's job
                    futures = {pool.submit(process_chunk, job, False, False, os.getpid()): job.k for job in jobs}
                    try:
                        for fut in as_completed(futures):
                            res = fut.result()
                            commit_chunk(res["pending"])
                            done[res["chunk"]] = (res["table"], res["sidecar_skipped"])
                            bar.update(res["files"])
                        broken = False
                    except OSError:  # e.g. the disk is full: stop, do not start the chunks left
                        pool.shutdown(wait=True, cancel_futures=True)
                        raise
                    except BrokenProcessPool:
                        broken = True
                        for fut, k in futures.items():  # chunks finished before the break: keep them
                            if k not in done and fut.done() and not fut.cancelled() and fut.exception() is None:
                                res = fut.result()
                                commit_chunk(res["pending"])
                                done[k] = (res["table"], res["sidecar_skipped"])
            finally:
                gc.unfreeze()
            if broken:  # a decoder crashed (or memory ran out): redo the unfinished chunks file by file
                out = jobs[0].ctx.out
                left = [job for job in jobs if not _chunk_paths(out, job.k)[1].is_file()]
                log.warning("a worker process died; redoing %d chunk(s) with each file decoded in its own process",
                            len(left))
                for job in left:
                    res = process_chunk(job, isolate=True)
                    done[job.k] = (res["table"], res["sidecar_skipped"])
                    bar.update(res["files"])
                _remove_tmp(out)  # what the dead worker (or a lost result) left behind
    finally:
        bar.close()
    return done


# ----------------------------------------------------------------------------- finalisation

def _read_chunks(out: Path, chunks, done=None) -> tuple[pd.DataFrame, int]:
    """The chunk manifests, concatenated in chunk order (one Arrow table, one conversion), and the sidecar count.

    ``done``: {chunk: (manifest table, sidecar count)} of chunks this process has just committed
    (the same as their files hold); the others are read from their files.
    """
    done = done or {}
    tables, sidecars = [], 0
    for k in chunks:
        if k in done:
            table, n_sidecars = done[k]
        else:
            _, path, st = _chunk_paths(out, k)
            if not path.is_file():
                raise UserError(f"{out}: chunk {k} is missing; run the ingest again to finish it")
            table = _read_chunk_table(path)
            n_sidecars = int(read_json(st)["sidecar_skipped"]) if st.is_file() else 0
        if table.num_rows:
            tables.append(table)
        sidecars += n_sidecars
    if not tables:
        return pd.DataFrame(columns=MANIFEST_COLUMNS), sidecars
    # label columns absent from a chunk (or all-null there) are filled with nulls
    return pa.concat_tables(tables, promote_options="default").to_pandas(), sidecars


def finalise(out: Path, chunks, partition=None, done=None) -> dict:
    """Concatenate chunk manifests (in order), mark duplicates, write manifest, QC summary and store.json.

    ``done``: what :func:`_run_chunks` returns (chunks whose manifests need not be read back).
    """
    out = Path(out)
    plan = read_json(out / WORK_DIR / "plan.json")
    df, sidecars = _read_chunks(out, chunks, done)
    if len(df):
        order = df["_file"].to_numpy() * (1 + int(df["_item"].max())) + df["_item"].to_numpy()
        if (np.diff(order) < 0).any():  # chunks hold files in order: normally sorted already
            df = df.sort_values(["_file", "_item"], kind="stable")
        df = df.reset_index(drop=True)
        pid_sources = df.loc[df["status"] == "ingested", "_pid_source"].value_counts().to_dict()
        df = df.drop(columns=_INTERNAL)
    else:
        pid_sources = {}
    for c in MANIFEST_COLUMNS:
        if c not in df.columns:
            df[c] = pd.Series(dtype=object)
    df = mark_duplicates(df)
    labels = label_columns(df)
    df = typed(df, labels)
    write_manifest(out, df)
    pid_source = weakest_patient_id_source(pid_sources)
    summary = qc_summary(df, sidecars)
    summary["patient_id_source"] = pid_source
    summary["patient_id_sources"] = {k: int(v) for k, v in pid_sources.items()}
    if opts_label := plan.get("options", {}).get("label_from_folder"):
        summary["label_from_folder"] = bool(opts_label)
        summary["label_from_folder_decision"] = _label_decision(plan)
        summary["n_folder_labels"] = int(df["label"].nunique()) if "label" in df.columns else 0
    if plan.get("warnings"):
        summary["warnings"] = list(plan["warnings"])
    if partition:
        summary["partition"] = f"{partition[0]}/{partition[1]}"
    write_json(out / "qc_summary.json", summary)
    opts = plan.get("options", {})
    meta = {
        "patient_id_source": pid_source, "n_inputs": summary["inputs"], "n_images": summary["ingested"],
        "n_patients": summary["patients"], "intensity": I.INTENSITY_VERSION, "min_size": opts.get("min_size"),
        "resize": opts.get("resize"), "content_hash": opts.get("content_hash"),
        "key_fingerprint": plan.get("key_fingerprint"), "plan_fingerprint": plan.get("fingerprint"),
        "n_chunks": plan.get("n_chunks"), "label_columns": labels, "keep_paths": opts.get("keep_paths", False),
    }
    if partition:
        meta["partition"] = f"{partition[0]}/{partition[1]}"
    meta["label_from_folder"] = bool(opts.get("label_from_folder", False))
    if meta["label_from_folder"]:
        meta["label_from_folder_decision"] = _label_decision(plan)
    meta["patient_regex"] = bool(opts.get("patient_regex"))
    write_store_meta(out, dtype="uint8", max_size=opts.get("max_size", 512), **meta)
    return summary


def _label_decision(plan: dict) -> str:
    """Who decided that folder names are labels: 'explicit' (--label-from-folder yes) or 'auto'."""
    return "explicit" if plan.get("label_from_folder_mode") == "yes" else "auto"


def print_summary(s: dict, out) -> None:
    q = sum(s["quarantined"].values())
    print(f"ingest: {s['inputs']} inputs -> {s['ingested']} ingested, {s['duplicates']} duplicates, "
          f"{q} quarantined; {s['sidecar_skipped']} sidecar files skipped; {s['patients']} patients "
          f"(patient ids from: {s['patient_id_source']})")
    for reason, n in s["quarantined"].items():
        print(f"  quarantined {reason}: {n}")
    print("  modality: " + ", ".join(f"{k} {v}" for k, v in s["by_modality"].items()))
    print("  body part: " + ", ".join(f"{k} {v}" for k, v in s["by_body_part"].items()))
    if s.get("label_from_folder"):
        how = ("--label-from-folder yes: you vouched they are not identifying"
               if s.get("label_from_folder_decision") == "explicit" else "they look like class names")
        print(f"  label: parent folder names ({s.get('n_folder_labels', '?')} classes; {how})")
    for w in s.get("warnings", []):
        print(f"  warning: {w}")
    if s.get("repaired_chunks"):
        print(f"  repaired: {s['repaired_chunks']} damaged chunk(s) replaced by intact ones")
    if s.get("patient_id_source") == "per-file":
        print("  warning: some images have no patient id (each file is its own patient); "
              "use --patient-id REGEX so splits can group a patient's images")
    if s["inputs"] == 0:
        print("  warning: no image inputs were found (only sidecar files); the store is empty")
    if s.get("merged_stores"):
        print(f"  merged from {s['merged_stores']} stores")
    print(f"  written: {Path(out) / 'manifest.parquet'}, {Path(out) / 'qc_summary.json'}")


# ----------------------------------------------------------------------------- merge

def merge_partitions(parts: list[Path], out: Path) -> dict:
    """Join partition stores (same archive, options and key) into ``out``; equal to a single-machine run.

    Stores of different plans (other files) go to :func:`radpretrain.data.merge.merge_stores`.
    """
    plans = []
    for p in parts:
        pp = p / WORK_DIR / "plan.json"
        if not pp.is_file():
            if (Path(p) / "manifest.parquet").is_file():
                raise UserError(f"{p}: no {WORK_DIR}/plan.json, so the options it was made with cannot be "
                                "checked; only stores made by 'radpretrain ingest' (with their .ingest folder) can be merged")
            raise UserError(f"{p}: not a partition store (no {WORK_DIR}/plan.json)")
        plans.append(read_json(pp))
    fps = {pl["fingerprint"] for pl in plans}
    if len(fps) != 1 or any("n_chunks" not in pl for pl in plans):  # other files (or a merged store)
        return merge_stores(parts, out)
    n_chunks = plans[0]["n_chunks"]
    out = Path(out)
    if (out / WORK_DIR / "plan.json").is_file():
        if read_json(out / WORK_DIR / "plan.json")["fingerprint"] not in fps:
            raise UserError(f"{out}: holds another ingest; choose another --out")
    elif out.exists() and any(out.iterdir()):
        raise UserError(f"{out}: exists and is not empty; choose a new folder")
    (out / WORK_DIR / CHUNK_DIR).mkdir(parents=True, exist_ok=True)
    (out / SHARD_DIR).mkdir(parents=True, exist_ok=True)
    write_json(out / WORK_DIR / "plan.json", plans[0])
    # a finished merge is checked down to its pixels' hashes; a damaged chunk is linked again (over its
    # files) from a partition that holds it intact; the partitions' chunks are checked for sizes
    intact, damaged = check_chunks(out, range(n_chunks), deep=(out / "manifest.parquet").is_file(), remove=False)
    for k in range(n_chunks):
        if k in intact:
            continue
        dst = _chunk_paths(out, k)
        held = [p for p in parts if _chunk_paths(p, k)[1].is_file()]
        if not held:
            raise UserError(f"chunk {k} of {n_chunks} is in none of the partitions; finish the missing partition first")
        src = next((tuple(_chunk_paths(p, k)) for p in held if chunk_state(p, k) is not None), None)
        if src is None:
            raise UserError(f"{held[0]}: chunk {k} ({chunk_name(k)}) is damaged in every partition that holds it; "
                            "run that partition's ingest command again to repair it, then merge again")
        for s, d in ((src[0], dst[0]), (src[2], dst[2]), (src[1], dst[1])):  # manifest last
            if s.is_file():
                tmp = d.with_name(f"{d.name}.{os.getpid()}.tmp")
                try:
                    os.link(s, tmp)
                except OSError:
                    shutil.copyfile(s, tmp)
                os.replace(tmp, d)
    summary = finalise(out, range(n_chunks), done=intact)
    if damaged:
        summary["repaired_chunks"] = len(damaged)
    return summary
