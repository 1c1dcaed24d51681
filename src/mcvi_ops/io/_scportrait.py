"""Read scPortrait single-cell image datasets (``.h5sc``) into a crop store.

The format followed is scPortrait 1.7 (``scportrait.io.h5sc``, MannLabs/scPortrait at commit
9004a7a, April 2026): an AnnData HDF5 file whose images are the dataset
``/obsm/single_cell_images`` of shape (cells, channels, height, width), float16 scaled to
[0, 1], chunked one crop channel at a time. Mask channels come first, then image channels;
``var["channels"]`` names them and ``var["channel_mapping"]`` marks each ``"mask"`` or
``"image_channel"`` (also stored in ``uns["single_cell_images/channel_names"]`` and
``".../channel_mapping"`` and as attributes of the dataset). ``obs["scportrait_cell_id"]`` is the
segmentation label of each cell. An ``.h5ad`` written by anndata with
``obsm["single_cell_images"]`` has the same layout and is read the same way.
"""

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
from mcvi_ops.data._link import write_h5ad
from mcvi_ops.data._tables import unique_cell_ids
from mcvi_ops.pp._resume import ADATA_NAME

from ._from_crops import crops_from_array, output_lock

logger = logging.getLogger(__name__)

SCPORTRAIT_VERSION = "1.7"
IMAGES = "obsm/single_cell_images"
_UNS_PREFIX = "single_cell_images/"


class _ChosenChannels:
    """Some channels of a (cells, channels, height, width) dataset, read a few cells at a time."""

    def __init__(self, dataset: Any, chosen: list[int]) -> None:
        self._dataset, self._chosen = dataset, chosen
        n_cells, _, height, width = dataset.shape
        self.shape = (n_cells, len(chosen), height, width)
        self.dtype = np.dtype(dataset.dtype)
        self.ndim = 4

    def __getitem__(self, rows: slice) -> np.ndarray:
        # h5py selects channels only in increasing order, so read all and pick in memory
        return np.asarray(self._dataset[rows])[:, self._chosen]


def _strings(values: Any) -> list[str]:
    return [v.decode() if isinstance(v, bytes) else str(v) for v in np.asarray(values).ravel()]


def _channel_metadata(handle, n_channels: int) -> tuple[list[str] | None, list[str] | None]:
    """Channel names and mask/image mapping from var, uns or the dataset's attributes."""
    from anndata.io import read_elem

    names = mapping = None
    if "var" in handle:
        var = read_elem(handle["var"])
        if len(var) == n_channels:
            names = _strings(var["channels"]) if "channels" in var else _strings(var.index)
            if "channel_mapping" in var:
                mapping = _strings(var["channel_mapping"])
    if "uns" in handle:
        uns = handle["uns"]
        key_names, key_mapping = _UNS_PREFIX + "channel_names", _UNS_PREFIX + "channel_mapping"
        if key_names in uns and (names is None or names == [str(i) for i in range(n_channels)]):
            names = _strings(read_elem(uns[key_names]))
        if key_mapping in uns and mapping is None:
            mapping = _strings(read_elem(uns[key_mapping]))
    attrs = handle[IMAGES].attrs
    if names is None and "channel_names" in attrs:
        names = _strings(attrs["channel_names"])
    if mapping is None and "channel_mapping" in attrs:
        mapping = _strings(attrs["channel_mapping"])
    if names is not None and len(names) != n_channels:
        names = None
    if mapping is not None and len(mapping) != n_channels:
        mapping = None
    return names, mapping


def _select_channels(
    channels: Literal["image", "all"] | Sequence[str],
    names: list[str],
    mapping: list[str] | None,
    path: Path,
) -> list[int]:
    if isinstance(channels, str) and channels == "all":
        return list(range(len(names)))
    if isinstance(channels, str) and channels == "image":
        if mapping is None:
            logger.info("%s marks no mask channels; reading all %d channels.", path, len(names))
            return list(range(len(names)))
        chosen = [i for i, m in enumerate(mapping) if m == "image_channel"]
        if not chosen:
            msg = (
                f"{str(path)!r} has no channel marked 'image_channel' (mapping {mapping}). Pass "
                f"channels='all' or a list of names from {names}."
            )
            raise ValueError(msg)
        return chosen
    if isinstance(channels, str):
        msg = f"channels must be 'image', 'all' or a list of channel names, got {channels!r}."
        raise ValueError(msg)
    unknown = [c for c in channels if c not in names]
    if unknown:
        msg = f"Channel(s) {unknown} are not in {str(path)!r}; its channels are {names}."
        raise KeyError(msg)
    return [names.index(c) for c in channels]


