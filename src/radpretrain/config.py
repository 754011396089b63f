"""YAML configs: packaged presets, strict schemas and ``key=value`` overrides.

A config is a nested dict loaded from one YAML file (no inheritance): a file path, or the name
of a preset shipped inside the package (``radpretrain/configs/*.yaml``, read with
:mod:`importlib.resources`, so an editable install, a wheel and an sdist all find them).

Every key is checked against a *schema*: a mapping from section name to a dataclass whose
fields are the section's keys, with type annotations and (in ``field(metadata=...)``) ranges:

- ``ge`` / ``gt`` / ``le`` / ``lt``: bounds for numbers (and for each number of a list);
- ``check``: a callable returning an error text or ``None`` for rules a bound cannot say;
- ``help``: what a valid value looks like, shown in errors.

An unknown key anywhere (file or override) is an error naming the source, the key and the
nearest known key; a value of the wrong type or out of range is a one-line error.  Overrides
use dotted keys (``trainer.max_steps=30 data.image_size=64``) whose values are parsed as YAML
scalars (``1e-3`` -> float, ``true`` -> bool, ``[1,2]`` -> list).
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import math
import types
import typing
from importlib import resources
from pathlib import Path
from typing import Any, Iterable, Literal, Mapping, Union

import yaml

from radpretrain.errors import UserError

PRESET_PACKAGE = "radpretrain.configs"

# A schema: top-level key -> a dataclass (a section) or a type annotation (a plain value).
Schema = Mapping[str, Any]


# -- presets ---------------------------------------------------------------------------
def preset_names() -> list[str]:
    """Names of the presets shipped inside the package (``mae_cpu``, ``simclr_gpu``, ...)."""
    root = resources.files(PRESET_PACKAGE)
    return sorted(p.name[: -len(".yaml")] for p in root.iterdir() if p.name.endswith(".yaml"))


def preset_text(name: str) -> str | None:
    """The YAML text of a packaged preset, or ``None`` when there is no such preset."""
    stem = name[: -len(".yaml")] if name.endswith(".yaml") else name
    if not stem or "/" in stem or "\\" in stem:
        return None
    res = resources.files(PRESET_PACKAGE).joinpath(f"{stem}.yaml")
    return res.read_text(encoding="utf-8") if res.is_file() else None


def is_preset(name: str) -> bool:
    return preset_text(str(name)) is not None


def load_config_with_source(name_or_path: str | Path) -> tuple[dict, str]:
    """``(config dict, source)``: a YAML file path, else a packaged preset name.

    ``source`` names where the config came from (``the file path`` or ``preset NAME``) for
    error messages.
    """
    p = Path(name_or_path)
    if p.is_file():
        try:
            text = p.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise UserError(f"{p}: cannot read the config ({e})") from None
        source = str(p)
    else:
        text = preset_text(str(name_or_path))
        if text is None:
            raise UserError(f"{name_or_path}: no such config file or packaged preset "
                            f"(known presets: {', '.join(preset_names())})")
        source = f"preset {Path(str(name_or_path)).stem}"
    try:
        cfg = yaml.safe_load(text) or {}
    except yaml.YAMLError as e:
        msg = " ".join(str(e).split())
        raise UserError(f"{source}: not valid YAML ({msg})") from None
    if not isinstance(cfg, dict):
        raise UserError(f"{source}: a config must be a mapping at the top level")
    return cfg, source


def load_config(name_or_path: str | Path) -> dict:
    return load_config_with_source(name_or_path)[0]


def save_config(cfg: dict, path: str | Path) -> None:
    with open(path, "w") as f:
        yaml.safe_dump(cfg, f, sort_keys=False)


def parse_value(text: str) -> Any:
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def get(cfg: dict, dotted: str, default: Any = None) -> Any:
    node = cfg
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return default
        node = node[part]
    return node


# -- schema -------------------------------------------------------------------------------
def section_defaults(cls) -> dict:
    """The defaults of a section dataclass as a plain dict (lists copied)."""
    out = {}
    for f in dataclasses.fields(cls):
        if f.default is not dataclasses.MISSING:
            out[f.name] = copy.deepcopy(f.default)
        elif f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
            out[f.name] = f.default_factory()  # type: ignore[misc]
    return out


def schema_defaults(schema: Schema) -> dict:
    """Defaults of every section of ``schema`` (plain values without a default are left out)."""
    return {k: section_defaults(v) for k, v in schema.items() if dataclasses.is_dataclass(v)}


def _nearest(key: str, known: Iterable[str]) -> str:
    near = difflib.get_close_matches(key, list(known), n=1, cutoff=0.5)
    return f"; did you mean {near[0]!r}?" if near else ""


def _known_text(known: Iterable[str]) -> str:
    return ", ".join(sorted(known))


def _hints(cls) -> dict:
    return typing.get_type_hints(cls)


def describe(tp) -> str:
    """A short human description of a type annotation (for error messages)."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return "anything"
    if tp is type(None):
        return "null"
    if tp is bool:
        return "true or false"
    if tp is int:
        return "an integer"
    if tp is float:
        return "a number"
    if tp is str:
        return "a string"
    if origin is Literal:
        return "one of " + ", ".join(str(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join(describe(a) for a in typing.get_args(tp))
    if origin in (list, tuple):
        args = [a for a in typing.get_args(tp) if a is not Ellipsis]
        inner = describe(args[0]) if args else "values"
        if origin is tuple and args and Ellipsis not in typing.get_args(tp):
            return f"a list of {len(args)} ({inner})"
        return f"a list ({inner})"
    if origin is dict or tp is dict:
        return "a mapping"
    return getattr(tp, "__name__", str(tp))


def _matches(value, tp) -> bool:
    """Whether ``value`` (parsed YAML) fits the annotation ``tp``."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return True
    if tp is type(None):
        return value is None
    if tp is bool:
        return isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp is str:
        return isinstance(value, str)
    if origin is Literal:
        return any(value == a and type(value) is type(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return any(_matches(value, a) for a in typing.get_args(tp))
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            return False
        args = typing.get_args(tp)
        if not args:
            return True
        if origin is tuple and Ellipsis not in args:
            return len(value) == len(args) and all(_matches(v, a) for v, a in zip(value, args))
        return all(_matches(v, args[0]) for v in value)
    if origin is dict or tp is dict:
        return isinstance(value, dict)
    raise TypeError(f"unsupported annotation in a config schema: {tp!r}")


def _numbers(value) -> list:
    if isinstance(value, bool):
        return []
    if isinstance(value, (int, float)):
        return [value]
    if isinstance(value, (list, tuple)):
        return [v for v in value if isinstance(v, (int, float)) and not isinstance(v, bool)]
    return []


def _range_problem(value, meta: Mapping) -> str | None:
    for x in _numbers(value):
        if isinstance(x, float) and not math.isfinite(x):
            return "must be a finite number"
        if "ge" in meta and not x >= meta["ge"]:
            return f"must be >= {meta['ge']}"
        if "gt" in meta and not x > meta["gt"]:
            return f"must be > {meta['gt']}"
        if "le" in meta and not x <= meta["le"]:
            return f"must be <= {meta['le']}"
        if "lt" in meta and not x < meta["lt"]:
            return f"must be < {meta['lt']}"
    check = meta.get("check")
    return check(value) if check is not None else None


def check_value(value, tp, meta: Mapping, key: str, source: str) -> None:
    """One-line :class:`UserError` unless ``value`` fits type ``tp`` and the bounds in ``meta``."""
    help_ = meta.get("help")
    if not _matches(value, tp):
        want = help_ or describe(tp)
        raise UserError(f"{source}: {key}={value!r}: expected {want}")
    problem = _range_problem(value, meta)
    if problem:
        raise UserError(f"{source}: {key}={value!r}: {problem}" + (f" ({help_})" if help_ else ""))


def check_section(values, cls, where: str, source: str) -> None:
    """Check a section's dict against its dataclass: unknown keys, types and ranges."""
    if values is None:
        return
    if not isinstance(values, dict):
        raise UserError(f"{source}: {where} must be a mapping of keys (got {values!r})")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = _hints(cls)
    for k, v in values.items():
        if k not in fields:
            raise UserError(f"{source}: unknown key '{where}.{k}'{_nearest(str(k), fields)} "
                            f"(known in {where}: {_known_text(fields)})")
        check_value(v, hints[k], fields[k].metadata, f"{where}.{k}", source)


def check_config(cfg: dict, schema: Schema, source: str) -> None:
    """Check a whole config dict against ``schema`` (see the module docstring)."""
    if not isinstance(cfg, dict):
        raise UserError(f"{source}: a config must be a mapping at the top level")
    for k, v in cfg.items():
        if k not in schema:
            raise UserError(f"{source}: unknown key {k!r}{_nearest(str(k), schema)} "
                            f"(known top-level keys: {_known_text(schema)})")
        spec = schema[k]
        if dataclasses.is_dataclass(spec):
            check_section(v, spec, str(k), source)
        else:
            tp, meta = spec if isinstance(spec, tuple) else (spec, {})
            check_value(v, tp, meta, str(k), source)


def _lookup(schema: Schema, parts: list[str]):
    """``(annotation, metadata)`` of a dotted key in ``schema``; ``None`` when unknown.

    A key below a ``dict``-typed field (``model.kwargs.depth``) is accepted with any value.
    """
    spec = schema.get(parts[0]) if schema is not None else None
    if spec is None:
        return None
    if not dataclasses.is_dataclass(spec):
        tp, meta = spec if isinstance(spec, tuple) else (spec, {})
        return (tp, meta) if len(parts) == 1 else None
    if len(parts) == 1:
        return (dict, {})
    fields = {f.name: f for f in dataclasses.fields(spec)}
    f = fields.get(parts[1])
    if f is None:
        return None
    tp = _hints(spec)[parts[1]]
    if len(parts) == 2:
        return (tp, f.metadata)
    if tp is dict or typing.get_origin(tp) is dict or dict in typing.get_args(tp):
        return (Any, {})
    return None


def _known_under(schema: Schema, parts: list[str]) -> list[str]:
    if len(parts) == 1:
        return list(schema)
    spec = schema.get(parts[0])
    if dataclasses.is_dataclass(spec):
        return [f.name for f in dataclasses.fields(spec)]
    return []


def apply_overrides(cfg: dict, overrides: Iterable[str], strict: bool = True, schema: Schema | None = None) -> dict:
    """Return a copy of ``cfg`` with ``a.b.c=value`` overrides applied.

    With a ``schema``, a key is valid when the schema knows it (the value is type- and
    range-checked); without one, a key is valid when ``strict`` is off, it exists in ``cfg``
    or it is written ``+key=value``.  Unknown keys are errors naming the nearest known key.
    """
    out = copy.deepcopy(cfg)
    for item in overrides:
        if "=" not in item:
            raise UserError(f"override {item!r}: expected key=value")
        key, _, raw = item.partition("=")
        key = key.strip()
        add = key.startswith("+")  # older spelling for "a key the config file leaves out"
        key = key.lstrip("+")
        loose = add or not strict
        parts = key.split(".")
        if not key or any(not p for p in parts):
            raise UserError(f"override {item!r}: expected key=value with a dotted key such as trainer.max_steps")
        value = parse_value(raw)
        if schema is not None:
            spec = _lookup(schema, parts)
            if spec is None:
                i = next((j for j in range(1, len(parts) + 1) if _lookup(schema, parts[:j]) is None), len(parts))
                bad = parts[i - 1]
                known = _known_under(schema, parts[: i - 1] + [bad]) if i > 1 else list(schema)
                raise UserError(f"override {item!r}: unknown key {'.'.join(parts[:i])!r}{_nearest(bad, known)}"
                                + (f" (known here: {_known_text(known)})" if known else ""))
            tp, meta = spec
            if dataclasses.is_dataclass(schema.get(parts[0])) and len(parts) == 1:
                raise UserError(f"override {item!r}: {key} is a section; set one of its keys ({key}.KEY=VALUE)")
            check_value(value, tp, meta, key, f"override {item!r}")
        node = out
        for i, part in enumerate(parts[:-1]):
            if part not in node or not isinstance(node[part], dict):
                if not loose and schema is None:
                    raise UserError(f"override {item!r}: unknown key {'.'.join(parts[: i + 1])!r}"
                                    f"{_nearest(part, node if isinstance(node, dict) else [])}")
                node[part] = {}
            node = node[part]
        if not loose and schema is None and parts[-1] not in node:
            known = list(node) if isinstance(node, dict) else []
            raise UserError(f"override {item!r}: unknown key {key!r}{_nearest(parts[-1], known)}"
                            + (f" (known here: {_known_text(known)})" if known else ""))
        node[parts[-1]] = value
    return out


def deep_merge(base: dict, over: dict) -> dict:
    """``base`` updated by ``over``, recursively for nested dicts (both left unchanged)."""
    out = copy.deepcopy(base)
    for k, v in (over or {}).items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out
