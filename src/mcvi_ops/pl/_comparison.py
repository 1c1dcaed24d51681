"""Grouped bars comparing embedding methods on quality metrics, against chance."""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd

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


def _pick(table: pd.DataFrame, column: str, wanted: Sequence[str] | None, what: str) -> list[str]:
    """Values of ``column`` to draw, in the requested order (matched by name or readable label)."""
    present = list(pd.unique(table[column].astype(str)))
    if wanted is None:
        return present
    by_label = {readable(v): v for v in present}
    picked, absent = [], []
    for w in wanted:
        hit = w if w in present else by_label.get(w)
        (picked if hit is not None else absent).append(hit if hit is not None else w)
    if not picked:
        msg = (
            f"None of the requested {what} {list(wanted)} are in column {column!r}; it holds "
            f"{present}. Pass `{what}=` with some of these (or `{what}=None` for all)."
        )
        raise ValueError(msg)
    if absent:
        logger.warning("Not in column %r, left out: %s (present: %s).", column, absent, present)
    return picked


def _summaries(
    table: pd.DataFrame, keys: list[str], value_key: str, error_key, chance_key
) -> tuple[pd.Series, pd.Series | None, str | None, pd.Series | None]:
    """Per (method, metric): the mean value, its error bar (and what it shows), the chance."""
    grouped = table.groupby(keys, sort=False)
    mean = grouped[value_key].mean()
    if error_key is not None:
        error = grouped[error_key].mean()
    else:
        error = grouped[value_key].std(ddof=1) if grouped.size().max() > 1 else None
    error_note = (
        f"error bars: {readable(error_key)}"
        if error_key is not None
        else f"mean and SD of up to {grouped.size().max()} repeats"
        if error is not None
        else None
    )
    chance = grouped[chance_key].mean() if chance_key is not None else None
    return mean, error, error_note, chance


def _method_colors(method_names: list[str], palette) -> list:
    """One colour per method: from ``palette`` (a mapping or a sequence), else the colour cycle."""
    import matplotlib as mpl

    cycle = mpl.rcParams["axes.prop_cycle"].by_key()["color"]
    if isinstance(palette, Mapping):
        return [palette.get(m, cycle[i % len(cycle)]) for i, m in enumerate(method_names)]
    if palette is not None:
        return [list(palette)[i % len(palette)] for i in range(len(method_names))]
    return [cycle[i % len(cycle)] for i in range(len(method_names))]


def _label_bars(ax, xs, values, errors, *, annotate: bool, rotation: float) -> float:
    """Write each bar's value above it (``n/a`` where it is NaN); the highest point drawn."""
    top = 0.0
    for x, v, e in zip(xs, values, errors if errors is not None else [0.0] * len(xs), strict=True):
        if np.isnan(v):
            mark_missing(ax, x, 0)
            continue
        y = v + (0.0 if np.isnan(e) else e)
        top = max(top, y)
        if annotate:
            text = f"{v:.3f}" if abs(v) < 10 else f"{v:.3g}"
            ax.text(x, y, text, ha="center", va="bottom", fontsize="x-small", rotation=rotation)
    return top


def _chance_lines(ax, chance: pd.Series, method_names, metric_names, width: float) -> float:
    """Dashed chance levels: one line across a group of bars, or one per bar; the highest."""
    top = 0.0
    n_methods = len(method_names)
    for j, m in enumerate(metric_names):
        levels = chance.reindex([(method, m) for method in method_names]).to_numpy(dtype=float)
        if np.all(np.isnan(levels)):
            continue
        if np.nanmax(levels) - np.nanmin(levels) < 1e-9:  # one line across the group
            y, start, end = np.nanmean(levels), j - 0.45, j + 0.45
        else:  # one line over each bar
            xs = j - 0.4 + width * (np.arange(n_methods) + 0.5)
            y, start, end = levels, xs - width / 2, xs + width / 2
        ax.hlines(y, start, end, color="k", lw=1.2, linestyles="--", zorder=3)
        top = max(top, float(np.nanmax(levels)))
    return top


