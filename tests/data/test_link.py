from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest

from mcvi_ops.data import get_crops, link_crops, linked_store, write_crops


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
