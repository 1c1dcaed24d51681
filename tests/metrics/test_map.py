import anndata as ad
import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.stats import false_discovery_control, ks_2samp

from mcvi_ops.metrics import phenotypic_activity, phenotypic_consistency
from mcvi_ops.metrics._map import average_precision_ranked, null_average_precision


def _brute_force_ap(sims: np.ndarray, positive: np.ndarray, negative: np.ndarray) -> float:
    """AP of one query: candidates by decreasing similarity, positives first among equals."""
    cand = np.flatnonzero(positive | negative)
    order = sorted(cand, key=lambda j: (-sims[j], not positive[j]))
    hits, precisions = 0, []
    for rank, j in enumerate(order, start=1):
        if positive[j]:
            hits += 1
            precisions.append(hits / rank)
    return float(np.mean(precisions))


def _angles(degrees, labels, key="gene_symbol"):
    t = np.deg2rad(np.asarray(degrees, dtype=float))
    adata = ad.AnnData(obs=pd.DataFrame({key: labels}, index=[f"p{i}" for i in range(len(labels))]))
    adata.obsm["X_emb"] = np.c_[np.cos(t), np.sin(t)]
    return adata


def test_activity_hand_computed():
    # A at 0 and 30 degrees, B at 100, 110, 210, controls at 20, 85, 180 degrees.
    # A1: c20 (.94) > A2 (.87) -> AP 1/2; A2: c20 (.98) > A1 -> 1/2.
    # B1: B2, c85, c20, c180, B3 -> (1 + 2/5) / 2; B2 likewise; B3: c180, B2, B1 -> (1/2 + 2/3) / 2
    adata = _angles(
        [0, 30, 100, 110, 210, 20, 85, 180],
        ["A", "A", "B", "B", "B", "nontargeting", "nontargeting", "nontargeting"],
    )
    df = phenotypic_activity(adata, use_rep="X_emb", null_size=500).set_index("gene_symbol")
    assert df.loc["A", "mean_average_precision"] == pytest.approx(0.5)
    assert df.loc["B", "mean_average_precision"] == pytest.approx((0.7 + 0.7 + 7 / 12) / 3)
    assert df["n_profiles"].tolist() == [2, 3]
    assert (df["n_controls"] == 3).all()
    assert df.columns.tolist() == [
        "representation",
        "n_profiles",
        "n_controls",
        "mean_average_precision",
        "mean_normalized_average_precision",
        "p_value",
        "q_value",
        "active",
    ]
    stored = adata.uns["phenotypic_activity"]["X_emb"]
    assert stored["summary"]["n_perturbations"] == 2
    assert stored["summary"]["mean_average_precision"] == pytest.approx(
        df["mean_average_precision"].mean()
    )


@settings(max_examples=25, deadline=None)
@given(
    seed=st.integers(0, 2**16),
    n_queries=st.integers(1, 6),
    n_candidates=st.integers(1, 12),
    ties=st.booleans(),
)
def test_ranked_ap_matches_brute_force(seed, n_queries, n_candidates, ties):
    rng = np.random.default_rng(seed)
    sims = rng.uniform(-1, 1, size=(n_queries, n_candidates))
    if ties:  # few distinct values: positives and negatives of equal similarity
        sims = np.round(sims * 2) / 2
    positive = rng.random((n_queries, n_candidates)) < 0.4
    negative = ~positive & (rng.random((n_queries, n_candidates)) < 0.8)
    rows, cols = np.nonzero(positive)
    filled = np.where(negative, sims, -3.0)
    ap, n_pos = average_precision_ranked(filled, rows, sims[rows, cols])
    np.testing.assert_array_equal(n_pos, positive.sum(axis=1))
    for q in range(n_queries):
        if positive[q].any():
            assert ap[q] == pytest.approx(_brute_force_ap(sims[q], positive[q], negative[q]))
        else:
            assert np.isnan(ap[q])


def _activity_data(seed=0):
    rng = np.random.default_rng(seed)
    genes = np.repeat([f"G{i:02d}" for i in range(30)], rng.integers(1, 5, 30))
    labels = np.r_[genes, ["nontargeting"] * 25]
    x = rng.normal(size=(labels.size, 6))
    codes = pd.factorize(genes)[0]
    x[: genes.size] += 2.5 * (codes[:, None] % 3 == 0) * rng.normal(size=(30, 6))[codes]
    adata = ad.AnnData(
        obs=pd.DataFrame({"gene_symbol": labels}, index=[f"p{i}" for i in range(labels.size)])
    )
    adata.obsm["X_emb"] = x
    return adata


