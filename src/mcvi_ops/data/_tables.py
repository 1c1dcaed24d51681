"""Per-cell tables: readers and column-naming presets (Funk et al. 2022, CellProfiler)."""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import pandas as pd

logger = logging.getLogger(__name__)

Preset = Literal["auto", "funk", "cellprofiler"]

# Each entry lists candidate column names in order of preference.
_PRESETS: dict[str, dict[str, tuple]] = {
    "funk": {
        # tile key: every column of the first candidate group that is present
        "tile_key": (("plate", "well", "tile"),),
        "y_key": ("cell_i", "i"),
        "x_key": ("cell_j", "j"),
    },
    "cellprofiler": {
        "tile_key": (("ImageNumber",), ("Metadata_ImageNumber",)),
        "y_key": (
            "Nuclei_Location_Center_Y",
            "Metadata_Nuclei_Location_Center_Y",
            "Cells_Location_Center_Y",
            "Location_Center_Y",
        ),
        "x_key": (
            "Nuclei_Location_Center_X",
            "Metadata_Nuclei_Location_Center_X",
            "Cells_Location_Center_X",
            "Location_Center_X",
        ),
    },
}


@dataclass(frozen=True)
class CellColumns:
    """Resolved names of the tile-key and centroid columns of a cell table."""

    tile_key: tuple[str, ...]
    y_key: str
    x_key: str
    preset: str | None


def read_cells(path: str | os.PathLike, **kwargs) -> pd.DataFrame:
    """Read a per-cell table from CSV, TSV or parquet.

    Parameters
    ----------
    path
        A ``.csv``, ``.csv.gz``, ``.tsv``, ``.txt`` or ``.parquet``/``.pq`` file.
    **kwargs
        Passed to :func:`pandas.read_csv` or :func:`pandas.read_parquet`.

    Returns
    -------
    The table, one row per cell, in file order. A warning names duplicate ids in its index
    (e.g. from ``index_col=``); the functions that store crops make them unique.

    Examples
    --------
    >>> import mcvi_ops.io
    >>> cells = mcvi_ops.io.read_cells("cells.csv")  # doctest: +SKIP
    """
    path = Path(path)
    if not path.exists():
        msg = f"Cell table {str(path)!r} does not exist. Check the path."
        raise FileNotFoundError(msg)
    suffixes = [s.lower() for s in path.suffixes]
    if suffixes and suffixes[-1] in (".gz", ".bz2", ".zip", ".xz") and len(suffixes) > 1:
        suffixes = suffixes[:-1]
    kind = suffixes[-1] if suffixes else ""
    if kind not in (".parquet", ".pq", ".csv", ".tsv", ".txt", ".tab"):
        msg = (
            f"Cannot read a cell table from {str(path)!r}: expected a .csv, .tsv or .parquet "
            "file. Read it yourself with pandas and pass the DataFrame instead."
        )
        raise ValueError(msg)
    try:
        if kind in (".parquet", ".pq"):
            table = pd.read_parquet(path, **kwargs)
        elif kind == ".csv":
            table = pd.read_csv(path, **kwargs)
        else:
            table = pd.read_csv(path, sep="\t", **kwargs)
    except TypeError:
        raise  # a wrong keyword argument: the caller's mistake, named by pandas
    except (OSError, ValueError, EOFError) as err:
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        msg = (
            f"Cannot read the cell table {str(path)!r} ({type(err).__name__}: {first}). It may be "
            f"truncated or corrupt (e.g. an interrupted copy) or not a {kind.lstrip('.')} file; "
            "replace it, or leave it out."
        )
        raise ValueError(msg) from err
    if not table.index.is_unique:
        duplicated = table.index[table.index.duplicated()].unique()
        warnings.warn(
            f"The cell table {str(path)!r} has {len(duplicated)} duplicate ids in its index, e.g. "
            f"{[str(d) for d in duplicated[:5]]}; crops stored from it get unique ids with a "
            "suffix ('-1', '-2', ...). Pass a unique id column as index_col to avoid this.",
            UserWarning,
            stacklevel=2,
        )
    return table


