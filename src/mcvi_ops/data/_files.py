"""Safe file handling shared by the readers, the models and the command line.

- :func:`atomic_path` writes a file (or folder) under a temporary name beside its target and
  renames it into place only once it is complete, so a failure part way (disk full, Ctrl-C, a
  crash) leaves the previous version in place. The rename replaces a symbolic link at the target
  itself: a write never follows a link out of its folder.
- :func:`contained_path` and :func:`check_path_value` keep paths built from data (cell tables,
  registries, readers' metadata) inside their root folder.
- :func:`check_writable_folder` finds an output folder that cannot be written before any work
  is done.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

#: infix of the temporary names of files being written (``.STEM.partial-<hex>.SUFFIX``)
PARTIAL = ".partial-"


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, *, folder: bool = False) -> Iterator[Path]:
    """A temporary path beside ``path`` that replaces ``path`` once the block ends without error.

    Parameters
    ----------
    path
        The file (or, with ``folder=True``, folder) to write.
    folder
        The block writes a folder: the temporary folder is created, and an existing folder at
        ``path`` is replaced as a whole (moved aside, then deleted once the new one is in place).

    Yields
    ------
    The temporary path to write to, in the same folder as ``path`` (so the final rename is
    atomic) and with the same suffix. If the block raises, the temporary path is deleted and
    ``path`` is left as it was.

    Examples
    --------
    >>> from mcvi_ops.data._files import atomic_path
    >>> with atomic_path("report.md") as tmp:
    ...     _ = tmp.write_text("# done")
    >>> open("report.md").read()
    '# done'
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # the suffix stays last: writers that choose the format by it (anndata, matplotlib) work
    tmp = path.with_name(f".{path.stem}{PARTIAL}{uuid.uuid4().hex[:12]}{path.suffix}")
    if folder:
        tmp.mkdir()
    try:
        yield tmp
        if folder and path.is_dir() and not path.is_symlink():
            aside = path.with_name(f".{path.name}.replaced-{uuid.uuid4().hex[:12]}")
            os.replace(path, aside)
            try:
                os.replace(tmp, path)
            except BaseException:
                os.replace(aside, path)  # put the previous version back
                raise
            shutil.rmtree(aside, ignore_errors=True)
        else:
            if folder and path.is_symlink():
                path.unlink()  # a folder cannot be renamed onto a link; replace the link itself
            os.replace(tmp, path)
    except BaseException:
        _remove(tmp)
        raise


def write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` to ``path`` atomically (see :func:`atomic_path`)."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def check_path_value(value: Any, *, what: str, fix: str) -> str:
    """``value`` as a string that is safe inside a file path: no separator, ``..`` or NUL.

    ``what`` names the value in the error ("well 'A1' of the cell table"), ``fix`` says how to
    fix it.
    """
    text = str(value)
    separators = {"/", "\\", os.sep, *([os.altsep] if os.altsep else [])}
    if not text or text in (".", "..") or "\0" in text or any(s in text for s in separators):
        msg = (
            f"{what} is {text!r}, which cannot be part of a file name: it is empty, '.' or '..', "
            f"or holds a path separator, so the path built from it could leave its folder. {fix}"
        )
        raise ValueError(msg)
    return text


def contained_path(
    root: str | os.PathLike, path: str | os.PathLike, *, what: str, fix: str
) -> Path:
    """``path`` (relative to ``root`` unless absolute), refused if it leads outside ``root``.

    The check is on the normalised path (``..`` resolved), so a value from a table cannot climb
    out of its folder; symbolic links that the user put inside ``root`` are followed as usual.
    """
    base = os.path.normpath(os.path.abspath(os.fspath(root)))
    target = os.path.normpath(os.path.join(base, os.fspath(path)))
    if os.path.commonpath([base, target]) != base:
        msg = f"{what} leads to {target!r}, outside its folder {base!r}. {fix}"
        raise ValueError(msg)
    return Path(target)


def check_writable_folder(folder: str | os.PathLike, *, what: str, fix: str) -> Path:
    """Create ``folder`` if needed and check that files can be written into it.

    Raises
    ------
    NotADirectoryError
        ``folder`` (or a folder above it) is a file.
    PermissionError
        Files cannot be created in ``folder``.
    """
    folder = Path(folder)
    for parent in (folder, *folder.parents):
        if parent.exists() and not parent.is_dir():
            msg = f"{what} {str(folder)!r} cannot be a folder: {str(parent)!r} is a file. {fix}"
            raise NotADirectoryError(msg)
        if parent.exists():
            break
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".write-test{PARTIAL}{uuid.uuid4().hex[:12]}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as err:
        msg = f"{what} {str(folder)!r} cannot be written ({err.strerror or err}). {fix}"
        raise PermissionError(msg) from err
    return folder
