from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import scvi
import torch

import mcvi_ops
from mcvi_ops import MCVAE, VAE

from .conftest import FAST_MODULE, FAST_TRAIN


def _model(adata, **kwargs):
    MCVAE.setup_anndata(adata, perturbation_key="gene_symbol")
    return MCVAE(adata, **FAST_MODULE, **kwargs)


def test_every_parameter_changes_after_training(screen):
    model = _model(screen)
    before = {k: v.detach().clone() for k, v in model.module.named_parameters()}
    # prior means only learn through the KL term, so let its weight leave 0 within the epoch
    model.train(**FAST_TRAIN, plan_kwargs={"n_steps_kl_warmup": 2})
    for name, value in model.module.named_parameters():
        if name == "background_prior_mean.weight":
            # the control row is masked to 0 and never learned; every other row is
            assert torch.equal(value[0], before[name][0]), name
            assert (value[1:] != before[name][1:]).any(dim=1).all(), name
        else:
            assert not torch.equal(value, before[name]), f"{name} did not change"
    assert model.is_trained
    history = model.history
    assert {"train_loss", "validation_loss"} <= set(history)


@pytest.mark.parametrize("kind, width", [("salient", 5), ("background", 7), ("both", 12)])
def test_latent_shapes(screen, kind, width):
    model = _model(screen, n_salient_latent=5, n_background_latent=7)
    latent = model.get_latent_representation(kind=kind, add_to_obsm=True)
    assert latent.shape == (screen.n_obs, width)
    key = {"salient": "X_mcvae_salient", "background": "X_mcvae_background", "both": "X_mcvae"}
    np.testing.assert_array_equal(screen.obsm[key[kind]], latent)
    subset = model.get_latent_representation(indices=[3, 1], kind=kind)
    np.testing.assert_allclose(subset, latent[[3, 1]], rtol=1e-5, atol=1e-5)


def test_both_is_salient_then_background(screen):
    model = _model(screen, n_salient_latent=3, n_background_latent=4)
    both = model.get_latent_representation(kind="both")
    np.testing.assert_allclose(both[:, :3], model.get_latent_representation(kind="salient"))
    np.testing.assert_allclose(both[:, 3:], model.get_latent_representation(kind="background"))
    # one call stores all three embeddings
    for key in ("X_mcvae", "X_mcvae_salient", "X_mcvae_background"):
        screen.obsm.pop(key, None)
    model.get_latent_representation(kind="both", add_to_obsm=True)
    np.testing.assert_allclose(screen.obsm["X_mcvae"], both)
    np.testing.assert_allclose(screen.obsm["X_mcvae_salient"], both[:, :3])
    np.testing.assert_allclose(screen.obsm["X_mcvae_background"], both[:, 3:])


def test_training_batches_are_balanced(screen):
    model = _model(screen)
    splitter = model._data_splitter_cls(model.adata_manager, batch_size=64, train_size=0.9)
    splitter.setup()
    for batch in splitter.train_dataloader():
        codes = batch["perturbation"].reshape(-1)
        assert int((codes == 0).sum()) == int((codes != 0).sum())


def test_same_seed_same_embedding(screen):
    latents = []
    for _ in range(2):
        scvi.settings.seed = 3
        model = _model(screen)
        model.train(**FAST_TRAIN)
        latents.append(model.get_latent_representation())
    np.testing.assert_array_equal(latents[0], latents[1])


def test_save_load_identical(screen, tmp_path):
    model = _model(screen, prior="salient", n_salient_latent=6)
    model.train(**FAST_TRAIN)
    expected = model.get_latent_representation(kind="both")
    model.save(tmp_path / "model", overwrite=True)
    loaded = MCVAE.load(tmp_path / "model", adata=screen)
    np.testing.assert_array_equal(loaded.get_latent_representation(kind="both"), expected)
    assert loaded.module.prior == "salient"
    torch.testing.assert_close(loaded.module.transform.low, model.module.transform.low)
    pd.testing.assert_frame_equal(loaded.get_perturbation_priors(), model.get_perturbation_priors())


@pytest.mark.parametrize("prior", ["both", "salient", "background", "none"])
def test_variants_train_one_epoch(screen, prior):
    model = _model(screen, prior=prior)
    model.train(**FAST_TRAIN)
    assert np.isfinite(model.history["train_loss"].to_numpy(dtype=float)).all()
    priors = model.get_perturbation_priors()
    assert priors.index[0] == "nontargeting"
    assert (priors.filter(like="background_").iloc[0] == 0).all()
    learned_s = priors.filter(like="salient_").iloc[1:].abs().to_numpy().sum() > 0
    assert learned_s == (prior in ("both", "salient"))


