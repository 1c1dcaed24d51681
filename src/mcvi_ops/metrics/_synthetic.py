"""One-call scoring of embeddings of a simulated screen against its ground truth."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence

import pandas as pd
from anndata import AnnData
from sklearn.metrics import roc_auc_score

from mcvi_ops.datasets._complexes import complexes_of

from ._covariates import technical_covariates
from ._relationships import known_relationships

logger = logging.getLogger(__name__)


def _truth(adata: AnnData) -> pd.DataFrame:
    if "ground_truth" not in adata.uns:
        msg = (
            "Did not find adata.uns['ground_truth']; this scores simulated screens only. Make one "
            "with `mcvi_ops.datasets.synthetic_screen`."
        )
        raise KeyError(msg)
    return pd.DataFrame(adata.uns["ground_truth"])


def novelty_auroc(
    adata: AnnData,
    *,
    salient_rep: str,
    background_rep: str,
    perturbation_key: str = "gene_symbol",
    control_category: str = "nontargeting",
    guide_key: str = "sgRNA",
    n_permutations: int = 200,
    seed: int = 0,
) -> float:
    """AUROC with which each gene's salient share separates simulated novel from shift effects.

    The salient share ``||s||^2 / (||s||^2 + ||z||^2)`` comes from
    :func:`~mcvi_ops.tl.phenotype_novelty`; genes without an effect are left out.
    """
    from mcvi_ops.tl import phenotype_novelty

    kinds = _truth(adata)["effect_kind"].astype(str)
    novelty = phenotype_novelty(
        adata,
        salient_rep=salient_rep,
        background_rep=background_rep,
        perturbation_key=perturbation_key,
        control_category=control_category,
        guide_key=guide_key,
        n_permutations=n_permutations,
        seed=seed,
    )
    with_effect = kinds[kinds.isin(["novel", "shift"])]
    share = novelty["salient_share"].reindex(with_effect.index)
    keep = share.notna()
    return float(roc_auc_score((with_effect[keep] == "novel").to_numpy(), share[keep].to_numpy()))


def score_synthetic_screen(
    adata: AnnData,
    *,
    use_rep: Sequence[str],
    salient_background: Mapping[str, tuple[str, str]] | None = None,
    perturbation_key: str = "gene_symbol",
    guide_key: str = "sgRNA",
    control_category: str = "nontargeting",
    n_permutations: int = 200,
    seed: int = 0,
) -> pd.DataFrame:
    """Score embeddings of a simulated screen: technical leakage, complexes, novelty.

    .. long function: documentation and signature; the body is under 80 lines.

    For each representation: the macro-F1 of predicting the well from control cells' embeddings
    (lower is better: chance is ``1 / n_wells``), and the average precision of same-complex gene
    pairs from gene-level embeddings (cells -> guide means -> gene means, minus controls,
    z-scored; cosine similarity). For each (salient, background) pair: the AUROC with which a
    gene's salient share ``||s||^2 / (||s||^2 + ||z||^2)`` separates novel from shift effects.

    Parameters
    ----------
    adata
        A screen from :func:`~mcvi_ops.datasets.synthetic_screen` with embeddings in ``.obsm``.
    use_rep
        Keys of ``.obsm`` to score.
    salient_background
        Name -> (salient key, background key) of embeddings to score for novelty.
    perturbation_key, guide_key, control_category
        Columns of genes and guides, and the control category.
    n_permutations
        Permutations of :func:`~mcvi_ops.tl.phenotype_novelty` (only the salient share is used).
    seed
        Random seed of the classifiers.

    Returns
    -------
    Tidy DataFrame with columns ``representation``, ``metric`` (``well_macro_f1``,
    ``well_chance``, ``complex_average_precision``, ``complex_ap_baseline``,
    ``novelty_auroc``) and ``value``.
    """
    from mcvi_ops.tl import aggregate

    truth = _truth(adata)
    reps = list(use_rep)
    rows: list[tuple[str, str, float]] = []
    work = adata.copy()
    work.obs["batch"] = work.obs["plate"].astype(str) + "_" + work.obs["well"].astype(str)
    leak = technical_covariates(
        work,
        use_rep=reps,
        covariates=("batch",),
        perturbation_key=perturbation_key,
        control_category=control_category,
        seed=seed,
    )
    n_wells = work.obs["batch"].nunique()
    for _, row in leak.iterrows():
        rows.append((row["representation"], "well_macro_f1", float(row["macro_f1"])))
        rows.append((row["representation"], "well_chance", 1.0 / n_wells))
    complexes = complexes_of(truth.assign(complex=truth["complex"].astype(str)))
    genes = aggregate(
        work,
        use_rep=reps,
        by=(guide_key, perturbation_key),
        control_category=control_category,
    )
    ap = known_relationships(
        genes, use_rep=reps, relationships={"complexes": complexes}, min_pairs=5
    )
    ap = ap[ap["metric"] == "average_precision"]
    for _, row in ap.iterrows():
        rows.append((row["representation"], "complex_average_precision", float(row["value"])))
        rows.append((row["representation"], "complex_ap_baseline", float(row["baseline"])))
    for name, (salient, background) in (salient_background or {}).items():
        auroc = novelty_auroc(
            work,
            salient_rep=salient,
            background_rep=background,
            perturbation_key=perturbation_key,
            control_category=control_category,
            guide_key=guide_key,
            n_permutations=n_permutations,
            seed=seed,
        )
        rows.append((name, "novelty_auroc", auroc))
    return pd.DataFrame(rows, columns=["representation", "metric", "value"])
