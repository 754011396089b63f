"""`radpretrain pull` against a real Orthanc (DICOMweb plugin) on a free loopback port.

The module starts Orthanc once (and a second one with authentication for the auth tests), uploads
small synthetic DICOMs through its REST API and pulls them back over QIDO-RS/WADO-RS.  Fault
injection (errors, dropped connections, a hang for the kill test, bearer tokens) goes through a
small loopback proxy in front of Orthanc.  Skips with the reason when Orthanc is not installed.
"""

from __future__ import annotations

import base64
import importlib.util
import io
import json
import logging
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import generate_uid

from radpretrain import cli
from radpretrain.data import pull as pull_mod
from radpretrain.errors import UserError

_spec = importlib.util.spec_from_file_location("radpretrain_test_orthanc", Path(__file__).with_name("orthanc_server.py"))
orthanc = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(orthanc)

PASSWORD = "Pa55-w0rd-do-not-leak"
TOKEN = "tok-3f9a1c-do-not-leak"
PHI = ("Doe^Jane", "PID-0001", "PID-0002", "19700101")

# (study date, [(modality, body part, number of instances), ...]) per study
STUDIES = [
    ("20200115", [("CR", "KNEE", 3), ("CR", "HAND", 2)]),
    ("20210610", [("DX", "HAND", 2), ("CT", "CHEST", 2)]),
    ("20220301", [("DX", "CHEST", 2), ("CR", "KNEE", 1)]),
    ("20230901", [("CR", "KNEE", 2), ("DX", "", 1)]),  # the last series has no BodyPartExamined
]


def _build_archive():
    """Synthetic instances: list of dicts (uids, attributes, file bytes)."""
    out, seed = [], 0
    for s, (date, series) in enumerate(STUDIES):
        study = generate_uid()
        for modality, body_part, n in series:
            se = generate_uid()
            for _ in range(n):
                seed += 1
                sop = generate_uid()
                data = orthanc.make_instance(
                    patient_id=f"PID-000{1 + s % 2}", patient_name="Doe^Jane", study_uid=study, series_uid=se,
                    sop_uid=sop, study_date=date, modality=modality, body_part=body_part, seed=seed)
                out.append({"study": study, "series": se, "sop": sop, "date": date, "modality": modality,
                            "body_part": body_part, "data": data})
    return out


@pytest.fixture(scope="module")
def archive():
    return _build_archive()


def _start(tmp_path_factory, name, users=None):
    reason = orthanc.orthanc_unavailable()
    if reason:
        pytest.skip(reason)
    server = orthanc.Orthanc(tmp_path_factory.mktemp(name), users=users)
    try:
        server.start()
    except RuntimeError as e:
        pytest.skip(f"Orthanc could not be started: {str(e)[:300]}")
    return server


@pytest.fixture(scope="module")
def server(tmp_path_factory, archive):
    srv = _start(tmp_path_factory, "orthanc")
    try:
        for inst in archive:
            srv.upload(inst["data"])
        yield srv
    finally:
        srv.stop()


@pytest.fixture(scope="module")
def auth_server(tmp_path_factory, archive):
    srv = _start(tmp_path_factory, "orthanc_auth", users={"alice": PASSWORD})
    try:
        for inst in archive[:3]:
            srv.upload(inst["data"])
        yield srv
    finally:
        srv.stop()


@pytest.fixture
def proxy_factory():
    proxies = []

    def make(upstream, rule=None, tls=None):
        p = orthanc.FaultProxy(upstream, rule, tls=tls)
        proxies.append(p)
        return p

    yield make
    for p in proxies:
        p.close()


@pytest.fixture
def radlog():
    """Every record of the radpretrain logger (it does not propagate to the root logger)."""
    records: list[str] = []

    class H(logging.Handler):
        def emit(self, record):
            records.append(self.format(record))

    h = H(level=logging.DEBUG)
    logger = logging.getLogger("radpretrain")
    logger.addHandler(h)
    yield records
    logger.removeHandler(h)


def _on_disk(out: Path) -> dict[str, Path]:
    files = sorted(out.rglob("*.dcm"))
    stems = [f.stem for f in files]
    assert len(stems) == len(set(stems)), "an instance was written twice"
    return dict(zip(stems, files))


def _wado(path: str) -> bool:
    """A WADO-RS retrieval of one instance (not a QIDO-RS search)."""
    return "/instances/" in path and "?" not in path


def _sop_of(path: str) -> str:
    return path.rstrip("/").rsplit("/", 1)[-1]