def test_vae_baseline_trains_one_epoch(screen):
    VAE.setup_anndata(screen, perturbation_key="gene_symbol")
    model = VAE(screen, n_latent=10, **FAST_MODULE)
    model.train(**FAST_TRAIN)
    latent = model.get_latent_representation(add_to_obsm=True)
    assert latent.shape == (screen.n_obs, 10)
    assert screen.obsm["X_vae"].shape == (screen.n_obs, 10)
    assert model.get_reconstruction(indices=[0, 5]).shape == (2, 4, 32, 32)
    _check_elbo_and_reconstruction_error(model)


def _check_elbo_and_reconstruction_error(model):
    """scvi-tools' VAEMixin metrics work on both image models, per cell and as means."""
    per_cell = model.get_elbo(indices=np.arange(40), return_mean=False)
    assert per_cell.shape == (40,)
    assert np.isfinite(per_cell.numpy()).all()
    mean = model.get_elbo(indices=np.arange(40))
    # each call draws its own posterior sample, so the two estimates agree only roughly
    np.testing.assert_allclose(float(mean), float(per_cell.mean()), rtol=0.05)
    error = model.get_reconstruction_error(indices=np.arange(40))
    assert set(error) == {"reconstruction_loss"}
    # minus the ELBO is the reconstruction error plus a KL term that is small next to a sum over
    # every pixel (both estimates draw their own posterior samples)
    reconstruction = float(error["reconstruction_loss"])
    assert abs(-float(mean) - reconstruction) < 0.05 * abs(reconstruction)


def test_mcvae_elbo_and_loader_settings(screen):
    import scvi

    model = _model(screen)
    model.train(**FAST_TRAIN)
    _check_elbo_and_reconstruction_error(model)
    # inference loaders come through `_data_loader_cls` and honour scvi-tools' settings
    old = scvi.settings.batch_size
    try:
        scvi.settings.batch_size = 7
        loader = model._make_data_loader(adata=screen, indices=np.arange(20))
        assert isinstance(loader, model._data_loader_cls)
        assert [len(b["X"]) for b in loader] == [7, 7, 6]
    finally:
        scvi.settings.batch_size = old


def test_outputs_images(screen):
    model = _model(screen)
    priors = model.get_perturbation_priors()
    assert priors.shape == (7, 64)
    images = model.decode_priors(["nontargeting", priors.index[2]])
    assert images.shape == (2, 4, 32, 32)
    raw = model.decode(np.zeros((1, 32)), np.zeros((1, 32)), inverse_transform=True)
    assert raw.min() >= 0
    recon = model.get_reconstruction(indices=[0, 1, 2])
    assert recon.shape == (3, 4, 32, 32)
    assert np.abs(recon).max() <= 1


def test_batch_covariate(screen):
    screen.obs["plate_well"] = (
        screen.obs["plate"].astype(str) + "_" + screen.obs["well"].astype(str)
    )
    MCVAE.setup_anndata(screen, perturbation_key="gene_symbol", batch_key="plate_well")
    model = MCVAE(screen, **FAST_MODULE)
    assert model.module.n_batch == screen.obs["plate_well"].nunique()
    model.train(**FAST_TRAIN)
    wells = list(screen.obs["plate_well"].unique()[:1])
    assert model.decode(np.zeros((1, 32)), np.zeros((1, 32)), batch=wells).shape == (1, 4, 32, 32)
    with pytest.raises(ValueError, match="batch="):
        model.decode(np.zeros((1, 32)), np.zeros((1, 32)))


def test_query_data(screen, tmp_path):
    model = _model(screen)
    query = mcvi_ops.datasets.synthetic_screen(
        n_cells=100, n_genes=3, n_control_guides=2, crop_size=32, seed=5, path=tmp_path / "q.zarr"
    )
    query.obs["gene_symbol"] = query.obs["gene_symbol"].cat.rename_categories(
        lambda c: c if c == "nontargeting" else f"NEW_{c}"
    )
    latent = model.get_latent_representation(query, kind="salient")
    assert latent.shape == (100, 32)
    bigger = mcvi_ops.datasets.synthetic_screen(
        n_cells=100, n_genes=3, n_control_guides=2, crop_size=48, seed=5, path=tmp_path / "b.zarr"
    )
    with pytest.raises(ValueError, match="48x48 px"):
        model.get_latent_representation(bigger)


