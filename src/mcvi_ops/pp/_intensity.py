"""Intensity correction factors: field-of-view illumination and per-batch gains, from controls."""

from __future__ import annotations

import logging

import numpy as np
import pandas as pd
from anndata import AnnData

from mcvi_ops._constants import UNS
from mcvi_ops._utils import check_obs_key

logger = logging.getLogger(__name__)


def _monomials(u: np.ndarray, v: np.ndarray, degree: int) -> np.ndarray:
    """Columns ``u**a * v**b`` for ``a + b <= degree`` (the constant included)."""
    return np.stack([u**a * v ** (d - a) for d in range(degree + 1) for a in range(d + 1)], axis=1)


#: control crops read at a time (32 MB of 4 x 64 x 64 uint16 crops)
_READ_CELLS = 1_024
#: pixels per channel kept for the dark percentile of stores that are not 8/16-bit integers
_DARK_SAMPLE = 4_000_000


def _percentile_of_counts(counts: np.ndarray, q: float) -> float:
    """``np.percentile(values, q)`` (linear interpolation) from the histogram of integer values."""
    cumulative = np.cumsum(counts)
    rank = q / 100 * (cumulative[-1] - 1)
    below = int(np.floor(rank))
    low = int(np.searchsorted(cumulative, below, side="right"))
    high = int(np.searchsorted(cumulative, below + 1, side="right")) if rank > below else low
    return low + (high - low) * (rank - below)


