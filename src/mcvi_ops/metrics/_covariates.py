"""Leakage of technical covariates (batch, field-of-view and well position) into embeddings."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Literal

import numpy as np
import pandas as pd
from anndata import AnnData
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import f1_score, roc_auc_score
from sklearn.model_selection import train_test_split
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from mcvi_ops.tl._utils import check_obs_key, get_rep, rep_label, rep_names

logger = logging.getLogger(__name__)

POSITIONS = ["center", "edge"]


def _tile_grid(adata: AnnData, tile_grid) -> tuple[int, int] | None:
    if tile_grid is None:
        meta = adata.uns.get("synthetic_screen", {})
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
    ``adata.obs["well_position"]``
        ``"center"``/``"edge"``/NaN, if a tile grid or ``well_layout`` is known.

    Examples
    --------
    >>> import mcvi_ops
    >>> adata = mcvi_ops.data.synthetic_screen(n_cells=1000, seed=0)  # doctest: +SKIP
    >>> mcvi_ops.metrics.derive_covariates(adata)  # doctest: +SKIP
    >>> adata.obs["fov_position"].value_counts()  # doctest: +SKIP
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


def _chance_f1(y: np.ndarray) -> float:
    """Return the expected macro-F1 of guessing classes uniformly at random."""
    _, counts = np.unique(y, return_counts=True)
    p = counts / counts.sum()
    q = 1 / counts.size
    return float(np.mean(2 * p * q / (p + q)))


def _fit_score(
    x: np.ndarray,
    y: np.ndarray,
    *,
    test_size: float,
    min_cells_per_class: int,
    max_cells: int | None,
    rng: np.random.Generator,
    C: float,
    max_iter: int,
) -> dict | None:
    if max_cells is not None and y.size > max_cells:
        take = rng.choice(y.size, size=max_cells, replace=False)
        x, y = x[take], y[take]
    classes, counts = np.unique(y, return_counts=True)
    rare = classes[counts < min_cells_per_class]
    if rare.size:
        keep = ~np.isin(y, rare)
        x, y = x[keep], y[keep]
        classes = classes[counts >= min_cells_per_class]
    if classes.size < 2:
        return None
    x_tr, x_te, y_tr, y_te = train_test_split(
        x, y, test_size=test_size, stratify=y, random_state=int(rng.integers(2**31 - 1))
    )
    clf = make_pipeline(
        StandardScaler(),
        LogisticRegression(class_weight="balanced", C=C, max_iter=max_iter),
    )
    clf.fit(x_tr, y_tr)
    proba = clf.predict_proba(x_te)
    pred = clf.classes_[proba.argmax(axis=1)]
    if classes.size == 2:
        auroc = roc_auc_score(y_te == clf.classes_[1], proba[:, 1])
    else:
        auroc = roc_auc_score(y_te, proba, multi_class="ovr", average="macro", labels=clf.classes_)
    return {
        "macro_f1": float(f1_score(y_te, pred, average="macro")),
        "auroc": float(auroc),
        "f1_chance": _chance_f1(y_te),
        "auroc_chance": 0.5,
        "n_cells": int(y.size),
        "n_classes": int(classes.size),
    }


def technical_covariates(
    adata: AnnData,
    *,
    use_rep: str | Sequence[str] | None,
    covariates: Sequence[str] = ("batch", "fov_position", "well_position"),
    within_batch: Sequence[str] = ("fov_position", "well_position"),
    batch_key: str = "batch",
    controls_only: bool = True,
    perturbation_key: str = "gene_symbol",
    control_category: str = "nontargeting",
    max_cells: int | None = 50_000,
    min_cells_per_class: int = 10,
    test_size: float = 0.3,
    C: float = 1.0,
    max_iter: int = 500,
    seed: int = 0,
    key_added: str = "technical_covariates",
) -> pd.DataFrame:
    """Measure how well technical covariates can be predicted from cell embeddings.

    A balanced logistic regression (``class_weight="balanced"``, standardised features) is fitted
    on a stratified train split and scored on the held-out cells by macro-F1 and one-vs-rest
    AUROC. Position covariates are fitted within each batch (so the batch does not leak into
    them) and summarised by the median across batches. Lower is better: an embedding free of
    technical effects scores near chance (AUROC 0.5, macro-F1 ``f1_chance``).

    Parameters
    ----------
    adata
        Cells, one row each.
    use_rep
        Key (or list of keys) of ``.obsm``; `None` uses ``.X``.
    covariates
        Obs columns to predict. ``batch``, ``fov_position`` and ``well_position`` are derived
        with :func:`~mcvi_ops.metrics.derive_covariates` (default geometry) when missing.
    within_batch
        Covariates fitted separately within each batch of ``batch_key``.
    batch_key
        Obs column of the batch.
    controls_only
        Use only control cells, whose phenotype carries no perturbation signal.
    perturbation_key, control_category
        Obs column and value that mark control cells.
    max_cells
        Most cells per regression fit (random subsample); `None` uses all.
    min_cells_per_class
        Classes with fewer cells in a fit are left out of it.
    test_size
        Held-out fraction.
    C, max_iter
        Passed to :class:`~sklearn.linear_model.LogisticRegression`.
    seed
        Random seed for subsampling and splits.
    key_added
        Key in ``.uns``.

    Returns
    -------
    Tidy DataFrame, one row per (representation, covariate), with columns ``representation,
    covariate, macro_f1, auroc, f1_chance, auroc_chance, n_cells, n_classes, n_batches, scope``.
    Also sets

    ``adata.uns[key_added][representation]``
        ``{"metrics": <its rows>, "per_batch": <scores of each within-batch fit>}``.

    Examples
    --------
    >>> import mcvi_ops
    >>> df = mcvi_ops.metrics.technical_covariates(  # doctest: +SKIP
    ...     adata, use_rep=["X_mcvae_salient", "X_mcvae_background"]
    ... )
    """
    derivable = {"batch", "fov_position", "well_position"}
    if any(c not in adata.obs for c in covariates if c in derivable):
        logger.info("Deriving technical covariates from plate/well/tile/centroid columns.")
        derive_covariates(adata)
    for c in covariates:
        check_obs_key(
            adata,
            c,
            what="covariate",
            hint="Run `mcvi_ops.metrics.derive_covariates(adata, tile_grid=..., well_layout=...)`.",
        )
    mask = np.ones(adata.n_obs, dtype=bool)
    if controls_only:
        perturbation = check_obs_key(adata, perturbation_key, what="perturbation")
        mask = (perturbation.astype(str) == str(control_category)).to_numpy()
        if not mask.any():
            msg = (
                f"No control cells with .obs[{perturbation_key!r}] == {control_category!r}. Pass "
                "the right `control_category`, or controls_only=False."
            )
            raise ValueError(msg)
    for c in covariates:
        values = adata.obs[c][mask].dropna()
        if values.nunique() < 2:
            msg = (
                f"Covariate .obs[{c!r}] has {values.nunique()} class(es) among the "
                f"{mask.sum()} cells used ({values.unique()[:3].tolist()}); need at least 2 to "
                "predict. Drop it from `covariates` or check its derivation."
            )
            raise ValueError(msg)
    if any(c in within_batch for c in covariates):
        batches_all = check_obs_key(adata, batch_key, what="batch").to_numpy()[mask]

    frames = []
    store = adata.uns.get(key_added)
    store = dict(store) if isinstance(store, Mapping) else {}
    for rep in rep_names(use_rep):
        label = rep_label(rep)
        x_all = get_rep(adata, rep, dtype=np.float32)[mask]
        rng = np.random.default_rng(seed)
        rows, per_batch = [], []
        for c in covariates:
            y_all = adata.obs[c].to_numpy()[mask]
            fit_kwargs = {
                "test_size": test_size,
                "min_cells_per_class": min_cells_per_class,
                "max_cells": max_cells,
                "rng": rng,
                "C": C,
                "max_iter": max_iter,
            }
            valid = pd.notna(y_all)
            if c in within_batch:
                scores = []
                for b in pd.unique(batches_all[valid]):
                    sel = valid & (batches_all == b)
                    res = _fit_score(x_all[sel], y_all[sel].astype(str), **fit_kwargs)
                    if res is not None:
                        scores.append(res)
                        per_batch.append({"covariate": c, "batch": str(b), **res})
                if not scores:
                    logger.warning(
                        "%s: no batch has >= 2 classes of %r with >= %d cells; reporting NaN.",
                        label,
                        c,
                        min_cells_per_class,
                    )
                    summary = dict.fromkeys(
                        ["macro_f1", "auroc", "f1_chance", "auroc_chance"], np.nan
                    )
                    summary.update(n_cells=0, n_classes=0)
                else:
                    df = pd.DataFrame(scores)
                    summary = df.median(numeric_only=True).to_dict()
                    summary["n_cells"] = int(df["n_cells"].sum())
                    summary["n_classes"] = int(df["n_classes"].max())
                rows.append(
                    {
                        "representation": label,
                        "covariate": c,
                        **summary,
                        "n_batches": len(scores),
                        "scope": "within-batch median",
                    }
                )
            else:
                res = _fit_score(x_all[valid], y_all[valid].astype(str), **fit_kwargs)
                if res is None:
                    msg = (
                        f"Covariate {c!r} has fewer than 2 classes with >= "
                        f"{min_cells_per_class} cells; lower `min_cells_per_class` or drop it."
                    )
                    raise ValueError(msg)
                rows.append(
                    {"representation": label, "covariate": c, **res, "n_batches": 1, "scope": "all"}
                )
        frame = pd.DataFrame(rows)
        frame[["n_cells", "n_classes"]] = frame[["n_cells", "n_classes"]].astype(int)
        frames.append(frame)
        store[label] = {"metrics": frame, "per_batch": pd.DataFrame(per_batch)}
    adata.uns[key_added] = store
    return pd.concat(frames, ignore_index=True)
