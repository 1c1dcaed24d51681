"""Cross-validated classification of gene-function groups from guide-level embeddings."""

from __future__ import annotations

import logging
from collections.abc import Mapping

import numpy as np
import pandas as pd
from anndata import AnnData
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import balanced_accuracy_score, confusion_matrix, f1_score
from sklearn.model_selection import StratifiedGroupKFold
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from mcvi_ops.tl._utils import check_obs_key, get_rep, rep_label

logger = logging.getLogger(__name__)


def _labels(adata: AnnData, labels, gene_key: str) -> tuple[np.ndarray, np.ndarray]:
    """Per-row group labels (object array with NaN for unlabelled rows) and gene of each row."""
    if gene_key in adata.obs:
        genes = adata.obs[gene_key].astype(str).to_numpy()
    else:
        genes = np.asarray(adata.obs_names, dtype=str)
    if isinstance(labels, str):
        y = check_obs_key(
            adata,
            labels,
            what="label",
            hint="Or pass a mapping gene -> group (e.g. `read_gene_groups(path)`).",
        ).to_numpy(dtype=object)
    elif isinstance(labels, Mapping | pd.Series):
        mapping = pd.Series(labels) if not isinstance(labels, pd.Series) else labels
        y = pd.Series(genes).map(mapping).to_numpy(dtype=object)
        if pd.isna(y).all():
            msg = (
                f"None of the {len(mapping)} genes in `labels` match the genes of the rows "
                f"(.obs[{gene_key!r}] or obs_names, e.g. {list(genes[:3])}). Check `gene_key`."
            )
            raise ValueError(msg)
    else:
        msg = f"`labels` must be an obs column name or a mapping gene -> group, got {type(labels)}."
        raise TypeError(msg)
    return y, genes


def _cross_validated_predictions(
    x: np.ndarray,
    y: np.ndarray,
    genes: np.ndarray,
    *,
    n_splits: int,
    C: float,
    max_iter: int,
    seed: int,
) -> tuple[np.ndarray, np.ndarray]:
    """Each row's group predicted by a classifier that never saw its gene, and the fold."""
    cv = StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=seed)
    predicted = np.empty(y.size, dtype=object)
    fold = np.empty(y.size, dtype=np.int64)
    for k, (train, test) in enumerate(cv.split(x, y, groups=genes)):
        clf = make_pipeline(
            StandardScaler(),
            LogisticRegression(class_weight="balanced", C=C, max_iter=max_iter),
        )
        clf.fit(x[train], y[train])
        predicted[test] = clf.predict(x[test])
        fold[test] = k
    return predicted.astype(str), fold


