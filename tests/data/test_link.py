from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest

from mcvi_ops.data import CropWriter, get_crops, link_crops, linked_store, write_crops
from mcvi_ops.data._link import StoreChangedError
from mcvi_ops.data._store import IncompleteStoreError


def test_default_link_ties_row_i_to_crop_i(make_linked):
    adata, crops = make_linked()
    assert adata.obs["crop_index"].tolist() == list(range(adata.n_obs))
    reference = adata.uns["crops"]
    assert reference["index_key"] == "crop_index"
    assert reference["channel_names"] == ["DAPI", "tubulin"]
    assert list(reference["crop_size"]) == [16, 16]
    np.testing.assert_array_equal(get_crops(adata, [3, 0, 3]), crops[[3, 0, 3]])
    np.testing.assert_array_equal(get_crops(adata, ["cell7", "cell2"]), crops[[7, 2]])
    np.testing.assert_array_equal(get_crops(adata, 5), crops[[5]])
    np.testing.assert_array_equal(get_crops(adata), crops)
    mask = np.zeros(adata.n_obs, dtype=bool)
    mask[[1, 9]] = True
    np.testing.assert_array_equal(get_crops(adata, mask), crops[[1, 9]])


def test_custom_index_column_and_subsets(make_linked):
    adata, crops = make_linked()
    reordered = adata[::-1].copy()
    reordered.obs["my_index"] = reordered.obs["crop_index"].to_numpy()
    link_crops(reordered, linked_store(adata), index_key="my_index")
    np.testing.assert_array_equal(get_crops(reordered, [0, 1]), crops[[-1, -2]])
    # a view keeps its link
    subset = adata[[4, 8]]
    np.testing.assert_array_equal(get_crops(subset), crops[[4, 8]])


@pytest.mark.parametrize("fmt", ["h5ad", "zarr"])
def test_link_survives_round_trip(make_linked, tmp_path, fmt):
    adata, crops = make_linked()
    if fmt == "h5ad":
        adata.write_h5ad(tmp_path / "a.h5ad")
        back = ad.read_h5ad(tmp_path / "a.h5ad")
    else:
        adata.write_zarr(tmp_path / "a.anndata.zarr")
        back = ad.read_zarr(tmp_path / "a.anndata.zarr")
    np.testing.assert_array_equal(get_crops(back, [2, 11]), crops[[2, 11]])


def test_link_errors(make_linked, tmp_path):
    adata, crops = make_linked()
    store = linked_store(adata)
    other = ad.AnnData(obs=pd.DataFrame(index=[f"c{i}" for i in range(5)]))
    with pytest.raises(ValueError, match="index_key="):
        link_crops(other, store)
    with pytest.raises(KeyError, match="not found in adata.obs"):
        link_crops(other, store, index_key="missing")
    other.obs["idx"] = [0, 1, 2, 3, 999]
    with pytest.raises(IndexError, match="crop index 999"):
        link_crops(other, store, index_key="idx")
    other.obs["idx"] = [0.0, 1.5, 2, 3, 4]
    with pytest.raises(ValueError, match="non-integer"):
        link_crops(other, store, index_key="idx")
    other.obs["idx"] = ["a"] * 5
    with pytest.raises(TypeError, match="integer crop indices"):
        link_crops(other, store, index_key="idx")
    unlinked = ad.AnnData(obs=pd.DataFrame(index=["a"]))
    with pytest.raises(KeyError, match="link_crops"):
        get_crops(unlinked, [0])
    with pytest.raises(KeyError, match="not in adata.obs_names"):
        get_crops(adata, ["nope"])


def test_link_to_in_memory_store(rng):
    crops = rng.integers(0, 10, (6, 1, 4, 4), dtype=np.uint16)
    store = write_crops("memory://link-test.zarr", crops, channel_names=["DAPI"])
    adata = ad.AnnData(obs=pd.DataFrame(index=list("abcdef")))
    link_crops(adata, store.url)
    np.testing.assert_array_equal(get_crops(adata, ["f"]), crops[[5]])


def test_link_records_the_store_id(make_linked):
    adata, _ = make_linked()
    assert adata.uns["crops"]["store_id"] == linked_store(adata).store_id


def test_replaced_store_is_refused_until_relinked(make_linked, tmp_path):
    adata, crops = make_linked()
    old_id = adata.uns["crops"]["store_id"]
    # someone writes other crops to the same path
    new = write_crops(
        tmp_path / "crops.zarr",
        crops[::-1].copy(),
        channel_names=["DAPI", "tubulin"],
        overwrite=True,
    )
    pattern = rf"was replaced.*{old_id}.*{new.store_id}.*link_crops\(adata, .*crops.zarr"
    with pytest.raises(StoreChangedError, match=pattern):
        linked_store(adata)
    with pytest.raises(StoreChangedError, match="was replaced"):
        get_crops(adata, [0])
    link_crops(adata, new, index_key="crop_index")  # the fix the message names
    np.testing.assert_array_equal(get_crops(adata, [0]), crops[[-1]])


def test_shrunk_store_is_refused(make_linked, tmp_path):
    adata, crops = make_linked()
    del adata.uns["crops"]["store_id"]  # a link made before stores had ids
    write_crops(
        tmp_path / "crops.zarr", crops[:10], channel_names=["DAPI", "tubulin"], overwrite=True
    )
    with pytest.raises(StoreChangedError, match=r"holds 10 crops.*index 39 \(it held 40.*shrank"):
        get_crops(adata, [0])
    # a subset that only uses surviving crops still reads
    np.testing.assert_array_equal(get_crops(adata[:5].copy(), [4]), crops[[4]])


def test_incomplete_store_cannot_be_linked(tmp_path, rng):
    writer = CropWriter(tmp_path / "a.zarr", n_channels=1, crop_size=4, channel_names=["DAPI"])
    writer.append(rng.integers(0, 9, (3, 1, 4, 4), dtype=np.uint16))
    adata = ad.AnnData(obs=pd.DataFrame(index=list("abc")))
    with pytest.raises(IncompleteStoreError, match="incomplete"):
        link_crops(adata, tmp_path / "a.zarr")
    with pytest.raises(IncompleteStoreError, match="Cannot link.*incomplete"):
        link_crops(adata, writer.store)
    writer.close()
    link_crops(adata, tmp_path / "a.zarr")
