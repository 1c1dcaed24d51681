"""Tie AnnData rows to crops in a :class:`~mcvi_ops.data.CropStore`."""

from __future__ import annotations

import contextlib
import logging
import os
from typing import Any

import anndata
import numpy as np
import pandas as pd
from anndata import AnnData

from mcvi_ops._constants import DEFAULT_INDEX_KEY, UNS

from ._store import CropStore, IncompleteStoreError, StoreLike, open_crops

logger = logging.getLogger(__name__)

UNS_KEY = UNS.crops


def link_crops(
    adata: AnnData,
    store_or_path: CropStore | StoreLike,
    *,
    index_key: str | None = None,
    uns_key: str = UNS_KEY,
    storage_options: dict | None = None,
) -> None:
    """Tie each row of ``adata`` to a crop in a crop store.

    .. long function: documentation and signature; the body is under 80 lines.

    Parameters
    ----------
    adata
        Cells, one row each.
    store_or_path
        An open :class:`~mcvi_ops.data.CropStore`, or anything :func:`~mcvi_ops.data.open_crops`
        accepts.
    index_key
        Column of ``adata.obs`` holding each row's integer crop index. If `None`, row ``i`` is tied
        to crop ``i`` and the indices are written to ``adata.obs["crop_index"]``.
    uns_key
        Key in ``adata.uns`` under which the store reference is written.
    storage_options
        Passed to fsspec when ``store_or_path`` is a URL.

    Returns
    -------
    Nothing; sets

    ``adata.obs[index_key]``
        Integer crop index of each row (``"crop_index"`` by default).
    ``adata.uns[uns_key]``
        The store reference (``url``, ``index_key``, ``n_crops``, ``channel_names``, ``crop_size``,
        ``dtype``, ``store_id``): plain data that survives ``write_h5ad``/``write_zarr``.
        :func:`linked_store` uses ``store_id`` and ``n_crops`` to notice a store that was
        replaced or shrunk after linking.

    Examples
    --------
    >>> import anndata as ad, numpy as np, pandas as pd
    >>> import mcvi_ops
    >>> crops = np.zeros((3, 1, 8, 8), dtype=np.uint16)
    >>> store = mcvi_ops.data.write_crops("memory://linked.zarr", crops, channel_names=["DAPI"])
    >>> adata = ad.AnnData(obs=pd.DataFrame(index=["a", "b", "c"]))
    >>> mcvi_ops.data.link_crops(adata, store)
    >>> adata.uns["crops"]["store_id"] == store.store_id
    True
    """
    store = (
        store_or_path
        if isinstance(store_or_path, CropStore)
        else open_crops(store_or_path, storage_options=storage_options)
    )
    if not store.complete:
        msg = (
            f"Cannot link to the crop store {store.url}: it is incomplete (its writer did not "
            "finish). Finish or rerun the writing first."
        )
        raise IncompleteStoreError(msg)
    if index_key is None:
        if adata.n_obs != store.n_cells:
            msg = (
                f"AnnData has {adata.n_obs} rows but the crop store has {store.n_cells} crops, so "
                "rows cannot be tied to crops by position. Pass `index_key=` naming an obs column "
                "of integer crop indices."
            )
            raise ValueError(msg)
        index_key = DEFAULT_INDEX_KEY
        adata.obs[index_key] = np.arange(adata.n_obs, dtype=np.int64)
    elif index_key not in adata.obs:
        msg = (
            f"Column {index_key!r} not found in adata.obs (columns: {list(adata.obs.columns)}). "
            "Pass the column holding crop indices, or `index_key=None` to tie row i to crop i."
        )
        raise KeyError(msg)
    _check_indices(adata.obs[index_key], store.n_cells, index_key)
    adata.obs[index_key] = adata.obs[index_key].to_numpy().astype(np.int64)
    reference = store.reference()
    reference["index_key"] = index_key
    if storage_options:
        reference["storage_options"] = dict(storage_options)
    adata.uns[uns_key] = reference


def _check_indices(values: pd.Series, n_crops: int, index_key: str) -> None:
    if not (pd.api.types.is_integer_dtype(values) or pd.api.types.is_float_dtype(values)):
        msg = f"adata.obs[{index_key!r}] must hold integer crop indices, got dtype {values.dtype}."
        raise TypeError(msg)
    arr = values.to_numpy()
    if np.issubdtype(arr.dtype, np.floating):
        if np.isnan(arr).any() or not np.array_equal(arr, np.round(arr)):
            msg = f"adata.obs[{index_key!r}] holds NaN or non-integer values; crop indices must be whole numbers."
            raise ValueError(msg)
    if len(arr) and (arr.min() < 0 or arr.max() >= n_crops):
        bad = int(arr[(arr < 0) | (arr >= n_crops)][0])
        msg = (
            f"adata.obs[{index_key!r}] holds crop index {bad}, outside the store's range "
            f"[0, {n_crops - 1}]. Relink with the store these cells were cropped into."
        )
        raise IndexError(msg)


def crop_reference(adata: AnnData, *, uns_key: str = UNS_KEY) -> dict[str, Any]:
    """The crop-store reference written by :func:`link_crops`, with a clear error if absent."""
    if uns_key not in adata.uns:
        msg = (
            f"adata.uns[{uns_key!r}] not found: the cells are not linked to crops. Run "
            "`mcvi_ops.data.link_crops(adata, 'crops.zarr')` first."
        )
        raise KeyError(msg)
    reference = dict(adata.uns[uns_key])
    for key in ("url", "index_key"):
        if key not in reference:
            msg = f"adata.uns[{uns_key!r}] lacks {key!r}; relink with `mcvi_ops.data.link_crops`."
            raise KeyError(msg)
    if reference["index_key"] not in adata.obs:
        msg = (
            f"The crop index column {reference['index_key']!r} named in adata.uns[{uns_key!r}] is "
            "missing from adata.obs; relink with `mcvi_ops.data.link_crops`."
        )
        raise KeyError(msg)
    return reference


