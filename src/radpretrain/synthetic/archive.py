"""``radpretrain synth`` (the default ``--kind pacs``): write a synthetic, PACS-export-like archive.

The archive is the test bed of every later stage.  It contains real DICOM files
(pydicom) in a ``patient/study/series/instance`` layout whose folder names are
built from fake PHI (as real exports do), a few PNG/JPEG exports, broken files
and a labels CSV::

    OUT/<PatientID>_<LASTNAME>/<StudyDate>_<AccessionNumber>/<SeriesNumber>_<Modality>/IM0001.dcm
    OUT/exports/<PatientID>_<bodypart>_01.png
    OUT/labels.csv              path (relative, POSIX), lesion (0/1): one row per image file
    OUT/.synth/truth.csv        ground truth per written file (kind, expected ingest status, ...)
    OUT/.synth/planted_phi.json every planted PHI string (tests grep outputs for them)
    OUT/.synth/summary.json     counts (no timings, so the archive is byte-identical per seed)

The label ``lesion`` is per patient (a lytic bone lesion drawn on every image of
the patient) and is drawn from its own random stream, independent of body part,
size, photometric interpretation and every header.  Everything is derived from
the seed: same seed -> byte-identical files.
"""

from __future__ import annotations

import csv
import functools
import io
import json
import math
import multiprocessing
import os
import shutil
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image
from pydicom import config as dcm_config
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    PYDICOM_IMPLEMENTATION_UID, ExplicitVRLittleEndian, ImplicitVRLittleEndian, JPEG2000Lossless,
    RLELossless,
)

from radpretrain.data.vocab import KNOWN_SEXES
from radpretrain.errors import UserError
from radpretrain.synthetic import anatomy as anat

CR_STORAGE = "1.2.840.10008.5.1.4.1.1.1"
DX_STORAGE = "1.2.840.10008.5.1.4.1.1.1.1"
CT_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
MR_STORAGE = "1.2.840.10008.5.1.4.1.1.4"
BASIC_TEXT_SR = "1.2.840.10008.5.1.4.1.1.88.11"

KINDS = ("radiograph", "ct", "mr", "png", "jpeg", "truncated", "zero_byte", "no_pixels", "not_dicom",
         "exact_duplicate", "blank", "near_duplicate")
EXPECTED_STATUS = {
    "radiograph": "ingested", "ct": "ingested", "mr": "ingested", "png": "ingested", "jpeg": "ingested",
    "near_duplicate": "ingested", "exact_duplicate": "duplicate", "truncated": "quarantined",
    "zero_byte": "quarantined", "no_pixels": "quarantined", "not_dicom": "quarantined", "blank": "quarantined",
}
# kinds that are images with pixels a reader can decode (they get a row in labels.csv)
LABELLED_KINDS = ("radiograph", "ct", "mr", "png", "jpeg", "exact_duplicate", "near_duplicate", "blank")
TRUTH_COLUMNS = ("path", "kind", "expected_status", "body_part", "patient_key", "lesion", "modality", "view",
                 "photometric", "bits_stored", "transfer_syntax", "rows", "columns", "duplicate_of",
                 "lesion_row", "lesion_col", "lesion_radius")
PART_WEIGHTS = {"hand": 0.2, "knee": 0.2, "chest": 0.14, "foot": 0.13, "pelvis": 0.1, "spine": 0.1,
                "shoulder": 0.13}
# BodyPartExamined as archives really have it: standard, free text, other languages
BODY_PART_TEXT = {
    "hand": ["HAND", "HAND", "Hand rt", "L HAND", "HAND LEFT", "MANO"],
    "knee": ["KNEE", "KNEE", "L KNEE", "R KNEE", "Knee lt", "KNIE"],
    "chest": ["CHEST", "CHEST", "THORAX", "Chest PA", "LUNG"],
    "foot": ["FOOT", "FOOT", "R FOOT", "Foot lt", "FUSS"],
    "pelvis": ["PELVIS", "PELVIS", "BECKEN", "Pelvis AP", "PELVIS AP"],
    "spine": ["LSPINE", "SPINE", "L SPINE", "LWS", "LUMBAR SPINE"],
    "shoulder": ["SHOULDER", "SHOULDER", "R SHOULDER", "Schulter li", "SHOULDER LT"],
}
SYLLABLES = ("kor", "van", "del", "mir", "qua", "zel", "tho", "rin", "bex", "lum", "sar", "vok", "nid", "pel",
             "tra", "gor", "yen", "dax", "wil", "fen", "hul", "jor", "cal", "mop", "ris", "tek", "blu", "sno")
MANUFACTURERS = ("ACME MEDICAL", "RADIOCORP", "XRAYWORKS", "IMAGINGSYS")
NOT_DICOM_TEXT = (b"<html><head><title>504 Gateway Time-out</title></head>\n"
                  b"<body><h1>504 Gateway Time-out</h1>The PACS export did not complete.</body></html>\n")


# ------------------------------------------------------------------------------------------------
# plan
# ------------------------------------------------------------------------------------------------

@dataclass
class Patient:
    index: int
    pid: str
    last: str
    first: str
    sex: str
    birth: str
    lesion: int
    lesion_pos: tuple = (0.0, 0.04)

    @property
    def folder(self) -> str:
        return f"{self.pid}_{self.last}"

    @property
    def dicom_name(self) -> str:
        return f"{self.last}^{self.first}"


@dataclass
class Study:
    patient: Patient
    date: str
    time: str
    accession: str
    uid: str
    institution: str
    physician: str
    operator: str
    modality: str
    body_part: str
    folder: str
    n_series: int = 0


