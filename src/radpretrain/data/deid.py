"""De-identification: keyed pseudonyms and the few harmless facts kept from a header.

What ingest keeps from a patient's record is *only*:

* keyed pseudonyms (HMAC-SHA256 with the de-id key, first 16 hex chars) of the
  patient id, study/series instance UIDs, the relative source path and the
  image (path + frame/slice index);
* age in whole years (from PatientAge, else birth date and study date; ages of
  90 and over are reported as 90, as in the HIPAA Safe Harbor rule);
* sex (M/F/O/unknown), normalised body part, view and modality (:mod:`.vocab`).

Everything else (names, birth dates, accession numbers, institution,
physicians, exact dates, free text, paths) stays in memory only.

The key comes from ``RADPRETRAIN_DEID_KEY`` (hex or text), else the file named
by ``RADPRETRAIN_DEID_KEY_FILE``, else ``~/.config/radpretrain/deid.key``,
created with a random key on first use (with a warning).  The same key gives
the same pseudonyms, so keep it to add data to a dataset later, and keep it
secret: whoever has it can test a guessed patient id against a pseudonym.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import hmac
import os
import re
import secrets
from pathlib import Path

from radpretrain.data.vocab import BODY_PARTS
from radpretrain.errors import UserError
from radpretrain.utils import get_logger

KEY_ENV = "RADPRETRAIN_DEID_KEY"
KEY_FILE_ENV = "RADPRETRAIN_DEID_KEY_FILE"
DEFAULT_KEY_FILE = Path("~/.config/radpretrain/deid.key")
TOKEN_CHARS = 16
MAX_AGE = 90.0

log = get_logger("radpretrain.data.deid")


def _parse_key(text: str) -> bytes:
    text = text.strip()
    if not text:
        raise ValueError("empty key")
    if re.fullmatch(r"(?:[0-9a-fA-F]{2}){16,}", text):
        return bytes.fromhex(text)
    return text.encode("utf-8")


def key_path() -> Path:
    """Where the key file is (or will be created)."""
    return Path(os.environ.get(KEY_FILE_ENV) or DEFAULT_KEY_FILE).expanduser()


def check_store_location(out: Path, sources, what: str = "source folder") -> None:
    """A one-line error when a new store ``out`` would hold the key file or lie inside one of its
    ``sources`` (``what`` names them in the message)."""
    o = out.resolve()
    kp = key_path().resolve()
    if kp == o or o in kp.parents:
        raise UserError(f"{out}: the de-identification key file must not be inside the dataset; choose another --out")
    for s in sources:
        sp = Path(s).resolve()
        if o == sp or sp in o.parents:
            raise UserError(f"{out}: the dataset must not be inside the {what} {s}")


def load_key(create: bool = True) -> bytes:
    """The de-id key: env ``RADPRETRAIN_DEID_KEY``, else the key file (created on first use)."""
    env = os.environ.get(KEY_ENV)
    if env:
        try:
            return _parse_key(env)
        except ValueError:
            raise UserError(f"${KEY_ENV}: the de-identification key is empty") from None
    path = key_path()
    if path.is_file():
        try:
            return _parse_key(path.read_text())
        except ValueError:
            raise UserError(f"{path}: the de-identification key file is empty") from None
    if os.environ.get(KEY_FILE_ENV):
        raise UserError(f"{path}: no such de-identification key file (set by ${KEY_FILE_ENV})")
    if not create:
        raise UserError(f"no de-identification key: set ${KEY_ENV} or ${KEY_FILE_ENV}")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(secrets.token_hex(32) + "\n")
    log.warning("created a new de-identification key at %s; keep it secret and keep it "
                "(the same key is needed to add data to this dataset later)", path)
    return _parse_key(path.read_text())


PATIENT_MEMO = 1 << 16  # patient pseudonyms remembered per Pseudonymizer (a patient has many images)


class Pseudonymizer:
    """Keyed pseudonyms: ``token(kind, value)`` = HMAC-SHA256(key, kind NUL value), 16 hex chars.

    Patient pseudonyms are remembered (at most :data:`PATIENT_MEMO` of them, in memory only).
    """

    def __init__(self, key: bytes | None = None):
        self._key = key if key is not None else load_key()
        self._mac = hmac.new(self._key, digestmod=hashlib.sha256)  # keyed state, copied per token
        self._patients: dict[str, str] = {}

    def token(self, kind: str, value: str) -> str:
        mac = self._mac.copy()
        mac.update(f"{kind}\x00{value}".encode("utf-8", "surrogateescape"))
        return mac.hexdigest()[:TOKEN_CHARS]

    def patient(self, value: str) -> str:
        tok = self._patients.get(value)
        if tok is None:
            if len(self._patients) >= PATIENT_MEMO:
                self._patients.clear()
            tok = self._patients[value] = self.token("patient", value)
        return tok

    def study(self, value: str) -> str:
        return self.token("study", value)

    def series(self, value: str) -> str:
        return self.token("series", value)

    def path(self, relpath: str) -> str:
        return self.token("path", relpath)

    def image(self, relpath: str, index: int | str = 0) -> str:
        return self.token("image", f"{relpath}#{index}")

    def fingerprint(self) -> str:
        """Identifies the key (not secret): stores made with different keys must not be merged."""
        return self.token("fingerprint", "radpretrain-deid-key")

    def __getstate__(self):  # picklable for worker processes
        return {"_key": self._key}

    def __setstate__(self, state):
        self.__init__(state["_key"])

    def __repr__(self) -> str:  # never show the key
        return f"Pseudonymizer(fingerprint={self.fingerprint()})"


# ----------------------------------------------------------------------------- header facts

_AGE_RE = re.compile(r"^\s*(\d{1,3})\s*([DWMY]?)\s*$", re.I)
_AGE_UNIT = {"D": 1 / 365.25, "W": 7 / 365.25, "M": 1 / 12, "Y": 1.0, "": 1.0}


def _parse_date(value) -> _dt.date | None:
    s = str(value or "").strip()
    m = re.match(r"^(\d{4})(\d{2})(\d{2})", s.replace("-", "").replace(".", ""))
    if not m:
        return None
    try:
        return _dt.date(int(m.group(1)), int(m.group(2)), int(m.group(3)))
    except ValueError:
        return None


def cap_age(years: float) -> float:
    return float(min(years, MAX_AGE))


def age_years(patient_age=None, birth_date=None, study_date=None) -> float:
    """Age in years (float, NaN when unknown); only this number is ever kept.

    ``patient_age`` is the DICOM AS string ('045Y', '006M', '010W', '003D');
    otherwise whole years between ``birth_date`` and ``study_date`` (DA strings).
    """
    m = _AGE_RE.match(str(patient_age or ""))
    if m:
        years = int(m.group(1)) * _AGE_UNIT[m.group(2).upper()]
        return cap_age(round(years, 2))
    b, s = _parse_date(birth_date), _parse_date(study_date)
    if b and s and s >= b:
        years = s.year - b.year - ((s.month, s.day) < (b.month, b.day))
        return cap_age(float(years))
    return float("nan")


def dicom_age(ds) -> float:
    study = next((ds.get(k) for k in ("StudyDate", "SeriesDate", "AcquisitionDate", "ContentDate") if ds.get(k)), None)
    return age_years(ds.get("PatientAge"), ds.get("PatientBirthDate"), study)


# ----------------------------------------------------------------------------- folder names as labels

# Words of class names (findings, grades, splits, views, connectives, and the body parts of the manifest).  A folder name of
# two to four words made only of letters is shaped like a person's name ("DOE JOHN", "Anna Smith",
# "DOE_J") unless one of its words is one of these ("NO FINDING", "Viral Pneumonia", "no_fracture").
CLASS_WORDS = frozenset("""
normal abnormal abnormality healthy disease diseased pathology pathological finding no not non none yes
positive negative pos neg present absent other unknown control
pneumonia viral bacterial covid sars influenza tb tuberculosis opacity lung effusion pleural
fracture fractured nonfracture broken healed healing dislocation luxation subluxation
benign malignant malignancy tumor tumour lesion nodule mass cancer carcinoma metastasis sarcoma cyst
grade class stage type level category group score kl oa
mild moderate severe doubtful minimal slight marked early late advanced acute chronic old new
osteoarthritis arthritis arthrosis osteoporosis osteopenia scoliosis
cardiomegaly edema oedema consolidation atelectasis pneumothorax emphysema fibrosis hernia infiltration
infiltrate thickening enlarged cardiomediastinum support device implant hardware prosthesis
left right bilateral unilateral both ap pa lat lateral oblique frontal view
train training val valid validation test testing holdout dev
good bad poor quality low high with without and or of in on the xr
""".split()) | frozenset(BODY_PARTS)
MAX_CLASS_NAME = 32
_CLASS_CHARS = re.compile(r"[A-Za-z0-9 _+.\-]{1,%d}" % MAX_CLASS_NAME)  # no ^ = , ' / or letters beyond ASCII
_DIGIT_RUN = re.compile(r"\d{4,}")  # a year, a date, an id, an accession number
_DIGITS = re.compile(r"\d+")
_ID_WORD = re.compile(r"(?:sub|subj|subject|pat|patient|pt|case|id|mrn|acc|accession|study|series|exam|scan|p)"
                      r"[ _.\-]?\d+", re.I)
_MONTH = re.compile(r"(?<![a-z])(?:jan|feb|mar|apr|may|jun|jul|aug|sep|sept|oct|nov|dec)[a-z]*(?![a-z])", re.I)
_WORD_SPLIT = re.compile(r"[ _.\-+]+")
_NAME_TOKEN = re.compile(r"[A-Za-z]+|\d+")


def folder_name_looks_identifying(name: str) -> bool:
    """True when a folder name may be a person's name, a date or an identifier, so it must not become a label.

    Refused: characters class names do not use (DICOM person-name ``^``/``=``, the comma of "Surname,
    Forename", apostrophes, letters beyond ASCII) or more than 32 characters; 4+ digits in a row (years,
    dates, ids, accession numbers); several digit groups with 3+ digits (``12.03.21``); 3+ digits
    outnumbering the letters (``P001``, ``0042``); an id word with a number (``sub-01``, ``patient7``,
    ``case_12``); a month with a number; two to four words of letters none of which is a class word
    (:data:`CLASS_WORDS`), the shape of "SURNAME FORENAME".  Accepted: ``0``..``4``, ``KL3``, ``NORMAL``,
    ``no_fracture``, ``Viral Pneumonia``, ``COVID-19``, ``grade 2``.
    """
    name = name.strip()
    if not _CLASS_CHARS.fullmatch(name):
        return True
    groups = _DIGITS.findall(name)
    n_digits = sum(map(len, groups))
    n_letters = sum(c.isalpha() for c in name)
    if _DIGIT_RUN.search(name) or (len(groups) >= 2 and n_digits >= 3) or (n_digits >= 3 and n_digits > n_letters):
        return True
    if _ID_WORD.fullmatch(name) or (groups and _MONTH.search(name)):
        return True
    words = [w for w in _WORD_SPLIT.split(name) if w]
    if 2 <= len(words) <= 4 and all(w.isalpha() for w in words):
        return not any(_is_class_word(w) for w in words)
    return False


def _is_class_word(word: str) -> bool:
    w = word.lower()  # plurals too: "devices", "lesions", "masses"
    return any(stem in CLASS_WORDS for stem in (w, w[:-1] if w.endswith("s") else w, w[:-2] if w.endswith("es") else w))


# header values whose words must never become a label: names, ids, dates, institution, physicians
IDENTITY_KEYWORDS = (
    "PatientName", "PatientID", "OtherPatientIDs", "OtherPatientNames", "PatientBirthName",
    "PatientMotherBirthName", "IssuerOfPatientID", "AccessionNumber", "StudyID", "PatientBirthDate",
    "StudyDate", "SeriesDate", "AcquisitionDate", "ContentDate", "InstitutionName", "ReferringPhysicianName",
    "PerformingPhysicianName", "NameOfPhysiciansReadingStudy", "OperatorsName", "RequestingPhysician",
)


def header_identity_tokens(ds) -> set[str]:
    """Upper-case words (2+ letters) and numbers (3+ digits) of a DICOM header's identifying values, and each
    whole value (in memory only): a folder name made of any of them would carry them into the labels."""
    out: set[str] = set()
    for kw in IDENTITY_KEYWORDS:
        try:
            value = ds.get(kw)
        except Exception:  # a malformed value: nothing to compare
            continue
        values = value if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue" else [value]
        for v in values:
            text = str(v or "").strip()
            if not text:
                continue
            out.add(" ".join(_NAME_TOKEN.findall(text)).upper())
            out.update(_identity_words(text))
    out.discard("")
    return out


def _identity_words(text: str) -> set[str]:
    return {t.upper() for t in _NAME_TOKEN.findall(text) if (t.isalpha() and len(t) >= 2) or len(t) >= 3}


def folder_name_in_header(name: str, identities: set[str]) -> bool:
    """True when a folder name is, or holds a word of, one of :func:`header_identity_tokens`' values."""
    whole = " ".join(_NAME_TOKEN.findall(name)).upper()
    return bool(whole and whole in identities) or not _identity_words(name).isdisjoint(identities)
