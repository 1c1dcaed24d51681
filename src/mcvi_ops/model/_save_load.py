"""Reading saved models without running code from the model folder.

scvi-tools loads ``model.pt`` with ``torch.load(weights_only=False)``, which unpickles anything: a
crafted file runs arbitrary code. Here the file is loaded with ``weights_only=True`` and an
explicit allow-list of the types a saved image model holds (tensors, numpy arrays and dtypes,
and the pandas frames of the training history); anything else is refused before it is built.
"""

from __future__ import annotations

import contextvars
import logging
import os
import pickle
import shutil
import uuid
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mcvi_ops._compat import SAVE_KEYS, SETUP_ARGS_KEY
from mcvi_ops.data._files import PARTIAL

logger = logging.getLogger(__name__)


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
    if path.is_file() and path.stat().st_size == 0:
        msg = (
            f"{str(path)!r} is empty (0 bytes): the save that wrote it was interrupted or the "
            "file was truncated. Save the model again from the trained model, or restore the file."
        )
        raise ValueError(msg)
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
    except (EOFError, zipfile.BadZipFile, RuntimeError, OSError) as err:
        if isinstance(err, FileNotFoundError | PermissionError) or (
            isinstance(err, RuntimeError) and "zip" not in str(err).lower()
        ):
            raise
        msg = (
            f"{str(path)!r} cannot be read ({type(err).__name__}: {err or 'unexpected end'}): it "
            "is truncated or corrupt (e.g. an interrupted copy or save). Save the model again "
            "from the trained model, or restore the file."
        )
        raise ValueError(msg) from err


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


# --- writing a model folder ------------------------------------------------------------------
def save_atomically(
    dir_path: str | os.PathLike, write: Callable[[str], None], *, overwrite: bool
) -> None:
    """Run ``write(folder)`` on a temporary folder, then move its files into ``dir_path``.

    Each file replaces its namesake with one rename (the model file last), so a save that fails
    part way (disk full, Ctrl-C) leaves the model saved there before loadable, and other files of
    the folder (other prefixes) untouched.
    """
    dir_path = Path(dir_path)
    if dir_path.exists() and not dir_path.is_dir():
        msg = (
            f"Cannot save a model to {str(dir_path)!r}: it is a file. Pass a folder as `dir_path`."
        )
        raise NotADirectoryError(msg)
    if dir_path.is_dir() and not overwrite:
        msg = (
            f"{str(dir_path)!r} already exists. Pass `overwrite=True` to replace the model saved "
            "there, or another `dir_path`."
        )
        raise ValueError(msg)
    created = not dir_path.exists()
    dir_path.mkdir(parents=True, exist_ok=True)
    tmp = dir_path / f".save{PARTIAL}{uuid.uuid4().hex[:12]}"
    done = False
    try:
        write(str(tmp))
        names = sorted(p.name for p in tmp.iterdir())
        for name in sorted(names, key=lambda n: n.endswith(SAVE_KEYS.MODEL_FNAME)):
            os.replace(tmp / name, dir_path / name)
        done = True
    except OSError as err:
        kept = "" if created else " The model saved there before is unchanged."
        msg = (
            f"Could not save the model to {str(dir_path)!r}: {err.strerror or err}"
            f"{f' ({err.filename})' if err.filename else ''}.{kept} Free disk space or choose "
            "another `dir_path`, then save again."
        )
        raise OSError(err.errno, msg) from err
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if created and not done:
            shutil.rmtree(dir_path, ignore_errors=True)


# --- rebuilding a model from its folder ------------------------------------------------------
#: set while `load` builds a model: the input transform's statistics come from the saved file
LOADING: contextvars.ContextVar[bool] = contextvars.ContextVar("mcvi_ops_loading", default=False)


