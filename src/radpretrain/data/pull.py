"""``radpretrain pull``: fetch studies from a PACS over DICOMweb, safely rerunnable.

Search is QIDO-RS, study by study: studies (``StudyDate`` range) -> their series (``Modality``,
``BodyPartExamined``) -> their instances; each instance is then retrieved with WADO-RS (in the
transfer syntax the server stores it in) through the maintained ``dicomweb-client`` library.

Layout under ``OUT`` (UIDs only, no names or dates in any path)::

    OUT/<StudyInstanceUID>/<SeriesInstanceUID>/<SOPInstanceUID>.dcm
    OUT/pull_summary.json     counts, filters, failures by UID (never credentials)

Files are written to a hidden temporary file and renamed, so a killed pull never leaves half a
file; they are readable by their owner only (they still hold PHI until ``ingest``).  A rerun skips
every instance whose SOP Instance UID already has a ``.dcm`` file under ``OUT``.  Transient errors
(connection problems, timeouts, HTTP 408/429/5xx) are retried with exponential back-off; an
instance that keeps failing is recorded with its reason and the pull goes on; when many instances
in a row fail (the server went away) or the server refuses the credentials, the pull stops with a
:class:`~radpretrain.errors.UserError` after saving the summary, and a rerun resumes it.

Python API: :func:`pull` (returns the summary dict) and :func:`make_auth`; a command that pulls
before its own work (``ingest`` from a URL) reuses :func:`add_connection_arguments` and
:func:`connection_kwargs` for the same authentication/TLS options.
"""

from __future__ import annotations

import datetime as dt
import fcntl
import os
import queue
import random
import re
import stat
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterable
from urllib.parse import urlsplit, urlunsplit

import requests
from tqdm.auto import tqdm

from radpretrain import __version__
from radpretrain.errors import UserError
from radpretrain.utils import get_logger, write_json

log = get_logger("radpretrain.data.pull")

SUMMARY_NAME = "pull_summary.json"
PASSWORD_ENV = "RADPRETRAIN_DICOMWEB_PASSWORD"
TOKEN_ENV = "RADPRETRAIN_DICOMWEB_TOKEN"
PAGE_SIZE = 1000                       # QIDO-RS results asked for per request (limit/offset paging)
TRANSIENT_HTTP = {408, 425, 429, 500, 502, 503, 504}
AUTH_HTTP = {401, 403}

_UID_RE = re.compile(r"^[0-9]+(\.[0-9]+)*$")
_CS_RE = re.compile(r"^[A-Z0-9 _]{1,16}$")
_TEMP_RE = re.compile(r"^\.[0-9.]+\.dcm\.[A-Za-z0-9_]+\.part$")

# DICOM JSON tags used in QIDO-RS answers.
T_STUDY_UID, T_SERIES_UID, T_SOP_UID = "0020000D", "0020000E", "00080018"
T_STUDY_DATE, T_MODALITY, T_BODY_PART = "00080020", "00080060", "00180015"


# -- authentication -------------------------------------------------------------------------------

class BearerAuth(requests.auth.AuthBase):
    """``Authorization: Bearer <token>`` on every request; the token never shows in ``repr``."""

    def __init__(self, token: str):
        self._token = token

    def __call__(self, r):
        r.headers["Authorization"] = f"Bearer {self._token}"
        return r

    def __repr__(self) -> str:
        return "BearerAuth(<hidden>)"


class BasicAuth(requests.auth.HTTPBasicAuth):
    """HTTP basic authentication whose ``repr`` hides the password."""

    def __repr__(self) -> str:
        return f"BasicAuth({self.username!r}, <hidden>)"


def _read_secret(path: str | os.PathLike, what: str) -> str:
    p = Path(path).expanduser()
    try:
        mode = p.stat().st_mode
        text = p.read_text(encoding="utf-8")
    except OSError as e:
        raise UserError(f"{p}: cannot read the {what} file ({e.strerror or type(e).__name__})") from None
    if mode & (stat.S_IRGRP | stat.S_IROTH):
        log.warning("%s: the %s file is readable by other users; consider 'chmod 600'", p, what)
    secret = text.strip("\r\n")
    if not secret:
        raise UserError(f"{p}: the {what} file is empty")
    return secret


