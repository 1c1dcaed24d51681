"""Helpers shared by the analysis tools, metrics and plots."""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
import pandas as pd
from anndata import AnnData
from scipy import sparse

from mcvi_ops._utils import check_obs_key

logger = logging.getLogger(__name__)

__all__ = [
    "check_finite",
    "check_obs_key",
    "codes_of",
    "finite_rows",
    "gene_rows",
    "get_rep",
    "group_means",
    "rep_label",
    "rep_names",
]


def rep_names(use_rep: str | Sequence[str] | None) -> list[str | None]:
    """Normalise ``use_rep`` into a list of representation names (`None` means ``.X``)."""
    if use_rep is None or isinstance(use_rep, str):
        return [use_rep]
    names = list(use_rep)
    if not names:
        msg = "`use_rep` is an empty sequence. Pass a key of `.obsm` or a list of keys."
        raise ValueError(msg)
    return names


def rep_label(use_rep: str | None) -> str:
    """Name under which results for a representation are stored (``"X"`` for ``.X``)."""
    return "X" if use_rep is None else use_rep


def gene_rows(
    adata: AnnData, gene_key: str | None, control_category
) -> tuple[np.ndarray, np.ndarray]:
    """Gene of each row as strings, and the mask of the rows that are not controls.

    The gene is ``obs[gene_key]``, or the obs name when ``gene_key`` is `None`. Control rows are
    those of ``control_category`` and those flagged by ``obs["is_control"]`` (as
    :func:`~mcvi_ops.tl.aggregate` writes).
    """
    if gene_key is None:
        genes = np.asarray(adata.obs_names, dtype=object)
    else:
        genes = check_obs_key(adata, gene_key, what="gene").to_numpy(dtype=object)
    genes = genes.astype(str)
    keep = genes != str(control_category)
    if "is_control" in adata.obs:
        keep &= ~adata.obs["is_control"].to_numpy(dtype=bool)
    return genes, keep


def _raw_rep(adata: AnnData, use_rep: str | None):
    if use_rep is None or use_rep == "X":
        if adata.X is None or adata.n_vars == 0:
            msg = (
                "`use_rep=None` reads `.X`, but `.X` is empty. Pass `use_rep` with one of the "
                f"keys of `.obsm`: {list(adata.obsm.keys())}."
            )
            raise ValueError(msg)
        return adata.X
    if use_rep not in adata.obsm:
        msg = (
            f"Did not find .obsm[{use_rep!r}]; available keys are {list(adata.obsm.keys())}. "
            "Run `model.get_latent_representation(...)` and store it in `.obsm` first, or "
            "aggregate with `mcvi_ops.tl.aggregate(..., use_rep=...)`."
        )
        raise KeyError(msg)
    return adata.obsm[use_rep]


# scanpy has no public helper for this: `scanpy.get._get_obs_rep` is private and
# `scanpy.tools._utils._choose_representation` is private too and may run a PCA. So we keep ours.
def get_rep(adata: AnnData, use_rep: str | None, *, dtype=np.float64) -> np.ndarray:
    """Return ``adata.obsm[use_rep]`` (or ``adata.X`` for `None`/``"X"``) as a dense 2-D array."""
    x = _raw_rep(adata, use_rep)
    if isinstance(x, pd.DataFrame):
        x = x.to_numpy()
    if sparse.issparse(x):
        x = x.toarray()
    x = np.asarray(x, dtype=dtype)
    if x.ndim == 1:
        x = x[:, None]
    if x.ndim != 2:
        msg = f"Representation {rep_label(use_rep)!r} must be 2-D, got shape {x.shape}."
        raise ValueError(msg)
    return x


