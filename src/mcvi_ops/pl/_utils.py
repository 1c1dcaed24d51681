"""What every plot shares: readable labels, neutral colours, outside legends, show/save/return."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TypeVar

from mcvi_ops._constants import OBSM

logger = logging.getLogger(__name__)

_F = TypeVar("_F", bound=Callable)

#: the documentation of what every plot takes and returns, written once: a docstring line that
#: holds only ``{name}`` (one of these keys) becomes the entry, at that line's indentation
SHARED_DOCS = {
    "ax": "ax\n    Axes to draw into; a new figure if `None`.",
    "show": (
        "show\n    Show the figure. `None` shows it unless axes to draw into or ``return_fig`` are\n"
        "    given."
    ),
    "save": (
        "save\n    Path to write the figure to, once it is finished (every panel and the legend "
        'outside\n    the axes); the format comes from the suffix, e.g. ``"figure.png"`` or\n'
        '    ``"figure.pdf"``.'
    ),
    "return_fig": "return_fig\n    Return the figure instead of the axes.",
    "returns_axes": (
        "The axes, unless the figure was shown (`None`) or ``return_fig`` (the figure)."
    ),
}


def shared_docs(func: _F) -> _F:
    """Fill the ``{ax}``, ``{show}``, ``{save}``, ... lines of ``func``'s docstring.

    Each line holding only a key of :data:`SHARED_DOCS` in braces is replaced by that entry,
    indented like the line; docstrings stripped by ``python -OO`` stay `None`.
    """
    if not func.__doc__:
        return func
    lines: list[str] = []
    for line in func.__doc__.splitlines():
        key = line.strip()
        if key.startswith("{") and key.endswith("}") and key[1:-1] in SHARED_DOCS:
            indent = line[: len(line) - len(line.lstrip())]
            lines += [
                indent + part if part else part for part in SHARED_DOCS[key[1:-1]].split("\n")
            ]
        else:
            lines.append(line)
    func.__doc__ = "\n".join(lines)
    return func


#: colour of control cells (drawn underneath everything else)
CONTROL_COLOR = "#d3d3d3"
#: colour of cells without a value in the coloured column
MISSING_COLOR = "#6e6e6e"
#: colour of the categories folded into "other" when there are too many to tell apart
OTHER_COLOR = "#969696"
#: legend label of cells without a value
MISSING_LABEL = "not annotated"

#: most entries per column of an outside legend (what fits next to a 4-inch-high panel)
LEGEND_ROWS = 16

#: labels of keys this package and its benchmarks write (embeddings, covariates, metrics)
LABELS = {
    OBSM.salient: "mcVAE salient",
    OBSM.background: "mcVAE background",
    OBSM.both: "mcVAE salient + background",
    OBSM.vae: "VAE",
    "mcvae_salient": "mcVAE salient",
    "mcvae_background": "mcVAE background",
    "mcvae_both": "mcVAE salient + background",
    "mcvae": "mcVAE",
    "cvae_salient": "cVAE salient",
    "cvae_background": "cVAE background",
    "cvae_both": "cVAE salient + background",
    "cvae": "cVAE",
    "vae": "VAE",
    "X_cellprofiler": "CellProfiler features",
    "cellprofiler": "CellProfiler features",
    "X_pca": "PCA",
    "X_pca_pixels": "PCA of pixels",
    "pca_pixels": "PCA of pixels",
    "X_umap": "UMAP",
    "X": ".X",
    "gene_symbol": "perturbed gene",
    "sgRNA": "guide",
    "effect_kind": "effect kind",
    "fov_position": "field-of-view position",
    "well_position": "well position",
    "auroc": "AUROC",
    "macro_f1": "macro-F1",
    "well_macro_f1": "well macro-F1 (controls)",
    "well_chance": "well macro-F1 at chance",
    "complex_average_precision": "same-complex AP",
    "complex_ap_baseline": "same-complex AP at chance",
    "novelty_auroc": "novelty AUROC",
    "average_precision": "average precision",
}

#: words written differently from their key (acronyms, method names)
_WORDS = {
    "mcvae": "mcVAE",
    "cvae": "cVAE",
    "vae": "VAE",
    "pca": "PCA",
    "umap": "UMAP",
    "fov": "field-of-view",
    "auroc": "AUROC",
    "auprc": "AUPRC",
    "ap": "AP",
    "map": "mAP",
    "f1": "F1",
    "cellprofiler": "CellProfiler",
}


def readable(key: str | None) -> str:
    """Return the label a reader understands for an ``.obsm``/``.obs`` key or a metric name.

    Known keys come from :data:`LABELS`; any other key loses its ``X_`` prefix and has its
    underscores turned into spaces (``"X_my_embedding"`` -> ``"my embedding"``), with acronyms
    such as ``pca`` or ``vae`` written in capitals.
    """
    if key is None:
        return ""
    key = str(key)
    if key in LABELS:
        return LABELS[key]
    stem = key.removeprefix("X_")
    if stem in LABELS:
        return LABELS[stem]
    words = [w for w in stem.split("_") if w]
    return " ".join(_WORDS.get(w.lower(), w) for w in words) or key


def new_axes(ax, figsize: tuple[float, float]):
    """Return ``(figure, axes)``: the given axes and its figure, or a new constrained figure."""
    import matplotlib.pyplot as plt

    if ax is None:
        fig, ax = plt.subplots(figsize=figsize, layout="constrained")
        return fig, ax
    return ax.figure, ax


def corner_note(ax, text: str):
    """Write a small grey note in the top-left corner of ``ax`` (what the numbers or bars show)."""
    return ax.text(
        0.01,
        0.98,
        text,
        transform=ax.transAxes,
        ha="left",
        va="top",
        fontsize="x-small",
        color="0.3",
    )


def mark_missing(ax, x: float, y: float):
    """Write a grey ``n/a`` at ``(x, y)`` in data coordinates, where a value could not be drawn."""
    return ax.text(x, y, "n/a", ha="center", va="bottom", fontsize="x-small", color="0.4")


def legend_outside(ax, handles=None, labels=None, *, title: str | None = None, **kwargs):
    """Put the legend of ``ax`` to the right of it, outside the axes.

    Constrained layout and ``bbox_inches="tight"`` make room for it, so it never covers the data
    or a panel further right that belongs to the same layout.
    """
    if handles is None:
        handles, labels = ax.get_legend_handles_labels()
    if not handles:
        return None
    kwargs.setdefault("ncols", -(-len(handles) // LEGEND_ROWS))
    return ax.legend(
        handles,
        labels,
        title=title,
        loc="upper left",
        bbox_to_anchor=(1.02, 1.0),
        borderaxespad=0.0,
        frameon=False,
        fontsize="small",
        title_fontsize="small",
        alignment="left",
        **kwargs,
    )


def check_save(save) -> Path | None:
    """Validate ``save`` before drawing, so a bad value fails before any work is done."""
    if save is None or save is False:
        return None
    if isinstance(save, str | os.PathLike):
        path = Path(save)
        if not path.suffix:
            msg = (
                f"`save` must be a file path with a suffix that names the format (e.g. "
                f"'umap.png' or 'umap.pdf'), got {str(save)!r}. Add a suffix."
            )
            raise ValueError(msg)
        return path
    msg = f"`save` must be a file path (str or os.PathLike) or None, got {save!r}."
    raise TypeError(msg)


def finish(fig, result, *, show: bool | None, save: Path | None, return_fig: bool, ax_given: bool):
    """Save the finished figure once, then show it or hand it back, following scanpy.

    ``show=None`` shows the figure unless the caller passed ``ax`` (they are composing a figure
    and draw more into it) or asked for it with ``return_fig``.
    """
    import matplotlib.pyplot as plt

    if save is not None:
        save.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(save, bbox_inches="tight", dpi=150)
        logger.info("Saved the figure to %s.", save)
    if return_fig:
        return fig
    if show is None:
        show = not ax_given
    if show:
        plt.show()
        return None
    return result


def as_list(value, n: int, what: str) -> list:
    """Broadcast a string (or `None`) to ``n`` items, or check a sequence has ``n`` items."""
    if value is None or isinstance(value, str):
        return [value] * n
    value = list(value) if isinstance(value, Sequence) else [value]
    if len(value) != n:
        msg = f"Got {len(value)} {what} for {n} panels; pass one per panel or a single string."
        raise ValueError(msg)
    return value
