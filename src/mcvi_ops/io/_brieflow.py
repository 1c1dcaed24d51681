"""Read the outputs of brieflow (cheeseman-lab/brieflow): merged cell tables and phenotype tiles.

The layout followed is brieflow 1.4.14 (``main`` at commit 9c40b3e, July 2026):

- cell tables: ``merge/parquets/P-{plate}_W-{well}__merge_final.parquet`` (one row per
  phenotype cell matched to its SBS read-out) or the single-cell AnnData
  ``aggregate/anndata/*__singlecell.h5ad`` (metadata in ``.obs``, CellProfiler-emulator features
  in ``.X``; there ``cell_0``/``i_0``/``j_0`` are renamed ``cell_phenotype``/...). Centroids are
  ``cell_i`` (row) and ``cell_j`` (column) in phenotype-tile pixels, the bounding box is
  ``cell_bounds_0..3`` (min row, min column, max row, max column), the perturbation is
  ``gene_symbol_0`` with the guide barcode ``cell_barcode_0`` (``sgRNA_0`` in some designs),
  and ``mapped_single_gene`` flags cells whose barcodes map to one gene;
- phenotype tiles (channels, height, width), channels aligned: TIFF
  ``phenotype/images/P-{plate}_W-{well}_T-{tile}__aligned.tiff``, or OME-Zarr as brieflow's
  zarr3 work writes them (``workflow/lib/shared/image_io.py`` on its ``mb-2color-pilot``
  branch, June 2026; not yet in a release): an HCS plate per image kind,
  ``phenotype/aligned_{plate}.zarr/{row}/{col}/{tile}``, each tile a ``TCZYX`` multiscale
  image (OME-NGFF 0.5, or 0.4) whose level 0 is read.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd
from anndata import AnnData

from mcvi_ops.data._images import MissingTileError
from mcvi_ops.data._link import write_h5ad
from mcvi_ops.data._tables import read_cells, unique_cell_ids
from mcvi_ops.pp._resume import ADATA_NAME

from ._ome_zarr import OmeZarrTiles, ome_zarr_channel_names
from ._ome_zarr import read_ome_zarr as read_ome_zarr  # re-exported
from ._ome_zarr import split_well as split_well  # re-exported

logger = logging.getLogger(__name__)

BRIEFLOW_VERSION = "1.4.14"
UNS_KEY = "brieflow"
CONTROL_CATEGORY = "nontargeting"
TIFF_TEMPLATE = "P-{plate}_W-{well}_T-{tile}__{kind}.tiff"
ZARR_TEMPLATE = "{kind}_{plate}.zarr/{row}/{col}/{tile}"
TILE_KEY = ("plate", "well", "tile")
CENTROID = ("cell_i", "cell_j")

# brieflow's DEFAULT_METADATA_COLS (workflow/lib/phenotype/constants.py) and the renamed columns
# of its single-cell AnnData; every other numeric column is a feature
_METADATA = frozenset(
    """plate well tile site cell cell_0 cell_1 i_0 j_0 i_1 j_1 distance fov_distance_0
    fov_distance_1 mapped_single_gene channels_min cell_phenotype cell_sbs i_phenotype
    j_phenotype i_sbs j_sbs fov_distance_phenotype fov_distance_sbs is_control region cell_uid
    mapped_n_barcodes class confidence cell_class""".split()
)
_METADATA_PATTERN = re.compile(
    r"^(cell_barcode|cell_barcode_peak|cell_barcode_count|gene_symbol|gene_id|sgRNA|no_recomb|"
    r"Q_min|Q_recomb)_\d+$|^(nucleus|cell|cytoplasm)_(i|j|bounds_\d)$|^global_|^pixel_size_"
)


def _is_metadata(table: pd.DataFrame, column: str) -> bool:
    if column in _METADATA or _METADATA_PATTERN.search(column):
        return True
    dtype = table[column].dtype
    return not pd.api.types.is_numeric_dtype(dtype) or pd.api.types.is_bool_dtype(dtype)


# --- inputs ----------------------------------------------------------------------------------
def _read_one(path: Path, features: bool) -> pd.DataFrame:
    if not path.exists():
        msg = f"brieflow cell table {str(path)!r} does not exist. Check the path."
        raise FileNotFoundError(msg)
    if path.suffix.lower() == ".h5ad":
        import anndata as ad

        if not features:
            return ad.read_h5ad(path, backed="r").obs.copy()
        adata = ad.read_h5ad(path)
        return _table_of(adata)
    return read_cells(path)


def _table_of(adata: AnnData) -> pd.DataFrame:
    x = adata.X
    if x is None or adata.n_vars == 0:
        return adata.obs.copy()
    x = x.toarray() if hasattr(x, "toarray") else np.asarray(x)
    features = pd.DataFrame(x, index=adata.obs_names, columns=adata.var_names.astype(str))
    return pd.concat([adata.obs, features.drop(columns=adata.obs.columns, errors="ignore")], axis=1)


def _cell_paths(cells: str | os.PathLike | Sequence[str | os.PathLike]) -> list[Path]:
    if isinstance(cells, str | os.PathLike):
        path = Path(cells)
        if path.is_dir():
            found = sorted(path.glob("*__merge_final.parquet")) or sorted(
                path.glob("merge/parquets/*__merge_final.parquet")
            )
            if not found:
                msg = (
                    f"Found no brieflow cell tables (*__merge_final.parquet) in {str(path)!r} or "
                    "its merge/parquets/ folder. Pass the brieflow output folder, the parquet or "
                    "h5ad file(s) themselves, or a DataFrame."
                )
                raise FileNotFoundError(msg)
            return found
        return [path]
    return [Path(p) for p in cells]


def _check_same_columns(tables: list[pd.DataFrame], paths: list[Path], required: list[str]) -> None:
    """Refuse tables that lack a column the others have: their cells would get NaN labels."""
    for column in required:
        lacking = [str(p) for p, t in zip(paths, tables, strict=True) if column not in t]
        if lacking and len(lacking) < len(tables):
            msg = (
                f"{len(lacking)} of {len(tables)} brieflow cell tables lack the column "
                f"{column!r} that the others have, e.g. {lacking[:3]}: their cells would be read "
                "with missing values. Fix or leave out those tables (or pass the matching "
                "`perturbation_key=`)."
            )
            raise KeyError(msg)


def _single_gene(values: pd.Series) -> np.ndarray:
    """``mapped_single_gene`` as booleans, also when stored as text ('True'/'False') or numbers."""
    if pd.api.types.is_bool_dtype(values):
        return values.fillna(False).to_numpy(dtype=bool)
    if pd.api.types.is_numeric_dtype(values):
        return (values.fillna(0) != 0).to_numpy(dtype=bool)
    text = values.astype("string").str.strip().str.lower()
    truth = {"true": True, "t": True, "yes": True, "1": True, "1.0": True}
    truth |= {"false": False, "f": False, "no": False, "0": False, "0.0": False, "": False}
    unknown = sorted(set(text.dropna()) - set(truth))
    if unknown:
        msg = (
            f"mapped_single_gene holds values {unknown[:5]} that are neither true nor false. Fix "
            "the column, or pass single_gene_only=False to keep every cell."
        )
        raise ValueError(msg)
    return text.map(truth).fillna(False).to_numpy(dtype=bool)


def _read_tables(cells: Any, features: bool, required: list[str]) -> tuple[pd.DataFrame, list[str]]:
    if isinstance(cells, pd.DataFrame):
        return cells.copy(), ["DataFrame"]
    if isinstance(cells, AnnData):
        return (_table_of(cells) if features else cells.obs.copy()), ["AnnData"]
    paths = _cell_paths(cells)
    if not paths:
        msg = "No brieflow cell tables given; pass a parquet/h5ad path, a list of them or a folder."
        raise ValueError(msg)
    tables = [_read_one(p, features) for p in paths]
    _check_same_columns(tables, paths, required)
    # parquet tables carry row numbers 0..n-1 each; those would collide, named ids would not
    numbered = all(isinstance(t.index, pd.RangeIndex) for t in tables)
    table = tables[0] if len(tables) == 1 else pd.concat(tables, ignore_index=numbered)
    return table, [str(p) for p in paths]


def _whole_numbers(values: pd.Series) -> pd.Series:
    """Cast float columns holding whole numbers (tile 3.0) to int, so file names match."""
    if pd.api.types.is_float_dtype(values) and values.notna().all():
        if np.array_equal(values.to_numpy(), np.round(values.to_numpy())):
            return values.astype(np.int64)
    return values


def _resolve_images(images: Any, kind: str) -> tuple[Any, str]:
    """Return what to pass to extract_crops as ``tiles`` and the image format."""
    if callable(images) or isinstance(images, Mapping):
        return images, "callable" if callable(images) else "mapping"
    if not isinstance(images, str | os.PathLike):
        msg = (
            f"`images` must be the brieflow output folder, a path template or a callable, got "
            f"{type(images).__name__}."
        )
        raise TypeError(msg)
    text = os.fspath(images)
    if "{" in text:
        if ".zarr" in text:
            return OmeZarrTiles(text), "ome-zarr"
        return text, "tiff"
    root = Path(text)
    if not root.is_dir():
        msg = (
            f"brieflow image folder {text!r} does not exist. Pass the brieflow output folder "
            "(holding phenotype/), its phenotype/images folder, or a path template such as "
            "'out/phenotype/images/P-{plate}_W-{well}_T-{tile}__aligned.tiff'."
        )
        raise FileNotFoundError(msg)
    for phenotype in (root / "phenotype", root):
        for folder in (phenotype / "images", phenotype):
            if folder.is_dir() and any(folder.glob(f"*__{kind}.tif*")):
                suffix = "tiff" if any(folder.glob(f"*__{kind}.tiff")) else "tif"
                template = TIFF_TEMPLATE.replace(".tiff", f".{suffix}").replace("{kind}", kind)
                return str(folder / template), "tiff"
        if phenotype.is_dir() and any(phenotype.glob(f"{kind}_*.zarr")):
            return OmeZarrTiles(str(phenotype / ZARR_TEMPLATE.replace("{kind}", kind))), "ome-zarr"
    msg = (
        f"Found no brieflow phenotype tiles in {text!r}: looked for "
        f"phenotype/images/*__{kind}.tiff and phenotype/{kind}_*.zarr. Check the folder, set "
        "`image_kind=` (e.g. 'illumination_corrected') or pass a path template."
    )
    raise FileNotFoundError(msg)


def _check_zarr_tiles(tiles: OmeZarrTiles, keys: list[tuple]) -> None:
    missing = [str(tiles.path(k)) for k in keys if not tiles.path(k).exists()]
    if missing:
        msg = (
            f"No OME-Zarr image for {len(missing)} of {len(keys)} tiles, e.g. {missing[:3]}. "
            "Check the brieflow output folder and `image_kind`, or pass on_missing_tile='skip' "
            "to drop their cells."
        )
        raise MissingTileError(msg)


def _auto_crop_size(table: pd.DataFrame) -> int:
    extent = _bounding_extent(table)
    if extent is None:
        msg = (
            "crop_size='auto' needs the bounding-box columns cell_bounds_0..cell_bounds_3 of "
            "brieflow's cell table, which are missing. Pass crop_size as a number of pixels."
        )
        raise KeyError(msg)
    finite = extent[np.isfinite(extent)]
    if not len(finite):
        msg = (
            f"crop_size='auto' needs the cells' bounding boxes, but cell_bounds_0..3 hold no "
            f"finite values in any of the {len(extent)} cells. Pass crop_size as a number of "
            "pixels."
        )
        raise ValueError(msg)
    size = int(np.ceil(np.percentile(finite, 95) / 2) * 2)
    return max(size, 8)


def _bounding_extent(table: pd.DataFrame) -> np.ndarray | None:
    columns = [f"cell_bounds_{i}" for i in range(4)]
    if not all(c in table for c in columns):
        return None
    b = table[columns].to_numpy(dtype=float)
    return np.maximum(b[:, 2] - b[:, 0], b[:, 3] - b[:, 1])


def _perturbation_columns(
    table: pd.DataFrame, perturbation_key: str, guide_key: str | None, control_key: str | None
) -> tuple[pd.DataFrame, str | None]:
    genes = table[perturbation_key]
    is_control = np.zeros(len(table), dtype=bool)
    if control_key is not None:
        is_control = genes.astype("string").str.contains(control_key, regex=False).fillna(False)
        is_control = is_control.to_numpy(dtype=bool)
    out = pd.DataFrame(index=table.index)
    gene = genes.astype(object).where(genes.notna(), None).to_numpy(dtype=object)
    gene[is_control] = CONTROL_CATEGORY
    out["gene_symbol"] = gene
    out["is_control"] = is_control
    if guide_key is None:
        guide_key = next((c for c in ("sgRNA_0", "cell_barcode_0") if c in table), None)
    elif guide_key not in table:
        msg = (
            f"Guide column {guide_key!r} (`guide_key=`) is not in the brieflow cell table; "
            f"barcode columns there: {[c for c in table if 'barcode' in c or 'sgRNA' in c]}."
            " Pass one of them, or guide_key=None to pick sgRNA_0 or cell_barcode_0."
        )
        raise KeyError(msg)
    if guide_key is not None:
        out["sgRNA"] = table[guide_key].astype(object).where(table[guide_key].notna(), None)
    return out, guide_key


def _brieflow_table(
    cells, features: bool, perturbation_key: str | None, single_gene_only: bool
) -> tuple[pd.DataFrame, list[str], dict[str, int]]:
    """The checked cell table (single-gene cells, plain tile keys, unique ids), and counts."""
    required = [*TILE_KEY, *CENTROID, *([perturbation_key] if perturbation_key else [])]
    table, sources = _read_tables(cells, features, required)
    table.columns = table.columns.astype(str)
    missing = [c for c in (*TILE_KEY, *CENTROID) if c not in table]
    if missing:
        msg = (
            f"The brieflow cell table lacks column(s) {missing}; it needs {[*TILE_KEY, *CENTROID]}"
            f" (columns: {list(table.columns)[:20]}...). Pass brieflow's merge_final parquet or "
            "single-cell h5ad, or use mcvi_ops.pp.extract_crops with tile_key/y_key/x_key."
        )
        raise KeyError(msg)
    if perturbation_key is not None and perturbation_key not in table:
        genes = [c for c in table.columns if c.startswith("gene_symbol")]
        msg = (
            f"Perturbation column {perturbation_key!r} is not in the brieflow cell table (gene "
            f"columns there: {genes}). Pass `perturbation_key=` naming it, or None."
        )
        raise KeyError(msg)
    n_in = len(table)
    n_not_single = 0
    if single_gene_only and "mapped_single_gene" in table:
        keep = _single_gene(table["mapped_single_gene"])
        n_not_single = int((~keep).sum())
        table = table.loc[keep]
        logger.info("Dropped %d cells not mapped to a single gene.", n_not_single)
    if not len(table):
        msg = (
            f"No cells left of {n_in} in the brieflow cell table (after keeping cells with "
            "mapped_single_gene). Pass single_gene_only=False or check the table."
        )
        raise ValueError(msg)
    for column in TILE_KEY:  # h5ad obs holds categoricals; tile keys must be plain values
        if isinstance(table[column].dtype, pd.CategoricalDtype):
            table[column] = table[column].astype(table[column].cat.categories.dtype)
        table[column] = _whole_numbers(table[column])
    table.index = _cell_ids(table)
    return table, sources, {"n_cells_in": int(n_in), "n_dropped_not_single_gene": n_not_single}


def _cell_ids(table: pd.DataFrame) -> pd.Index:
    """Unique cell ids: ``plate_well_tile_cell`` where brieflow numbers cells, else the index."""
    cell_id = next((c for c in ("cell_0", "cell_phenotype", "cell") if c in table), None)
    if cell_id is None:
        return unique_cell_ids(table.index, what="The brieflow cell table's index")
    uid = (
        table["plate"].astype(str)
        + "_"
        + table["well"].astype(str)
        + "_"
        + table["tile"].astype(str)
        + "_"
        + table[cell_id].astype(str)
    )
    return unique_cell_ids(uid, what=f"The brieflow cell table (ids plate_well_tile_{cell_id})")


def _tiles_and_channels(
    images, image_kind: str, cell_table: pd.DataFrame, channel_names, *, check_tiles: bool
) -> tuple[Any, str, list[str]]:
    """The tile images, their format and channel names (from OME-Zarr metadata if not given)."""
    tiles, fmt = _resolve_images(images, image_kind)
    keys = [tuple(k) for k in cell_table[list(TILE_KEY)].drop_duplicates().itertuples(index=False)]
    if isinstance(tiles, OmeZarrTiles) and check_tiles:
        _check_zarr_tiles(tiles, keys)
    if channel_names is None and isinstance(tiles, OmeZarrTiles):
        channel_names = ome_zarr_channel_names(tiles.path(keys[0]))
    if channel_names is None:
        msg = (
            f"brieflow {fmt} tiles carry no channel names; pass channel_names= with one name "
            "per channel, in order (brieflow's config['phenotype']['channel_names'])."
        )
        raise ValueError(msg)
    return tiles, fmt, list(channel_names)


def read_brieflow(
    cells: str | os.PathLike | Sequence[str | os.PathLike] | pd.DataFrame | AnnData,
    images: str | os.PathLike | Callable[[Any], Any] | Mapping[Any, Any],
    out: str | os.PathLike,
    *,
    channel_names: Sequence[str] | None = None,
    crop_size: int | Literal["auto"] = 100,
    resize_to: int | None = None,
    image_kind: str = "aligned",
    perturbation_key: str | None = "gene_symbol_0",
    guide_key: str | None = None,
    control_key: str | None = "nontargeting",
    single_gene_only: bool = True,
    features: bool = False,
    align: bool = False,
    clip_percentiles: tuple[float, float] | None = (0.1, 99.9),
    on_missing_tile: Literal["raise", "skip"] = "raise",
    n_jobs: int = 1,
    overwrite: bool = False,
    progress: bool = True,
    **extract_kwargs: Any,
) -> AnnData:
    """Cut the cells of a brieflow screen out of its phenotype tiles into a crop store and AnnData.

    .. long function: documentation and signature; the body is under 80 lines.

    Follows the output layout of brieflow 1.4.14 (cheeseman-lab/brieflow, July 2026; OME-Zarr
    tiles as its zarr3 work writes them, OME-NGFF 0.5 or 0.4): see the module docstring of
    ``mcvi_ops.io._brieflow`` for the files and columns. The columns are mapped (tile key
    ``plate, well, tile``; centroid ``cell_i, cell_j``) and the crops are cut with
    :func:`~mcvi_ops.pp.extract_crops`, so reruns resume and every option of it applies.

    Parameters
    ----------
    cells
        brieflow cell table(s): a ``*__merge_final.parquet`` or ``*__singlecell.h5ad`` file, a
        list of them, the brieflow output folder (every ``merge/parquets/*__merge_final.parquet``
        is read), a DataFrame or an AnnData.
    images
        The phenotype tiles: the brieflow output folder (holding ``phenotype/``; TIFF or OME-Zarr
        is detected), its ``phenotype/images`` folder, a path template naming ``{plate}``,
        ``{well}`` and ``{tile}`` (OME-Zarr templates, containing ``.zarr``, may also name
        ``{row}`` and ``{col}``), or a callable / mapping from ``(plate, well, tile)`` to an image.
    out
        Output folder; receives ``crops.zarr`` and ``cells.h5ad``.
    channel_names
        One name per tile channel (brieflow's ``config["phenotype"]["channel_names"]``). `None`
        reads the channel labels of OME-Zarr tiles; TIFF tiles carry none, so pass them.
    crop_size
        Side of the square crops in tile pixels, or ``"auto"``: the 95th percentile of the cells'
        bounding-box side (``cell_bounds_*``), rounded up to an even number.
    resize_to
        Resize the crops to this side (e.g. 64).
    image_kind
        Which brieflow phenotype image to read: ``"aligned"`` (kept by brieflow) or
        ``"illumination_corrected"`` (a temporary file unless kept).
    perturbation_key
        Column naming each cell's targeted gene; `None` for an unperturbed (phenotype-only) run.
    guide_key
        Column naming each cell's guide; `None` picks ``sgRNA_0`` or else ``cell_barcode_0``.
    control_key
        Cells whose ``perturbation_key`` contains this text are controls (brieflow's
        ``aggregate.control_key``); they get ``obs["gene_symbol"] == "nontargeting"``.
    single_gene_only
        Keep only cells with ``mapped_single_gene`` true (when the column exists), as brieflow's
        own analyses do.
    features
        Put brieflow's numeric feature columns (the ``.X`` of an h5ad input) into ``.X`` of the
        result. By default only metadata columns are kept, in ``.obs``.
    align
        Align the channels again. brieflow's ``aligned`` tiles are aligned already.
    clip_percentiles, on_missing_tile, n_jobs, overwrite, progress, **extract_kwargs
        Passed to :func:`~mcvi_ops.pp.extract_crops` (e.g. ``edge_margin``, ``dtype``).

    Returns
    -------
    AnnData with one row per kept cell, written to ``out/cells.h5ad``, linked to
    ``out/crops.zarr``, with

    ``.obs``
        brieflow's metadata columns, indexed by ``{plate}_{well}_{tile}_{cell}`` (the table's
        index without a cell column; duplicate ids are kept, made unique with a suffix ``-1``,
        ``-2`` and a warning), plus ``obs["gene_symbol"]`` (controls as ``"nontargeting"``),
        ``obs["sgRNA"]``, ``obs["is_control"]`` and ``obs["crop_index"]``.
    ``.X``
        brieflow's features when ``features=True``.
    ``.uns["crops"]``, ``.uns["extract_crops"]``
        The store link and the cropping record of :func:`~mcvi_ops.pp.extract_crops`.
    ``.uns["brieflow"]``
        The brieflow version followed, inputs, column mapping, cells dropped as not mapping to a
        single gene, the crop size and the fraction of cells whose bounding box exceeds it.

    Examples
    --------
    >>> import mcvi_ops
    >>> adata = mcvi_ops.io.read_brieflow(  # doctest: +SKIP
    ...     "brieflow_output/merge/parquets",
    ...     "brieflow_output",
    ...     "crops/",
    ...     channel_names=["DAPI", "COXIV", "CENPA", "WGA"],
    ...     resize_to=64,
    ... )
    """
    from ._from_crops import output_lock

    lock = output_lock(out)  # held until cells.h5ad is rewritten below
    try:
        return _read_brieflow(
            cells,
            images,
            out,
            channel_names=channel_names,
            crop_size=crop_size,
            resize_to=resize_to,
            image_kind=image_kind,
            perturbation_key=perturbation_key,
            guide_key=guide_key,
            control_key=control_key,
            single_gene_only=single_gene_only,
            features=features,
            align=align,
            clip_percentiles=clip_percentiles,
            on_missing_tile=on_missing_tile,
            n_jobs=n_jobs,
            overwrite=overwrite,
            progress=progress,
            **extract_kwargs,
        )
    finally:
        lock.release()


def _read_brieflow(
    cells,
    images,
    out,
    *,
    channel_names,
    crop_size,
    resize_to,
    image_kind,
    perturbation_key,
    guide_key,
    control_key,
    single_gene_only,
    features,
    align,
    clip_percentiles,
    on_missing_tile,
    n_jobs,
    overwrite,
    progress,
    **extract_kwargs,
) -> AnnData:
    """The steps of :func:`read_brieflow`, while it holds the output folder's lock.

    .. long function: documentation and signature; the body is under 80 lines.
    """
    from mcvi_ops.pp import extract_crops

    table, sources, counts = _brieflow_table(cells, features, perturbation_key, single_gene_only)
    metadata = [c for c in table.columns if _is_metadata(table, c)]
    feature_columns = [c for c in table.columns if c not in set(metadata)] if features else []
    cell_table = table[metadata].copy()
    guide = None
    if perturbation_key is not None:
        derived, guide = _perturbation_columns(table, perturbation_key, guide_key, control_key)
        cell_table = cell_table.drop(columns=derived.columns, errors="ignore").join(derived)
    tiles, fmt, channel_names = _tiles_and_channels(
        images, image_kind, cell_table, channel_names, check_tiles=on_missing_tile == "raise"
    )
    if crop_size == "auto":
        crop_size = _auto_crop_size(table)
        logger.info("crop_size='auto': %d px from the cells' bounding boxes.", crop_size)

    adata = extract_crops(
        tiles,
        cell_table,
        out,
        channel_names=channel_names,
        crop_size=crop_size,
        resize_to=resize_to,
        align=align,
        clip_percentiles=clip_percentiles,
        preset=None,
        tile_key=list(TILE_KEY),
        y_key=CENTROID[0],
        x_key=CENTROID[1],
        on_missing_tile=on_missing_tile,
        n_jobs=n_jobs,
        overwrite=overwrite,
        progress=progress,
        **extract_kwargs,
    )
    extent = _bounding_extent(cell_table.loc[adata.obs_names] if len(adata) else cell_table)
    larger = float(np.mean(extent > crop_size)) if extent is not None and len(extent) else None
    if larger is not None and larger > 0.05:
        logger.warning(
            "%.0f%% of the cells' bounding boxes are larger than crop_size=%d px; consider "
            "crop_size='auto' or a larger crop.",
            100 * larger,
            crop_size,
        )
    if feature_columns:
        values = table.loc[adata.obs_names, feature_columns].to_numpy(dtype=np.float32)
        adata = AnnData(
            X=values, obs=adata.obs, var=pd.DataFrame(index=feature_columns), uns=adata.uns
        )
    adata.uns[UNS_KEY] = {
        "brieflow_version_followed": BRIEFLOW_VERSION,
        "cells": sources,
        "image_format": fmt,
        "image_kind": image_kind,
        "perturbation_key": perturbation_key,
        "guide_key": guide,
        "control_key": control_key,
        **counts,
        "crop_size": int(crop_size),
        "fraction_larger_than_crop": larger,
        "n_features": len(feature_columns),
    }
    write_h5ad(adata, Path(out).expanduser().resolve() / ADATA_NAME)
    return adata
