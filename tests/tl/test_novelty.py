import anndata as ad
import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mcvi_ops.tl import phenotype_novelty
from mcvi_ops.tl._novelty import benjamini_hochberg

PATTERN = np.array([[1, 0], [-1, 0], [0, 1], [0, -1]], dtype=float)


def _toy():
    # controls: 10 x the zero-mean pattern; P shifts the salient space by [3, 4] (norm 5),
    # Q shifts the background space by [6, 8] (norm 10); R has the controls' distribution.
    s, z, genes, guides = [], [], [], []
    for _ in range(10):
        s.append(PATTERN)
        z.append(PATTERN)
        genes += ["nontargeting"] * 4
        guides += ["ntc1", "ntc1", "ntc2", "ntc2"]
    s.append(PATTERN + [3, 4])
    z.append(PATTERN)
    genes += ["P"] * 4
    guides += ["P1", "P1", "P2", "P2"]
    s.append(PATTERN)
    z.append(PATTERN + [6, 8])
    genes += ["Q"] * 4
    guides += ["Q1"] * 4
    s.append(PATTERN[[0, 1, 2, 3, 0, 1, 2, 3]])
    z.append(PATTERN[[0, 1, 2, 3, 0, 1, 2, 3]])
    genes += ["R"] * 8
    guides += ["R1"] * 8
    obs = pd.DataFrame({"gene_symbol": genes, "sgRNA": guides})
    obs.index = obs.index.astype(str)
    adata = ad.AnnData(obs=obs)
    adata.obsm["X_mcvae_salient"] = np.vstack(s)
    adata.obsm["X_mcvae_background"] = np.vstack(z)
    return adata


def test_hand_computed_shifts_and_categories():
    adata = _toy()
    df = phenotype_novelty(adata, n_permutations=199, seed=0)
    assert df.index[0] == "P"  # sorted by decreasing salient share
    assert df.loc["P", "salient_shift"] == pytest.approx(5.0)
    assert df.loc["P", "background_shift"] == pytest.approx(0.0)
    assert df.loc["P", "salient_share"] == pytest.approx(1.0)
    assert df.loc["Q", "background_shift"] == pytest.approx(10.0)
    assert df.loc["Q", "salient_share"] == pytest.approx(0.0)
    # no random subset of the unit-pattern controls moves the mean by 5 or 10
    assert df.loc["P", "salient_pvalue"] == pytest.approx(1 / 200)
    assert df.loc["Q", "background_pvalue"] == pytest.approx(1 / 200)
    # R is a balanced copy of the control pattern: zero shift, p-value 1
    assert df.loc["R", "salient_shift"] == pytest.approx(0.0)
    assert df.loc["R", "salient_pvalue"] == pytest.approx(1.0)
    assert df.loc["P", "category"] == "novel"
    assert df.loc["Q", "category"] == "shift"
    assert df.loc["R", "category"] == "none"
    assert df.loc["P", "n_guides"] == 2
    assert df.loc["R", "n_cells"] == 8
    assert adata.uns["phenotype_novelty"]["results"] is df


def test_pvalues_calibrated_under_the_null():
    rng = np.random.default_rng(0)
    n_ctrl, n_genes, per_gene = 2000, 40, 30
    n = n_ctrl + n_genes * per_gene
    genes = ["nontargeting"] * n_ctrl + [f"G{g}" for g in range(n_genes) for _ in range(per_gene)]
    adata = ad.AnnData(obs=pd.DataFrame({"gene_symbol": genes}, index=np.arange(n).astype(str)))
    adata.obsm["X_mcvae_salient"] = rng.normal(size=(n, 4))
    adata.obsm["X_mcvae_background"] = rng.normal(size=(n, 4))
    df = phenotype_novelty(adata, n_permutations=200, guide_key=None)
    assert 0.3 < df["salient_pvalue"].mean() < 0.7
    assert (df["category"] == "none").mean() > 0.9


def test_benjamini_hochberg():
    q = benjamini_hochberg(np.array([0.01, 0.04, 0.03, np.nan, 0.5]))
    # sorted p 0.01, 0.03, 0.04, 0.5 -> p * 4 / rank = 0.04, 0.06, 0.0533, 0.5 -> running minimum
    np.testing.assert_allclose(q[[0, 1, 2, 4]], [0.04, 0.16 / 3, 0.16 / 3, 0.5])
    assert np.isnan(q[3])
    assert np.isnan(benjamini_hochberg(np.array([np.nan, np.nan]))).all()
    assert benjamini_hochberg(np.array([])).shape == (0,)


def _hand_written_bh(pvalues):
    """The Benjamini-Hochberg step-up this module used before scipy's (kept as the reference)."""
    p = np.asarray(pvalues, dtype=float)
    q = np.full(p.shape, np.nan)
    ok = np.isfinite(p)
    m = ok.sum()
    if m == 0:
        return q
    order = np.argsort(p[ok])
    ranked = p[ok][order] * m / np.arange(1, m + 1)
    ranked = np.minimum.accumulate(ranked[::-1])[::-1]
    out = np.empty(m)
    out[order] = np.minimum(ranked, 1.0)
    q[ok] = out
    return q


@settings(max_examples=100, deadline=None)
@given(
    st.lists(
        st.one_of(st.floats(0, 1), st.just(np.nan), st.sampled_from([0.0, 0.01, 0.5, 1.0])),
        max_size=60,
    )
)
def test_scipy_bh_unchanged_from_hand_written(pvalues):
    np.testing.assert_allclose(
        benjamini_hochberg(np.array(pvalues, dtype=float)),
        _hand_written_bh(pvalues),
        rtol=1e-12,
        atol=1e-15,
    )


def test_errors():
    adata = _toy()
    with pytest.raises(ValueError, match="control cells"):
        phenotype_novelty(adata, control_category="NTC")
    with pytest.raises(KeyError, match=r"Did not find \.obsm\['X_s'\]"):
        phenotype_novelty(adata, salient_rep="X_s")
