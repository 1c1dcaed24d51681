"""Novel versus shifted phenotypes from the salient and background spaces of an mcVAE."""

from __future__ import annotations

import logging

import numpy as np
import pandas as pd
from anndata import AnnData
from scipy.stats import false_discovery_control

from ._utils import check_obs_key, codes_of, get_rep, group_means

logger = logging.getLogger(__name__)


def benjamini_hochberg(pvalues: np.ndarray) -> np.ndarray:
    """Benjamini-Hochberg adjusted p-values (NaN stays NaN and is not counted as a test).

    :func:`scipy.stats.false_discovery_control` on the finite p-values; scipy rejects NaN, and a
    NaN here marks a perturbation that was not tested.
    """
    p = np.asarray(pvalues, dtype=float)
    q = np.full(p.shape, np.nan)
    ok = np.isfinite(p)
    if ok.any():
        q[ok] = false_discovery_control(p[ok], method="bh")
    return q


def _null_norms(
    controls: np.ndarray,
    center: np.ndarray,
    sizes: np.ndarray,
    n_permutations: int,
    rng: np.random.Generator,
) -> np.ndarray:
    """Norms of mean shifts of random control subsets, one column per size in ``sizes``.

    Each permutation shuffles the control cells once; the first ``n`` shuffled cells are a
    uniform random subset of size ``n``, so prefix sums give every size in one pass.
    """
    max_size = int(sizes.max())
    out = np.empty((n_permutations, sizes.size))
    for r in range(n_permutations):
        take = rng.permutation(controls.shape[0])[:max_size]
        prefix = np.cumsum(controls[take], axis=0, dtype=np.float64)[sizes - 1]
        out[r] = np.linalg.norm(prefix / sizes[:, None] - center, axis=1)
    return out