def check_registry(registry: Any, path: Path, *, image_key: str) -> dict:
    """The saved registry, refusing one written by a version that lacks what loading needs."""
    needed = (SETUP_ARGS_KEY, "field_registries")
    lacking = [k for k in needed if not isinstance(registry, dict) or k not in registry]
    if not lacking and image_key not in registry["field_registries"]:
        lacking = [f"field_registries[{image_key!r}]"]
    if lacking:
        version = registry.get("scvi_version", "?") if isinstance(registry, dict) else "?"
        msg = (
            f"{str(path)!r} was saved by another version of mcvi-ops (scvi-tools {version}): its "
            f"registry lacks {lacking}, so this version cannot rebuild the model. Load it with "
            "the version that saved it and save it again, or train a new model."
        )
        raise ValueError(msg)
    return registry


def initialize(cls, adata, registry: dict, attr_dict: dict, path: Path):
    """Build the model from its saved init parameters, naming those this version refuses.

    As scvi-tools' ``_initialize_model``, except that an AnnData without rows is kept (it is
    falsy, and scvi-tools would build the model without data).
    """
    init_params = attr_dict.pop("init_params_", None)
    if not isinstance(init_params, dict) or "non_kwargs" not in init_params:
        msg = (
            f"{str(path)!r} holds no init parameters in the format of this version (a model "
            "saved by another version of mcvi-ops). Load it with the version that saved it, or "
            "train a new model."
        )
        raise ValueError(msg)
    non_kwargs = dict(init_params["non_kwargs"])
    kwargs = {k: v for group in init_params["kwargs"].values() for k, v in group.items()}
    token = LOADING.set(True)
    try:
        model = cls(adata, **non_kwargs, **kwargs)
    except TypeError as err:
        saved = {**non_kwargs, **kwargs}
        msg = (
            f"{str(path)!r} holds a {cls.__name__} saved with parameters {sorted(saved)} that this "
            f"version of mcvi-ops does not take ({err}); it was saved by another version. Load it "
            "with the version that saved it, or train a new model."
        )
        raise TypeError(msg) from err
    finally:
        LOADING.reset(token)
    for name, value in attr_dict.items():
        setattr(model, name, value)
    return model


def match_state_dict(model, state_dict: dict, registry: dict, adata, path: Path) -> dict:
    """``state_dict`` checked against the rebuilt module; a missing ``dark_level`` is filled in.

    Models saved before intensity factors existed lack the ``dark_level`` buffer: it is taken
    from the set-up's intensity factors, or left at its default (0) without them.
    """
    expected = model.module.state_dict()
    state_dict = dict(state_dict)
    if "dark_level" in expected and "dark_level" not in state_dict:
        key = registry.get("setup_args", {}).get("intensity_factor_key")
        info = adata.uns.get(key) if key is not None else None
        dark = expected["dark_level"].clone()
        if isinstance(info, dict) and "dark_level" in info:
            dark = torch.as_tensor(np.asarray(info["dark_level"], dtype=np.float32)).view_as(dark)
        state_dict["dark_level"] = dark
        logger.info(
            "%s has no dark level (saved by an older version); using %s.", path, dark.view(-1)
        )
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    shapes = [
        f"{k} (saved {tuple(state_dict[k].shape)}, expected {tuple(expected[k].shape)})"
        for k in expected
        if k in state_dict and tuple(state_dict[k].shape) != tuple(expected[k].shape)
    ]
    if missing or unexpected or shapes:
        problems = []
        if shapes:
            problems.append(f"weights of other shapes: {', '.join(shapes[:3])}")
        if missing:
            problems.append(f"missing weights {missing[:5]}")
        if unexpected:
            problems.append(f"unknown weights {unexpected[:5]}")
        msg = (
            f"The weights in {str(path)!r} do not fit the {type(model).__name__} rebuilt from its "
            f"saved set-up ({'; '.join(problems)}): the file was changed, or written by another "
            "version or another model. Save the trained model again, or load the folder with the "
            "version that saved it."
        )
        raise ValueError(msg)
    return state_dict
