"""From raw optical-pooled-screen tiles and a per-cell table to a crop store and an AnnData."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import pandas as pd
from anndata import AnnData

from mcvi_ops._constants import UNS
from mcvi_ops.data import link_crops, open_crops
from mcvi_ops.data._images import ChannelAxis, MissingTileError
from mcvi_ops.data._link import write_h5ad
from mcvi_ops.data._tables import Preset, as_cell_table, resolve_columns, unique_cell_ids

from ._parallel import DaskPool, LocalPool, run_parallel, run_serial
from ._resume import RunFolder, table_fingerprint
from ._tiles import (
    CropParams,
    TileResult,
    TileTask,
    checked_options,
    resolve_sources,
    source_fingerprint,
    tile_label,
)

logger = logging.getLogger(__name__)

UNS_KEY = UNS.extract
TileInput = (
    str | os.PathLike | np.ndarray | Sequence[Any] | Mapping[Any, Any] | Callable[[Any], Any]
)


@dataclass
class _CellsByTile:
    """The table's cells grouped by tile, tiles in sorted tile-key order."""

    keys: list[Any]
    labels: list[str]
    positions: list[np.ndarray]  # table row positions of each tile's cells
    y: np.ndarray  # centroid row of every table row (NaN where missing)
    x: np.ndarray
    n_nan: int  # cells dropped for a missing centroid


def _cells_by_tile(
    table: pd.DataFrame, cell_ids: pd.Index, key_cols: list[str], y_key: str, x_key: str
) -> _CellsByTile:
    """Group the cells with a centroid by tile; a cell without a tile key is an error."""
    y_all = pd.to_numeric(table[y_key], errors="coerce").to_numpy(np.float64)
    x_all = pd.to_numeric(table[x_key], errors="coerce").to_numpy(np.float64)
    if key_cols:
        no_key = table[key_cols].isna().any(axis=1).to_numpy()
        if no_key.any():
            msg = (
                f"{int(no_key.sum())} cells have no tile key (NaN in {key_cols}), e.g. rows "
                f"{list(cell_ids[no_key][:5])}. Fill in their tile, or drop them from the table."
            )
            raise ValueError(msg)
    valid = np.isfinite(y_all) & np.isfinite(x_all)
    n_nan = int((~valid).sum())
    if n_nan:
        logger.warning(
            "Dropping %d cells with a missing (NaN) centroid, e.g. rows %s.",
            n_nan,
            list(cell_ids[~valid][:5]),
        )
    valid_positions = np.flatnonzero(valid)
    if key_cols:
        tile_keys = _plain_values(table[key_cols].iloc[valid_positions])
        groups = tile_keys.groupby(key_cols, sort=True, observed=True).indices
        keys = [_plain_key(k) for k in groups]
        positions = [valid_positions[np.asarray(groups[k])] for k in groups]
    else:
        keys, positions = [None], [valid_positions]
    labels = [tile_label(key_cols, k) for k in keys]
    return _CellsByTile(keys, labels, positions, y_all, x_all, n_nan)


def _tile_sources(
    tiles: TileInput,
    cells: _CellsByTile,
    cell_ids: pd.Index,
    key_cols: list[str],
    *,
    raise_missing: bool,
) -> list[Any]:
    """The image (or where to find it) of each tile; tiles without one are an error if asked."""
    first_rows = [cell_ids[g[0]] if len(g) else None for g in cells.positions]
    sources, how = resolve_sources(tiles, key_cols, cells.keys, rows=first_rows)
    if raise_missing and how != "callable":
        missing = [lab for lab, src in zip(cells.labels, sources, strict=True) if src is None]
        if missing:
            msg = (
                f"No image found for {len(missing)} of {len(cells.keys)} tiles, e.g. "
                f"{missing[:5]} (tiles given as a {how}). Add the images, fix the tile path "
                "template or keys, or pass on_missing_tile='skip' to drop their cells."
            )
            raise MissingTileError(msg)
    return sources