def _no_secret(*texts: str, secrets=(PASSWORD, TOKEN)):
    basic = base64.b64encode(f"alice:{PASSWORD}".encode()).decode()
    for text in texts:
        for secret in (*secrets, basic):
            assert secret not in text


# -- without a server ------------------------------------------------------------------------------

def test_arguments_are_checked_before_any_traffic(tmp_path, capsys):
    bad = [
        (["--dicomweb", "http://alice:secret@127.0.0.1:1/dicom-web"], "do not put credentials"),
        (["--dicomweb", "ftp://127.0.0.1/x"], "http:// or https://"),
        (["--dicomweb", "http://127.0.0.1:1/dw", "--since", "2020-13-01"], "YYYY-MM-DD"),
        (["--dicomweb", "http://127.0.0.1:1/dw", "--since", "2021-01-01", "--until", "2020-01-01"], "after"),
        (["--dicomweb", "http://127.0.0.1:1/dw", "--modality", "C-R"], "code string"),
        (["--dicomweb", "http://127.0.0.1:1/dw", "--limit", "0"], "--limit"),
        (["--dicomweb", "http://127.0.0.1:1/dw", "--user", "alice"], "RADPRETRAIN_DICOMWEB_PASSWORD"),
        (["--dicomweb", "http://127.0.0.1:1/dw", "--user", "a", "--token-file", str(tmp_path)], "not both"),
        (["--dicomweb", "http://127.0.0.1:1/dw", "--ca-bundle", str(tmp_path / "none.pem")], "CA bundle"),
    ]
    env_pw = os.environ.pop(pull_mod.PASSWORD_ENV, None)
    try:
        for argv, expected in bad:
            assert cli.main(["pull", *argv, "--out", str(tmp_path / "o")]) == 2
            err = capsys.readouterr().err.strip()
            assert expected in err and "Traceback" not in err and len(err.splitlines()) == 1
            assert "secret" not in err
    finally:
        if env_pw is not None:
            os.environ[pull_mod.PASSWORD_ENV] = env_pw


def test_auth_objects_hide_secrets(tmp_path):
    f = tmp_path / "token"
    f.write_text(TOKEN + "\n")
    f.chmod(0o600)
    bearer = pull_mod.make_auth(token_file=str(f), env={})
    assert isinstance(bearer, pull_mod.BearerAuth) and bearer._token == TOKEN
    basic = pull_mod.make_auth(user="alice", env={pull_mod.PASSWORD_ENV: PASSWORD})
    assert (basic.username, basic.password) == ("alice", PASSWORD)
    assert pull_mod.make_auth(env={}) is None
    _no_secret(repr(bearer), repr(basic), str(bearer), str(basic))


def test_one_pull_at_a_time_per_folder(tmp_path):
    import fcntl

    with open(tmp_path / ".pull.lock", "a") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        with pytest.raises(UserError, match="another 'radpretrain pull' is writing to this folder"):
            pull_mod.pull(f"http://127.0.0.1:{orthanc.free_port()}/dicom-web", tmp_path, progress=False)


def test_unreachable_server_is_one_clear_line(tmp_path, capsys):
    port = orthanc.free_port()  # nothing listens there: a stopped server
    code = cli.main(["pull", "--dicomweb", f"http://127.0.0.1:{port}/dicom-web", "--out", str(tmp_path / "o"),
                     "--retries", "0"])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert "cannot reach the DICOMweb server" in err and "connection refused" in err
    assert len(err.splitlines()) == 1 and "Traceback" not in err


# -- against Orthanc ------------------------------------------------------------------------------

