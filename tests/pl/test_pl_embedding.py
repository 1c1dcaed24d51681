import anndata as ad
import numpy as np
import pandas as pd
import pytest

import mcvi_ops.pl as mpl


def _cells(n=60):
    rng = np.random.default_rng(0)
    obs = pd.DataFrame(
        {"gene_symbol": rng.choice(["a", "b"], n)}, index=[f"c{i}" for i in range(n)]
    )
    adata = ad.AnnData(obs=obs)
    adata.obsm["X_mcvae_salient"] = rng.normal(size=(n, 3))
    adata.obsm["X_mcvae_background"] = rng.normal(size=(n, 3))
    adata.obsm["X_umap"] = np.zeros((n, 2))
    return adata


@pytest.fixture(autouse=True)
def _agg():
    import matplotlib
    import matplotlib.pyplot as plt

    matplotlib.use("Agg")
    yield
    plt.close("all")


def test_reuses_stored_umaps_into_given_axes():
    import matplotlib.pyplot as plt

    adata = _cells()
    for rep in ("X_mcvae_salient", "X_mcvae_background"):
        adata.obsm[f"X_umap_{rep}"] = adata.obsm[rep][:, :2]
    _, axs = plt.subplots(1, 2)
    out = mpl.salient_background(adata, color="gene_symbol", axs=axs)
    assert list(out) == list(axs)
    assert out[0].get_title() == "X_mcvae_salient"
    with pytest.raises(KeyError, match="X_vae"):
        mpl.salient_background(adata, reps=["X_vae"])
    with pytest.raises(ValueError, match="one axis per rep"):
        mpl.salient_background(adata, axs=axs[:1])


@pytest.mark.slow
def test_computes_umaps_without_touching_x_umap():
    adata = _cells()
    axs = mpl.salient_background(adata, color="gene_symbol", n_neighbors=5)
    assert len(axs) == 2
    assert adata.obsm["X_umap_X_mcvae_salient"].shape == (adata.n_obs, 2)
    assert "X_umap_X_mcvae_background" in adata.obsm
    assert (adata.obsm["X_umap"] == 0).all()
    assert "neighbors" not in adata.uns


def test_salient_background_umap_on_more_than_8192_cells():
    """scanpy's approximate-neighbour path (>= 8,192 cells) works (scanpy 1.11.5 bug)."""
    import matplotlib

    matplotlib.use("Agg")
    rng = np.random.default_rng(0)
    adata = ad.AnnData(obs=pd.DataFrame(index=[f"c{i}" for i in range(9000)]))
    adata.obsm["X_mcvae_salient"] = rng.normal(size=(9000, 4)).astype(np.float32)
    adata.obsm["X_mcvae_background"] = rng.normal(size=(9000, 4)).astype(np.float32)
    axs = mpl.salient_background(adata, n_neighbors=5)
    assert len(axs) == 2
    assert adata.obsm["X_umap_X_mcvae_salient"].shape == (9000, 2)
