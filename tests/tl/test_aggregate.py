import anndata as ad
import numpy as np
import pandas as pd
import pytest

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
    assert genes.n_vars == 0
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
    np.testing.assert_allclose(out.X, ref.loc[out.obs_names].to_numpy(), atol=1e-5)
    assert list(out.var_names) == list(adata.var_names)


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
