"""Mean average precision (copairs) of perturbation activity and of known-relationship consistency."""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd
from anndata import AnnData
from scipy import sparse
from scipy.stats import false_discovery_control

from mcvi_ops.tl._utils import (
    check_finite,
    check_obs_key,
    gene_rows,
    get_rep,
    rep_label,
    rep_names,
)

from ._readers import normalize_sources

logger = logging.getLogger(__name__)

RelationshipSource = str | os.PathLike | pd.DataFrame | Mapping
# below any cosine similarity: marks the columns of a block that are not negatives
_NOT_NEGATIVE = -3.0
# similarities are in [-1, 1]; shifting row r by 8 r keeps one sorted array across rows
_ROW_SHIFT = 8.0
_BLOCK_ELEMENTS = 1 << 22
_MAP_COLUMNS = [
    "mean_average_precision",
    "mean_normalized_average_precision",
    "p_value",
    "q_value",
]


def average_precision_ranked(
    negative_sims: np.ndarray, positive_rows: np.ndarray, positive_sims: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Average precision of each query ranking its positives against its negatives.

    The candidates of a query are ranked by decreasing similarity, a positive before a negative of
    equal similarity, as in :func:`copairs.map.average_precision`. The k-th most similar positive,
    with n negatives more similar than itself, sits at rank ``k + n`` with precision
    ``k / (k + n)``; the average precision is the mean of these over the positives. Only the
    negatives are sorted (one row-wise sort), so no per-pair rank list is built.

    Parameters
    ----------
    negative_sims
        ``(n_queries, n_candidates)`` similarities; entries that are not negatives of the query
        hold ``-3`` (below any cosine similarity). Sorted in place.
    positive_rows, positive_sims
        Query row and similarity of every positive pair.

    Returns
    -------
    Average precision (NaN without positives) and number of positives of each query.
    """
    n_queries, n_candidates = negative_sims.shape
    negative_sims.sort(axis=1)
    shift = _ROW_SHIFT * np.arange(n_queries, dtype=np.float64)
    flat = (negative_sims + shift[:, None]).ravel()
    at_most = np.searchsorted(flat, positive_sims + shift[positive_rows], side="right")
    above = n_candidates - (at_most - positive_rows * n_candidates)
    order = np.lexsort((-positive_sims, positive_rows))
    rows, above = positive_rows[order], above[order]
    n_positives = np.bincount(rows, minlength=n_queries)
    first = np.cumsum(n_positives) - n_positives
    k = np.arange(rows.size) - first[rows] + 1
    with np.errstate(invalid="ignore", divide="ignore"):
        ap = np.bincount(rows, weights=k / (k + above), minlength=n_queries) / n_positives
    return ap, n_positives


def _unit_profiles(
    adata: AnnData, rep: str | None, keep: np.ndarray, what: str
) -> tuple[np.ndarray, np.ndarray]:
    """Unit-norm rows of a representation (rows kept by ``keep`` and with a non-zero norm)."""
    x = get_rep(adata, rep)
    check_finite(x[keep], rep, rows=what, names=adata.obs_names[keep])
    norms = np.linalg.norm(x, axis=1)
    zero = keep & (norms == 0)
    if zero.any():
        logger.warning(
            "%s: ignoring %d %s with an all-zero profile (no cosine similarity), e.g. %s.",
            rep_label(rep),
            zero.sum(),
            what,
            list(adata.obs_names[zero][:5]),
        )
    keep = keep & (norms > 0)
    xn = np.zeros_like(x)
    xn[keep] = x[keep] / norms[keep, None]
    return xn, keep


def _normalized_ap(ap: np.ndarray, n_positives: np.ndarray, n_total: np.ndarray) -> np.ndarray:
    """Normalised AP of copairs, ``(AP - E[AP]) / (1 - E[AP])`` under random ranking.

    :func:`copairs.map.normalization.normalize_ap` loops over every score with an O(n_total)
    harmonic sum; the expected AP only depends on the configuration, so it is computed once per
    distinct ``(n_positives, n_total)``.
    """
    from copairs.map.normalization import expected_ap

    confs, inverse = np.unique(np.c_[n_positives, n_total], axis=0, return_inverse=True)
    mu0 = np.array([expected_ap(int(m), int(t - m)) for m, t in confs])[inverse.ravel()]
    return np.clip((ap - mu0) / np.maximum(1 - mu0, 1e-10), -1.0, 1.0)


def null_average_precision(
    confs: np.ndarray, null_size: int, rng: np.random.Generator, *, chunk_rows: int = 2048
) -> np.ndarray:
    """Samples of copairs' null: the AP of ``k`` positives placed at random among ``n`` ranks.

    Parameters
    ----------
    confs
        ``(n_configurations, 2)`` integer array of ``(k, n)`` (positives, candidates).
    null_size
        Samples per configuration.
    rng
        Random generator.
    chunk_rows
        Samples drawn at once (memory is ``chunk_rows x n`` small integers).

    Returns
    -------
    ``(n_configurations, null_size)`` float32 array.

    Notes
    -----
    The same null as :func:`copairs.compute.random_ap` (and the same AP of sorted ranks,
    :func:`copairs.compute.average_precision`), drawn faster: copairs shuffles all ``n`` ranks of
    every sample for every configuration, here a partial Fisher-Yates shuffle draws only the
    first ``max k`` ranks once per ``n``, and the first ``k`` of them are a uniform random
    ``k``-subset for every ``k``. Each configuration's samples are exact; samples of
    configurations sharing ``n`` come from the same shuffles (copairs uses identical samples for
    repeated configurations, so mAP nulls are correlated there too). With thousands of candidates
    and a hundred configurations this takes seconds instead of minutes.
    """
    from copairs.compute import average_precision

    confs = np.asarray(confs, dtype=np.int64)
    out = np.empty((confs.shape[0], null_size), dtype=np.float32)
    for n in np.unique(confs[:, 1]):
        members = np.flatnonzero(confs[:, 1] == n)
        ks = confs[members, 0]
        dtype = np.uint16 if n < 2**16 else np.uint32
        for start in range(0, null_size, chunk_rows):
            rows = min(chunk_rows, null_size - start)
            ranks = np.tile(np.arange(n, dtype=dtype), (rows, 1))
            index = np.arange(rows)
            for i in range(int(ks.max())):
                j = rng.integers(i, n, size=rows)
                chosen = ranks[index, j]
                ranks[index, j] = ranks[:, i]
                ranks[:, i] = chosen
            for member, k in zip(members, ks, strict=True):
                out[member, start : start + rows] = average_precision(np.sort(ranks[:, :k], axis=1))
    return out


def _map_with_pvalues(
    ap: pd.DataFrame, group: str, *, null_size: int, alpha: float, seed: int
) -> pd.DataFrame:
    """Mean AP per group with copairs' permutation p-values and Benjamini-Hochberg q-values.

    As :func:`copairs.map.mean_average_precision`: the null of a group's mAP is the mean of its
    members' null samples, the p-value ``(1 + #{null > mAP}) / (1 + null_size)``.
    """
    ap = ap[ap["n_pos_pairs"] > 0]
    n_pos = ap["n_pos_pairs"].to_numpy(dtype=np.int64)
    n_total = ap["n_total_pairs"].to_numpy(dtype=np.int64)
    confs, conf_of = np.unique(np.c_[n_pos, n_total], axis=0, return_inverse=True)
    conf_of = conf_of.ravel()
    null = null_average_precision(confs, null_size, np.random.default_rng(seed))
    normalized = _normalized_ap(ap["average_precision"].to_numpy(), n_pos, n_total)
    names, group_of = np.unique(ap[group].to_numpy(), return_inverse=True)
    group_of = group_of.ravel()
    size = np.bincount(group_of, minlength=names.size)
    mean_ap = np.bincount(group_of, weights=ap["average_precision"], minlength=names.size) / size
    mean_normalized = np.bincount(group_of, weights=normalized, minlength=names.size) / size
    order = np.argsort(group_of, kind="stable")
    bounds = np.r_[0, np.cumsum(size)]
    pvalue = np.empty(names.size)
    for g in range(names.size):
        members = conf_of[order[bounds[g] : bounds[g + 1]]]
        group_null = null[members[0]] if members.size == 1 else null[members].mean(axis=0)
        pvalue[g] = (np.count_nonzero(group_null > mean_ap[g]) + 1) / (null_size + 1)
    qvalue = false_discovery_control(pvalue, method="bh")
    return pd.DataFrame(
        {
            "mean_average_precision": mean_ap,
            "mean_normalized_average_precision": mean_normalized,
            "p_value": pvalue,
            "q_value": qvalue,
            "below_corrected_p": qvalue < alpha,
        },
        index=pd.Index(names, name=group),
    )


def _check_options(null_size: int, alpha: float) -> None:
    if null_size < 1:
        msg = f"`null_size` must be a positive number of null samples, got {null_size}."
        raise ValueError(msg)
    if not 0 < alpha < 1:
        msg = f"`alpha` must be in (0, 1), got {alpha}."
        raise ValueError(msg)


def _queries(
    labels: np.ndarray, treated: np.ndarray, perturbation_key: str, label: str
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Perturbations, their profile counts, and the profiles to score grouped by perturbation.

    Perturbations with a single profile cannot be scored (a warning names them).
    """
    names, codes, sizes = np.unique(labels[treated], return_inverse=True, return_counts=True)
    single = sizes[codes] < 2
    if single.all():
        msg = (
            f"No perturbation in .obs[{perturbation_key!r}] has two or more profiles; "
            "phenotypic activity compares a perturbation's profiles with each other. Use "
            "guide-level profiles (`tl.aggregate(..., level='guide')`) or cells."
        )
        raise ValueError(msg)
    if single.any():
        logger.warning(
            "%s: %d perturbations have a single profile and are not scored, e.g. %s.",
            label,
            (sizes < 2).sum(),
            list(names[sizes < 2][:5]),
        )
    order = np.argsort(codes[~single], kind="stable")
    return names, sizes, treated[~single][order], codes[~single][order]


def _activity_average_precision(
    xn: np.ndarray,
    queries: np.ndarray,
    query_codes: np.ndarray,
    group_size: np.ndarray,
    controls: np.ndarray,
) -> np.ndarray:
    """AP of each query ranking its perturbation's other profiles against all controls."""
    group_start = np.searchsorted(query_codes, query_codes, side="left")
    # positives: every ordered pair of distinct profiles of one perturbation
    pos_rows = np.repeat(np.arange(queries.size), group_size)
    within = np.arange(pos_rows.size) - np.repeat(np.cumsum(group_size) - group_size, group_size)
    pos_cols = group_start[pos_rows] + within
    distinct = pos_rows != pos_cols
    pos_rows, pos_cols = pos_rows[distinct], pos_cols[distinct]
    pos_sims = np.einsum("ij,ij->i", xn[queries[pos_rows]], xn[queries[pos_cols]])
    ap = np.empty(queries.size)
    block = max(1, _BLOCK_ELEMENTS // len(controls))
    for start in range(0, queries.size, block):
        stop = min(queries.size, start + block)
        lo, hi = np.searchsorted(pos_rows, [start, stop])
        ap[start:stop], _ = average_precision_ranked(
            xn[queries[start:stop]] @ controls.T, pos_rows[lo:hi] - start, pos_sims[lo:hi]
        )
    return ap


def phenotypic_activity(
    guide_adata: AnnData,
    *,
    use_rep: str | Sequence[str] | None,
    perturbation_key: str = "gene_symbol",
    control_category: str = "nontargeting",
    null_size: int = 10_000,
    alpha: float = 0.05,
    seed: int = 0,
    key_added: str = "phenotypic_activity",
) -> pd.DataFrame:
    """Score how distinct each perturbation's profiles are from the controls (copairs mAP).

    .. long function: documentation and signature; the body is under 80 lines.

    The phenotypic activity of the copairs framework (Kalinin et al., Nat Commun 2025): each
    profile of a perturbation (e.g. each guide of a gene) ranks the other profiles of the same
    perturbation (positives) against every control profile (negatives) by cosine similarity; the
    average precision (AP) of that ranking is averaged over the perturbation's profiles (mAP). A
    perturbation whose guides agree with each other and differ from the controls has an mAP near
    1; one that looks like the controls has an mAP near the chance level. p-values come from
    copairs' null (the AP of randomly placed positives, ``null_size`` draws per configuration),
    q-values from the Benjamini-Hochberg correction across perturbations, and a perturbation is
    **active** when its q-value is below ``alpha``.

    Parameters
    ----------
    guide_adata
        Profiles, several per perturbation, including the control profiles: typically
        ``mcvi_ops.tl.aggregate(adata, use_rep=..., level="guide")`` (which keeps the control
        guides). Cell-level data works too (each cell is a profile) but is slower.
    use_rep
        Key (or list of keys) of ``.obsm``; `None` uses ``.X``.
    perturbation_key
        Obs column with the perturbation (gene) of each profile.
    control_category
        Value of ``perturbation_key`` that marks the control profiles.
    null_size
        Samples of copairs' null distribution per configuration (number of positives and of
        candidates), drawn by a partial shuffle that is much faster than copairs' own at thousands
        of candidates (same distribution). The smallest p-value is ``1 / (null_size + 1)``.
    alpha
        Level of the q-values below which a perturbation is called active.
    seed
        Seed of the null distribution.
    key_added
        Key in ``.uns``.

    Returns
    -------
    Tidy DataFrame, one row per representation x perturbation (perturbations with a single
    profile cannot be scored and are left out with a warning), with columns ``representation,
    {perturbation_key}, n_profiles, n_controls, mean_average_precision,
    mean_normalized_average_precision, p_value, q_value, active``. Also sets

    ``guide_adata.uns[key_added][representation]``
        ``{"results": <its rows>, "summary": {"mean_average_precision", "fraction_active",
        "n_active", "n_perturbations", "n_controls"}, "params": {...}}`` (other representations
        already stored under ``key_added`` are kept).

    Raises
    ------
    ValueError
        When a representation has NaN or infinite values (the message names it and counts the
        profiles), when there are no control profiles, or when no perturbation has two profiles.

    Examples
    --------
    >>> import mcvi_ops
    >>> guides = mcvi_ops.tl.aggregate(adata, use_rep="X_mcvae", level="guide")  # doctest: +SKIP
    >>> activity = mcvi_ops.metrics.phenotypic_activity(guides, use_rep="X_mcvae")  # doctest: +SKIP
    >>> guides.uns["phenotypic_activity"]["X_mcvae"]["summary"]["fraction_active"]  # doctest: +SKIP
    """
    _check_options(null_size, alpha)
    labels = check_obs_key(guide_adata, perturbation_key, what="perturbation")
    labels = labels.astype(str).to_numpy()
    store = guide_adata.uns.get(key_added)
    store = dict(store) if isinstance(store, Mapping) else {}
    frames = []
    for rep in rep_names(use_rep):
        label = rep_label(rep)
        xn, keep = _unit_profiles(guide_adata, rep, np.ones(labels.size, dtype=bool), "profiles")
        is_control = keep & (labels == str(control_category))
        n_controls = int(is_control.sum())
        if n_controls == 0:
            msg = (
                f"Found no control profiles with .obs[{perturbation_key!r}] == "
                f"{control_category!r} (values include {list(pd.unique(labels)[:5])}). Pass the "
                "right `control_category`, and keep the control guides when aggregating "
                "(`tl.aggregate(..., level='guide')` keeps them by default)."
            )
            raise ValueError(msg)
        treated = np.flatnonzero(keep & ~is_control)
        names, sizes, queries, query_codes = _queries(labels, treated, perturbation_key, label)
        group_size = sizes[query_codes]
        ap = _activity_average_precision(xn, queries, query_codes, group_size, xn[is_control])
        n_positives = group_size - 1
        per_profile = pd.DataFrame(
            {
                perturbation_key: names[query_codes],
                "average_precision": ap,
                "n_pos_pairs": n_positives,
                "n_total_pairs": n_positives + n_controls,
            }
        )
        result = _map_with_pvalues(
            per_profile,
            perturbation_key,
            null_size=null_size,
            alpha=alpha,
            seed=seed,
        )
        scored = names[sizes >= 2]
        frame = pd.DataFrame(
            {
                "representation": label,
                perturbation_key: scored,
                "n_profiles": sizes[sizes >= 2],
                "n_controls": n_controls,
            }
        )
        result = result.reindex(scored)
        for column in _MAP_COLUMNS:
            frame[column] = result[column].to_numpy(dtype=float)
        frame["active"] = result["below_corrected_p"].to_numpy(dtype=bool)
        summary = {
            "mean_average_precision": float(frame["mean_average_precision"].mean()),
            "fraction_active": float(frame["active"].mean()),
            "n_active": int(frame["active"].sum()),
            "n_perturbations": int(frame.shape[0]),
            "n_controls": n_controls,
        }
        store[label] = {
            "results": frame,
            "summary": summary,
            "params": {
                "perturbation_key": perturbation_key,
                "control_category": control_category,
                "null_size": null_size,
                "alpha": alpha,
                "seed": seed,
            },
        }
        logger.info(
            "phenotypic_activity(%s): %d of %d perturbations active (mAP %.3f).",
            label,
            summary["n_active"],
            summary["n_perturbations"],
            summary["mean_average_precision"],
        )
        frames.append(frame)
    guide_adata.uns[key_added] = store
    return pd.concat(frames, ignore_index=True)


def phenotypic_consistency(
    adata: AnnData,
    *,
    use_rep: str | Sequence[str] | None,
    relationships: RelationshipSource | Mapping[str, RelationshipSource] | Sequence,
    gene_key: str | None = None,
    control_category: str | None = "nontargeting",
    null_size: int = 10_000,
    alpha: float = 0.05,
    seed: int = 0,
    key_added: str = "phenotypic_consistency",
) -> pd.DataFrame:
    """Score how well each gene's profiles retrieve its known partners (copairs mAP).

    .. long function: documentation and signature; the body is under 80 lines.

    The phenotypic consistency of the copairs framework (Kalinin et al., Nat Commun 2025) with
    known relationships as the annotation: each profile of an annotated gene ranks the profiles of
    the other genes annotated in the same source by cosine similarity, with the genes related to
    it (sharing a complex or gene set, or listed with it in a pair table) as positives and the
    unrelated annotated genes as negatives; profiles of its own gene are left out. The average
    precision is averaged over the gene's profiles (mAP), p-values come from copairs' null and
    q-values from the Benjamini-Hochberg correction across the genes of a source; a gene is
    **consistent** when its q-value is below ``alpha``.

    Parameters
    ----------
    adata
        Gene-level profiles (one row per gene, e.g. from :func:`mcvi_ops.tl.aggregate`) or
        guide-level profiles (several rows per gene; pass ``gene_key``).
    use_rep
        Key (or list of keys) of ``.obsm``; `None` uses ``.X``.
    relationships
        Known relationships, as for :func:`~mcvi_ops.metrics.known_relationships`: a path (pair
        table ``entity1,entity2``, complex list or GMT), a DataFrame with columns ``entity1`` and
        ``entity2``, a dict of gene-set name -> genes, or a dict of source name -> any of these
        (or a list of paths) to score several sources.
    gene_key
        Obs column with the gene of each row; `None` uses ``obs_names``.
    control_category
        Rows of this gene (or with ``obs["is_control"]`` true) are left out.
    null_size
        Samples of copairs' null distribution per configuration. The smallest p-value is
        ``1 / (null_size + 1)``.
    alpha
        Level of the q-values below which a gene is called consistent.
    seed
        Seed of the null distribution.
    key_added
        Key in ``.uns``.

    Returns
    -------
    Tidy DataFrame, one row per representation x source x annotated gene, with columns
    ``representation, source, gene, n_profiles, n_partners, mean_average_precision,
    mean_normalized_average_precision, p_value, q_value, consistent`` (``n_partners``: related
    genes among the profiles). Also sets

    ``adata.uns[key_added][representation]``
        ``{"results": <its rows>, "summary": {source: {"mean_average_precision",
        "fraction_consistent", "n_consistent", "n_genes"}}, "params": {...}}`` (other
        representations already stored under ``key_added`` are kept).

    Raises
    ------
    ValueError
        When a representation has NaN or infinite values (the message names it and counts the
        rows), or when a source has no related pair among the profiled genes.

    Examples
    --------
    >>> import mcvi_ops
    >>> genes = mcvi_ops.tl.aggregate(adata, use_rep="X_mcvae")  # doctest: +SKIP
    >>> df = mcvi_ops.metrics.phenotypic_consistency(  # doctest: +SKIP
    ...     genes, use_rep="X_mcvae", relationships={"CORUM": "CORUM_clusters.tsv"}
    ... )
    """
    _check_options(null_size, alpha)
    sources = normalize_sources(relationships)
    genes_all, rows_kept = gene_rows(adata, gene_key, control_category)
    store = adata.uns.get(key_added)
    store = dict(store) if isinstance(store, Mapping) else {}
    frames = []
    for rep in rep_names(use_rep):
        label = rep_label(rep)
        xn, keep = _unit_profiles(adata, rep, rows_kept, "rows")
        present = np.unique(genes_all[keep])
        rep_frames, summary = [], {}
        for source, pairs in sources.items():
            frame = _consistency_of_source(
                xn, genes_all, keep, present, pairs, source=source, label=label
            )
            result = _map_with_pvalues(
                frame["per_profile"],
                "gene",
                null_size=null_size,
                alpha=alpha,
                seed=seed,
            ).reindex(frame["genes"])
            out = pd.DataFrame(
                {
                    "representation": label,
                    "source": source,
                    "gene": frame["genes"],
                    "n_profiles": frame["n_profiles"],
                    "n_partners": frame["n_partners"],
                }
            )
            for column in _MAP_COLUMNS:
                out[column] = result[column].to_numpy(dtype=float)
            out["consistent"] = result["below_corrected_p"].to_numpy(dtype=bool)
            summary[source] = {
                "mean_average_precision": float(out["mean_average_precision"].mean()),
                "fraction_consistent": float(out["consistent"].mean()),
                "n_consistent": int(out["consistent"].sum()),
                "n_genes": int(out.shape[0]),
            }
            logger.info(
                "phenotypic_consistency(%s, %s): %d of %d genes consistent (mAP %.3f).",
                label,
                source,
                summary[source]["n_consistent"],
                summary[source]["n_genes"],
                summary[source]["mean_average_precision"],
            )
            rep_frames.append(out)
        rep_frame = pd.concat(rep_frames, ignore_index=True)
        store[label] = {
            "results": rep_frame,
            "summary": summary,
            "params": {
                "sources": list(sources),
                "gene_key": gene_key,
                "control_category": control_category,
                "null_size": null_size,
                "alpha": alpha,
                "seed": seed,
            },
        }
        frames.append(rep_frame)
    adata.uns[key_added] = store
    return pd.concat(frames, ignore_index=True)


def _consistency_of_source(
    xn: np.ndarray,
    genes_all: np.ndarray,
    keep: np.ndarray,
    present: np.ndarray,
    pairs: pd.DataFrame,
    *,
    source: str,
    label: str,
) -> dict:
    """Per-profile AP of one relationship source (the input of the mAP and its p-values)."""
    e1, e2 = pairs["entity1"].to_numpy(dtype=str), pairs["entity2"].to_numpy(dtype=str)
    # pandas hashes; np.isin sorts long unicode arrays, minutes at genome scale
    profiled = pd.Index(present)
    both = profiled.get_indexer(e1) >= 0
    both &= profiled.get_indexer(e2) >= 0
    if not both.any():
        source_genes = np.union1d(e1, e2)
        msg = (
            f"Relationship source {source!r} ({label}): none of its {len(pairs)} pairs has both "
            f"genes among the {present.size} profiled genes (e.g. source genes "
            f"{list(source_genes[:3])}, profiled genes {list(present[:3])}). Check that rows are "
            "gene symbols (set `gene_key`) or drop this source."
        )
        raise ValueError(msg)
    annotated = np.union1d(e1[both], e2[both])
    index_of = pd.Index(annotated)
    a, b = index_of.get_indexer(e1[both]), index_of.get_indexer(e2[both])
    n_genes = annotated.size
    related = sparse.csr_matrix(
        (np.ones(2 * a.size, dtype=np.int8), (np.r_[a, b], np.r_[b, a])), shape=(n_genes, n_genes)
    )
    related.data[:] = 1
    candidates = np.flatnonzero(keep & (pd.Index(annotated).get_indexer(genes_all) >= 0))
    gene_of = index_of.get_indexer(genes_all[candidates])
    x_candidates = xn[candidates]
    n_candidates = candidates.size
    ap = np.empty(n_candidates)
    n_positives = np.empty(n_candidates, dtype=np.int64)
    n_negatives = np.empty(n_candidates, dtype=np.int64)
    block = max(1, _BLOCK_ELEMENTS // n_candidates)
    for start in range(0, n_candidates, block):
        stop = min(n_candidates, start + block)
        sims = x_candidates[start:stop] @ x_candidates.T
        positive = related[gene_of[start:stop]].toarray()[:, gene_of].astype(bool)
        negative = ~positive & (gene_of[start:stop, None] != gene_of[None, :])
        rows, cols = np.nonzero(positive)
        pos_sims = sims[rows, cols]
        n_negatives[start:stop] = negative.sum(axis=1)
        sims[~negative] = _NOT_NEGATIVE
        ap[start:stop], n_positives[start:stop] = average_precision_ranked(sims, rows, pos_sims)
    genes, n_profiles = np.unique(gene_of, return_counts=True)
    degree = np.diff(related.indptr)
    return {
        "per_profile": pd.DataFrame(
            {
                "gene": annotated[gene_of],
                "average_precision": ap,
                "n_pos_pairs": n_positives,
                "n_total_pairs": n_positives + n_negatives,
            }
        ),
        "genes": annotated[genes],
        "n_profiles": n_profiles,
        "n_partners": degree[genes],
    }