def make_auth(user: str | None = None, password_file: str | None = None, token_file: str | None = None,
              env: dict | None = None) -> requests.auth.AuthBase | None:
    """Authentication from options and the environment; None when nothing is configured.

    ``user`` -> HTTP basic, password from ``password_file`` or ``$RADPRETRAIN_DICOMWEB_PASSWORD``;
    otherwise a bearer token from ``token_file`` or ``$RADPRETRAIN_DICOMWEB_TOKEN``.
    """
    env = os.environ if env is None else env
    if user is not None and token_file is not None:
        raise UserError("use either --user (HTTP basic) or --token-file (bearer token), not both")
    if password_file is not None and user is None:
        raise UserError("--password-file needs --user")
    if user is not None:
        if not user or ":" in user:
            raise UserError("--user must be a non-empty user name without ':'")
        if password_file is not None:
            password = _read_secret(password_file, "password")
        elif env.get(PASSWORD_ENV):
            password = env[PASSWORD_ENV]
        else:
            raise UserError(f"--user needs a password: set {PASSWORD_ENV} or pass --password-file FILE")
        return BasicAuth(user, password)
    if token_file is not None:
        return BearerAuth(_read_secret(token_file, "token"))
    if env.get(TOKEN_ENV):
        return BearerAuth(env[TOKEN_ENV].strip())
    return None


def _auth_kind(auth) -> str:
    if auth is None:
        return "none"
    if isinstance(auth, BearerAuth):
        return "bearer"
    if isinstance(auth, (tuple, requests.auth.HTTPBasicAuth)):
        return "basic"
    return type(auth).__name__


# -- argument checking ----------------------------------------------------------------------------

def _check_url(url: str) -> str:
    """The DICOMweb root without a trailing slash; refuses credentials inside the URL."""
    parts = urlsplit(str(url).strip())
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise UserError("--dicomweb must be an http:// or https:// URL of the DICOMweb root, "
                        "e.g. https://pacs.example.org/dicom-web")
    if parts.username is not None or parts.password is not None:
        raise UserError("do not put credentials in the --dicomweb URL; use --user with "
                        f"{PASSWORD_ENV} or --password-file, or a token")
    if parts.query or parts.fragment:
        raise UserError("--dicomweb must be the DICOMweb root URL, without '?' query or '#' fragment")
    return urlunsplit((parts.scheme, parts.netloc, parts.path.rstrip("/"), "", ""))


def _code_list(value, option: str) -> tuple[str, ...]:
    """'CR,DX' or ['cr', 'DX'] -> ('CR', 'DX'); DICOM code strings are upper case."""
    if value is None:
        return ()
    items = value.split(",") if isinstance(value, str) else list(value)
    out: list[str] = []
    for item in items:
        code = str(item).strip().upper()
        if not code:
            continue
        if not _CS_RE.match(code):
            raise UserError(f"{option}: {item!r} is not a DICOM code string (letters, digits, '_', at most 16)")
        if code not in out:
            out.append(code)
    if not out:
        raise UserError(f"{option}: give at least one value, e.g. {'CR,DX' if 'modal' in option else 'KNEE,HAND'}")
    return tuple(out)


def _date(value, option: str) -> dt.date | None:
    if value is None or isinstance(value, dt.date):
        return value
    try:
        return dt.date.fromisoformat(str(value))
    except ValueError:
        raise UserError(f"{option}: {value!r} is not a date in the form YYYY-MM-DD") from None


def _uid_ok(uid) -> bool:
    return isinstance(uid, str) and len(uid) <= 64 and bool(_UID_RE.match(uid))


def _value(item: dict, tag: str):
    """First value of a DICOM JSON attribute, or None."""
    values = (item.get(tag) or {}).get("Value") or []
    return values[0] if values else None


# -- errors ---------------------------------------------------------------------------------------

def _http_status(exc: BaseException) -> int | None:
    resp = getattr(exc, "response", None)
    return getattr(resp, "status_code", None) if resp is not None else None


def _is_transient(exc: BaseException) -> bool:
    if isinstance(exc, requests.exceptions.SSLError):
        return False
    if isinstance(exc, (requests.ConnectionError, requests.Timeout, requests.exceptions.ChunkedEncodingError)):
        return True
    return _http_status(exc) in TRANSIENT_HTTP


