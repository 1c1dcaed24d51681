"""Reading saved models without running code from the model folder.

scvi-tools loads ``model.pt`` with ``torch.load(weights_only=False)``, which unpickles anything: a
crafted file runs arbitrary code. Here the file is loaded with ``weights_only=True`` and an
explicit allow-list of the types a saved image model holds (tensors, numpy arrays and dtypes,
and the pandas frames of the training history); anything else is refused before it is built.
"""

from __future__ import annotations

import os
import pickle
from pathlib import Path
from typing import Any

import torch
from scvi.model.base._constants import SAVE_KEYS


class UnsafeModelFileError(pickle.UnpicklingError):
    """A model file holds objects that a saved model never holds (loading could run code)."""


def check_prefix(prefix: str | None, dir_path: str | os.PathLike) -> str:
    """The file-name prefix of a saved model, refusing anything that could leave ``dir_path``."""
    if prefix is None:
        return ""
    if not isinstance(prefix, str):
        msg = f"`prefix` must be a string, got {type(prefix).__name__}."
        raise TypeError(msg)
    separators = {"/", "\\", os.sep, *([os.altsep] if os.altsep else [])}
    if any(sep in prefix for sep in separators) or "\0" in prefix or prefix in (".", ".."):
        msg = (
            f"`prefix` must be a plain file-name prefix without path separators, got {prefix!r}: "
            f"the files would be written outside {str(dir_path)!r}. Choose the folder with "
            "`dir_path` and use `prefix` only to tell models in one folder apart (e.g. 'run1_')."
        )
        raise ValueError(msg)
    return prefix


def plain_containers(value: Any) -> Any:
    """``value`` with every ``defaultdict`` (nested in dicts) turned into a plain ``dict``.

    scvi-tools' registries hold a ``defaultdict``, which ``torch.load(weights_only=True)``
    cannot fill; models are saved with plain dicts instead.
    """
    if isinstance(value, dict):
        return {key: plain_containers(item) for key, item in value.items()}
    return value


def _optional(module: str, name: str) -> list[Any]:
    """``[module.name]``, or ``[]`` where this version of the library has no such object."""
    import importlib

    try:
        return [getattr(importlib.import_module(module), name)]
    except (ImportError, AttributeError):
        return []


def _allowed_globals() -> list[Any]:
    """The types and rebuild functions a saved model's pickle may name (besides torch's)."""
    import builtins

    import numpy as np
    import pandas as pd

    try:
        from numpy._core import multiarray
    except ImportError:  # numpy < 2
        from numpy.core import multiarray

    allowed: list[Any] = [
        # numpy arrays (registries, indices) and scalars
        np.ndarray,
        np.dtype,
        multiarray._reconstruct,
        multiarray.scalar,
        # files written with numpy 1.x name the same functions under numpy.core
        (multiarray._reconstruct, "numpy.core.multiarray._reconstruct"),
        (multiarray.scalar, "numpy.core.multiarray.scalar"),
        # the training history: a dict of pandas DataFrames (private rebuild functions, where
        # this pandas version has them)
        pd.DataFrame,
        pd.Index,
        pd.RangeIndex,
        *_optional("pandas.core.internals.managers", "BlockManager"),
        *_optional("pandas._libs.internals", "_unpickle_block"),
        *_optional("pandas.core.indexes.base", "_new_Index"),
        # plain containers
        builtins.slice,
        builtins.dict,
        builtins.list,
        builtins.tuple,
        builtins.bytes,
        builtins.frozenset,
    ]
    # numpy >= 1.25 pickles some dtypes through their classes (np.dtypes.Float64DType, ...)
    dtypes = getattr(np, "dtypes", None)
    if dtypes is not None:
        allowed += [
            getattr(dtypes, name)
            for name in dir(dtypes)
            if name.endswith("DType") and name[0].isupper()
        ]
    return allowed


def _qualified_names(allowed: list[Any]) -> set[str]:
    names = set()
    for entry in allowed:
        if isinstance(entry, tuple):
            names.add(entry[1])
        else:
            names.add(f"{entry.__module__}.{entry.__qualname__}")
    return names


def safe_torch_load(path: str | os.PathLike, *, map_location: Any = None) -> Any:
    """``torch.load`` with ``weights_only=True`` and the allow-list of saved models.

    Raises
    ------
    UnsafeModelFileError
        The file names a type or function outside the allow-list; nothing was built.
    """
    path = Path(path)
    allowed = _allowed_globals()
    try:
        with torch.serialization.safe_globals(allowed):
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        try:
            found = set(torch.serialization.get_unsafe_globals_in_checkpoint(path))
        except Exception:  # noqa: BLE001 - only for the message
            found = set()
        unexpected = sorted(found - _qualified_names(allowed)) or [str(err).splitlines()[0]]
        msg = (
            f"Refusing to load {str(path)!r}: it holds {', '.join(unexpected[:5])}, which a saved "
            "mcvi-ops model never holds, and unpickling it could run arbitrary code. Load model "
            "files only from sources you trust. If you saved this file yourself (e.g. a model "
            "built with custom encoder or decoder networks), pass `weights_only=False`."
        )
        raise UnsafeModelFileError(msg) from None


def load_saved_files(
    dir_path: str | os.PathLike,
    *,
    prefix: str | None = None,
    map_location: Any = None,
    weights_only: bool = True,
) -> tuple[dict, Any, dict]:
    """The attribute dict, var names and module state dict of a saved model.

    Parameters
    ----------
    dir_path
        Folder the model was saved to.
    prefix
        File-name prefix the model was saved with.
    map_location
        Passed to :func:`torch.load`.
    weights_only
        Refuse files holding anything but the allow-listed types (`False`: trust the file).
    """
    prefix = check_prefix(prefix, dir_path)
    path = Path(dir_path) / f"{prefix}{SAVE_KEYS.MODEL_FNAME}"
    if not path.is_file():
        found = (
            sorted(p.name for p in Path(dir_path).glob("*.pt")) if Path(dir_path).is_dir() else []
        )
        msg = (
            f"No saved model at {str(path)!r}"
            + (f" (the folder holds {found}; pass the matching `prefix=`)" if found else "")
            + ". Pass the folder given to `model.save`."
        )
        raise FileNotFoundError(msg)
    if weights_only:
        saved = safe_torch_load(path, map_location=map_location)
    else:
        saved = torch.load(path, map_location=map_location, weights_only=False)
    if not isinstance(saved, dict) or SAVE_KEYS.ATTR_DICT_KEY not in saved:
        msg = (
            f"{str(path)!r} is not a model saved by `model.save` (no {SAVE_KEYS.ATTR_DICT_KEY!r})."
        )
        raise ValueError(msg)
    return (
        saved[SAVE_KEYS.ATTR_DICT_KEY],
        saved.get(SAVE_KEYS.VAR_NAMES_KEY),
        saved[SAVE_KEYS.MODEL_STATE_DICT_KEY],
    )


def load_registry(
    dir_path: str | os.PathLike, *, prefix: str | None = None, weights_only: bool = True
) -> dict:
    """The registry (set-up arguments and field states) saved with a model."""
    attr_dict = load_saved_files(dir_path, prefix=prefix, weights_only=weights_only)[0]
    return attr_dict["registry_"]