@dataclass
class Item:
    """One file to write."""
    kind: str
    path: str
    study: Study | None
    seed: int
    modality: str = ""
    body_part: str = ""
    view: str = ""
    series_number: int = 1
    series_uid: str = ""
    instance_number: int = 1
    sop_uid: str = ""
    photometric: str = ""
    bits_stored: int = 0
    transfer_syntax: str = ""
    params: dict = field(default_factory=dict)
    source: "Item | None" = None
    children: list = field(default_factory=list)
    result: dict = field(default_factory=dict)


def _study_description(st: "Study") -> str:
    """Free text with the patient's name in it, as some RIS systems write."""
    return f"{st.modality} {st.body_part.upper()} {st.patient.first} {st.patient.last}"


def _uid(rng: np.random.Generator) -> str:
    return "2.25." + str(int.from_bytes(rng.bytes(16), "big") or 1)


def _word(rng: np.random.Generator, n: int) -> str:
    return "".join(SYLLABLES[i] for i in rng.integers(0, len(SYLLABLES), n)).upper()


def _date(rng: np.random.Generator, y0: int, y1: int) -> str:
    y = int(rng.integers(y0, y1 + 1))
    return f"{y:04d}{int(rng.integers(1, 13)):02d}{int(rng.integers(1, 29)):02d}"


