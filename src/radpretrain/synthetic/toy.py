"""A tiny in-process dataset store for unit tests of later stages.

``make_toy_store`` writes a valid store (shards + manifest) directly, without
DICOM files, in well under a second.  Images are small grey "radiographs":
a bright bone-like bar inside a soft-tissue ellipse on a dark background, with
optional letterbox padding.  The label ``lesion`` (0/1, constant per patient)
is a dark round spot with a bright rim on the bone, so a task built on it is
learnable; ``body_part`` decides the bar's orientation.

It is *not* the synthetic archive (``radpretrain synth``), which writes real
DICOM files with planted PHI and broken files for testing ingest.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from radpretrain.data.intensity import to_stored
from radpretrain.data.manifest import MANIFEST_COLUMNS
from radpretrain.data.store import SHARD_DIR, ShardWriter, write_manifest, write_store_meta

TOY_BODY_PARTS = ("hand", "knee", "chest")


def toy_image(rng: np.random.Generator, h: int, w: int, body_part: str, lesion: bool, pad: int = 0) -> np.ndarray:
    """One float image in [0, 1] of shape (h, w)."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    cy, cx = h / 2 + rng.normal(0, h * 0.03), w / 2 + rng.normal(0, w * 0.03)
    img = 0.08 + 0.02 * rng.random((h, w), dtype=np.float32)
    soft = ((yy - cy) / (0.45 * h)) ** 2 + ((xx - cx) / (0.4 * w)) ** 2 < 1
    img[soft] += 0.25
    thick = 0.12 * min(h, w)
    if body_part == "hand":
        bone = np.abs(xx - cx) < thick / 2          # vertical bar
    elif body_part == "knee":
        bone = np.abs(yy - cy) < thick / 2          # horizontal bar
    else:
        bone = np.abs((xx - cx) - (yy - cy)) < thick / 2  # diagonal bar
    bone &= soft
    img[bone] += 0.45
    if lesion:
        ly, lx = np.argwhere(bone)[rng.integers(0, bone.sum())]
        r = max(2.0, 0.07 * min(h, w))
        d = np.sqrt((yy - ly) ** 2 + (xx - lx) ** 2)
        img[d < r] -= 0.4
        img[(d >= r) & (d < r * 1.4)] += 0.15
    img += rng.normal(0, 0.02, size=(h, w)).astype(np.float32)
    img = np.clip(img, 0, 1)
    if pad:
        img[:pad, :] = 0
        img[-pad:, :] = 0
    return img


def make_toy_store(
    root: str | Path,
    n_patients: int = 24,
    images_per_patient: int = 2,
    size: tuple[int, int] = (72, 64),
    seed: int = 0,
    lesion_rate: float = 0.5,
) -> Path:
    """Write a small valid store at ``root`` and return its path.

    Patients alternate body parts; half of them (``lesion_rate``) have
    ``lesion=1`` on all their images.  Sizes vary a little around ``size``
    so resize/letterbox code is exercised; every 5th image has letterbox padding.
    """
    root = Path(root)
    rng = np.random.default_rng(seed)
    rows = []
    n_lesion = int(round(n_patients * lesion_rate))
    lesion_of = np.zeros(n_patients, dtype=int)
    lesion_of[rng.permutation(n_patients)[:n_lesion]] = 1
    with ShardWriter(root / SHARD_DIR / "toy-00000.bin") as writer:
        k = 0
        for p in range(n_patients):
            bp = TOY_BODY_PARTS[p % len(TOY_BODY_PARTS)]
            age = float(rng.integers(5, 90))
            sex = "F" if rng.random() < 0.5 else "M"
            for j in range(images_per_patient):
                h = int(size[0] + rng.integers(-8, 9))
                w = int(size[1] + rng.integers(-8, 9))
                pad = max(1, h // 10) if k % 5 == 0 else 0
                img = to_stored(toy_image(rng, h, w, bp, bool(lesion_of[p]), pad))
                off = writer.append(img)
                rows.append({
                    "image_id": f"{k:016x}", "patient_id": f"p{p:015x}", "study_id": f"s{p:07x}{j:08x}",
                    "series_id": f"r{p:07x}{j:08x}", "modality": "DX", "body_part": bp,
                    "view": "AP" if j % 2 == 0 else "LAT", "age_years": age, "sex": sex,
                    "height": h, "width": w, "orig_height": h * 8, "orig_width": w * 8,
                    "source": f"toy{k:012x}", "source_format": "dicom",
                    "content_hash": f"{k:032x}", "status": "ingested", "reason": "",
                    "shard": "toy-00000.bin", "offset": off, "lesion": int(lesion_of[p]),
                })
                k += 1
    df = pd.DataFrame(rows, columns=MANIFEST_COLUMNS + ["lesion"])
    write_manifest(root, df)
    write_store_meta(root, dtype="uint8", max_size=max(size) + 8, toy=True)
    return root
