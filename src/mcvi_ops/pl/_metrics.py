"""Plots of the evaluation metrics: precision-recall, covariate leakage, gene function."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Literal

import numpy as np
import pandas as pd
from anndata import AnnData

logger = logging.getLogger(__name__)


def _axes(ax, figsize=(4.5, 4)):
    import matplotlib.pyplot as plt

    if ax is None:
        _, ax = plt.subplots(figsize=figsize)
    return ax


def _finish(ax, show: bool):
    if show:
        import matplotlib.pyplot as plt

        plt.show()
    return ax


def _stored(adata: AnnData, key: str, producer: str) -> Mapping:
    store = adata.uns.get(key)
    if not isinstance(store, Mapping) or not store:
        msg = f"Did not find .uns[{key!r}]. Run `{producer}(...)` first (or pass its `key_added`)."
        raise KeyError(msg)
    return store


def precision_recall(
    data: AnnData | Mapping[str, AnnData],
    *,
    source: str | None = None,
    representations: Sequence[str] | None = None,
    key: str = "known_relationships",
    baseline: bool = True,
    ax=None,
    show: bool = False,
):
    """Precision-recall curves of several representations for one relationship source.

    Parameters
    ----------
    data
        Gene-level AnnData scored by :func:`~mcvi_ops.metrics.known_relationships` (one curve
        per stored representation), or a dict label -> such AnnData (e.g. different feature sets).
    source
        Relationship source to plot; `None` takes the first one.
    representations
        Subset of stored representations to draw.
    key
        The ``key_added`` used when scoring.
    baseline
        Draw the prevalence (random ranking) as a dashed line.
    ax
        Axes to draw into; a new figure if `None`.
    show
        Call :func:`matplotlib.pyplot.show`.

    Returns
    -------
    The matplotlib Axes.

    Examples
    --------
    >>> mcvi_ops.metrics.known_relationships(
    ...     genes, use_rep=["X_mcvae_salient", "X_vae"], relationships=src
    ... )  # doctest: +SKIP
    >>> ax = mcvi_ops.pl.precision_recall(genes)  # doctest: +SKIP
    """
    ax = _axes(ax)
    items = data.items() if isinstance(data, Mapping) else [(None, data)]
    producer = "mcvi_ops.metrics.known_relationships"
    drawn, base = 0, None
    for label, adata in items:
        store = _stored(adata, key, producer)
        for rep, entry in store.items():
            if representations is not None and rep not in representations:
                continue
            curves = entry["curves"]
            src = source if source is not None else next(iter(curves))
            if src not in curves:
                msg = f"Source {src!r} not scored for {rep!r}; scored sources: {list(curves)}."
                raise KeyError(msg)
            curve = curves[src]
            name = rep if label is None else f"{label}: {rep}"
            ax.plot(curve["recall"], curve["precision"], label=name)
            base = curve["baseline"]
            drawn += 1
    if drawn == 0:
        msg = f"No representation to plot (requested {representations})."
        raise ValueError(msg)
    if baseline and base is not None:
        ax.axhline(base, color="grey", linestyle="--", linewidth=1, label="random")
    ax.set_xlabel("recall")
    ax.set_ylabel("precision")
    ax.set_xlim(0, 1)
    if source is not None:
        ax.set_title(source)
    ax.legend(frameon=False, fontsize="small")
    return _finish(ax, show)


def technical_covariates(
    data: AnnData | pd.DataFrame,
    *,
    metric: Literal["auroc", "macro_f1"] = "auroc",
    key: str = "technical_covariates",
    ax=None,
    show: bool = False,
):
    """Plot technical-covariate leakage per representation as grouped bars (lower is better).

    Parameters
    ----------
    data
        The DataFrame returned by :func:`~mcvi_ops.metrics.technical_covariates`, or the AnnData
        it was run on.
    metric
        ``"auroc"`` or ``"macro_f1"``; the chance level is drawn as a short black line per bar.
    key
        The ``key_added`` used when scoring (for AnnData input).
    ax, show
        Axes to draw into, and whether to call :func:`matplotlib.pyplot.show`.

    Returns
    -------
    The matplotlib Axes.

    Examples
    --------
    >>> df = mcvi_ops.metrics.technical_covariates(adata, use_rep=["X_mcvae_salient", "X_vae"])
    >>> ax = mcvi_ops.pl.technical_covariates(df)  # doctest: +SKIP
    """
    if isinstance(data, AnnData):
        store = _stored(data, key, "mcvi_ops.metrics.technical_covariates")
        df = pd.concat([v["metrics"] for v in store.values()], ignore_index=True)
    else:
        df = data
    if metric not in ("auroc", "macro_f1"):
        msg = f"`metric` must be 'auroc' or 'macro_f1', got {metric!r}."
        raise ValueError(msg)
    chance_col = "auroc_chance" if metric == "auroc" else "f1_chance"
    ax = _axes(ax, figsize=(5, 3.5))
    covariates = list(pd.unique(df["covariate"]))
    reps = list(pd.unique(df["representation"]))
    width = 0.8 / len(reps)
    x0 = np.arange(len(covariates))
    for k, rep in enumerate(reps):
        sub = df[df["representation"] == rep].set_index("covariate").reindex(covariates)
        xs = x0 - 0.4 + width * (k + 0.5)
        ax.bar(xs, sub[metric].to_numpy(), width=width, label=rep)
        ax.hlines(sub[chance_col].to_numpy(), xs - width / 2, xs + width / 2, color="k", lw=1)
    ax.set_xticks(x0, covariates)
    ax.set_ylabel(metric)
    ax.set_ylim(0, 1)
    ax.legend(frameon=False, fontsize="small")
    return _finish(ax, show)


def confusion_matrix(
    result: Mapping,
    *,
    annotate: bool = False,
    cmap: str = "Blues",
    ax=None,
    show: bool = False,
):
    """Heatmap of the row-normalised confusion matrix of a gene-function classification.

    Parameters
    ----------
    result
        Result of :func:`~mcvi_ops.metrics.function_classification`.
    annotate
        Write the fractions into the cells.
    cmap
        Matplotlib colour map.
    ax, show
        Axes to draw into, and whether to call :func:`matplotlib.pyplot.show`.

    Returns
    -------
    The matplotlib Axes.

    Examples
    --------
    >>> ax = mcvi_ops.pl.confusion_matrix(res)  # doctest: +SKIP
    """
    if not isinstance(result, Mapping) or "confusion" not in result:
        msg = "`result` must be a result of `mcvi_ops.metrics.function_classification`."
        raise TypeError(msg)
    cm = result["confusion"]
    ax = _axes(ax, figsize=(0.35 * cm.shape[1] + 2.5, 0.35 * cm.shape[0] + 1.5))
    im = ax.imshow(cm.to_numpy(), cmap=cmap, vmin=0, vmax=1)
    ax.set_xticks(np.arange(cm.shape[1]), cm.columns, rotation=90)
    ax.set_yticks(np.arange(cm.shape[0]), cm.index)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    if annotate:
        for (r, c), v in np.ndenumerate(cm.to_numpy()):
            ax.text(c, r, f"{v:.2f}", ha="center", va="center", fontsize="x-small")
    ax.figure.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="fraction of true group")
    return _finish(ax, show)


def recall_difference(
    diff: pd.DataFrame,
    *,
    ax=None,
    show: bool = False,
):
    """Horizontal bars of the per-group recall difference between two representations.

    Parameters
    ----------
    diff
        Output of :func:`~mcvi_ops.metrics.recall_difference`.
    ax, show
        Axes to draw into, and whether to call :func:`matplotlib.pyplot.show`.

    Returns
    -------
    The matplotlib Axes.

    Examples
    --------
    >>> diff = mcvi_ops.metrics.recall_difference(res_salient, res_background)  # doctest: +SKIP
    >>> ax = mcvi_ops.pl.recall_difference(diff)  # doctest: +SKIP
    """
    if "difference" not in diff:
        msg = "`diff` must be the output of `mcvi_ops.metrics.recall_difference`."
        raise ValueError(msg)
    ax = _axes(ax, figsize=(5, 0.3 * diff.shape[0] + 1))
    values = diff["difference"].to_numpy()
    colors = np.where(values >= 0, "tab:red", "tab:blue")
    ax.barh(np.arange(values.size), values, color=colors)
    ax.set_yticks(np.arange(values.size), diff.index)
    ax.invert_yaxis()
    ax.axvline(0, color="k", lw=0.8)
    cols = [c for c in diff.columns if c.startswith("recall_")]
    label = " - ".join(c.removeprefix("recall_") for c in cols) if len(cols) == 2 else "a - b"
    ax.set_xlabel(f"recall difference ({label})")
    return _finish(ax, show)
