"""Technical covariates of each cell (plate-well batch, field-of-view and well position)."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Literal

import numpy as np
import pandas as pd
from anndata import AnnData

from mcvi_ops._constants import UNS
from mcvi_ops._utils import check_obs_key

logger = logging.getLogger(__name__)

POSITIONS = ["center", "edge"]


def _tile_grid(adata: AnnData, tile_grid) -> tuple[int, int] | None:
    if tile_grid is None:
        meta = adata.uns.get(UNS.synthetic, {})
        tile_grid = meta.get("tile_grid") if isinstance(meta, Mapping) else None
    if tile_grid is None:
        return None
    grid = tuple(int(v) for v in np.asarray(tile_grid).ravel())
    if len(grid) != 2 or min(grid) < 1:
        msg = f"`tile_grid` must be [n_rows, n_cols] with positive entries, got {tile_grid!r}."
        raise ValueError(msg)
    return grid


def derive_covariates(
    adata: AnnData,
    *,
    plate_key: str | None = "plate",
    well_key: str = "well",
    tile_key: str = "tile",
    i_key: str = "cell_i",
    j_key: str = "cell_j",
    tile_size: float = 2960,
    fov_center_radius: float = 450,
    fov_edge_radius: float = 1200,
    tile_grid: Sequence[int] | None = None,
    tile_order: Literal["row-major", "column-major", "snake"] = "row-major",
    well_layout: Mapping | pd.Series | None = None,
    edge_width: int = 1,
) -> pd.DataFrame:
    """Derive technical covariates of each cell from its plate, well, tile and centroid.

    .. long function: documentation and signature; the body is under 80 lines.

    Parameters
    ----------
    adata
        Cells, one row each.
    plate_key, well_key
        Obs columns of plate and well; ``batch`` is ``"{plate}_{well}"`` (the well alone when
        ``plate_key`` is `None` or absent).
    tile_key
        Obs column of the tile (field of view) index within the well.
    i_key, j_key
        Obs columns of the centroid row and column (pixels) within the tile.
    tile_size
        Tile side length in pixels (2,960 in Funk et al. 2022).
    fov_center_radius, fov_edge_radius
        A cell is ``"center"`` if its distance to the tile centre is below ``fov_center_radius``,
        ``"edge"`` if it is at least ``fov_edge_radius``; cells in between get NaN and are left out
        of the covariate tests.
    tile_grid
        ``[n_rows, n_cols]`` of the rectangular tile grid of each well. `None` reads
        ``adata.uns["synthetic_screen"]["tile_grid"]`` if present.
    tile_order
        How tile indices run through the grid: ``"row-major"`` (tile ``t`` is at
        ``divmod(t, n_cols)``), ``"column-major"`` (``t`` is at ``(t % n_rows, t // n_rows)``) or
        ``"snake"`` (row-major with odd rows running right to left; the boundary rule is symmetric,
        so it labels tiles like ``"row-major"``).
    well_layout
        Mapping tile index -> ``"edge"``/``"center"`` (e.g. for the circular tile layouts of real
        wells); takes precedence over ``tile_grid``. Tiles not in the mapping get NaN.
    edge_width
        Number of tile rows/columns on the grid boundary that count as the well ``"edge"``.

    Returns
    -------
    DataFrame with the derived columns (indexed like ``adata.obs``). Also sets

    ``adata.obs["batch"]``
        Plate and well.
    ``adata.obs["fov_position"]``
        ``"center"``/``"edge"``/NaN, if the centroid columns exist.
    ``adata.obs["fov_distance"]``
        Distance of the centroid from the tile centre in half tile widths (0 at the centre, 1 at
        the middle of a tile side), if the centroid columns exist: a continuous covariate for
        ``FeatureMCVAE.setup_anndata(..., continuous_covariate_keys=["fov_distance"])``.
    ``adata.obs["well_position"]``
        ``"center"``/``"edge"``/NaN, if a tile grid or ``well_layout`` is known.

    Examples
    --------
    >>> import mcvi_ops
    >>> adata = mcvi_ops.datasets.synthetic_screen(n_cells=500, n_genes=10, seed=0)
    >>> covariates = mcvi_ops.pp.derive_covariates(adata)
    >>> sorted(adata.obs["fov_position"].dropna().unique())
    ['center', 'edge']
    """
    if not 0 < fov_center_radius <= fov_edge_radius:
        msg = (
            "Need 0 < fov_center_radius <= fov_edge_radius, got "
            f"{fov_center_radius} and {fov_edge_radius}."
        )
        raise ValueError(msg)
    if tile_order not in ("row-major", "column-major", "snake"):
        msg = f"`tile_order` must be 'row-major', 'column-major' or 'snake', got {tile_order!r}."
        raise ValueError(msg)
    obs = adata.obs
    out = pd.DataFrame(index=obs.index)
    well = check_obs_key(adata, well_key, what="well").astype(str)
    if plate_key is not None and plate_key in obs:
        out["batch"] = pd.Categorical(obs[plate_key].astype(str) + "_" + well)
    else:
        out["batch"] = pd.Categorical(well)

    if i_key in obs and j_key in obs:
        half = tile_size / 2
        dist = np.hypot(
            obs[i_key].to_numpy(dtype=float) - half, obs[j_key].to_numpy(dtype=float) - half
        )
        pos = np.full(dist.size, None, dtype=object)
        pos[dist < fov_center_radius] = "center"
        pos[dist >= fov_edge_radius] = "edge"
        out["fov_position"] = pd.Categorical(pos, categories=POSITIONS)
        out["fov_distance"] = (dist / half).astype(np.float32)
    else:
        logger.warning("No centroid columns %r/%r in .obs; fov_position not derived.", i_key, j_key)

    grid = _tile_grid(adata, tile_grid)
    if well_layout is not None or grid is not None:
        tiles = check_obs_key(adata, tile_key, what="tile")
        if well_layout is not None:
            layout = (
                pd.Series(well_layout) if not isinstance(well_layout, pd.Series) else well_layout
            )
            bad = set(layout.dropna().unique()) - set(POSITIONS)
            if bad:
                msg = f"`well_layout` values must be 'edge' or 'center', got {sorted(bad)}."
                raise ValueError(msg)
            pos = tiles.map(layout).to_numpy(dtype=object)
        else:
            n_rows, n_cols = grid
            t = tiles.to_numpy(dtype=np.int64)
            if t.min() < 0 or t.max() >= n_rows * n_cols:
                msg = (
                    f"Tile indices span [{t.min()}, {t.max()}] but tile_grid={list(grid)} has "
                    f"{n_rows * n_cols} tiles. Pass the right `tile_grid` or a `well_layout`."
                )
                raise ValueError(msg)
            if tile_order == "column-major":
                col, row = np.divmod(t, n_rows)
            else:
                row, col = np.divmod(t, n_cols)
            if tile_order == "snake":
                col = np.where(row % 2 == 1, n_cols - 1 - col, col)
            edge = (
                (row < edge_width)
                | (row >= n_rows - edge_width)
                | (col < edge_width)
                | (col >= n_cols - edge_width)
            )
            pos = np.where(edge, "edge", "center").astype(object)
        out["well_position"] = pd.Categorical(pos, categories=POSITIONS)
    else:
        logger.warning(
            "No tile geometry (tile_grid, adata.uns['synthetic_screen']['tile_grid'] or "
            "well_layout); well_position not derived."
        )
    for column in out:
        adata.obs[column] = out[column]
    return out
