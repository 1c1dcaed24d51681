"""Read a folder of per-cell crop files listed in an index table (one row per cell)."""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import pandas as pd
from anndata import AnnData

from mcvi_ops.data._files import contained_path
from mcvi_ops.data._images import ChannelAxis, stem
from mcvi_ops.data._tables import read_cells

from ._from_crops import crops_from_files

logger = logging.getLogger(__name__)


def read_crop_folder(
    index: str | os.PathLike | pd.DataFrame,
    out: str | os.PathLike,
    *,
    channel_names: Sequence[str],
    path_key: str = "path",
    root: str | os.PathLike | None = None,
    channel_axis: ChannelAxis = "first",
    resize_to: int | None = None,
    dtype: Any = None,
    chunk_cells: int | None = None,
    pixel_size: float | None = None,
    on_error: Literal["raise", "skip"] = "raise",
    nonfinite: Literal["raise", "zero"] = "raise",
    overwrite: bool = False,
    progress: bool = True,
) -> AnnData:
    """Store per-cell crop files listed in an index table as a crop store with an AnnData.

    .. long function: documentation and signature; the body is under 80 lines.

    The index is a table with one row per cell: a column of crop file paths (TIFF or ``.npy``,
    one multichannel crop each) and any annotations (guide, gene, plate, well, ...), which
    become ``.obs``. Files are streamed with :func:`~mcvi_ops.io.crops_from_files`.

    Parameters
    ----------
    index
        The index table: a ``.parquet``, ``.csv`` or ``.tsv`` file, or a DataFrame. Relative
        paths in it must stay inside ``root`` (``..`` may not lead out of it); absolute paths
        are read as given.
    out
        Output folder; receives ``crops.zarr`` and ``cells.h5ad``.
    channel_names
        One name per channel of the crop files.
    path_key
        Column of ``index`` holding each cell's crop file.
    root
        Folder that relative paths are relative to. Default: the folder of the index file (the
        current directory for a DataFrame).
    channel_axis
        Channel axis of each file's image: ``"first"`` (C, Y, X) or ``"last"`` (Y, X, C).
    resize_to
        Resize every crop to ``resize_to`` x ``resize_to`` pixels; needed when sizes differ.
    dtype
        ``uint8``, ``uint16`` or ``float32``; `None` keeps the first file's type when possible.
    chunk_cells
        Cells per chunk of the store.
    pixel_size
        Pixel size in micrometres.
    on_error
        A crop file that cannot be read (corrupt or truncated): ``"raise"`` stops with an error
        naming it; ``"skip"`` logs it and leaves its cell out (listed in
        ``uns["import_crops"]["skipped_files"]``).
    nonfinite
        NaN/inf pixels: ``"raise"`` (an error naming the cells) or ``"zero"`` (set to 0 and
        counted in ``uns["import_crops"]`` and the store attribute ``nonfinite``).
    overwrite
        Replace an existing ``crops.zarr`` / ``cells.h5ad`` in ``out``.
    progress
        Show a progress bar.

    Returns
    -------
    AnnData with one row per index row, in index order, written to ``out/cells.h5ad``:
    ``.obs`` holds the index columns, ``obs["source_file"]`` (the resolved path) and
    ``obs["crop_index"]``; ``.obs_names`` are the index's own row names, or the file names
    without suffix when the index has a plain 0..n-1 row numbering and those are unique.
    ``.uns["crops"]`` links the store and ``.uns["import_crops"]`` records the import.

    Examples
    --------
    >>> import mcvi_ops
    >>> adata = mcvi_ops.io.read_crop_folder(  # doctest: +SKIP
    ...     "crops/index.parquet", "store/", channel_names=["DNA", "actin"], path_key="file"
    ... )
    """
    if isinstance(index, pd.DataFrame):
        table, where, base = index.copy(), "the index DataFrame", Path.cwd()
    elif isinstance(index, str | os.PathLike):
        table, where, base = read_cells(index), f"index {os.fspath(index)!r}", Path(index).parent
    else:
        msg = f"`index` must be a path to a parquet/CSV table or a DataFrame, got {type(index)}."
        raise TypeError(msg)
    base = Path(root) if root is not None else base
    if path_key not in table:
        msg = (
            f"Column {path_key!r} (`path_key=`) is not in {where}; columns: {list(table.columns)}."
            " Pass path_key= naming the column of crop file paths."
        )
        raise KeyError(msg)
    if not len(table):
        msg = f"{where} has no rows; it must list one crop file per cell."
        raise ValueError(msg)
    empty = table[path_key].isna().to_numpy()
    if empty.any():
        rows = table.index[empty][:5].tolist()
        msg = (
            f"{empty.sum()} rows of {where} have no path in column {path_key!r}, e.g. rows "
            f"{rows}. Fill them in or drop those rows."
        )
        raise ValueError(msg)
    paths = [
        Path(p)
        if Path(p).is_absolute()
        else contained_path(
            base,
            p,
            what=f"The relative crop path {p!r} of {where}",
            fix="Relative paths must stay inside `root` (no '..' leading out of it); give the "
            "file's absolute path, or pass root= naming a folder that holds it.",
        )
        for p in table[path_key].astype(str)
    ]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        msg = (
            f"{len(missing)} of {len(paths)} crop files listed in {where} do not exist, e.g. "
            f"{missing[:3]} (relative paths are read from {str(base)!r}). Fix the paths or pass "
            "root= naming the folder they are relative to."
        )
        raise FileNotFoundError(msg)
    if isinstance(table.index, pd.RangeIndex) and table.index.equals(pd.RangeIndex(len(table))):
        stems = pd.Index([stem(p) for p in paths])
        if stems.is_unique:
            table.index = stems
    table.index = table.index.astype(str)
    if not table.index.is_unique:
        logger.warning("The index's row names are not unique; using row numbers as obs_names.")
        table.index = pd.Index([str(i) for i in range(len(table))])
    table["source_file"] = [str(p.resolve()) for p in paths]
    adata = crops_from_files(
        [str(p) for p in paths],
        out,
        channel_names=channel_names,
        obs=table,
        channel_axis=channel_axis,
        resize_to=resize_to,
        dtype=dtype,
        chunk_cells=chunk_cells,
        pixel_size=pixel_size,
        on_error=on_error,
        nonfinite=nonfinite,
        overwrite=overwrite,
        progress=progress,
    )
    return adata
