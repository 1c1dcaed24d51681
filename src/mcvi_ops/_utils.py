"""Small helpers shared across the package's layers (no heavy imports)."""

from __future__ import annotations

import pandas as pd
from anndata import AnnData


def check_obs_key(adata: AnnData, key: str, *, what: str, hint: str = "") -> pd.Series:
    """Return ``adata.obs[key]`` or raise a helpful error."""
    if key not in adata.obs:
        msg = (
            f"Did not find the {what} column .obs[{key!r}]; available columns are "
            f"{list(adata.obs.columns)}.{(' ' + hint) if hint else ''}"
        )
        raise KeyError(msg)
    return adata.obs[key]
