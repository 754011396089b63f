"""Ingest throughput beside the pure decode bound.

Datasets:
  (a) synthetic large radiographs (2560 x 2048, 12-bit DICOM), uncompressed (default 150 files, so each
      run lasts seconds) and JPEG 2000 lossless (default 12: its decoder takes ~1.5 s of CPU per file),
      written to a temporary folder by this script; every file has distinct pixels (no duplicates);
  (b) ../shared/data/knee-kl beside the checkout (real 224 x 224 JPEGs; fails with a clear message when missing).

For each dataset the decode bound is the decoder alone (pydicom ``dcmread(path).pixel_array`` /
PIL ``np.asarray(Image.open(path))``, full decode, nothing else) over the same files with the same
number of forked processes, each task the same number of files as an ingest chunk; ingest is the full `radpretrain ingest` (scan, sniff, decode, intensity, hash,
QC, resize, shard + manifest writes, finalisation).  Target: ingest >= 0.8 x decode bound.  Both
wall-clock rates and rates per CPU second (this process and its workers; robust when other jobs
share the machine) are reported.  Timings depend on the machine's load: run it on a quiet machine.
After one untimed run of each, decode-bound and ingest runs alternate --repeat times: ``ratio`` is
the best ingest over the best decode, ``median_pair_ratio`` the median ratio of neighbouring runs (the
figure least moved by the machine's speed drifting between runs; a single VM's speed moved by ±15 %
within minutes here).  Prints one JSON line last.

    python benchmarks/ingest.py [--quick] [--workers N] [--n-large N] [--n-j2k N] [--limit N] [--repeat N]
                                [--knee PATH] [--skip-knee] [--only uncompressed,j2k,knee]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from _proc import shared_data_dir

KNEE = shared_data_dir() / "knee-kl"


def _smooth_radiograph(rng, h, w):
    """A 12-bit radiograph-like image without noise: smooth anatomy-ish blobs (float32)."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    img = np.full((h, w), 600, np.float32)
    for _ in range(6):
        cy, cx = rng.uniform(0, h), rng.uniform(0, w)
        ry, rx = rng.uniform(h / 10, h / 3), rng.uniform(w / 10, w / 3)
        img += rng.uniform(400, 1200) * (((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 < 1)
    return img


def make_dicoms(folder: Path, n: int, compressed: bool, h=2560, w=2048, seed=0, n_bases=4) -> list[Path]:
    """``n`` radiograph-like DICOM files with distinct pixels.

    A few noise-free base images and one field of quantum noise (sigma 40) are drawn once; file ``i``
    is base ``i % n_bases`` plus the noise field shifted by a different offset, clipped to 12 bits
    (cheap to make, realistic statistics, no two files alike).
    """
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, JPEG2000Lossless, generate_uid

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    bases = [_smooth_radiograph(rng, h, w) for _ in range(min(n, n_bases))]
    noise = rng.normal(0, 40, size=(h, w)).astype(np.float32)
    paths = []
    for i in range(n):
        shift = (int(rng.integers(0, h)), int(rng.integers(0, w)))
        arr = np.clip(bases[i % len(bases)] + np.roll(noise, shift, axis=(0, 1)), 0, 4095).astype(np.uint16)
        ds = Dataset()
        ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"  # DX
        ds.SOPInstanceUID = generate_uid()
        ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
        ds.PatientID = f"BENCH{i // 2:04d}"
        ds.Modality, ds.BodyPartExamined, ds.ViewPosition = "DX", "KNEE", "AP"
        ds.Rows, ds.Columns = arr.shape
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
        ds.file_meta = FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        if compressed:
            ds.compress(JPEG2000Lossless, arr, encoding_plugin="pylibjpeg")
        else:
            ds.PixelData = arr.tobytes()
        p = folder / f"IM{i:04d}.dcm"
        ds.save_as(p, enforce_file_format=True)
        paths.append(p)
    return paths


def _decode_one(path: str) -> int:
    if path.endswith(".dcm"):
        import pydicom

        return int(pydicom.dcmread(path).pixel_array.size)
    from PIL import Image

    with Image.open(path) as im:
        return int(np.asarray(im).size)


def _cpu() -> float:
    """CPU seconds of this process and its finished children (robust to other users of the machine)."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def decode_bound(paths: list[Path], workers: int, chunk: int) -> tuple[float, float]:
    """(images per wall second, images per CPU second) of the decoder alone.

    ``chunk``: files per task, the ingest's chunk size, so both hand the same amounts of work to the
    same number of forked workers (the same load balance at the end of the run).
    """
    files = [str(p) for p in paths]
    t0, c0 = time.perf_counter(), _cpu()
    pool = mp.get_context("fork").Pool(workers)
    n = len(pool.map(_decode_one, files, chunksize=max(1, chunk)))
    pool.close()
    pool.join()
    return n / (time.perf_counter() - t0), n / (_cpu() - c0)


def ingest_rate(src: Path, out: Path, workers: int, n_expected: int, **kw) -> tuple[float, dict]:
    """Images/s of a complete ingest (scan, workers, finalisation) into a new store."""
    from radpretrain.data.ingest import ingest

    shutil.rmtree(out, ignore_errors=True)
    t0, c0 = time.perf_counter(), _cpu()
    summary = ingest([src], out, workers=workers, progress=False, **kw)
    dt, cpu = time.perf_counter() - t0, _cpu() - c0
    assert summary["inputs"] == n_expected, summary
    return (summary["inputs"] / dt, summary["inputs"] / cpu), summary


def best_of(repeat: int, decode, ingest, warmup: bool = False) -> tuple[float, float, dict, list]:
    """Alternate decode-bound and ingest runs; keep the best of each (the machine may be shared), and
    the wall-clock ratio of each pair of neighbouring runs (robust to the machine's speed drifting).

    ``warmup``: one untimed run of each first (one-time costs: the first ingest in a process imports
    pandas/pyarrow/tqdm, ~0.3 s; files into the page cache), so that every pair measures throughput.
    """
    if warmup:
        decode()
        ingest()
    dec, ing, summary, pairs = (0.0, 0.0), (0.0, 0.0), {}, []
    for _ in range(repeat):
        d = decode()
        rate, summary = ingest()
        pairs.append(rate[0] / d[0])
        dec = tuple(max(a, b) for a, b in zip(dec, d))
        ing = tuple(max(a, b) for a, b in zip(ing, rate))
    return dec, ing, summary, pairs


def _entry(dec, ing, pairs, **extra) -> dict:
    return {**extra, "decode_img_s": round(dec[0], 2), "ingest_img_s": round(ing[0], 2), "ratio": round(ing[0] / dec[0], 3),
            "decode_img_per_cpu_s": round(dec[1], 2), "ingest_img_per_cpu_s": round(ing[1], 2),
            "cpu_ratio": round(ing[1] / dec[1], 3), "pair_ratios": [round(r, 3) for r in pairs],
            "median_pair_ratio": round(float(np.median(pairs)), 3)}


def _say(name, e) -> None:
    print(f"{name:>20}: decode {e['decode_img_s']:8.2f} img/s, ingest {e['ingest_img_s']:8.2f} img/s, "
          f"ratio {e['ratio']:.2f} (per CPU second: {e['decode_img_per_cpu_s']:.2f} vs "
          f"{e['ingest_img_per_cpu_s']:.2f}, ratio {e['cpu_ratio']:.2f}); run pairs {e['pair_ratios']}, "
          f"median {e['median_pair_ratio']:.2f}", file=sys.stderr)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="few images (a smoke run, noisy figures)")
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--n-large", type=int, default=None, help="uncompressed synthetic radiographs (default 150, quick 8)")
    ap.add_argument("--n-j2k", type=int, default=None, help="JPEG 2000 synthetic radiographs (default 12, quick 4)")
    ap.add_argument("--limit", type=int, default=None, help="use at most this many knee-kl images")
    ap.add_argument("--knee", type=Path, default=KNEE)
    ap.add_argument("--skip-knee", action="store_true")
    ap.add_argument("--only", default="uncompressed,j2k,knee", help="cases to run (comma-separated)")
    ap.add_argument("--repeat", type=int, default=None, help="alternated decode/ingest run pairs (default 5, quick 1; JPEG 2000: 1)")
    args = ap.parse_args(argv)
    os.environ.setdefault("RADPRETRAIN_DEID_KEY", "benchmark-key-not-secret")
    n_large = args.n_large or (8 if args.quick else 150)
    n_j2k = args.n_j2k or (4 if args.quick else 12)
    args.repeat = args.repeat or (1 if args.quick else 5)
    only = {c.strip() for c in args.only.split(",") if c.strip()}
    if args.skip_knee:
        only.discard("knee")
    results = {"workers": args.workers, "cpu_count": os.cpu_count(), "quick": args.quick,
               "load_avg_start": os.getloadavg()[0]}
    with tempfile.TemporaryDirectory(prefix="rp_bench_") as tmp:
        tmp = Path(tmp)
        for name, case, compressed, n in (("dicom_uncompressed", "uncompressed", False, n_large),
                                          ("dicom_j2k", "j2k", True, n_j2k)):
            if case not in only:
                continue
            src = tmp / name
            paths = make_dicoms(src, n, compressed)
            chunk = max(1, n // (2 * args.workers))
            dec, ing, _, pairs = best_of(1 if compressed else args.repeat, lambda: decode_bound(paths, args.workers, chunk),
                                         lambda: ingest_rate(src, tmp / f"{name}_ds", args.workers, n, chunk_size=chunk),
                                         warmup=not compressed and not args.quick)
            results[name] = _entry(dec, ing, pairs, images=n, size=[2560, 2048], bits=12)
            _say(name, results[name])
            shutil.rmtree(src, ignore_errors=True)
            shutil.rmtree(tmp / f"{name}_ds", ignore_errors=True)
        if "knee" in only:
            if not args.knee.is_dir():
                print(f"benchmarks/ingest.py: {args.knee}: folder missing (the real-radiograph set lives in "
                      "../shared/data, outside the repo); use --knee PATH or --skip-knee", file=sys.stderr)
                return 2
            files = sorted(p for p in args.knee.rglob("*.jpg"))
            limit = args.limit or (500 if args.quick else None)
            src = args.knee
            if limit and limit < len(files):
                src = tmp / "knee_subset"
                for p in files[:limit]:
                    d = src / p.relative_to(args.knee)
                    d.parent.mkdir(parents=True, exist_ok=True)
                    os.symlink(p, d)
                files = files[:limit]
            chunk = 256  # ingest's default --chunk-size
            dec, ing, summary, pairs = best_of(args.repeat, lambda: decode_bound(files, args.workers, chunk),
                                               lambda: ingest_rate(src, tmp / "knee_ds", args.workers, len(files),
                                                                   patient_id=r"([0-9]{7})[LR]", chunk_size=chunk),
                                               warmup=not args.quick)
            results["knee_kl"] = _entry(dec, ing, pairs, images=len(files), patients=summary["patients"])
            _say("knee_kl", results["knee_kl"])
    results["load_avg_end"] = os.getloadavg()[0]
    results["target_ratio"] = 0.8
    print(json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
