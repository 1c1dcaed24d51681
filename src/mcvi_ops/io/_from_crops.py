"""Start from crops that already exist: an array, or a folder of per-cell image files."""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd
from anndata import AnnData

from mcvi_ops._constants import UNS
from mcvi_ops.data import CropWriter, link_crops
from mcvi_ops.data._images import (
    IMAGE_SUFFIXES,
    ChannelAxis,
    UnreadableImageError,
    read_image,
    stem,
    to_channel_first,
)
from mcvi_ops.data._link import write_h5ad
from mcvi_ops.data._lock import StoreLock
from mcvi_ops.data._tables import unique_cell_ids
from mcvi_ops.data._writer import check_channel_names, check_integer_range
from mcvi_ops.pp._resize import resize_crops
from mcvi_ops.pp._resume import ADATA_NAME, STORE_NAME

logger = logging.getLogger(__name__)

UNS_KEY = UNS.import_crops
_STORE_DTYPES = (np.dtype("uint8"), np.dtype("uint16"), np.dtype("float32"))


def output_lock(out: str | os.PathLike) -> StoreLock:
    """The lock of an import's output folder: the lock of its crop store, held until the end.

    The store's writer takes the same lock (re-entrant in this process), so a second process
    writing the same folder stops with :class:`~mcvi_ops.data.StoreLockedError` instead of
    replacing ``crops.zarr`` or ``cells.h5ad`` while this one writes them.
    """
    root = Path(out).expanduser().resolve()
    root.mkdir(parents=True, exist_ok=True)
    return StoreLock(str(root / STORE_NAME)).acquire()


def _output_paths(out: str | os.PathLike, overwrite: bool) -> tuple[Path, Path]:
    root = Path(out).expanduser().resolve()
    store_path, adata_path = root / STORE_NAME, root / ADATA_NAME
    if not overwrite and (store_path.exists() or adata_path.exists()):
        msg = (
            f"{root} already holds {STORE_NAME} or {ADATA_NAME}. Pass overwrite=True to replace "
            "them, or choose another output folder."
        )
        raise FileExistsError(msg)
    root.mkdir(parents=True, exist_ok=True)
    return store_path, adata_path


def _out_dtype(dtype: Any, source: np.dtype) -> np.dtype:
    if dtype is None:
        return source if source in _STORE_DTYPES else np.dtype("float32")
    dtype = np.dtype(dtype)
    if dtype not in _STORE_DTYPES:
        msg = f"dtype must be uint8, uint16, float32 or None (keep the input's), got {dtype}."
        raise ValueError(msg)
    return dtype


def _check_obs(obs: pd.DataFrame | None, n: int, default_index: Sequence[str]) -> pd.DataFrame:
    if obs is None:
        return pd.DataFrame(index=unique_cell_ids(default_index, what="The crop file names"))
    if not isinstance(obs, pd.DataFrame):
        msg = f"obs must be a pandas DataFrame with one row per crop, got {type(obs).__name__}."
        raise TypeError(msg)
    if len(obs) != n:
        msg = (
            f"obs has {len(obs)} rows but there are {n} crops; give one row per crop, in crop "
            "order."
        )
        raise ValueError(msg)
    obs = obs.copy()
    obs.index = unique_cell_ids(obs.index, what="obs")
    return obs


def _finish(obs: pd.DataFrame, store, adata_path: Path, info: dict[str, Any]) -> AnnData:
    """Link ``obs`` to the written store, record ``info`` and the non-finite counts, save it."""
    adata = AnnData(obs=obs)
    link_crops(adata, store)
    adata.uns[UNS_KEY] = {
        **info,
        "n_nonfinite_values": int(store.nonfinite.get("n_values", 0)),
        "n_nonfinite_cells": int(store.nonfinite.get("n_cells", 0)),
    }
    write_h5ad(adata, adata_path)
    return adata


def _as_array_like(crops: Any) -> Any:
    """``crops`` itself when it can be sliced lazily (NumPy, h5py, zarr, dask), else an array."""
    if all(hasattr(crops, name) for name in ("shape", "dtype", "ndim", "__getitem__")):
        return crops
    return np.asarray(crops)