class _Planner:
    """Draws every random choice except pixels; pixels come from each item's own seed."""

    def __init__(self, n_patients: int, seed: int):
        self.seed = seed
        self.rng = np.random.default_rng([seed, 7, 1])
        self.uid_rng = np.random.default_rng([seed, 7, 2])
        self.items: list[Item] = []
        self.patients: list[Patient] = []
        self.studies: list[Study] = []
        self.phi: dict[str, set] = {k: set() for k in (
            "patient_names", "name_words", "patient_ids", "birth_dates", "accession_numbers", "institutions",
            "physicians", "physician_words", "operators", "study_dates", "folder_names", "free_text")}
        self._make_patients(n_patients)

    # -- patients -------------------------------------------------------------------------------
    def _make_patients(self, n: int) -> None:
        # the label has its own stream: independent of everything else drawn below
        lrng = np.random.default_rng([self.seed, 7, 3])
        n_les = int(np.clip(round(n * lrng.uniform(0.38, 0.47)), 1, n - 1))
        lesion = np.zeros(n, int)
        lesion[lrng.permutation(n)[:n_les]] = 1
        lesion_pos = [(float(lrng.uniform(0, 2 * math.pi)), float(lrng.uniform(0.03, 0.045))) for _ in range(n)]
        rng = self.rng
        ids = rng.choice(900000, size=n, replace=False) + 100000
        used = set()
        self.institutions = [f"ZZTEST {_word(rng, 2)} HOSPITAL" for _ in range(3)]
        self.phi["institutions"].update(self.institutions)
        for i in range(n):
            while True:
                last, first = "ZZ" + _word(rng, 3), "ZY" + _word(rng, 2)
                if last not in used and first not in used:
                    used.update((last, first))
                    break
            p = Patient(i, f"PHI{ids[i]:06d}", last, first, str(rng.choice(KNOWN_SEXES, p=[.49, .49, .02])),
                        _date(rng, 1935, 2012), int(lesion[i]), lesion_pos[i])
            self.patients.append(p)
            self.phi["patient_names"].add(p.dicom_name)
            self.phi["name_words"].update((p.last, p.first, f"{p.first} {p.last}"))
            self.phi["patient_ids"].add(p.pid)
            self.phi["birth_dates"].add(p.birth)
            self.phi["folder_names"].add(p.folder)

    def _study(self, p: Patient, modality: str, body_part: str) -> Study:
        rng = self.rng
        by = int(p.birth[:4])
        date = _date(rng, max(2010, by + 1), 2024)
        acc = f"XA{int(rng.integers(10**7, 10**8))}"
        phys = ("ZZDR" + _word(rng, 2), "ZY" + _word(rng, 2))
        op = ("ZZOP" + _word(rng, 2), "ZY" + _word(rng, 2))
        s = Study(p, date, f"{int(rng.integers(7, 19)):02d}{int(rng.integers(0, 60)):02d}{int(rng.integers(0, 60)):02d}",
                  acc, _uid(self.uid_rng), str(rng.choice(self.institutions)), "^".join(phys), "^".join(op),
                  modality, body_part, f"{p.folder}/{date}_{acc}")
        self.studies.append(s)
        self.phi["free_text"].add(_study_description(s))
        self.phi["accession_numbers"].add(acc)
        self.phi["study_dates"].add(date)
        self.phi["physicians"].add(s.physician)
        self.phi["physician_words"].update(phys)
        self.phi["operators"].add(s.operator)
        self.phi["physician_words"].update(op)
        return s

    def _series(self, st: Study, modality: str, style: str | None = None) -> tuple[int, str, str]:
        st.n_series += 1
        number = st.n_series
        style = style or str(self.rng.choice(["dcm", "noext", "uid", "num"], p=[0.6, 0.22, 0.1, 0.08]))
        return number, f"{st.folder}/{number}_{modality}", style

    def _file_name(self, style: str, k: int, sop_uid: str) -> str:
        return {"dcm": f"IM{k:04d}.dcm", "noext": f"IM{k:04d}", "uid": f"{sop_uid}.dcm",
                "num": f"{k:08d}"}[style]

    def _item(self, kind: str, st: Study | None, folder: str, style: str, k: int, **kw) -> Item:
        sop = _uid(self.uid_rng)
        it = Item(kind=kind, path=f"{folder}/{self._file_name(style, k, sop)}", study=st,
                  seed=int(self.rng.integers(2**63)), sop_uid=sop, instance_number=k, **kw)
        self.items.append(it)
        return it

    # -- images ---------------------------------------------------------------------------------
    def _radiograph_params(self) -> dict:
        rng = self.rng
        bits = int(rng.choice([8, 10, 12, 16], p=[0.15, 0.25, 0.4, 0.2]))
        maxv = 2**bits - 1
        # mostly downsized CR exports (600-1300 px), a few full-resolution DR images (up to ~2900 px)
        long_side = (int(rng.uniform(1800, 2900)) if rng.random() < 0.04 else
                     int(min(2800, 600 * 5 ** rng.beta(1.2, 3.5))))
        prm = {
            "long_side": long_side,
            "photometric": "MONOCHROME1" if rng.random() < 0.3 else "MONOCHROME2",
            "bits": bits,
            "lo": int(rng.uniform(0, 0.08) * maxv), "hi": int(rng.uniform(0.75, 1.0) * maxv),
            "rescale": None, "window": None,
            "pad": None, "marker": None, "noise": float(rng.uniform(0.006, 0.02)),
            "transfer_syntax": str(rng.choice([ExplicitVRLittleEndian, ImplicitVRLittleEndian, RLELossless,
                                               JPEG2000Lossless], p=[0.925, 0.04, 0.005, 0.03])),
            "pixel_spacing": float(rng.choice([0.1, 0.139, 0.143, 0.15, 0.175, 0.2])),
        }
        if rng.random() < 0.4:
            prm["rescale"] = ((1.0, 0.0) if rng.random() < 0.5 else
                              (float(rng.choice([0.25, 0.5, 2.0])), float(rng.choice([-512.0, 0.0, 1024.0]))))
        r = rng.random()
        prm["window"] = "none" if r < 0.35 else ("multi" if r < 0.45 else "single")
        if rng.random() < 0.2:
            prm["pad"] = (str(rng.choice(["tb", "lr"])), float(rng.uniform(0.04, 0.15)), float(rng.uniform(0.04, 0.15)),
                          0.0 if rng.random() < 0.8 else 1.0)
        if rng.random() < 0.8:
            prm["marker"] = str(rng.choice(["L", "R"]))
        return prm

    def plan(self) -> list[Item]:
        rng = self.rng
        n = len(self.patients)
        parts = list(PART_WEIGHTS)
        part_cycle = rng.permutation(len(parts))
        n_ct = max(1, round(0.03 * n))
        n_mr = max(1, round(0.03 * n))
        order = rng.permutation(n)
        ct_pat, mr_pat = set(order[:n_ct].tolist()), set(order[n_ct:n_ct + n_mr].tolist())
        for p in self.patients:
            n_st = 1 + int(rng.random() < 0.4) + int(rng.random() < 0.1)
            for s in range(n_st):
                part = parts[part_cycle[p.index % len(parts)]] if s == 0 else str(
                    rng.choice(parts, p=list(PART_WEIGHTS.values())))
                st = self._study(p, str(rng.choice(["CR", "DX"])), part)
                for _ in range(1 + int(rng.random() < 0.25)):
                    num, folder, style = self._series(st, st.modality)
                    views = ["PA" if part in ("chest", "hand") else "AP", "LAT", "OBL"]
                    n_inst = 1 + int(rng.random() < 0.5) + int(rng.random() < 0.1)
                    suid = _uid(self.uid_rng)
                    for k in range(n_inst):
                        prm = self._radiograph_params()
                        self._item("radiograph", st, folder, style, k + 1, modality=st.modality, body_part=part,
                                   view=views[k], series_number=num, series_uid=suid,
                                   photometric=prm["photometric"], bits_stored=prm["bits"],
                                   transfer_syntax=prm["transfer_syntax"], params=prm)
            for mod, pats in (("CT", ct_pat), ("MR", mr_pat)):
                if p.index in pats:
                    st = self._study(p, mod, "femur")
                    num, folder, style = self._series(st, mod)
                    suid = _uid(self.uid_rng)
                    n_sl = int(rng.integers(3, 6))
                    size = int(rng.choice([256, 512], p=[0.3, 0.7])) if mod == "CT" else int(rng.choice([256, 320, 512]))
                    bits = int(rng.choice([12, 16]))
                    ts = ExplicitVRLittleEndian if rng.random() < 0.9 else JPEG2000Lossless
                    win = str(rng.choice(["single", "multi", "none"], p=[0.5, 0.3, 0.2]))
                    for k in range(n_sl):
                        z = -1 + 2 * k / max(n_sl - 1, 1)
                        self._item(mod.lower(), st, folder, style, k + 1, modality=mod, body_part="femur", view="AX",
                                   series_number=num, series_uid=suid, photometric="MONOCHROME2",
                                   bits_stored=bits, transfer_syntax=ts,
                                   params={"size": size, "z": z, "slice": k, "bits": bits, "window": win,
                                           "transfer_syntax": ts, "noise": float(rng.uniform(8, 18))})
        self._force_coverage()
        self._exports()
        self._broken()
        return self.items

    def _force_coverage(self) -> None:
        """Make sure even a tiny archive has every photometric, bit depth and compressed syntax."""
        radios = [it for it in self.items if it.kind == "radiograph"]
        idx = self.rng.permutation(len(radios))
        wanted = [("bits", 8), ("bits", 10), ("bits", 12), ("bits", 16),
                  ("photometric", "MONOCHROME1"), ("photometric", "MONOCHROME2"),
                  ("transfer_syntax", RLELossless), ("transfer_syntax", JPEG2000Lossless)]
        for (key, value), i in zip(wanted, idx):
            it = radios[i]
            it.params[key] = value
            if key == "bits":
                it.params["lo"], it.params["hi"] = 0, 2**value - 1
            it.photometric, it.bits_stored, it.transfer_syntax = (
                it.params["photometric"], it.params["bits"], it.params["transfer_syntax"])
        for it in radios:  # pure-Python RLE and JPEG 2000 encoding are slow: keep those images small
            if it.params["transfer_syntax"] == RLELossless:
                it.params["long_side"] = min(it.params["long_side"], 512)
            elif it.params["transfer_syntax"] == JPEG2000Lossless:
                it.params["long_side"] = min(it.params["long_side"], 800)

    def _exports(self) -> None:
        rng = self.rng
        n = len(self.patients)
        chosen = rng.permutation(n)[:max(2, round(0.08 * n))]
        for j, i in enumerate(chosen):
            p = self.patients[int(i)]
            for k in range(1 + int(rng.random() < 0.3)):
                part = str(rng.choice(list(PART_WEIGHTS)))
                fmt = ("png", "jpeg")[j % 2] if k == 0 else str(rng.choice(["png", "jpeg"]))
                ext = "png" if fmt == "png" else str(rng.choice(["jpg", "jpeg"]))
                it = Item(kind=fmt, path=f"exports/{p.pid}_{part}_{k + 1:02d}.{ext}", study=None,
                          seed=int(rng.integers(2**63)), body_part=part, view=str(rng.choice(["AP", "LAT"])),
                          bits_stored=8, params={"long_side": int(rng.integers(600, 1400)), "patient": p})
                self.items.append(it)

    def _broken(self) -> None:
        rng = self.rng
        radios = [it for it in self.items if it.kind == "radiograph"]
        pick = [radios[int(i)] for i in rng.permutation(len(radios))]
        # exact duplicate: same bytes, path sorting after the original
        src = pick[0]
        folder, _, name = src.path.rpartition("/")
        name = name[:-4] + "_1.dcm" if name.endswith(".dcm") else name + "_1"
        dup = Item(kind="exact_duplicate", path=f"{folder}/{name}", study=src.study,
                   seed=0, modality=src.modality, body_part=src.body_part, view=src.view, photometric=src.photometric,
                   bits_stored=src.bits_stored, transfer_syntax=src.transfer_syntax, source=src)
        src.children.append(dup)
        self.items.append(dup)
        # near duplicates: same image re-exported (new instance) with a small shift and new noise
        n_near = 2 if len(self.patients) < 20 else 3
        seen = {src.study.patient.index}
        near_src = []
        for it in pick[1:]:
            if it.study.patient.index not in seen and len(near_src) < n_near:
                near_src.append(it)
                seen.add(it.study.patient.index)
        for it in near_src:
            num, folder, style = self._series(it.study, it.modality, "dcm")
            nd = self._item("near_duplicate", it.study, folder, style, 1, modality=it.modality,
                            body_part=it.body_part, view=it.view, series_number=num, series_uid=_uid(self.uid_rng),
                            photometric=it.photometric, bits_stored=it.bits_stored,
                            transfer_syntax=ExplicitVRLittleEndian,
                            params={**it.params, "transfer_syntax": ExplicitVRLittleEndian,
                                    "shift": (int(rng.integers(-4, 5)), int(rng.integers(1, 5)))})
            nd.source = it
            it.children.append(nd)
            self.items.remove(nd)
        hosts = [it for it in pick if it.study.patient.index not in seen] or pick
        # truncated: a complete radiograph cut inside its pixel data
        h = hosts[0 % len(hosts)]
        num, folder, style = self._series(h.study, h.modality)
        prm = self._radiograph_params()
        prm["transfer_syntax"] = ExplicitVRLittleEndian
        self._item("truncated", h.study, folder, style, 1, modality=h.modality, body_part=h.body_part, view="AP",
                   series_number=num, series_uid=_uid(self.uid_rng), photometric=prm["photometric"],
                   bits_stored=prm["bits"], transfer_syntax=ExplicitVRLittleEndian,
                   params={**prm, "cut": float(rng.uniform(0.3, 0.8))})
        # zero-byte file next to real instances
        h = hosts[1 % len(hosts)]
        folder = h.path.rpartition("/")[0]
        self._item("zero_byte", h.study, folder, "noext", 99, modality=h.modality, body_part=h.body_part)
        # a structured report: DICOM without pixel data, with the patient's name in its text
        h = hosts[2 % len(hosts)]
        num, folder, style = self._series(h.study, "SR", "dcm")
        self._item("no_pixels", h.study, folder, style, 1, modality="SR", series_number=num,
                   series_uid=_uid(self.uid_rng), transfer_syntax=ExplicitVRLittleEndian)
        # not DICOM, named .dcm (an HTML error page saved by an export tool)
        h = hosts[3 % len(hosts)]
        num, folder, style = self._series(h.study, "OT", "dcm")
        self._item("not_dicom", h.study, folder, "dcm", 1, modality="OT")
        # blank: a valid DICOM whose pixels are constant
        h = hosts[4 % len(hosts)]
        num, folder, style = self._series(h.study, h.modality)
        prm = self._radiograph_params()
        prm["transfer_syntax"] = ExplicitVRLittleEndian
        prm["long_side"] = min(prm["long_side"], 1000)
        self._item("blank", h.study, folder, style, 1, modality=h.modality, body_part=h.body_part, view="AP",
                   series_number=num, series_uid=_uid(self.uid_rng), photometric=prm["photometric"],
                   bits_stored=prm["bits"], transfer_syntax=ExplicitVRLittleEndian, params=prm)