def finite_rows(adata: AnnData, use_rep: str | None) -> np.ndarray:
    """Boolean mask of the rows whose representation has no NaN or infinite value.

    Reads the stored array as it is (no float64 copy of a large embedding).
    """
    x = _raw_rep(adata, use_rep)
    if isinstance(x, pd.DataFrame):
        x = x.to_numpy()
    if sparse.issparse(x):
        x = sparse.csr_matrix(x)
        bad = ~np.isfinite(x.data)
        row_of = np.repeat(np.arange(x.shape[0]), np.diff(x.indptr))
        ok = np.ones(x.shape[0], dtype=bool)
        ok[row_of[bad]] = False
        return ok
    x = np.asarray(x)
    if not np.issubdtype(x.dtype, np.inexact):
        return np.ones(x.shape[0], dtype=bool)
    ok = np.isfinite(x)
    return ok.reshape(x.shape[0], -1).all(axis=1)


def check_finite(
    x: np.ndarray,
    use_rep: str | None,
    *,
    rows: str = "cells",
    names: Sequence | None = None,
    n_rows: int | None = None,
) -> None:
    """Raise a ValueError naming the representation and how many rows hold NaN or infinity.

    ``n_rows`` is the number of rows checked when ``x`` holds only some of them (by default
    ``len(x)``).
    """
    bad = ~np.isfinite(x).reshape(x.shape[0], -1).all(axis=1)
    if not bad.any():
        return
    label = rep_label(use_rep)
    array = "adata.X" if label == "X" else f"adata.obsm[{label!r}]"
    example = f" (e.g. {list(np.asarray(names)[bad][:5])})" if names is not None else ""
    msg = (
        f"Representation {label!r} has NaN or infinite values in {int(bad.sum())} of its "
        f"{x.shape[0] if n_rows is None else n_rows} {rows}{example}. Drop those {rows} first, e.g. "
        f"`adata = adata[np.isfinite({array}).all(axis=1)].copy()`, or recompute the embedding."
    )
    raise ValueError(msg)


#: rows of a representation converted to float64 at a time by :func:`group_means`
_BLOCK_ROWS = 262_144


def group_means(x: np.ndarray, codes: np.ndarray, n_groups: int) -> tuple[np.ndarray, np.ndarray]:
    """Mean of the rows of ``x`` per integer group code (codes < 0 are ignored).

    A sparse indicator matrix times ``x``: one pass over the data, linear in the number of rows.
    Sums accumulate in float64 a block of :data:`_BLOCK_ROWS` rows at a time, so a float32
    embedding of millions of cells is never copied whole. Groups without rows get NaN. Kept
    instead of :func:`scanpy.get.aggregate`, which does the same product but needs an AnnData and
    a categorical and is 6-7x slower here (``benchmarks/bench_aggregate.py``, 64 dims, 20,000
    groups, best of 3 on a shared 2-core CPU, 2026-12-01: 0.04 s vs 0.27 s for 100,000 cells,
    0.30 s vs 1.86 s for 1,000,000 cells; see ``benchmarks/results/aggregate.md``). scanpy
    1.11's ``mask=`` also divides masked sums by unmasked counts (fixed in scverse/scanpy#4178),
    and we need codes < 0 ignored.
    """
    codes = np.asarray(codes)
    counts = np.bincount(codes[codes >= 0], minlength=n_groups)
    sums = np.zeros((n_groups, *x.shape[1:]))
    for start in range(0, x.shape[0], _BLOCK_ROWS):
        block = codes[start : start + _BLOCK_ROWS]
        keep = block >= 0
        indicator = sparse.csr_matrix(
            (np.ones(int(keep.sum())), (block[keep], np.flatnonzero(keep))),
            shape=(n_groups, block.size),
        )
        sums += indicator @ np.asarray(x[start : start + _BLOCK_ROWS], dtype=np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        means = sums / counts[:, None]
    return means, counts


def codes_of(values: pd.Series | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Integer codes of each value's string form, and the sorted unique strings.

    ``names[codes]`` equals ``values.astype(str)`` (code -1 for missing values), computed from
    the unique values only: a categorical column of millions of cells is never turned into an
    array of strings.
    """
    codes, uniques = pd.factorize(values, use_na_sentinel=True)
    names, remap = np.unique(np.asarray(uniques, dtype=object).astype(str), return_inverse=True)
    codes = np.where(codes >= 0, remap.reshape(-1)[codes], -1)
    return codes, names
