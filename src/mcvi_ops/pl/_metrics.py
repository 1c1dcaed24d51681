"""Plots of the evaluation metrics: precision-recall, covariate leakage, gene function."""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from typing import Literal

import numpy as np
import pandas as pd
from anndata import AnnData

from ._utils import (
    check_save,
    corner_note,
    finish,
    legend_outside,
    mark_missing,
    new_axes,
    readable,
    shared_docs,
)

logger = logging.getLogger(__name__)

#: hatch of the bars of scores below chance
_BELOW_CHANCE_HATCH = "////"


def _stored(adata: AnnData, key: str, producer: str) -> Mapping:
    store = adata.uns.get(key)
    if not isinstance(store, Mapping) or not store:
        msg = f"Did not find .uns[{key!r}]. Run `{producer}(...)` first (or pass its `key_added`)."
        raise KeyError(msg)
    return store


def _average_precision(entry: Mapping, source: str) -> float | None:
    metrics = entry.get("metrics")
    if not isinstance(metrics, pd.DataFrame) or "metric" not in metrics:
        return None
    hit = metrics[(metrics["metric"] == "average_precision") & (metrics["source"] == source)]
    return float(hit["value"].iloc[0]) if len(hit) else None


@shared_docs
def precision_recall(
    data: AnnData | Mapping[str, AnnData],
    *,
    source: str | None = None,
    representations: Sequence[str] | None = None,
    key: str = "known_relationships",
    baseline: bool = True,
    ax=None,
    show: bool | None = None,
    save: str | os.PathLike | None = None,
    return_fig: bool = False,
):
    """Precision-recall curves of several representations for one relationship source.

    .. long function: documentation and signature; the body is under 80 lines.

    Each curve is labelled with a readable name of its representation and its average precision;
    the legend sits outside the axes, to the right.

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
        Draw the prevalence (the precision of a random ranking) as a dashed line.
    {ax}
    {show}
    {save}
    {return_fig}

    Returns
    -------
    {returns_axes}

    Examples
    --------
    >>> mcvi_ops.metrics.known_relationships(
    ...     genes, use_rep=["X_mcvae_salient", "X_vae"], relationships=src
    ... )  # doctest: +SKIP
    >>> mcvi_ops.pl.precision_recall(genes, save="pr.png")  # doctest: +SKIP
    """
    save_path = check_save(save)
    items = list(data.items()) if isinstance(data, Mapping) else [(None, data)]
    producer = "mcvi_ops.metrics.known_relationships"
    curves = []
    for label, adata in items:
        store = _stored(adata, key, producer)
        for rep, entry in store.items():
            if representations is not None and rep not in representations:
                continue
            entry_curves = entry["curves"]
            src = source if source is not None else next(iter(entry_curves))
            if src not in entry_curves:
                msg = (
                    f"Source {src!r} not scored for {rep!r}; scored sources: "
                    f"{list(entry_curves)}. Pass one of them as `source`."
                )
                raise KeyError(msg)
            name = readable(rep) if label is None else f"{label}: {readable(rep)}"
            ap = _average_precision(entry, src)
            if ap is not None:
                name = f"{name} (AP {ap:.3f})"
            curves.append((name, entry_curves[src], src))
    if not curves:
        msg = f"No representation to plot (requested {representations})."
        raise ValueError(msg)
    ax_given = ax is not None
    fig, ax = new_axes(ax, figsize=(6.5, 4))
    for name, curve, _ in curves:
        ax.plot(curve["recall"], curve["precision"], label=name)
    if baseline:
        bases = sorted({round(float(c["baseline"]), 6) for _, c, _ in curves})
        for k, base in enumerate(bases):
            label = "random ranking" if k == 0 else None
            ax.axhline(base, color="grey", linestyle="--", linewidth=1, label=label)
    ax.set_xlabel("recall")
    ax.set_ylabel("precision")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.02)
    ax.set_title(curves[0][2] if source is None else source)
    legend_outside(ax)
    return finish(fig, ax, show=show, save=save_path, return_fig=return_fig, ax_given=ax_given)


def _leakage_table(data: AnnData | pd.DataFrame, key: str) -> pd.DataFrame:
    if isinstance(data, AnnData):
        store = _stored(data, key, "mcvi_ops.metrics.technical_covariates")
        return pd.concat([v["metrics"] for v in store.values()], ignore_index=True)
    if not isinstance(data, pd.DataFrame):
        msg = (
            "`data` must be the DataFrame returned by `mcvi_ops.metrics.technical_covariates` "
            f"or the AnnData it was run on, got {type(data).__name__}."
        )
        raise TypeError(msg)
    return data


