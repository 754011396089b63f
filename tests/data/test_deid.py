"""Keyed pseudonyms, key loading and the header facts de-identification keeps."""

import math
import re

import pytest

from radpretrain.data import deid, vocab
from radpretrain.errors import UserError

pytestmark = pytest.mark.usefixtures("deid_key")


def test_tokens_are_keyed_16_hex_and_kind_separated():
    a = deid.Pseudonymizer(b"k" * 32)
    b = deid.Pseudonymizer(b"j" * 32)
    t = a.patient("PHI000123")
    assert re.fullmatch(r"[0-9a-f]{16}", t)
    assert t == a.patient("PHI000123")            # deterministic
    assert t != b.patient("PHI000123")            # keyed
    assert t != a.study("PHI000123")              # kind separated
    assert a.image("x/y.dcm", 0) != a.image("x/y.dcm", 1)
    assert "PHI" not in repr(a) and "kkkk" not in repr(a)


@pytest.mark.parametrize("key_len", [1, 16, 32, 63, 64, 65, 200])
def test_tokens_are_hmac_sha256_for_any_key_length(key_len):
    import hashlib
    import hmac

    key = bytes((7 * i + 3) % 256 for i in range(key_len))
    p = deid.Pseudonymizer(key)
    for kind, value in [("patient", "PHI000123"), ("image", "a/b.dcm#0"), ("path", "\u00e9\udcff/x"), ("study", "")]:
        msg = f"{kind}\x00{value}".encode("utf-8", "surrogateescape")
        assert p.token(kind, value) == hmac.new(key, msg, hashlib.sha256).hexdigest()[:16]


def test_patient_memo_is_bounded_and_not_pickled(monkeypatch):
    import pickle

    monkeypatch.setattr(deid, "PATIENT_MEMO", 3)
    p = deid.Pseudonymizer(b"k" * 32)
    toks = [p.patient(f"P{i}") for i in range(10)]
    assert len(p._patients) <= 3
    assert toks == [p.token("patient", f"P{i}") for i in range(10)]  # remembered or not: the same pseudonym
    q = pickle.loads(pickle.dumps(p))
    assert q._patients == {} and q.patient("P1") == toks[1]


def test_key_from_env_hex_and_text(monkeypatch):
    monkeypatch.setenv(deid.KEY_ENV, "00" * 16)
    assert deid.load_key() == bytes(16)
    monkeypatch.setenv(deid.KEY_ENV, "my secret phrase")
    assert deid.load_key() == b"my secret phrase"


def test_key_file_env_and_default_file_created(monkeypatch, tmp_path, caplog):
    monkeypatch.delenv(deid.KEY_ENV)
    kf = tmp_path / "k.txt"
    kf.write_text("ab" * 32)
    monkeypatch.setenv(deid.KEY_FILE_ENV, str(kf))
    assert deid.load_key() == bytes.fromhex("ab" * 32)
    monkeypatch.setenv(deid.KEY_FILE_ENV, str(tmp_path / "missing"))
    with pytest.raises(UserError, match="missing"):
        deid.load_key()
    monkeypatch.delenv(deid.KEY_FILE_ENV)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    k1 = deid.load_key()
    path = tmp_path / "home/.config/radpretrain/deid.key"
    assert path.is_file() and len(k1) == 32
    assert (path.stat().st_mode & 0o777) == 0o600
    assert deid.load_key() == k1                  # reused, not recreated


@pytest.mark.parametrize("age,birth,study,expected", [
    ("045Y", None, None, 45.0),
    ("006M", None, None, 0.5),
    ("104W", None, None, 1.99),
    ("", "19800615", "20200614", 39.0),
    ("", "19800615", "20200615", 40.0),
    ("", "19200101", "20200101", 90.0),          # capped (Safe Harbor)
    ("097Y", None, None, 90.0),
])
def test_age_years(age, birth, study, expected):
    assert deid.age_years(age, birth, study) == pytest.approx(expected, abs=0.01)


def test_age_unknown_and_sex():
    assert math.isnan(deid.age_years("", "", "20200101"))
    assert math.isnan(deid.age_years("garbage", "1980", None))
    assert [vocab.normalise_sex(s) for s in ("M", "f", "O", "", None, "X")] == ["M", "F", "O", "unknown", "unknown", "unknown"]
