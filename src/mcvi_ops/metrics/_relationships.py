"""Recall of known gene relationships from the cosine similarity of gene embeddings."""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
from anndata import AnnData

from mcvi_ops.tl._utils import gene_rows, get_rep, rep_label, rep_names

from ._readers import normalize_sources

logger = logging.getLogger(__name__)

RelationshipSource = str | os.PathLike | pd.DataFrame | Mapping


def condensed_index(i: np.ndarray, j: np.ndarray, n: int) -> np.ndarray:
    """Position of pair ``(i, j)`` with ``i < j`` in the row-major upper triangle of ``n x n``."""
    i = np.asarray(i, dtype=np.int64)
    j = np.asarray(j, dtype=np.int64)
    return i * n - i * (i + 1) // 2 + (j - i - 1)


def condensed_cosine(xn: np.ndarray, *, block_elements: int = 1 << 22) -> np.ndarray:
    """Similarities of all pairs ``i < j`` of unit rows, row-major, float32, computed in blocks.

    Memory is the float32 output (4 bytes per pair) plus one block of ``block_elements`` values.
    """
    xn = np.ascontiguousarray(xn, dtype=np.float32)
    n = xn.shape[0]
    out = np.empty(n * (n - 1) // 2, dtype=np.float32)
    rows = max(1, block_elements // max(n, 1))
    pos = 0
    for i0 in range(0, max(n - 1, 0), rows):
        i1 = min(n, i0 + rows)
        block = xn[i0:i1] @ xn[i0:].T
        mask = np.triu(np.ones(block.shape, dtype=bool), k=1)
        values = block[mask]
        out[pos : pos + values.size] = values
        pos += values.size
    return out


def _unit_rows(x: np.ndarray, names: np.ndarray, label: str) -> tuple[np.ndarray, np.ndarray]:
    norms = np.linalg.norm(x, axis=1)
    ok = np.isfinite(norms) & (norms > 0)
    if not ok.all():
        logger.warning(
            "%s: ignoring %d genes with a zero or non-finite embedding, e.g. %s.",
            label,
            (~ok).sum(),
            list(names[~ok][:5]),
        )
    return (x[ok] / norms[ok, None]).astype(np.float32), names[ok]


def average_precision_sorted(
    sorted_scores: np.ndarray, positive_scores: np.ndarray
) -> tuple[float, np.ndarray, np.ndarray]:
    """Average precision and precision-recall points from sorted scores of all candidates.

    Equals :func:`sklearn.metrics.average_precision_score` (ties share one threshold) without a
    per-candidate label array or argsort: only the ascending ``sorted_scores`` of all candidates
    and the scores of the positives are needed.
    """
    n_pos = positive_scores.size
    values, counts = np.unique(positive_scores, return_counts=True)
    values, counts = values[::-1], counts[::-1]
    tp = np.cumsum(counts)
    n_above = sorted_scores.size - np.searchsorted(sorted_scores, values, side="left")
    precision = tp / n_above
    recall = tp / n_pos
    ap = float(np.sum(counts / n_pos * precision))
    return ap, recall, precision


def _thin(curve: np.ndarray, n_points: int) -> np.ndarray:
    if curve.size <= n_points:
        return np.arange(curve.size)
    return np.unique(np.linspace(0, curve.size - 1, n_points).round().astype(np.int64))


def known_relationships(
    gene_adata: AnnData,
    *,
    relationships: RelationshipSource | Mapping[str, RelationshipSource] | Sequence,
    use_rep: str | Sequence[str] | None = None,
    percentiles: Sequence[float] = (5, 10),
    gene_key: str | None = None,
    control_category: str | None = "nontargeting",
    min_pairs: int = 10,
    n_curve_points: int = 500,
    key_added: str = "known_relationships",
) -> pd.DataFrame:
    """Score how well gene embeddings recover known gene relationships.

    .. long function: documentation and signature; the body is under 80 lines.

    The cosine similarity of every pair of genes is computed (in blocks, float32). For each source
    of known relationships two views are reported:

    - **average precision** of ranking gene pairs by similarity, with the annotated pairs as
      positives and every other pair of *genes annotated in that source* as negatives (baseline:
      the prevalence of annotated pairs among those candidate pairs), plus the precision-recall
      curve;
    - **recall at percentile p** ("biological cartography", Celik et al.): the fraction of
      annotated pairs whose similarity is in the top p% or the bottom p% of the similarities of
      all gene pairs (thresholds from ``np.quantile``; baseline: the fraction of all pairs in the
      two tails, i.e. about ``2 p / 100``). ``recall_5`` is the EFAAR benchmark's
      ``recall_0.05_0.95``, ``recall_10`` its ``recall_0.1_0.9``;
    - **tail recall** ``recall_top_{p}`` and ``recall_bottom_{p}``: the same two tails reported
      apart, the fraction of annotated pairs at or above the ``100 - p`` percentile (similar
      profiles) and at or below the ``p`` percentile (opposite profiles); baselines about
      ``p / 100`` each. ``recall_{p}`` is their sum.

    Parameters
    ----------
    gene_adata
        Gene-level profiles, one row per gene, e.g. from :func:`mcvi_ops.tl.aggregate`.
    relationships
        Known relationships: a path (pair table ``entity1,entity2``, complex list or GMT; see
        :func:`~mcvi_ops.metrics.read_relationships`), a DataFrame with columns ``entity1`` and
        ``entity2``, a dict of gene-set name -> genes, or a dict of source name -> any of these
        (or a list of paths) to score several sources at once.
    use_rep
        Key (or list of keys) of ``.obsm``; `None` uses ``.X``.
    percentiles
        Tail sizes p (in percent) for the recall.
    gene_key
        Column of ``.obs`` with gene symbols; `None` uses ``obs_names``.
    control_category
        Rows with this name (or ``obs["is_control"]`` true) are left out.
    min_pairs
        Fewest annotated pairs among the embedded genes for a source to be scored.
    n_curve_points
        Most points stored per precision-recall curve.
    key_added
        Key in ``.uns``.

    Returns
    -------
    Tidy DataFrame, one row per representation x source x metric, with columns
    ``representation, source, metric, value, baseline, n_genes, n_pairs, n_candidate_pairs``
    (metrics ``average_precision``, ``recall_{p}``, ``recall_top_{p}`` and ``recall_bottom_{p}``
    for each ``p`` in ``percentiles``). Also sets

    ``gene_adata.uns[key_added][representation]``
        ``{"metrics": <that DataFrame's rows>, "curves": {source: {"recall", "precision",
        "baseline"}}, "thresholds": {p: (low, high)}, "params": {...}}`` (other representations
        already stored under ``key_added`` are kept).

    Examples
    --------
    >>> import mcvi_ops
    >>> genes = mcvi_ops.tl.aggregate(adata, use_rep="X_mcvae_salient")  # doctest: +SKIP
    >>> df = mcvi_ops.metrics.known_relationships(  # doctest: +SKIP
    ...     genes, use_rep="X_mcvae_salient", relationships={"Reactome": "Reactome.txt"}
    ... )
    """
    sources = normalize_sources(relationships)
    percentiles = [float(p) for p in percentiles]
    for p in percentiles:
        if not 0 < p < 50:
            msg = f"Each percentile must be in (0, 50), got {p}."
            raise ValueError(msg)
    names_all, keep = gene_rows(gene_adata, gene_key, control_category)
    dup = pd.Index(names_all[keep]).duplicated()
    if dup.any():
        msg = (
            f"Gene names must be unique; {dup.sum()} duplicates, e.g. "
            f"{list(names_all[keep][dup][:5])}. Aggregate to gene level first with "
            "`mcvi_ops.tl.aggregate(adata, use_rep=..., level='gene')`."
        )
        raise ValueError(msg)
    frames = []
    store = gene_adata.uns.get(key_added)
    store = dict(store) if isinstance(store, Mapping) else {}
    for rep in rep_names(use_rep):
        label = rep_label(rep)
        xn, names = _unit_rows(get_rep(gene_adata, rep)[keep], names_all[keep], label)
        if names.size < 3:
            msg = f"Need at least 3 genes with a non-zero embedding, got {names.size}."
            raise ValueError(msg)
        all_sims = condensed_cosine(xn)
        tails = _Tails.of(all_sims, percentiles)
        rows, curves = [], {}
        for source, pairs in sources.items():
            scored = _score_source(xn, names, all_sims, source, pairs, tails, min_pairs=min_pairs)
            base = {"representation": label, "source": source, **scored.counts}
            rows += [{**base, **row} for row in scored.rows]
            keep_points = _thin(scored.recall, n_curve_points)
            curves[source] = {
                "recall": scored.recall[keep_points].astype(np.float32),
                "precision": scored.precision[keep_points].astype(np.float32),
                "baseline": float(scored.prevalence),
            }
        del all_sims
        frame = pd.DataFrame(rows, columns=_COLUMNS)
        frames.append(frame)
        store[label] = {
            "metrics": frame,
            "curves": curves,
            "thresholds": {f"{p:g}": np.asarray(t) for p, t in tails.thresholds.items()},
            "params": {
                "sources": list(sources),
                "percentiles": percentiles,
                "min_pairs": min_pairs,
                "n_genes": int(names.size),
            },
        }
        logger.info(
            "known_relationships(%s): %d genes, %d sources.", label, names.size, len(sources)
        )
    gene_adata.uns[key_added] = store
    return pd.concat(frames, ignore_index=True)


_COLUMNS = [
    "representation",
    "source",
    "metric",
    "value",
    "baseline",
    "n_genes",
    "n_pairs",
    "n_candidate_pairs",
]


@dataclass
class _Tails:
    """The similarity thresholds of each tail percentile, and the share of pairs beyond them."""

    thresholds: dict[float, tuple[float, float]]  # percentile -> (bottom, top) threshold
    fractions: dict[float, tuple[float, float]]  # percentile -> share of pairs (below, above)

    @classmethod
    def of(cls, all_sims: np.ndarray, percentiles: list[float]) -> _Tails:
        probs = [p / 100 for p in percentiles] + [1 - p / 100 for p in percentiles]
        qs = np.quantile(all_sims, probs)
        thresholds = {
            p: (float(qs[k]), float(qs[k + len(percentiles)])) for k, p in enumerate(percentiles)
        }
        fractions = {
            p: (
                np.count_nonzero(all_sims <= lo) / all_sims.size,
                np.count_nonzero(all_sims >= hi) / all_sims.size,
            )
            for p, (lo, hi) in thresholds.items()
        }
        return cls(thresholds, fractions)


@dataclass
class _SourceScores:
    """Scores of one relationship source: metric rows, counts and the precision-recall curve."""

    rows: list[dict]
    counts: dict[str, int]
    recall: np.ndarray
    precision: np.ndarray
    prevalence: float


def _annotated_pairs(
    names: np.ndarray, source: str, pairs: pd.DataFrame, *, min_pairs: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Gene rows ``i < j`` of the source's pairs among the embedded genes, and its genes there."""
    index_of = pd.Series(np.arange(names.size), index=names)
    in1 = pairs["entity1"].isin(index_of.index).to_numpy()
    in2 = pairs["entity2"].isin(index_of.index).to_numpy()
    source_genes = np.union1d(pairs["entity1"].to_numpy(), pairs["entity2"].to_numpy())
    present = np.intersect1d(source_genes, names)
    if present.size < 2:
        msg = (
            f"Relationship source {source!r}: {present.size} of its {source_genes.size} "
            f"genes are in the embedding's {names.size} genes (e.g. table genes "
            f"{list(source_genes[:3])}, embedding genes {list(names[:3])}). Check that "
            "rows are gene symbols (set `gene_key`) or drop this source."
        )
        raise ValueError(msg)
    both = in1 & in2
    if both.sum() < min_pairs:
        msg = (
            f"Relationship source {source!r} has {both.sum()} annotated pairs among the "
            f"embedded genes, fewer than min_pairs={min_pairs}. Use a larger gene set, "
            "another source, or lower `min_pairs`."
        )
        raise ValueError(msg)
    a = index_of.loc[pairs["entity1"].to_numpy()[both]].to_numpy()
    b = index_of.loc[pairs["entity2"].to_numpy()[both]].to_numpy()
    return np.minimum(a, b), np.maximum(a, b), np.sort(index_of.loc[present].to_numpy())


def _score_source(
    xn: np.ndarray,
    names: np.ndarray,
    all_sims: np.ndarray,
    source: str,
    pairs: pd.DataFrame,
    tails: _Tails,
    *,
    min_pairs: int,
) -> _SourceScores:
    """Average precision among the source's genes, and recall of its pairs in the tails."""
    i, j, sub = _annotated_pairs(names, source, pairs, min_pairs=min_pairs)
    pair_sims = all_sims[condensed_index(i, j, names.size)]
    # average precision among the genes annotated in this source
    local = pd.Series(np.arange(sub.size), index=sub)
    li, lj = local.loc[i].to_numpy(), local.loc[j].to_numpy()
    sub_sims = condensed_cosine(xn[sub])
    positive_scores = sub_sims[condensed_index(li, lj, sub.size)]
    sub_sims.sort()
    ap, recall, precision = average_precision_sorted(sub_sims, positive_scores)
    n_candidates = sub_sims.size
    del sub_sims
    prevalence = i.size / n_candidates
    rows = [{"metric": "average_precision", "value": ap, "baseline": prevalence}]
    for p, (lo, hi) in tails.thresholds.items():
        bottom, top = pair_sims <= lo, pair_sims >= hi
        low_fraction, high_fraction = tails.fractions[p]
        for metric, hit, baseline in (
            (f"recall_{p:g}", bottom | top, low_fraction + high_fraction),
            (f"recall_top_{p:g}", top, high_fraction),
            (f"recall_bottom_{p:g}", bottom, low_fraction),
        ):
            rows.append({"metric": metric, "value": float(hit.mean()), "baseline": float(baseline)})
    counts = {
        "n_genes": int(sub.size),
        "n_pairs": int(i.size),
        "n_candidate_pairs": int(n_candidates),
    }
    return _SourceScores(rows, counts, recall, precision, prevalence)