def crops_from_array(
    crops: Any,
    out: str | os.PathLike,
    *,
    channel_names: Sequence[str],
    obs: pd.DataFrame | None = None,
    channel_axis: ChannelAxis = "first",
    resize_to: int | None = None,
    dtype: Any = None,
    chunk_cells: int | None = None,
    pixel_size: float | None = None,
    nonfinite: Literal["raise", "zero"] = "raise",
    overwrite: bool = False,
    progress: bool = True,
) -> AnnData:
    """Store crops you already have (an array, in memory or on disk) as a crop store with an AnnData.

    .. long function: documentation and signature; the body is under 80 lines.

    Use this when your own segmentation and cropping pipeline produced the crops. Arrays that
    live on disk (an h5py dataset, a zarr array, a dask array) are read one store chunk of cells
    at a time, so they need not fit in memory.

    Parameters
    ----------
    crops
        Array of shape ``(n_cells, channels, height, width)`` (``channel_axis="first"``) or
        ``(n_cells, height, width, channels)`` (``"last"``); ``(n_cells, height, width)`` for a
        single channel. A NumPy array or anything sliced like one along the cells (h5py
        dataset, zarr array, dask array).
    out
        Output folder; receives ``crops.zarr`` and ``cells.h5ad``.
    channel_names
        One name per channel.
    obs
        Per-cell annotations (e.g. ``sgRNA``, ``gene_symbol``), one row per crop in crop order.
    channel_axis
        Channel axis of each crop: ``"first"``, ``"last"`` or an integer axis of a single crop.
    resize_to
        Resize each crop to ``resize_to`` x ``resize_to`` pixels with anti-aliasing.
    dtype
        ``uint8``, ``uint16`` or ``float32``; `None` keeps the input type when possible (other
        types become float32 when that is exact). Values outside the range of an integer type
        raise an error; they are never clipped.
    chunk_cells
        Cells per chunk of the store; also the number of cells read at a time.
    pixel_size
        Pixel size in micrometres.
    nonfinite
        NaN/inf pixels: ``"raise"`` (an error naming the cells) or ``"zero"`` (set to 0 and
        counted in ``uns["import_crops"]`` and the store attribute ``nonfinite``).
    overwrite
        Replace an existing ``crops.zarr`` / ``cells.h5ad`` in ``out``.
    progress
        Show a progress bar.

    Returns
    -------
    AnnData with one row per crop, written to ``out/cells.h5ad``, with ``obs["crop_index"]``,
    the store link in ``uns["crops"]`` and ``uns["import_crops"]`` (source, counts, channel
    names, ``n_nonfinite_values``, ``n_nonfinite_cells``). The obs names are ``obs``'s index as
    strings (``"0"``, ``"1"``, ... without ``obs``); duplicates are made unique with a warning.

    Examples
    --------
    >>> import numpy as np
    >>> import mcvi_ops
    >>> crops = np.zeros((10, 2, 64, 64), dtype=np.uint16)
    >>> adata = mcvi_ops.io.crops_from_array(  # doctest: +SKIP
    ...     crops, "my_crops/", channel_names=["DNA", "actin"]
    ... )
    >>> adata.n_obs  # doctest: +SKIP
    10
    """
    from tqdm.auto import tqdm

    crops = _as_array_like(crops)
    shape, source_dtype = tuple(int(n) for n in crops.shape), np.dtype(crops.dtype)
    names = check_channel_names(channel_names)
    single = len(shape) == 3 and len(names) == 1
    if single:
        shape = (shape[0], 1, *shape[1:])
    if len(shape) != 4:
        msg = (
            f"crops must have 4 dimensions (cells, channels, height, width), got shape "
            f"{tuple(crops.shape)}. Stack single crops with np.stack."
        )
        raise ValueError(msg)
    axis = {"first": 1, "last": 3}.get(channel_axis, None)  # type: ignore[arg-type]
    if axis is None:
        axis = int(channel_axis) % 3 + 1
    if shape[axis] != len(names):
        msg = (
            f"crops of shape {shape} have {shape[axis]} channels on axis {axis} "
            f"(channel_axis={channel_axis!r}) but {len(names)} channel names were given. Set "
            "channel_axis ('first' for (n, C, H, W), 'last' for (n, H, W, C)) or fix channel_names."
        )
        raise ValueError(msg)
    n_cells = shape[0]
    crop_shape = [shape[i] for i in (1, 2, 3) if i != axis]
    if crop_shape[0] != crop_shape[1] and resize_to is None:
        logger.info("Crops are not square (%s); keeping them as they are.", tuple(crop_shape))
    out_dtype = _out_dtype(dtype, source_dtype)
    obs = _check_obs(obs, n_cells, range(n_cells))
    lock = output_lock(out)
    try:
        store_path, adata_path = _output_paths(out, overwrite)
        size = (resize_to, resize_to) if resize_to else tuple(crop_shape)
        with CropWriter(
            str(store_path),
            n_channels=len(names),
            crop_size=size,
            channel_names=names,
            dtype=out_dtype,
            chunk_cells=chunk_cells,
            pixel_size=pixel_size,
            nonfinite=nonfinite,
            overwrite=overwrite,
        ) as writer:
            step = writer.chunk_cells
            starts = range(0, n_cells, step)
            for start in tqdm(starts, unit="chunk", desc="Storing crops", disable=not progress):
                batch = np.asarray(crops[start : start + step])  # reads only these cells
                if single:
                    batch = batch[:, None]
                batch = np.moveaxis(batch, axis, 1)
                writer.append(
                    _prepare(batch, resize_to, out_dtype),
                    cell_names=obs.index[start : start + step],
                )
        info = {
            "source": "array",
            "n_cells": int(n_cells),
            "channel_names": names,
            "resize_to": resize_to,
        }
        return _finish(obs, writer.store, adata_path, info)
    finally:
        lock.release()


