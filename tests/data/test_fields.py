from __future__ import annotations

import pickle
import shutil

import numpy as np
import pytest
from scvi.data import AnnDataManager
from scvi.data.fields import CategoricalObsField

from mcvi_ops.data import ImageField, link_crops, linked_store
from mcvi_ops.data._fields import PerturbationField


def _manager(index_key="crop_index"):
    return AnnDataManager(
        fields=[
            ImageField("crops", index_key=index_key),
            CategoricalObsField("labels", "gene_symbol"),
        ]
    )


def test_register_records_layout(make_linked):
    adata, _ = make_linked(n=40, channels=("DAPI", "tubulin", "gH2AX"), size=12)
    manager = _manager()
    manager.register_fields(adata)
    stats = manager.summary_stats
    assert (stats.n_channels, stats.crop_height, stats.crop_width) == (3, 12, 12)
    state = manager.get_state_registry("crops")
    assert list(state.channel_names) == ["DAPI", "tubulin", "gH2AX"]
    assert state.n_crops == 40
    assert state.dtype == "uint16"
    np.testing.assert_array_equal(manager.get_from_registry("crops").reshape(-1), np.arange(40))
    # field state is plain data, so it pickles into saved models
    pickle.loads(pickle.dumps(manager.registry))
    manager.view_registry()


def test_transfer_to_query_data(make_linked):
    adata, _ = make_linked(n=40, name="ref.zarr")
    query, _ = make_linked(n=20, name="query.zarr", seed=1)
    manager = _manager()
    manager.register_fields(adata)
    query_manager = manager.transfer_fields(query)
    assert query_manager.get_state_registry("crops").n_crops == 20


def test_transfer_rejects_other_channels_or_size(make_linked):
    adata, _ = make_linked(n=30, name="ref.zarr")
    manager = _manager()
    manager.register_fields(adata)
    other_channels, _ = make_linked(n=30, channels=("DAPI", "actin"), name="ch.zarr")
    with pytest.raises(ValueError, match=r"channels \['DAPI', 'actin'\].*same channels"):
        manager.transfer_fields(other_channels)
    other_size, _ = make_linked(n=30, size=20, name="size.zarr")
    with pytest.raises(ValueError, match="20x20 px.*16x16 px"):
        manager.transfer_fields(other_size)


def test_validation_errors(make_linked, tmp_path):
    adata, _ = make_linked(n=30)
    unlinked = adata.copy()
    del unlinked.uns["crops"]
    with pytest.raises(KeyError, match="not linked to crops"):
        _manager().register_fields(unlinked)
    with pytest.raises(ValueError, match="index_key='crop_index'"):
        _manager(index_key="other").register_fields(adata.copy())
    bad = adata.copy()
    bad.obs["crop_index"] = np.arange(30) + 5
    with pytest.raises(IndexError, match="outside the store's range"):
        _manager().register_fields(bad)
    missing_column = adata.copy()
    del missing_column.obs["crop_index"]
    with pytest.raises(KeyError, match="missing from adata.obs"):
        _manager().register_fields(missing_column)
    moved = adata.copy()
    shutil.rmtree(tmp_path / "crops.zarr")
    with pytest.raises(FileNotFoundError, match="relink"):
        _manager().register_fields(moved)


def test_survives_relink_after_move(make_linked, tmp_path):
    adata, crops = make_linked(n=30)
    shutil.move(tmp_path / "crops.zarr", tmp_path / "moved.zarr")
    link_crops(adata, tmp_path / "moved.zarr", index_key="crop_index")
    manager = _manager()
    manager.register_fields(adata)
    np.testing.assert_array_equal(linked_store(adata)[[1]], crops[[1]])


@pytest.mark.parametrize("categorical", [False, True])
def test_perturbation_field_puts_control_first(make_linked, categorical):
    adata, _ = make_linked(n=30)
    adata.obs["gene_symbol"] = np.where(np.arange(30) % 3 == 0, "zz_control", "AAA")
    if categorical:  # an existing categorical keeps its own category order otherwise
        adata.obs["gene_symbol"] = adata.obs["gene_symbol"].astype("category")
    manager = AnnDataManager(
        fields=[PerturbationField("perturbation", "gene_symbol", control_category="zz_control")]
    )
    manager.register_fields(adata)
    codes = manager.get_from_registry("perturbation").reshape(-1)
    assert list(manager.get_state_registry("perturbation").categorical_mapping) == [
        "zz_control",
        "AAA",
    ]
    np.testing.assert_array_equal(codes == 0, np.arange(30) % 3 == 0)