def _control_statistics(
    store, rows: np.ndarray, dark_percentile: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One streaming pass over the sampled control crops, a block of crops at a time.

    Returns each crop's per-channel mean and 1st-percentile background, and the
    ``dark_percentile`` of all their pixels per channel: exact from a histogram for 8/16-bit
    integer crops, from an even sample of at most :data:`_DARK_SAMPLE` pixels otherwise. Memory
    stays at one block of crops whatever the sample size.
    """
    n_channels, n_pixels = store.shape[1], int(np.prod(store.shape[2:]))
    means = np.empty((len(rows), n_channels))
    background = np.empty((len(rows), n_channels))
    exact = np.dtype(store.dtype) in (np.dtype(np.uint8), np.dtype(np.uint16))
    counts = np.zeros(
        (n_channels, 2 ** (8 * np.dtype(store.dtype).itemsize) if exact else 0), np.int64
    )
    step = max(1, -(-len(rows) * n_pixels // _DARK_SAMPLE))
    sampled: list[np.ndarray] = []
    for start in range(0, len(rows), _READ_CELLS):
        block = slice(start, start + _READ_CELLS)
        flat = store.take(rows[block]).reshape(-1, n_channels, n_pixels)
        means[block] = flat.mean(axis=-1, dtype=np.float64)
        background[block] = np.percentile(flat, 1.0, axis=-1)
        if exact:
            for c in range(n_channels):
                counts[c] += np.bincount(flat[:, c].ravel(), minlength=counts.shape[1])
        else:
            sampled.append(flat.transpose(1, 0, 2).reshape(n_channels, -1)[:, ::step])
    if exact:
        dark = np.array(
            [_percentile_of_counts(counts[c], dark_percentile) for c in range(n_channels)]
        )
    else:
        dark = np.percentile(np.concatenate(sampled, axis=1), dark_percentile, axis=1)
    return means, background, dark.astype(np.float32)


def estimate_intensity_factors(
    adata: AnnData,
    *,
    batch_key: str | None = None,
    i_key: str = "cell_i",
    j_key: str = "cell_j",
    tile_size: float | None = None,
    perturbation_key: str = "gene_symbol",
    control_category: str = "nontargeting",
    degree: int = 4,
    max_cells: int = 20_000,
    dark_percentile: float = 0.5,
    min_batch_controls: int = 10,
    seed: int = 0,
    key_added: str = UNS.intensity_factors,
) -> np.ndarray:
    """Per-cell, per-channel intensity factors of field-of-view illumination and batch gains.

    .. long function: documentation and signature; the body is under 80 lines.

    Optical pooled screens image thousands of tiles: cells near a tile's corner look dimmer
    (vignetting) and every well has its own channel gains. Both are technical: a model that sees
    them can read a cell's position and well from its latent space. This function estimates them
    from control cells the way flat-field correction does: the log signal of each control crop
    (mean intensity above the dark level) is fitted, per channel, by a smooth polynomial of the
    cell's position in its tile plus one offset per batch. The fitted factor of every cell is
    evaluated from its position and batch alone, so only a sample of control crops is read.
    Models set up with ``intensity_factor_key`` divide each crop by its factors (above the dark
    level) before anything else.

    Parameters
    ----------
    adata
        Cells linked to their crops, with tile positions in ``.obs``.
    batch_key
        Column of the technical batch (e.g. plate and well) whose gains are estimated; `None`
        estimates illumination only.
    i_key, j_key
        Columns of each cell's centroid row and column in its tile, in pixels.
    tile_size
        Tile side in pixels; by default ``adata.uns["synthetic_screen"]["tile_size"]`` or the
        largest coordinate seen. Every position must lie within ``[0, tile_size]``: the
        polynomial is not extrapolated.
    perturbation_key, control_category
        Column and category of control cells, on which the factors are fitted.
    degree
        Degree of the polynomial in the tile position (4 fits radial fall-off to the corners).
    max_cells
        Control cells read to fit (a random sample; the store is read once for them), at least
        10.
    dark_percentile
        Percentile of the sampled control pixels that bounds each channel's dark level (camera
        offset) from above. The dark level itself is the part of each crop's background that does
        not dim with the illumination (the intercept of background against fitted factor); the
        correction keeps it in place and rescales only what lies above it.
    min_batch_controls
        Fewest sampled control cells a batch needs for its own gain. Batches with fewer (or none)
        get the average gain of the other batches, with a warning naming them (a gain fitted
        from one or two cells is noise). Cells outside the range of positions of the fitted
        controls get the factor at the nearest fitted position (a warning gives the count when
        they lie more than 5% of the tile beyond it).
    seed
        Seed of the sample.
    key_added
        Key of the results in ``.obsm`` and ``.uns``.

    Returns
    -------
    Factors of shape ``(n_cells, n_channels)`` (1 is the average control cell). Also sets

    ``adata.obsm[key_added]``
        The factors.
    ``adata.uns[key_added]``
        ``{"dark_level": [...], "channel_names": [...], "degree", "batch_key", "tile_size",
        "n_cells_fitted", "explained_variance": [...]}``: the dark level per channel and the
        share of the variance of control log signals that the fit explains, per channel.

    Examples
    --------
    >>> import mcvi_ops
    >>> adata = mcvi_ops.datasets.synthetic_screen(n_cells=2_000, seed=0)
    >>> covariates = mcvi_ops.pp.derive_covariates(adata)
    >>> factors = mcvi_ops.pp.estimate_intensity_factors(adata, batch_key="batch")
    >>> factors.shape  # cells x channels
    (2000, 4)
    """
    from mcvi_ops.data import linked_store

    if degree < 0 or int(degree) != degree:
        msg = f"`degree` must be a non-negative integer, got {degree!r}."
        raise ValueError(msg)
    for name, value, least in (
        ("max_cells", max_cells, 10),
        ("min_batch_controls", min_batch_controls, 1),
    ):
        if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < least:
            msg = f"`{name}` must be an integer >= {least}, got {value!r}."
            raise ValueError(msg)
    u, v, tile_size = _tile_coordinates(adata, i_key, j_key, tile_size)
    labels = check_obs_key(adata, perturbation_key, what="perturbation").astype(str)
    controls = np.flatnonzero(labels.to_numpy() == control_category)
    if len(controls) < 10:
        msg = (
            f"Found {len(controls)} control cells ({perturbation_key!r} == {control_category!r}); "
            "at least 10 are needed to estimate intensity factors. Check `control_category`."
        )
        raise ValueError(msg)
    rng = np.random.default_rng(seed)
    sample = np.sort(rng.choice(controls, min(max_cells, len(controls)), replace=False))
    store = linked_store(adata)
    index = adata.obs[adata.uns[UNS.crops]["index_key"]].to_numpy()
    # each crop's darkest pixels (`background`): the camera's dark level plus a background that
    # dims with the illumination; regressing them on the fitted factor separates the two (its
    # intercept)
    crop_means, background, dark = _control_statistics(store, index[sample], dark_percentile)
    n_channels = len(dark)
    design = _monomials(u, v, int(degree))
    fit_rows = np.ones(len(sample), dtype=bool)
    if batch_key is not None:
        batch_design, fit_rows = _batch_design(
            adata, batch_key, sample, perturbation_key, min_batch_controls
        )
        design = np.concatenate([design[:, 1:], batch_design], axis=1)  # offsets replace 1
    design = _clip_to_fitted(design, u, v, sample[fit_rows], int(degree), batch_key is not None)
    for _ in range(2):
        # the mean of each crop above the dark level, kept positive
        log_signal = np.log(np.maximum(crop_means - dark, 1e-3))
        coef, *_ = np.linalg.lstsq(design[sample[fit_rows]], log_signal[fit_rows], rcond=None)
        fitted = design @ coef
        for c in range(n_channels):
            slope, intercept = np.polyfit(np.exp(fitted[sample, c]), background[:, c], 1)
            if slope > 0:
                dark[c] = min(float(intercept), float(dark[c]))
    fitted -= fitted[sample].mean(axis=0)
    residual = log_signal - fitted[sample]
    explained = 1 - residual.var(axis=0) / np.maximum(log_signal.var(axis=0), 1e-12)
    factors = np.exp(fitted).astype(np.float32)
    _check_factors(factors, adata, batch_key)
    adata.obsm[key_added] = factors
    adata.uns[key_added] = {
        "dark_level": dark.tolist(),
        "channel_names": list(store.channel_names),
        "degree": int(degree),
        "batch_key": batch_key,
        "tile_size": float(tile_size),
        "n_cells_fitted": len(sample),
        "explained_variance": explained.round(4).tolist(),
    }
    logger.info(
        "Intensity factors from %d control cells: %.2f-%.2f (explained variance %s)",
        len(sample),
        factors.min(),
        factors.max(),
        explained.round(3).tolist(),
    )
    return factors


def _tile_coordinates(
    adata: AnnData, i_key: str, j_key: str, tile_size: float | None
) -> tuple[np.ndarray, np.ndarray, float]:
    """Each cell's position in its tile scaled to [-1, 1] (row, column), and the tile size."""
    i = check_obs_key(adata, i_key, what="centroid row").to_numpy(dtype=float)
    j = check_obs_key(adata, j_key, what="centroid column").to_numpy(dtype=float)
    if not (np.isfinite(i).all() and np.isfinite(j).all()):
        rows = np.flatnonzero(~(np.isfinite(i) & np.isfinite(j)))
        msg = (
            f"{len(rows)} cells have no finite tile position in .obs[{i_key!r}] / .obs[{j_key!r}] "
            f"(first rows: {adata.obs_names[rows[:5]].tolist()}). Drop them or fill the positions."
        )
        raise ValueError(msg)
    if tile_size is None:
        meta = adata.uns.get(UNS.synthetic, {})
        tile_size = float(meta.get("tile_size", max(i.max(), j.max()) + 1))
    tile_size = _check_positions(adata, i, j, tile_size, i_key, j_key)
    return 2 * i / tile_size - 1, 2 * j / tile_size - 1, tile_size


