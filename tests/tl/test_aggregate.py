import anndata as ad
import numpy as np
import pandas as pd
import pytest
from scipy import sparse

from mcvi_ops.tl import aggregate


def _toy():
    x = np.array(
        [[1, 0], [3, 0], [0, 4], [2, 2], [1, 1], [1, 1], [-1, 1]],
        dtype=np.float32,
    )
    obs = pd.DataFrame(
        {
            "sgRNA": ["g1", "g1", "g2", "g3", "c1", "c1", "c2"],
            "gene_symbol": ["A", "A", "A", "B", "nontargeting", "nontargeting", "nontargeting"],
        },
        index=[f"cell{i}" for i in range(7)],
    )
    adata = ad.AnnData(obs=obs)
    adata.obsm["X_emb"] = x
    return adata


def test_gene_level_hand_computed():
    genes = aggregate(_toy(), use_rep="X_emb")
    # guide means g1=[2,0], g2=[0,4], g3=[2,2]; control mean = mean([1,1], [-1,1]) = [0,1]
    # genes A=[1,2], B=[2,2] -> centred A=[1,1], B=[2,1]; sd = [sqrt(.5), 0 -> unscaled]
    assert list(genes.obs_names) == ["A", "B"]
    np.testing.assert_allclose(
        genes.obsm["X_emb"], [[np.sqrt(2), 1.0], [2 * np.sqrt(2), 1.0]], rtol=1e-6
    )
    assert genes.obs["n_cells"].tolist() == [3, 1]
    assert genes.obs["n_guides"].tolist() == [2, 1]
    # the profiles are also .X, with named variables
    assert genes.var_names.tolist() == ["X_emb_0", "X_emb_1"]
    np.testing.assert_array_equal(genes.X, genes.obsm["X_emb"])
    assert genes.to_df().loc["B", "X_emb_0"] == pytest.approx(2 * np.sqrt(2))
    np.testing.assert_allclose(genes.uns["aggregate"]["X_emb"]["control_mean"], [0, 1])


def test_guide_level_keeps_controls():
    guides = aggregate(_toy(), use_rep="X_emb", level="guide", center=True, scale=False)
    assert list(guides.obs_names) == ["c1", "c2", "g1", "g2", "g3"]
    assert guides.obs["is_control"].tolist() == [True, True, False, False, False]
    np.testing.assert_allclose(
        guides.obsm["X_emb"], [[1, 0], [-1, 0], [2, -1], [0, 3], [2, 1]], rtol=1e-6
    )
    assert guides.obs["n_cells"].tolist() == [2, 1, 2, 1, 1]
    assert guides.obs["gene_symbol"].tolist() == ["nontargeting"] * 2 + ["A", "A", "B"]


def test_matches_pandas_groupby_reference():
    rng = np.random.default_rng(0)
    n, d = 3000, 5
    guides = rng.choice([f"sg{i}" for i in range(40)], n)
    gene_of = {f"sg{i}": ("nontargeting" if i < 8 else f"G{i // 4}") for i in range(40)}
    obs = pd.DataFrame({"sgRNA": guides, "gene_symbol": [gene_of[g] for g in guides]})
    obs.index = obs.index.astype(str)
    x = rng.normal(size=(n, d))
    adata = ad.AnnData(x.astype(np.float32), obs=obs)
    adata.obsm["X_rep"] = x
    out = aggregate(adata, use_rep=["X", "X_rep"])

    cols = [f"f{j}" for j in range(d)]
    df = pd.concat([obs, pd.DataFrame(x, columns=cols, index=obs.index)], axis=1)
    guide_means = df.groupby(["sgRNA", "gene_symbol"])[cols].mean().reset_index()
    gene_means = guide_means.groupby("gene_symbol")[cols].mean()
    ctrl = guide_means.loc[guide_means["gene_symbol"] == "nontargeting", cols].mean()
    ref = gene_means.drop(index="nontargeting") - ctrl
    ref = ref / ref.std(ddof=1)
    np.testing.assert_allclose(out.obsm["X_rep"], ref.loc[out.obs_names].to_numpy(), atol=1e-5)
    # .X holds the aggregated .X (original var_names, first) and then X_rep_0..4
    assert list(out.var_names) == list(adata.var_names) + [f"X_rep_{j}" for j in range(d)]
    assert out.var["representation"].tolist() == ["X"] * d + ["X_rep"] * d
    np.testing.assert_allclose(
        out[:, list(adata.var_names)].X, ref.loc[out.obs_names].to_numpy(), atol=1e-5
    )
    np.testing.assert_array_equal(out[:, out.var["representation"] == "X_rep"].X, out.obsm["X_rep"])
    assert "X" not in out.obsm


