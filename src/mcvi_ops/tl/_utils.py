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

__all__ = ["check_obs_key", "get_rep", "group_means", "rep_label", "rep_names"]


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


def get_rep(adata: AnnData, use_rep: str | None, *, dtype=np.float64) -> np.ndarray:
    """Return ``adata.obsm[use_rep]`` (or ``adata.X`` for `None`/``"X"``) as a dense 2-D array."""
    if use_rep is None or use_rep == "X":
        if adata.X is None or adata.n_vars == 0:
            msg = (
                "`use_rep=None` reads `.X`, but `.X` is empty. Pass `use_rep` with one of the "
                f"keys of `.obsm`: {list(adata.obsm.keys())}."
            )
            raise ValueError(msg)
        x = adata.X
    else:
        if use_rep not in adata.obsm:
            msg = (
                f"Did not find .obsm[{use_rep!r}]; available keys are {list(adata.obsm.keys())}. "
                "Run `model.get_latent_representation(...)` and store it in `.obsm` first, or "
                "aggregate with `mcvi_ops.tl.aggregate(..., use_rep=...)`."
            )
            raise KeyError(msg)
        x = adata.obsm[use_rep]
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


def group_means(x: np.ndarray, codes: np.ndarray, n_groups: int) -> tuple[np.ndarray, np.ndarray]:
    """Mean of the rows of ``x`` per integer group code (codes < 0 are ignored).

    A sparse indicator matrix times ``x``: one pass over the data, linear in the number of rows.
    """
    keep = codes >= 0
    rows = codes[keep]
    cols = np.flatnonzero(keep)
    indicator = sparse.csr_matrix(
        (np.ones(rows.size, dtype=x.dtype), (rows, cols)), shape=(n_groups, x.shape[0])
    )
    counts = np.bincount(rows, minlength=n_groups)
    sums = np.asarray(indicator @ x)
    with np.errstate(invalid="ignore", divide="ignore"):
        means = sums / counts[:, None]
    return means, counts
