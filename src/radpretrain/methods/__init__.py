"""Pretraining methods: one module per method, all behind :class:`~radpretrain.methods.base.PretrainMethod`.

Add a method: write ``methods/<name>.py`` with a ``PretrainMethod`` subclass decorated
with ``@register("<name>")``, add ``configs/<name>_cpu.yaml``, and list the module in
``METHOD_MODULES`` below.
"""

import importlib

from radpretrain.methods.base import METHODS, PretrainMethod, register

METHOD_MODULES = {
    "mae": "radpretrain.methods.mae",
    "deepcluster": "radpretrain.methods.deepcluster",
    "dino": "radpretrain.methods.dino",
    "genesis": "radpretrain.methods.genesis",
    "metadata": "radpretrain.methods.metadata",
    "simclr": "radpretrain.methods.simclr",
}


def get_method(name: str) -> type[PretrainMethod]:
    from radpretrain.errors import UserError

    if name not in METHOD_MODULES:
        raise UserError(f"unknown method {name!r} (choose from {', '.join(METHOD_MODULES)})")
    importlib.import_module(METHOD_MODULES[name])
    return METHODS[name]


__all__ = ["METHODS", "METHOD_MODULES", "PretrainMethod", "get_method", "register"]
