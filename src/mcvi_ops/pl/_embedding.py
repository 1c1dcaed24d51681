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
)

logger = logging.getLogger(__name__)

#: scanpy switches from exact neighbours to pynndescent from this many cells on
_APPROXIMATE_FROM = 8192


def _approximate_knn(n_neighbors: int, seed: int, n_obs: int):
    """Approximate k-NN (pynndescent) for scanpy that returns a ``csr_matrix``.

    scanpy 1.11.5 calls ``getnnz`` on pynndescent's result, a ``csr_array`` that no longer has
    it, so neighbours of more than 8,192 cells fail; a ``csr_matrix`` has it.
    """
    import scipy.sparse
    from pynndescent import PyNNDescentTransformer
    from sklearn.base import BaseEstimator, TransformerMixin

    class CsrMatrixNNDescent(TransformerMixin, BaseEstimator):
        def __init__(self, n_neighbors: int = 15, random_state: int = 0) -> None:
            self.n_neighbors = n_neighbors
            self.random_state = random_state

        def fit_transform(self, X, y=None):
            # UMAP's defaults for the index size, as scanpy uses them
            inner = PyNNDescentTransformer(
                n_neighbors=self.n_neighbors,
                random_state=self.random_state,
                n_trees=min(64, 5 + round(n_obs**0.5 / 20.0)),
                n_iters=max(5, round(np.log2(n_obs))),
            )
            return scipy.sparse.csr_matrix(inner.fit_transform(X))

    return CsrMatrixNNDescent(n_neighbors=n_neighbors, random_state=seed)


def _umap(adata: AnnData, rep: str, *, n_neighbors: int, recompute: bool, seed: int) -> str:
    """Return the ``.obsm`` key of the UMAP of ``rep``, computing and storing it if needed."""
    import scanpy as sc

    umap_key = f"X_umap_{rep}"
    if recompute or umap_key not in adata.obsm:
        neighbors_key = f"neighbors_{rep}"
        transformer = (
            _approximate_knn(n_neighbors, seed, adata.n_obs)
            if adata.n_obs >= _APPROXIMATE_FROM
            else None
        )
        sc.pp.neighbors(
            adata,
            use_rep=rep,
            n_neighbors=n_neighbors,
            key_added=neighbors_key,
            random_state=seed,
            transformer=transformer,
        )
        sc.tl.umap(adata, neighbors_key=neighbors_key, key_added=umap_key, random_state=seed)
        logger.info("Stored the UMAP of %r in .obsm[%r].", rep, umap_key)
    return umap_key


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


