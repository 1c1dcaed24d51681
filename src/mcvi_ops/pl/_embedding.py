"""Side-by-side UMAPs of the salient and background spaces, with a shared outside legend."""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from typing import Literal

import numpy as np
import pandas as pd
from anndata import AnnData

from ._utils import (
    CONTROL_COLOR,
    LEGEND_ROWS,
    MISSING_COLOR,
    MISSING_LABEL,
    OTHER_COLOR,
    as_list,
    check_save,
    finish,
    legend_outside,
    readable,
    shared_docs,
)

logger = logging.getLogger(__name__)


def _umap_of(adata: AnnData, rep: str, reps: Sequence[str]) -> str:
    """The ``.obsm`` key of the stored UMAP of ``rep``, or an error naming what to run.

    The UMAP of ``tl.umaps`` (``.obsm[f"X_umap_{rep}"]``), or scanpy's own ``.obsm["X_umap"]``
    when ``.uns["neighbors"]`` was computed on ``rep`` (``sc.pp.neighbors(adata, use_rep=rep)``
    followed by ``sc.tl.umap(adata)``).
    """
    from mcvi_ops.tl._umap import neighbors_key, umap_key

    if umap_key(rep) in adata.obsm:
        return umap_key(rep)
    params = adata.uns.get("neighbors", {}).get("params", {})
    if "X_umap" in adata.obsm and params.get("use_rep") == rep:
        return "X_umap"
    msg = (
        f"Did not find a UMAP of .obsm[{rep!r}] (in .obsm[{umap_key(rep)!r}], or .obsm['X_umap'] "
        f"with .uns['neighbors'] computed on {rep!r}). Run `mcvi_ops.tl.umaps(adata, "
        f"use_rep={list(reps)!r})` first, or `sc.pp.neighbors(adata, use_rep={rep!r}, "
        f"key_added={neighbors_key(rep)!r})` and `sc.tl.umap(adata, "
        f"neighbors_key={neighbors_key(rep)!r}, key_added={umap_key(rep)!r})`."
    )
    raise KeyError(msg)


def _is_categorical(adata: AnnData, color: str | None) -> bool:
    if color is None or color not in adata.obs:
        return False
    values = adata.obs[color]
    return not pd.api.types.is_numeric_dtype(values) or pd.api.types.is_bool_dtype(values)


def _default_palette(n: int) -> list[str]:
    """Return scanpy's default palette for ``n`` categories."""
    import matplotlib as mpl
    from scanpy.plotting import palettes

    cycle = mpl.rcParams["axes.prop_cycle"].by_key()["color"]
    for palette in (cycle, palettes.default_20, palettes.default_28, palettes.default_102):
        if n <= len(palette):
            return list(palette[:n])
    return [palettes.default_102[i % len(palettes.default_102)] for i in range(n)]


