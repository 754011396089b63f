"""Test helpers for the PACS tests: a real Orthanc server, a fault-injecting proxy, synthetic DICOMs.

Everything listens on 127.0.0.1 only and on free ports; nothing leaves the machine.

- :class:`Orthanc` starts ``Orthanc`` with its DICOMweb plugin, a temporary storage folder and a
  generated JSON configuration, waits until it answers and kills it on :meth:`Orthanc.stop`.
  :func:`orthanc_unavailable` says why it cannot run here (then the tests skip).
- :class:`FaultProxy` forwards HTTP requests to a server and lets a test fail, delay or
  authenticate chosen requests (bearer tokens, 5xx errors, dropped connections, a hang), optionally
  over HTTPS with :func:`self_signed_cert` (Debian's Orthanc 1.10 crashes with its own TLS on).
- :func:`make_instance` builds a small 32x32 DICOM file with pydicom.
"""

from __future__ import annotations

import glob
import http.server
import io
import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import requests

PLUGIN_GLOBS = (
    "/usr/share/orthanc/plugins*/libOrthancDicomWeb.so*",
    "/usr/lib/orthanc/plugins*/libOrthancDicomWeb.so*",
    "/usr/local/share/orthanc/plugins*/libOrthancDicomWeb.so*",
)


def free_port() -> int:
    """A TCP port that is free on 127.0.0.1 right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def find_orthanc() -> tuple[str | None, str | None]:
    """(Orthanc executable, DICOMweb plugin path), each None when missing."""
    exe = shutil.which("Orthanc") or (os.path.exists("/usr/sbin/Orthanc") and "/usr/sbin/Orthanc") or None
    plugin = next((p for g in PLUGIN_GLOBS for p in sorted(glob.glob(g))), None)
    return exe, plugin


def orthanc_unavailable() -> str | None:
    """Why Orthanc cannot be used here, or None when it can."""
    exe, plugin = find_orthanc()
    if exe is None:
        return "Orthanc is not installed (run 'sudo bash scripts/install_orthanc.sh' or 'make orthanc')"
    if plugin is None:
        return "the Orthanc DICOMweb plugin is not installed (Debian package orthanc-dicomweb)"
    return None


def _die_with_parent() -> None:
    """In the child: get SIGKILL when the test process dies, so no Orthanc outlives a killed pytest."""
    if sys.platform.startswith("linux"):
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


class Orthanc:
    """One Orthanc process on a free loopback port with a fresh storage folder."""

    def __init__(self, workdir: Path, users: dict[str, str] | None = None):
        self.workdir = Path(workdir)
        self.users = users
        self.proc: subprocess.Popen | None = None
        self.port = 0

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def dicomweb(self) -> str:
        return f"{self.base}/dicom-web"

    def _config(self, http_port: int, dicom_port: int, plugin: str) -> dict:
        storage = self.workdir / "storage"
        cfg = {
            "Name": "radpretrain-test",
            "StorageDirectory": str(storage),
            "IndexDirectory": str(storage),
            "Plugins": [plugin],
            "HttpPort": http_port,
            # Orthanc >= 1.12.10 binds only here; older versions listen on every interface but,
            # with RemoteAccessAllowed false, refuse any client that is not on this machine.
            "HttpBindAddresses": ["127.0.0.1"],
            "RemoteAccessAllowed": False,
            # The DICOM (DIMSE) server is not needed: disabled, so no second port is opened.
            "DicomServerEnabled": False,
            "DicomPort": dicom_port,
            "OrthancExplorerEnabled": False,
            "WebDavEnabled": False,
            "HttpThreadsCount": 8,
            "ConcurrentJobs": 1,
            "SaveJobs": False,
            "AuthenticationEnabled": bool(self.users),
            "RegisteredUsers": dict(self.users or {}),
            "DicomWeb": {"Enable": True, "Root": "/dicom-web/", "EnableWado": False},
        }
        return cfg

    def start(self, timeout: float = 20.0) -> "Orthanc":
        exe, plugin = find_orthanc()
        if exe is None or plugin is None:
            raise RuntimeError(orthanc_unavailable())
        self.workdir.mkdir(parents=True, exist_ok=True)
        last = ""
        for _attempt in range(3):  # a free port can be taken between choosing and binding it
            self.port, dicom_port = free_port(), free_port()
            cfg_path = self.workdir / "orthanc.json"
            cfg_path.write_text(json.dumps(self._config(self.port, dicom_port, plugin), indent=1))
            log = open(self.workdir / "orthanc.log", "wb")
            self.proc = subprocess.Popen([exe, "--no-jobs", str(cfg_path)], stdout=log, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, cwd=self.workdir, preexec_fn=_die_with_parent)
            log.close()
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline and self.proc.poll() is None:
                try:
                    r = requests.get(f"{self.base}/system", timeout=1, auth=self._auth())
                    if r.status_code == 200:
                        return self
                except requests.RequestException:
                    pass
                time.sleep(0.05)
            last = (self.workdir / "orthanc.log").read_text(errors="replace")[-2000:]
            self.stop()
        raise RuntimeError(f"Orthanc did not start; log tail:\n{last}")

    def _auth(self):
        if not self.users:
            return None
        return next(iter(self.users.items()))

    def stop(self) -> None:
        """Kill the server (its storage is a throw-away folder, so no graceful shutdown is needed)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)
        self.proc = None

    def upload(self, data: bytes) -> None:
        r = requests.post(f"{self.base}/instances", data=data, timeout=10, auth=self._auth(),
                          headers={"Content-Type": "application/dicom"})
        r.raise_for_status()
        if r.json().get("Status") not in ("Success", "AlreadyStored"):
            raise RuntimeError(f"Orthanc refused an instance: {r.text[:200]}")