def function_classification(
    guide_adata: AnnData,
    *,
    labels: str | Mapping[str, str] | pd.Series,
    use_rep: str | None = None,
    gene_key: str = "gene_symbol",
    n_splits: int = 5,
    C: float = 1.0,
    max_iter: int = 1000,
    seed: int = 0,
    key_added: str = "function_classification",
) -> dict:
    """Classify gene-function groups from guide-level (or gene-level) embeddings.

    .. long function: documentation and signature; the body is under 80 lines.

    A balanced logistic regression (``class_weight="balanced"``, standardised features) is
    cross-validated with :class:`~sklearn.model_selection.StratifiedGroupKFold`, grouped by gene so
    that the guides of one gene never sit on both sides of a split. Rows without a label (e.g.
    controls) are left out; groups with fewer genes than ``n_splits`` are left out with a warning.

    Parameters
    ----------
    guide_adata
        Guide-level profiles, e.g. ``mcvi_ops.tl.aggregate(adata, use_rep=..., level="guide")``;
        gene-level profiles work too (one group per row).
    labels
        Obs column with the group of each row, or a mapping gene -> group (e.g.
        :func:`~mcvi_ops.metrics.read_gene_groups` of ``functional_clusters.json``).
    use_rep
        Key of ``.obsm``; `None` uses ``.X``.
    gene_key
        Obs column with the gene of each row (used for grouping folds and to map ``labels``);
        `obs_names` are used if the column is absent.
    n_splits
        Number of folds.
    C, max_iter
        Passed to :class:`~sklearn.linear_model.LogisticRegression`.
    seed
        Seed of the fold assignment.
    key_added
        Key in ``.uns``.

    Returns
    -------
    A dict (also stored in ``guide_adata.uns[key_added][representation]``) with

    ``"confusion"``
        Row-normalised confusion matrix (DataFrame, true groups x predicted groups).
    ``"counts"``
        The confusion matrix in counts.
    ``"recall"``
        DataFrame indexed by group with ``recall``, ``n_rows``, ``n_genes``.
    ``"summary"``
        One-row DataFrame: ``balanced_accuracy``, ``macro_f1``, ``chance`` (1 / n_groups).
    ``"predictions"``
        Out-of-fold predictions per row (``true``, ``predicted``, ``fold``).
    ``"params"``
        The call's parameters.

    Examples
    --------
    >>> import mcvi_ops
    >>> groups = mcvi_ops.metrics.read_gene_groups("functional_clusters.json")  # doctest: +SKIP
    >>> res = mcvi_ops.metrics.function_classification(  # doctest: +SKIP
    ...     guides, labels=groups, use_rep="X_mcvae_salient"
    ... )
    >>> res["recall"]  # doctest: +SKIP
    """
    label = rep_label(use_rep)
    y, genes = _labels(guide_adata, labels, gene_key)
    labelled = pd.notna(y)
    y = np.where(labelled, y, "").astype(str)
    gene_counts = pd.Series(genes[labelled]).groupby(y[labelled]).nunique()
    small = gene_counts.index[gene_counts < n_splits]
    if small.size:
        logger.warning(
            "Leaving out %d groups with fewer than n_splits=%d genes: %s.",
            small.size,
            n_splits,
            list(small),
        )
        labelled &= ~np.isin(y, small)
    groups = np.unique(y[labelled])
    if groups.size < 2:
        msg = (
            f"Need at least 2 groups with >= n_splits={n_splits} genes each to classify; found "
            f"{groups.size} ({list(groups)}) among {labelled.sum()} labelled rows. Check "
            "`labels`, or lower `n_splits`."
        )
        raise ValueError(msg)
    x = get_rep(guide_adata, use_rep)[labelled]
    y_l, g_l = y[labelled], genes[labelled]
    predicted, fold = _cross_validated_predictions(
        x, y_l, g_l, n_splits=n_splits, C=C, max_iter=max_iter, seed=seed
    )
    counts = confusion_matrix(y_l, predicted, labels=groups)
    confusion = counts / counts.sum(axis=1, keepdims=True)
    recall = pd.DataFrame(
        {
            "recall": np.diag(confusion),
            "n_rows": counts.sum(axis=1),
            "n_genes": pd.Series(g_l).groupby(y_l).nunique().reindex(groups).to_numpy(),
        },
        index=pd.Index(groups, name="group"),
    )
    summary = pd.DataFrame(
        {
            "representation": [label],
            "balanced_accuracy": [balanced_accuracy_score(y_l, predicted)],
            "macro_f1": [f1_score(y_l, predicted, labels=groups, average="macro")],
            "chance": [1 / groups.size],
            "n_rows": [y_l.size],
            "n_groups": [groups.size],
        }
    )
    result = {
        "confusion": pd.DataFrame(confusion, index=groups, columns=groups),
        "counts": pd.DataFrame(counts, index=groups, columns=groups),
        "recall": recall,
        "summary": summary,
        "predictions": pd.DataFrame(
            {"true": y_l, "predicted": predicted, "fold": fold},
            index=guide_adata.obs_names[labelled],
        ),
        "params": {
            "use_rep": label,
            "gene_key": gene_key,
            "n_splits": n_splits,
            "C": C,
            "seed": seed,
            "dropped_groups": list(small),
        },
    }
    store = guide_adata.uns.get(key_added)
    store = dict(store) if isinstance(store, Mapping) else {}
    store[label] = result
    guide_adata.uns[key_added] = store
    logger.info(
        "function_classification(%s): balanced accuracy %.3f over %d groups.",
        label,
        summary["balanced_accuracy"].iloc[0],
        groups.size,
    )
    return result


def recall_difference(
    result_a: dict,
    result_b: dict,
    *,
    names: tuple[str, str] = ("salient", "background"),
) -> pd.DataFrame:
    """Per-group recall of two classification results and their difference.

    Parameters
    ----------
    result_a, result_b
        Results of :func:`~mcvi_ops.metrics.function_classification` (e.g. on the salient and the
        background embedding of the same guides).
    names
        Labels of the two results, used as column names.

    Returns
    -------
    DataFrame indexed by group with columns ``recall_{names[0]}``, ``recall_{names[1]}`` and
    ``difference`` (a minus b), sorted by decreasing difference. Groups missing from one result are
    left out.

    Examples
    --------
    >>> diff = mcvi_ops.metrics.recall_difference(res_salient, res_background)  # doctest: +SKIP
    """
    for res, which in ((result_a, "result_a"), (result_b, "result_b")):
        if not isinstance(res, Mapping) or "recall" not in res:
            msg = f"`{which}` must be a result of `function_classification` (a dict with 'recall')."
            raise TypeError(msg)
    a = result_a["recall"]["recall"]
    b = result_b["recall"]["recall"]
    common = a.index.intersection(b.index)
    if common.size == 0:
        msg = "The two results share no groups; were they computed with the same `labels`?"
        raise ValueError(msg)
    out = pd.DataFrame(
        {f"recall_{names[0]}": a.loc[common], f"recall_{names[1]}": b.loc[common]}, index=common
    )
    out["difference"] = out.iloc[:, 0] - out.iloc[:, 1]
    return out.sort_values("difference", ascending=False)
