import anndata as ad
import numpy as np
import pandas as pd
import pytest
from sklearn.decomposition import PCA

from mcvi_ops.tl import feature_embedding, normalize_to_controls, to_mudata


def _features(seed=0):
    rng = np.random.default_rng(seed)
    n = 200
    obs = pd.DataFrame(
        {
            "well": np.repeat(["A1", "A2"], n // 2),
            "gene_symbol": np.tile(["nontargeting", "G1", "G2", "nontargeting"], n // 4),
        },
        index=[f"c{i}" for i in range(n)],
    )
    x = rng.normal(size=(n, 6))
    x[n // 2 :] = 5 + 3 * x[n // 2 :]  # the second well has another offset and scale
    x[:, 5] = 1.0  # a feature without spread
    return ad.AnnData(x, obs=obs, var=pd.DataFrame(index=[f"f{j}" for j in range(6)]))


def test_per_batch_control_standardisation_then_pca():
    adata = _features()
    emb = feature_embedding(adata, batch_key="well", n_comps=3)
    assert emb.shape == (200, 3)
    assert adata.obsm["X_features_pca"] is emb
    assert list(adata.uns["X_features_pca"]["features"]) == ["f0", "f1", "f2", "f3", "f4"]

    x = adata.X[:, :5].copy()
    for well in ("A1", "A2"):
        rows = (adata.obs["well"] == well).to_numpy()
        ctrl = x[rows & (adata.obs["gene_symbol"] == "nontargeting").to_numpy()]
        x[rows] = (x[rows] - ctrl.mean(0)) / ctrl.std(0, ddof=1)
    ref = PCA(n_components=3, random_state=0).fit_transform(x)
    np.testing.assert_allclose(np.abs(emb), np.abs(ref), atol=1e-4)


def test_feature_embedding_with_tvn_is_tvn_then_pca():
    adata = _features()
    emb = feature_embedding(adata, batch_key="well", n_comps=3, method="tvn")
    assert adata.uns["X_features_pca"]["params"]["method"] == "tvn"
    assert list(adata.uns["X_features_pca"]["features"]) == ["f0", "f1", "f2", "f3", "f4"]
    normalised = normalize_to_controls(adata, batch_key="well", method="tvn")
    ref = PCA(n_components=3, random_state=0).fit_transform(normalised.astype(np.float64))
    np.testing.assert_allclose(np.abs(emb), np.abs(ref), atol=1e-4)
    with pytest.raises(ValueError, match="method must be 'center_scale' or 'tvn'"):
        feature_embedding(adata, batch_key="well", method="pca")


def test_feature_embedding_errors():
    adata = _features()
    adata.obs.loc[adata.obs["well"] == "A2", "gene_symbol"] = "G1"
    with pytest.raises(ValueError, match="Batch 'A2'.*0 control cells"):
        feature_embedding(adata, batch_key="well")
    with pytest.raises(KeyError, match="batch column"):
        feature_embedding(adata, batch_key="plate_well")


def test_to_mudata_aligns_and_checks():
    features = _features()
    image = ad.AnnData(obs=features.obs.copy())
    image.obsm["X_mcvae"] = np.zeros((image.n_obs, 4))
    mdata = to_mudata(image, features[::-1].copy())
    assert list(mdata.mod) == ["image", "features"]
    assert list(mdata.mod["features"].obs_names) == list(image.obs_names)
    assert mdata.n_obs == image.n_obs
    assert "image:gene_symbol" in mdata.obs
    with pytest.raises(ValueError, match="different order"):
        to_mudata(image, features[::-1].copy(), reorder=False)
    with pytest.raises(ValueError, match="same cells: 10 obs_names only in image_adata"):
        to_mudata(image, features[10:].copy())