class FaultProxy:
    """A loopback HTTP proxy in front of ``upstream``.

    ``rule(path, headers) -> action`` decides per GET request: ``None`` forwards it; ``("status",
    code)`` answers that HTTP status; ``"drop"`` closes the connection without an answer;
    ``("block", event)`` waits until ``event`` is set, then forwards; ``("rewrite", path)`` forwards
    ``path`` instead (e.g. without a filter the server should have applied).  ``requests`` counts the paths seen.
    """

    def __init__(self, upstream: str, rule=None, tls: tuple[str, str] | None = None):
        self.upstream = upstream.rstrip("/")
        self.rule = rule or (lambda path, headers: None)
        self.requests: list[str] = []
        self.headers_seen: list[dict] = []
        self._lock = threading.Lock()
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # keep pytest output clean
                pass

            def do_GET(self):
                with proxy._lock:
                    proxy.requests.append(self.path)
                    proxy.headers_seen.append(dict(self.headers))
                action = proxy.rule(self.path, self.headers)
                if action == "drop":
                    self.close_connection = True
                    self.connection.shutdown(socket.SHUT_RDWR)
                    return
                path = self.path
                if isinstance(action, tuple) and action[0] == "rewrite":
                    path, action = action[1], None
                if isinstance(action, tuple) and action[0] == "block":
                    action[1].wait(60)  # until the test sets the event (or a minute)
                    action = None
                if isinstance(action, tuple) and action[0] == "status":
                    body = b"injected error"
                    self.send_response(action[1])
                    self.send_header("Content-Type", "text/plain")
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)
                    return
                fwd = {k: v for k, v in self.headers.items() if k.lower() in ("accept", "authorization")}
                if fwd.get("Authorization", "").startswith("Bearer "):
                    fwd.pop("Authorization")  # the proxy checked the token; Orthanc has no auth here
                try:
                    r = requests.get(proxy.upstream + path, headers=fwd, timeout=30)
                except requests.RequestException:
                    self.send_response(502)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                self.send_response(r.status_code)
                self.send_header("Content-Type", r.headers.get("Content-Type", "application/octet-stream"))
                self.send_header("Content-Length", str(len(r.content)))
                self.end_headers()
                self.wfile.write(r.content)

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.scheme = "http"
        if tls is not None:  # (certificate PEM, key PEM): serve HTTPS
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            ctx.load_cert_chain(*tls)
            self.server.socket = ctx.wrap_socket(self.server.socket, server_side=True)
            self.scheme = "https"
        self.port = self.server.server_address[1]
        self._thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        return f"{self.scheme}://127.0.0.1:{self.port}"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def self_signed_cert(folder: Path) -> tuple[str, str] | None:
    """(certificate, key) PEM files for 127.0.0.1 made with the openssl tool; None without it."""
    openssl = shutil.which("openssl")
    if openssl is None:
        return None
    cert, key = folder / "cert.pem", folder / "key.pem"
    r = subprocess.run([openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key),
                        "-out", str(cert), "-days", "2", "-subj", "/CN=127.0.0.1",
                        "-addext", "subjectAltName=IP:127.0.0.1"], capture_output=True, timeout=60)
    return (str(cert), str(key)) if r.returncode == 0 else None


# -- synthetic DICOM ------------------------------------------------------------------------------

SOP_CLASS = {
    "CR": "1.2.840.10008.5.1.4.1.1.1",       # Computed Radiography Image Storage
    "DX": "1.2.840.10008.5.1.4.1.1.1.1",     # Digital X-Ray Image Storage - For Presentation
    "CT": "1.2.840.10008.5.1.4.1.1.2",       # CT Image Storage
}


def make_instance(*, patient_id: str, patient_name: str, study_uid: str, series_uid: str, sop_uid: str,
                  study_date: str, modality: str, body_part: str, seed: int) -> bytes:
    """A small, valid DICOM file (32x32, 16-bit) as bytes."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SOP_CLASS[modality]
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = SOP_CLASS[modality]
    ds.SOPInstanceUID = sop_uid
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.PatientID = patient_id
    ds.PatientName = patient_name
    ds.PatientBirthDate = "19700101"
    ds.AccessionNumber = "ACC" + patient_id
    ds.StudyDate = study_date
    ds.SeriesDate = study_date
    ds.StudyID = "1"
    ds.SeriesNumber = 1
    ds.InstanceNumber = seed % 1000
    ds.Modality = modality
    ds.BodyPartExamined = body_part
    ds.Rows = ds.Columns = 32
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = 16
    ds.BitsStored = 12
    ds.HighBit = 11
    ds.PixelRepresentation = 0
    pixels = np.random.default_rng(seed).integers(0, 4096, size=(32, 32), dtype=np.uint16)
    ds.PixelData = pixels.tobytes()
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()
