import anndata as ad
import numpy as np
import pandas as pd
import pytest

import mcvi_ops


def _cells(n: int, seed: int = 0) -> ad.AnnData:
    rng = np.random.default_rng(seed)
    adata = ad.AnnData(obs=pd.DataFrame(index=[f"c{i}" for i in range(n)]))
    adata.obsm["X_mcvae_salient"] = rng.normal(size=(n, 4)).astype(np.float32)
    adata.obsm["X_mcvae_background"] = rng.normal(size=(n, 4)).astype(np.float32)
    adata.obsm["X_umap"] = np.zeros((n, 2))
    return adata


def test_umaps_are_stored_per_representation_without_touching_x_umap(caplog):
    adata = _cells(60)
    mcvi_ops.tl.umaps(adata, n_neighbors=5)
    for rep in ("X_mcvae_salient", "X_mcvae_background"):
        assert adata.obsm[f"X_umap_{rep}"].shape == (60, 2)
        assert f"neighbors_{rep}" in adata.uns
        assert f"neighbors_{rep}_connectivities" in adata.obsp
    assert (adata.obsm["X_umap"] == 0).all()
    assert "neighbors" not in adata.uns
    stored = adata.obsm["X_umap_X_mcvae_salient"].copy()
    adata.obsm["X_mcvae_salient"] = adata.obsm["X_mcvae_salient"] * 10
    mcvi_ops.tl.umaps(adata, use_rep="X_mcvae_salient", n_neighbors=5)  # reused
    np.testing.assert_array_equal(adata.obsm["X_umap_X_mcvae_salient"], stored)
    mcvi_ops.tl.umaps(adata, use_rep="X_mcvae_salient", n_neighbors=5, recompute=True)
    assert not np.array_equal(adata.obsm["X_umap_X_mcvae_salient"], stored)
    with pytest.raises(
        KeyError, match=r"Did not find \.obsm\['X_vae'\].*get_latent_representation"
    ):
        mcvi_ops.tl.umaps(adata, use_rep=["X_vae"])


def test_approximate_neighbours_of_large_screens(monkeypatch):
    """The approximate-neighbour path (scanpy's from 8,192 cells on) gives usable UMAPs.

    scanpy 1.11.5 fails on pynndescent's ``csr_array``; the path is taken here from 200 cells
    on, which exercises the same transformer in a second instead of 45 s at 8,192 cells.
    """
    from mcvi_ops.tl import _umap

    monkeypatch.setattr(_umap, "_APPROXIMATE_FROM", 200)
    calls = []
    original = _umap._approximate_knn
    monkeypatch.setattr(_umap, "_approximate_knn", lambda *a: calls.append(a) or original(*a))
    adata = _cells(300)
    mcvi_ops.tl.umaps(adata, n_neighbors=5)
    assert len(calls) == 2
    assert adata.obsm["X_umap_X_mcvae_salient"].shape == (300, 2)
    assert np.isfinite(adata.obsm["X_umap_X_mcvae_background"]).all()