def test_perturbation_field_errors(make_linked):
    adata, _ = make_linked(n=30)

    def register(data, key="gene_symbol", control="nontargeting"):
        field = PerturbationField("perturbation", key, control_category=control)
        AnnDataManager(fields=[field]).register_fields(data)

    with pytest.raises(KeyError, match="perturbation_key="):
        register(adata.copy(), key="sgRNA")
    with pytest.raises(ValueError, match="control_category="):
        register(adata.copy(), control="NTC")
    unused = adata.copy()
    unused.obs["gene_symbol"] = unused.obs["gene_symbol"].astype("category")
    unused.obs["gene_symbol"] = unused.obs["gene_symbol"].cat.add_categories(["EMPTY"])
    with pytest.raises(ValueError, match="remove_unused_categories"):
        register(unused)
    only_controls = adata[adata.obs["gene_symbol"] == "nontargeting"].copy()
    with pytest.raises(ValueError, match="only the control category"):
        register(only_controls)


def _linked(tmp_path, crops, name):
    import anndata as ad
    import pandas as pd

    from mcvi_ops.data import write_crops

    store = write_crops(tmp_path / name, crops, channel_names=["DAPI", "tubulin"], chunk_cells=16)
    obs = pd.DataFrame(
        {"gene_symbol": np.where(np.arange(len(crops)) % 3 == 0, "nontargeting", "GENE1")},
        index=[f"{name}{i}" for i in range(len(crops))],
    )
    adata = ad.AnnData(obs=obs)
    link_crops(adata, store)
    return adata


def test_state_records_store_identity_and_intensity_range(make_linked):
    adata, crops = make_linked(n=40)
    manager = _manager()
    manager.register_fields(adata)
    state = manager.get_state_registry("crops")
    assert state.store_id == linked_store(adata).store_id
    low, high = np.percentile(crops.transpose(1, 0, 2, 3).reshape(2, -1), [0.1, 99.9], axis=1)
    np.testing.assert_allclose(np.asarray(state.intensity_range), np.c_[low, high], rtol=0.02)
    pickle.loads(pickle.dumps(manager.registry))  # still plain data


def test_store_replaced_behind_anndata_is_refused_at_setup(make_linked, tmp_path):
    from mcvi_ops.data import write_crops
    from mcvi_ops.data._link import StoreChangedError

    adata, crops = make_linked(n=40)
    # same path, other crops (e.g. extraction rerun): a new store identifier
    write_crops(
        tmp_path / "crops.zarr",
        crops[::-1].copy(),
        channel_names=["DAPI", "tubulin"],
        overwrite=True,
    )
    with pytest.raises(StoreChangedError, match="replaced after adata was linked"):
        _manager().register_fields(adata)


@pytest.mark.parametrize(
    "convert, match",
    [
        (lambda c: (c // 16).astype(np.uint8), r"uint8 but the model was trained on uint16"),
        (
            lambda c: (c / 4000.0).astype(np.float32),
            r"float32 but .*channels \['DAPI', 'tubulin'\]",
        ),
        (lambda c: (c // 40).astype(np.uint16), r"another intensity scale.*\[0, 99\]"),
    ],
)
def test_transfer_refuses_another_pixel_type_or_scale(make_linked, tmp_path, convert, match):
    adata, _ = make_linked(n=40)
    manager = _manager()
    manager.register_fields(adata)
    rng = np.random.default_rng(3)
    query = _linked(tmp_path, convert(rng.integers(0, 4000, (30, 2, 16, 16))), "q.zarr")
    with pytest.raises(ValueError, match=match) as info:
        manager.transfer_fields(query)
    assert "intensity='rescale'" in str(info.value)


def test_transfer_rescales_or_accepts_as_is_on_request(make_linked, tmp_path):
    adata, crops = make_linked(n=40)
    manager = _manager()
    manager.register_fields(adata)
    query = _linked(tmp_path, (crops / 4000.0).astype(np.float32), "unit.zarr")
    state = manager.transfer_fields(query, intensity="rescale").get_state_registry("crops")
    scale, offset = np.asarray(state.intensity_map).T
    np.testing.assert_allclose(scale, 4000.0, rtol=1e-3)
    np.testing.assert_allclose(offset, 0.0, atol=1.0)
    state = manager.transfer_fields(query, intensity="as_is").get_state_registry("crops")
    assert "intensity_map" not in state
    # the same scale in another pixel type is still a choice the user makes explicitly
    same_scale = _linked(tmp_path, crops.astype(np.float32), "float.zarr")
    with pytest.raises(ValueError, match="float32 but the model was trained on uint16"):
        manager.transfer_fields(same_scale)
    with pytest.raises(ValueError, match="'check', 'rescale' or 'as_is'"):
        manager.transfer_fields(query, intensity="auto")


def test_registries_of_older_versions_still_transfer(make_linked, tmp_path):
    adata, _ = make_linked(n=40)
    manager = _manager()
    manager.register_fields(adata)
    old = manager.get_state_registry("crops")
    for key in ("store_id", "intensity_range"):
        del manager.registry["field_registries"]["crops"]["state_registry"][key]
    query, _ = make_linked(n=20, name="query.zarr", seed=1)
    assert manager.transfer_fields(query).get_state_registry("crops").n_crops == 20
    manager.view_registry()
    assert old.dtype == "uint16"
