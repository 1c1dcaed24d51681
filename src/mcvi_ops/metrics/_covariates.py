"""Leakage of technical covariates (batch, field-of-view and well position) into embeddings."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd
from anndata import AnnData
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import f1_score, roc_auc_score
from sklearn.model_selection import train_test_split
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from mcvi_ops.tl._utils import (
    check_finite,
    check_obs_key,
    codes_of,
    finite_rows,
    get_rep,
    rep_label,
    rep_names,
)

logger = logging.getLogger(__name__)


def _chance_f1(y: np.ndarray) -> float:
    """Return the expected macro-F1 of guessing classes uniformly at random."""
    _, counts = np.unique(y, return_counts=True)
    p = counts / counts.sum()
    q = 1 / counts.size
    return float(np.mean(2 * p * q / (p + q)))


def _fit_score(
    x: np.ndarray,
    rows: np.ndarray,
    y: np.ndarray,
    *,
    test_size: float,
    min_cells_per_class: int,
    max_cells: int | None,
    rng: np.random.Generator,
    C: float,
    max_iter: int,
) -> dict | None:
    """Scores of predicting the labels ``y`` of ``x[rows]`` (``max_cells`` of them at most).

    The sample is drawn before any row of ``x`` is copied, so memory does not grow with the
    number of cells.
    """
    if max_cells is not None and y.size > max_cells:
        take = rng.choice(y.size, size=max_cells, replace=False)
        rows, y = rows[take], y[take]
    x = np.asarray(x[rows], dtype=np.float32)
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


#: covariates that :func:`~mcvi_ops.pp.derive_covariates` writes
DERIVED_COVARIATES = ("batch", "fov_position", "well_position")


def _covariate_hint(covariate: str) -> str:
    """What to run when the covariate column is missing."""
    if covariate in DERIVED_COVARIATES:
        return (
            "Run `mcvi_ops.pp.derive_covariates(adata)` first (it writes batch, fov_position "
            "and well_position from the plate, well, tile and centroid columns)."
        )
    return "Pass the obs columns to predict as `covariates`."


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

    .. long function: documentation and signature; the body is under 80 lines.

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
        Obs columns to predict. ``batch``, ``fov_position`` and ``well_position`` are written by
        :func:`~mcvi_ops.pp.derive_covariates`; run it first (this metric only reads ``.obs``).
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

    Raises
    ------
    ValueError
        When an embedding has NaN or infinite values in the cells used (the message names the
        representation and the number of such cells).

    Examples
    --------
    >>> import mcvi_ops
    >>> df = mcvi_ops.metrics.technical_covariates(  # doctest: +SKIP
    ...     adata, use_rep=["X_mcvae_salient", "X_mcvae_background"]
    ... )
    """
    for c in covariates:
        check_obs_key(adata, c, what="covariate", hint=_covariate_hint(c))
    cells = _cells_used(adata, controls_only, perturbation_key, control_category)
    _check_classes(adata, covariates, cells)
    # row positions and integer label codes: no per-cell copies of embeddings or strings
    batches = None
    if any(c in within_batch for c in covariates):
        batch_codes, batch_names = codes_of(check_obs_key(adata, batch_key, what="batch"))
        batches = (batch_codes[cells], batch_names)
    labels = {c: codes_of(adata.obs[c]) for c in covariates}
    fit_kwargs = {
        "test_size": test_size,
        "min_cells_per_class": min_cells_per_class,
        "max_cells": max_cells,
        "C": C,
        "max_iter": max_iter,
    }
    frames = []
    store = adata.uns.get(key_added)
    store = dict(store) if isinstance(store, Mapping) else {}
    for rep in rep_names(use_rep):
        label = rep_label(rep)
        x_all = get_rep(adata, rep, dtype=None)
        bad = cells[~finite_rows(adata, rep)[cells]]
        if bad.size:
            check_finite(
                x_all[bad],
                rep,
                rows="control cells" if controls_only else "cells",
                names=adata.obs_names[bad],
                n_rows=cells.size,
            )
        rng = np.random.default_rng(seed)
        rows, per_batch = [], []
        for c in covariates:
            y_codes, y_names = labels[c]
            y_all = y_codes[cells]
            if c in within_batch:
                row, fits = _within_batches(
                    x_all, cells, y_all, y_names, batches, c, label, rng=rng, **fit_kwargs
                )
                per_batch += fits
            else:
                valid = y_all >= 0
                res = _fit_score(x_all, cells[valid], y_names[y_all[valid]], rng=rng, **fit_kwargs)
                if res is None:
                    msg = (
                        f"Covariate {c!r} has fewer than 2 classes with >= "
                        f"{min_cells_per_class} cells; lower `min_cells_per_class` or drop it."
                    )
                    raise ValueError(msg)
                row = {**res, "n_batches": 1, "scope": "all"}
            rows.append({"representation": label, "covariate": c, **row})
        frame = pd.DataFrame(rows)
        frame[["n_cells", "n_classes"]] = frame[["n_cells", "n_classes"]].astype(int)
        frames.append(frame)
        store[label] = {"metrics": frame, "per_batch": pd.DataFrame(per_batch)}
    adata.uns[key_added] = store
    return pd.concat(frames, ignore_index=True)