def _prepare(batch: np.ndarray, resize_to: int | None, dtype: np.dtype) -> np.ndarray:
    """Resize crops, checking first that they fit an integer output type.

    Integer crops resized for an integer store are rounded back to it (resampling rounding, not
    data); float crops with fractional values are refused for an integer store, resized or not.
    """
    if not resize_to:
        return batch  # the writer checks values and casts
    integer = np.issubdtype(dtype, np.integer)
    if integer and batch.size and batch.dtype != dtype:
        check_integer_range(batch, dtype, fix="pass dtype='float32'")
        if batch.dtype.kind == "f" and not np.array_equal(batch, np.rint(batch), equal_nan=True):
            msg = (
                f"The crops are {batch.dtype} with fractional values but dtype={str(dtype)!r} "
                "would round them. Pass dtype='float32' (or None to keep floats)."
            )
            raise ValueError(msg)
    batch = resize_crops(batch, resize_to)
    if integer:  # resampling stays within the input range: this only removes rounding error
        info = np.iinfo(dtype)
        batch = np.clip(np.rint(batch), info.min, info.max).astype(dtype)
    return batch


def _list_files(paths_or_folder: Any, pattern: str | None) -> list[Path]:
    if isinstance(paths_or_folder, str | os.PathLike):
        folder = Path(paths_or_folder)
        if not folder.is_dir():
            msg = (
                f"{str(folder)!r} is not a folder. Pass a folder of crop files or a list of paths."
            )
            raise NotADirectoryError(msg)
        if pattern is not None:
            files = sorted(p for p in folder.glob(pattern) if p.is_file())
        else:
            files = sorted(
                p
                for p in folder.iterdir()
                if p.is_file() and p.name.lower().endswith(IMAGE_SUFFIXES)
            )
        if not files:
            msg = (
                f"No crop files ({pattern or '*.tif, *.tiff, *.npy'}) in {str(folder)!r}. Check "
                "the folder or pass `pattern=`."
            )
            raise FileNotFoundError(msg)
        return files
    files = [Path(p) for p in paths_or_folder]
    missing = [str(p) for p in files if not p.is_file()]
    if missing:
        msg = f"{len(missing)} crop files do not exist, e.g. {missing[:3]}. Check the paths."
        raise FileNotFoundError(msg)
    if not files:
        msg = "No crop files given."
        raise ValueError(msg)
    return files


class _CropFiles:
    """The per-cell image files of :func:`crops_from_files`: read one by one, written in batches."""

    def __init__(
        self, files: list[Path], *, channel_axis: ChannelAxis, n_channels: int, on_error: str
    ) -> None:
        self.files = files
        self.channel_axis = channel_axis
        self.n_channels = n_channels
        self.on_error = on_error
        self.skipped: list[str] = []

    def load(self, path: Path) -> np.ndarray | None:
        """The crop of one file, channel first; `None` for an unreadable file to skip."""
        try:
            image = read_image(path)
        except UnreadableImageError as err:
            if self.on_error == "raise":
                raise
            logger.warning("Skipping crop file %s: %s", path, err)
            self.skipped.append(str(path))
            return None
        return to_channel_first(
            image,
            channel_axis=self.channel_axis,
            n_channels=self.n_channels,
            where=f"Crop file {str(path)!r}",
        )

    def first_readable(self) -> tuple[int, np.ndarray]:
        """The position and crop of the first file that can be read (it fixes the crop size)."""
        for position, path in enumerate(self.files):
            image = self.load(path)
            if image is not None:
                return position, image
        msg = f"None of the {len(self.files)} crop files could be read (e.g. {self.skipped[:3]})."
        raise ValueError(msg)

    def write(
        self,
        writer: CropWriter,
        cell_names: pd.Index,
        start: int,
        first: np.ndarray,
        resize_to: int | None,
        dtype: np.dtype,
        *,
        progress: bool,
    ) -> list[int]:
        """Write the crops from file ``start`` on, a chunk at a time; the rows written."""
        from tqdm.auto import tqdm

        shape = first.shape[1:]
        batch: list[np.ndarray] = []
        rows: list[int] = []
        positions = range(start, len(self.files))
        for row in tqdm(positions, unit="crop", desc="Reading crops", disable=not progress):
            path = self.files[row]
            image = first if row == start else self.load(path)
            if image is None:
                continue
            if resize_to is None and image.shape[1:] != shape:
                msg = (
                    f"Crop file {str(path)!r} is {image.shape[1:]} pixels but the first file is "
                    f"{shape}. Pass resize_to= to bring all crops to one size."
                )
                raise ValueError(msg)
            if resize_to:
                image = _prepare(image[None], resize_to, dtype)[0]
            batch.append(image)
            rows.append(row)
            if len(batch) >= writer.chunk_cells:
                writer.append(np.stack(batch), cell_names=cell_names[rows[-len(batch) :]])
                batch = []
        if batch:
            writer.append(np.stack(batch), cell_names=cell_names[rows[-len(batch) :]])
        return rows


