"""``Registry[T]``: one table of names -> implementations per extension concept.

cladapt has one table per concept (``METHODS``, ``REGULARIZERS``, later ``ROUTERS``). Built-ins
are lazy ``"module:Class"`` strings so that ``cladapt --help`` does not import torch; third
parties register through a Python entry-point group. Standard library only (layer 0).
"""

from __future__ import annotations

import difflib
import importlib
import re
from collections.abc import Mapping
from importlib import metadata
from typing import Generic, TypeVar

from cladapt.errors import CladaptError, PluginNotFound

T = TypeVar("T")

_NAME = re.compile(r"^[a-z][a-z0-9-]{0,63}$")


class Registry(Generic[T]):
    """Names -> implementations for one concept.

    Args:
        kind: what the table holds, for messages ("method", "router").
        base: every registered class must subclass it.
        builtins: name -> ``"module:Class"``; imported on first use.
        entry_point_group: a ``importlib.metadata`` group scanned once for third-party plugins.
    """

    def __init__(self, kind: str, *, base: type[T], builtins: Mapping[str, str], entry_point_group: str) -> None:
        self.kind = kind
        self.base = base
        self._targets: dict[str, type[T] | str] = {}
        self._entry_point_group = entry_point_group
        self._entry_points_loaded = False
        for name, target in builtins.items():
            self.register(name, target)

    def register(self, name: str, target: type[T] | str) -> None:
        """Add ``name``. A duplicate or malformed name is an error, never a silent override."""
        if not _NAME.match(name):
            raise CladaptError(
                f"invalid {self.kind} name {name!r}",
                hint="names are lowercase letters, digits and '-', starting with a letter",
            )
        if name in self._targets:
            raise CladaptError(f"{self.kind} {name!r} is registered twice")
        self._targets[name] = target

    def _load_entry_points(self) -> None:
        if self._entry_points_loaded:
            return
        self._entry_points_loaded = True
        for ep in metadata.entry_points(group=self._entry_point_group):
            if ep.name not in self._targets:
                self.register(ep.name, ep.value)

    def names(self) -> list[str]:
        """All registered names, built-ins first in table order."""
        self._load_entry_points()
        return list(self._targets)

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and name in self.names()

    def get(self, name: str) -> type[T]:
        """The class registered under ``name``, importing it on first use."""
        names = self.names()
        if name not in self._targets:
            close = difflib.get_close_matches(name, names, n=1)
            hint = f"did you mean {close[0]!r}?" if close else f"known {self.kind}s: {', '.join(names)}"
            raise PluginNotFound(f"unknown {self.kind} {name!r}", hint=hint)
        target = self._targets[name]
        if isinstance(target, str):
            module_name, _, attr = target.partition(":")
            cls = getattr(importlib.import_module(module_name), attr)
            if not (isinstance(cls, type) and issubclass(cls, self.base)):
                raise CladaptError(f"{self.kind} {name!r} ({target}) is not a subclass of {self.base.__name__}")
            self._targets[name] = cls
            target = cls
        return target
