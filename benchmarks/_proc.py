"""Process-tree memory sampling from /proc (Linux), shared by the benchmark scripts."""

from __future__ import annotations

import os
import subprocess
import threading
import time
from pathlib import Path


def _children(pid: int) -> list[int]:
    out = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            out += [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            pass
    return out


def tree_rss_bytes(pid: int) -> int:
    """Resident memory of ``pid`` and all its descendants (sum of VmRSS)."""
    total, stack, seen = 0, [pid], set()
    while stack:
        p = stack.pop()
        if p in seen:
            continue
        seen.add(p)
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) * 1024
                    break
        except OSError:
            continue
        stack += _children(p)
    return total


def run_measured(cmd: list[str], interval: float = 0.25, **popen_kwargs) -> dict:
    """Run ``cmd``; return wall seconds, exit code and the peak RSS of its process tree."""
    t0 = time.time()
    proc = subprocess.Popen(cmd, **popen_kwargs)
    peak = 0
    stop = threading.Event()

    def sample():
        nonlocal peak
        while not stop.is_set():
            peak = max(peak, tree_rss_bytes(proc.pid))
            stop.wait(interval)

    th = threading.Thread(target=sample, daemon=True)
    th.start()
    rc = proc.wait()
    stop.set()
    th.join()
    return {"wall_s": round(time.time() - t0, 1), "returncode": rc, "peak_rss_gb": round(peak / 2**30, 2),
            "cpus": os.cpu_count()}


def shared_data_dir() -> Path:
    """The shared real-radiograph folder: ``../shared/data`` beside the repository checkout.

    ``RADPRETRAIN_SHARED_DATA`` overrides it; scripts also take ``--data``.  The folder is never
    part of the repository (see its README).
    """
    env = os.environ.get("RADPRETRAIN_SHARED_DATA")
    return Path(env) if env else Path(__file__).resolve().parents[1].parent / "shared" / "data"
