"""Robust per-batch statistics of control cells, for standardising feature tables.

The policy, applied by :class:`~mcvi_ops.FeatureMCVAE` and kept in its saved module:

- centre: the median of the batch's control cells; scale: 1.4826 times their median absolute
  deviation (the standard deviation of normal data), computed over finite values only (of at
  most 20,000 controls per batch, a seeded sample: memory does not grow with the screen);
- a feature whose controls in a batch have no spread by that measure (counts that are mostly 0,
  say) falls back to the standard deviation of those controls, then to the pooled robust scale
  of all controls (each centred on its batch), then to their pooled standard deviation;
- a feature with no spread in any of these ways carries nothing and is left out (a warning
  names how many); a feature without any finite value among the controls is an error;
- non-finite values (NaN, inf) are set to 0, the controls' centre, after standardisation.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import sparse

logger = logging.getLogger(__name__)

#: median absolute deviation -> standard deviation of normal data
MAD_TO_SD = 1.4826
#: fewest control cells a batch needs for its own statistics
MIN_CONTROLS = 3
#: most control cells per batch the statistics read (a seeded sample): memory stays flat
MAX_CONTROLS = 20_000


@dataclass
class ControlStatistics:
    """Per-batch centre and scale (rows x features), the kept features, and what was done."""

    center: np.ndarray
    scale: np.ndarray
    kept: np.ndarray
    n_fallback: int


def _rows(matrix, rows: np.ndarray, columns: np.ndarray | None = None) -> np.ndarray:
    """Rows (and columns) of a dense, sparse or backed matrix as float64 (non-finite -> NaN)."""
    block = matrix[rows]
    block = block.toarray() if sparse.issparse(block) else np.asarray(block)
    if columns is not None:
        block = block[:, columns]
    block = block.astype(np.float64, copy=False)
    return np.where(np.isfinite(block), block, np.nan)


def _sample(rows: np.ndarray, seed: int) -> np.ndarray:
    """At most :data:`MAX_CONTROLS` of ``rows`` (seeded), in row order."""
    if len(rows) <= MAX_CONTROLS:
        return rows
    return np.sort(np.random.default_rng(seed).choice(rows, MAX_CONTROLS, replace=False))


def _robust(block: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Median, MAD-based scale and standard deviation of each column, ignoring NaN."""
    # columns without a finite value give NaN (handled by the caller), not warnings
    with np.errstate(all="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        center = np.nanmedian(block, axis=0)
        mad = MAD_TO_SD * np.nanmedian(np.abs(block - center), axis=0)
        std = (
            np.nanstd(block, axis=0, ddof=1) if len(block) > 1 else np.full(block.shape[1], np.nan)
        )
    return center, mad, std


def control_statistics(
    matrix,
    control: np.ndarray,
    batch_codes: np.ndarray | None,
    n_batch: int,
    *,
    feature_names: Sequence[str],
    batch_names: Sequence[str] | None = None,
) -> ControlStatistics:
    """Robust centre and scale of every feature in every batch, from the control cells.

    .. long function: documentation and signature; the body is under 80 lines.

    Parameters
    ----------
    matrix
        Cells x features (numpy, scipy sparse or a backed array); read batch by batch.
    control
        Boolean mask of control cells.
    batch_codes
        Batch code of each cell (`None`: one batch).
    n_batch
        Number of batches (rows of the output; 1 when ``batch_codes`` is `None`).
    feature_names, batch_names
        Names used in messages.

    Returns
    -------
    The statistics; ``scale`` is finite and positive for kept features.
    """
    n_rows = max(int(n_batch), 1)
    codes = np.zeros(len(control), dtype=np.int64) if batch_codes is None else batch_codes
    names = list(batch_names) if batch_names is not None else [str(b) for b in range(n_rows)]
    n_features = matrix.shape[1]
    center = np.zeros((n_rows, n_features))
    mad = np.full((n_rows, n_features), np.nan)
    std = np.full((n_rows, n_features), np.nan)
    finite_any = np.zeros(n_features, dtype=bool)
    too_few = []
    for b in range(n_rows):
        rows = _sample(np.flatnonzero(control & (codes == b)), seed=b)
        if len(rows) < MIN_CONTROLS:
            too_few.append((names[b], len(rows)))
            continue
        block = _rows(matrix, rows)
        finite_any |= np.isfinite(block).any(axis=0)
        center[b], mad[b], std[b] = _robust(block)
    if too_few:
        listed = ", ".join(f"{name!r} ({n})" for name, n in too_few[:5])
        msg = (
            f"{len(too_few)} batch(es) have fewer than {MIN_CONTROLS} control cells: {listed}. "
            "Features are standardised against the controls of each batch, so every batch needs "
            "some. Merge those batches with others in the `batch_key` column, drop their cells, "
            "or pass `batch_key=None`."
        )
        raise ValueError(msg)
    empty = np.flatnonzero(~finite_any)
    if len(empty):
        shown = [str(feature_names[i]) for i in empty[:5]]
        msg = (
            f"{len(empty)} feature(s) have no finite value in any control cell (e.g. {shown}); "
            "they cannot be standardised. Drop them first, e.g. `adata = adata[:, "
            "~adata.var_names.isin(bad)].copy()` with `bad` the listed names."
        )
        raise ValueError(msg)
    center = np.where(np.isfinite(center), center, 0.0)
    # pooled scales of all controls, each centred on its batch: the fallback of flat batches
    pooled_mad = np.full(n_features, np.nan)
    pooled_std = np.full(n_features, np.nan)
    flat_columns = np.flatnonzero(np.any(~(mad > 0), axis=0))
    if len(flat_columns):
        rows = _sample(np.flatnonzero(control), seed=n_rows)
        block = _rows(matrix, rows, flat_columns) - center[codes[rows]][:, flat_columns]
        _, pooled_mad[flat_columns], pooled_std[flat_columns] = _robust(block)
    scale = mad.copy()
    n_fallback = 0
    for fallback in (std, pooled_mad[None, :], pooled_std[None, :]):
        flat = ~(scale > 0) | ~np.isfinite(scale)
        n_fallback += int(flat.sum()) if fallback is std else 0
        scale = np.where(flat, np.broadcast_to(fallback, scale.shape), scale)
    kept = np.all((scale > 0) & np.isfinite(scale), axis=0)
    if not kept.all():
        logger.warning(
            "%d of %d features do not vary among the control cells (e.g. %s) and are left out.",
            int((~kept).sum()),
            n_features,
            [str(feature_names[i]) for i in np.flatnonzero(~kept)[:3]],
        )
    if not kept.any():
        msg = "No feature varies among the control cells; nothing can be learned from them."
        raise ValueError(msg)
    if n_fallback:
        logger.info(
            "%d (batch, feature) pairs have no robust spread among their controls (MAD 0); "
            "they are scaled by the standard deviation, or the pooled spread of all controls.",
            n_fallback,
        )
    scale = np.where(kept, scale, 1.0)
    return ControlStatistics(
        center=center.astype(np.float32),
        scale=scale.astype(np.float32),
        kept=kept,
        n_fallback=n_fallback,
    )


def trend_terms(covariates: np.ndarray) -> np.ndarray:
    """``[1, c, c^2]`` of each continuous covariate (the module's ``trend_terms``)."""
    covariates = np.asarray(covariates, dtype=np.float64).reshape(len(covariates), -1)
    return np.concatenate([np.ones((len(covariates), 1)), covariates, covariates**2], axis=1)


#: floor of the controls' variance along a covariate, relative to their overall variance (1)
MIN_TREND_VARIANCE = 0.05


def covariate_trend(
    matrix,
    control: np.ndarray,
    batch_codes: np.ndarray | None,
    stats: ControlStatistics,
    covariates: np.ndarray,
    *,
    clip: float,
    block: int = 8_192,
) -> tuple[np.ndarray, np.ndarray]:
    """The controls' mean and variance of each standardised feature along the covariates.

    Technical positions shift features (an additive trend) and, as vignetting does to
    intensities, scale them (a multiplicative one): both are removed as
    ``(y - mean(c)) / sqrt(variance(c))``, with ``mean`` and ``variance`` least-squares fits
    in ``[1, c, c^2]`` per covariate to the control cells' standardised, clipped features
    (NaN as 0) and to their squared residuals. Read block by block (memory of one block).

    Returns
    -------
    The coefficients of the mean and of the variance, each ``1 + 2 * n_covariates`` x features.
    """
    covariates = np.asarray(covariates, dtype=np.float64).reshape(len(control), -1)
    if not np.isfinite(covariates).all():
        bad = int((~np.isfinite(covariates).all(axis=1)).sum())
        msg = (
            f"{bad} cells have NaN or infinite continuous covariates; fill them in (every cell "
            "needs its position) or leave `continuous_covariate_keys` out."
        )
        raise ValueError(msg)
    codes = np.zeros(len(control), dtype=np.int64) if batch_codes is None else batch_codes
    rows = np.flatnonzero(control)
    n_terms = 1 + 2 * covariates.shape[1]

    def fit(target) -> np.ndarray:
        gram = np.zeros((n_terms, n_terms))
        moment = np.zeros((n_terms, stats.center.shape[1]))
        for start in range(0, len(rows), block):
            part = rows[start : start + block]
            y = (_rows(matrix, part) - stats.center[codes[part]]) / stats.scale[codes[part]]
            y = np.clip(np.nan_to_num(y, nan=0.0, posinf=0.0, neginf=0.0), -clip, clip)
            terms = trend_terms(covariates[part])
            gram += terms.T @ terms
            moment += terms.T @ target(y, terms)
        ridge = 1e-6 * np.trace(gram) / n_terms
        return np.linalg.solve(gram + ridge * np.eye(n_terms), moment)

    mean = fit(lambda y, terms: y)
    variance = fit(lambda y, terms: (y - terms @ mean) ** 2)
    no_trend = np.zeros_like(variance)
    no_trend[0] = 1.0
    mean = np.where(stats.kept, mean, 0.0)
    variance = np.where(stats.kept, variance, no_trend)
    return mean.astype(np.float32), variance.astype(np.float32)