def _check_positions(adata, i, j, tile_size, i_key: str, j_key: str) -> float:
    """``tile_size`` as a positive float; every position must lie in ``[0, tile_size]``."""
    try:
        size = float(tile_size)
    except (TypeError, ValueError):
        size = float("nan")
    if not (np.isfinite(size) and size > 0):
        msg = f"`tile_size` must be a positive number of pixels, got {tile_size!r}."
        raise ValueError(msg)
    outside = (i < 0) | (j < 0) | (i > size) | (j > size)
    if outside.any():
        msg = (
            f"{int(outside.sum())} cells lie outside the tile [0, {size:g}] px in "
            f".obs[{i_key!r}] / .obs[{j_key!r}] (positions up to {max(i.max(), j.max()):g}, "
            f"e.g. cells {adata.obs_names[outside][:3].tolist()}); the illumination polynomial "
            "cannot be evaluated there. Pass `tile_size=` covering every position (the tile "
            "side in pixels), or fix the positions (they must be within each cell's tile)."
        )
        raise ValueError(msg)
    return size


def _batch_design(
    adata: AnnData,
    batch_key: str,
    sample: np.ndarray,
    perturbation_key: str,
    min_controls: int,
) -> tuple[np.ndarray, np.ndarray]:
    """Batch columns of the design and the sampled controls to fit on.

    A batch with fewer than ``min_controls`` sampled controls gets no column of its own: its
    cells get the average offset of the others (weights ``1/k``), and its few controls are left
    out of the fit.
    """
    column = check_obs_key(adata, batch_key, what="batch")
    missing = column.isna().to_numpy()
    if missing.any():
        msg = (
            f"{int(missing.sum())} cells have no batch in .obs[{batch_key!r}] (NaN, e.g. cells "
            f"{adata.obs_names[missing][:3].tolist()}): they would be pooled into a batch 'nan'. "
            "Fill in their batch, drop them, or pass `batch_key=None` (illumination only)."
        )
        raise ValueError(msg)
    batch = pd.Categorical(column.astype(str))
    counts = np.bincount(batch.codes[sample], minlength=len(batch.categories))
    fitted = counts >= min_controls
    if not fitted.any():
        msg = (
            f"No batch of .obs[{batch_key!r}] has {min_controls} control cells "
            f"(.obs[{perturbation_key!r}]) among the {len(sample)} sampled (most: "
            f"{int(counts.max())}). Pass `batch_key=None` (illumination only), a coarser batch, "
            "or a smaller `min_batch_controls`."
        )
        raise ValueError(msg)
    if not fitted.all():
        poor = {str(batch.categories[b]): int(counts[b]) for b in np.flatnonzero(~fitted)}
        shown = dict(list(poor.items())[:5])
        logger.warning(
            "%d batches of .obs[%r] have fewer than %d sampled control cells (%s%s); they get "
            "the average gain of the other %d batches instead of their own.",
            len(poor),
            batch_key,
            min_controls,
            shown,
            ", ..." if len(poor) > 5 else "",
            int(fitted.sum()),
        )
    columns = np.cumsum(fitted) - 1  # column of each fitted batch
    design = np.zeros((adata.n_obs, int(fitted.sum())))
    own = fitted[batch.codes]
    design[np.flatnonzero(own), columns[batch.codes[own]]] = 1.0
    design[~own] = 1.0 / fitted.sum()
    return design, fitted[batch.codes[sample]]