def _reason(exc: BaseException) -> str:
    """A short reason without URLs, headers or credentials."""
    status = _http_status(exc)
    if status is not None:
        text = getattr(exc.response, "reason", "") or ""
        return f"HTTP {status} {text}".strip()
    if isinstance(exc, requests.exceptions.SSLError):
        return "TLS certificate verification failed"
    if isinstance(exc, requests.Timeout):
        return "timed out"
    if isinstance(exc, requests.ConnectionError):
        msg = str(exc)
        for known in ("Connection refused", "Name or service not known", "No route to host",
                      "Connection reset by peer", "Remote end closed connection", "Network is unreachable",
                      "Temporary failure in name resolution", "Connection aborted"):
            if known in msg:
                return f"connection error ({known.lower()})"
        return "connection error"
    if isinstance(exc, requests.exceptions.ChunkedEncodingError):
        return "connection broken while receiving"
    if isinstance(exc, ValueError):
        return "the server's answer could not be decoded"
    return type(exc).__name__


def _server_message(exc: BaseException, url: str, what: str, auth) -> str:
    """One-line UserError text for a failure talking to the server."""
    status = _http_status(exc)
    if isinstance(exc, requests.exceptions.SSLError):
        return (f"TLS certificate verification failed for {url}; pass --ca-bundle PATH with your "
                "hospital's CA certificate (or, on a trusted network only, --insecure)")
    if status in AUTH_HTTP:
        if auth is None:
            return (f"the DICOMweb server at {url} requires authentication (HTTP {status}); pass --user with "
                    f"{PASSWORD_ENV} or --password-file, or a token via {TOKEN_ENV} or --token-file")
        return (f"the DICOMweb server at {url} refused the credentials (HTTP {status} during {what}); "
                f"check the user name and password or the token")
    if status == 404:
        return (f"the DICOMweb server at {url} answered HTTP 404 Not Found to {what}; check the DICOMweb "
                "root path in --dicomweb (e.g. http://HOST:8042/dicom-web for Orthanc)")
    if status in (400, 405, 406):
        return (f"the DICOMweb server at {url} answered {_reason(exc)} to {what}; check that --dicomweb is the "
                "DICOMweb root (e.g. http://HOST:8042/dicom-web for Orthanc)")
    if status is not None:
        return f"the DICOMweb server at {url} answered {_reason(exc)} to {what}"
    if isinstance(exc, requests.Timeout):
        return f"the DICOMweb server at {url} did not answer in time ({what}); try a larger --timeout"
    if isinstance(exc, (requests.ConnectionError, requests.exceptions.ChunkedEncodingError)):
        return f"cannot reach the DICOMweb server at {url}: {_reason(exc)}; check that it runs and the URL"
    if isinstance(exc, ValueError):
        return (f"the server at {url} did not answer {what} with DICOM JSON; check that --dicomweb is the "
                "DICOMweb root (e.g. .../dicom-web)")
    return f"talking to the DICOMweb server at {url} failed ({what}): {_reason(exc)}"


# -- the pull ------------------------------------------------------------------------------------