def test_pull_brings_back_exactly_the_archive_then_skips_everything(server, archive, tmp_path, capsys):
    out = tmp_path / "pulled"
    assert cli.main(["pull", "--dicomweb", server.dicomweb, "--out", str(out), "--workers", "3"]) == 0
    printed = capsys.readouterr().out
    assert f"{len(archive)} instances found in {len(STUDIES)} studies" in printed

    files = _on_disk(out)
    assert set(files) == {i["sop"] for i in archive}
    for inst in archive:
        path = files[inst["sop"]]
        assert path.relative_to(out).parts == (inst["study"], inst["series"], f"{inst['sop']}.dcm")
        got = pydicom.dcmread(path)
        sent = pydicom.dcmread(io.BytesIO(inst["data"]))
        assert got.PixelData == sent.PixelData and got.SOPInstanceUID == inst["sop"]
        assert (got.Modality, got.StudyInstanceUID) == (inst["modality"], inst["study"])
    assert not [p for p in out.rglob("*") if p.name.endswith(".part")]

    summary = json.loads((out / "pull_summary.json").read_text())
    assert summary["status"] == "complete"
    assert (summary["found"], summary["fetched"], summary["skipped"], summary["failed"]) == (len(archive), len(archive), 0, 0)
    assert summary["bytes"] == sum(f.stat().st_size for f in files.values())
    assert summary["studies"] == len(STUDIES) and summary["series"] == sum(len(s) for _, s in STUDIES)
    # nothing identifying in the layout or the summary
    names = " ".join(str(p.relative_to(out)) for p in out.rglob("*"))
    text = (out / "pull_summary.json").read_text()
    for value in (*PHI, *{i["date"] for i in archive}):
        assert value not in names and value not in text

    mtimes = {s: f.stat().st_mtime_ns for s, f in files.items()}
    again = pull_mod.pull(server.dicomweb, out, progress=False)
    assert (again["found"], again["fetched"], again["skipped"], again["bytes"]) == (len(archive), 0, len(archive), 0)
    assert {s: f.stat().st_mtime_ns for s, f in _on_disk(out).items()} == mtimes


FILTERS = [
    ({"modality": "CR,DX"}, lambda i: i["modality"] in ("CR", "DX")),
    ({"body_part": "knee"}, lambda i: i["body_part"] == "KNEE"),
    ({"modality": "DX", "body_part": "HAND,CHEST"}, lambda i: i["modality"] == "DX" and i["body_part"] in ("HAND", "CHEST")),
    ({"since": "2021-01-01", "until": "2022-12-31"}, lambda i: "20210101" <= i["date"] <= "20221231"),
    ({"since": "2022-03-01"}, lambda i: i["date"] >= "20220301"),
    ({"until": "2020-01-15", "modality": ["cr"]}, lambda i: i["date"] <= "20200115" and i["modality"] == "CR"),
]


@pytest.mark.parametrize("filters,keep", FILTERS, ids=[",".join(f) for f, _ in FILTERS])
def test_filters_select_exactly_the_matching_series(server, archive, tmp_path, filters, keep):
    summary = pull_mod.pull(server.dicomweb, tmp_path, progress=False, **filters)
    expected = {i["sop"] for i in archive if keep(i)}
    assert expected and len(expected) < len(archive)
    assert set(_on_disk(tmp_path)) == expected
    assert summary["fetched"] == summary["found"] == len(expected)
    assert summary["series"] == len({i["series"] for i in archive if keep(i)})


def test_filters_hold_when_the_server_ignores_them(server, archive, tmp_path, proxy_factory):
    """A server that does not match Modality/BodyPartExamined/StudyDate: checked on our side too."""
    import re

    def rule(path, headers):
        if "/dicom-web/" in path and "?" in path:
            return ("rewrite", re.sub(r"(Modality|BodyPartExamined|StudyDate)=[^&]*&?", "", path))
        return None

    proxy = proxy_factory(server.base, rule)
    summary = pull_mod.pull(f"{proxy.url}/dicom-web", tmp_path, modality="CR,DX", body_part="KNEE",
                            since="2020-06-01", progress=False)
    expected = {i["sop"] for i in archive
                if i["modality"] in ("CR", "DX") and i["body_part"] == "KNEE" and i["date"] >= "20200601"}
    assert expected and set(_on_disk(tmp_path)) == expected
    # the series without BodyPartExamined is left out, and counted
    assert summary["excluded_missing_attribute"] == {"BodyPartExamined": 1}


def test_paging_through_a_server_that_caps_its_answers(server, archive, tmp_path, proxy_factory):
    """A server answering at most 2 results per search, silently: paging still finds everything."""
    proxy = proxy_factory(server.base, lambda path, headers: ("rewrite", path.replace("limit=1000", "limit=2")))
    summary = pull_mod.pull(f"{proxy.url}/dicom-web", tmp_path, progress=False)
    assert any("limit=1000" in p and "offset=2" in p for p in proxy.requests)
    assert summary["found"] == len(archive) and set(_on_disk(tmp_path)) == {i["sop"] for i in archive}


def test_limit_takes_the_first_studies_in_uid_order(server, archive, tmp_path):
    summary = pull_mod.pull(server.dicomweb, tmp_path, limit=2, modality="DX", progress=False)
    dx_studies = sorted({i["study"] for i in archive if i["modality"] == "DX"})[:2]
    expected = {i["sop"] for i in archive if i["study"] in dx_studies and i["modality"] == "DX"}
    assert summary["studies"] == 2 and set(_on_disk(tmp_path)) == expected