def _clip_to_fitted(
    design: np.ndarray, u: np.ndarray, v: np.ndarray, rows: np.ndarray, degree: int, batched: bool
) -> np.ndarray:
    """The design with positions outside the fitted controls' range moved onto its edge."""
    lo_u, hi_u, lo_v, hi_v = u[rows].min(), u[rows].max(), v[rows].min(), v[rows].max()
    cu, cv = np.clip(u, lo_u, hi_u), np.clip(v, lo_v, hi_v)
    beyond = np.maximum(np.abs(cu - u), np.abs(cv - v)) > 0.1  # 5% of the tile side
    if beyond.any():
        logger.warning(
            "%d cells lie more than 5%% of the tile beyond the positions of the fitted control "
            "cells; they get the factor at the nearest fitted position.",
            int(beyond.sum()),
        )
    if not (np.any(cu != u) or np.any(cv != v)):
        return design
    monomials = _monomials(cu, cv, degree)
    out = design.copy()
    if batched:
        out[:, : monomials.shape[1] - 1] = monomials[:, 1:]
    else:
        out[:, : monomials.shape[1]] = monomials
    return out


def _check_factors(factors: np.ndarray, adata: AnnData, batch_key: str | None) -> None:
    """A last guard: factors must be finite and within a factor 1e4 of the average cell."""
    bad = ~np.isfinite(factors) | (factors < 1e-4) | (factors > 1e4)
    if bad.any():
        rows = bad.any(axis=1)
        msg = (
            f"The fitted intensity factors of {int(rows.sum())} cells are not usable (non-finite,"
            f" or beyond 1e4 times the average cell; e.g. cells "
            f"{adata.obs_names[rows][:3].tolist()}, range {np.nanmin(factors):.3g}-"
            f"{np.nanmax(factors):.3g}). Check their positions and batch (.obs[{batch_key!r}]) "
            "and their crops; a lower `degree` fits a smoother surface."
        )
        raise ValueError(msg)