# ------------------------------------------------------------------------------------------------
# pixels
# ------------------------------------------------------------------------------------------------

def _resize(img: np.ndarray, h: int, w: int) -> np.ndarray:
    return np.array(Image.fromarray(img.astype(np.float32), mode="F").resize((w, h), Image.BILINEAR))


def render_radiograph(rng: np.random.Generator, body_part: str, view: str, lesion: bool, long_side: int,
                      marker: str | None) -> tuple[np.ndarray, dict]:
    """Noise-free display image (bone bright, [0, 1]) at full size, plus lesion info in its pixels."""
    small, info = anat.draw_radiograph(rng, body_part, view, lesion)
    h0, w0 = small.shape
    scale = long_side / max(h0, w0)
    h, w = max(32, int(round(h0 * scale))), max(32, int(round(w0 * scale)))
    img = _resize(small, h, w)
    if marker:
        anat.burn_marker(img, marker, rng)
    les = None
    if info["lesion"] is not None:
        ly, lx, lr = info["lesion"]
        les = ((ly + 0.5) * h / h0 - 0.5, (lx + 0.5) * w / w0 - 0.5, lr * h / h0)
    return img, {"lesion": les}


class NoiseBank:
    """One large field of unit Gaussian noise; images take random crops of it (fast)."""

    def __init__(self, seed: int, size: int = 3072):
        self.size = size
        self.field = np.random.default_rng([seed, 7, 9]).standard_normal((size, size), dtype=np.float32)

    def crop(self, rng: np.random.Generator, h: int, w: int) -> np.ndarray:
        if h > self.size or w > self.size:  # pragma: no cover - images are <= 3000 px
            return rng.standard_normal((h, w), dtype=np.float32)
        y = int(rng.integers(0, self.size - h + 1))
        x = int(rng.integers(0, self.size - w + 1))
        return self.field[y:y + h, x:x + w]


