"""The pretraining config: engine sections + method sections, presets and overrides.

A resolved config is ``engine defaults <- preset (or YAML file) <- key=value overrides``.
The engine's sections are the dataclasses of :mod:`radpretrain.settings`; a method adds its
own through ``PretrainMethod.config_sections`` (e.g. ``mae:``) and may extend ``model:`` with
keys of its own (Genesis' decoder).  The YAML file and the overrides are checked against that
schema before anything is written (:mod:`radpretrain.config`).

The engine sections' defaults fill every engine key a preset leaves out (and are recorded in
the run's ``config.yaml``); a method-section key a preset leaves out takes the method's default
(the dataclass default).
"""

from __future__ import annotations

from pathlib import Path

import torch

from radpretrain.config import apply_overrides, check_config, deep_merge, is_preset, load_config_with_source
from radpretrain.errors import UserError
from radpretrain.methods import get_method
from radpretrain.settings import DEFAULTS, ENGINE_SCHEMA
from radpretrain.utils import get_logger

log = get_logger("pretrain")

__all__ = ["DEFAULTS", "RECOMMENDED", "method_schema", "recommended_preset", "resolve_config", "resume_config",
           "check_run_config"]

# The recommended recipe (docs/recipes.md): what ``pretrain`` runs with neither --method nor --config.
RECOMMENDED = {"cpu": "recommended_cpu", "gpu": "recommended_gpu"}


def method_schema(method_cls) -> dict:
    """The engine schema plus the method's own sections (``PretrainMethod.config_sections``)."""
    schema = dict(ENGINE_SCHEMA)
    for name, cls in (getattr(method_cls, "config_sections", None) or {}).items():
        if name in ENGINE_SCHEMA and not (isinstance(cls, type) and issubclass(cls, ENGINE_SCHEMA[name])):
            raise TypeError(f"{method_cls.__name__}.config_sections[{name!r}] must extend {ENGINE_SCHEMA[name].__name__}")
        schema[name] = cls
    return schema


def default_preset(method: str) -> str:
    """A method's packaged preset (``@register`` refuses a method without it)."""
    return f"{method}_cpu"


def recommended_preset(overrides=(), cuda_available: bool | None = None) -> str:
    """The recommended recipe's preset for this machine: the GPU variant when CUDA is usable and no
    ``trainer.accelerator=cpu`` override keeps the run on the CPU, else the CPU variant."""
    accelerator = "auto"
    for o in overrides:
        key, sep, value = str(o).partition("=")
        if sep and key.strip().lstrip("+") == "trainer.accelerator":
            accelerator = value.strip().lower()
    if accelerator == "cpu":
        return RECOMMENDED["cpu"]
    if cuda_available is None:
        cuda_available = bool(torch.cuda.is_available())
    return RECOMMENDED["gpu" if cuda_available else "cpu"]


def resolve_config(method: str | None, config: str | None = None, overrides=(), data: str | None = None) -> dict:
    """Engine defaults <- config file <- overrides, all checked.

    The config file is ``config`` (a preset or a YAML file), else the method's ``<method>_cpu``
    preset, else (neither given) the recommended recipe (:func:`recommended_preset`).  ``method``
    may be ``None`` when the config says its ``method``; when both are given they must agree.
    ``data.root`` is filled from ``data``.
    """
    if method is not None:
        get_method(method)  # an unknown name is said as such, with the known ones
    name = config or (default_preset(method) if method else None)
    if name is None:
        name = config = recommended_preset(overrides)
        log.info("no --method or --config: the recommended recipe, preset %s (docs/recipes.md)", name)
    if config is None and not is_preset(name):  # registration checks it; a broken install still reads well
        raise UserError(f"method {method!r} has no packaged preset {name}.yaml; give --config FILE")
    file_cfg, source = load_config_with_source(name)
    file_method = file_cfg.get("method")
    if method is None:
        if not file_method:
            raise UserError(f"{source}: the config names no method; give --method")
        method = str(file_method)
    elif file_method not in (None, method):
        raise UserError(f"{source}: this config is for method {file_method!r}, not {method!r}")
    schema = method_schema(get_method(method))
    check_config(file_cfg, schema, source)
    cfg = deep_merge(DEFAULTS, file_cfg)
    cfg["method"] = method
    cfg = apply_overrides(cfg, list(overrides), schema=schema)
    if data is not None:
        cfg["data"]["root"] = str(Path(data).resolve())
    check_run_config(cfg)
    return cfg


def resume_config(saved: dict, source: str, overrides=()) -> dict:
    """A saved run's config.yaml (checked as strictly as a preset) with ``overrides`` applied."""
    method = saved.get("method")
    if not method:
        raise UserError(f"{source}: names no method")
    schema = method_schema(get_method(str(method)))
    check_config(saved, schema, source)
    cfg = apply_overrides(deep_merge(DEFAULTS, saved), list(overrides), schema=schema)
    check_run_config(cfg)
    return cfg


def check_run_config(cfg: dict) -> None:
    """Rules across keys that a single key's type and range cannot say."""
    t = cfg["trainer"]
    if t.get("max_steps") in (None, -1) and t.get("max_epochs") in (None, -1):
        raise UserError("set trainer.max_steps or trainer.max_epochs (both are unlimited)")
