"""Standardise features or embeddings against the control cells of each batch."""

from __future__ import annotations

import logging
import warnings
from typing import Literal

import numpy as np
import pandas as pd
from anndata import AnnData

from ._utils import check_obs_key, get_rep, rep_label

logger = logging.getLogger(__name__)

Method = Literal["center_scale", "tvn"]


def normalize_to_controls(
    adata: AnnData,
    *,
    batch_key: str | None,
    use_rep: str | None = None,
    perturbation_key: str = "gene_symbol",
    control_category: str = "nontargeting",
    method: Method = "center_scale",
    shrinkage: float = 0.5,
    key_added: str | None = None,
) -> np.ndarray:
    """Features or an embedding standardised against the control cells of each batch.

    .. long function: documentation and signature; the body is under 80 lines.

    ``"center_scale"``: within each batch, every feature has the batch's control mean subtracted
    and is divided by the batch's control standard deviation (``ddof=1``), so controls are mean 0
    and variance 1 in every batch and a perturbation reads as shifts in control standard
    deviations.

    ``"tvn"``: Typical Variation Normalization (Ando et al., 2017,
    https://doi.org/10.1101/161422), as in Recursion's EFAAR pipeline (Celik et al., 2024,
    https://doi.org/10.1371/journal.pcbi.1012463, ``efaar_benchmarking.efaar.tvn_on_controls``):
    features are standardised against all controls, each batch is centred on its own controls,
    and a PCA whitening fitted on all controls rotates the data onto the controls' principal axes
    and scales each to unit variance, so the controls' covariance is the identity (the "typical
    variation" gets equal, unit weight; fitting it after the centring keeps batch offsets out of
    it). Then, where a batch has more controls than dimensions, its controls' covariance is
    mapped to the identity with CORAL (Sun, Feng & Saenko, 2016), ``x @ (C_b + s I)^(-1/2) *
    sqrt(1 + s)`` with EFAAR's shrinkage ``s`` (0.5), which aligns the batches' second moments,
    not only their means.

    Features whose controls do not vary (in some batch for ``"center_scale"``, over all controls
    for ``"tvn"``) or are not finite there are dropped with a warning; other non-finite values
    (e.g. a measurement undefined for a cell) are set to 0, the control mean, with a warning.

    Parameters
    ----------
    adata
        Cells, one row each.
    batch_key
        Obs column of the batch (e.g. plate and well, see :func:`~mcvi_ops.pp.derive_covariates`);
        `None` treats all cells as one batch.
    use_rep
        Key of ``.obsm`` to normalise; `None` normalises ``.X`` (e.g. the output of
        :func:`~mcvi_ops.tl.cellprofiler_features`).
    perturbation_key, control_category
        Obs column and value that mark control cells.
    method
        ``"center_scale"`` or ``"tvn"`` (see above).
    shrinkage
        TVN only: added to the diagonal of each batch's control covariance before whitening (in
        units of the controls' variance); 0 whitens each batch's controls exactly.
    key_added
        Key in ``.obsm``; by default ``"{use_rep or 'X'}_{method}"``.

    Returns
    -------
    The normalised cells x features (``"center_scale"``) or cells x control principal axes
    (``"tvn"``) array. Also sets

    ``adata.obsm[key_added]``
        The same array.
    ``adata.uns[key_added]``
        ``{"params", "features"}``: the settings and the input features kept (names for ``.X``,
        column indices for an ``.obsm`` embedding).

    Examples
    --------
    >>> import mcvi_ops
    >>> features = mcvi_ops.tl.cellprofiler_features(adata)  # doctest: +SKIP
    >>> mcvi_ops.tl.normalize_to_controls(
    ...     features, batch_key="well", method="tvn"
    ... )  # doctest: +SKIP
    >>> features.obsm["X_tvn"].shape  # doctest: +SKIP
    """
    x = get_rep(adata, use_rep)
    batches, is_control = _groups(adata, batch_key, perturbation_key, control_category)
    out, keep = _normalize(
        x,
        batches,
        is_control,
        method=method,
        shrinkage=shrinkage,
        describe=(batch_key, perturbation_key, control_category),
    )
    key = f"{rep_label(use_rep)}_{method}" if key_added is None else key_added
    _check_float32(out, adata.obs_names)
    adata.obsm[key] = out.astype(np.float32)
    names = (
        np.asarray(adata.var_names[keep], dtype=str)
        if use_rep in (None, "X")
        else np.flatnonzero(keep)
    )
    adata.uns[key] = {
        "params": {
            "use_rep": rep_label(use_rep),
            "batch_key": batch_key,
            "perturbation_key": perturbation_key,
            "control_category": control_category,
            "method": method,
            "shrinkage": float(shrinkage),
        },
        "features": names,
    }
    return adata.obsm[key]


def _check_float32(values: np.ndarray, obs_names) -> None:
    """Refuse normalised values that float32 would turn into infinities."""
    big = np.abs(values) > np.finfo(np.float32).max
    if big.any():
        rows, cols = np.nonzero(big)
        msg = (
            f"{int(big.sum())} normalised values exceed the float32 range (|x| > 3.4e38) and would "
            f"be stored as infinite: cells {obs_names[np.unique(rows)][:3].tolist()}, output "
            f"columns {np.unique(cols)[:5].tolist()}. These cells lie far outside the controls' "
            "spread: check or drop them (or those features) first."
        )
        raise ValueError(msg)