def _noisy(img: np.ndarray, rng: np.random.Generator, sigma: float, bank: NoiseBank) -> np.ndarray:
    """Add signal-dependent noise (brighter = more exposure = relatively noisier here)."""
    noise = bank.crop(rng, *img.shape)
    out = img * (1 + sigma * noise)
    out += (0.6 * sigma) * noise
    return np.clip(out, 0, 1, out=out)


def _pad(img: np.ndarray, pad) -> tuple[np.ndarray, tuple[int, int]]:
    if not pad:
        return img, (0, 0)
    where, a, b, value = pad
    h, w = img.shape
    n = h if where == "tb" else w
    pa, pb = int(n * a), int(n * b)
    if n + pa + pb > 3000:  # keep every image within 3000 px
        f = max(3000 - n, 0) / (pa + pb)
        pa, pb = int(pa * f), int(pb * f)
    if where == "tb":
        out = np.full((h + pa + pb, w), value, np.float32)
        out[pa:pa + h] = img
        return out, (pa, 0)
    out = np.full((h, w + pa + pb), value, np.float32)
    out[:, pa:pa + w] = img
    return out, (0, pa)


def _quantize(disp: np.ndarray, prm: dict) -> np.ndarray:
    """Display values -> stored values (MONOCHROME1 stores them inverted)."""
    maxv = 2 ** prm["bits"] - 1
    raw = disp * np.float32(prm["hi"] - prm["lo"])
    raw += np.float32(prm["lo"] + 0.5)  # + 0.5: truncation below rounds
    if prm["photometric"] == "MONOCHROME1":
        np.subtract(np.float32(maxv + 1), raw, out=raw)
    np.clip(raw, 0, maxv, out=raw)
    return raw.astype(np.uint8 if prm["bits"] == 8 else np.uint16)


# ------------------------------------------------------------------------------------------------
# DICOM
# ------------------------------------------------------------------------------------------------

def _age(birth: str, date: str) -> str:
    years = int(date[:4]) - int(birth[:4]) - int(date[4:] < birth[4:])
    return f"{max(years, 0):03d}Y"


def _base_dataset(it: Item, sop_class: str) -> Dataset:
    st, p = it.study, it.study.patient
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = it.sop_uid
    meta.TransferSyntaxUID = it.transfer_syntax or ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds = Dataset()
    ds.file_meta = meta
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = it.sop_uid
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = st.date
    ds.StudyTime = ds.SeriesTime = ds.ContentTime = st.time
    ds.AccessionNumber = st.accession
    ds.Modality = it.modality
    rng = np.random.default_rng([it.seed % 2**32, 11])
    ds.Manufacturer = str(rng.choice(MANUFACTURERS))
    ds.InstitutionName = st.institution
    ds.ReferringPhysicianName = st.physician
    ds.StationName = f"ROOM{int(rng.integers(1, 9))}"
    ds.StudyDescription = _study_description(st)
    if it.kind != "no_pixels":
        ds.SeriesDescription = (f"{it.view} {st.body_part} for {p.last}" if rng.random() < 0.5 else f"{it.view}")
    ds.OperatorsName = st.operator
    ds.PatientName = p.dicom_name
    ds.PatientID = p.pid
    ds.PatientBirthDate = p.birth
    ds.PatientSex = p.sex
    ds.PatientAge = _age(p.birth, st.date)
    ds.StudyInstanceUID = st.uid
    ds.SeriesInstanceUID = it.series_uid or st.uid + ".1"
    ds.StudyID = st.accession[-4:]
    ds.SeriesNumber = it.series_number
    ds.InstanceNumber = it.instance_number
    return ds


def _body_part_text(it: Item, rng: np.random.Generator) -> str | None:
    r = rng.random()
    if r < 0.15:
        return None
    if r < 0.2:  # wrong
        return str(rng.choice([b for b in BODY_PART_TEXT if b != it.body_part])).upper()
    return str(rng.choice(BODY_PART_TEXT[it.body_part]))


def _set_pixels(ds: Dataset, arr: np.ndarray, bits: int, photometric: str) -> None:
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.Rows, ds.Columns = arr.shape
    ds.BitsAllocated = 8 if bits == 8 else 16
    ds.BitsStored = bits
    ds.HighBit = bits - 1
    ds.PixelRepresentation = 0
    ds.PixelData = arr.tobytes()