def test_killed_pull_resumes_without_duplicates(server, archive, tmp_path, proxy_factory):
    """Run the CLI in a subprocess, kill -9 it after 4 instances, rerun: all there, once each."""
    release, served, lock = threading.Event(), [], threading.Lock()

    def rule(path, headers):
        if _wado(path):
            with lock:
                served.append(path)
                if len(served) > 4:
                    return ("block", release)  # the 5th retrieval hangs until the test ends
        return None

    proxy = proxy_factory(server.base, rule)
    out = tmp_path / "pulled"
    proc = subprocess.Popen([sys.executable, "-m", "radpretrain.cli", "pull", "--dicomweb", f"{proxy.url}/dicom-web",
                             "--out", str(out), "--workers", "1"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and len(list(out.rglob("*.dcm"))) < 4:
            assert proc.poll() is None, "the pull ended before it could be killed"
            time.sleep(0.05)
        while time.monotonic() < deadline and len(served) < 5:  # it reached the hanging 5th retrieval
            time.sleep(0.02)
        assert len(served) == 5
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
        release.set()
    first = _on_disk(out)
    assert len(first) == 4
    for f in first.values():  # every visible file is complete
        assert pydicom.dcmread(f).SOPInstanceUID == f.stem

    summary = pull_mod.pull(server.dicomweb, out, progress=False)
    assert (summary["skipped"], summary["fetched"], summary["failed"]) == (4, len(archive) - 4, 0)
    assert set(_on_disk(out)) == {i["sop"] for i in archive}
    assert not [p for p in out.rglob("*") if p.name.endswith(".part")]


def _default_sigint():
    """A job started in the background by a non-interactive shell inherits SIGINT ignored, and
    Python then keeps ignoring it; the Ctrl-C tests need the usual disposition."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def test_ctrl_c_saves_the_summary_and_does_not_wait_for_a_hung_request(server, archive, tmp_path, proxy_factory):
    release, served = threading.Event(), []

    def rule(path, headers):
        if _wado(path):
            served.append(path)
            return ("block", release) if len(served) > 2 else None
        return None

    proxy = proxy_factory(server.base, rule)
    out = tmp_path / "pulled"
    # -X faulthandler: if the interrupted process does not exit, SIGABRT makes it print every
    # thread's stack, so a failure says where it waited
    proc = subprocess.Popen([sys.executable, "-X", "faulthandler", "-m", "radpretrain.cli", "pull", "--dicomweb",
                             f"{proxy.url}/dicom-web", "--out", str(out), "--workers", "1"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
                            preexec_fn=_default_sigint)
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and len(served) < 3:
            time.sleep(0.02)
        assert len(served) == 3 and proc.poll() is None
        proc.send_signal(signal.SIGINT)
        try:
            _, err = proc.communicate(timeout=10)  # the 3rd retrieval hangs until released: not waited for
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGABRT)
            _, err = proc.communicate(timeout=10)
            pytest.fail(f"pull did not exit within 10 s of Ctrl-C; its threads:\n{err[-6000:]}")
    finally:
        if proc.poll() is None:
            proc.kill()
        release.set()
    assert proc.returncode == 130 and "interrupted" in err and "Traceback" not in err
    summary = json.loads((out / "pull_summary.json").read_text())
    assert summary["status"] == "interrupted" and summary["fetched"] == 2 and len(_on_disk(out)) == 2


def test_transient_errors_are_retried_and_a_failing_instance_is_reported(server, archive, tmp_path,
                                                                         proxy_factory, capsys):
    broken, flaky, dropped = archive[0]["sop"], archive[1]["sop"], archive[2]["sop"]
    seen: dict[str, int] = {}
    lock = threading.Lock()

    def rule(path, headers):
        if not _wado(path):
            return None
        sop = _sop_of(path)
        with lock:
            seen[sop] = seen.get(sop, 0) + 1
            n = seen[sop]
        if sop == broken:
            return ("status", 500)
        if sop == flaky and n == 1:
            return ("status", 503)
        if sop == dropped and n == 1:
            return "drop"
        return None

    proxy = proxy_factory(server.base, rule)
    out = tmp_path / "pulled"
    code = cli.main(["pull", "--dicomweb", f"{proxy.url}/dicom-web", "--out", str(out), "--retries", "1"])
    captured = capsys.readouterr()
    assert code == 1 and "1 failed" in captured.out and "rerun" in captured.out
    assert seen[broken] == 2 and seen[flaky] == 2 and seen[dropped] == 2  # one retry each
    assert set(_on_disk(out)) == {i["sop"] for i in archive} - {broken}
    summary = json.loads((out / "pull_summary.json").read_text())
    assert summary["status"] == "incomplete" and summary["failed"] == 1
    assert summary["failures"] == [{"sop_instance_uid": broken, "series_instance_uid": archive[0]["series"],
                                    "study_instance_uid": archive[0]["study"],
                                    "reason": "HTTP 500 Internal Server Error"}]

    assert cli.main(["pull", "--dicomweb", server.dicomweb, "--out", str(out)]) == 0  # server healthy again
    assert "1 fetched" in capsys.readouterr().out
    assert set(_on_disk(out)) == {i["sop"] for i in archive}


def test_server_going_away_mid_pull_stops_with_a_message_and_resumes(server, archive, tmp_path, proxy_factory):
    served = []

    def rule(path, headers):
        if _wado(path):
            served.append(path)
            return "drop" if len(served) > 3 else None
        return None

    proxy = proxy_factory(server.base, rule)
    with pytest.raises(UserError, match="stopped answering.*rerun the same command to resume"):
        pull_mod.pull(f"{proxy.url}/dicom-web", tmp_path, workers=1, retries=1, backoff=0.01,
                      max_consecutive_failures=3, progress=False)
    summary = json.loads((tmp_path / "pull_summary.json").read_text())
    assert summary["status"] == "aborted" and summary["fetched"] == 3 and "stopped answering" in summary["error"]
    assert len(_on_disk(tmp_path)) == 3
    done = pull_mod.pull(server.dicomweb, tmp_path, progress=False)
    assert done["skipped"] == 3 and done["status"] == "complete"
    assert set(_on_disk(tmp_path)) == {i["sop"] for i in archive}


def test_wrong_urls_and_server_errors_are_one_clear_line(server, tmp_path, capsys, proxy_factory):
    failing = proxy_factory(server.base, lambda path, headers: ("status", 500))
    not_dicom_json = proxy_factory(server.base, lambda path, headers: ("rewrite", "/studies"))  # ["id", ...]
    cases = [
        (f"{server.base}/not-dicom-web", "HTTP 404 Not Found to a QIDO-RS studies search; check the DICOMweb root"),
        (server.base, "HTTP 400 Bad Request to a QIDO-RS studies search; check that --dicomweb is the DICOMweb root"),
        (f"{not_dicom_json.url}/dicom-web", "did not answer a QIDO-RS studies search with DICOM JSON"),
        (f"{failing.url}/dicom-web", "answered HTTP 500 Internal Server Error to a QIDO-RS studies search"),
    ]
    for url, expected in cases:
        code = cli.main(["pull", "--dicomweb", url, "--out", str(tmp_path), "--retries", "0"])
        err = capsys.readouterr().err.strip()
        assert code == 2 and expected in err
        assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert not list(tmp_path.rglob("*.dcm"))


def test_basic_auth_and_secrets_never_leak(auth_server, archive, tmp_path, capsys, monkeypatch, radlog, caplog):
    caplog.set_level(logging.DEBUG)
    url = auth_server.dicomweb
    monkeypatch.delenv(pull_mod.TOKEN_ENV, raising=False)
    monkeypatch.delenv(pull_mod.PASSWORD_ENV, raising=False)

    assert cli.main(["pull", "--dicomweb", url, "--out", str(tmp_path / "none")]) == 2
    assert "requires authentication (HTTP 401)" in capsys.readouterr().err

    monkeypatch.setenv(pull_mod.PASSWORD_ENV, "wrong-" + PASSWORD)
    assert cli.main(["pull", "--dicomweb", url, "--out", str(tmp_path / "wrong"), "--user", "alice"]) == 2
    wrong = capsys.readouterr()
    assert "refused the credentials (HTTP 401" in wrong.err and len(wrong.err.strip().splitlines()) == 1
    assert not list((tmp_path / "wrong").rglob("*.dcm"))

    pw = tmp_path / "pw"
    pw.write_text(PASSWORD + "\n")
    pw.chmod(0o600)
    monkeypatch.delenv(pull_mod.PASSWORD_ENV)
    out = tmp_path / "ok"
    assert cli.main(["pull", "--dicomweb", url, "--out", str(out), "--user", "alice", "--password-file", str(pw)]) == 0
    ok = capsys.readouterr()
    assert set(_on_disk(out)) == {i["sop"] for i in archive[:3]}
    summary_texts = [p.read_text() for p in tmp_path.rglob("pull_summary.json")]
    assert len(summary_texts) == 3 and json.loads((out / "pull_summary.json").read_text())["auth"] == "basic"
    _no_secret(wrong.out, wrong.err, ok.out, ok.err, *summary_texts, *radlog, caplog.text,
               secrets=(PASSWORD, "wrong-" + PASSWORD))


def test_bearer_token_from_env_or_file(server, archive, tmp_path, proxy_factory, capsys, monkeypatch, radlog):
    def rule(path, headers):
        return None if headers.get("Authorization") == f"Bearer {TOKEN}" else ("status", 401)

    proxy = proxy_factory(server.base, rule)
    url = f"{proxy.url}/dicom-web"
    monkeypatch.delenv(pull_mod.TOKEN_ENV, raising=False)
    bad = tmp_path / "bad-token"
    bad.write_text("not-the-token")
    bad.chmod(0o600)
    assert cli.main(["pull", "--dicomweb", url, "--out", str(tmp_path / "bad"), "--token-file", str(bad)]) == 2
    assert "refused the credentials" in capsys.readouterr().err

    monkeypatch.setenv(pull_mod.TOKEN_ENV, TOKEN)
    out = tmp_path / "ok"
    assert cli.main(["pull", "--dicomweb", url, "--out", str(out), "--modality", "CT"]) == 0
    ok = capsys.readouterr()
    assert set(_on_disk(out)) == {i["sop"] for i in archive if i["modality"] == "CT"}
    assert json.loads((out / "pull_summary.json").read_text())["auth"] == "bearer"
    _no_secret(ok.out, ok.err, (out / "pull_summary.json").read_text(), *radlog)


def test_tls_is_verified_unless_told_otherwise(server, archive, tmp_path, proxy_factory, capsys):
    pems = orthanc.self_signed_cert(tmp_path)
    if pems is None:
        pytest.skip("the openssl tool is needed to make a test certificate")
    proxy = proxy_factory(server.base, tls=pems)
    url = f"{proxy.url}/dicom-web"
    assert cli.main(["pull", "--dicomweb", url, "--out", str(tmp_path / "a"), "--modality", "CT"]) == 2
    err = capsys.readouterr().err
    assert "TLS certificate verification failed" in err and "--ca-bundle" in err

    assert cli.main(["pull", "--dicomweb", url, "--out", str(tmp_path / "b"), "--modality", "CT",
                     "--ca-bundle", pems[0]]) == 0
    expected = {i["sop"] for i in archive if i["modality"] == "CT"}
    assert set(_on_disk(tmp_path / "b")) == expected

    import urllib3

    with pytest.warns(urllib3.exceptions.InsecureRequestWarning):
        summary = pull_mod.pull(url, tmp_path / "c", modality="CT", insecure=True, progress=False)
    assert summary["tls_verify"] is False and set(_on_disk(tmp_path / "c")) == expected


def test_worker_pool_waits_stay_interruptible():
    """Ctrl-C may reach a retrieval thread instead of the main one (seen in a fresh-clone run:
    the main thread sat in an untimed queue put).  ``interrupt_main`` sets the signal flag the
    same way without waking the main thread: the pool's waits must still notice it."""
    code = textwrap.dedent("""
        import _thread, threading, time
        from radpretrain.data.pull import _Workers
        hang = threading.Event()
        pool = _Workers(lambda *a: hang.wait(), 1)
        threading.Timer(0.5, _thread.interrupt_main).start()
        t0 = time.monotonic()
        try:
            for i in range(100):          # the queue holds 4: the 6th submit waits on a full queue
                pool.submit(i)
            print("not interrupted")
        except KeyboardInterrupt:
            print(f"interrupted after {time.monotonic() - t0:.1f} s")
        threading.Timer(0.5, _thread.interrupt_main).start()
        try:
            pool.finish()                 # waits on the hung worker
            print("finished")
        except KeyboardInterrupt:
            print("finish interrupted")
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30,
                       preexec_fn=_default_sigint)
    assert r.returncode == 0, r.stderr[-2000:]
    lines = r.stdout.split("\n")
    assert lines[0].startswith("interrupted after") and float(lines[0].split()[2]) < 2.0
    assert lines[1] == "finish interrupted"
