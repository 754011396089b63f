"""``radpretrain verify``: is a dataset store intact?

Checks, against ``manifest.parquet``:

* every shard named by an ingested row exists and is long enough for the images it should hold
  (the cheap check :class:`~radpretrain.data.store.Store` also makes when it opens a store);
* every ingested image's stored pixels have the ``content_hash`` the manifest records
  (:func:`readers.content_hash` of the stored image, the rule ``store.json`` names
  ``content_hash: xxh3-128-of-stored-pixels``; a store made before that rule records no such
  scheme and is checked for sizes only, which the summary says).

Prints a summary; exit status 0 when the store is intact, 1 when it is damaged, 2 (one-line error)
when it is not a store or its ``store.json`` / ``manifest.parquet`` cannot be read.  Nothing
identifying is printed: shards by their names, images by their ``image_id`` pseudonyms.

:func:`check_shard` is also what ``radpretrain ingest`` uses to find damaged chunks to redo.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np
from tqdm import tqdm

from radpretrain.data.readers import content_hash
from radpretrain.data.manifest import CONTENT_HASH
from radpretrain.data.store import SHARD_DIR, Store

SHOWN = 10  # damaged shards / image ids listed in the summary (all are in --json)


def check_shard(path, offsets, heights, widths, hashes=None, dtype=np.uint8) -> tuple[int | None, int, np.ndarray]:
    """(the shard's size in bytes, None when it is missing; the bytes its images need; positions of the
    images it does not hold intact: beyond its end or, with ``hashes``, whose pixels lack their hash).

    ``offsets`` (bytes), ``heights``, ``widths`` and ``hashes`` describe the images stored in the shard.
    """
    dtype = np.dtype(dtype)
    offsets = np.asarray(offsets, dtype=np.int64)
    counts = np.asarray(heights, dtype=np.int64) * np.asarray(widths, dtype=np.int64)
    ends = offsets + counts * dtype.itemsize
    needed = int(ends.max()) if len(ends) else 0
    try:
        size = os.stat(path).st_size
    except FileNotFoundError:
        return None, needed, np.arange(len(ends))
    bad = ends > size
    if hashes is not None and size and not bad.all():
        data = np.memmap(path, dtype=np.uint8, mode="r")
        for i in np.flatnonzero(~bad):
            o, n = int(offsets[i]), int(counts[i])
            img = data[o:o + n * dtype.itemsize].view(dtype).reshape(int(heights[i]), int(widths[i]))
            bad[i] = content_hash(img) != hashes[i]
        del data
    return size, needed, np.flatnonzero(bad)


def verify_store(root, progress: bool = False) -> dict:
    """Check every shard and (when the store's hash rule allows) every ingested image; a JSON-ready report."""
    store = Store(root, check=False)  # its own shard check would stop at the first damaged shard
    images = store.images
    hashed = store.meta.get("content_hash") == CONTENT_HASH
    report: dict = {"store": str(store.root), "shards": 0, "images": int(len(images)), "hash_checked": hashed,
                    "missing_shards": [], "short_shards": [], "damaged_shards": [], "damaged_images": 0,
                    "damaged_image_ids": []}
    groups = images.groupby(images["shard"].astype(str), sort=True) if len(images) else []
    bar = tqdm(total=len(images), unit="image", desc="verify", file=sys.stderr, disable=None if progress else True)
    try:
        for shard, rows in groups:
            report["shards"] += 1
            size, needed, bad = check_shard(
                store.root / SHARD_DIR / shard, rows["offset"].to_numpy(), rows["height"].to_numpy(),
                rows["width"].to_numpy(), rows["content_hash"].astype(str).to_numpy() if hashed else None,
                store.dtype)
            if size is None:
                report["missing_shards"].append(shard)
            elif size < needed:
                report["short_shards"].append({"shard": shard, "bytes": size, "needed": needed})
            if len(bad):
                report["damaged_shards"].append(shard)
                report["damaged_images"] += int(len(bad))
                report["damaged_image_ids"].extend(rows["image_id"].iloc[bad].astype(str).tolist())
            bar.update(len(rows))
    finally:
        bar.close()
    report["ok"] = not report["damaged_images"]
    return report


def format_report(r: dict) -> str:
    lines = [f"verify {r['store']}: {r['shards']} shards, {r['images']} ingested images"]
    if r["missing_shards"]:
        lines.append(f"  missing shards: {len(r['missing_shards'])} ({_some(r['missing_shards'])})")
    if r["short_shards"]:
        shown = ", ".join(f"{s['shard']}: {s['bytes']} of {s['needed']} bytes" for s in r["short_shards"][:SHOWN])
        more = f", and {len(r['short_shards']) - SHOWN} more" if len(r["short_shards"]) > SHOWN else ""
        lines.append(f"  truncated shards: {len(r['short_shards'])} ({shown}{more})")
    what = "missing or whose pixels do not match their content_hash" if r["hash_checked"] else "missing"
    if r["damaged_images"]:
        lines.append(f"  damaged images: {r['damaged_images']} {what}, in {len(r['damaged_shards'])} shard(s) "
                     f"({_some(r['damaged_shards'])}); image ids: {_some(r['damaged_image_ids'])}")
    if not r["hash_checked"]:
        lines.append("  note: this store records no stored-pixel content_hash rule (made by an older version); "
                     "only shard sizes were checked")
    if r["ok"]:
        lines.append("  OK: every shard is there with its size" +
                     (" and every image has its content_hash" if r["hash_checked"] else ""))
    else:
        lines.append("  DAMAGED: run the same 'radpretrain ingest' command again to repair it (it redoes the damaged "
                     "chunks from the source files); a merged store: repair the stores it was merged from, then "
                     "run the merge again; without the sources or the store's .ingest folder, ingest anew into a "
                     "new folder")
    return "\n".join(lines)


def _some(items: list) -> str:
    return ", ".join(map(str, items[:SHOWN])) + (f", and {len(items) - SHOWN} more" if len(items) > SHOWN else "")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("dataset", help="dataset store folder (from 'radpretrain ingest')")
    parser.add_argument("--json", action="store_true", help="print one JSON object on stdout instead of the summary")


def run(args) -> int:
    report = verify_store(Path(args.dataset), progress=not args.json)
    print(json.dumps(report) if args.json else format_report(report))
    return 0 if report["ok"] else 1