class _Puller:
    """One pull: search on the calling thread, retrieval on :class:`_Workers`, shared counters."""

    def __init__(self, url: str, out: Path, auth, *, workers: int, verify, retries: int, backoff: float,
                 timeout: float, max_consecutive_failures: int, progress):
        self.url, self.out, self.auth = url, out, auth
        self.verify, self.timeout = verify, timeout
        self.retries, self.backoff = retries, backoff
        self.max_consecutive_failures = max_consecutive_failures
        self.workers = workers
        self.progress = progress
        self.lock = threading.Lock()
        self.abort = threading.Event()
        self.abort_message = ""
        self.local = threading.local()
        self.sessions: list[requests.Session] = []
        self.counts = {"found": 0, "fetched": 0, "skipped": 0, "failed": 0, "bytes": 0}
        self.failures: list[dict] = []
        self.excluded_missing: dict[str, set] = {"StudyDate": set(), "Modality": set(), "BodyPartExamined": set()}
        self.consecutive_failures = 0
        self.bar = None

    # clients ---------------------------------------------------------------------------------
    def client(self):
        """A DICOMweb client per thread (requests sessions are not shared across threads)."""
        c = getattr(self.local, "client", None)
        if c is None:
            from dicomweb_client.api import DICOMwebClient  # optional dependency: only for a pull

            session = requests.Session()
            # Without this, REQUESTS_CA_BUNDLE/CURL_CA_BUNDLE would silently override --ca-bundle and
            # --insecure, and ~/.netrc could add credentials; proxies from the environment still apply.
            session.trust_env = False
            session.proxies.update(requests.utils.get_environ_proxies(self.url))
            session.auth = self.auth
            session.verify = self.verify
            session.headers["User-Agent"] = f"radpretrain/{__version__}"
            try:
                c = DICOMwebClient(self.url, session=session, timeout=self.timeout)
            except ValueError:
                raise UserError(f"--dicomweb: {self.url} is not a URL the DICOMweb client accepts") from None
            c.set_http_retry_params(retry=False)  # retried here, with our bounds and messages
            self.local.client = c
            with self.lock:
                self.sessions.append(session)
        return c

    def close(self) -> None:
        for s in self.sessions:
            s.close()

    def _retrying(self, fn: Callable[[], Any]):
        """Run ``fn``; retry transient failures ``retries`` times with exponential back-off."""
        for attempt in range(self.retries + 1):
            try:
                return fn()
            except Exception as e:  # noqa: BLE001 -- classified below
                if not _is_transient(e) or attempt == self.retries or self.abort.is_set():
                    raise
                delay = self.backoff * (2 ** attempt) * (1 + 0.25 * random.random())
                if self.abort.wait(delay):
                    raise
        raise AssertionError("unreachable")  # pragma: no cover

    # search -----------------------------------------------------------------------------------
    def _search(self, what: str, call: Callable[..., list], **kw) -> list[dict]:
        """All results of one QIDO-RS search, paged with limit/offset until an empty page.

        Asking until a page is empty costs one small request more, but servers that cap their
        answers below ``PAGE_SIZE`` without saying so lose nothing; a server that ignores
        ``offset`` (repeats a page) ends the paging instead of looping.
        """
        results: list[dict] = []
        seen_pages: set[tuple] = set()
        offset = 0
        while True:
            try:
                page = self._retrying(lambda: call(limit=PAGE_SIZE, offset=offset, **kw))
            except Exception as e:  # noqa: BLE001
                raise UserError(_server_message(e, self.url, f"a QIDO-RS {what} search", self.auth)) from None
            if not isinstance(page, list) or not all(isinstance(item, dict) for item in page):
                raise UserError(_server_message(ValueError(), self.url, f"a QIDO-RS {what} search", self.auth))
            key = tuple(sorted(str(item.get(T_SOP_UID) or item.get(T_SERIES_UID) or item.get(T_STUDY_UID))
                               for item in page))
            if not page or key in seen_pages:  # done, or the server ignored offset and repeated itself
                break
            seen_pages.add(key)
            results.extend(page)
            offset += len(page)
        return results

    def studies(self, since: dt.date | None, until: dt.date | None) -> list[str]:
        filters = {}
        if since or until:
            filters["StudyDate"] = (f"{since:%Y%m%d}" if since else "") + "-" + (f"{until:%Y%m%d}" if until else "")
        c = self.client()
        found = self._search("studies", c.search_for_studies, fields=["StudyDate"], search_filters=filters)
        uids = set()
        for item in found:
            uid = _value(item, T_STUDY_UID)
            if not _uid_ok(uid):
                self._invalid_uid("StudyInstanceUID")
                continue
            if since or until:  # check the date ourselves too; servers differ in range matching
                date = _value(item, T_STUDY_DATE)
                try:
                    d = dt.datetime.strptime(str(date)[:8], "%Y%m%d").date()
                except (TypeError, ValueError):
                    self.excluded_missing["StudyDate"].add(uid)
                    continue
                if (since and d < since) or (until and d > until):
                    continue
            uids.add(uid)
        return sorted(uids)

    def series(self, study: str, modalities: tuple[str, ...], body_parts: tuple[str, ...]) -> list[str]:
        """Series of ``study`` matching the filters: one query per value (portable OR), checked here too."""
        c = self.client()
        combos = [(m, b) for m in (modalities or (None,)) for b in (body_parts or (None,))]
        matched = set()
        for m, b in combos:
            filters = {k: v for k, v in (("Modality", m), ("BodyPartExamined", b)) if v}
            for item in self._search("series", c.search_for_series, study_instance_uid=study,
                                     fields=["Modality", "BodyPartExamined"], search_filters=filters):
                uid = _value(item, T_SERIES_UID)
                if not _uid_ok(uid):
                    self._invalid_uid("SeriesInstanceUID")
                    continue
                if self._series_matches(uid, item, modalities, body_parts):
                    matched.add(uid)
        return sorted(matched)

    def _series_matches(self, uid: str, item: dict, modalities, body_parts) -> bool:
        for tag, keyword, wanted in ((T_MODALITY, "Modality", modalities), (T_BODY_PART, "BodyPartExamined", body_parts)):
            if not wanted:
                continue
            value = _value(item, tag)
            if not value:
                with self.lock:
                    self.excluded_missing[keyword].add(uid)
                return False
            if str(value).strip().upper() not in wanted:
                return False
        return True

    def instances(self, study: str, series: str) -> list[str]:
        c = self.client()
        uids = set()
        for item in self._search("instances", c.search_for_instances, study_instance_uid=study,
                                 series_instance_uid=series, fields=["SOPInstanceUID"]):
            uid = _value(item, T_SOP_UID)
            if _uid_ok(uid):
                uids.add(uid)
            else:
                self._invalid_uid("SOPInstanceUID")
        return sorted(uids)

    def _invalid_uid(self, keyword: str) -> None:
        with self.lock:
            self.counts["failed"] += 1
            self.failures.append({"sop_instance_uid": None, "reason": f"the server returned an invalid {keyword}; left out"})

    # retrieval ----------------------------------------------------------------------------------
    def fetch(self, study: str, series: str, sop: str) -> None:
        if self.abort.is_set():
            return
        try:
            ds = self._retrying(lambda: self.client().retrieve_instance(study, series, sop))
            if getattr(ds, "SOPInstanceUID", None) != sop:
                raise _Permanent("the server returned a different instance than asked for")
            nbytes = self._write(study, series, sop, ds)
        except _Permanent as e:
            self._failed(study, series, sop, str(e), transient=False)
        except Exception as e:  # noqa: BLE001 -- recorded by UID, the pull goes on
            status = _http_status(e)
            if status in AUTH_HTTP or isinstance(e, requests.exceptions.SSLError):
                self._stop(_server_message(e, self.url, "a WADO-RS retrieval", self.auth))
                return
            self._failed(study, series, sop, _reason(e), transient=_is_transient(e))
        else:
            with self.lock:
                self.counts["fetched"] += 1
                self.counts["bytes"] += nbytes
                self.consecutive_failures = 0
                self._tick()

    def _write(self, study: str, series: str, sop: str, ds) -> int:
        folder = self.out / study / series
        folder.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{sop}.dcm.", suffix=".part")
        try:
            with os.fdopen(fd, "wb") as f:
                ds.save_as(f, enforce_file_format=True)
            os.replace(tmp, folder / f"{sop}.dcm")
        except BaseException as e:
            Path(tmp).unlink(missing_ok=True)
            if isinstance(e, Exception):
                raise _Permanent(f"cannot write the instance as a DICOM file ({type(e).__name__})") from None
            raise
        return (folder / f"{sop}.dcm").stat().st_size

    def _failed(self, study, series, sop, reason: str, transient: bool) -> None:
        log.warning("instance %s failed: %s", sop, reason)
        with self.lock:
            self.counts["failed"] += 1
            self.failures.append({"sop_instance_uid": sop, "series_instance_uid": series,
                                  "study_instance_uid": study, "reason": reason})
            self.consecutive_failures = self.consecutive_failures + 1 if transient else 0
            if self.consecutive_failures >= self.max_consecutive_failures and not self.abort.is_set():
                self.abort_message = (f"the DICOMweb server at {self.url} stopped answering: "
                                      f"{self.consecutive_failures} instances in a row failed ({reason})")
                self.abort.set()
            self._tick()

    def _stop(self, message: str) -> None:
        with self.lock:
            if not self.abort.is_set():
                self.abort_message = message
                self.abort.set()

    def skipped(self, n: int) -> None:
        with self.lock:
            self.counts["skipped"] += n
            self._tick(n)

    def found(self, n: int) -> None:
        with self.lock:
            self.counts["found"] += n
            if self.bar is not None:
                self.bar.total = self.counts["found"]
                self.bar.refresh()

    def _tick(self, n: int = 1) -> None:
        if self.bar is not None:
            c = self.counts
            self.bar.set_postfix_str(f"fetched={c['fetched']} skipped={c['skipped']} failed={c['failed']} "
                                     f"{_human_bytes(c['bytes'])}", refresh=False)
            self.bar.update(n)


