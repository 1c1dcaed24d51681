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
