"""A registry of named classes that fills itself: every module of its package registers what it
defines on import, and the registry imports the whole package the first time it is asked
(dropping a module into ``mllmcl/methods/`` or ``mllmcl/routing/`` is all it takes)."""

from __future__ import annotations

import importlib
import pkgutil


class Registry:
    def __init__(self, what: str, package: str, attribute: str, skip: tuple[str, ...] = ("base",)):
        self.what, self.package, self.attribute, self.skip = what, package, attribute, skip
        self._classes: dict[str, type] = {}
        self._loaded = False

    def register(self, name: str):
        """Class decorator: the class becomes available under ``name`` (set as its ``attribute``)."""

        def deco(cls):
            if name in self._classes and self._classes[name] is not cls:
                raise ValueError(f"{self.what} {name!r} is registered twice")
            setattr(cls, self.attribute, name)
            self._classes[name] = cls
            return cls

        return deco

    def _load(self) -> None:
        if not self._loaded:
            self._loaded = True  # before the imports: a module that asks the registry does not recurse
            for mod in pkgutil.iter_modules(importlib.import_module(self.package).__path__):
                if not mod.name.startswith("_") and mod.name not in self.skip:
                    importlib.import_module(f"{self.package}.{mod.name}")

    def names(self) -> list[str]:
        self._load()
        return sorted(self._classes)

    def get(self, name: str) -> type:
        self._load()
        if name not in self._classes:
            raise KeyError(f"unknown {self.what} {name!r}: expected one of {sorted(self._classes)}")
        return self._classes[name]
