"""Pretraining methods: one module per method, all behind :class:`~radpretrain.methods.base.PretrainMethod`.

Add a method: write ``methods/<name>.py`` with a ``PretrainMethod`` subclass decorated with
``@register("<name>")`` that declares its ``display_name``, ``paper`` and ``supervision`` (and its
config sections), and add its preset ``configs/<name>_cpu.yaml``.  Nothing else: the modules of
this package are found by :func:`discover` (every ``methods/*.py`` except ``base`` and names
starting with ``_``, which may hold helpers), and the registry is what ``@register`` recorded.
"""

from __future__ import annotations

import functools
import importlib
import pkgutil

from radpretrain.errors import UserError
from radpretrain.methods.base import METHODS, Paper, PretrainMethod, Supervision, register

NOT_METHOD_MODULES = ("base",)


def method_modules() -> list[str]:
    """The method modules of this package (``radpretrain.methods.mae``, ...), found on its path."""
    return sorted(f"{__name__}.{m.name}" for m in pkgutil.iter_modules(__path__)
                  if not m.name.startswith("_") and m.name not in NOT_METHOD_MODULES)


@functools.lru_cache(maxsize=None)
def discover() -> tuple[str, ...]:
    """Import every method module (once); returns the registered method names, sorted.

    A module that registers no method is an error: a helper module's name starts with ``_``.
    """
    for module in method_modules():
        importlib.import_module(module)
        if not any(cls.__module__ == module for cls in METHODS.values()):
            raise UserError(f"{module}: registers no method (decorate its PretrainMethod subclass with "
                            "@register(NAME), or start a helper module's name with '_')")
    return tuple(sorted(METHODS))


def get_method(name: str) -> type[PretrainMethod]:
    """The method class registered as ``name`` (``UserError`` naming the known ones otherwise)."""
    names = discover()
    if name not in METHODS:
        raise UserError(f"unknown method {name!r} (choose from {', '.join(names)})")
    return METHODS[name]


def find_method(name: str) -> type[PretrainMethod] | None:
    """The method class registered as ``name``, or ``None`` (e.g. a run made by a method not installed here)."""
    discover()
    return METHODS.get(name)


__all__ = ["METHODS", "Paper", "PretrainMethod", "Supervision", "discover", "find_method", "get_method",
           "method_modules", "register"]
