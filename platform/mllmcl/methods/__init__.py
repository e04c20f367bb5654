"""CL methods, one module each, in one registry by name."""

from __future__ import annotations

from typing import Callable

_REGISTRY: dict[str, Callable] = {}


def register(name: str):
    """Class decorator: make a method available as ``method.name=<name>``."""

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


def _load_builtin() -> None:
    from mllmcl.methods import (  # noqa: F401
        disco_select,
        joint,
        lora_ft,
        moelora,
        mr_lora,
        olora,
        replay,
        zero_shot,
    )