def crops_from_files(
    paths_or_folder: str | os.PathLike | Sequence[str | os.PathLike],
    out: str | os.PathLike,
    *,
    channel_names: Sequence[str],
    obs: pd.DataFrame | None = None,
    channel_axis: ChannelAxis = "first",
    pattern: str | None = None,
    resize_to: int | None = None,
    dtype: Any = None,
    chunk_cells: int | None = None,
    pixel_size: float | None = None,
    on_error: Literal["raise", "skip"] = "raise",
    nonfinite: Literal["raise", "zero"] = "raise",
    overwrite: bool = False,
    progress: bool = True,
) -> AnnData:
    """Store a folder (or list) of per-cell crop files as a crop store with an AnnData.

    .. long function: documentation and signature; the body is under 80 lines.

    Each file holds one cell's multichannel crop as TIFF or ``.npy``. Files are streamed, so the
    crops need not fit in memory.

    Parameters
    ----------
    paths_or_folder
        A folder (files sorted by name) or a list of paths (kept in the given order).
    out
        Output folder; receives ``crops.zarr`` and ``cells.h5ad``.
    channel_names
        One name per channel.
    obs
        Per-cell annotations, one row per file in file order. By default the index is the file
        name without extension (duplicates are made unique with a warning).
    channel_axis
        Channel axis of each file's image: ``"first"`` (C, Y, X) or ``"last"`` (Y, X, C).
    pattern
        Glob pattern selecting files in the folder, e.g. ``"*_crop.tif"``; by default every
        ``.tif``, ``.tiff`` and ``.npy`` file.
    resize_to
        Resize each crop to ``resize_to`` x ``resize_to`` pixels with anti-aliasing; needed when
        the files differ in size.
    dtype
        ``uint8``, ``uint16`` or ``float32``; `None` keeps the first file's type when possible.
    chunk_cells
        Cells per chunk of the store.
    pixel_size
        Pixel size in micrometres.
    on_error
        A file that cannot be read (corrupt or truncated): ``"raise"`` stops with an error
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
    AnnData with one row per stored file, written to ``out/cells.h5ad``, with
    ``obs["source_file"]``, ``obs["crop_index"]``, the store link in ``uns["crops"]`` and
    ``uns["import_crops"]``.

    Examples
    --------
    >>> import mcvi_ops
    >>> adata = mcvi_ops.io.crops_from_files(  # doctest: +SKIP
    ...     "my_crops/", "store/", channel_names=["DNA", "actin"], channel_axis="last"
    ... )
    """
    if on_error not in ("raise", "skip"):
        msg = f"on_error must be 'raise' or 'skip', got {on_error!r}."
        raise ValueError(msg)
    files = _list_files(paths_or_folder, pattern)
    names = check_channel_names(channel_names)
    obs = _check_obs(obs, len(files), [stem(p) for p in files])
    if "source_file" not in obs:
        obs["source_file"] = [str(p) for p in files]
    reader = _CropFiles(files, channel_axis=channel_axis, n_channels=len(names), on_error=on_error)
    start, first = reader.first_readable()
    out_dtype = _out_dtype(dtype, first.dtype)
    lock = output_lock(out)
    try:
        store_path, adata_path = _output_paths(out, overwrite)
        with CropWriter(
            str(store_path),
            n_channels=len(names),
            crop_size=(resize_to, resize_to) if resize_to else first.shape[1:],
            channel_names=names,
            dtype=out_dtype,
            chunk_cells=chunk_cells,
            pixel_size=pixel_size,
            nonfinite=nonfinite,
            overwrite=overwrite,
        ) as writer:
            rows = reader.write(
                writer, obs.index, start, first, resize_to, out_dtype, progress=progress
            )
        info = {
            "source": "files",
            "n_cells": len(rows),
            "channel_names": names,
            "resize_to": resize_to,
            "skipped_files": reader.skipped,
        }
        return _finish(obs.iloc[rows], writer.store, adata_path, info)
    finally:
        lock.release()
