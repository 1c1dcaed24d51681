"""Query data and stores that changed: refused with a clear error, or converted on request."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import zarr

from mcvi_ops import MCVAE
from mcvi_ops.data import link_crops, linked_store, write_crops
from mcvi_ops.data._link import StoreChangedError

from .conftest import FAST_MODULE


@pytest.fixture
def model(screen):
    MCVAE.setup_anndata(screen, perturbation_key="gene_symbol")
    model = MCVAE(screen, **FAST_MODULE)
    model.is_trained_ = True  # the checks do not depend on training
    return model


def _relinked(screen, tmp_path, crops, name):
    path = tmp_path / name
    write_crops(path, crops, channel_names=linked_store(screen).channel_names)
    query = screen.copy()
    link_crops(query, path)
    return query


@pytest.mark.parametrize(
    "convert, match",
    [
        (lambda c: (c >> 8).astype(np.uint8), "uint8 but the model was trained on uint16"),
        (lambda c: (c / 65535).astype(np.float32), "float32 but the model was trained on uint16"),
    ],
)
def test_query_of_another_type_or_scale_is_refused(model, screen, tmp_path, convert, match):
    crops = linked_store(screen).to_numpy()
    query = _relinked(screen, tmp_path, convert(crops), "query.zarr")
    with pytest.raises(ValueError, match=f"{match}.*setup_query.*intensity='rescale'"):
        model.get_latent_representation(query)


def test_query_rescaled_on_request_embeds_like_the_training_crops(model, screen, tmp_path):
    crops = linked_store(screen).to_numpy()
    expected = model.get_latent_representation(kind="background")
    query = _relinked(screen, tmp_path, (crops / 65535).astype(np.float32), "unit.zarr")
    query = model.setup_query(query, intensity="rescale")
    rescaled = model.get_latent_representation(query, kind="background")
    np.testing.assert_allclose(rescaled, expected, rtol=1e-3, atol=1e-3)
    # what the check prevents: [0, 1] floats taken as they are become near-constant embeddings
    as_is = _relinked(screen, tmp_path, (crops / 65535).astype(np.float32), "as_is.zarr")
    as_is = model.setup_query(as_is, intensity="as_is")
    constant = model.get_latent_representation(as_is, kind="background")
    assert constant.std(axis=0).mean() < 0.1 * expected.std(axis=0).mean()


def _replace_store(screen, screen_path):
    """The same path, other crops (e.g. an extraction rerun): a new store identifier."""
    store = linked_store(screen)
    write_crops(
        screen_path,
        store.to_numpy()[::-1].copy(),
        channel_names=store.channel_names,
        overwrite=True,
    )


def test_store_replaced_after_setup_is_refused(model, screen, screen_path):
    _replace_store(screen, screen_path)
    with pytest.raises(StoreChangedError, match="replaced after"):
        model.get_latent_representation()
    with pytest.raises(StoreChangedError, match="replaced after"):
        model.train(max_epochs=1, batch_size=64, enable_progress_bar=False)


def test_store_shrunk_after_setup_gives_a_clear_error(model, screen, screen_path):
    group = zarr.open_group(str(screen_path), mode="r+")
    group["crops"].resize((300, *group["crops"].shape[1:]))
    group.attrs["n_cells"] = 300
    for action in (
        lambda: model.train(max_epochs=1, batch_size=64, enable_progress_bar=False),
        lambda: model.get_latent_representation(),
    ):
        with pytest.raises(StoreChangedError, match="holds 300 crops.*shrank"):
            action()


def test_load_refuses_a_store_replaced_behind_the_anndata(
    model, screen, screen_path, tmp_path, caplog
):
    model.save(tmp_path / "model")
    _replace_store(screen, screen_path)
    with pytest.raises(StoreChangedError, match="replaced after adata was linked"):
        MCVAE.load(tmp_path / "model", screen)
    # relinked on purpose: loads, with a warning that the crops are not the trained ones
    link_crops(screen, screen_path)
    with caplog.at_level(logging.WARNING, logger="mcvi_ops"):
        MCVAE.load(tmp_path / "model", screen)
    assert "rewritten since the model was trained" in caplog.text


# --- reliability v2: query data as users have it ----------------------------------------------
@pytest.fixture
def batch_model(screen):
    """A model set up with a batch and intensity factors (untrained: the checks do not need it)."""
    import mcvi_ops

    mcvi_ops.pp.estimate_intensity_factors(screen, batch_key="well")
    MCVAE.setup_anndata(
        screen,
        perturbation_key="gene_symbol",
        batch_key="well",
        intensity_factor_key="intensity_factors",
    )
    model = MCVAE(screen, **FAST_MODULE)
    model.is_trained_ = True
    return model


def _query(screen, edit):
    query = screen.copy()
    for key in [k for k in query.uns if k.startswith("_scvi")]:
        del query.uns[key]
    edit(query)
    return query


def _set(column, values):
    def edit(query):
        query.obs[column] = values(query.obs[column].astype(object).copy())

    return edit


def _nan_first(values):
    values.iloc[:7] = np.nan
    return values


def _unseen_first(values):
    values.iloc[:7] = "NEVER_SEEN"
    return values


@pytest.mark.parametrize(
    "edit",
    [
        lambda q: q.obs.drop(columns="gene_symbol", inplace=True),
        _set("gene_symbol", _nan_first),
        _set("gene_symbol", _unseen_first),
        _set("gene_symbol", lambda v: v.astype("category").cat.codes.astype(int)),
        lambda q: q.obs.drop(columns="well", inplace=True),
        _set("well", _nan_first),
        _set("well", _unseen_first),
    ],
    ids=[
        "no perturbation column",
        "NaN perturbation",
        "unseen perturbation",
        "integer labels",
        "no batch column",
        "NaN batch",
        "unseen batch",
    ],
)
def test_query_cells_without_usable_labels_are_embedded(batch_model, screen, edit):
    """The encoders read neither perturbation nor batch: such cells embed like labelled ones."""
    expected = batch_model.get_latent_representation()
    query = _query(screen, edit)
    np.testing.assert_allclose(batch_model.get_latent_representation(query), expected, atol=1e-6)


def test_read_back_copy_and_zero_cells(batch_model, screen, tmp_path):
    expected = batch_model.get_latent_representation()
    screen.write_h5ad(tmp_path / "screen.h5ad")
    import anndata as ad

    again = ad.read_h5ad(tmp_path / "screen.h5ad")
    np.testing.assert_allclose(batch_model.get_latent_representation(again), expected, atol=1e-6)
    for empty in (
        batch_model.get_latent_representation(screen[:0].copy(), add_to_obsm=False),
        batch_model.get_latent_representation(indices=[]),
        batch_model.get_latent_representation(screen[:0], kind="salient"),
    ):
        assert empty.shape[0] == 0 and empty.shape[1] in (32, 64)
    none = screen[:0].copy()
    batch_model.get_latent_representation(none, add_to_obsm=True)
    assert none.obsm["X_mcvae"].shape == (0, 64)


def test_query_intensity_factors_are_checked_as_at_setup(batch_model, screen):
    query = _query(screen, lambda q: q.obsm.pop("intensity_factors"))
    with pytest.raises(KeyError, match="cells to embed need them too.*estimate_intensity_factors"):
        batch_model.get_latent_representation(query)

    def poison(q):
        factors = q.obsm["intensity_factors"].copy()
        factors[0, 0], factors[5, 1] = 0.0, np.inf
        q.obsm["intensity_factors"] = factors

    with pytest.raises(ValueError, match=r"positive, finite.*1 non-finite and 1 non-positive"):
        batch_model.get_latent_representation(_query(screen, poison))


def test_reconstruction_and_training_need_known_labels(batch_model, screen, tmp_path):
    query = _query(screen, lambda q: q.obs.drop(columns="well", inplace=True))
    assert batch_model.get_latent_representation(query).shape == (screen.n_obs, 64)
    with pytest.raises(ValueError, match=r"360 cells have no batch the model knows.*'well'"):
        batch_model.get_reconstruction(query)
    assert batch_model.get_reconstruction(screen, indices=[0, 1]).shape[0] == 2
    # a model loaded with unlabelled cells embeds them, but cannot train on them
    batch_model.save(tmp_path / "model")
    unlabelled = _query(screen, _set("gene_symbol", _nan_first))
    loaded = MCVAE.load(tmp_path / "model", unlabelled)
    assert loaded.get_latent_representation().shape == (screen.n_obs, 64)
    with pytest.raises(ValueError, match="7 of 360 cells have no perturbation the model"):
        loaded.train(max_epochs=1, batch_size=64, enable_progress_bar=False)


def test_setup_refuses_missing_labels_and_matches_integer_controls(screen):
    nan_batch = screen.copy()
    nan_batch.obs["well"] = _nan_first(nan_batch.obs["well"].astype(object))
    with pytest.raises(ValueError, match=r"'well'\] has 7 missing \(NaN\) values.*batch"):
        MCVAE.setup_anndata(nan_batch, perturbation_key="gene_symbol", batch_key="well")
    coded = screen.copy()
    codes = coded.obs["gene_symbol"].astype("category")
    control_code = int(list(codes.cat.categories).index("nontargeting"))
    coded.obs["gene_symbol"] = codes.cat.codes.astype(int)
    # the command line passes the control as text; it matches the integer category
    MCVAE.setup_anndata(coded, perturbation_key="gene_symbol", control_category=str(control_code))
    model = MCVAE(coded, **FAST_MODULE)
    assert model.get_perturbation_priors().index[0] == control_code
