"""De-identification: keyed pseudonyms and the few harmless facts kept from a header.

What ingest keeps from a patient's record is *only*:

* keyed pseudonyms (HMAC-SHA256 with the de-id key, first 16 hex chars) of the
  patient id, study/series instance UIDs, the relative source path and the
  image (path + frame/slice index);
* age in whole years (from PatientAge, else birth date and study date; ages of
  90 and over are reported as 90, as in the HIPAA Safe Harbor rule);
* sex (M/F/O/unknown), normalised body part, view and modality.

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


def normalise_sex(value) -> str:
    s = str(value or "").strip().upper()[:1]
    return s if s in ("M", "F", "O") else "unknown"


def dicom_age(ds) -> float:
    study = next((ds.get(k) for k in ("StudyDate", "SeriesDate", "AcquisitionDate", "ContentDate") if ds.get(k)), None)
    return age_years(ds.get("PatientAge"), ds.get("PatientBirthDate"), study)