@shared_docs
def technical_covariates(
    data: AnnData | pd.DataFrame,
    *,
    metric: Literal["auroc", "macro_f1"] = "auroc",
    key: str = "technical_covariates",
    ax=None,
    show: bool | None = None,
    kind: Literal["distance", "score"] = "distance",
    save: str | os.PathLike | None = None,
    return_fig: bool = False,
):
    """Grouped bars of how far each representation predicts technical covariates from chance.

    .. long function: documentation and signature; the body is under 80 lines.

    What matters is the distance from chance, not the direction: an AUROC of 0.34 reveals the
    covariate as much as one of 0.66 (the classifier ranks the classes consistently, only the
    wrong way round). So a score below chance is never drawn as better than one at chance:

    - ``kind="distance"`` (default) draws ``|score - chance|`` (0 is chance, lower is better);
    - ``kind="score"`` draws each score as a bar from its chance level (dashed), up when above
      chance and down when below (closer to the chance line is better).

    Bars of scores below chance are hatched; the score itself is written above each bar. A
    covariate that could not be scored (NaN) is marked ``n/a``.

    Parameters
    ----------
    data
        The DataFrame returned by :func:`~mcvi_ops.metrics.technical_covariates`, or the AnnData
        it was run on.
    metric
        ``"auroc"`` (chance 0.5) or ``"macro_f1"`` (chance from the class frequencies).
    key
        The ``key_added`` used when scoring (for AnnData input).
    {ax}
    {show}
    kind
        ``"distance"`` or ``"score"``, see above.
    {save}
    {return_fig}

    Returns
    -------
    {returns_axes}

    Examples
    --------
    >>> df = mcvi_ops.metrics.technical_covariates(  # doctest: +SKIP
    ...     adata, use_rep=["X_mcvae_salient", "X_vae"]
    ... )
    >>> mcvi_ops.pl.technical_covariates(df, save="leakage.png")  # doctest: +SKIP
    """
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    if metric not in ("auroc", "macro_f1"):
        msg = f"`metric` must be 'auroc' or 'macro_f1', got {metric!r}."
        raise ValueError(msg)
    if kind not in ("distance", "score"):
        msg = f"`kind` must be 'distance' or 'score', got {kind!r}."
        raise ValueError(msg)
    save_path = check_save(save)
    df = _leakage_table(data, key)
    chance_col = "auroc_chance" if metric == "auroc" else "f1_chance"
    missing = {"representation", "covariate", metric, chance_col} - set(df.columns)
    if missing:
        msg = (
            f"`data` lacks the columns {sorted(missing)}; pass the output of "
            "`mcvi_ops.metrics.technical_covariates`."
        )
        raise ValueError(msg)
    covariates = list(pd.unique(df["covariate"]))
    reps = list(pd.unique(df["representation"]))
    ax_given = ax is not None
    fig, ax = new_axes(ax, figsize=(1.1 * len(covariates) * max(len(reps), 2) / 2 + 3.5, 3.8))
    width = 0.8 / len(reps)
    x0 = np.arange(len(covariates))
    name = readable(metric)
    any_below = False
    handles, labels = [], []
    for k, rep in enumerate(reps):
        sub = df[df["representation"] == rep].set_index("covariate").reindex(covariates)
        score = sub[metric].to_numpy(dtype=float)
        chance = sub[chance_col].to_numpy(dtype=float)
        below = score < chance
        any_below |= bool(below.any())
        xs = x0 - 0.4 + width * (k + 0.5)
        if kind == "distance":
            heights, bottoms = np.abs(score - chance), np.zeros_like(score)
        else:
            heights, bottoms = score - chance, chance
            ax.hlines(
                chance, xs - width / 2, xs + width / 2, color="k", lw=1, linestyles="--", zorder=3
            )
        bars = ax.bar(xs, np.nan_to_num(heights), bottom=np.nan_to_num(bottoms), width=width)
        color = bars.patches[0].get_facecolor()
        handles.append(Patch(facecolor=color))
        labels.append(readable(rep))
        for bar, x, s, c, b, h in zip(
            bars.patches, xs, score, chance, bottoms, heights, strict=True
        ):
            if np.isnan(s) or np.isnan(c):
                mark_missing(ax, x, 0.0 if kind == "distance" else 0.5)
                continue
            if s < c:
                bar.set_hatch(_BELOW_CHANCE_HATCH)
                bar.set_edgecolor("white")
                bar.set_facecolor(color)
            if kind == "score" and s < c:  # the bar hangs down from chance: label underneath
                ax.text(x, s, f"{s:.2f}", ha="center", va="top", fontsize="x-small")
            else:
                ax.text(x, b + h, f"{s:.2f}", ha="center", va="bottom", fontsize="x-small")
    ax.set_xticks(x0, [readable(c) for c in covariates])
    if kind == "distance":
        ax.set_ylabel(f"|{name} - chance|\n(0 = chance; lower is better)")
        chance_all = df[chance_col].to_numpy(dtype=float)
        top = 0.5 if metric == "auroc" else float(np.nanmax(np.maximum(1 - chance_all, chance_all)))
        ax.set_ylim(0, top * 1.12)
    else:
        ax.set_ylabel(f"{name}\n(closer to chance is better)")
        ax.set_ylim(0, 1.08)
    if kind == "score":
        handles.append(Line2D([], [], color="k", lw=1, linestyle="--"))
        labels.append("chance")
    if any_below:
        handles.append(Patch(facecolor="0.6", edgecolor="white", hatch=_BELOW_CHANCE_HATCH))
        labels.append("below chance")
    legend_outside(ax, handles, labels, title="representation")
    ax.set_title(f"Technical covariates predicted from the embedding ({name})", fontsize="medium")
    corner_note(ax, f"numbers: {name}")
    return finish(fig, ax, show=show, save=save_path, return_fig=return_fig, ax_given=ax_given)


