"""Small helpers shared by every stage: run-folder provenance, JSON, logging."""

from __future__ import annotations

import json
import logging
import os
import platform
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np

# a pretraining run's compute spent (wall seconds, steps, images seen, device): written by the engine at
# the end of a run, read by evaluate (recorded per run init) and compare
COMPUTE_FILE = "compute.json"

TRACKED_PACKAGES = (
    "radpretrain", "torch", "torchvision", "timm", "lightning", "lightly", "numpy", "pandas",
    "pyarrow", "pydicom", "pylibjpeg", "pylibjpeg-libjpeg", "pylibjpeg-openjpeg", "faiss-cpu",
    "scikit-learn", "safetensors", "matplotlib",
)


def package_versions() -> dict[str, str]:
    out = {"python": platform.python_version(), "platform": platform.platform()}
    for name in TRACKED_PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


def cpu_name() -> str:
    """The CPU model (``/proc/cpuinfo``'s model name; ``platform`` elsewhere)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def write_json(path: str | Path, obj: Any) -> None:
    """Write JSON atomically (temp file + rename), so a killed run never leaves half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        json.dump(obj, f, indent=2, default=_json_default)
        f.write("\n")
    os.replace(tmp, path)


def _json_default(o):
    if isinstance(o, np.integer):
        return int(o)
    if isinstance(o, np.floating):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def read_json(path: str | Path) -> Any:
    with open(path) as f:
        return json.load(f)


def get_logger(name: str = "radpretrain") -> logging.Logger:
    """The package logger; messages go to stderr once, formatted briefly."""
    logger = logging.getLogger(name if name.startswith("radpretrain") else f"radpretrain.{name}")
    root = logging.getLogger("radpretrain")
    if not root.handlers:
        h = logging.StreamHandler(sys.stderr)
        h.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
        root.addHandler(h)
        root.setLevel(os.environ.get("RADPRETRAIN_LOGLEVEL", "INFO"))
        root.propagate = False
    return logger


def add_file_log(path: str | Path) -> logging.Handler:
    """Also write the package log to ``path`` (for run folders)."""
    h = logging.FileHandler(path)
    h.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.getLogger("radpretrain").addHandler(h)
    return h


def idle_cpus(window: float = 0.5) -> float | None:
    """How many CPU cores were idle over the next ``window`` seconds (Linux ``/proc/stat``); None if unknown."""
    def sample() -> tuple[int, int]:
        with open("/proc/stat") as f:
            vals = [int(v) for v in f.readline().split()[1:9]]  # user nice system idle iowait irq softirq steal
        return vals[3] + vals[4], sum(vals)

    try:
        idle0, total0 = sample()
        time.sleep(window)
        idle1, total1 = sample()
    except (OSError, ValueError, IndexError):
        return None
    if total1 <= total0:
        return None
    return (idle1 - idle0) / (total1 - total0) * (os.cpu_count() or 1)


def auto_cpu_threads(window: float = 0.5) -> tuple[int, float | None]:
    """(intra-op threads, idle cores): one per core idle now, at least 1, at most the cores this process may use.

    Threads beyond the idle cores make torch's threads wait on each other (a step can get several
    times slower on a shared machine), so a core counts only when at least 80 % of it is idle.
    """
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    idle = idle_cpus(window)
    if idle is None:
        return usable, None
    return max(1, min(usable, int(idle + 0.2))), idle