def test_guide_means_match_decoupler_pseudobulk():
    import decoupler as dc

    rng = np.random.default_rng(1)
    n = 400
    obs = pd.DataFrame({"sgRNA": rng.choice(list("abcdef"), n)}, index=np.arange(n).astype(str))
    obs["gene_symbol"] = obs["sgRNA"].map(lambda g: "nontargeting" if g in "ab" else g.upper())
    adata = ad.AnnData(rng.normal(size=(n, 3)).astype(np.float32), obs=obs)
    ours = aggregate(adata, use_rep=None, level="guide", center=False, scale=False)
    theirs = dc.pp.pseudobulk(
        adata, sample_col="sgRNA", groups_col=None, mode="mean", skip_checks=True
    )
    np.testing.assert_allclose(ours.X, theirs[ours.obs_names].X, atol=1e-6)


def test_errors():
    adata = _toy()
    with pytest.raises(KeyError, match=r"Did not find \.obsm\['X_missing'\]"):
        aggregate(adata, use_rep="X_missing")
    with pytest.raises(ValueError, match="no control cells"):
        aggregate(adata, use_rep="X_emb", control_category="NTC")
    bad = adata.copy()
    bad.obs.loc["cell1", "gene_symbol"] = "B"
    with pytest.raises(ValueError, match="must belong to one gene"):
        aggregate(bad, use_rep="X_emb")
    with pytest.raises(ValueError, match="`level`"):
        aggregate(adata, use_rep="X_emb", level="cell")


def test_two_representations_as_named_variables():
    adata = _toy()
    adata.obsm["X_other"] = np.arange(21, dtype=np.float32).reshape(7, 3)
    guides = aggregate(adata, use_rep=["X_emb", "X_other"], level="guide", scale=False)
    assert guides.shape == (5, 5)
    assert guides.var_names.tolist() == [
        "X_emb_0",
        "X_emb_1",
        "X_other_0",
        "X_other_1",
        "X_other_2",
    ]
    df = guides.to_df()
    np.testing.assert_array_equal(df.iloc[:, :2].to_numpy(), guides.obsm["X_emb"])
    np.testing.assert_array_equal(df.iloc[:, 2:].to_numpy(), guides.obsm["X_other"])
    # scanpy reads it as any AnnData
    sc = pytest.importorskip("scanpy")
    means = sc.get.aggregate(guides, by="gene_symbol", func="mean")
    assert means.shape == (3, 5)


def test_non_finite_cells_are_left_out_with_a_warning(caplog):
    adata = _toy()
    reference = aggregate(adata[[0, 2, 3, 4, 5, 6]].copy(), use_rep="X_emb")
    adata.obsm["X_emb"][1] = [np.nan, 0.0]  # the second cell of guide g1
    with caplog.at_level("WARNING", logger="mcvi_ops.tl._aggregate"):
        genes = aggregate(adata, use_rep="X_emb")
    assert "Ignoring 1 cells with NaN or infinite values in 'X_emb'" in caplog.text
    assert np.isfinite(genes.X).all()
    np.testing.assert_allclose(genes.X, reference.X)
    assert genes.obs["n_cells"].tolist() == [2, 1]
    # a cell bad in any representation is left out of all of them (same rows everywhere)
    adata = _toy()
    adata.obsm["X_other"] = np.ones((7, 1), dtype=np.float32)
    adata.obsm["X_other"][6] = np.inf  # the only cell of control guide c2
    guides = aggregate(adata, use_rep=["X_emb", "X_other"], level="guide", scale=False)
    assert guides.obs_names.tolist() == ["c1", "g1", "g2", "g3"]
    # control mean is now guide c1 alone: [1, 1]
    np.testing.assert_allclose(guides.uns["aggregate"]["X_emb"]["control_mean"], [1, 1])


def test_non_finite_sparse_x():
    adata = _toy()
    x = adata.obsm["X_emb"].copy()
    x[3, 1] = np.nan  # the only cell of g3 (gene B)
    adata = ad.AnnData(sparse.csr_matrix(x), obs=adata.obs)
    genes = aggregate(adata, use_rep=None, scale=False)
    assert genes.obs_names.tolist() == ["A"]
    np.testing.assert_allclose(genes.X, [[1.0, 1.0]])
    bad = adata.copy()
    bad.X = sparse.csr_matrix(np.full((7, 2), np.nan))
    with pytest.raises(ValueError, match="No cell has a guide, a gene and finite values"):
        aggregate(bad, use_rep=None)


def test_group_means_match_scanpy_aggregate():
    sc = pytest.importorskip("scanpy")
    from mcvi_ops.tl._utils import group_means

    rng = np.random.default_rng(3)
    x = rng.normal(size=(500, 4)).astype(np.float32)
    codes = rng.integers(-1, 30, size=500)  # -1: ignored rows
    ours, counts = group_means(x, codes, 31)
    assert np.isnan(ours[30]).all() and counts[30] == 0  # a group without rows
    keep = codes >= 0
    cells = ad.AnnData(
        obs=pd.DataFrame(
            {"g": pd.Categorical.from_codes(codes[keep], categories=np.arange(31).astype(str))},
            index=np.flatnonzero(keep).astype(str),
        )
    )
    cells.obsm["x"] = x[keep]
    theirs = sc.get.aggregate(cells, by="g", func="mean", obsm="x")
    np.testing.assert_allclose(ours[theirs.obs_names.astype(int)], theirs.layers["mean"], rtol=1e-5)