@shared_docs
def confusion_matrix(
    result: Mapping,
    *,
    annotate: bool = False,
    cmap: str = "Blues",
    ax=None,
    show: bool | None = None,
    title: str | None = None,
    save: str | os.PathLike | None = None,
    return_fig: bool = False,
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
    {ax}
    {show}
    title
        Title of the axes.
    {save}
    {return_fig}

    Returns
    -------
    {returns_axes}

    Examples
    --------
    >>> mcvi_ops.pl.confusion_matrix(res, annotate=True)  # doctest: +SKIP
    """
    if not isinstance(result, Mapping) or "confusion" not in result:
        msg = "`result` must be a result of `mcvi_ops.metrics.function_classification`."
        raise TypeError(msg)
    save_path = check_save(save)
    cm = result["confusion"]
    n_rows, n_cols = cm.shape
    ax_given = ax is not None
    fig, ax = new_axes(ax, figsize=(0.35 * n_cols + 3.0, 0.35 * n_rows + 2.0))
    values = cm.to_numpy(dtype=float)
    im = ax.imshow(values, cmap=cmap, vmin=0, vmax=1)
    fontsize = "small" if max(n_rows, n_cols) <= 20 else "x-small"
    ax.set_xticks(np.arange(n_cols), [str(c) for c in cm.columns], rotation=90, fontsize=fontsize)
    ax.set_yticks(np.arange(n_rows), [str(r) for r in cm.index], fontsize=fontsize)
    ax.set_xlabel("predicted group")
    ax.set_ylabel("true group")
    if title is not None:
        ax.set_title(title)
    if annotate:
        for (r, c), v in np.ndenumerate(values):
            ax.text(
                c,
                r,
                f"{v:.2f}",
                ha="center",
                va="center",
                fontsize="x-small",
                color="white" if v > 0.6 else "black",
            )
    ax.figure.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="fraction of true group")
    return finish(fig, ax, show=show, save=save_path, return_fig=return_fig, ax_given=ax_given)


@shared_docs
def recall_difference(
    diff: pd.DataFrame,
    *,
    ax=None,
    show: bool | None = None,
    save: str | os.PathLike | None = None,
    return_fig: bool = False,
):
    """Horizontal bars of the per-group recall difference between two representations.

    Bars to the right (red) are groups recalled better from the first representation, bars to
    the left (blue) from the second.

    Parameters
    ----------
    diff
        Output of :func:`~mcvi_ops.metrics.recall_difference`.
    {ax}
    {show}
    {save}
    {return_fig}

    Returns
    -------
    {returns_axes}

    Examples
    --------
    >>> diff = mcvi_ops.metrics.recall_difference(res_salient, res_background)  # doctest: +SKIP
    >>> mcvi_ops.pl.recall_difference(diff)  # doctest: +SKIP
    """
    from matplotlib.patches import Patch

    if not isinstance(diff, pd.DataFrame) or "difference" not in diff:
        msg = "`diff` must be the output of `mcvi_ops.metrics.recall_difference`."
        raise ValueError(msg)
    save_path = check_save(save)
    ax_given = ax is not None
    fig, ax = new_axes(ax, figsize=(6.5, 0.3 * diff.shape[0] + 1.3))
    values = diff["difference"].to_numpy(dtype=float)
    colors = np.where(values >= 0, "tab:red", "tab:blue")
    ax.barh(np.arange(values.size), values, color=colors)
    ax.set_yticks(np.arange(values.size), [str(g) for g in diff.index])
    ax.invert_yaxis()
    ax.axvline(0, color="k", lw=0.8)
    cols = [c for c in diff.columns if c.startswith("recall_")]
    names = [c.removeprefix("recall_") for c in cols] if len(cols) == 2 else ["a", "b"]
    ax.set_xlabel(f"recall difference ({names[0]} - {names[1]})")
    lim = max(float(np.nanmax(np.abs(values))) if values.size else 0.0, 0.05) * 1.1
    ax.set_xlim(-lim, lim)
    handles = [Patch(color="tab:red"), Patch(color="tab:blue")]
    labels = [f"better from {readable(names[0])}", f"better from {readable(names[1])}"]
    legend_outside(ax, handles, labels)
    return finish(fig, ax, show=show, save=save_path, return_fig=return_fig, ax_given=ax_given)
