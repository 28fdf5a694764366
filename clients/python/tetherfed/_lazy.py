"""Exports loaded on first use (PEP 562), so importing a package costs nothing until a name is
used: `import tetherfed` needs no torch, `tetherfed --help` loads no model code."""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from typing import Any


def lazy_exports(package: str, names: Mapping[str, str]) -> Callable[[str], Any]:
    """A module `__getattr__` for `package` that imports `names[name]` (a module, absolute or
    relative to `package`) on first access and returns its attribute `name`. AttributeError for
    any other name, as Python expects of a module."""
    namespace = importlib.import_module(package).__dict__

    def __getattr__(name: str) -> Any:
        module = names.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(module, package), name)
        namespace[name] = value  # cached: later lookups are plain attribute reads
        return value

    return __getattr__
