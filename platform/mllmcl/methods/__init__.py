"""CL methods, one module each, in one registry by name (``method.name``)."""

from __future__ import annotations

from mllmcl.registry import Registry

_METHODS = Registry("method", __name__, attribute="name")
register = _METHODS.register  # class decorator: a method (and its Options) as method.name=<name>


def registered_methods() -> list[str]:
    return _METHODS.names()


def get_method(name: str):
    return _METHODS.get(name)


def method_options(name: str):
    """The default options of method ``name``."""
    return get_method(name).Options(name=name)
