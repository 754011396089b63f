"""Small helpers shared by every stage: run-folder provenance, JSON, logging."""

from __future__ import annotations

import json
import logging
import os
import platform
import sys
import tempfile
from importlib import metadata
from pathlib import Path
from typing import Any

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
    try:
        import numpy as np

        if isinstance(o, np.integer):
            return int(o)
        if isinstance(o, np.floating):
            return float(o)
        if isinstance(o, np.ndarray):
            return o.tolist()
    except ImportError:  # pragma: no cover
        pass
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