def _window(ds: Dataset, lo: float, hi: float, mode: str) -> None:
    if mode == "none":
        return
    c, w = (lo + hi) / 2, max(hi - lo, 1.0)
    if mode == "multi":
        ds.WindowCenter = [round(c, 1), round(c, 1)]
        ds.WindowWidth = [round(w, 1), round(w * 0.7, 1)]
        ds.WindowCenterWidthExplanation = ["NORMAL", "HARDER"]
    else:
        ds.WindowCenter = round(c, 1)
        ds.WindowWidth = round(w, 1)


def _encode(ds: Dataset, arr: np.ndarray, ts: str) -> bytes:
    if ts == RLELossless:
        ds.compress(RLELossless, arr, encoding_plugin="pydicom", generate_instance_uid=False)
    elif ts == JPEG2000Lossless:
        try:
            ds.compress(JPEG2000Lossless, arr, generate_instance_uid=False)
        except (RuntimeError, ImportError, ValueError):  # no JPEG 2000 encoder here: stay uncompressed
            ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    elif ts == ImplicitVRLittleEndian:
        ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def _radiograph_dataset(it: Item, stored: np.ndarray, disp: np.ndarray, rng: np.random.Generator) -> Dataset:
    prm = it.params
    ds = _base_dataset(it, CR_STORAGE if it.modality == "CR" else DX_STORAGE)
    ds.ImageType = ["ORIGINAL", "PRIMARY"] if it.kind != "near_duplicate" else ["DERIVED", "SECONDARY"]
    bp = _body_part_text(it, rng)
    if bp is not None:
        ds.add(DataElement(0x00180015, "CS", bp, validation_mode=dcm_config.IGNORE))
    if it.view in ("AP", "PA", "LAT") and rng.random() < 0.85:
        ds.ViewPosition = "LL" if it.view == "LAT" and rng.random() < 0.3 else it.view
    if prm.get("marker"):
        ds.ImageLaterality = prm["marker"]
    ps = prm["pixel_spacing"]
    if it.modality == "DX":
        ds.ImagerPixelSpacing = [ps, ps]
        ds.PresentationIntentType = "FOR PRESENTATION"
    else:
        ds.PixelSpacing = [ps, ps]
    _set_pixels(ds, stored, prm["bits"], prm["photometric"])
    slope, inter = prm["rescale"] or (1.0, 0.0)
    if prm["rescale"]:
        ds.RescaleSlope = slope
        ds.RescaleIntercept = inter
        ds.RescaleType = "US"
    # window in modality units, covering the body's display range
    q = np.percentile(disp[:: max(1, disp.shape[0] // 128), :: max(1, disp.shape[1] // 128)], [1, 99.5])
    vals = prm["lo"] + q * (prm["hi"] - prm["lo"])
    if prm["photometric"] == "MONOCHROME1":
        vals = (2 ** prm["bits"] - 1) - vals[::-1]
    _window(ds, vals[0] * slope + inter, vals[1] * slope + inter, prm["window"])
    return ds


def _write_radiograph(it: Item, root: Path, p: Patient, bank: NoiseBank) -> dict:
    prm = it.params
    rng = np.random.default_rng(it.seed)
    clean, info = render_radiograph(rng, it.body_part, it.view, bool(p.lesion), prm["long_side"], prm["marker"])
    out = _emit_radiograph(it, root, clean, info, rng, bank)
    for child in it.children:
        if child.kind == "exact_duplicate":
            (root / child.path).write_bytes((root / it.path).read_bytes())
            child.result = dict(out)
        elif child.kind == "near_duplicate":
            crng = np.random.default_rng(child.seed)
            dy, dx = child.params["shift"]
            shifted = np.roll(clean, (dy, dx), axis=(0, 1))
            les = info["lesion"]
            cinfo = {"lesion": None if les is None else (les[0] + dy, les[1] + dx, les[2])}
            child.result = _emit_radiograph(child, root, shifted, cinfo, crng, bank)
    return out


def _emit_radiograph(it: Item, root: Path, clean: np.ndarray, info: dict, rng: np.random.Generator,
                     bank: NoiseBank) -> dict:
    prm = it.params
    disp = _noisy(clean, rng, prm["noise"], bank)
    disp, (oy, ox) = _pad(disp, prm["pad"])
    stored = _quantize(disp, prm)
    ds = _radiograph_dataset(it, stored, disp, rng)
    data = _encode(ds, stored, prm["transfer_syntax"])
    if it.kind == "truncated":
        data = data[: int(len(data) - len(ds.PixelData) * (1 - prm["cut"]))]
    _write(root / it.path, data)
    les = info["lesion"]
    res = {"rows": stored.shape[0], "columns": stored.shape[1],
           "transfer_syntax": str(ds.file_meta.TransferSyntaxUID)}
    if les is not None:
        res.update(lesion_row=round(les[0] + oy, 1), lesion_col=round(les[1] + ox, 1), lesion_radius=round(les[2], 1))
    return res


def _write_blank(it: Item, root: Path) -> dict:
    prm = it.params
    rng = np.random.default_rng(it.seed)
    long_side = prm["long_side"]
    h, w = long_side, int(long_side * rng.uniform(0.7, 0.95))
    stored = np.full((h, w), int(rng.integers(0, 2 ** prm["bits"])), np.uint8 if prm["bits"] == 8 else np.uint16)
    ds = _base_dataset(it, CR_STORAGE if it.modality == "CR" else DX_STORAGE)
    ds.ImageType = ["ORIGINAL", "PRIMARY"]
    ds.PixelSpacing = [prm["pixel_spacing"]] * 2
    _set_pixels(ds, stored, prm["bits"], prm["photometric"])
    _write(root / it.path, _encode(ds, stored, ExplicitVRLittleEndian))
    return {"rows": h, "columns": w, "transfer_syntax": ExplicitVRLittleEndian}


def _write_slice(it: Item, root: Path, p: Patient) -> dict:
    prm = it.params
    rng = np.random.default_rng(it.seed)
    masks = anat.cross_section(rng, 128, bool(p.lesion), prm["z"], p.lesion_pos)
    n = prm["size"]
    if it.kind == "ct":
        hu = _resize(anat.draw_ct_hu(rng, masks), n, n)
        hu = hu + rng.standard_normal(hu.shape, dtype=np.float32) * prm["noise"]
        stored = np.clip(np.rint(hu + 1024), 0, 2 ** prm["bits"] - 1).astype(np.uint16)
        ds = _base_dataset(it, CT_STORAGE)
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.KVP = 120
        ds.add(DataElement(0x00180015, "CS", str(rng.choice(["FEMUR", "THIGH", "FEMUR LT", "Femur li"])),
                           validation_mode=dcm_config.IGNORE))
    else:
        sig = _resize(anat.draw_mr(rng, masks), n, n)
        sig = np.abs(sig + rng.standard_normal(sig.shape, dtype=np.float32) * prm["noise"])
        stored = np.clip(np.rint(sig), 0, 2 ** prm["bits"] - 1).astype(np.uint16)
        ds = _base_dataset(it, MR_STORAGE)
        ds.ImageType = ["ORIGINAL", "PRIMARY", "M", "ND"]
        ds.ScanningSequence = "SE"
        ds.SequenceVariant = "NONE"
        ds.ScanOptions = ""
        ds.MRAcquisitionType = "2D"
        ds.RepetitionTime = 550.0
        ds.EchoTime = 12.0
        ds.MagneticFieldStrength = 1.5
        ds.BodyPartExamined = "THIGH"
    fov = float(rng.uniform(180, 260))
    ds.PixelSpacing = [round(fov / n, 4)] * 2
    ds.SliceThickness = 5.0
    ds.ImagePositionPatient = [-fov / 2, -fov / 2, 5.0 * prm["slice"]]
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.SliceLocation = 5.0 * prm["slice"]
    _set_pixels(ds, stored, prm["bits"], "MONOCHROME2")
    if it.kind == "ct":
        ds.RescaleIntercept = -1024
        ds.RescaleSlope = 1
        ds.RescaleType = "HU"
        if prm["window"] == "multi":
            ds.WindowCenter, ds.WindowWidth = [40, 500], [400, 2000]
        elif prm["window"] == "single":
            ds.WindowCenter, ds.WindowWidth = 500, 2000
    else:
        _window(ds, 0, float(np.percentile(stored, 99.5)), prm["window"])
    data = _encode(ds, stored, prm["transfer_syntax"])
    _write(root / it.path, data)
    return {"rows": n, "columns": n, "transfer_syntax": str(ds.file_meta.TransferSyntaxUID)}


def _write_sr(it: Item, root: Path) -> dict:
    ds = _base_dataset(it, BASIC_TEXT_SR)
    p = it.study.patient
    ds.ValueType = "CONTAINER"
    ds.CompletionFlag = "COMPLETE"
    ds.VerificationFlag = "UNVERIFIED"
    ds.ContinuityOfContent = "SEPARATE"
    item = Dataset()
    item.RelationshipType = "CONTAINS"
    item.ValueType = "TEXT"
    item.TextValue = (f"Report for {p.first} {p.last} ({p.pid}), born {p.birth}: no acute osseous abnormality. "
                      f"Dictated by {it.study.physician.replace('^', ' ')}.")
    ds.ContentSequence = [item]
    _write(root / it.path, _encode(ds, None, ExplicitVRLittleEndian))
    return {"transfer_syntax": ExplicitVRLittleEndian}


def _write_export(it: Item, root: Path, bank: NoiseBank) -> dict:
    p = it.params["patient"]
    rng = np.random.default_rng(it.seed)
    clean, info = render_radiograph(rng, it.body_part, it.view, bool(p.lesion), it.params["long_side"],
                                    str(rng.choice(["L", "R"])) if rng.random() < 0.7 else None)
    disp = _noisy(clean, rng, float(rng.uniform(0.006, 0.02)), bank)
    arr = np.clip(np.rint(disp * 255), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    if it.kind == "png":
        Image.fromarray(arr, mode="L").save(buf, format="PNG", compress_level=1)
    else:
        Image.fromarray(arr, mode="L").save(buf, format="JPEG", quality=92)
    _write(root / it.path, buf.getvalue())
    res = {"rows": arr.shape[0], "columns": arr.shape[1]}
    les = info["lesion"]
    if les is not None:
        res.update(lesion_row=round(les[0], 1), lesion_col=round(les[1], 1), lesion_radius=round(les[2], 1))
    return res


def _write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


# ------------------------------------------------------------------------------------------------
# archive
# ------------------------------------------------------------------------------------------------

def prepare_out(out: Path, overwrite: bool) -> None:
    """Make ``out`` an empty folder; ``overwrite`` replaces only a folder an earlier ``synth`` wrote."""
    if out.exists() and not out.is_dir():
        raise UserError(f"{out}: exists and is not a folder")
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise UserError(f"{out}: folder is not empty; choose a new folder or pass --overwrite")
        if not (out / ".synth").is_dir():
            raise UserError(f"{out}: --overwrite only replaces a folder written by 'radpretrain synth' "
                            "(it has no .synth/ folder); refusing to delete it")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)


def _write_item(it: Item, out: Path, bank: NoiseBank) -> dict[str, dict]:
    """Write one planned file (and the duplicates made from it); return ``{path: result}``."""
    p = it.study.patient if it.study is not None else it.params.get("patient")
    if it.kind in ("radiograph", "truncated"):
        res = _write_radiograph(it, out, p, bank)
        return {it.path: res, **{c.path: c.result for c in it.children}}
    if it.kind in ("ct", "mr"):
        return {it.path: _write_slice(it, out, p)}
    if it.kind == "blank":
        return {it.path: _write_blank(it, out)}
    if it.kind == "no_pixels":
        return {it.path: _write_sr(it, out)}
    if it.kind in ("png", "jpeg"):
        return {it.path: _write_export(it, out, bank)}
    if it.kind in ("not_dicom", "zero_byte"):
        _write(out / it.path, NOT_DICOM_TEXT if it.kind == "not_dicom" else b"")
        return {it.path: {}}
    raise AssertionError(it.kind)  # pragma: no cover


@functools.lru_cache(maxsize=1)
def cached_noise_bank(seed: int) -> NoiseBank:
    """:class:`NoiseBank` of ``seed`` (36 MB, never changed), made once: forked workers inherit it."""
    return NoiseBank(seed)


def _run_job(job: tuple[Item, str, int]) -> dict[str, dict]:
    """A pool worker's task: (item, output folder, seed); the noise bank is the one made before forking."""
    it, out, seed = job
    return _write_item(it, Path(out), cached_noise_bank(seed))


def _n_workers(workers: int | None, n_jobs: int) -> int:
    if workers is None:
        workers = min(2, os.cpu_count() or 1)
    if "fork" not in multiprocessing.get_all_start_methods() or n_jobs < 40:
        return 1
    return max(1, int(workers))


def generate_archive(out, n_patients: int = 200, seed: int = 0, overwrite: bool = False,
                     workers: int | None = None) -> dict:
    """Write the synthetic archive to ``out`` and return a summary dict.

    ``workers``: processes used to draw and write images (default: up to 2; small archives
    are written in-process).  The files do not depend on it.

    ``summary``: ``out``, ``n_patients``, ``seed``, ``n_files``, ``by_kind`` (files per kind),
    ``n_lesion_patients``, ``seconds``.  Raises :class:`UserError` for a bad folder or count.
    """
    t0 = time.perf_counter()
    n_patients, seed = int(n_patients), int(seed)
    if n_patients < 3:
        raise UserError(f"--patients must be at least 3 (got {n_patients})")
    if seed < 0:
        raise UserError(f"--seed must be >= 0 (got {seed})")
    out = Path(out)
    prepare_out(out, overwrite)
    planner = _Planner(n_patients, seed)
    items = planner.plan()
    jobs = [it for it in items if it.kind != "exact_duplicate"]  # duplicates are written with their source
    results: dict[str, dict] = {}
    workers = _n_workers(workers, len(jobs))
    try:
        bank = cached_noise_bank(seed)  # before forking: the workers inherit it
        if workers > 1:
            ctx = multiprocessing.get_context("fork")
            with ctx.Pool(workers) as pool:
                for res in pool.imap_unordered(_run_job, [(it, str(out), seed) for it in jobs], chunksize=4):
                    results.update(res)
        else:
            for it in jobs:
                results.update(_write_item(it, out, bank))
    finally:
        cached_noise_bank.cache_clear()  # its 36 MB are not kept after the archive is written
    written = [it for it in items if it.kind != "exact_duplicate"]
    written += [c for it in items for c in it.children if c.kind == "exact_duplicate"]
    written += [c for it in items for c in it.children if c.kind == "near_duplicate"]
    for it in written:
        it.result = results.get(it.path, {})
    written.sort(key=lambda it: it.path)
    paths = [it.path for it in written]
    if len(set(paths)) != len(paths):  # pragma: no cover - planner bug
        raise AssertionError("synth: two files planned at the same path")

    def patient_of(it):
        return it.study.patient if it.study is not None else it.params["patient"]

    with open(out / "labels.csv", "w", newline="") as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(["path", "lesion"])
        for it in written:
            if it.kind in LABELLED_KINDS:
                w.writerow([it.path, patient_of(it).lesion])
    hidden = out / ".synth"
    hidden.mkdir(exist_ok=True)
    with open(hidden / "truth.csv", "w", newline="") as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(TRUTH_COLUMNS)
        for it in written:
            r = it.result
            w.writerow([it.path, it.kind, EXPECTED_STATUS[it.kind], it.body_part, patient_of(it).pid,
                        patient_of(it).lesion, it.modality or ("XR" if it.kind in ("png", "jpeg") else ""),
                        it.view, it.photometric, it.bits_stored or "",
                        r.get("transfer_syntax", it.transfer_syntax), r.get("rows", ""), r.get("columns", ""),
                        it.source.path if it.source is not None else "",
                        r.get("lesion_row", ""), r.get("lesion_col", ""), r.get("lesion_radius", "")])
    phi = {k: sorted(v) for k, v in planner.phi.items()}
    phi["all"] = sorted(set().union(*planner.phi.values()))
    (hidden / "planted_phi.json").write_text(json.dumps(phi, indent=1) + "\n")
    by_kind = Counter(it.kind for it in written)
    summary = {
        "n_patients": n_patients, "seed": seed, "n_files": len(written),
        "by_kind": {k: by_kind.get(k, 0) for k in KINDS},
        "n_lesion_patients": sum(p.lesion for p in planner.patients),
        "n_labelled": sum(by_kind.get(k, 0) for k in LABELLED_KINDS),
    }
    (hidden / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    summary["out"] = str(out)
    summary["seconds"] = round(time.perf_counter() - t0, 2)
    return summary