def read_scportrait(
    path: str | os.PathLike,
    out: str | os.PathLike | None = None,
    *,
    channels: Literal["image", "all"] | Sequence[str] = "image",
    channel_names: Sequence[str] | None = None,
    chunk_cells: int | None = None,
    nonfinite: Literal["raise", "zero"] = "raise",
    overwrite: bool = False,
    progress: bool = True,
) -> AnnData:
    """Copy the crops of an scPortrait single-cell image dataset into a crop store with an AnnData.

    Follows scPortrait 1.7's ``.h5sc`` format (see the module docstring of
    ``mcvi_ops.io._scportrait``). The float16 crops are converted to float32 (the crop store holds
    uint8, uint16 or float32) and keep scPortrait's [0, 1] scaling. They are copied one store
    chunk at a time, so memory use does not grow with the number of cells.

    Parameters
    ----------
    path
        An scPortrait ``.h5sc`` file (``single_cells.h5sc`` of an extraction run) or an ``.h5ad``
        with ``obsm["single_cell_images"]`` of shape (cells, channels, height, width).
    out
        Output folder for ``crops.zarr`` and ``cells.h5ad``; by default ``<path without
        suffix>_crops`` next to the input.
    channels
        ``"image"``: the image channels only (scPortrait stores segmentation masks as the first
        channels); ``"all"``: masks too; or a list of channel names in the order wanted.
    channel_names
        Names of all channels of the file, when it does not store them.
    chunk_cells
        Cells per chunk of the crop store.
    nonfinite
        NaN/inf pixels: ``"raise"`` (an error naming the cells) or ``"zero"`` (set to 0 and
        counted in ``uns["import_crops"]`` and the store attribute ``nonfinite``).
    overwrite
        Replace an existing ``crops.zarr`` / ``cells.h5ad`` in ``out``.
    progress
        Show a progress bar.

    Returns
    -------
    AnnData with one row per cell, in file order, written to ``out/cells.h5ad``:

    ``.obs``
        The file's ``.obs`` (with ``scportrait_cell_id``) and ``obs["crop_index"]``.
    ``.uns["crops"]``
        The link to ``out/crops.zarr`` (float32 crops of the selected channels).
    ``.uns["import_crops"]``
        ``source`` (``"scportrait"``), the input file, scPortrait version followed, the channel
        names and mapping of the file, the channels copied and the counts of
        :func:`~mcvi_ops.io.crops_from_array` (``n_nonfinite_values``, ``n_nonfinite_cells``).

    Cell ids (the obs names) are the file's obs names; duplicates are kept and made unique with a
    suffix (``-1``, ``-2``) and a warning.

    Examples
    --------
    >>> import mcvi_ops
    >>> adata = mcvi_ops.io.read_scportrait(  # doctest: +SKIP
    ...     "project/extraction/data/single_cells.h5sc", "crops/"
    ... )
    """
    path = Path(path).expanduser()
    if not path.is_file():
        msg = f"scPortrait file {str(path)!r} does not exist. Check the path."
        raise FileNotFoundError(msg)
    if out is None:
        out = path.with_name(f"{path.name.split('.')[0]}_crops")
    lock = output_lock(out)  # held until cells.h5ad is rewritten below
    try:
        return _read(
            path, out, channels, channel_names, chunk_cells, nonfinite, overwrite, progress
        )
    finally:
        lock.release()


def _read(path, out, channels, channel_names, chunk_cells, nonfinite, overwrite, progress):
    import h5py
    from anndata.io import read_elem

    try:
        handle = h5py.File(path, "r")
    except OSError as err:
        msg = (
            f"{str(path)!r} is not an HDF5 file ({err}); scPortrait datasets are .h5sc (HDF5) "
            "files written by scPortrait's extraction or scportrait.io.write_h5sc."
        )
        raise ValueError(msg) from err
    with handle:
        if IMAGES not in handle or not isinstance(handle[IMAGES], h5py.Dataset):
            msg = (
                f"{str(path)!r} holds no single-cell images at /{IMAGES}. Pass an scPortrait "
                "single_cells.h5sc file, or an h5ad with obsm['single_cell_images']."
            )
            raise KeyError(msg)
        dataset = handle[IMAGES]
        if dataset.ndim != 4:
            msg = (
                f"/{IMAGES} in {str(path)!r} has shape {dataset.shape}; expected (cells, channels, "
                "height, width)."
            )
            raise ValueError(msg)
        n_cells, n_channels, height, width = dataset.shape
        dtype_in = str(dataset.dtype)
        names, mapping = _channel_metadata(handle, n_channels)
        if channel_names is not None:
            if len(channel_names) != n_channels:
                msg = (
                    f"{len(channel_names)} channel_names given but {str(path)!r} has {n_channels} "
                    "channels (masks included). Give one name per channel of the file."
                )
                raise ValueError(msg)
            names = [str(c) for c in channel_names]
        if names is None:
            msg = (
                f"{str(path)!r} stores no channel names (var['channels'], uns or attributes); pass "
                f"channel_names= with {n_channels} names."
            )
            raise ValueError(msg)
        chosen = _select_channels(channels, names, mapping, path)
        obs = read_elem(handle["obs"]) if "obs" in handle else pd.DataFrame()
        if len(obs) != n_cells:
            msg = f"{str(path)!r} has {len(obs)} obs rows for {n_cells} single-cell images."
            raise ValueError(msg)
        obs.index = unique_cell_ids(obs.index, what=f"The obs of {str(path)!r}")
        kept = [names[i] for i in chosen]
        adata = crops_from_array(
            _ChosenChannels(dataset, chosen),
            out,
            channel_names=kept,
            obs=obs,
            dtype=np.float32,
            chunk_cells=chunk_cells,
            nonfinite=nonfinite,
            overwrite=overwrite,
            progress=progress,
        )
    info = {
        "source": "scportrait",
        "file": str(path.resolve()),
        "scportrait_version_followed": SCPORTRAIT_VERSION,
        "n_cells": int(n_cells),
        "file_channel_names": names,
        "file_channel_mapping": mapping or [],
        "channel_names": kept,
        "dtype_in": dtype_in,
    }
    adata.uns[UNS.import_crops] = {**adata.uns[UNS.import_crops], **info}
    write_h5ad(adata, Path(out).expanduser().resolve() / ADATA_NAME)
    return adata