def _cells_used(
    adata: AnnData, controls_only: bool, perturbation_key: str, control_category: str
) -> np.ndarray:
    """Row positions of the cells to fit on: the controls, or every cell."""
    if not controls_only:
        return np.arange(adata.n_obs)
    codes, names = codes_of(check_obs_key(adata, perturbation_key, what="perturbation"))
    mask = np.isin(codes, np.flatnonzero(names == str(control_category)))
    if not mask.any():
        msg = (
            f"No control cells with .obs[{perturbation_key!r}] == {control_category!r}. Pass "
            "the right `control_category`, or controls_only=False."
        )
        raise ValueError(msg)
    return np.flatnonzero(mask)


def _check_classes(adata: AnnData, covariates: Sequence[str], cells: np.ndarray) -> None:
    """Every covariate needs at least two classes among the cells used."""
    for c in covariates:
        values = adata.obs[c].iloc[cells].dropna()
        if values.nunique() < 2:
            msg = (
                f"Covariate .obs[{c!r}] has {values.nunique()} class(es) among the "
                f"{cells.size} cells used ({values.unique()[:3].tolist()}); need at least 2 to "
                "predict. Drop it from `covariates` or check its derivation."
            )
            raise ValueError(msg)


def _within_batches(
    x_all,
    cells: np.ndarray,
    y_all: np.ndarray,
    y_names: np.ndarray,
    batches: tuple[np.ndarray, np.ndarray],
    covariate: str,
    label: str,
    **fit_kwargs,
) -> tuple[dict, list[dict]]:
    """The median scores of fits within each batch (the batch cannot leak into them), and each fit."""
    batch_of_cell, batch_names = batches
    valid = (y_all >= 0) & (batch_of_cell >= 0)
    scores, per_batch = [], []
    for b in pd.unique(batch_of_cell[valid]):
        sel = valid & (batch_of_cell == b)
        res = _fit_score(x_all, cells[sel], y_names[y_all[sel]], **fit_kwargs)
        if res is not None:
            scores.append(res)
            per_batch.append({"covariate": covariate, "batch": batch_names[b], **res})
    if not scores:
        logger.warning(
            "%s: no batch has >= 2 classes of %r with >= %d cells; reporting NaN.",
            label,
            covariate,
            fit_kwargs["min_cells_per_class"],
        )
        summary = dict.fromkeys(["macro_f1", "auroc", "f1_chance", "auroc_chance"], np.nan)
        summary.update(n_cells=0, n_classes=0)
    else:
        df = pd.DataFrame(scores)
        summary = df.median(numeric_only=True).to_dict()
        summary["n_cells"] = int(df["n_cells"].sum())
        summary["n_classes"] = int(df["n_classes"].max())
    row = {**summary, "n_batches": len(scores), "scope": "within-batch median"}
    return row, per_batch
