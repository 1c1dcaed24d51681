"""Cells -> guide means -> gene means, centred on controls and z-scored (the paper's recipe)."""

from __future__ import annotations

import logging
from collections.abc import Sequence
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
    guide_key, gene_key = by
    reps = list(dict.fromkeys(rep_names(use_rep)))
    # integer codes per cell, never a per-cell array of strings (30 M-cell screens)
    guide_of_cell, all_guides = codes_of(check_obs_key(adata, guide_key, what="guide"))
    gene_of_cell, all_genes = codes_of(check_obs_key(adata, gene_key, what="gene"))
    valid = (guide_of_cell >= 0) & (gene_of_cell >= 0)
    if not valid.all():
        logger.warning(
            "Ignoring %d cells with a missing %r or %r.", (~valid).sum(), guide_key, gene_key
        )
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
    guide_names = all_guides[pair_guide]
    guide_gene = all_genes[pair_gene]
    gene_names, gene_codes = np.unique(guide_gene, return_inverse=True)
    guide_index = np.full(all_guides.size, -1, dtype=np.int64)
    guide_index[pair_guide] = np.arange(pair_guide.size)

    guide_is_control = guide_gene == control_category
    if center and not guide_is_control.any():
        msg = (
            f"Found no control cells with .obs[{gene_key!r}] == {control_category!r}; values "
            f"include {list(gene_names[:5])}. Pass the right `control_category`, or center=False."
        )
        raise ValueError(msg)

    codes_all = np.where(valid, guide_index[guide_of_cell], -1)
    n_cells_guide = np.bincount(codes_all[valid], minlength=guide_names.size)
    if level == "guide":
        names, is_control = guide_names, guide_is_control
        obs = pd.DataFrame(
            {gene_key: pd.Categorical(guide_gene), "n_cells": n_cells_guide},
            index=pd.Index(guide_names, name=None),
        )
    else:
        names, is_control = gene_names, gene_names == control_category
        n_guides = np.bincount(gene_codes, minlength=gene_names.size)
        n_cells_gene = np.bincount(gene_codes, weights=n_cells_guide, minlength=gene_names.size)
        obs = pd.DataFrame(
            {"n_guides": n_guides, "n_cells": n_cells_gene.astype(np.int64)},
            index=pd.Index(gene_names, name=None),
        )
    obs["is_control"] = is_control
    if keep_controls is None:
        keep_controls = level == "guide"
    keep = np.ones(names.size, dtype=bool) if keep_controls else ~is_control
    if not keep.any():
        msg = "No non-control rows to aggregate: every cell is a control."
        raise ValueError(msg)

    results: dict[str, np.ndarray] = {}
    info: dict[str, dict] = {}
    for rep in reps:
        x = get_rep(adata, rep, dtype=None)  # group_means sums in float64 block by block
        guide_means, _ = group_means(x, codes_all, guide_names.size)
        control_mean = (
            guide_means[guide_is_control].mean(axis=0) if guide_is_control.any() else None
        )
        if level == "gene":
            values, _ = group_means(guide_means, gene_codes, gene_names.size)
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
        results[rep_label(rep)] = values[keep].astype(np.float32)
        info[rep_label(rep)] = {
            "control_mean": None if control_mean is None else control_mean.astype(np.float32),
            "scale": divisor.astype(np.float32),
        }

    obs = obs.loc[keep]
    blocks, var_names, var_rep = [], [], []
    for key, values in results.items():
        blocks.append(values)
        if key == "X":
            var_names.extend(adata.var_names.astype(str))
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
        valid.sum(),
        out.n_obs,
        level,
        ", ".join(rep_label(r) for r in reps),
    )
    return out
