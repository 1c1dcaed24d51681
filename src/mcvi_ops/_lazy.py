"""Lazy attributes of packages (PEP 562), so that ``import mcvi_ops`` stays light.

torch, lightning and scvi-tools load only when a model, loader, field or training plan is first
used; crop extraction and the command line's ``--help`` never pay for them.
"""

from __future__ import annotations

import importlib
import warnings
from collections.abc import Callable, Mapping
from typing import Any


def lazy_getattr(
    package: str,
    attributes: Mapping[str, str],
    *,
    moved: Mapping[str, str] | None = None,
) -> Callable[[str], Any]:
    """Make a module ``__getattr__`` that imports ``attributes[name]`` (a module path) on first use.

    Parameters
    ----------
    package
        The package's ``__name__`` (for error messages and relative module paths).
    attributes
        Attribute name -> module that defines it (absolute, or relative to ``package``).
    moved
        Old attribute name -> new public location (``"mcvi_ops.pp.extract_crops"``): still
        importable from here with a :class:`FutureWarning` naming the new place.
    """
    moved = dict(moved or {})

    def __getattr__(name: str) -> Any:
        if name in attributes:
            module = importlib.import_module(attributes[name], package)
            value = module if attributes[name].endswith(f".{name}") else getattr(module, name)
            return value
        if name in moved:
            target = moved[name]
            module_name, _, attr = target.rpartition(".")
            warnings.warn(
                f"`{package}.{name}` moved to `{target}`; import it from there "
                "(the old name will be removed in a future release).",
                FutureWarning,
                stacklevel=2,
            )
            return getattr(importlib.import_module(module_name), attr)
        msg = f"module {package!r} has no attribute {name!r}"
        raise AttributeError(msg)

    return __getattr__