def _n_workers(n_jobs: int) -> int:
    if n_jobs == 0:
        msg = "n_jobs must be a positive number of processes, or -1 for all cores; got 0."
        raise ValueError(msg)
    return max(1, (os.cpu_count() or 1) + 1 + n_jobs) if n_jobs < 0 else int(n_jobs)


def _keep_mask(y: np.ndarray, x: np.ndarray, shape: Sequence[int], margin: int) -> np.ndarray:
    rows, cols = np.floor(y + 0.5), np.floor(x + 0.5)
    height, width = shape
    return (
        (rows >= margin) & (cols >= margin) & (height - rows >= margin) & (width - cols >= margin)
    )


def extract_crops(
    tiles: TileInput,
    cells: pd.DataFrame | str | os.PathLike,
    out: str | os.PathLike,
    *,
    channel_names: Sequence[str],
    crop_size: int = 100,
    channel_axis: ChannelAxis = "first",
    align: bool = True,
    reference_channel: int | str = 0,
    upsample_factor: int = 10,
    clip_percentiles: tuple[float, float] | None = (0.1, 99.9),
    edge_margin: int | None = None,
    resize_to: int | None = None,
    preset: Preset | None = "auto",
    tile_key: str | Sequence[str] | None = None,
    y_key: str | None = None,
    x_key: str | None = None,
    on_missing_tile: Literal["raise", "skip"] = "raise",
    on_error: Literal["raise", "skip"] = "raise",
    nonfinite: Literal["raise", "zero"] = "raise",
    dtype: Literal["uint16", "float32"] | np.dtype = "uint16",
    chunk_cells: int | None = None,
    pixel_size: float | None = None,
    n_jobs: int = 1,
    client: Any = None,
    start_method: Literal["fork", "spawn", "forkserver"] | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> AnnData:
    """Cut single-cell crops out of multichannel tiles into a crop store, with one AnnData row per crop.

    .. long function: documentation and signature; the body is under 80 lines.

    Each tile is loaded once, its channels are aligned to a reference channel (optional), each
    channel is clipped to its own ``clip_percentiles``, and a ``crop_size`` square is cut around
    every cell's rounded centroid, optionally resized with anti-aliasing. Cells closer than
    ``edge_margin`` pixels to a tile edge are dropped. This follows the preprocessing of the
    Multi-Contrastive VAE paper (100 px crops, 50 px edge margin, 0.1% clipping).

    Output goes to the folder ``out``: ``crops.zarr`` (a :class:`~mcvi_ops.data.CropStore`),
    ``cells.h5ad`` (the returned AnnData) and ``extract_log.jsonl`` (the run log). Tiles are
    processed in sorted tile-key order (categorical key columns sort by value, as plain ones do)
    and cells in table order within a tile. Each finished tile is committed to the log, so
    rerunning the same call after a crash skips the finished tiles and ends with the same store
    and AnnData as an uninterrupted run; a tile image that changed since it was cropped (file
    size or modification time, or the content of an array) is cropped again, with every later
    tile. The store is locked while the run writes it, so a second run on the same folder stops
    with an error instead of deleting it.

    With ``n_jobs > 1`` or a Dask ``client``, workers crop tiles and also compress and write the
    store's chunks, so the main process does no pixel work; the store is byte-for-byte the one a
    single process writes (apart from its random ``store_id``).

    Parameters
    ----------
    tiles
        The tile images, each channel-first or channel-last as ``channel_axis`` says. One of

        - a path to one TIFF/OME-TIFF (or ``.npy``) file, or one array, when all cells share a tile;
        - a path template whose braces name tile key columns, e.g.
          ``"images/{plate}/{well}/Tile-{tile}.tif"`` (format specs like ``{tile:04d}`` work);
        - a folder of TIFF/``.npy`` files named after the tile key values joined by ``_``
          (``A1_12.tif`` for ``tile_key=['well', 'tile']``), or holding a single image;
        - a mapping from tile key to image array or path (the key is the value of the single
          tile key column, or a tuple of values for several columns);
        - a callable taking such a key and returning an image array or path; raising
          :class:`KeyError` or :class:`FileNotFoundError` (or returning `None`) marks the tile
          missing. With ``n_jobs > 1`` it must be picklable (a module-level function);
        - a list of images or paths, one per tile in sorted tile-key order.
    cells
        Per-cell table (DataFrame) or a path to a CSV/TSV/parquet file (see
        :func:`~mcvi_ops.io.read_cells`) with tile key and centroid columns, in tile pixels.
    out
        Output folder; created if needed.
    channel_names
        One name per image channel, in channel order.
    crop_size
        Side of the square crop cut from the tile, in pixels.
    channel_axis
        Where the channels are in each tile: ``"first"`` (C, Y, X), ``"last"`` (Y, X, C) or an
        integer axis.
    align
        Align every channel to ``reference_channel`` by phase cross-correlation (sub-pixel) with
        :func:`~mcvi_ops.pp.align_channels`. The shifts are recorded in ``.uns``.
    reference_channel
        Index or name of the channel the others are aligned to.
    upsample_factor
        Sub-pixel precision of the alignment (10 gives 0.1 px).
    clip_percentiles
        ``(low, high)`` percentiles; each channel of each tile is clipped to them before cropping.
        `None` disables clipping.
    edge_margin
        Cells whose rounded centroid is closer than this to a tile edge are dropped. Defaults to
        half the crop size, so every crop lies fully inside its tile; smaller margins zero-pad
        the crops that stick out.
    resize_to
        Resize each crop to ``resize_to`` x ``resize_to`` pixels with anti-aliasing
        (e.g. 100 -> 64). `None` keeps ``crop_size``.
    preset
        Column naming of ``cells``. ``"funk"``: ``plate, well, tile`` (those present) and
        ``cell_i`` / ``cell_j`` (or ``i`` / ``j``) for centroid row / column. ``"cellprofiler"``:
        ``ImageNumber`` (or ``Metadata_ImageNumber``) and ``Nuclei_Location_Center_Y`` / ``_X``.
        ``"auto"`` detects either; `None` uses only the explicit arguments below.
    tile_key
        Column(s) identifying each cell's tile; overrides the preset. Not needed when all cells
        come from one image.
    y_key, x_key
        Columns holding each cell's centroid row (y) and column (x); override the preset.
    on_missing_tile
        ``"raise"`` stops with an error naming the tiles without an image; ``"skip"`` drops their
        cells and counts them in ``n_dropped_missing_tile``.
    on_error
        A tile image file that exists but cannot be read (corrupt or truncated): ``"raise"``
        stops with an error naming the file; ``"skip"`` logs it, drops its cells and counts them
        in ``n_dropped_unreadable_tile``.
    nonfinite
        NaN or infinite pixels in a (float) tile: ``"raise"`` stops with an error naming the
        tile and the cells whose crops hold them; ``"zero"`` sets them to 0 before alignment and
        clipping (where they would spread) and counts them in ``n_nonfinite_values`` /
        ``n_nonfinite_cells`` and the store attribute ``nonfinite``.
    dtype
        Pixel type of the crops: ``"uint16"`` (tiles must hold integers) or ``"float32"``.
    chunk_cells
        Cells per chunk of the crop store; by default about 4 MB per chunk.
    pixel_size
        Pixel size in micrometres (of the crops, after any resize), stored with the crops.
    n_jobs
        Number of worker processes, each holding one tile at a time; -1 uses every core.
    client
        A :class:`distributed.Client`: crop tiles and write chunks on its workers instead of
        local processes (``n_jobs`` must then stay 1). The workers must see ``out`` and the tile
        images at the same paths (a shared file system), and tile loaders must be picklable.
    start_method
        Multiprocessing start method for ``n_jobs > 1``: ``"fork"`` on Linux by default (fast),
        ``"spawn"`` elsewhere.
    overwrite
        Replace earlier results in ``out`` instead of resuming them.
    progress
        Show a progress bar over tiles.

    Returns
    -------
    AnnData with one row per kept cell, in crop order, written to ``out/cells.h5ad``:

    ``.obs``
        The cell table's columns for the kept cells, indexed by the table's index as strings,
        plus ``obs["crop_index"]``, the cell's row in the crop store.
    ``.uns["crops"]``
        The link to ``out/crops.zarr`` (see :func:`~mcvi_ops.data.link_crops`).
    ``.uns["extract_crops"]``
        The parameters, resolved columns, counts ``n_cells_in``, ``n_dropped_nan`` (NaN
        centroid), ``n_dropped_missing_tile``, ``n_dropped_unreadable_tile``,
        ``n_dropped_edge``, ``n_kept``, ``n_nonfinite_values``, ``n_nonfinite_cells``, and per
        tile ``tile_labels``, ``tile_shapes``, the applied channel ``shifts`` (rows, columns)
        and ``unreadable_tiles`` (label and error of each skipped tile).

    Cell ids (the obs names) are the table's index as strings; duplicate ids are kept and made
    unique with a suffix (``-1``, ``-2``) and a warning. A NaN tile key is an error naming the
    rows; a tile path template filled with a value that leaves the template's folder (``..``
    or an absolute path) is an error naming the row.

    Examples
    --------
    >>> import mcvi_ops
    >>> adata = mcvi_ops.pp.extract_crops(  # doctest: +SKIP
    ...     "tiles/{well}_Tile-{tile}.tif",
    ...     "cells.csv",
    ...     "crops/",
    ...     channel_names=["DAPI", "tubulin", "gH2AX", "phalloidin"],
    ...     preset="funk",
    ...     resize_to=64,
    ...     n_jobs=4,
    ... )
    >>> mcvi_ops.data.get_crops(adata, [0, 1]).shape  # doctest: +SKIP
    (2, 4, 64, 64)
    """
    options = checked_options(
        crop_size=crop_size,
        resize_to=resize_to,
        edge_margin=edge_margin,
        channel_names=channel_names,
        channel_axis=channel_axis,
        reference_channel=reference_channel,
        dtype=dtype,
        clip_percentiles=clip_percentiles,
        choices={
            "on_missing_tile": (on_missing_tile, ("raise", "skip")),
            "on_error": (on_error, ("raise", "skip")),
            "nonfinite": (nonfinite, ("raise", "zero")),
        },
    )
    if client is not None and n_jobs != 1:
        msg = (
            f"Pass either n_jobs (local processes) or client (a Dask cluster), got n_jobs={n_jobs}."
        )
        raise ValueError(msg)
    workers = _n_workers(n_jobs)
    table = as_cell_table(cells)
    cell_ids = unique_cell_ids(table.index, what="The cell table")
    single = isinstance(tiles, np.ndarray) or _single_image(tiles)
    columns = resolve_columns(
        table, preset=preset, tile_key=tile_key, y_key=y_key, x_key=x_key, need_tile_key=not single
    )
    params = CropParams(
        **options,
        align=bool(align),
        upsample_factor=int(upsample_factor),
        tile_key=list(columns.tile_key),
        y_key=columns.y_key,
        x_key=columns.x_key,
        preset=columns.preset,
    )
    by_tile = _cells_by_tile(table, cell_ids, params.tile_key, params.y_key, params.x_key)
    sources = _tile_sources(
        tiles, by_tile, cell_ids, params.tile_key, raise_missing=on_missing_tile == "raise"
    )
    fingerprint = table_fingerprint(table, [*params.tile_key, params.y_key, params.x_key])
    header = {"params": params.record(), "table": fingerprint, "tiles": by_tile.labels}
    run = RunFolder(out, header, overwrite=overwrite)
    try:
        _redo_changed_tiles(run, sources, by_tile.labels)
        if len(run.records) < len(by_tile.keys) or not run.store_complete():
            layout = {
                "n_channels": params.n_channels,
                "crop_size": params.out_size,
                "channel_names": params.channel_names,
                "dtype": np.dtype(params.dtype),
                "chunk_cells": chunk_cells,
                "pixel_size": pixel_size,
                "nonfinite": params.nonfinite,
            }
            tasks = [
                TileTask(
                    index=i,
                    label=by_tile.labels[i],
                    key=by_tile.keys[i],
                    source=sources[i],
                    positions=by_tile.positions[i],
                    y=by_tile.y[by_tile.positions[i]],
                    x=by_tile.x[by_tile.positions[i]],
                    params=params,
                    cell_ids=list(cell_ids[by_tile.positions[i]]),
                )
                for i in range(len(run.records), len(by_tile.keys))
            ]
            pool = (client, workers, start_method)
            _crop_tiles(tasks, run, layout, by_tile.labels, on_missing_tile, pool, progress)
        return _finish(run, table, cell_ids, by_tile, params)
    finally:
        run.release()


def _crop_tiles(
    tasks: list[TileTask],
    run: RunFolder,
    layout: dict[str, Any],
    labels: list[str],
    on_missing_tile: str,
    pool_spec: tuple[Any, int, str | None],
    progress: bool,
) -> None:
    """Crop the remaining tiles into the store, in this process or on workers."""
    from tqdm.auto import tqdm

    client, workers, start_method = pool_spec
    writer = run.open_writer(**layout)
    n_cells = {task.index: len(task.positions) for task in tasks}

    def on_result(result: TileResult) -> dict[str, Any]:
        label = labels[result.index]
        if result.missing and on_missing_tile == "raise":
            msg = (
                f"No image for tile {label}: the tile loader raised KeyError/"
                "FileNotFoundError or returned None. Provide the image, or pass "
                f"on_missing_tile='skip' to drop its {n_cells[result.index]} cells. Finished "
                "tiles are kept; rerun to resume."
            )
            raise MissingTileError(msg)
        if result.missing:
            logger.warning("No image for tile %s; dropping its cells.", label)
        writer.add_nonfinite_counts(*result.nonfinite)
        return {
            "label": label,
            "missing": result.missing,
            "unreadable": result.unreadable,
            "tile_shape": result.tile_shape,
            "n_kept": result.n_crops,
            "n_dropped_edge": result.n_dropped_edge,
            "shifts": result.shifts,
            "nonfinite": list(result.nonfinite),
            "source": result.fingerprint,
        }

    done = len(run.records)
    try:
        with tqdm(
            total=done + len(tasks),
            initial=done,
            unit="tile",
            desc="Cropping",
            disable=not progress,
        ) as bar:
            if client is None and (workers == 1 or len(tasks) <= 1):
                run_serial(tasks, run=run, writer=writer, on_result=on_result, bar=bar)
                writer.close()
            else:
                pool = DaskPool(client) if client is not None else LocalPool(workers, start_method)
                total = run_parallel(
                    tasks, pool=pool, run=run, writer=writer, on_result=on_result, bar=bar
                )
                writer.close(n_cells=total)
    except BaseException:
        writer.abort()
        raise


def _redo_changed_tiles(run: RunFolder, sources: list[Any], labels: list[str]) -> None:
    """Crop again, from the first one on, tiles whose image changed since they were committed."""
    for i, record in enumerate(run.records):
        before = record.get("source")
        now = source_fingerprint(sources[i]) if before is not None else None
        if before is not None and now is not None and now != before:
            what = "appeared" if before.get("missing") else "changed"
            run.rollback(
                i, f"The image of tile {labels[i]} {what} since it was cropped ({before} -> {now})"
            )
            return


def _single_image(tiles: Any) -> bool:
    if isinstance(tiles, str | os.PathLike):
        text = os.fspath(tiles)
        return "{" not in text and os.path.isfile(text)
    return False


def _plain_values(frame: pd.DataFrame) -> pd.DataFrame:
    """Categorical columns as plain values, so tiles sort the same whatever the columns' dtype."""
    categorical = {
        name: column.cat.categories.dtype
        for name, column in frame.items()
        if isinstance(column.dtype, pd.CategoricalDtype)
    }
    return frame.astype(categorical) if categorical else frame


def _plain_key(key: Any) -> Any:
    if isinstance(key, tuple):
        return tuple(k.item() if isinstance(k, np.generic) else k for k in key)
    return key.item() if isinstance(key, np.generic) else key


def _finish(
    run: RunFolder,
    table: pd.DataFrame,
    cell_ids: pd.Index,
    by_tile: _CellsByTile,
    params: CropParams,
) -> AnnData:
    """Build the AnnData of kept cells from the committed tiles, link it and write it."""
    kept_parts, n_edge, n_missing, n_unreadable, shapes, shifts = [], 0, 0, 0, [], []
    unreadable, nonfinite = [], np.zeros(2, dtype=np.int64)
    n_channels, labels, n_nan = params.n_channels, by_tile.labels, by_tile.n_nan
    y_all, x_all = by_tile.y, by_tile.x
    for record, positions in zip(run.records, by_tile.positions, strict=True):
        if record["missing"] or record.get("unreadable"):
            if record.get("unreadable"):
                n_unreadable += len(positions)
                unreadable.append([record["label"], record["unreadable"]])
            else:
                n_missing += len(positions)
            shapes.append([0, 0])
            shifts.append([[float("nan")] * 2] * n_channels)
            continue
        keep = _keep_mask(
            y_all[positions], x_all[positions], record["tile_shape"], params.edge_margin
        )
        if int(keep.sum()) != record["n_kept"] or record["stop"] - record["start"] != keep.sum():
            msg = (
                f"The run log in {run.root} disagrees with the cell table for tile "
                f"{record['label']}. Rerun with overwrite=True."
            )
            raise RuntimeError(msg)
        kept_parts.append(positions[keep])
        n_edge += record["n_dropped_edge"]
        nonfinite += np.asarray(record.get("nonfinite", (0, 0)), dtype=np.int64)
        shapes.append(record["tile_shape"])
        shifts.append(record["shifts"])
    kept = np.concatenate(kept_parts) if kept_parts else np.zeros(0, dtype=np.int64)
    obs = table.iloc[kept].copy()
    obs.index = cell_ids[kept]
    obs.columns = obs.columns.astype(str)
    adata = AnnData(obs=obs)
    store = open_crops(str(run.store_path))
    link_crops(adata, store)
    adata.uns["extract_crops"] = {
        **params.record(),
        "n_cells_in": int(len(table)),
        "n_dropped_nan": int(n_nan),
        "n_dropped_missing_tile": int(n_missing),
        "n_dropped_unreadable_tile": int(n_unreadable),
        "n_dropped_edge": int(n_edge),
        "n_kept": int(len(kept)),
        "n_nonfinite_values": int(nonfinite[0]),
        "n_nonfinite_cells": int(nonfinite[1]),
        "n_tiles": len(labels),
        "tile_labels": labels,
        "tile_shapes": shapes,
        "shifts": shifts,
        "unreadable_tiles": unreadable,
    }
    write_h5ad(adata, run.adata_path)
    logger.info(
        "Kept %d of %d cells (%d near an edge, %d without a tile image, %d in unreadable tiles, "
        "%d with NaN); wrote %s",
        len(kept),
        len(table),
        n_edge,
        n_missing,
        n_unreadable,
        n_nan,
        run.root,
    )
    return adata
