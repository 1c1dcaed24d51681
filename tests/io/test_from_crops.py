from __future__ import annotations

import anndata as ad
import h5py
import numpy as np
import pandas as pd
import pytest
import tifffile
import zarr

from mcvi_ops.data import get_crops
from mcvi_ops.data._images import UnreadableImageError
from mcvi_ops.io import crops_from_array, crops_from_files


@pytest.fixture(scope="module")
def real_crops(eh_crops):
    """The first 50 real 40 px ExampleHuman crops and their cell table rows."""
    crops, cells = eh_crops
    return crops[:50], cells.iloc[:50]


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


def test_crops_from_array_nonfinite(real_crops, tmp_path, channels):
    crops, cells = real_crops
    bad = crops.astype(np.float32)
    bad[[3, 40], 1, 5, 5] = np.nan
    obs = cells.set_index("Metadata_ObjectNumber")
    names = [str(obs.index[3]), str(obs.index[40])]
    with pytest.raises(ValueError, match=rf"2 crops hold NaN.*'{names[0]}', '{names[1]}'"):
        crops_from_array(bad, tmp_path / "a", channel_names=channels, obs=obs)
    adata = crops_from_array(bad, tmp_path / "b", channel_names=channels, obs=obs, nonfinite="zero")
    info = adata.uns["import_crops"]
    assert (info["n_nonfinite_values"], info["n_nonfinite_cells"]) == (2, 2)
    assert get_crops(adata, names)[:, 1, 5, 5].tolist() == [0, 0]


def test_crops_from_array_never_clips_or_renames(real_crops, tmp_path, channels):
    crops, cells = real_crops
    high = crops.astype(np.float32)
    high[7, 0, 0, 0] = 70_000
    span = r"span \[.*, 70000\.0\], outside the uint16 range \[0, 65535\]\. Rescale them or "
    with pytest.raises(ValueError, match=span + "write float32 crops"):
        crops_from_array(high, tmp_path / "a", channel_names=channels, dtype="uint16")
    with pytest.raises(ValueError, match=span + "pass dtype='float32'"):  # checked before resizing
        crops_from_array(high, tmp_path / "b", channel_names=channels, dtype="uint16", resize_to=20)
    with pytest.raises(ValueError, match="got the string 'DNA'"):
        crops_from_array(crops[:, :1], tmp_path / "c", channel_names="DNA")
    wide = crops.astype(np.int64)
    wide[2] += 2**24
    with pytest.raises(ValueError, match=r"int64 crops hold values above 2\*\*24.*cells '2'"):
        crops_from_array(wide, tmp_path / "d", channel_names=channels)
    obs = cells.set_index(pd.Index(["x"] * 2 + [f"c{i}" for i in range(48)]))
    with pytest.warns(UserWarning, match=r"duplicate cell ids, e.g. \['x'\]"):
        adata = crops_from_array(crops, tmp_path / "e", channel_names=channels, obs=obs)
    assert list(adata.obs_names[:3]) == ["x", "x-1", "c0"]


def test_crops_from_files_skips_a_corrupt_file(real_crops, tmp_path, channels, caplog):
    crops, _ = real_crops
    folder = tmp_path / "crops"
    folder.mkdir()
    for i in range(6):
        tifffile.imwrite(folder / f"cell_{i}.tif", crops[i], photometric="minisblack")
    broken = folder / "cell_0.tif"
    broken.write_bytes(broken.read_bytes()[:300])
    with pytest.raises(UnreadableImageError, match=r"cell_0.tif.*corrupt or truncated"):
        crops_from_files(folder, tmp_path / "a", channel_names=channels, progress=False)
    adata = crops_from_files(
        folder, tmp_path / "b", channel_names=channels, on_error="skip", progress=False
    )
    assert list(adata.obs_names) == [f"cell_{i}" for i in range(1, 6)]
    assert adata.uns["import_crops"]["skipped_files"] == [str(broken)]
    np.testing.assert_array_equal(get_crops(adata), crops[1:6])
    assert "Skipping crop file" in caplog.text


class CountingDataset:
    """An h5py dataset that records the key of every read."""

    def __init__(self, dataset: h5py.Dataset) -> None:
        self.dataset, self.reads = dataset, []
        self.shape, self.dtype, self.ndim = dataset.shape, dataset.dtype, dataset.ndim

    def __getitem__(self, key):
        self.reads.append(key)
        return self.dataset[key]


