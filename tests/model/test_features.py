"""Tests of FeatureMCVAE: standardisation policy, training, embedding, queries and bad input."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import torch

import mcvi_ops
from mcvi_ops.model._feature_stats import control_statistics
from mcvi_ops.module import FeatureMultiContrastiveVAE

N_FEATURES = 40


def _table(n=1200, seed=0, n_genes=12) -> ad.AnnData:
    """Cells x features: gene effects on a subset of features, well offsets, a wide feature."""
    rng = np.random.default_rng(seed)
    genes = np.array(
        ["nontargeting"] * (n // 4) + [f"G{i}" for i in rng.integers(0, n_genes, n - n // 4)]
    )
    well = rng.choice(["A1", "A2", "B1"], n)
    effect = {f"G{i}": rng.normal(0, 1.5, N_FEATURES) * (i % 3 != 0) for i in range(n_genes)}
    x = rng.normal(size=(n, N_FEATURES))
    x += np.stack([effect.get(g, np.zeros(N_FEATURES)) for g in genes])
    x += pd.Series(well).map({"A1": 0.0, "A2": 2.0, "B1": -2.0}).to_numpy()[:, None]
    x[:, 0] *= 1000.0  # a feature on another scale
    obs = pd.DataFrame(
        {"gene_symbol": genes, "well": well, "fov_distance": rng.random(n)},
        index=[f"cell{i}" for i in range(n)],
    )
    return ad.AnnData(x.astype(np.float32), obs=obs)


@pytest.fixture(scope="module")
def trained():
    adata = _table()
    mcvi_ops.FeatureMCVAE.setup_anndata(
        adata,
        perturbation_key="gene_symbol",
        batch_key="well",
        continuous_covariate_keys=["fov_distance"],
    )
    model = mcvi_ops.FeatureMCVAE(adata, classification_weight=10.0, n_hidden=64)
    model.train(max_epochs=3, enable_progress_bar=False)
    return adata, model


# --- standardisation ------------------------------------------------------------------------
def test_control_statistics_are_robust_per_batch():
    rng = np.random.default_rng(1)
    x = rng.normal(5.0, 2.0, (600, 3))
    x[300:, :] += 10.0  # batch 1 is shifted
    x[0, 0] = 1e9  # an outlier among batch 0's controls
    x[1, 1] = np.nan
    batch = np.r_[np.zeros(300, int), np.ones(300, int)]
    stats = control_statistics(x, np.ones(600, bool), batch, 2, feature_names=list("abc"))
    np.testing.assert_allclose(stats.center[:, 0], [5.0, 15.0], atol=0.4)
    np.testing.assert_allclose(stats.scale, 2.0, rtol=0.2)
    assert stats.kept.all()


def test_flat_features_fall_back_and_constant_ones_are_left_out(caplog):
    rng = np.random.default_rng(2)
    x = rng.normal(size=(400, 3))
    x[:, 1] = np.where(rng.random(400) < 0.9, 0.0, 1.0)  # mostly 0: MAD 0, some spread
    x[:, 2] = 7.0  # constant
    stats = control_statistics(x, np.ones(400, bool), None, 0, feature_names=list("abc"))
    assert stats.kept.tolist() == [True, True, False]
    assert stats.scale[0, 1] > 0
    assert stats.n_fallback >= 1
    assert "do not vary among the control cells" in caplog.text


def test_batches_without_controls_and_empty_features_are_refused():
    x = np.random.default_rng(3).normal(size=(100, 2))
    control = np.r_[np.ones(50, bool), np.zeros(50, bool)]
    batch = np.r_[np.zeros(50, int), np.ones(50, int)]
    with pytest.raises(ValueError, match="fewer than 3 control cells: '1' \\(0\\)"):
        control_statistics(x, control, batch, 2, feature_names=["a", "b"])
    x[:, 1] = np.nan
    with pytest.raises(
        ValueError, match="no finite value in any control cell \\(e.g. \\['b'\\]\\)"
    ):
        control_statistics(x, control, None, 0, feature_names=["a", "b"])


def test_module_standardises_clips_and_masks():
    module = FeatureMultiContrastiveVAE(3, 2, n_batch=2, clip=4.0)
    module.set_standardization(
        torch.tensor([[0.0, 0.0, 0.0], [10.0, 10.0, 10.0]]),
        torch.tensor([[1.0, 2.0, 1.0], [1.0, 1.0, 1.0]]),
        torch.tensor([True, True, False]),
    )
    x = torch.tensor([[1.0, float("nan"), 5.0], [10.0, 100.0, 3.0]])
    y = module.standardize(x, torch.tensor([[0], [1]]))
    torch.testing.assert_close(y, torch.tensor([[1.0, 0.0, 0.0], [0.0, 4.0, 0.0]]))


# --- the model ------------------------------------------------------------------------------
def test_train_embed_and_activity(trained):
    adata, model = trained
    latent = model.get_latent_representation(kind="both", add_to_obsm=True)
    assert latent.shape == (adata.n_obs, 64)
    assert np.isfinite(latent).all()
    assert {"X_fmcvae", "X_fmcvae_salient", "X_fmcvae_background"} <= set(adata.obsm)
    np.testing.assert_array_equal(adata.obsm["X_fmcvae_salient"], latent[:, :32])
    activity = model.history["latent_activity"]
    assert list(activity.index) == ["salient", "background"]
    assert "classification_loss_train" in model.history
    # the features' scale does not matter: the wide feature was standardised
    assert float(model.module.feature_scale[:, 0].min()) > 100


def test_training_learns_the_perturbations(trained):
    adata, model = trained
    genes = mcvi_ops.tl.aggregate(adata, use_rep="X_fmcvae", by=("gene_symbol", "gene_symbol"))
    with_effect = [g for g in genes.obs_names if int(g[1:]) % 3 != 0]
    without = [g for g in genes.obs_names if int(g[1:]) % 3 == 0]
    norm = np.linalg.norm(genes.X, axis=1)
    series = pd.Series(norm, index=genes.obs_names)
    assert series[with_effect].mean() > series[without].mean()


def test_query_with_a_new_batch_uses_its_own_controls(trained, caplog):
    adata, model = trained
    query = adata[:300].copy()
    query.obs["well"] = query.obs["well"].astype(str).replace({"A1": "P2_A1"})
    latent = model.get_latent_representation(query)
    assert latent.shape == (300, 64) and np.isfinite(latent).all()
    assert "never saw" in caplog.text
    # cells of known batches are embedded exactly as in the training data
    known = (query.obs["well"] != "P2_A1").to_numpy()
    np.testing.assert_allclose(
        latent[known], model.get_latent_representation(adata, np.arange(300)[known]), atol=1e-5
    )


def test_query_with_other_features_is_refused(trained):
    adata, model = trained
    query = adata[:50, ::-1].copy()
    with pytest.raises(ValueError, match="other features than the model was trained on.*reorder"):
        model.get_latent_representation(query)
    query = adata[:50, :10].copy()
    with pytest.raises(ValueError, match="30 missing"):
        model.get_latent_representation(query)


def test_bad_tables_are_refused():
    adata = _table(n=200)
    text = adata.copy()
    text.X = text.X.astype(str).astype(object)
    with pytest.raises(TypeError, match="not numbers"):
        mcvi_ops.FeatureMCVAE.setup_anndata(text, perturbation_key="gene_symbol")
    with pytest.raises(KeyError, match="Layer 'raw' not found"):
        mcvi_ops.FeatureMCVAE.setup_anndata(adata, layer="raw", perturbation_key="gene_symbol")
    with pytest.raises(KeyError, match="Covariate columns \\['nope'\\] not found"):
        mcvi_ops.FeatureMCVAE.setup_anndata(
            adata, perturbation_key="gene_symbol", continuous_covariate_keys=["nope"]
        )
    lonely = adata.copy()
    lonely.obs["well"] = lonely.obs["well"].astype(str)
    lonely.obs.loc[lonely.obs["gene_symbol"] == "nontargeting", "well"] = "A1"
    mcvi_ops.FeatureMCVAE.setup_anndata(lonely, perturbation_key="gene_symbol", batch_key="well")
    with pytest.raises(ValueError, match="fewer than 3 control cells"):
        mcvi_ops.FeatureMCVAE(lonely)
    mcvi_ops.FeatureMCVAE.setup_anndata(adata, perturbation_key="gene_symbol")
    model = mcvi_ops.FeatureMCVAE(adata)
    with pytest.raises(ValueError, match="even number"):
        model.train(batch_size=255)


def test_save_and_load_keep_the_standardisation(trained, tmp_path):
    adata, model = trained
    model.save(tmp_path / "model")
    loaded = mcvi_ops.FeatureMCVAE.load(tmp_path / "model", adata)
    torch.testing.assert_close(loaded.module.feature_center, model.module.feature_center)
    torch.testing.assert_close(loaded.module.covariate_trend, model.module.covariate_trend)
    np.testing.assert_allclose(
        loaded.get_latent_representation(adata, np.arange(50)),
        model.get_latent_representation(adata, np.arange(50)),
        atol=1e-6,
    )
    with pytest.raises(ValueError, match="holds a FeatureMCVAE model"):
        mcvi_ops.MCVAE.load(tmp_path / "model", adata)
    with pytest.raises(ValueError, match="needs the AnnData of features"):
        mcvi_ops.FeatureMCVAE.load(tmp_path / "model")


def test_the_controls_trend_along_a_covariate_is_removed():
    adata = _table(n=1500, seed=4)
    distance = adata.obs["fov_distance"].to_numpy()
    adata.X[:, 1] += (5.0 * distance**2).astype(np.float32)  # an additive trend, all cells
    adata.X[:, 2] *= (1.0 - 0.8 * distance**2).astype(np.float32)  # vignetting: multiplicative
    mcvi_ops.FeatureMCVAE.setup_anndata(
        adata, perturbation_key="gene_symbol", continuous_covariate_keys=["fov_distance"]
    )
    model = mcvi_ops.FeatureMCVAE(adata)
    module = model.module
    x = torch.as_tensor(adata.X)
    covariates = torch.as_tensor(distance[:, None], dtype=torch.float32)
    corrected = module.standardize(x, None, continuous_covariates=covariates)[:, 1].numpy()
    plain = module.standardize(x, None)[:, 1].numpy()
    control = (adata.obs["gene_symbol"] == "nontargeting").to_numpy()
    assert abs(np.corrcoef(plain[control], distance[control])[0, 1]) > 0.5
    assert abs(np.corrcoef(corrected[control], distance[control])[0, 1]) < 0.1
    # the multiplicative trend: the controls' spread no longer depends on the position
    scaled = module.standardize(x, None, continuous_covariates=covariates)[:, 2].numpy()
    unscaled = module.standardize(x, None)[:, 2].numpy()
    near, far = control & (distance < 0.3), control & (distance > 0.8)
    assert unscaled[far].std() < 0.6 * unscaled[near].std()
    assert scaled[far].std() == pytest.approx(scaled[near].std(), rel=0.25)
