"""read_crop_folder: per-cell crop files listed in a parquet or CSV index."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import tifffile

from mcvi_ops.data import get_crops
from mcvi_ops.io import read_crop_folder


@pytest.fixture
def crop_folder(eh_crops, tmp_path):
    """Ten real 40 px crops as TIFF (C, Y, X) and .npy files, with an index table."""
    crops = eh_crops[0][:10]
    folder = tmp_path / "crops"
    (folder / "plate1").mkdir(parents=True)
    paths = []
    for k, crop in enumerate(crops):
        name = f"plate1/cell_{k:03d}" + (".tif" if k % 2 else ".npy")
        if k % 2:
            tifffile.imwrite(folder / name, crop, photometric="minisblack")
        else:
            np.save(folder / name, crop)
        paths.append(name)
    index = pd.DataFrame(
        {"path": paths, "gene_symbol": ["nontargeting", "POLR2A"] * 5, "well": "A1"}
    )
    return folder, index, crops


def test_parquet_index_with_relative_paths(crop_folder, tmp_path, channels):
    folder, index, crops = crop_folder
    index.to_parquet(folder / "index.parquet")
    adata = read_crop_folder(
        folder / "index.parquet", tmp_path / "out", channel_names=channels, progress=False
    )
    np.testing.assert_array_equal(get_crops(adata), crops)
    assert list(adata.obs_names[:2]) == ["cell_000", "cell_001"]
    assert list(adata.obs["gene_symbol"]) == list(index["gene_symbol"])
    assert adata.obs["source_file"].iloc[3].endswith("plate1/cell_003.tif")
    assert adata.uns["crops"]["channel_names"] == channels


def test_csv_index_with_root_and_own_names(crop_folder, tmp_path, channels):
    folder, index, crops = crop_folder
    table = index.rename(columns={"path": "file"}).set_index(
        pd.Index([f"id{i}" for i in range(10)])
    )
    table.to_csv(tmp_path / "index.csv", index_label="cell_id")
    csv = pd.read_csv(tmp_path / "index.csv", index_col="cell_id")
    adata = read_crop_folder(
        csv,
        tmp_path / "out",
        channel_names=channels,
        path_key="file",
        root=folder,
        resize_to=20,
        progress=False,
    )
    assert list(adata.obs_names) == [f"id{i}" for i in range(10)]
    assert get_crops(adata).shape == (10, 3, 20, 20)


def test_bad_index_says_what_to_fix(crop_folder, tmp_path, channels):
    folder, index, _ = crop_folder
    with pytest.raises(
        KeyError, match="'file'.*columns: \\['path', 'gene_symbol', 'well'\\].*path_key="
    ):
        read_crop_folder(
            index, tmp_path / "a", channel_names=channels, path_key="file", root=folder
        )
    broken = index.copy()
    broken.loc[[2, 7], "path"] = ["plate1/gone.tif", "plate2/cell_007.tif"]
    with pytest.raises(FileNotFoundError, match="2 of 10 crop files.*gone.tif.*root="):
        read_crop_folder(broken, tmp_path / "b", channel_names=channels, root=folder)
    empty = index.copy()
    empty.loc[4, "path"] = None
    with pytest.raises(ValueError, match="1 rows of the index DataFrame have no path.*\\[4\\]"):
        read_crop_folder(empty, tmp_path / "c", channel_names=channels, root=folder)
    with pytest.raises(ValueError, match="2 channel names"):
        read_crop_folder(index, tmp_path / "d", channel_names=["DNA", "PH3"], root=folder)


# --- reliability v2: the options the messages advise exist; paths stay inside root ------------
def test_nan_pixel_is_named_and_nonfinite_zero_imports_it(crop_folder, tmp_path, channels):
    folder, index, crops = crop_folder
    bad = crops[2].astype(np.float32)
    bad[0, 3, 4] = np.nan
    np.save(folder / "plate1" / "cell_002.npy", bad)
    with pytest.raises(ValueError, match="cells 'cell_002'.*nonfinite='zero'"):
        read_crop_folder(index, tmp_path / "a", channel_names=channels, root=folder)
    adata = read_crop_folder(
        index, tmp_path / "b", channel_names=channels, root=folder, nonfinite="zero"
    )
    assert adata.uns["import_crops"]["n_nonfinite_values"] == 1
    assert get_crops(adata, ["cell_002"])[0, 0, 3, 4] == 0


def test_truncated_file_is_named_and_on_error_skip_leaves_it_out(crop_folder, tmp_path, channels):
    folder, index, _ = crop_folder
    for name in ("cell_004.npy", "cell_005.tif"):
        data = (folder / "plate1" / name).read_bytes()
        (folder / "plate1" / name).write_bytes(data[: len(data) // 3])
    with pytest.raises(OSError, match="cell_004.npy.*truncated.*on_error='skip'"):
        read_crop_folder(index, tmp_path / "a", channel_names=channels, root=folder)
    adata = read_crop_folder(
        index, tmp_path / "b", channel_names=channels, root=folder, on_error="skip"
    )
    assert adata.n_obs == 8 and "cell_004" not in adata.obs_names
    assert len(adata.uns["import_crops"]["skipped_files"]) == 2


def test_relative_paths_cannot_leave_root(crop_folder, tmp_path, channels):
    folder, index, _ = crop_folder
    outside = tmp_path / "secret.npy"
    np.save(outside, np.zeros((3, 40, 40), np.uint8))
    escaping = index.copy()
    escaping.loc[3, "path"] = "plate1/../../secret.npy"
    with pytest.raises(ValueError, match="secret.npy.*outside its folder.*root="):
        read_crop_folder(escaping, tmp_path / "a", channel_names=channels, root=folder)
    # the same file named by its absolute path is read as given
    escaping.loc[3, "path"] = str(outside)
    assert read_crop_folder(escaping, tmp_path / "b", channel_names=channels, root=folder).n_obs