def test_crops_from_array_reads_lazy_arrays_chunk_by_chunk(real_crops, tmp_path, channels):
    crops, _ = real_crops
    with h5py.File(tmp_path / "crops.h5", "w") as handle:
        handle["crops"] = crops.transpose(0, 2, 3, 1)
    with h5py.File(tmp_path / "crops.h5", "r") as handle:
        counting = CountingDataset(handle["crops"])
        adata = crops_from_array(
            counting,
            tmp_path / "h5",
            channel_names=channels,
            channel_axis="last",
            chunk_cells=16,
            progress=False,
        )
        direct = crops_from_array(
            handle["crops"], tmp_path / "h5py", channel_names=channels, channel_axis="last"
        )
    # one read per store chunk, never the whole dataset
    assert counting.reads == [slice(0, 16), slice(16, 32), slice(32, 48), slice(48, 64)]
    np.testing.assert_array_equal(get_crops(adata), crops)
    np.testing.assert_array_equal(get_crops(direct), crops)
    lazy_arrays = {"zarr": zarr.array(crops, chunks=(7, 3, 40, 40))}
    try:  # dask comes with the optional `distributed` extra
        import dask.array as da
    except ImportError:
        pass
    else:
        lazy_arrays["dask"] = da.from_array(crops, chunks=(9, 3, 40, 40))
    for name, lazy in lazy_arrays.items():
        stored = crops_from_array(lazy, tmp_path / name, channel_names=channels, progress=False)
        np.testing.assert_array_equal(get_crops(stored), crops)
    one = crops_from_array(
        zarr.array(crops[:, 1]), tmp_path / "one", channel_names=["PH3"], progress=False
    )
    np.testing.assert_array_equal(get_crops(one), crops[:, 1:2])


def test_pandas_string_columns_are_written(real_crops, tmp_path, channels):
    """pandas 3 makes text columns string arrays, which anndata writes only when told to."""
    crops, _ = real_crops
    text = pd.StringDtype(na_value=np.nan)  # pandas 3's default "str" dtype
    obs = pd.DataFrame(
        {
            "gene": pd.array(["A", "B"] * 25, dtype="string"),
            "barcode": pd.array([f"bc{i}" for i in range(50)], dtype=text),
        },
        index=pd.Index([f"c{i}" for i in range(50)], dtype=text),
    )
    crops_from_array(crops, tmp_path / "a", channel_names=channels, obs=obs, progress=False)
    back = ad.read_h5ad(tmp_path / "a" / "cells.h5ad")
    assert list(back.obs_names) == list(obs.index)
    assert list(back.obs["barcode"]) == list(obs["barcode"])
    assert list(back.obs["gene"]) == list(obs["gene"])


def test_fractional_float_crops_are_never_rounded_into_an_integer_store(
    real_crops, tmp_path, channels
):
    crops = real_crops[0][:8]
    fractional = crops.astype(np.float32) / 255  # [0, 1]: uint16 would make them 0/1
    for resize_to in (None, 20):
        with pytest.raises(ValueError, match="fractional.*dtype='float32'"):
            crops_from_array(
                fractional,
                tmp_path / f"a{resize_to}",
                channel_names=channels,
                dtype="uint16",
                resize_to=resize_to,
                progress=False,
            )
    # whole-number floats are exact in uint16; integer crops resized for uint16 are rounded back
    whole = crops_from_array(
        crops.astype(np.float32),
        tmp_path / "b",
        channel_names=channels,
        dtype="uint16",
        progress=False,
    )
    np.testing.assert_array_equal(get_crops(whole), crops)
    resized = crops_from_array(
        crops, tmp_path / "c", channel_names=channels, resize_to=20, progress=False
    )
    assert get_crops(resized).dtype == crops.dtype


def test_a_second_writer_of_the_same_folder_is_refused(real_crops, tmp_path, channels):
    import json
    import socket

    from mcvi_ops.data import StoreLockedError

    out = tmp_path / "out"
    out.mkdir()
    # process 1 (always running) holds the folder's store lock
    owner = {"pid": 1, "host": socket.gethostname(), "time": 0}
    (out / "crops.zarr.lock").write_text(json.dumps(owner))
    with pytest.raises(StoreLockedError, match="being written by process 1"):
        crops_from_array(real_crops[0][:4], out, channel_names=channels, progress=False)
    assert not (out / "cells.h5ad").exists() and not (out / "crops.zarr").exists()
