"""Cells -> guide means -> gene means, centred on controls and z-scored (the paper's recipe)."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import pandas as pd
from anndata import AnnData

from ._utils import (
    check_obs_key,
    codes_of,
    finite_rows,
    get_rep,
    group_means,
    rep_label,
    rep_names,
)

logger = logging.getLogger(__name__)


def aggregate(
    adata: AnnData,
    *,
    use_rep: str | Sequence[str] | None,
    by: tuple[str, str] = ("sgRNA", "gene_symbol"),
    level: Literal["gene", "guide"] = "gene",
    control_category: str | None = "nontargeting",
    center: bool = True,
    scale: bool = True,
    keep_controls: bool | None = None,
) -> AnnData:
    """Aggregate cell embeddings into guide-level or gene-level profiles.

    .. long function: documentation and signature; the body is under 80 lines.

    The recipe of the Multi-Contrastive VAE paper: the cells of each guide are averaged, the guide
    means of each gene are averaged (so every guide weighs the same, whatever its cell count), the
    mean of the control guides is subtracted, and every feature is divided by its standard
    deviation across the perturbation rows. Works on any embedding: the model's latent spaces in
    ``.obsm`` or a feature table in ``.X``.

    Cells with a NaN or infinite value in any of the ``use_rep`` representations are left out
    (with a warning giving their number), so one bad cell does not turn every profile into NaN.

    Parameters
    ----------
    adata
        Cells, one row each.
    use_rep
        Key (or list of keys) of ``.obsm`` to aggregate; `None` or ``"X"`` aggregates ``.X``.
    by
        The obs columns ``(guide_key, gene_key)``. Each guide must belong to one gene.
    level
        ``"gene"``: one row per gene (mean of its guide means). ``"guide"``: one row per guide.
    control_category
        Value of ``adata.obs[gene_key]`` that marks control cells (non-targeting guides). Needed
        when ``center=True``.
    center
        Subtract the control mean: the mean over control guides of their guide means (identical at
        both levels, since the control "gene" is the mean of the control guides).
    scale
        After centring, divide each feature by its standard deviation (``ddof=1``) across the
        non-control rows of the output level; features with zero spread are left unscaled. The
        rows are not re-centred, so the offset from the controls (the phenotype) is kept.
    keep_controls
        Keep the control rows in the output (flagged by ``obs["is_control"]``). `None` (default):
        control guides are kept at ``level="guide"`` (they are the null for downstream tests) and
        the single control row is dropped at ``level="gene"`` (it is zero after centring).

    Returns
    -------
    A new AnnData with one row per guide or gene (``obs_names`` are the guide or gene names):

    ``.X``
        Every aggregated representation side by side, float32, so ``.to_df()``, pandas, scanpy,
        pycytominer and copairs read the profiles directly. Variables are named
        ``{use_rep}_0``, ``{use_rep}_1``, ... (e.g. ``X_mcvae_salient_0``); the cell-level ``.X``
        (``use_rep`` `None` or containing ``"X"``) keeps its ``var_names`` and comes first.
        ``.var["representation"]`` says which representation each variable belongs to.
    ``.obsm[use_rep]``
        The aggregated representation for each key of ``.obsm`` in ``use_rep`` (same key as at the
        cell level, so metrics take the same ``use_rep`` at every level).
    ``.obs["n_cells"]``
        Number of cells per row; gene level also has ``obs["n_guides"]``, guide level has
        ``obs[gene_key]``. Both have ``obs["is_control"]``.
    ``.uns["aggregate"]``
        Parameters, and per representation the subtracted ``control_mean`` and the ``scale``
        divisors.

    Examples
    --------
    >>> import mcvi_ops
    >>> adata.obsm["X_mcvae_salient"] = model.get_latent_representation(...)  # doctest: +SKIP
    >>> genes = mcvi_ops.tl.aggregate(adata, use_rep="X_mcvae_salient")  # doctest: +SKIP
    >>> guides = mcvi_ops.tl.aggregate(
    ...     adata, use_rep=["X_mcvae_salient", "X_mcvae_background"], level="guide"
    ... )  # doctest: +SKIP
    >>> guides.to_df().iloc[:2, :3]  # doctest: +SKIP
    """
    if level not in ("gene", "guide"):
        msg = f"`level` must be 'gene' or 'guide', got {level!r}."
        raise ValueError(msg)
    if isinstance(by, str) or len(by) != 2:
        msg = (
            f"`by` must be a pair (guide_key, gene_key), e.g. ('sgRNA', 'gene_symbol'); got {by!r}."
        )
        raise ValueError(msg)
    reps = list(dict.fromkeys(rep_names(use_rep)))
    groups = _guides_and_genes(adata, by, reps, control_category, need_controls=center)
    obs, is_control = _output_rows(groups, level, by[1], control_category)
    if keep_controls is None:
        keep_controls = level == "guide"
    keep = np.ones(is_control.size, dtype=bool) if keep_controls else ~is_control
    if not keep.any():
        msg = "No non-control rows to aggregate: every cell is a control."
        raise ValueError(msg)
    results: dict[str, np.ndarray] = {}
    info: dict[str, dict] = {}
    for rep in reps:
        values, info[rep_label(rep)] = _profiles(
            get_rep(adata, rep, dtype=None),  # group_means sums in float64 block by block
            groups,
            level=level,
            is_control=is_control,
            center=center,
            scale=scale,
        )
        results[rep_label(rep)] = values[keep].astype(np.float32)
    out = _profiles_anndata(results, obs.loc[keep], adata.var_names)
    out.uns["aggregate"] = {
        "params": {
            "use_rep": [rep_label(r) for r in reps],
            "by": list(by),
            "level": level,
            "control_category": control_category,
            "center": center,
            "scale": scale,
            "keep_controls": keep_controls,
        },
        **{k: {kk: vv for kk, vv in v.items() if vv is not None} for k, v in info.items()},
    }
    logger.info(
        "Aggregated %d cells into %d %s rows (%s).",
        int((groups.guide_of_cell >= 0).sum()),
        out.n_obs,
        level,
        ", ".join(rep_label(r) for r in reps),
    )
    return out


@dataclass
class _Groups:
    """Which guide each usable cell belongs to, and which gene each guide targets."""

    guide_of_cell: np.ndarray  # row of the cell's guide in `guide_names`; -1: left out
    guide_names: np.ndarray
    guide_gene: np.ndarray  # the gene of each guide
    gene_names: np.ndarray
    gene_of_guide: np.ndarray  # row of each guide's gene in `gene_names`
    guide_is_control: np.ndarray


def _usable_cells(
    adata: AnnData, guide_of_cell: np.ndarray, gene_of_cell: np.ndarray, reps: list, by
) -> np.ndarray:
    """Cells with a guide, a gene and finite values in every representation (others warned of)."""
    valid = (guide_of_cell >= 0) & (gene_of_cell >= 0)
    if not valid.all():
        logger.warning("Ignoring %d cells with a missing %r or %r.", (~valid).sum(), *by)
    for rep in reps:
        finite = finite_rows(adata, rep)
        if not finite.all():
            logger.warning(
                "Ignoring %d cells with NaN or infinite values in %r.",
                (~finite).sum(),
                rep_label(rep),
            )
            valid &= finite
    if not valid.any():
        msg = (
            "No cell has a guide, a gene and finite values in every representation of "
            f"`use_rep`={[rep_label(r) for r in reps]}; nothing to aggregate."
        )
        raise ValueError(msg)
    return valid


def _guides_and_genes(
    adata: AnnData, by, reps: list, control_category: str | None, *, need_controls: bool
) -> _Groups:
    """The guides and genes of the usable cells; every guide must target one gene."""
    guide_key, gene_key = by
    # integer codes per cell, never a per-cell array of strings (30 M-cell screens)
    guide_of_cell, all_guides = codes_of(check_obs_key(adata, guide_key, what="guide"))
    gene_of_cell, all_genes = codes_of(check_obs_key(adata, gene_key, what="gene"))
    valid = _usable_cells(adata, guide_of_cell, gene_of_cell, reps, by)
    # the distinct (guide, gene) pairs, sorted by guide then gene
    pairs = np.unique(guide_of_cell[valid] * all_genes.size + gene_of_cell[valid])
    pair_guide, pair_gene = np.divmod(pairs, all_genes.size)
    present, n_genes_of_guide = np.unique(pair_guide, return_counts=True)
    if (n_genes_of_guide > 1).any():
        multi = present[n_genes_of_guide > 1]
        msg = (
            f"Each guide in .obs[{guide_key!r}] must belong to one gene in .obs[{gene_key!r}], "
            f"but {int(n_genes_of_guide[n_genes_of_guide > 1].sum())} rows disagree, e.g. guides "
            f"{all_guides[multi[:5]].tolist()}. Fix the guide annotation."
        )
        raise ValueError(msg)
    guide_gene = all_genes[pair_gene]
    gene_names, gene_of_guide = np.unique(guide_gene, return_inverse=True)
    guide_is_control = guide_gene == control_category
    if need_controls and not guide_is_control.any():
        msg = (
            f"Found no control cells with .obs[{gene_key!r}] == {control_category!r}; values "
            f"include {list(gene_names[:5])}. Pass the right `control_category`, or center=False."
        )
        raise ValueError(msg)
    guide_index = np.full(all_guides.size, -1, dtype=np.int64)
    guide_index[pair_guide] = np.arange(pair_guide.size)
    return _Groups(
        guide_of_cell=np.where(valid, guide_index[guide_of_cell], -1),
        guide_names=all_guides[pair_guide],
        guide_gene=guide_gene,
        gene_names=gene_names,
        gene_of_guide=gene_of_guide,
        guide_is_control=guide_is_control,
    )


def _output_rows(
    groups: _Groups, level: str, gene_key: str, control_category: str | None
) -> tuple[pd.DataFrame, np.ndarray]:
    """The obs of the output rows (guides or genes) and which of them are controls."""
    used = groups.guide_of_cell[groups.guide_of_cell >= 0]
    n_cells_guide = np.bincount(used, minlength=groups.guide_names.size)
    if level == "guide":
        is_control = groups.guide_is_control
        obs = pd.DataFrame(
            {gene_key: pd.Categorical(groups.guide_gene), "n_cells": n_cells_guide},
            index=pd.Index(groups.guide_names, name=None),
        )
    else:
        n_genes = groups.gene_names.size
        is_control = groups.gene_names == control_category
        n_guides = np.bincount(groups.gene_of_guide, minlength=n_genes)
        n_cells = np.bincount(groups.gene_of_guide, weights=n_cells_guide, minlength=n_genes)
        obs = pd.DataFrame(
            {"n_guides": n_guides, "n_cells": n_cells.astype(np.int64)},
            index=pd.Index(groups.gene_names, name=None),
        )
    obs["is_control"] = is_control
    return obs, is_control


def _profiles(
    x, groups: _Groups, *, level: str, is_control: np.ndarray, center: bool, scale: bool
) -> tuple[np.ndarray, dict]:
    """Guide (and gene) means of one representation, centred on controls and scaled."""
    guide_means, _ = group_means(x, groups.guide_of_cell, groups.guide_names.size)
    control = groups.guide_is_control
    control_mean = guide_means[control].mean(axis=0) if control.any() else None
    if level == "gene":
        values, _ = group_means(guide_means, groups.gene_of_guide, groups.gene_names.size)
    else:
        values = guide_means
    if center:
        values = values - control_mean
    divisor = np.ones(values.shape[1])
    if scale:
        rows = values[~is_control]
        if rows.shape[0] < 2:
            msg = "Cannot scale with fewer than 2 non-control rows; pass scale=False."
            raise ValueError(msg)
        sd = rows.std(axis=0, ddof=1)
        divisor = np.where(sd > 0, sd, 1.0)
        values = values / divisor
    info = {
        "control_mean": None if control_mean is None else control_mean.astype(np.float32),
        "scale": divisor.astype(np.float32),
    }
    return values, info


def _profiles_anndata(
    results: dict[str, np.ndarray], obs: pd.DataFrame, cell_var_names: pd.Index
) -> AnnData:
    """Every representation side by side in ``.X``; those of ``.obsm`` also in ``.obsm``."""
    blocks, var_names, var_rep = [], [], []
    for key, values in results.items():
        blocks.append(values)
        if key == "X":
            var_names.extend(cell_var_names.astype(str))
        else:
            var_names.extend(f"{key}_{j}" for j in range(values.shape[1]))
        var_rep.extend([key] * values.shape[1])
    var = pd.DataFrame(
        {"representation": pd.Categorical(var_rep, categories=list(results))},
        index=pd.Index(var_names),
    )
    out = AnnData(X=np.hstack(blocks), obs=obs, var=var)
    if not out.var_names.is_unique:
        out.var_names_make_unique()
    for key, values in results.items():
        if key != "X":
            out.obsm[key] = values
    return out