class StoreChangedError(ValueError):
    """The crop store at a linked path is not the one the AnnData was linked to."""


def linked_store(adata: AnnData, *, uns_key: str = UNS_KEY) -> CropStore:
    """Open the crop store that ``adata`` is linked to, checking it is still the same store.

    Parameters
    ----------
    adata
        AnnData linked to a crop store with :func:`link_crops`.
    uns_key
        Key of the store reference in ``adata.uns``.

    Returns
    -------
    The opened :class:`~mcvi_ops.data.CropStore`. Raises
    :class:`~mcvi_ops.data.StoreChangedError` when the store at the linked path was replaced
    (another ``store_id``) or holds fewer crops than the AnnData links to.

    Examples
    --------
    >>> import mcvi_ops
    >>> adata = mcvi_ops.datasets.synthetic_screen(n_cells=200, n_genes=10, seed=0)
    >>> mcvi_ops.data.linked_store(adata).n_cells
    200
    """
    reference = crop_reference(adata, uns_key=uns_key)
    options = reference.get("storage_options")
    url = str(reference["url"])
    store = open_crops(url, storage_options=dict(options) if options else None)
    relink = (
        f"`mcvi_ops.data.link_crops(adata, {url!r}, index_key={reference['index_key']!r})` if "
        "the store holds these cells' crops in the linked order, otherwise recreate the store "
        "(e.g. rerun extract_crops) and use the AnnData written with it"
    )
    linked_id = reference.get("store_id")
    if linked_id is not None and store.store_id is not None and linked_id != store.store_id:
        msg = (
            f"The crop store at {url} was replaced after adata was linked to it: adata.uns"
            f"[{uns_key!r}] names store_id {linked_id!r} but the store there is {store.store_id!r}."
            f" Its crops may be different cells. Relink with {relink}."
        )
        raise StoreChangedError(msg)
    indices = adata.obs[reference["index_key"]].to_numpy()
    needed = int(np.max(indices)) + 1 if len(indices) else 0
    linked_n = int(reference.get("n_crops", needed))
    # indices past the end of a store that did not shrink are bad indices: callers check those
    if needed > store.n_cells and linked_n > store.n_cells:
        msg = (
            f"The crop store at {url} holds {store.n_cells} crops but adata links to crop index "
            f"{needed - 1} (it held {reference.get('n_crops', '?')} crops when linked): the store "
            f"shrank since. Relink with {relink}."
        )
        raise StoreChangedError(msg)
    return store


def get_crops(adata: AnnData, rows: Any = None, *, uns_key: str = UNS_KEY) -> np.ndarray:
    """Read the crops of some rows of ``adata``.

    Parameters
    ----------
    adata
        AnnData linked to a crop store with :func:`link_crops`.
    rows
        Integer positions, a boolean mask, obs names, or a slice; `None` for all rows.
    uns_key
        Key of the store reference in ``adata.uns``.

    Returns
    -------
    Array of shape ``(len(rows), n_channels, height, width)`` in the order of ``rows``.

    Examples
    --------
    >>> import mcvi_ops
    >>> adata = mcvi_ops.datasets.synthetic_screen(n_cells=200, n_genes=10, seed=0)
    >>> mcvi_ops.data.get_crops(adata, [0, 10]).shape
    (2, 4, 64, 64)
    """
    reference = crop_reference(adata, uns_key=uns_key)
    indices = adata.obs[reference["index_key"]].to_numpy()
    if rows is None:
        positions: Any = slice(None)
    elif isinstance(rows, slice):
        positions = rows
    else:
        rows_arr = np.asarray(rows)
        if rows_arr.ndim == 0:
            rows_arr = rows_arr.reshape(1)
        if rows_arr.dtype.kind in "OUS":
            positions = adata.obs_names.get_indexer(rows_arr)
            if (positions < 0).any():
                missing = rows_arr[positions < 0][:5].tolist()
                msg = f"Cells {missing} are not in adata.obs_names."
                raise KeyError(msg)
        else:
            positions = rows_arr
    return linked_store(adata, uns_key=uns_key).take(indices[positions])


def write_h5ad(adata: AnnData, path: str | os.PathLike) -> None:
    """Write ``adata`` to ``path`` as ``.h5ad`` atomically, also when its columns hold pandas strings.

    The file is written under a temporary name and renamed into place when complete, so a
    failed write (disk full, Ctrl-C) leaves an earlier file at ``path`` as it was, and a
    symbolic link at ``path`` is replaced, not written through. With pandas 3 (or
    ``future.infer_string``) text columns and indices are pandas string arrays, which anndata
    0.11+ writes only with ``anndata.settings.allow_write_nullable_strings`` on; it is switched
    on for this write only, when the installed anndata has it.
    """
    from ._files import atomic_path

    settings = anndata.settings
    allow = (
        settings.override(allow_write_nullable_strings=True)
        if hasattr(settings, "allow_write_nullable_strings")
        else contextlib.nullcontext()
    )
    with allow, atomic_path(path) as tmp:
        adata.write_h5ad(tmp)
