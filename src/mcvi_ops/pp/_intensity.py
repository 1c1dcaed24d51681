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
    seed: int = 0,
    key_added: str = UNS.intensity_factors,
) -> np.ndarray:
    """Per-cell, per-channel intensity factors of field-of-view illumination and batch gains.

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
        largest coordinate seen.
    perturbation_key, control_category
        Column and category of control cells, on which the factors are fitted.
    degree
        Degree of the polynomial in the tile position (4 fits radial fall-off to the corners).
    max_cells
        Control cells read to fit (a random sample; the store is read once for them).
    dark_percentile
        Percentile of the sampled control pixels that bounds each channel's dark level (camera
        offset) from above. The dark level itself is the part of each crop's background that does
        not dim with the illumination (the intercept of background against fitted factor); the
        correction keeps it in place and rescales only what lies above it.
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
    >>> mcvi_ops.pp.derive_covariates(adata)  # doctest: +SKIP
    >>> factors = mcvi_ops.pp.estimate_intensity_factors(adata, batch_key="batch")  # doctest: +SKIP
    """
    from mcvi_ops.data import linked_store

    if degree < 0 or int(degree) != degree:
        msg = f"`degree` must be a non-negative integer, got {degree!r}."
        raise ValueError(msg)
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
    u = 2 * i / tile_size - 1
    v = 2 * j / tile_size - 1
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
    if batch_key is not None:
        batch = pd.Categorical(check_obs_key(adata, batch_key, what="batch").astype(str))
        one_hot = np.eye(len(batch.categories))[batch.codes]
        design = np.concatenate([design[:, 1:], one_hot], axis=1)  # batch offsets replace 1
    for _ in range(2):
        # the mean of each crop above the dark level, kept positive
        log_signal = np.log(np.maximum(crop_means - dark, 1e-3))
        coef, *_ = np.linalg.lstsq(design[sample], log_signal, rcond=None)
        fitted = design @ coef
        for c in range(n_channels):
            slope, intercept = np.polyfit(np.exp(fitted[sample, c]), background[:, c], 1)
            if slope > 0:
                dark[c] = min(float(intercept), float(dark[c]))
    fitted -= fitted[sample].mean(axis=0)
    residual = log_signal - fitted[sample]
    explained = 1 - residual.var(axis=0) / np.maximum(log_signal.var(axis=0), 1e-12)
    factors = np.exp(fitted).astype(np.float32)
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


def apply_intensity_factors(
    crops: np.ndarray, factors: np.ndarray, dark_level: np.ndarray
) -> np.ndarray:
    """Divide crops ``(n, C, H, W)`` by per-cell factors ``(n, C)`` above the dark level."""
    dark = np.asarray(dark_level, dtype=np.float32)[None, :, None, None]
    scaled = (crops.astype(np.float32) - dark) / np.asarray(factors, np.float32)[:, :, None, None]
    return scaled + dark