@shared_docs
def method_comparison(
    table: pd.DataFrame,
    *,
    metrics: Sequence[str] | None = ("same-complex AP", "mAP"),
    methods: Sequence[str] | None = None,
    method_key: str = "method",
    metric_key: str = "metric",
    value_key: str = "value",
    chance_key: str | None = None,
    error_key: str | None = None,
    palette: Mapping[str, str] | Sequence[str] | None = None,
    annotate: bool = True,
    ylabel: str = "score",
    title: str | None = None,
    ax=None,
    show: bool | None = None,
    save: str | os.PathLike | None = None,
    return_fig: bool = False,
):
    """Grouped bars of several embedding methods per metric, with each metric's chance level.

    .. long function: documentation and signature; the body is under 80 lines.

    One group of bars per metric, one bar (one colour) per method, e.g. mcVAE variants, a VAE,
    CellProfiler features and a PCA of the pixels. The chance level (or baseline) of each metric
    is a dashed black line across its group; the value is written above each bar. Several rows
    per method and metric (e.g. seeds) are averaged, with their standard deviation as error bar.

    Parameters
    ----------
    table
        Tidy DataFrame with one row per method x metric (x repeat), with columns ``method_key``,
        ``metric_key``, ``value_key`` and optionally a chance level and an error.
    metrics
        Metrics to draw, in this order, matched by name or by readable label
        (``"complex_average_precision"`` matches ``"same-complex AP"``); `None` draws all.
        Requested metrics missing from the table are left out with a warning.
    methods
        Methods to draw, in this order; `None` draws all, in the order of the table.
    method_key, metric_key, value_key
        Columns of the method, the metric and the value.
    chance_key
        Column of the chance level or baseline of each row; `None` uses ``"chance"`` or
        ``"baseline"`` when the table has one.
    error_key
        Column of an error (e.g. a standard deviation) drawn as error bars.
    palette
        Colour of each method (dict method -> colour, or a sequence in method order);
        matplotlib's colour cycle by default.
    annotate
        Write each value above its bar.
    ylabel
        Label of the y axis.
    title
        Title of the axes.
    {ax}
    {show}
    {save}
    {return_fig}

    Returns
    -------
    {returns_axes}

    Examples
    --------
    >>> import pandas as pd
    >>> table = pd.DataFrame(
    ...     {
    ...         "method": ["mcVAE", "VAE", "mcVAE", "VAE"],
    ...         "metric": ["same-complex AP", "same-complex AP", "mAP", "mAP"],
    ...         "value": [0.40, 0.31, 0.52, 0.44],
    ...         "chance": [0.10, 0.10, 0.25, 0.25],
    ...     }
    ... )
    >>> fig = mcvi_ops.pl.method_comparison(table, save="methods.png", return_fig=True)
    """
    from matplotlib.lines import Line2D

    if not isinstance(table, pd.DataFrame):
        msg = f"`table` must be a tidy pandas DataFrame, got {type(table).__name__}."
        raise TypeError(msg)
    if chance_key is None:
        chance_key = next((c for c in ("chance", "baseline") if c in table.columns), None)
    needed = [method_key, metric_key, value_key] + [k for k in (chance_key, error_key) if k]
    missing = [c for c in needed if c not in table.columns]
    if missing:
        msg = (
            f"`table` lacks the columns {missing}; it has {list(table.columns)}. Pass the "
            "matching `method_key`, `metric_key`, `value_key`, `chance_key` or `error_key` (e.g. "
            "`method_key='representation'` for `mcvi_ops.metrics.score_synthetic_screen`)."
        )
        raise ValueError(msg)
    save_path = check_save(save)
    table = table.assign(
        **{method_key: table[method_key].astype(str), metric_key: table[metric_key].astype(str)}
    )
    metric_names = _pick(table, metric_key, metrics, "metrics")
    method_names = _pick(table, method_key, methods, "methods")
    table = table[table[metric_key].isin(metric_names) & table[method_key].isin(method_names)]
    mean, error, error_note, chance = _summaries(
        table, [method_key, metric_key], value_key, error_key, chance_key
    )

    colors = _method_colors(method_names, palette)
    n_methods, n_metrics = len(method_names), len(metric_names)
    ax_given = ax is not None
    fig, ax = new_axes(ax, figsize=(0.32 * n_methods * n_metrics + 0.8 * n_metrics + 3.5, 4))
    width = 0.8 / n_methods
    x0 = np.arange(n_metrics)
    top = 0.0
    # upright value labels only where a bar is wider than its label (about 0.3 inch); the
    # axes' width before layout overestimates the final one, hence the margin
    bar_inches = 0.7 * ax.get_position().width * fig.get_figwidth() * width / n_metrics
    rotation = 0 if bar_inches >= 0.3 else 90
    for k, (method, color) in enumerate(zip(method_names, colors, strict=True)):
        xs = x0 - 0.4 + width * (k + 0.5)
        index = [(method, m) for m in metric_names]
        values = mean.reindex(index).to_numpy(dtype=float)
        errors = error.reindex(index).to_numpy(dtype=float) if error is not None else None
        ax.bar(
            xs,
            values,
            width=width,
            color=color,
            label=readable(method),
            yerr=errors,
            error_kw={"elinewidth": 0.8, "capsize": 2},
        )
        top = max(top, _label_bars(ax, xs, values, errors, annotate=annotate, rotation=rotation))
    if chance is not None:
        top = max(top, _chance_lines(ax, chance, method_names, metric_names, width))
    ax.set_xticks(x0, [readable(m) for m in metric_names])
    ax.set_xlim(-0.5, n_metrics - 0.5)
    ax.set_ylabel(ylabel)
    bottom = min(0.0, float(np.nanmin(mean.to_numpy(dtype=float))) * 1.1)
    ax.set_ylim(
        bottom, top * ((1.18 if rotation == 0 else 1.35) if annotate else 1.05) if top > 0 else 1
    )
    if title is not None:
        ax.set_title(title)
    if error_note is not None:
        corner_note(ax, error_note)
    handles, labels = ax.get_legend_handles_labels()
    if chance is not None and chance.notna().any():
        handles.append(Line2D([], [], color="k", lw=1.2, linestyle="--"))
        labels.append("chance / baseline")
    legend_outside(ax, handles, labels, title="method")
    return finish(fig, ax, show=show, save=save_path, return_fig=return_fig, ax_given=ax_given)
