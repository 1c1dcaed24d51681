from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import tifffile

from mcvi_ops.data import get_crops
from mcvi_ops.io import crops_from_array, crops_from_files


@pytest.fixture(scope="module")
def real_crops(eh):
    """Real 3-channel 40 px crops around ExampleHuman nuclei (own 'segmentation')."""
    image, cells = eh
    rows = np.floor(cells["Nuclei_Location_Center_Y"].to_numpy() + 0.5).astype(int)
    cols = np.floor(cells["Nuclei_Location_Center_X"].to_numpy() + 0.5).astype(int)
    ok = (rows >= 20) & (cols >= 20) & (rows <= 492) & (cols <= 492)
    crops = np.stack(
        [
            image[:, r - 20 : r + 20, c - 20 : c + 20]
            for r, c in zip(rows[ok], cols[ok], strict=True)
        ]
    )
    return crops[:50], cells[ok].iloc[:50].reset_index(drop=True)


def test_crops_from_array_first_and_last(real_crops, tmp_path, channels):
    crops, cells = real_crops
    adata = crops_from_array(crops, tmp_path / "a", channel_names=channels, obs=cells)
    np.testing.assert_array_equal(get_crops(adata), crops)
    assert list(adata.obs["Metadata_ObjectNumber"]) == list(cells["Metadata_ObjectNumber"])
    assert adata.uns["import_crops"]["source"] == "array"
    last = crops_from_array(
        crops.transpose(0, 2, 3, 1), tmp_path / "b", channel_names=channels, channel_axis="last"
    )
    np.testing.assert_array_equal(get_crops(last), crops)
    on_disk = ad.read_h5ad(tmp_path / "b" / "cells.h5ad")
    np.testing.assert_array_equal(get_crops(on_disk, [3]), crops[[3]])


def test_crops_from_array_resize_and_errors(real_crops, tmp_path, channels):
    crops, cells = real_crops
    adata = crops_from_array(crops, tmp_path / "a", channel_names=channels, resize_to=16)
    small = get_crops(adata)
    assert small.shape == (50, 3, 16, 16)
    assert small.dtype == np.uint16
    with pytest.raises(ValueError, match="2 channel names.*channel_axis"):
        crops_from_array(crops, tmp_path / "b", channel_names=["DNA", "PH3"])
    with pytest.raises(ValueError, match="obs has 3 rows but there are 50 crops"):
        crops_from_array(crops, tmp_path / "c", channel_names=channels, obs=cells.iloc[:3])
    with pytest.raises(FileExistsError, match="overwrite=True"):
        crops_from_array(crops, tmp_path / "a", channel_names=channels)


def test_crops_from_files_folder(real_crops, tmp_path, channels):
    crops, _ = real_crops
    folder = tmp_path / "crops"
    folder.mkdir()
    for i, crop in enumerate(crops[:20]):
        if i % 2:
            tifffile.imwrite(folder / f"cell_{i:03d}.tif", crop, photometric="minisblack")
        else:
            np.save(folder / f"cell_{i:03d}.npy", crop)
    (folder / "notes.txt").write_text("not a crop")
    adata = crops_from_files(folder, tmp_path / "out", channel_names=channels, progress=False)
    assert list(adata.obs_names) == [f"cell_{i:03d}" for i in range(20)]
    assert adata.obs["source_file"].iloc[1].endswith("cell_001.tif")
    np.testing.assert_array_equal(get_crops(adata), crops[:20])
    # a list of paths keeps its order; obs may be given
    paths = [folder / "cell_005.tif", folder / "cell_002.npy"]
    obs = pd.DataFrame({"gene": ["A", "B"]}, index=["x", "y"])
    listed = crops_from_files(
        paths, tmp_path / "out2", channel_names=channels, obs=obs, progress=False
    )
    np.testing.assert_array_equal(get_crops(listed), crops[[5, 2]])
    assert list(listed.obs["gene"]) == ["A", "B"]


def test_crops_from_files_size_mismatch(real_crops, tmp_path, channels):
    crops, _ = real_crops
    folder = tmp_path / "crops"
    folder.mkdir()
    np.save(folder / "a.npy", crops[0])
    np.save(folder / "b.npy", crops[1][:, :30, :30])
    with pytest.raises(ValueError, match=r"b.npy.*resize_to="):
        crops_from_files(folder, tmp_path / "out", channel_names=channels, progress=False)
    adata = crops_from_files(
        folder, tmp_path / "out2", channel_names=channels, resize_to=24, progress=False
    )
    assert get_crops(adata).shape == (2, 3, 24, 24)