class _Workers:
    """Daemon retrieval threads fed through a bounded queue, so the search runs ahead of the
    retrieval but not away from it, and Ctrl-C does not wait for requests in flight."""

    def __init__(self, fn: Callable[..., None], n: int):
        self.fn = fn
        self.q: queue.Queue = queue.Queue(maxsize=4 * n)
        self.threads = [threading.Thread(target=self._loop, name=f"pull-{i}", daemon=True) for i in range(n)]
        for t in self.threads:
            t.start()

    def _loop(self) -> None:
        while (item := self.q.get()) is not None:
            try:
                self.fn(*item)
            except Exception:  # noqa: BLE001 -- fetch records its own failures; never lose a worker
                log.exception("unexpected error in a retrieval thread")

    # The main thread never waits without a timeout: Ctrl-C's signal may be delivered to a
    # retrieval thread, and Python runs the handler (KeyboardInterrupt) only when the main thread
    # comes back to the interpreter; an untimed wait on a full queue or a hung worker never would.
    _POLL_S = 0.2

    def _put(self, item) -> None:
        while True:
            try:
                self.q.put(item, timeout=self._POLL_S)
                return
            except queue.Full:
                continue

    def submit(self, *item) -> None:
        self._put(item)

    def finish(self) -> None:
        """Let the workers empty the queue, then stop them."""
        for _ in self.threads:
            self._put(None)
        for t in self.threads:
            while t.is_alive():
                t.join(self._POLL_S)