def _perturbation_codes(
    adata: AnnData, perturbation_key: str, control_category: str
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Each cell's perturbation (row in the name-ordered perturbations; -1 controls) and controls.

    Cells without a label count as the perturbation ``"nan"``, as in ``astype(str)``.
    """
    pert, pert_names = codes_of(check_obs_key(adata, perturbation_key, what="perturbation"))
    is_ctrl = np.isin(pert, np.flatnonzero(pert_names == str(control_category)))
    n_ctrl = int(is_ctrl.sum())
    if n_ctrl < 2:
        msg = (
            f"Found {n_ctrl} control cells with .obs[{perturbation_key!r}] == "
            f"{control_category!r}; need at least 2. Pass the right `control_category`."
        )
        raise ValueError(msg)
    pert = np.where(pert >= 0, pert, pert_names.size)
    pert_names = np.append(pert_names, "nan")
    present = np.unique(pert[~is_ctrl])
    if present.size == 0:
        msg = "Every cell is a control; nothing to test."
        raise ValueError(msg)
    index = np.full(pert_names.size, -1, dtype=np.int64)
    index[present] = np.arange(present.size)
    return np.where(is_ctrl, -1, index[pert]), pert_names[present], is_ctrl


def _shift_and_pvalue(
    x,
    codes: np.ndarray,
    n_perturbations: int,
    is_ctrl: np.ndarray,
    counts: np.ndarray,
    n_permutations: int,
    rng: np.random.Generator,
) -> tuple[np.ndarray, np.ndarray]:
    """Each perturbation's distance from the controls' mean, and its permutation p-value.

    Perturbations with more cells than there are controls get a NaN p-value.
    """
    means, _ = group_means(x, codes, n_perturbations)
    control = x[is_ctrl]
    center = control.mean(axis=0, dtype=np.float64)
    shift = np.linalg.norm(means - center, axis=1)
    sizes, size_index = np.unique(counts, return_inverse=True)
    testable = sizes <= int(is_ctrl.sum())
    pvalue = np.full(n_perturbations, np.nan)
    if testable.any():
        null = _null_norms(control, center, sizes[testable], n_permutations, rng)
        col = np.full(sizes.size, -1)
        col[testable] = np.arange(testable.sum())
        ok = testable[size_index]
        exceed = (null[:, col[size_index[ok]]] >= shift[ok][None, :]).sum(axis=0)
        pvalue[ok] = (1 + exceed) / (1 + n_permutations)
    return shift, pvalue


def phenotype_novelty(
    adata: AnnData,
    *,
    salient_rep: str = "X_mcvae_salient",
    background_rep: str = "X_mcvae_background",
    perturbation_key: str = "gene_symbol",
    control_category: str = "nontargeting",
    guide_key: str | None = "sgRNA",
    n_permutations: int = 1000,
    alpha: float = 0.05,
    share_threshold: float = 0.5,
    seed: int = 0,
    key_added: str = "phenotype_novelty",
) -> pd.DataFrame:
    r"""Separate novel phenotypes (salient space) from shifts of natural variation (background).

    .. long function: documentation and signature; the body is under 80 lines.

    For each perturbation :math:`p` with cells :math:`C_p` and the control cells :math:`C_0`, the
    shifts :math:`s_p = \bar{S}_{C_p} - \bar{S}_{C_0}` in the salient space and
    :math:`z_p = \bar{Z}_{C_p} - \bar{Z}_{C_0}` in the background space give
    ``salient_shift`` :math:`\lVert s_p\rVert`, ``background_shift`` :math:`\lVert z_p\rVert` and
    ``salient_share`` :math:`\lVert s_p\rVert^2 / (\lVert s_p\rVert^2 + \lVert z_p\rVert^2)`.
    Permutation p-values compare each shift with the shifts of ``n_permutations`` random subsets
    of control cells of the same size, ``(1 + #{null >= observed}) / (1 + n_permutations)``;
    q-values are Benjamini-Hochberg adjusted. A perturbation is ``"novel"`` when its salient shift
    is significant and ``salient_share >= share_threshold``, ``"shift"`` when either shift is
    significant otherwise, and ``"none"`` when neither is.

    Parameters
    ----------
    adata
        Cells, one row each, with both embeddings in ``.obsm``.
    salient_rep, background_rep
        Keys of the salient and background embeddings in ``.obsm``.
    perturbation_key
        Obs column of the perturbation (gene, or guide for guide-level tests).
    control_category
        Value of ``perturbation_key`` marking control cells.
    guide_key
        Obs column of guides, used to report ``n_guides`` (`None` to skip).
    n_permutations
        Number of random control subsets per subset size.
    alpha
        Significance level of the q-values for ``category``.
    share_threshold
        Salient share above which a significant perturbation is called ``"novel"``.
    seed
        Seed of the permutations.
    key_added
        Key in ``.uns``.

    Returns
    -------
    DataFrame indexed by perturbation, sorted by decreasing ``salient_share``, with columns
    ``n_cells, n_guides, salient_shift, background_shift, salient_share, salient_pvalue,
    background_pvalue, salient_qvalue, background_qvalue, category``. Also sets

    ``adata.uns[key_added]``
        ``{"results": <the DataFrame>, "params": {...}}``.

    Examples
    --------
    >>> import mcvi_ops
    >>> df = mcvi_ops.tl.phenotype_novelty(adata, n_permutations=200)  # doctest: +SKIP
    >>> df.query("category == 'novel'").head()  # doctest: +SKIP
    """
    if n_permutations < 1:
        msg = f"`n_permutations` must be >= 1, got {n_permutations}."
        raise ValueError(msg)
    # stored dtype: group means and null sums accumulate in float64 without a whole copy
    salient = get_rep(adata, salient_rep, dtype=None)
    background = get_rep(adata, background_rep, dtype=None)
    codes, names, is_ctrl = _perturbation_codes(adata, perturbation_key, control_category)
    rng = np.random.default_rng(seed)
    columns: dict[str, np.ndarray] = {}
    counts = np.bincount(codes[codes >= 0], minlength=names.size)
    columns["n_cells"] = counts
    if guide_key is not None and guide_key in adata.obs:
        guides, guide_names = codes_of(adata.obs[guide_key])
        guides = np.where(guides >= 0, guides, guide_names.size)  # missing: one "nan" guide
        pairs = np.unique(codes[~is_ctrl] * (guide_names.size + 1) + guides[~is_ctrl])
        columns["n_guides"] = np.bincount(pairs // (guide_names.size + 1), minlength=names.size)
    n_ctrl = int(is_ctrl.sum())
    if (counts > n_ctrl).any():
        logger.warning(
            "%d perturbations have more cells than the %d controls; their p-values are NaN.",
            (counts > n_ctrl).sum(),
            n_ctrl,
        )
    sq = {}
    for name, x in (("salient", salient), ("background", background)):
        shift, columns[f"{name}_pvalue"] = _shift_and_pvalue(
            x, codes, names.size, is_ctrl, counts, n_permutations, rng
        )
        sq[name] = shift**2
        columns[f"{name}_shift"] = shift
    total = sq["salient"] + sq["background"]
    with np.errstate(invalid="ignore", divide="ignore"):
        columns["salient_share"] = np.where(total > 0, sq["salient"] / total, np.nan)
    df = pd.DataFrame(columns, index=pd.Index(names, name=perturbation_key))
    df["salient_qvalue"] = benjamini_hochberg(df["salient_pvalue"].to_numpy())
    df["background_qvalue"] = benjamini_hochberg(df["background_pvalue"].to_numpy())
    sal_sig = df["salient_qvalue"].to_numpy() < alpha
    bg_sig = df["background_qvalue"].to_numpy() < alpha
    novel = sal_sig & (df["salient_share"].to_numpy() >= share_threshold)
    category = np.where(novel, "novel", np.where(sal_sig | bg_sig, "shift", "none"))
    df["category"] = pd.Categorical(category, categories=["novel", "shift", "none"])
    order = [
        "n_cells",
        "n_guides",
        "salient_shift",
        "background_shift",
        "salient_share",
        "salient_pvalue",
        "background_pvalue",
        "salient_qvalue",
        "background_qvalue",
        "category",
    ]
    df = df[[c for c in order if c in df]].sort_values("salient_share", ascending=False)
    adata.uns[key_added] = {
        "results": df,
        "params": {
            "salient_rep": salient_rep,
            "background_rep": background_rep,
            "perturbation_key": perturbation_key,
            "control_category": control_category,
            "n_permutations": n_permutations,
            "alpha": alpha,
            "share_threshold": share_threshold,
            "seed": seed,
        },
    }
    return df
