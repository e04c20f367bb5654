"""CL methods, one module each, in one registry by name (``method.name``)."""

from __future__ import annotations

from mllmcl.registry import Registry

_METHODS = Registry("method", __name__)


def register(name: str):
    """Class decorator: make a method (and its ``Options``) available as ``method.name=<name>``."""

    def deco(cls):
        cls.name = name
        return _METHODS.register(name)(cls)

    return deco


def registered_methods() -> list[str]:
    return _METHODS.names()


def get_method(name: str):
    return _METHODS.get(name)


def method_options(name: str):
    """The default options of method ``name``."""
    return get_method(name).Options(name=name)