def test_activity_matches_copairs(tmp_path):
    from copairs.map import average_precision, mean_average_precision

    adata = _activity_data()
    ours = phenotypic_activity(adata, use_rep="X_emb", null_size=5000, seed=3)
    # copairs' recipe: controls get a unique reference index so they never pair with each other
    meta = adata.obs.reset_index(drop=True)
    meta["reference"] = -1
    is_control = meta["gene_symbol"] == "nontargeting"
    meta.loc[is_control, "reference"] = np.arange(is_control.sum())
    columns = ["gene_symbol", "reference"]
    ap = average_precision(meta, adata.obsm["X_emb"], columns, [], [], columns, progress_bar=False)
    ref = mean_average_precision(
        ap,
        ["gene_symbol"],
        null_size=5000,
        threshold=0.05,
        seed=3,
        progress_bar=False,
        cache_dir=tmp_path,
    ).set_index("gene_symbol")
    ref = ref.loc[ours["gene_symbol"]]
    for column in ["mean_average_precision", "mean_normalized_average_precision"]:
        np.testing.assert_allclose(ours[column], ref[column], atol=1e-6)
    # the same null, sampled differently: p-values agree up to Monte Carlo error
    np.testing.assert_allclose(ours["p_value"], ref["p_value"], atol=0.04)
    assert ours["p_value"].min() < 0.01  # the planted genes are found
    # genes with one guide are not scored
    n_guides = adata.obs["gene_symbol"].value_counts()
    assert set(ours["gene_symbol"]) == set(n_guides[(n_guides > 1)].index) - {"nontargeting"}


def test_activity_perfect_gene_has_smallest_pvalue():
    adata = _angles(
        [0, 1, 2, 120, 150, 180, 200, 240],
        ["A", "A", "A", "nontargeting", "nontargeting", "nontargeting", "nontargeting", "B"],
    )
    adata.obs.loc["p7", "gene_symbol"] = "A"  # a fourth A profile far from the others
    df = phenotypic_activity(adata, use_rep="X_emb", null_size=999).set_index("gene_symbol")
    # A0..A2 rank each other first; A3 (240 degrees) ranks them after two controls
    assert df.loc["A", "mean_average_precision"] < 1
    adata.obs.loc["p7", "gene_symbol"] = "nontargeting"
    df = phenotypic_activity(adata, use_rep="X_emb", null_size=999).set_index("gene_symbol")
    assert df.loc["A", "mean_average_precision"] == pytest.approx(1.0)
    assert df.loc["A", "p_value"] == pytest.approx(1 / 1000)


def test_consistency_matches_copairs_and_brute_force(tmp_path):
    from copairs.map import average_precision, mean_average_precision

    rng = np.random.default_rng(4)
    names = [f"G{i:02d}" for i in range(40)]
    complex_of = np.arange(40) % 8
    x = rng.normal(size=(40, 5)) + 0.7 * rng.normal(size=(8, 5))[complex_of]
    genes = ad.AnnData(obs=pd.DataFrame(index=names))
    genes.obsm["X_emb"] = x
    complexes = {
        f"c{k}": [n for n, c in zip(names, complex_of, strict=True) if c == k] for k in range(8)
    }
    ours = phenotypic_consistency(
        genes, use_rep="X_emb", relationships={"toy": complexes}, null_size=5000
    )
    meta = pd.DataFrame({"gene": names, "complex": complex_of})
    ap = average_precision(meta, x, ["complex"], [], [], ["complex"], progress_bar=False)
    ref = mean_average_precision(
        ap, ["gene"], null_size=5000, threshold=0.05, seed=0, progress_bar=False, cache_dir=tmp_path
    ).set_index("gene")
    ref = ref.loc[ours["gene"]]
    np.testing.assert_allclose(ours["mean_average_precision"], ref["mean_average_precision"])
    np.testing.assert_allclose(ours["p_value"], ref["p_value"], atol=0.04)
    expected_q = false_discovery_control(ours["p_value"], method="bh")
    np.testing.assert_allclose(ours["q_value"], expected_q)
    np.testing.assert_array_equal(ours["consistent"], expected_q < 0.05)
    assert (ours["n_partners"] == 4).all()
    # brute force for gene 0: positives are its 4 complex mates, negatives the other 35 genes
    xn = x / np.linalg.norm(x, axis=1, keepdims=True)
    sims = xn @ xn[0]
    positive = (complex_of == 0) & (np.arange(40) != 0)
    negative = complex_of != 0
    assert ours.set_index("gene").loc["G00", "mean_average_precision"] == pytest.approx(
        _brute_force_ap(sims, positive, negative)
    )