def _groups(adata, batch_key, perturbation_key, control_category):
    """Batch label of every cell and whether it is a control."""
    if batch_key is None:
        batches = np.zeros(adata.n_obs, dtype=str)
    else:
        column = check_obs_key(adata, batch_key, what="batch")
        missing = column.isna().to_numpy()
        if missing.any():
            msg = (
                f"{int(missing.sum())} cells have no batch in .obs[{batch_key!r}] (NaN, e.g. "
                f"cells {adata.obs_names[missing][:3].tolist()}): they would be normalised as "
                "one batch 'nan'. Fill in their batch, drop them, or pass `batch_key=None`."
            )
            raise ValueError(msg)
        batches = column.astype(str).to_numpy()
    perturbation = check_obs_key(adata, perturbation_key, what="perturbation").astype(str)
    return batches, (perturbation == str(control_category)).to_numpy()


def _normalize(
    x: np.ndarray,
    batches: np.ndarray,
    is_control: np.ndarray,
    *,
    method: str,
    shrinkage: float = 0.5,
    describe: tuple[str | None, str, str],
) -> tuple[np.ndarray, np.ndarray]:
    """Normalised array and the mask of input features kept (arrays in, arrays out)."""
    if method not in ("center_scale", "tvn"):
        msg = f"method must be 'center_scale' or 'tvn', got {method!r}."
        raise ValueError(msg)
    if not np.isfinite(shrinkage) or shrinkage < 0:
        msg = f"shrinkage must be a non-negative number, got {shrinkage!r}."
        raise ValueError(msg)
    batch_key, perturbation_key, control_category = describe
    x = np.array(x, dtype=np.float64)
    for b in pd.unique(batches):
        n_controls = int((is_control & (batches == b)).sum())
        if n_controls < 2:
            where = (
                "All cells have" if batch_key is None else f"Batch {b!r} of .obs[{batch_key!r}] has"
            )
            msg = (
                f"{where} {n_controls} control cells (.obs[{perturbation_key!r}] == "
                f"{control_category!r}); need at least 2 to standardise against controls. Merge "
                "small batches or pick another `batch_key`."
            )
            raise ValueError(msg)
    groups = [batches == b for b in pd.unique(batches)] if method == "center_scale" else [None]
    keep = np.ones(x.shape[1], dtype=bool)
    for rows in groups:
        rows = np.ones(len(x), dtype=bool) if rows is None else rows
        keep &= _standardise(x, rows, rows & is_control)
    if not keep.all():
        logger.warning(
            "Dropping %d of %d features with no spread (or no finite value) in the controls%s.",
            (~keep).sum(),
            keep.size,
            " of some batch" if method == "center_scale" else "",
        )
    x = x[:, keep]
    if x.shape[1] == 0:
        msg = "No feature varies within the controls; nothing to normalise."
        raise ValueError(msg)
    nonfinite = ~np.isfinite(x)
    if nonfinite.any():
        logger.warning("Setting %d non-finite values to 0 (the control mean).", nonfinite.sum())
        x[nonfinite] = 0.0
    if method == "tvn":
        x = _tvn(x, batches, is_control, shrinkage)
    return x, keep


def _standardise(x: np.ndarray, rows: np.ndarray, controls: np.ndarray) -> np.ndarray:
    """Standardise ``x[rows]`` in place against ``x[controls]``; returns the usable features."""
    with np.errstate(invalid="ignore", over="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN features are reported dropped
        # moments of values scaled to [-1, 1]: squares of features near 1e200 would overflow
        magnitude = np.nanmax(
            np.abs(np.where(np.isfinite(x[controls]), x[controls], np.nan)), axis=0
        )
        scale = np.where(np.isfinite(magnitude) & (magnitude > 0), magnitude, 1.0)
        scaled = x[controls] / scale
        mean = np.nanmean(scaled, axis=0) * scale
        sd = np.nanstd(scaled, axis=0, ddof=1) * scale
    bad = ~np.isfinite(sd) | (sd <= 0) | ~np.isfinite(mean)
    x[rows] = (x[rows] - np.where(bad, 0.0, mean)) / np.where(bad, 1.0, sd)
    return ~bad


def _tvn(x: np.ndarray, batches: np.ndarray, is_control: np.ndarray, shrinkage: float):
    """Per-batch centring, PCA whitening on all controls, then per-batch CORAL whitening."""
    from scipy import linalg

    groups = [batches == b for b in pd.unique(batches)]
    for rows in groups:
        x[rows] -= x[rows & is_control].mean(axis=0)
    controls = x[is_control]
    _, singular, axes = linalg.svd(controls, full_matrices=False)
    variance = singular**2 / (controls.shape[0] - 1)
    rank = variance > variance.max() * 1e-10
    if not rank.all():
        logger.info(
            "TVN keeps %d of %d control principal axes (the others have no variance).",
            rank.sum(),
            rank.size,
        )
    x = x @ (axes[rank].T / np.sqrt(variance[rank]))
    n_dims = x.shape[1]
    centred_only = 0
    for rows in groups:
        batch_controls = x[rows & is_control]
        if batch_controls.shape[0] <= n_dims:
            centred_only += 1
            continue
        covariance = np.cov(batch_controls, rowvar=False) + shrinkage * np.eye(n_dims)
        values, vectors = linalg.eigh(covariance)
        inverse_root = (vectors / np.sqrt(np.maximum(values, 1e-12))) @ vectors.T
        x[rows] = x[rows] @ inverse_root * np.sqrt(1.0 + shrinkage)
    if centred_only:
        logger.info(
            "TVN centred %d batch(es) without whitening them: they have no more controls than "
            "the %d dimensions.",
            centred_only,
            n_dims,
        )
    return x