def salient_background(
    adata: AnnData,
    *,
    color: str | None = None,
    reps: Sequence[str] = ("X_mcvae_salient", "X_mcvae_background"),
    n_neighbors: int = 15,
    recompute: bool = False,
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

    For each representation ``rep`` the neighbour graph is stored under ``f"neighbors_{rep}"`` and
    the UMAP under ``.obsm[f"X_umap_{rep}"]``; existing results are reused unless ``recompute``.
    ``.obsm["X_umap"]`` and ``.uns["neighbors"]`` are never touched.

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
        Cells (or guides/genes) with the embeddings in ``.obsm``.
    color
        Obs column or variable to colour by (passed to :func:`scanpy.pl.embedding`).
    reps
        Keys of ``.obsm``, one panel each.
    n_neighbors
        Passed to :func:`scanpy.pp.neighbors`.
    recompute
        Recompute neighbours and UMAP even if stored.
    seed
        Random state of neighbours, UMAP and drawing order.
    axs
        Sequence of axes, one per representation; a new figure if `None`.
    show
        Show the figure. `None` shows it unless ``ax``/``axs`` or ``return_fig`` is given.
    save
        Path to write the figure to once all panels are drawn (format from the suffix, e.g.
        ``"umaps.png"``, ``"umaps.pdf"``); the legend outside the axes is included.
    ax
        Axes to draw into when there is one representation (the same as ``axs=[ax]``).
    return_fig
        Return the figure instead of the axes.
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
    >>> mcvi_ops.pl.salient_background(
    ...     adata, color="gene_symbol", save="umaps.png"
    ... )  # doctest: +SKIP
    """
    import matplotlib.pyplot as plt
    import scanpy as sc

    reps = list(reps)
    for rep in reps:
        if rep not in adata.obsm:
            msg = (
                f"Did not find .obsm[{rep!r}]; available keys are {list(adata.obsm.keys())}. "
                "Run `model.get_latent_representation(...)` first."
            )
            raise KeyError(msg)
    if legend_loc is None:
        legend_loc = "none"
    if legend_loc not in ("right margin", "on data", "none"):
        msg = f"`legend_loc` must be 'right margin', 'on data' or 'none', got {legend_loc!r}."
        raise ValueError(msg)
    if max_categories is not None and max_categories < 1:
        msg = f"`max_categories` must be a positive integer or None, got {max_categories!r}."
        raise ValueError(msg)
    if ax is not None:
        if axs is not None:
            msg = "Pass either `ax` (one representation) or `axs` (one axes per rep), not both."
            raise ValueError(msg)
        if len(reps) != 1:
            msg = (
                f"`ax` takes one panel but there are {len(reps)} representations {reps}; pass "
                "`axs` with one axes per rep."
            )
            raise ValueError(msg)
        axs = [ax]
    save_path = check_save(save)
    titles = as_list(title, len(reps), "titles")
    categorical = _is_categorical(adata, color)
    if categorical:
        if control_category is None:
            controls = set()
        elif isinstance(control_category, str):
            controls = {control_category}
        else:
            controls = {str(c) for c in control_category}
        drawn, layer, colors = _plot_groups(
            adata,
            color,
            controls=controls,
            max_categories=max_categories,
            palette=kwargs.pop("palette", None),
        )
        rng = np.random.default_rng(seed)
        order = np.lexsort((rng.permutation(adata.n_obs), layer))
        obs = pd.DataFrame(
            {color: drawn.to_numpy()[order]}, index=np.arange(order.size).astype(str)
        )
        obs[color] = pd.Categorical(obs[color], categories=list(colors))
    ax_given = axs is not None
    if axs is None:
        extra = 0.6
        if categorical and legend_loc == "right margin":
            extra = _legend_inches([*colors, readable(color)])
        fig, axs = plt.subplots(
            1,
            len(reps),
            figsize=(4 * len(reps) + extra, 4),
            squeeze=False,
            layout="constrained",
        )
        axs = list(axs.ravel())
    axs = list(np.ravel(np.asarray(axs, dtype=object)))
    if len(axs) != len(reps):
        msg = f"Got {len(axs)} axes for {len(reps)} representations; pass one axis per rep."
        raise ValueError(msg)
    fig = axs[0].figure

    for rep, panel_ax, panel_title in zip(reps, axs, titles, strict=True):
        umap_key = _umap(adata, rep, n_neighbors=n_neighbors, recompute=recompute, seed=seed)
        panel_title = readable(rep) if panel_title is None else panel_title
        if categorical:
            view = AnnData(obs=obs)
            view.obsm["X_umap"] = np.asarray(adata.obsm[umap_key])[order]
            sc.pl.embedding(
                view,
                basis="X_umap",
                color=color,
                palette=colors,
                legend_loc="on data" if legend_loc == "on data" else "none",
                na_in_legend=False,
                sort_order=False,
                ax=panel_ax,
                show=False,
                title=panel_title,
                **kwargs,
            )
        else:
            sc.pl.embedding(
                adata,
                basis=umap_key,
                color=color,
                ax=panel_ax,
                show=False,
                title=panel_title,
                **kwargs,
            )
            mappable = panel_ax.collections[-1] if panel_ax.collections else None
            if color is not None and getattr(mappable, "colorbar", None) is not None:
                mappable.colorbar.set_label(readable(color))
        panel_ax.set_xlabel("UMAP1")
        panel_ax.set_ylabel("UMAP2")
    if categorical and legend_loc == "right margin":
        legend_outside(axs[-1], _legend_handles(colors), list(colors), title=readable(color))
    return finish(fig, axs, show=show, save=save_path, return_fig=return_fig, ax_given=ax_given)