def _plot_groups(
    adata: AnnData,
    color: str,
    *,
    controls: set[str],
    max_categories: int | None,
    palette,
) -> tuple[pd.Series, np.ndarray, dict[str, str]]:
    """Label of each cell as drawn, the drawing layer of each cell, and label -> colour.

    Layers: 0 control, 1 not annotated, 2 other, 3 everything else (drawn last, on top).
    """
    values = adata.obs[color]
    if not isinstance(values.dtype, pd.CategoricalDtype):
        values = values.astype("string").astype("category")
    categories = list(values.cat.categories)
    counts = values.value_counts()
    control_cats = [c for c in categories if str(c) in controls]
    rest = [c for c in categories if c not in control_cats]
    folded: list = []
    if max_categories is not None and len(rest) > max_categories:
        ranked = sorted(rest, key=lambda c: (-counts[c], categories.index(c)))
        top = set(ranked[:max_categories])
        folded = [c for c in rest if c not in top]
        rest = [c for c in rest if c in top]
        logger.info(
            "%r has %d categories; the %d largest get a colour, %d are drawn as 'other'.",
            color,
            len(categories) - len(control_cats),
            max_categories,
            len(folded),
        )

    stored = adata.uns.get(f"{color}_colors")
    if isinstance(palette, Mapping):
        base = dict(zip(rest, _default_palette(len(rest)), strict=True))
        colors = {str(c): palette.get(c, base[c]) for c in rest}
    elif palette is not None:
        import matplotlib as mpl

        if isinstance(palette, str):
            cmap = mpl.colormaps[palette]
            n = len(rest)
            listed = getattr(cmap, "colors", None)
            seq = (
                [listed[i % len(listed)] for i in range(n)]
                if listed is not None
                else [cmap(x) for x in np.linspace(0, 1, max(n, 1))]
            )
        else:
            seq = [list(palette)[i % len(palette)] for i in range(len(rest))]
        colors = {str(c): mpl.colors.to_hex(col) for c, col in zip(rest, seq, strict=True)}
    elif stored is not None and not folded and len(stored) == len(categories):
        colors = {str(c): stored[categories.index(c)] for c in rest}
    else:
        colors = {str(c): col for c, col in zip(rest, _default_palette(len(rest)), strict=True)}

    labels = values.astype("string").astype(object).to_numpy(copy=True)
    layer = np.full(adata.n_obs, 3, dtype=np.int8)
    if folded:
        other = f"other ({len(folded)} smaller categories)"
        is_other = values.isin(folded).to_numpy()
        labels[is_other] = other
        layer[is_other] = 2
        colors[other] = OTHER_COLOR
    for c in control_cats:
        is_control = (values == c).to_numpy()
        label = str(c) if "control" in str(c).lower() else f"{c} (control)"
        labels[is_control] = label
        layer[is_control] = 0
        colors[label] = CONTROL_COLOR
    missing = values.isna().to_numpy()
    if missing.any():
        label = f"{MISSING_LABEL} ({int(missing.sum()):,} cells)"
        labels[missing] = label
        layer[missing] = 1
        colors[label] = MISSING_COLOR
    order = list(colors)  # legend order: categories, other, controls, not annotated
    drawn = pd.Series(pd.Categorical(labels, categories=order), index=adata.obs_names)
    return drawn, layer, colors


def _legend_handles(colors: Mapping[str, str]) -> list:
    from matplotlib.lines import Line2D

    return [
        Line2D(
            [],
            [],
            marker="o",
            linestyle="",
            markersize=6,
            markerfacecolor=c,
            markeredgecolor="none",
        )
        for c in colors.values()
    ]


def _legend_inches(labels: Sequence[str]) -> float:
    """Width the outside legend of these labels takes, at ``legend_outside``'s font size."""
    columns = [labels[i : i + LEGEND_ROWS] for i in range(0, len(labels), LEGEND_ROWS)]
    return 0.3 + sum(0.35 + 0.065 * max(len(label) for label in col) for col in columns)


def _check_options(legend_loc, max_categories: int | None, kwargs: Mapping) -> str:
    """The legend placement (``None`` is ``"none"``), refusing options that are not plot options."""
    computing = sorted({"n_neighbors", "recompute"} & set(kwargs))
    if computing:
        msg = (
            f"`salient_background` plots stored UMAPs and no longer computes them, so it takes no "
            f"{computing}. Run `mcvi_ops.tl.umaps(adata, use_rep=reps, n_neighbors=...)` first."
        )
        raise TypeError(msg)
    if legend_loc is None:
        legend_loc = "none"
    if legend_loc not in ("right margin", "on data", "none"):
        msg = f"`legend_loc` must be 'right margin', 'on data' or 'none', got {legend_loc!r}."
        raise ValueError(msg)
    if max_categories is not None and max_categories < 1:
        msg = f"`max_categories` must be a positive integer or None, got {max_categories!r}."
        raise ValueError(msg)
    return legend_loc