class _Permanent(Exception):
    """An instance failure that retrying will not fix."""


def _human_bytes(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"  # pragma: no cover


def _existing_sops(out: Path) -> set[str]:
    """SOP Instance UIDs already under ``out`` (by file name), removing stale temporary files."""
    present = set()
    for root, dirs, files in os.walk(out):
        for name in files:
            if name.endswith(".dcm") and not name.startswith("."):
                present.add(name[:-4])
            elif _TEMP_RE.match(name):
                Path(root, name).unlink(missing_ok=True)
    return present


class _Lock:
    """Only one pull at a time per output folder (released automatically if the process dies)."""

    def __init__(self, out: Path):
        self.path = out / ".pull.lock"

    def __enter__(self):
        try:
            self.f = open(self.path, "a")
        except OSError as e:
            raise UserError(f"{self.path.parent}: cannot write to the output folder ({e.strerror})") from None
        try:
            fcntl.flock(self.f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            self.f.close()
            raise UserError(f"{self.path.parent}: another 'radpretrain pull' is writing to this folder") from None
        return self

    def __exit__(self, *exc):
        fcntl.flock(self.f, fcntl.LOCK_UN)
        self.f.close()


def pull(url: str, out_dir: str | os.PathLike, modality: str | Iterable[str] | None = None,
         body_part: str | Iterable[str] | None = None, since: str | dt.date | None = None,
         until: str | dt.date | None = None, limit: int | None = None,
         auth: requests.auth.AuthBase | tuple[str, str] | None = None, *, workers: int = 4,
         ca_bundle: str | os.PathLike | None = None, insecure: bool = False, retries: int = 3,
         backoff: float = 1.0, timeout: float = 60.0, max_consecutive_failures: int = 10,
         progress: bool | None = None) -> dict:
    """Pull matching instances from the DICOMweb server at ``url`` into ``out_dir``.

    ``modality`` / ``body_part``: codes ('CR,DX' or a list), matched at series level (any of them).
    ``since`` / ``until``: StudyDate range, inclusive ('YYYY-MM-DD' or ``date``).
    ``limit``: at most this many studies (with at least one matching series; in StudyInstanceUID
    order, so a rerun with the same limit picks the same studies).  ``auth``: see :func:`make_auth`,
    or a ``(user, password)`` tuple.  ``progress``: tqdm bar (None: only on a terminal).

    Returns the summary (also saved as ``out_dir/pull_summary.json``).  Raises ``UserError`` when the
    server cannot be searched or stops answering (the summary is saved first; rerun to resume).
    """
    url = _check_url(url)
    modalities = _code_list(modality, "--modality")
    body_parts = _code_list(body_part, "--body-part")
    since, until = _date(since, "--since"), _date(until, "--until")
    if since and until and since > until:
        raise UserError(f"--since {since} is after --until {until}")
    if limit is not None and (not isinstance(limit, int) or limit < 1):
        raise UserError("--limit must be a positive number of studies")
    if not 1 <= int(workers) <= 64:
        raise UserError("--workers must be between 1 and 64")
    if retries < 0 or timeout <= 0:
        raise UserError("--retries must be >= 0 and --timeout > 0")
    if isinstance(auth, tuple):
        auth = BasicAuth(*auth)
    verify: bool | str = True
    if ca_bundle is not None:
        if insecure:
            raise UserError("use either --ca-bundle or --insecure, not both")
        if not Path(ca_bundle).is_file():
            raise UserError(f"{ca_bundle}: CA bundle file not found")
        verify = str(ca_bundle)
    elif not insecure:  # requests' usual CA bundle variables, when set
        verify = os.environ.get("REQUESTS_CA_BUNDLE") or os.environ.get("CURL_CA_BUNDLE") or True
    else:
        verify = False
        if url.startswith("https:"):
            log.warning("--insecure: TLS certificates are NOT verified; anyone on the network path could "
                        "read the images and the credentials")
    if auth is not None and url.startswith("http:") and urlsplit(url).hostname not in ("127.0.0.1", "localhost", "::1"):
        log.warning("credentials are sent over plain http to a remote host; prefer https")

    out = Path(out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"{out}: cannot create the output folder ({e.strerror})") from None

    puller = _Puller(url, out, auth, workers=int(workers), verify=verify, retries=int(retries),
                     backoff=float(backoff), timeout=float(timeout),
                     max_consecutive_failures=int(max_consecutive_failures), progress=progress)
    filters = {"modality": list(modalities) or None, "body_part": list(body_parts) or None,
               "since": since.isoformat() if since else None, "until": until.isoformat() if until else None,
               "limit": limit}
    status, n_studies, n_series = "complete", 0, 0
    start = time.monotonic()
    with _Lock(out):
        present = _existing_sops(out)
        bar = tqdm(total=0, unit="inst", desc="pull", disable=None if progress is None else not progress,
                   dynamic_ncols=True)
        puller.bar = bar
        pool = _Workers(puller.fetch, int(workers))
        try:
            for study in puller.studies(since, until):
                if puller.abort.is_set():
                    break
                series_uids = puller.series(study, modalities, body_parts)
                instances = [(se, sop) for se in series_uids for sop in puller.instances(study, se)]
                if not instances:
                    continue
                n_studies += 1
                n_series += len(series_uids)
                puller.found(len(instances))
                todo = []
                for se, sop in instances:  # a SOP Instance UID is fetched once, whatever the series
                    if sop not in present:
                        present.add(sop)
                        todo.append((se, sop))
                if len(todo) < len(instances):
                    puller.skipped(len(instances) - len(todo))
                for se, sop in todo:
                    if puller.abort.is_set():
                        break
                    pool.submit(study, se, sop)
                if limit is not None and n_studies >= limit:
                    break
            pool.finish()
        except UserError as e:  # the server could not be searched: stop, keep what was fetched
            puller._stop(str(e))
            pool.finish()
        except BaseException:  # Ctrl-C: save the summary and go, without waiting for running requests
            puller.abort.set()
            status = "interrupted"
            raise
        finally:
            bar.close()
            puller.close()
            if puller.abort_message:
                status = "aborted"
            elif status == "complete" and puller.counts["failed"]:
                status = "incomplete"
            summary = {
                "format": "radpretrain-pull", "version": 1, "status": status,
                "source": url, "auth": _auth_kind(auth), "tls_verify": verify is not False,
                "filters": filters, "studies": n_studies, "series": n_series, **puller.counts,
                "seconds": round(time.monotonic() - start, 2),
                "excluded_missing_attribute": {k: len(v) for k, v in puller.excluded_missing.items() if v},
                "failures": puller.failures,
                "layout": "<StudyInstanceUID>/<SeriesInstanceUID>/<SOPInstanceUID>.dcm",
            }
            if puller.abort_message:
                summary["error"] = puller.abort_message
            write_json(out / SUMMARY_NAME, summary)
    for keyword, n in summary["excluded_missing_attribute"].items():
        log.warning("%d %s left out: the server returned no %s for them, so the filter could not be checked",
                    n, "studies" if keyword == "StudyDate" else "series", keyword)
    if puller.abort_message:
        if summary["fetched"] or summary["skipped"]:
            raise UserError(f"{puller.abort_message}; progress saved in {out / SUMMARY_NAME}, rerun the same "
                            "command to resume")
        raise UserError(puller.abort_message)
    return summary


# -- command line ---------------------------------------------------------------------------------

def add_arguments(parser) -> None:
    parser.add_argument("--dicomweb", required=True, metavar="URL",
                        help="DICOMweb root URL, e.g. https://pacs.example.org/dicom-web")
    parser.add_argument("--out", required=True, metavar="DIR",
                        help="folder for the DICOM files (OUT/<study>/<series>/<instance>.dcm) and pull_summary.json")
    parser.add_argument("--modality", metavar="LIST", help="series modalities to keep, e.g. CR,DX")
    parser.add_argument("--body-part", metavar="LIST", help="BodyPartExamined values to keep, e.g. KNEE,HAND")
    parser.add_argument("--since", metavar="YYYY-MM-DD", help="first StudyDate to keep (inclusive)")
    parser.add_argument("--until", metavar="YYYY-MM-DD", help="last StudyDate to keep (inclusive)")
    parser.add_argument("--limit", type=int, metavar="N", help="at most N studies (in StudyInstanceUID order)")
    parser.add_argument("--workers", type=int, default=4, metavar="N", help="parallel retrievals (default 4)")
    add_connection_arguments(parser)


def add_connection_arguments(parser) -> None:
    """Authentication, TLS, retry and timeout options (shared with commands that pull first)."""
    auth = parser.add_argument_group("authentication (nothing: no authentication)")
    auth.add_argument("--user", help=f"HTTP basic user; password from ${PASSWORD_ENV} or --password-file")
    auth.add_argument("--password-file", metavar="FILE", help="file holding the HTTP basic password")
    auth.add_argument("--token-file", metavar="FILE",
                      help=f"file holding a bearer token (or set ${TOKEN_ENV})")
    tls = parser.add_argument_group("TLS (certificates are verified by default)")
    tls.add_argument("--ca-bundle", metavar="PATH", help="CA certificate(s) to verify the server with (PEM)")
    tls.add_argument("--insecure", action="store_true", help="do not verify TLS certificates (not recommended)")
    parser.add_argument("--retries", type=int, default=3, metavar="N",
                        help="retries of a request after a transient error, with back-off (default 3)")
    parser.add_argument("--timeout", type=float, default=60.0, metavar="S", help="HTTP timeout in seconds (default 60)")


def connection_kwargs(args) -> dict:
    """Keyword arguments of :func:`pull` from the options of :func:`add_connection_arguments`."""
    return {"auth": make_auth(user=args.user, password_file=args.password_file, token_file=args.token_file),
            "ca_bundle": args.ca_bundle, "insecure": args.insecure, "retries": args.retries,
            "timeout": args.timeout}


def run(args) -> int:
    summary = pull(args.dicomweb, args.out, modality=args.modality, body_part=args.body_part,
                   since=args.since, until=args.until, limit=args.limit, workers=args.workers,
                   **connection_kwargs(args))
    print(f"pull: {summary['found']} instances found in {summary['studies']} studies / {summary['series']} series: "
          f"{summary['fetched']} fetched, {summary['skipped']} already present, {summary['failed']} failed "
          f"({_human_bytes(summary['bytes'])}) -> {Path(args.out) / SUMMARY_NAME}")
    if summary["failed"]:
        print(f"pull: {summary['failed']} instances failed (listed with reasons in {SUMMARY_NAME}); "
              "rerun the same command to retry them")
        return 1
    return 0