def unique_cell_ids(index: pd.Index | Sequence, *, what: str = "The cell table") -> pd.Index:
    """Cell ids as unique strings; duplicates are kept, suffixed ``-1``, ``-2``, ... with a warning."""
    ids = pd.Index([str(i) for i in index])
    if ids.is_unique:
        return ids
    from anndata.utils import make_index_unique

    duplicated = ids[ids.duplicated()].unique()
    warnings.warn(
        f"{what} has {len(duplicated)} duplicate cell ids, e.g. {list(duplicated[:5])}; they are "
        "kept and made unique by appending '-1', '-2', ... (as AnnData does). Give each cell a "
        "unique id (e.g. plate_well_tile_cell) to avoid this.",
        UserWarning,
        stacklevel=3,
    )
    return make_index_unique(ids)


def as_cell_table(cells: pd.DataFrame | str | os.PathLike) -> pd.DataFrame:
    """Return ``cells`` as a DataFrame, reading it with :func:`read_cells` if it is a path."""
    if isinstance(cells, pd.DataFrame):
        return cells
    if isinstance(cells, str | os.PathLike):
        return read_cells(cells)
    msg = (
        f"`cells` must be a pandas DataFrame or a path to a CSV/parquet file, got "
        f"{type(cells).__name__}."
    )
    raise TypeError(msg)


def _detect_preset(columns: pd.Index) -> str | None:
    for name, spec in _PRESETS.items():
        if any(c in columns for c in spec["y_key"]) and any(c in columns for c in spec["x_key"]):
            return name
    return None


def resolve_columns(
    table: pd.DataFrame,
    *,
    preset: Preset | None,
    tile_key: str | Sequence[str] | None,
    y_key: str | None,
    x_key: str | None,
    need_tile_key: bool,
) -> CellColumns:
    """Work out the tile-key and centroid columns from a preset and explicit overrides.

    Explicit ``tile_key``, ``y_key`` and ``x_key`` win over the preset. With ``preset="auto"``
    the naming is detected from the columns.
    """
    columns = table.columns
    if preset == "auto":
        preset = _detect_preset(columns) if (y_key is None or x_key is None) else None
        if preset is not None:
            logger.info("Detected %r column naming in the cell table.", preset)
    elif preset is not None and preset not in _PRESETS:
        msg = f"Unknown preset {preset!r}; expected one of {[*_PRESETS, 'auto', None]}."
        raise ValueError(msg)
    spec = _PRESETS.get(preset, {}) if preset is not None else {}

    def pick(explicit: str | None, role: str, arg: str) -> str:
        if explicit is not None:
            if explicit not in columns:
                msg = (
                    f"Centroid column {explicit!r} (`{arg}=`) is not in the cell table. Columns: "
                    f"{list(columns)}. Pass the name of the column holding the centroid {role}."
                )
                raise KeyError(msg)
            return explicit
        for candidate in spec.get(arg, ()):
            if candidate in columns:
                return candidate
        expected = list(spec.get(arg, ())) or ["<none: no preset>"]
        msg = (
            f"No centroid {role} column found in the cell table (preset={preset!r} looks for "
            f"{expected}). Columns: {list(columns)}. Pass `{arg}=` naming the column with each "
            f"cell's centroid {role} in tile pixels, or choose `preset='funk'` (cell_i/cell_j) "
            "or `preset='cellprofiler'` (Nuclei_Location_Center_Y/X)."
        )
        raise KeyError(msg)

    y_col = pick(y_key, "row (y)", "y_key")
    x_col = pick(x_key, "column (x)", "x_key")

    if tile_key is not None:
        keys = (tile_key,) if isinstance(tile_key, str) else tuple(tile_key)
        missing = [k for k in keys if k not in columns]
        if missing:
            msg = (
                f"Tile key column(s) {missing} (`tile_key=`) not in the cell table. Columns: "
                f"{list(columns)}. Pass the column(s) that identify each cell's tile."
            )
            raise KeyError(msg)
    else:
        keys = ()
        for group in spec.get("tile_key", ()):
            present = tuple(k for k in group if k in columns)
            if present:
                keys = present
                break
        if not keys and need_tile_key:
            msg = (
                "The cells come from several tiles but no tile key column was found "
                f"(preset={preset!r}). Columns: {list(columns)}. Pass `tile_key=` naming the "
                "column(s) identifying each cell's tile, e.g. `tile_key=['well', 'tile']`."
            )
            raise KeyError(msg)
    return CellColumns(tile_key=keys, y_key=y_col, x_key=x_col, preset=preset)