def _given_axes(ax, axs, reps: Sequence[str]):
    """The axes the caller gave (``ax`` for one representation, or ``axs``), or `None`."""
    if ax is None:
        return axs
    if axs is not None:
        msg = "Pass either `ax` (one representation) or `axs` (one axes per rep), not both."
        raise ValueError(msg)
    if len(reps) != 1:
        msg = (
            f"`ax` takes one panel but there are {len(reps)} representations {list(reps)}; pass "
            "`axs` with one axes per rep."
        )
        raise ValueError(msg)
    return [ax]


def _categorical_drawing(
    adata: AnnData, color: str, *, control_category, max_categories: int | None, palette, seed: int
) -> tuple[pd.DataFrame, np.ndarray, dict[str, str]]:
    """What the panels of a categorical colour draw: labels in drawing order, the order, colours.

    Controls first, then cells without a value, then "other", then the rest in a random order
    fixed by ``seed``.
    """
    if control_category is None:
        controls: set[str] = set()
    elif isinstance(control_category, str):
        controls = {control_category}
    else:
        controls = {str(c) for c in control_category}
    drawn, layer, colors = _plot_groups(
        adata, color, controls=controls, max_categories=max_categories, palette=palette
    )
    rng = np.random.default_rng(seed)
    order = np.lexsort((rng.permutation(adata.n_obs), layer))
    obs = pd.DataFrame({color: drawn.to_numpy()[order]}, index=np.arange(order.size).astype(str))
    obs[color] = pd.Categorical(obs[color], categories=list(colors))
    return obs, order, colors


def _draw_panel(
    adata: AnnData,
    basis: str,
    ax,
    *,
    color: str | None,
    title: str,
    categorical: tuple[pd.DataFrame, np.ndarray, dict[str, str]] | None,
    legend_loc: str,
    kwargs: Mapping,
) -> None:
    """One UMAP panel, through :func:`scanpy.pl.embedding`."""
    import scanpy as sc

    if categorical is not None:
        obs, order, colors = categorical
        view = AnnData(obs=obs)
        view.obsm["X_umap"] = np.asarray(adata.obsm[basis])[order]
        sc.pl.embedding(
            view,
            basis="X_umap",
            color=color,
            palette=colors,
            legend_loc="on data" if legend_loc == "on data" else "none",
            na_in_legend=False,
            sort_order=False,
            ax=ax,
            show=False,
            title=title,
            **kwargs,
        )
    else:
        sc.pl.embedding(adata, basis=basis, color=color, ax=ax, show=False, title=title, **kwargs)
        mappable = ax.collections[-1] if ax.collections else None
        if color is not None and getattr(mappable, "colorbar", None) is not None:
            mappable.colorbar.set_label(readable(color))
    ax.set_xlabel("UMAP1")
    ax.set_ylabel("UMAP2")