def test_consistency_guide_level_pairs_and_controls():
    # A-B and C-D related (C-Z too, but Z is not profiled); two guides per gene; one control
    degrees = np.array([0, 10, 20, 30, 180, 200, 15, 250, 90])
    genes = np.array(["A", "A", "B", "B", "C", "C", "D", "D", "nontargeting"])
    adata = _angles(degrees, genes)
    pairs = pd.DataFrame({"entity1": ["A", "C", "C"], "entity2": ["B", "D", "Z"]})
    df = phenotypic_consistency(
        adata, use_rep="X_emb", relationships=pairs, gene_key="gene_symbol", null_size=200
    ).set_index("gene")
    assert df.index.tolist() == ["A", "B", "C", "D"]
    assert df["n_profiles"].tolist() == [2, 2, 2, 2]
    assert df["n_partners"].tolist() == [1, 1, 1, 1]
    # brute force: a guide's positives are its partner's guides, negatives the other genes' guides
    t = np.deg2rad(degrees[:8])
    xn = np.c_[np.cos(t), np.sin(t)]
    partner = {"A": "B", "B": "A", "C": "D", "D": "C"}
    expected = {}
    for q in range(8):
        positive = genes[:8] == partner[genes[q]]
        negative = ~positive & (genes[:8] != genes[q])
        expected.setdefault(genes[q], []).append(_brute_force_ap(xn @ xn[q], positive, negative))
    for gene, aps in expected.items():
        assert df.loc[gene, "mean_average_precision"] == pytest.approx(np.mean(aps))
    assert df.loc["A", "mean_average_precision"] < 1  # D's guide at 15 degrees comes first
    summary = adata.uns["phenotypic_consistency"]["X_emb"]["summary"]["relationships"]
    assert summary["n_genes"] == 4


def test_consistency_reads_relationship_files(tmp_path):
    rng = np.random.default_rng(5)
    names = [f"G{i:02d}" for i in range(12)]
    genes = ad.AnnData(obs=pd.DataFrame(index=names))
    genes.obsm["X_emb"] = rng.normal(size=(12, 4))
    tsv = tmp_path / "complexes.tsv"
    tsv.write_text("CPLX01\tG00 G01 G02\nCPLX02\tG03 G04 G05 G06\n")
    gmt = tmp_path / "complexes.gmt"
    gmt.write_text("CPLX01\tsimulated\tG00\tG01\tG02\nCPLX02\tsimulated\tG03\tG04\tG05\tG06\n")
    a = phenotypic_consistency(genes, use_rep="X_emb", relationships=tsv, null_size=100)
    b = phenotypic_consistency(genes, use_rep="X_emb", relationships=gmt, null_size=100)
    assert set(a["source"]) == {"complexes"}
    pd.testing.assert_frame_equal(a.drop(columns="source"), b.drop(columns="source"))
    assert a["gene"].tolist() == names[:7]


def test_null_matches_copairs_null():
    from copairs.compute import random_ap
    from copairs.map.normalization import expected_ap

    confs = np.array([[1, 40], [3, 40], [12, 40], [2, 7], [7, 7], [5, 300]])
    null = null_average_precision(confs, 20_000, np.random.default_rng(0), chunk_rows=3000)
    assert null.shape == (6, 20_000)
    np.testing.assert_allclose(null[4], 1.0)  # every candidate is a positive
    for row, (k, n) in zip(null, confs, strict=True):
        # the exact mean AP under random ranking, and copairs' own samples
        assert row.mean() == pytest.approx(
            expected_ap(int(k), int(n - k)), abs=4 * float(row.std()) / 141
        )
        theirs = random_ap(20_000, int(k), int(n), 1)
        # largest gap between the two empirical CDFs (1e-3 critical value: about 0.02)
        assert ks_2samp(row, theirs).statistic < 0.025
    # k = 1: the rank of the single positive is uniform over the n candidates
    ranks = np.rint(1 / null[0]).astype(int) - 1
    counts = np.bincount(ranks, minlength=40)
    assert counts.min() > 0.8 * 500 and counts.max() < 1.2 * 500


def test_errors():
    adata = _activity_data()
    adata.obsm["X_emb"][[3, 7]] = np.nan
    with pytest.raises(ValueError, match=r"'X_emb' has NaN or infinite values in 2 of its"):
        phenotypic_activity(adata, use_rep="X_emb")
    adata = _activity_data()
    with pytest.raises(ValueError, match="no control profiles"):
        phenotypic_activity(adata, use_rep="X_emb", control_category="NTC")
    single = _angles([0, 10, 20], ["A", "B", "nontargeting"])
    with pytest.raises(ValueError, match="two or more profiles"):
        phenotypic_activity(single, use_rep="X_emb")
    with pytest.raises(ValueError, match="null_size"):
        phenotypic_activity(adata, use_rep="X_emb", null_size=0)
    genes = ad.AnnData(obs=pd.DataFrame(index=["A", "B", "C"]))
    genes.obsm["X_emb"] = np.eye(3)
    with pytest.raises(ValueError, match="none of its 1 pairs"):
        phenotypic_consistency(
            genes, use_rep="X_emb", relationships=pd.DataFrame({"entity1": ["X"], "entity2": ["Y"]})
        )
    genes.obsm["X_emb"][1, 0] = np.inf
    with pytest.raises(ValueError, match=r"'X_emb' has NaN or infinite values in 1 of its 3 rows"):
        phenotypic_consistency(genes, use_rep="X_emb", relationships={"s": ["A", "B"]})