def test_setup_errors(screen):
    with pytest.raises(KeyError, match="perturbation_key="):
        MCVAE.setup_anndata(screen, perturbation_key="guide")
    with pytest.raises(ValueError, match="control_category="):
        MCVAE.setup_anndata(screen, perturbation_key="gene_symbol", control_category="NTC")
    with pytest.raises(KeyError, match="batch_key=None"):
        MCVAE.setup_anndata(screen, perturbation_key="gene_symbol", batch_key="lane")
    unlinked = screen.copy()
    del unlinked.uns["crops"]
    with pytest.raises(KeyError, match="link_crops"):
        MCVAE.setup_anndata(unlinked, perturbation_key="gene_symbol")
    empty = screen.copy()
    empty.obs["gene_symbol"] = empty.obs["gene_symbol"].cat.add_categories(["GHOST"])
    with pytest.raises(ValueError, match="no cells"):
        MCVAE.setup_anndata(empty, perturbation_key="gene_symbol")


def test_model_errors(screen):
    MCVAE.setup_anndata(screen, perturbation_key="gene_symbol")
    with pytest.raises(ValueError, match="`prior` must be one of"):
        MCVAE(screen, prior="learned")
    model = MCVAE(screen, **FAST_MODULE)
    with pytest.raises(ValueError, match="even number"):
        model.train(max_epochs=1, batch_size=63)
    with pytest.raises(ValueError, match="`kind` must be"):
        model.get_latent_representation(kind="z")
    with pytest.raises(ValueError, match="drop `indices`"):
        model.get_latent_representation(indices=[0], add_to_obsm=True)
    with pytest.raises(ValueError, match="same number of rows"):
        model.decode(np.zeros((2, 32)), np.zeros((3, 32)))
    with pytest.raises(ValueError, match="background and"):
        model.decode(np.zeros((2, 5)), np.zeros((2, 32)))
    with pytest.raises(KeyError, match="not among"):
        model.decode_priors(["NOPE"])


def test_bf16_mixed_precision_trains(screen):
    model = _model(screen)
    model.train(**FAST_TRAIN, precision="bf16-mixed", accelerator="cpu")
    assert np.isfinite(model.history["train_loss"].to_numpy(dtype=float)).all()
    assert model.get_latent_representation().dtype == np.float32


def test_default_max_epochs_heuristic():
    from mcvi_ops.model import default_max_epochs

    assert default_max_epochs(31_000_000) == 2
    assert default_max_epochs(10_000) > default_max_epochs(100_000) >= 2
    assert default_max_epochs(10) == 40


def test_intensity_factors(screen):
    mcvi_ops.pp.derive_covariates(screen)
    mcvi_ops.pp.estimate_intensity_factors(screen, batch_key="batch", max_cells=500)
    MCVAE.setup_anndata(
        screen,
        perturbation_key="gene_symbol",
        batch_key="batch",
        intensity_factor_key="intensity_factors",
    )
    model = MCVAE(screen, n_salient_latent=5, n_background_latent=7, **FAST_MODULE)
    dark = np.asarray(screen.uns["intensity_factors"]["dark_level"])
    np.testing.assert_allclose(model.module.dark_level.reshape(-1).numpy(), dark, rtol=1e-6)
    batch = next(iter(model._make_data_loader(adata=screen, indices=np.arange(8))))
    assert batch["intensity_factors"].shape == (8, 4)
    # the module divides each crop by its factors above the dark level
    corrected = model.module.correct_intensity(batch["X"], batch["intensity_factors"])
    expected = (batch["X"] - torch.as_tensor(dark, dtype=torch.float32).view(1, -1, 1, 1)) / batch[
        "intensity_factors"
    ].view(8, 4, 1, 1) + torch.as_tensor(dark, dtype=torch.float32).view(1, -1, 1, 1)
    torch.testing.assert_close(corrected, expected)
    model.train(**FAST_TRAIN)
    assert model.get_latent_representation(kind="salient").shape == (screen.n_obs, 5)
    screen.obsm["bad_factors"] = -screen.obsm["intensity_factors"]
    screen.uns["bad_factors"] = screen.uns["intensity_factors"]
    with pytest.raises(ValueError, match="positive, finite factors"):
        MCVAE.setup_anndata(
            screen, perturbation_key="gene_symbol", intensity_factor_key="bad_factors"
        )
    with pytest.raises(KeyError, match="estimate_intensity_factors"):
        MCVAE.setup_anndata(screen, perturbation_key="gene_symbol", intensity_factor_key="nope")