@shared_docs
def salient_background(
    adata: AnnData,
    *,
    color: str | None = None,
    reps: Sequence[str] = ("X_mcvae_salient", "X_mcvae_background"),
    seed: int = 0,
    axs=None,
    show: bool | None = None,
    save: str | os.PathLike | None = None,
    ax=None,
    return_fig: bool = False,
    title: str | Sequence[str] | None = None,
    control_category: str | Sequence[str] | None = ("nontargeting", "control"),
    max_categories: int | None = 20,
    legend_loc: Literal["right margin", "on data", "none"] | None = "right margin",
    **kwargs,
):
    """UMAPs of several embeddings (by default salient and background) side by side.

    .. long function: documentation and signature; the body is under 80 lines.

    The UMAPs are read, never computed: :func:`mcvi_ops.tl.umaps` stores the UMAP of each
    representation ``rep`` under ``.obsm[f"X_umap_{rep}"]`` (for one representation, scanpy's
    ``.obsm["X_umap"]`` also serves when ``.uns["neighbors"]`` was computed on it). A missing UMAP
    raises an error naming what to run.

    When ``color`` is a categorical ``.obs`` column, the panels share one legend, to the right of
    the last panel (outside all axes), and:

    - cells of ``control_category`` are drawn first, in light grey, under the perturbed cells;
    - with more than ``max_categories`` other categories, the ``max_categories`` largest keep a
      colour and a legend entry and the rest are drawn in grey as ``"other (k smaller
      categories)"``, so that the legend stays short enough to read and every colour in it can
      be told apart;
    - cells without a value (NA) are labelled ``"not annotated"`` with their count;
    - the remaining cells are drawn in a random order (fixed by ``seed``) so that no category
      systematically hides another.

    Parameters
    ----------
    adata
        Cells (or guides/genes) with the embeddings and their UMAPs in ``.obsm``.
    color
        Obs column or variable to colour by (passed to :func:`scanpy.pl.embedding`).
    reps
        Keys of ``.obsm``, one panel each.
    seed
        Random state of the drawing order.
    axs
        Sequence of axes, one per representation; a new figure if `None`.
    {show}
    {save}
    ax
        Axes to draw into when there is one representation (the same as ``axs=[ax]``).
    {return_fig}
    title
        Title of each panel; by default a readable name of each representation
        (``"X_mcvae_salient"`` -> ``"mcVAE salient"``).
    control_category
        Value(s) of the ``color`` column drawn as control cells (light grey, underneath);
        `None` for none.
    max_categories
        Most categories (besides controls) with their own colour; `None` colours all.
    legend_loc
        ``"right margin"`` (one shared legend right of the panels), ``"on data"`` (labels at the
        category medians; readable only when categories form separate clusters) or ``"none"``.
    **kwargs
        Passed to :func:`scanpy.pl.embedding` (e.g. ``frameon=False``, ``size``, ``palette``).

    Returns
    -------
    The list of axes, one per representation, unless the figure was shown (`None`) or
    ``return_fig`` (the figure).

    Examples
    --------
    >>> mcvi_ops.tl.umaps(
    ...     adata, use_rep=["X_mcvae_salient", "X_mcvae_background"]
    ... )  # doctest: +SKIP
    >>> mcvi_ops.pl.salient_background(
    ...     adata, color="gene_symbol", save="umaps.png"
    ... )  # doctest: +SKIP
    """
    import matplotlib.pyplot as plt

    reps = list(reps)
    legend_loc = _check_options(legend_loc, max_categories, kwargs)
    bases = [_umap_of(adata, rep, reps) for rep in reps]
    axs = _given_axes(ax, axs, reps)
    save_path = check_save(save)
    titles = as_list(title, len(reps), "titles")
    categorical = None
    if _is_categorical(adata, color):
        categorical = _categorical_drawing(
            adata,
            color,
            control_category=control_category,
            max_categories=max_categories,
            palette=kwargs.pop("palette", None),
            seed=seed,
        )
    ax_given = axs is not None
    if axs is None:
        extra = 0.6
        if categorical is not None and legend_loc == "right margin":
            extra = _legend_inches([*categorical[2], readable(color)])
        size = (4 * len(reps) + extra, 4)
        _, axs = plt.subplots(1, len(reps), figsize=size, squeeze=False, layout="constrained")
    axs = list(np.ravel(np.asarray(axs, dtype=object)))
    if len(axs) != len(reps):
        msg = f"Got {len(axs)} axes for {len(reps)} representations; pass one axis per rep."
        raise ValueError(msg)
    for rep, basis, panel_ax, panel_title in zip(reps, bases, axs, titles, strict=True):
        _draw_panel(
            adata,
            basis,
            panel_ax,
            color=color,
            title=readable(rep) if panel_title is None else panel_title,
            categorical=categorical,
            legend_loc=legend_loc,
            kwargs=kwargs,
        )
    if categorical is not None and legend_loc == "right margin":
        colors = categorical[2]
        legend_outside(axs[-1], _legend_handles(colors), list(colors), title=readable(color))
    fig = axs[0].figure
    return finish(fig, axs, show=show, save=save_path, return_fig=return_fig, ax_given=ax_given)
