"""CL methods, one module each, in one registry by name (``method.name``)."""

from __future__ import annotations

import importlib
import pkgutil

_REGISTRY: dict[str, type] = {}


def register(name: str):
    """Class decorator: make a method (and its ``Options``) available as ``method.name=<name>``."""

    def deco(cls):
        if name in _REGISTRY and _REGISTRY[name] is not cls:
            raise ValueError(f"method {name!r} is registered twice")
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return deco


def registered_methods() -> list[str]:
    _load_builtin()
    return sorted(_REGISTRY)


def get_method(name: str):
    _load_builtin()
    if name not in _REGISTRY:
        raise KeyError(f"unknown method {name!r}: expected one of {sorted(_REGISTRY)}")
    return _REGISTRY[name]


def method_options(name: str):
    """The default options of method ``name``."""
    return get_method(name).Options(name=name)


def _load_builtin() -> None:
    """Import every module of this package once: a method registers itself by being here."""
    global _LOADED
    if not _LOADED:
        _LOADED = True
        for mod in pkgutil.iter_modules(__path__):
            if not mod.name.startswith("_") and mod.name != "base":
                importlib.import_module(f"{__name__}.{mod.name}")


_LOADED = False
