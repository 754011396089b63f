"""YAML configs with ``key=value`` overrides.

A config is a nested dict loaded from one YAML file (no inheritance).  Overrides
use dotted keys, e.g. ``trainer.max_steps=30 data.image_size=64``; values are
parsed as YAML scalars (``1e-3`` -> float, ``true`` -> bool, ``[1,2]`` -> list).
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Iterable

import yaml

from radpretrain.errors import UserError

# The repository's ``configs/`` folder (editable installs and source checkouts).
CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs"


def find_config(name_or_path: str | Path) -> Path:
    """Return the path of a config given a file path or a packaged config name."""
    p = Path(name_or_path)
    if p.is_file():
        return p
    for cand in (CONFIG_DIR / f"{name_or_path}.yaml", CONFIG_DIR / str(name_or_path)):
        if cand.is_file():
            return cand
    known = sorted(q.stem for q in CONFIG_DIR.glob("*.yaml"))
    raise UserError(f"{name_or_path}: no such config file or packaged config (known: {', '.join(known)})")


def load_config(name_or_path: str | Path) -> dict:
    path = find_config(name_or_path)
    try:
        with open(path) as f:
            cfg = yaml.safe_load(f) or {}
    except yaml.YAMLError as e:
        raise UserError(f"{path}: not valid YAML ({e})") from None
    if not isinstance(cfg, dict):
        raise UserError(f"{path}: a config must be a mapping at the top level")
    return cfg


def parse_value(text: str) -> Any:
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def apply_overrides(cfg: dict, overrides: Iterable[str], strict: bool = True) -> dict:
    """Return a copy of ``cfg`` with ``a.b.c=value`` overrides applied.

    With ``strict`` a key that does not exist in the config is an error (typos
    must not be ignored silently); prefix the key with ``+`` to add a new key.
    """
    out = copy.deepcopy(cfg)
    for item in overrides:
        if "=" not in item:
            raise UserError(f"override {item!r}: expected key=value")
        key, _, raw = item.partition("=")
        add = key.startswith("+")
        key = key.lstrip("+").strip()
        parts = key.split(".")
        node = out
        for i, part in enumerate(parts[:-1]):
            if part not in node or not isinstance(node[part], dict):
                if strict and not add:
                    raise UserError(f"override {item!r}: unknown key {'.'.join(parts[: i + 1])!r}")
                node[part] = {}
            node = node[part]
        if strict and not add and parts[-1] not in node:
            known = ", ".join(sorted(node)) if isinstance(node, dict) else ""
            raise UserError(f"override {item!r}: unknown key {key!r} (known here: {known}); use +{key}=... to add one")
        node[parts[-1]] = parse_value(raw)
    return out


def get(cfg: dict, dotted: str, default: Any = None) -> Any:
    node = cfg
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return default
        node = node[part]
    return node


def save_config(cfg: dict, path: str | Path) -> None:
    with open(path, "w") as f:
        yaml.safe_dump(cfg, f, sort_keys=False)
